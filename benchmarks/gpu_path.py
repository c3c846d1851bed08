"""The GPU path of the speed benchmark (issue 20): one prepared script for a lent GPU machine.

Nothing depends on it (CI never has a GPU). On the machine, from the repository root:

  benchmarks/gpu_path.sh                        # = python3 benchmarks/gpu_path.py --out $OUT (wheels from .whl/)
  python3 benchmarks/gpu_path.py --out DIR [--size 738m] [--device cuda] [--budget-min 8] [--repeats 3]
  python3 benchmarks/gpu_path.py --smoke --out DIR      # tiny set on the CPU: checks the script, measures nothing

It prints the device, builds the --size input set (make_inputs.py, 738m by default) under --workdir,
and measures, each command in its own process (merge_speed.measure: spawn to exit, the child's
peak RSS), in rounds while the --budget-min lasts (counted from the script's start, set build
included; a run still going at the end is killed and recorded as such):

  round 1   the I/O floor; `mergelab merge --device DEVICE` for task_arithmetic, ties, dare_ties and
            della (merge_speed.py's recipes); the data phases of RegMean and Fisher on DEVICE; `mergelab
            merge --device cpu` for ties and della (once; left out when DEVICE is cpu)
  round 2+  the floor and the DEVICE merges again, up to --repeats runs each, while time is left

The data phases run on the LM zoo (--lm-zoo, default `default`) when it is built on the machine;
otherwise (the usual case on a bare machine: its base and data sources are not there) on a
synthetic stand-in, which the output says: a random-init Llama of the zoo base's shape
(SmolLM2-135M: hidden 576, 30 layers, intermediate 1536, 9 heads, 3 KV heads, vocab 49152, tied)
and --data-experts fine-tunes of it (mergelab.synthetic), each calibrated on random word sequences
long enough to fill --max-length tokens. Each data-informed merge runs in a child (`mergelab.merge`
with the recipe's calibration); the data phase's own seconds come from its plan summary.

Everything is written after every run to DIR/gpu_path.json and DIR/gpu_path.md (medians, min-max,
ratios to the floor's median, the DELLA target: ≤ 3x the floor on GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_inputs  # noqa: E402 - lives beside this script, importable only after the path insert above
import merge_speed  # noqa: E402 - likewise

GB = 1e9
MERGE_METHODS = ("task_arithmetic", "ties", "dare_ties", "della")
CPU_METHODS = ("ties", "della")
DATA_METHODS = ("regmean", "fisher")
DELLA_TARGET = 3.0
LM_ZOO_SHAPE = {
    "hidden": 576,
    "layers": 30,
    "intermediate": 1536,
    "heads": 9,
    "kv_heads": 3,
    "vocab": 49152,
    "tie_embeddings": True,
}
"""The LM zoo base's shape (SmolLM2-135M-Instruct), for the synthetic stand-in."""
TINY_SHAPE = {"hidden": 64, "layers": 2, "intermediate": 128, "heads": 4, "kv_heads": 2, "vocab": 128}
WORDS = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as", "was", "at", "by"]


@dataclass
class Entry:
    """One measured command: its runs and, for a data-informed merge, each run's data-phase summary."""

    label: str
    tool: str  # floor | mergelab
    method: str
    device: str
    command: str = ""
    runs: list[merge_speed.Run] = field(default_factory=list)
    data_phase: list[dict[str, Any]] = field(default_factory=list)
    stopped: int = 0  # runs killed when the budget ended (not failures)

    def walls(self) -> list[float]:
        return [r.wall_s for r in self.runs if r.rc == 0]

    def median(self) -> float | None:
        w = self.walls()
        return statistics.median(w) if w else None


class Budget:
    """Wall-clock budget from ``start``: what is left, and whether a run of a known length fits."""

    def __init__(self, seconds: float, start: float | None = None) -> None:
        self.seconds = seconds
        self.start = time.perf_counter() if start is None else start

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def fits(self, expected: float | None) -> bool:
        """A first run (``expected`` None) is tried while any time is left; a repeat only if it fits."""
        left = self.left()
        return left > 1.0 if expected is None else left > 1.1 * expected


# ---------------------------------------------------------------------------------------------
# the device and the inputs


def device_info(device: str) -> dict[str, Any]:
    """torch's view of the machine: version, CUDA, the GPU's name and memory (when asked for cuda)."""
    import torch

    info: dict[str, Any] = {
        "asked": device,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_version": torch.version.cuda,
        "cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / GB, 1), gpu_count=torch.cuda.device_count())
    return info


def build_set(workdir: Path, size: str) -> tuple[Path, float]:
    """The --size input set (built by make_inputs.py in a child unless complete); seconds it took."""
    t0 = time.perf_counter()
    root = merge_speed.ensure_set(workdir, size)
    return root, time.perf_counter() - t0


def write_calibration(path: Path, n: int, words: int, seed: int) -> Path:
    """``n`` JSONL rows of ``words`` random words each (enough to fill max_length tokens)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")
    return path


def data_models(args: argparse.Namespace) -> dict[str, Any]:
    """Base, experts and calibration files for the data phases: the LM zoo's, else a synthetic stand-in."""
    zoo: Any = None
    try:
        from mergelab_bench.zoo.lm.build import load_lm_zoo

        zoo = load_lm_zoo(args.lm_zoo)
    except Exception as exc:  # no zoo here (the usual case on a bare machine): say so and use the stand-in
        reason = f"{type(exc).__name__}: {exc}"
    if zoo is not None:
        tasks = list(zoo.tasks)
        return {
            "source": f"LM zoo {args.lm_zoo!r} ({zoo.root}, {len(tasks)} experts)",
            "synthetic": False,
            "base": str(zoo.base_dir),
            "experts": [str(zoo.expert_model_dir(t)) for t in tasks],
            "calibration": [str(zoo.data(t).path / "train.jsonl") for t in tasks],
            "max_length": int(zoo.eval_settings["max_len"]),
        }
    from mergelab.synthetic import make_expert, write_base_streamed

    shape = dict(TINY_SHAPE if args.data_shape == "tiny" else LM_ZOO_SHAPE)
    root = args.workdir / f"data-{args.data_shape}"
    base = root / "base"
    experts = [root / f"expert_{i}" for i in range(args.data_experts)]
    cals = [root / f"calibration_{i}.jsonl" for i in range(args.data_experts)]
    if not (root / "DONE").is_file():
        kinds = ("dense", "sparse", "conflict")
        kv = shape.pop("kv_heads")
        tie = bool(shape.pop("tie_embeddings", False))
        write_base_streamed(base, **shape, kv_heads=kv, tie_embeddings=tie, max_shard_size="1GB", seed=0)
        for i, e in enumerate(experts):
            make_expert(base, e, kind=kinds[i % 3], seed=i + 1, partner_seed=1, scale=make_inputs.DELTA_SCALE)
        root.joinpath("DONE").write_text("")
    for i, c in enumerate(cals):
        write_calibration(c, args.num_examples, words=args.max_length + 32, seed=i)
    return {
        "source": f"SYNTHETIC stand-in ({args.data_shape} shape, {args.data_experts} experts, random word "
        f"sequences), not the LM zoo: {reason}",
        "synthetic": True,
        "base": str(base),
        "experts": list(map(str, experts)),
        "calibration": list(map(str, cals)),
        "max_length": args.max_length,
    }


def data_recipe(method: str, models: dict[str, Any], num_examples: int) -> dict[str, Any]:
    """A RegMean / Fisher recipe over ``models`` (causal LMs, one JSONL calibration file per expert)."""
    return {
        "merge_method": method,
        "base_model": models["base"],
        "models": [
            {"model": e, "calibration": {"path": c, "text_field": "text", "label_field": None}}
            for e, c in zip(models["experts"], models["calibration"], strict=True)
        ],
        "calibration": {"num_examples": num_examples, "max_length": models["max_length"], "model_type": "causal_lm"},
    }


# ---------------------------------------------------------------------------------------------
# measuring


def data_phase_child(recipe: Path, out: Path, device: str) -> int:
    """In the child: one data-informed merge; prints its plan summary's data phase as a JSON line."""
    import mergelab

    res = mergelab.merge(recipe, out, device=device, force=True)
    print("DATA_PHASE " + json.dumps(res.plan_summary.get("data_phase", {}), default=str), flush=True)
    return 0


def parse_data_phase(log: str) -> dict[str, Any]:
    for line in Path(log).read_text(errors="replace").splitlines()[::-1]:
        if line.startswith("DATA_PHASE "):
            return dict(json.loads(line[len("DATA_PHASE ") :]))
    return {}


def run_once(entry: Entry, cmd: list[str], out: Path, work: Path, env: dict[str, str], budget: Budget) -> None:
    """Measure ``cmd`` once into ``entry`` (killed when the budget ends)."""
    i = len(entry.runs)
    log = work / "logs" / f"{entry.label.replace(' ', '_')}-{i}.log"
    r = merge_speed.measure(cmd, out, log, env, timeout=max(1.0, budget.left()))
    entry.command = shlex.join(cmd)
    entry.runs.append(r)
    if entry.tool == "data":
        entry.data_phase.append(parse_data_phase(r.log) if r.rc == 0 else {})
    dp = entry.data_phase[-1].get("seconds") if entry.data_phase else None
    if r.rc == 0:
        note = ""
    elif budget.left() <= 0:
        note = "  STOPPED at the end of the time budget"
        entry.stopped += 1
    else:
        note = f"  FAILED rc={r.rc} (log {r.log})\n{merge_speed.tail(r.log)}"
    print(
        f"  {entry.label:28s} run {i + 1}: {r.wall_s:7.2f} s  {r.rss_bytes / GB:5.2f} GB"
        + (f"  data phase {dp:.2f} s" if isinstance(dp, (int, float)) else "")
        + note,
        flush=True,
    )


def table(entries: list[Entry], floor: Entry | None) -> tuple[list[str], list[list[str]]]:
    head = ["what", "device", "runs", "wall s (median)", "min–max", "× floor", "peak RSS GB", "data phase s"]
    # × floor: the set's merges only (the data phases run on other models)
    fw = floor.median() if floor else None
    body = []
    for e in entries:
        w, walls = e.median(), e.walls()
        rss = [r.rss_bytes for r in e.runs if r.rc == 0]
        dps = [d["seconds"] for d in e.data_phase if isinstance(d.get("seconds"), (int, float))]
        failed = len(e.runs) - len(walls) - e.stopped
        body.append(
            [
                e.label,
                e.device,
                f"{len(walls)}" + (f" (+{failed} failed)" if failed else "") + (" (+1 stopped)" if e.stopped else ""),
                merge_speed.fmt(w, ".2f"),
                f"{min(walls):.2f}–{max(walls):.2f}" if walls else "—",
                merge_speed.fmt(w / fw if w and fw and e.tool != "data" else None, ".2f", "×"),
                merge_speed.fmt(statistics.median(rss) / GB if rss else None, ".2f"),
                merge_speed.fmt(statistics.median(dps) if dps else None, ".2f"),
            ]
        )
    return head, body


def target_line(entries: list[Entry], floor: Entry | None, device: str) -> str | None:
    della = next((e for e in entries if e.tool == "mergelab" and e.method == "della" and e.device == device), None)
    fw = floor.median() if floor else None
    if della is None or not della.median() or not fw:
        return None
    x = della.median() / fw  # type: ignore[operator]
    verdict = "ok" if x <= DELLA_TARGET else "MISSED"
    return f"della on {device}: {x:.2f}× the floor (target ≤ {DELLA_TARGET:g}×) {verdict}"


def write_outputs(out: Path, doc: dict[str, Any], entries: list[Entry], floor: Entry | None) -> None:
    """gpu_path.json (everything) and gpu_path.md (the table) under ``out``, rewritten after every run."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {**doc, "entries": [asdict(e) for e in entries]}
    head, body = table(entries, floor)
    target = target_line(entries, floor, doc["device"]["asked"])
    doc["table"] = {"head": head, "body": body}
    doc["target"] = target
    (out / "gpu_path.json").write_text(json.dumps(doc, indent=2, default=str))
    dev = doc["device"]
    lines = [
        "# GPU path (benchmarks/gpu_path.py)",
        "",
        f"command: `{doc['command']}`",
        "",
        f"device: {dev.get('gpu', 'no GPU')} ({dev.get('gpu_memory_gb', '?')} GB), torch {dev['torch']}, "
        f"CUDA {dev['cuda_version']}, {dev['cpus']} CPUs; asked for {dev['asked']}",
        "",
        f"set: {doc['size']} ({doc.get('set_info', {}).get('params', 0) / 1e6:.0f} M parameters, "
        f"{len(doc.get('models', []))} models; built or found in {doc.get('build_s', 0):.0f} s); "
        f"budget {doc['budget_s'] / 60:.1f} min, used {doc.get('elapsed_s', 0) / 60:.1f} min"
        + ("" if doc.get("finished") else " (partial: still running or stopped)"),
        "",
        f"data phases on: {doc.get('data_models', {}).get('source', '—')}",
        "",
        merge_speed.render(head, body, markdown=True),
        "",
    ]
    if target:
        lines += [target, ""]
    if doc.get("skipped"):
        lines += ["skipped (time budget): " + ", ".join(doc["skipped"]), ""]
    (out / "gpu_path.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")), help="default: $OUT")
    ap.add_argument("--workdir", type=Path, default=make_inputs.DEFAULT_WORKDIR)
    ap.add_argument("--size", choices=sorted(make_inputs.SHAPES), default="738m")
    ap.add_argument("--device", default="cuda", help="device of the measured merges and data phases (cuda, cpu)")
    ap.add_argument("--budget-min", type=float, default=8.0, help="total minutes, set build included")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the floor and of each DEVICE merge, time allowing")
    ap.add_argument("--methods", default=",".join(MERGE_METHODS))
    ap.add_argument("--cpu-methods", default=",".join(CPU_METHODS), help="merged once with --device cpu ('' none)")
    ap.add_argument("--data-methods", default=",".join(DATA_METHODS))
    ap.add_argument("--lm-zoo", default="default", help="the LM zoo for the data phases, when built here")
    ap.add_argument("--data-shape", choices=["lm-zoo", "tiny"], default="lm-zoo", help="synthetic stand-in's shape")
    ap.add_argument("--data-experts", type=int, default=5, help="synthetic stand-in: experts (the zoo has 5)")
    ap.add_argument("--num-examples", type=int, default=256, help="calibration examples per expert")
    ap.add_argument("--max-length", type=int, default=128, help="calibration tokens per example (stand-in)")
    ap.add_argument(
        "--smoke",
        "--dry-run",
        action="store_true",
        help="check the script on a CPU: the tiny set, --device cpu, 1 repeat, tiny data models, 16 examples",
    )
    ap.add_argument("--data-phase-child", nargs=3, metavar=("RECIPE", "OUT", "DEVICE"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.smoke:
        a.size, a.device, a.repeats, a.data_shape, a.data_experts, a.num_examples, a.max_length = (
            "tiny", "cpu", 1, "tiny", 2, 16, 16,
        )  # fmt: skip
    a.workdir = a.workdir.resolve()
    a.out = a.out.resolve()
    for name in ("methods", "cpu_methods", "data_methods"):
        setattr(a, name, [m.strip() for m in getattr(a, name).split(",") if m.strip()])
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.data_phase_child:
        recipe, out, device = a.data_phase_child
        return data_phase_child(Path(recipe), Path(out), device)
    budget = Budget(a.budget_min * 60)
    command = shlex.join(["gpu_path.py", *(sys.argv[1:] if argv is None else argv)])
    dev = device_info(a.device)
    print(f"command: {command}\ndevice: {json.dumps(dev)}", flush=True)
    doc: dict[str, Any] = {
        "command": command,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "device": dev,
        "size": a.size,
        "budget_s": budget.seconds,
        "repeats": a.repeats,
        "skipped": [],
        "finished": False,
    }
    entries: list[Entry] = []
    if a.device.startswith("cuda") and not dev["cuda_available"]:
        doc["error"] = "torch.cuda.is_available() is False: no GPU measured"
        print(doc["error"], flush=True)
        write_outputs(a.out, doc, entries, None)
        return 2
    try:
        import mergelab  # noqa: F401 - a missing dependency (pydantic, blake3 ...) fails here, before any work
    except ImportError as exc:
        doc["error"] = f"cannot import mergelab ({exc}); carry the missing wheels in .whl/ (benchmarks/README.md)"
        print(doc["error"], flush=True)
        write_outputs(a.out, doc, entries, None)
        return 2

    root, doc["build_s"] = build_set(a.workdir, a.size)
    models = make_inputs.set_models(root)
    doc["models"] = list(models)
    doc["set_info"] = json.loads((root / "DONE.json").read_text())
    work = a.workdir / "runs" / f"gpu-{a.size}"
    (work / "recipes").mkdir(parents=True, exist_ok=True)
    env = merge_speed.child_env()
    ml = merge_speed.mergelab_cmd()
    inputs = [root / m for m in models]
    print(f"set {a.size} ready in {doc['build_s']:.0f} s; warming the page cache: {merge_speed.warm(inputs):.1f} s")

    floor = Entry("floor", "floor", merge_speed.floor_label(len(models)), "cpu")
    floor_cmd = [sys.executable, str(HERE / "io_floor.py"), str(work / "out-floor"), *map(str, inputs)]
    merges: list[tuple[Entry, list[str], Path]] = []
    for method in a.methods:
        recipe = work / "recipes" / f"{method}.yaml"
        recipe.write_text(merge_speed.recipe_text(method, root))
        for device in [a.device] + (["cpu"] if method in a.cpu_methods and a.device != "cpu" else []):
            out = work / f"out-{method}-{device}"
            cmd = [*ml, "merge", str(recipe), str(out), "--force", "-q", "--seed", "0", "--device", device]
            merges.append((Entry(f"mergelab {method}", "mergelab", method, device), cmd, out))
    device_merges = [m for m in merges if m[0].device == a.device]
    cpu_merges = [m for m in merges if m[0].device != a.device]
    entries.append(floor)
    entries += [m[0] for m in device_merges]

    def attempt(entry: Entry, cmd: list[str], out: Path) -> None:
        expected = entry.median() if entry.runs else None
        if not budget.fits(expected):
            doc["skipped"].append(f"{entry.label} ({entry.device}) run {len(entry.runs) + 1}")
            print(f"  {entry.label:28s} skipped: {max(0.0, budget.left()):.0f} s left", flush=True)
            return
        run_once(entry, cmd, out, work, env, budget)
        doc["elapsed_s"] = time.perf_counter() - budget.start
        write_outputs(a.out, doc, entries, floor)

    print("\nround 1", flush=True)
    attempt(floor, floor_cmd, work / "out-floor")
    for entry, cmd, out in device_merges:
        attempt(entry, cmd, out)
    if a.data_methods and budget.fits(None):
        doc["data_models"] = data_models(a)
        print(f"data phases on: {doc['data_models']['source']}", flush=True)
        for method in a.data_methods:
            recipe = work / "recipes" / f"data-{method}.yaml"
            recipe.write_text(json.dumps(data_recipe(method, doc["data_models"], a.num_examples), indent=2))
            out = work / f"out-data-{method}"
            entry = Entry(f"{method} (data phase + merge)", "data", method, a.device)
            entries.append(entry)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--data-phase-child", str(recipe), str(out), a.device]
            attempt(entry, cmd, out)
    for entry, cmd, out in cpu_merges:
        entries.append(entry)
        attempt(entry, cmd, out)
    for k in range(2, a.repeats + 1):
        print(f"\nround {k}", flush=True)
        merge_speed.warm(inputs)
        attempt(floor, floor_cmd, work / "out-floor")
        for entry, cmd, out in device_merges:
            attempt(entry, cmd, out)
    doc["elapsed_s"] = time.perf_counter() - budget.start
    doc["finished"] = True
    write_outputs(a.out, doc, entries, floor)
    head, body = table(entries, floor)
    print("\n" + merge_speed.render(head, body, markdown=False))
    target = target_line(entries, floor, a.device)
    if target:
        print(target)
    print(f"\nwritten: {a.out / 'gpu_path.json'}, {a.out / 'gpu_path.md'}")
    failed = [e.label for e in entries if sum(r.rc != 0 for r in e.runs) > e.stopped]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
