"""Merge speed and memory: mergelab vs the I/O floor vs mergekit, on local bf16 Llama checkpoints.

For each input set (168m: hidden 1024 x 8 layers; 738m: hidden 2048 x 12 layers; 3b: hidden 3072 x 26
layers; 7b: hidden 4096 x 32 layers; all vocab 32000, bf16, a base plus 3 fine-tunes (7b: 2), built
once under --workdir by make_inputs.py) and each page-cache regime (--regime cached|cold|both) this
script

1. cached: warms the page cache (reads every input file once); cold: before every timed run, evicts
   the inputs from the page cache (page_cache.evict: drop_caches, else fadvise; --evict) and says
   how much of them stayed cached,
2. runs the I/O floor (io_floor.py: read every tensor of the inputs, write one model in 1 GB
   shards) --floor-repeats times,
3. runs `mergelab merge` and, if present, mergekit's `mergekit-yaml` on the same recipe for each
   method, --repeats times each,

every command in its own process, timed from spawn to exit, with the child's peak RSS from
os.wait4's rusage (ru_maxrss). It prints medians, min-max, ratios to the floor and to mergekit,
one table per set and regime (floor and tools of a table measured in the same regime and run).
--shards-test re-shards the inputs into smaller files and shows mergelab's peak RSS per shard size.

  python benchmarks/merge_speed.py --size 738m --repeats 3 [--markdown]
  python benchmarks/merge_speed.py --size 3b --regime both --repeats 3 --no-mergekit

See benchmarks/README.md for what is measured and the caveats.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import make_inputs  # noqa: E402 - lives beside this script, importable only after the path insert above
import page_cache  # noqa: E402 - likewise

# mergekit-yaml beside $MERGEKIT_PYTHON (a venv with mergekit 0.1.5), or --mergekit; None: not available
DEFAULT_MERGEKIT = (
    str(Path(os.environ["MERGEKIT_PYTHON"]).parent / "mergekit-yaml") if os.environ.get("MERGEKIT_PYTHON") else None
)
THIRD = 1 / 3
RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "task_arithmetic": ({}, {"weight": THIRD}),
    "ties": ({}, {"weight": 1.0, "density": 0.5}),
    "dare_ties": ({}, {"weight": 1.0, "density": 0.5}),
    "della": ({}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    "linear": ({}, {"weight": THIRD}),  # average of all 4 models; weights are normalised (sum to 1)
    "breadcrumbs": ({}, {"weight": THIRD, "density": 0.9, "gamma": 0.01}),
    "model_stock": ({}, {}),
    "slerp": ({"t": 0.5}, {}),  # base -> ft_dense
}
"""(global, per-model) parameters of the recipes measured since the first speed report (also
valid for mergekit); the default --methods, in this order. Any other registered data-free method
is measured with its card's typical parameters (``MethodCard.typical``)."""
DEFAULT_METHODS = tuple(RECIPES)
MERGEKIT_METHODS = frozenset(
    ("linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
     "breadcrumbs_ties", "della", "della_linear", "model_stock", "karcher", "sce")
)  # fmt: skip
"""mergekit 0.1.5's names among mergelab's methods: mergekit is run on these only."""


def available_methods() -> list[str]:
    """Every registered method the speed benchmark can run: the data-free ones (registry order)."""
    from mergelab.methods import all_methods

    return [m.name for m in all_methods() if m.statistics is None]


# targets from the issue, on the 738m set: wall / floor
TARGETS = {"task_arithmetic": 2.0, "ties": 3.0, "dare_ties": 3.0, "della": 3.0}
RSS_TARGET_VS_MERGEKIT = 0.6
GB = 1e9


# ---------------------------------------------------------------------------------------------
# recipes (the same YAML file is given to both tools)


def _yaml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)  # a double-quoted YAML scalar


def recipe_parameters(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, per-model) parameters of ``method``'s recipe: pinned, else its card's typical ones."""
    from mergelab.methods import get_method

    if method in RECIPES:
        return RECIPES[method]
    gp, mp = get_method(method).card.typical or ({}, {})
    return dict(gp), dict(mp)


def recipe_text(method: str, set_root: Path) -> str:
    """The recipe given to both tools: the 3 fine-tunes on the base (the base listed among the
    models too for methods that merge a fixed number of models, as mergekit's SLERP wants; all 4
    models for a method that ignores the base, or as many as it takes)."""
    from mergelab.methods import get_method

    spec = get_method(method)
    gp, mp = recipe_parameters(method)
    base = set_root / "base"
    fts = [set_root / m for m in make_inputs.set_models(set_root)[1:]]
    flow = "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in mp.items()) + "}"
    lines = []
    if spec.base == "ignored":
        models = [(p, True) for p in (base, *fts)][: spec.max_experts]  # passthrough: one model
    else:
        lines.append(f"base_model: {base}")
        experts = fts[: spec.max_experts] if spec.max_experts is not None else fts
        models = ([(base, False)] if spec.max_experts is not None else []) + [(p, True) for p in experts]
    lines.append("models:")
    for path, is_expert in models:
        lines.append(f"  - model: {path}")
        if mp and is_expert:
            lines.append(f"    parameters: {flow}")
    if gp:
        lines.append("parameters:")
        lines += [f"  {k}: {_yaml_value(v)}" for k, v in gp.items()]
    return f"merge_method: {method}\n" + "\n".join(lines) + "\ndtype: bfloat16\n"


# ---------------------------------------------------------------------------------------------
# measuring


@dataclass
class Run:
    wall_s: float
    rss_bytes: int
    rc: int
    load1: float  # 1-minute load average just before the run
    out_bytes: int = 0
    log: str = ""
    eviction: dict[str, Any] | None = None  # cold regime: what page_cache.evict did before this run


@dataclass
class Row:
    tool: str
    method: str
    runs: list[Run] = field(default_factory=list)
    command: str = ""
    source: str = ""  # mergelab's git state while measured (see source_state)

    @property
    def ok(self) -> list[Run]:
        return [r for r in self.runs if r.rc == 0]

    def wall(self) -> float | None:
        return statistics.median(r.wall_s for r in self.ok) if self.ok else None

    def rss(self) -> float | None:
        return statistics.median(r.rss_bytes for r in self.ok) if self.ok else None


def warm(paths: list[Path]) -> float:
    """Read every file under ``paths`` once so the timed runs start from the page cache."""
    t0 = time.perf_counter()
    buf = bytearray(16 << 20)
    for root in paths:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass
    return time.perf_counter() - t0


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0


def measure(
    cmd: list[str],
    out_dir: Path,
    log: Path,
    env: dict[str, str],
    evict: list[Path] | None = None,
    evict_method: str = "auto",
    timeout: float | None = None,
) -> Run:
    """Run ``cmd`` as a child process; wall time from spawn to exit, peak RSS from wait4.

    ``evict``: files or folders to evict from the page cache first (after the previous output is
    deleted and synced, outside the timing). ``timeout``: seconds after which the child is killed
    (its run then has rc -9).
    """
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.sync()
    eviction = None
    if evict is not None:
        ev = page_cache.evict(evict, evict_method)
        eviction = ev.as_dict()
        print(f"    {ev.line()}", flush=True)
    load1 = os.getloadavg()[0]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        status, usage = _wait(proc, t0, timeout)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    run = Run(
        wall,
        usage.ru_maxrss * 1024,
        proc.returncode,
        load1,
        dir_bytes(out_dir),
        str(log),
        eviction,
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.sync()  # flush this run's dirty pages before the next run starts
    return run


def _wait(proc: subprocess.Popen, t0: float, timeout: float | None) -> tuple[int, Any]:
    """wait4 on ``proc`` (its own rusage); past ``timeout`` seconds from ``t0`` it is killed."""
    if timeout is None:
        _, status, usage = os.wait4(proc.pid, 0)
        return status, usage
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return status, usage
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            return status, usage
        time.sleep(0.01)


def tail(path: str, n: int = 8) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------
# tools


def mergelab_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "mergelab"
    if exe.is_file():
        return [str(exe)]
    found = shutil.which("mergelab")
    if found:
        return [found]
    return [sys.executable, "-c", "from mergelab.cli import app; app()"]


def version_of(python: str, package: str) -> str:
    try:
        out = subprocess.run(
            [
                python,
                "-c",
                f"import importlib.metadata as m; print(m.version({package!r}))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return out.stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def mergekit_python(mergekit: str) -> str:
    try:
        first = Path(mergekit).read_text(errors="replace").splitlines()[0]
        if first.startswith("#!"):
            return first[2:].strip().split()[0]
    except (OSError, IndexError):
        pass
    return str(Path(mergekit).parent / "python")


def source_state() -> str:
    """The mergelab source being measured: git commit, plus '+dirty' when src/ has local edits.

    The package is installed editable, so a commit landing mid-run changes what later runs
    measure; merge_speed.py checks this before and after each row and says so.
    """
    try:
        import mergelab

        src = Path(mergelab.__file__).resolve().parent
        head = subprocess.run(
            ["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(src), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout.strip()
        if not status:
            return head or "?"
        # fingerprint of the local edits (tracked diff + untracked file names)
        diff = subprocess.run(
            ["git", "-C", str(src), "diff", "HEAD", "--", "."],
            capture_output=True,
            timeout=60,
            check=False,
        ).stdout
        return f"{head or '?'}+dirty:{hashlib.sha1(diff + status.encode()).hexdigest()[:8]}"
    except (OSError, subprocess.SubprocessError, ImportError):
        return "?"


def machine() -> dict[str, Any]:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "ram_gb": round(mem / GB, 1),
        "cpu": cpu,
        "python": platform.python_version(),
        "load_avg": os.getloadavg(),
    }


# ---------------------------------------------------------------------------------------------
# one input set


def ensure_set(workdir: Path, size: str) -> Path:
    root = make_inputs.set_dir(workdir, size)
    if not make_inputs.is_complete(root):
        print(f"building the {size} input set under {root} (once) ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                str(HERE / "make_inputs.py"),
                "--size",
                size,
                "--workdir",
                str(workdir),
            ],
            check=True,
        )
    return root


def ensure_reshard(workdir: Path, src: Path, shard_size: str) -> Path:
    dst = workdir / f"{src.name}-shards{shard_size.lower()}"
    if not make_inputs.is_complete(dst):
        print(
            f"re-sharding {src} into {shard_size} shards under {dst} (once) ...",
            flush=True,
        )
        subprocess.run(
            [
                sys.executable,
                str(HERE / "make_inputs.py"),
                "--reshard",
                str(src),
                str(dst),
                "--shard-size",
                shard_size,
            ],
            check=True,
        )
    return dst


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def floor_label(n_models: int) -> str:
    return f"read {n_models} + write 1"


def run_floor(
    root: Path, work: Path, repeats: int, env: dict[str, str], cold: bool = False, evict_method: str = "auto"
) -> Row:
    models = make_inputs.set_models(root)
    row = Row("floor", floor_label(len(models)))
    inputs = [root / m for m in models]
    cmd = [
        sys.executable,
        str(HERE / "io_floor.py"),
        str(work / "out-floor"),
        *map(str, inputs),
    ]
    row.command = shlex.join(cmd)
    for i in range(repeats):
        r = measure(
            cmd,
            work / "out-floor",
            work / "logs" / f"floor-{i}.log",
            env,
            evict=inputs if cold else None,
            evict_method=evict_method,
        )
        row.runs.append(r)
        print(
            f"  floor            run {i + 1}: {r.wall_s:7.2f} s  {r.rss_bytes / GB:5.2f} GB"
            + ("" if r.rc == 0 else f"  FAILED rc={r.rc}\n{tail(r.log)}"),
            flush=True,
        )
    return row


def run_tool(
    tool: str,
    method: str,
    recipe: Path,
    work: Path,
    repeats: int,
    env: dict[str, str],
    mergelab_extra: list[str],
    mergekit: str,
    expected_bytes: int,
    evict: list[Path] | None = None,
    evict_method: str = "auto",
) -> Row:
    """``evict``: the inputs to evict from the page cache before every run (the cold regime)."""
    out = work / f"out-{tool}-{method}"
    if tool == "mergelab":
        cmd = [
            *mergelab_cmd(),
            "merge",
            str(recipe),
            str(out),
            "--force",
            "-q",
            "--seed",
            "0",
            *mergelab_extra,
        ]
    else:
        cmd = [mergekit, str(recipe), str(out), "--random-seed", "0", "--quiet"]
    row = Row(tool, method, command=shlex.join(cmd))
    before = source_state() if tool == "mergelab" else ""
    for i in range(repeats):
        r = measure(cmd, out, work / "logs" / f"{tool}-{method}-{i}.log", env, evict=evict, evict_method=evict_method)
        row.runs.append(r)
        note = ""
        if r.rc != 0:
            note = f"  FAILED rc={r.rc} (log {r.log})\n{tail(r.log)}"
        elif expected_bytes and abs(r.out_bytes - expected_bytes) > 0.02 * expected_bytes:
            note = f"  WARNING: wrote {r.out_bytes / GB:.3f} GB of tensors, expected {expected_bytes / GB:.3f} GB"
        print(
            f"  {tool:9s} {method:16s} run {i + 1}: {r.wall_s:7.2f} s  {r.rss_bytes / GB:5.2f} GB"
            f"  (load {r.load1:.1f}){note}",
            flush=True,
        )
    if tool == "mergelab":
        row.source = before
        after = source_state()
        if after != before:
            row.source = f"{before} -> {after}"
            print(
                f"  WARNING: the mergelab source changed during these runs ({before} -> {after})",
                flush=True,
            )
    return row


# ---------------------------------------------------------------------------------------------
# tables


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "—" if x is None else f"{x:{spec}}{suffix}"


def table_rows(floor: Row, rows: list[Row]) -> tuple[list[str], list[list[str]]]:
    head = [
        "tool",
        "method",
        "wall s (median)",
        "min–max",
        "× floor",
        "peak RSS GB",
        "RSS × floor",
        "wall vs mergekit",
        "RSS vs mergekit",
    ]
    fw, fr = floor.wall(), floor.rss()
    by = {(r.tool, r.method): r for r in rows}
    body = []

    def line(r: Row) -> list[str]:
        w, m = r.wall(), r.rss()
        lo = min((x.wall_s for x in r.ok), default=None)
        hi = max((x.wall_s for x in r.ok), default=None)
        mk = by.get(("mergekit", r.method)) if r.tool == "mergelab" else None
        vs_w = vs_m = ""
        if mk is not None and mk.wall() and w:
            vs_w = f"{w / mk.wall():.2f}×"  # type: ignore[operator]
            vs_m = f"{m / mk.rss():.2f}×"  # type: ignore[operator]
        failed = len(r.runs) - len(r.ok)
        name = r.method + (f" ({failed} failed)" if failed else "")
        return [
            r.tool,
            name,
            fmt(w, ".2f"),
            f"{fmt(lo, '.2f')}–{fmt(hi, '.2f')}",
            fmt(w / fw if w and fw else None, ".2f", "×"),
            fmt(m / GB if m else None, ".2f"),
            fmt(m / fr if m and fr else None, ".2f", "×"),
            vs_w,
            vs_m,
        ]

    body.append(line(floor))
    for r in rows:
        body.append(line(r))
    return head, body


def render(head: list[str], body: list[list[str]], markdown: bool, left: int = 2) -> str:
    """A plain-text or Markdown table; the first ``left`` columns are text, the rest numbers."""
    if markdown:
        align = ["---"] * left + ["---:"] * (len(head) - left)
        lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
        lines += ["| " + " | ".join(c or "" for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(head[i]), *(len(row[i]) for row in body)) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) if i < left else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for row in body:
        out.append("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(out)


def target_lines(floor: Row, rows: list[Row]) -> list[str]:
    fw = floor.wall()
    by = {(r.tool, r.method): r for r in rows}
    out = []
    for method, limit in TARGETS.items():
        r = by.get(("mergelab", method))
        if r is None or not r.wall() or not fw:
            continue
        x = r.wall() / fw  # type: ignore[operator]
        out.append(f"{method}: {x:.2f}× floor (target ≤ {limit:g}×) {'ok' if x <= limit else 'MISSED'}")
    for (tool, method), r in by.items():
        mk = by.get(("mergekit", method))
        if tool == "mergelab" and mk is not None and r.rss() and mk.rss():
            x = r.rss() / mk.rss()  # type: ignore[operator]
            out.append(
                f"{method}: peak RSS {x:.2f}× mergekit's (target ≤ {RSS_TARGET_VS_MERGEKIT:g}×) "
                f"{'ok' if x <= RSS_TARGET_VS_MERGEKIT else 'MISSED'}"
            )
    return out


# ---------------------------------------------------------------------------------------------


def bench_size(size: str, args: argparse.Namespace, env: dict[str, str], mergekit: str | None) -> list[dict]:
    """Measure one input set in each regime of ``args.regimes``: one result (table) per regime."""
    root = ensure_set(args.workdir, size)
    info = json.loads((root / "DONE.json").read_text())
    models = make_inputs.set_models(root)
    inputs = [root / m for m in models]
    print(
        f"\n=== {size}: {info['params'] / 1e6:.0f}M parameters, {info['bytes_per_model'] / GB:.2f} GB per model "
        f"({len(make_inputs.weight_files(root / 'base'))} shard(s)), {len(models)} models ===",
        flush=True,
    )
    results: list[dict] = []
    measured: dict[str, list[Row]] = {}
    for regime in args.regimes:
        result, measured[regime] = bench_regime(size, regime, root, info, inputs, args, env, mergekit)
        results.append(result)
        save_partial(args, size, results)
    if args.shards_test:  # in the cached regime (it warms the page cache), reusing its rows when measured
        i = args.regimes.index("cached") if "cached" in args.regimes else 0
        results[i]["shards"] = shards_test(root, info, args, env, measured.get("cached", []))
        save_partial(args, size, results)
    return results


def bench_regime(
    size: str,
    regime: str,
    root: Path,
    info: dict,
    inputs: list[Path],
    args: argparse.Namespace,
    env: dict[str, str],
    mergekit: str | None,
) -> tuple[dict, list[Row]]:
    """The floor and every method's tools on set ``size`` in one page-cache regime (cached or cold)."""
    cold = regime == "cold"
    work = args.workdir / "runs" / (f"{size}-cold" if cold else size)
    work.mkdir(parents=True, exist_ok=True)
    evict = inputs if cold else None
    if cold:
        print(f"\n--- {size}, cold: the inputs are evicted from the page cache before every run ---", flush=True)
    else:
        print(f"\n--- {size}, cached ---\nwarming the page cache: {warm(inputs):.1f} s", flush=True)
    floor = run_floor(root, work, args.floor_repeats, env, cold=cold, evict_method=args.evict)
    rows: list[Row] = []
    for method in args.methods:
        tools = ["mergelab"] + (["mergekit"] if mergekit and method in MERGEKIT_METHODS else [])
        recipe = work / "recipes" / f"{method}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(recipe_text(method, root))
        if not cold:
            warm(inputs)
        for tool in tools:
            rows.append(
                run_tool(
                    tool,
                    method,
                    recipe,
                    work,
                    args.mergekit_repeats if tool == "mergekit" else args.repeats,
                    env,
                    args.mergelab_args_list,
                    mergekit or "",
                    info["bytes_per_model"],
                    evict=evict,
                    evict_method=args.evict,
                )
            )
    head, body = table_rows(floor, rows)
    result = {
        "size": size,
        "regime": regime,
        "set": info,
        "shards_per_model": len(make_inputs.weight_files(root / "base")),
        "floor": asdict(floor),
        "rows": [asdict(r) for r in rows],
        "table": {"head": head, "body": body},
        "targets": target_lines(floor, rows) if size == "738m" else [],
    }
    return result, rows


def save_partial(args: argparse.Namespace, size: str, results: list[dict]) -> None:
    """Keep what is measured so far on disk (an interrupted run still leaves its numbers)."""
    out = args.workdir / "results" / f"partial-{size}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**args.meta, "results": results}, indent=2))


def regime_comparison(results: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """Cold against cached for one set: each row's median wall in both regimes and their ratio."""
    by = {r.get("regime", "cached"): r for r in results}
    if "cached" not in by or "cold" not in by:
        return None

    def walls(res: dict) -> dict[tuple[str, str], float | None]:
        rows = [Row(r["tool"], r["method"], [Run(**x) for x in r["runs"]]) for r in (res["floor"], *res["rows"])]
        return {(r.tool, r.method): r.wall() for r in rows}

    warm_w, cold_w = walls(by["cached"]), walls(by["cold"])
    head = ["tool", "method", "cached wall s", "cold wall s", "cold / cached"]
    body = []
    for key, w in warm_w.items():
        c = cold_w.get(key)
        body.append([*key, fmt(w, ".2f"), fmt(c, ".2f"), fmt(c / w if c and w else None, ".2f", "×")])
    return head, body


def shards_test(
    root: Path,
    info: dict,
    args: argparse.Namespace,
    env: dict[str, str],
    done: list[Row],
) -> dict:
    methods = args.shards_methods
    sets = [("as built (" + info["max_shard_size"] + ")", root)]
    for s in args.shard_sizes:
        sets.append((s, ensure_reshard(args.workdir, root, s)))
    measured = {r.method: r for r in done if r.tool == "mergelab"}
    head = [
        "input shard size",
        "shards per model",
        "method",
        "wall s (median)",
        "peak RSS GB (median)",
        "min–max RSS GB",
    ]
    body, raw = [], []
    for label, set_root in sets:
        inputs = [set_root / m for m in make_inputs.set_models(set_root)]
        n = len(make_inputs.weight_files(set_root / "base"))
        work = args.workdir / "runs" / f"{set_root.name}"
        print(
            f"\n--- shards test: {set_root.name}, {n} shard(s) per model ---",
            flush=True,
        )
        if not (set_root == root and all(m in measured for m in methods)):
            print(f"warming the page cache: {warm(inputs):.1f} s", flush=True)
        for method in methods:
            if set_root == root and method in measured:  # already measured on this set above
                row = measured[method]
            else:
                recipe = work / "recipes" / f"{method}.yaml"
                recipe.parent.mkdir(parents=True, exist_ok=True)
                recipe.write_text(recipe_text(method, set_root))
                row = run_tool(
                    "mergelab",
                    method,
                    recipe,
                    work,
                    args.repeats,
                    env,
                    args.mergelab_args_list,
                    "",
                    info["bytes_per_model"],
                )
            raw.append({"shard_size": label, "shards": n, **asdict(row)})
            rss = [r.rss_bytes / GB for r in row.ok]
            body.append(
                [
                    label,
                    str(n),
                    method,
                    fmt(row.wall(), ".2f"),
                    fmt(row.rss() / GB if row.rss() else None, ".2f"),
                    f"{min(rss):.2f}–{max(rss):.2f}" if rss else "—",
                ]
            )
    return {"head": head, "body": body, "runs": raw}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--size",
        choices=[*make_inputs.SHAPES, "both"],
        default="738m",
        help="input set (both: 168m then 738m; 3b and 7b need 31 and 54 GB of disk, see make_inputs.py --estimate)",
    )
    ap.add_argument(
        "--regime",
        choices=["cached", "cold", "both"],
        default=None,
        help="page cache: cached (inputs read once before each method; the default), cold (inputs evicted "
        "before every timed run), both (a cached then a cold table per set)",
    )
    ap.add_argument("--cold", action="store_true", help="same as --regime cold")
    ap.add_argument(
        "--evict",
        choices=page_cache.METHODS,
        default="auto",
        help="cold regime: how the inputs leave the page cache (auto: drop_caches when writable, else "
        "fadvise; fadvise: only the inputs, leaving the rest of the machine's cache alone)",
    )
    ap.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated registered methods (default: {','.join(DEFAULT_METHODS)}); 'all': every "
        "data-free method; 'none' runs only the floor (and --shards-test)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per tool and method (median reported)",
    )
    ap.add_argument(
        "--mergekit-repeats",
        type=int,
        default=None,
        help="runs per method for mergekit (default: --repeats; its slow methods take minutes each)",
    )
    ap.add_argument(
        "--floor-repeats",
        type=int,
        default=None,
        help="I/O floor runs (default: max(3, --repeats))",
    )
    ap.add_argument("--no-mergekit", action="store_true", help="measure mergelab and the floor only")
    ap.add_argument(
        "--mergekit",
        default=DEFAULT_MERGEKIT,
        help="path to mergekit-yaml (default: beside $MERGEKIT_PYTHON; skipped if absent)",
    )
    ap.add_argument(
        "--mergelab-args",
        default="",
        help="extra flags for `mergelab merge`, e.g. '--no-hash-inputs'",
    )
    ap.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    ap.add_argument(
        "--shards-test",
        action="store_true",
        help="also re-shard the inputs into smaller files and measure mergelab's peak RSS per shard size",
    )
    ap.add_argument(
        "--shard-sizes",
        default="250MB,100MB",
        help="input shard sizes for --shards-test",
    )
    ap.add_argument(
        "--shards-methods",
        default="task_arithmetic,ties",
        help="methods for --shards-test",
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=make_inputs.DEFAULT_WORKDIR,
        help="where inputs, outputs and logs go (default: <repo>/bench-work, git-ignored)",
    )
    ap.add_argument(
        "--report",
        type=Path,
        metavar="RESULTS.json",
        help="only print the tables of a saved run (results/*.json under the workdir)",
    )
    args = ap.parse_args(argv)
    if args.report:
        report(json.loads(args.report.read_text()), args.markdown)
        return 0

    known = available_methods()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "none"]
    if args.methods == ["all"]:
        args.methods = known
    bad = [m for m in args.methods if m not in known]
    if bad:
        ap.error(f"unknown method(s) {bad}; choose from {', '.join(known)}")
    args.shard_sizes = [s.strip() for s in args.shard_sizes.split(",") if s.strip()]
    args.shards_methods = [m.strip() for m in args.shards_methods.split(",") if m.strip()]
    args.floor_repeats = args.floor_repeats or max(3, args.repeats)
    args.mergekit_repeats = args.mergekit_repeats or args.repeats
    args.mergelab_args_list = shlex.split(args.mergelab_args)
    args.workdir = args.workdir.resolve()
    sizes = ["168m", "738m"] if args.size == "both" else [args.size]
    if args.cold and args.regime not in (None, "cold"):
        ap.error("--cold is --regime cold; give one of them")
    regime = "cold" if args.cold else (args.regime or "cached")
    args.regimes = ["cached", "cold"] if regime == "both" else [regime]

    mergekit: str | None = None
    if not args.no_mergekit:
        if args.mergekit and Path(args.mergekit).is_file() and os.access(args.mergekit, os.X_OK):
            mergekit = args.mergekit
        else:
            print(
                f"mergekit not found at {args.mergekit}: measuring mergelab and the floor only",
                flush=True,
            )

    env = child_env()
    mach = machine()
    command = (
        shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(["merge_speed.py", *argv])
    )
    versions = {
        "mergelab": f"{version_of(sys.executable, 'mergelab')} ({source_state()})",
        "torch": version_of(sys.executable, "torch"),
    }
    if mergekit:
        versions["mergekit"] = version_of(mergekit_python(mergekit), "mergekit")
    print(f"command: {command}")
    print(
        f"machine: {mach['nproc']} CPUs ({mach['cpu']}), {mach['ram_gb']} GB RAM, load average "
        f"{' '.join(f'{x:.2f}' for x in mach['load_avg'])}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)

    args.meta = {
        "command": command,
        "machine": mach,
        "versions": versions,
        "repeats": args.repeats,
        "mergekit_repeats": args.mergekit_repeats,
        "floor_repeats": args.floor_repeats,
        "regimes": args.regimes,
        "evict": args.evict,
    }
    results = []
    t0 = time.perf_counter()
    for size in sizes:
        results.extend(bench_size(size, args, env, mergekit))
    doc = {
        **args.meta,
        "minutes": (time.perf_counter() - t0) / 60,
        "load_end": os.getloadavg()[0],
        "results": results,
    }
    print("\n" + "=" * 100)
    report(doc, args.markdown)
    out = args.workdir / "results" / f"merge_speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"\nraw results: {out}  (print again with --report {out})")
    failed = [f"{r['tool']} {r['method']}" for res in results for r in res["rows"] if any(x["rc"] for x in r["runs"])]
    if failed:
        print(f"failed runs: {', '.join(failed)}")
    return 1 if failed else 0


def report(doc: dict, markdown: bool) -> None:
    """Print the header and the tables of a results document (a finished or a partial run)."""
    mach = doc["machine"]
    print(f"command: {doc['command']}")
    extra = f", at end {doc['load_end']:.2f}; total {doc['minutes']:.1f} min" if "minutes" in doc else " (partial run)"
    print(
        f"machine: {mach['nproc']} CPUs ({mach['cpu']}), {mach['ram_gb']} GB RAM; load average at start "
        f"{mach['load_avg'][0]:.2f}{extra}"
    )
    print("versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()))
    print(
        f"repeats: {doc.get('repeats', '?')} per tool and method, floor {doc.get('floor_repeats', '?')}; "
        "wall = spawn to exit of the "
        "child; peak RSS = the child's ru_maxrss (GB = 1e9 bytes)"
    )
    print("mergelab computes in float32 (its default), mergekit in the recipe dtype (bfloat16)")
    for res in doc["results"]:
        s = res["set"]
        shards = res.get("shards_per_model", "?")
        fts = len(s.get("models", make_inputs.MODELS)) - 1
        regime = res.get("regime", "cached")
        print(
            f"\n{res['size']}: {s['params'] / 1e6:.0f}M parameters, bf16, {s['bytes_per_model'] / GB:.2f} GB per model "
            f"in {shards} shard(s), base + {fts} fine-tunes; page cache: {regime}"
            + (f" ({eviction_summary(res)})" if regime == "cold" else "")
        )
        print(render(res["table"]["head"], res["table"]["body"], markdown))
        if res.get("targets"):
            print(f"\ntargets (738m, {regime}):")
            for line in res["targets"]:
                print(f"  {line}")
        if "shards" in res:
            print(f"\nshards test ({res['size']}, mergelab only):")
            print(render(res["shards"]["head"], res["shards"]["body"], markdown, left=3))
    for size in dict.fromkeys(r["size"] for r in doc["results"]):
        both = regime_comparison([r for r in doc["results"] if r["size"] == size])
        if both is not None:
            print(f"\n{size}: cold against cached (median wall of each regime's runs)")
            print(render(*both, markdown))


def eviction_summary(res: dict) -> str:
    """How a cold table's runs were evicted: the methods used and the largest share left cached."""
    evs = [x["eviction"] for r in (res["floor"], *res["rows"]) for x in r["runs"] if x.get("eviction")]
    if not evs:
        return "no eviction recorded"
    methods = ", ".join(sorted({e["method"] for e in evs}))
    after = [e["resident_after"] for e in evs]
    left = "not verified" if None in after else f"at most {100 * max(after):.1f} % of the inputs left cached"
    return f"evicted by {methods} before each run; {left} (mincore)"


if __name__ == "__main__":
    sys.exit(main())
