"""Continual merging on the zoos: experts added one at a time, scored after every step (issue 17).

Protocol (:mod:`mergelab_bench.eval.continual`): for each continual method and each task order, the
zoo's experts are added one at a time with ``mergelab.continual.ContinualMerge`` (in memory); after
every step the merge is scored on the test split of the tasks seen so far (``--all-tasks``: every
task), normalized by each task's expert as the bench does. Reported: the step × task matrix, the
average over seen tasks per step, the forgetting of each earlier task, backward transfer (BWT), the
final-step table (mean ± std over the orders, 95 % bootstrap interval) beside the offline methods
(static merges of all experts at once: tuned on validation over the bench's grids, or at
``--offline-param`` values), seconds per add and per scoring.

``--memory``: peak RSS and seconds of ``mergelab continual add`` run as a fresh child process per add,
after 1 … 8 adds, on the 738M benchmark checkpoints (``benchmarks/make_inputs.py --size 738m``: a base
and 3 fine-tunes; the 5 more experts needed for 8 adds are written the same way with
``mergelab.synthetic.make_expert``, seeds 4-8, into ``<workdir>/738m-continual/``).

Usage:
  python benchmarks/continual_bench.py --suite classification --zoo zeroshot-full
  python benchmarks/continual_bench.py --suite lm --zoo default [--limit 128]
  python benchmarks/continual_bench.py --memory [--memory-methods opcm,average] [--memory-adds 8]
  options: --methods opcm,dop,average,task_arithmetic,ties,magmax --param opcm:alpha=0.5
           --orders 3 --order-seed 0 --offline task_arithmetic,ties --offline-param ties:lambda=1.0
           --limit N --validation-limit N --all-tasks --bootstrap 1000 --threads 2 --out DIR --fresh
           --device cuda (LM scoring) --add-device cuda (the continual steps)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mergelab_bench.eval.continual import (
    DEFAULT_METHODS,
    DEFAULT_OFFLINE,
    ContinualSuite,
    measure_adds,
    run_continual,
    task_orders,
    write_continual,
)
from mergelab_bench.eval.runtime import done_line, load_suite_zoo, quiet_transformers, set_threads
from mergelab_bench.eval.stats import StatsConfig

HERE = Path(__file__).resolve().parent
DEFAULT_WORKDIR = HERE.parent / "bench-work"
MEMORY_EXTRA = (("dense", 4), ("sparse", 5), ("conflict", 6), ("dense", 7), ("sparse", 8))
"""The experts beyond make_inputs' three (kind, seed), written the same way for 8 adds."""
REUSE_KEYS = ("suite", "zoo_key", "test_limit", "split", "all_tasks")


def _method_params(items: list[str], flag: str) -> dict[str, dict[str, Any]]:
    """``["opcm:alpha=0.5", "ties:lambda=1"]`` -> ``{"opcm": {"alpha": 0.5}, "ties": {"lambda": 1}}`` (YAML values)."""
    import yaml

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        method, sep, kv = item.partition(":")
        key, eq, value = kv.partition("=")
        if not sep or not eq or not method.strip() or not key.strip():
            raise SystemExit(f"{flag} {item!r}: give METHOD:KEY=VALUE, e.g. {flag} opcm:alpha=0.5")
        out.setdefault(method.strip(), {})[key.strip()] = yaml.safe_load(value) if value.strip() else ""
    return out


def _names(text: str) -> list[str]:
    return [] if text.strip() in ("", "none") else [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("classification", "lm"), default="classification")
    ap.add_argument("--zoo", default=None, help="zoo preset or folder (default: zeroshot-full / default)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="continual methods (comma-separated)")
    ap.add_argument("--param", action="append", default=[], help="METHOD:KEY=VALUE for a continual method (repeat)")
    ap.add_argument("--orders", type=int, default=3, help="task orders: the zoo's, then random permutations")
    ap.add_argument("--order-seed", type=int, default=0)
    ap.add_argument("--offline", default=",".join(DEFAULT_OFFLINE), help="static methods on all experts, or none")
    ap.add_argument(
        "--offline-param", action="append", default=[], help="METHOD:KEY=VALUE: fix an offline method (no search)"
    )
    ap.add_argument("--validation-limit", type=int, default=None, help="validation rows per task (offline search)")
    ap.add_argument("--limit", type=int, default=None, help="test rows per task (default: the bench's test limit)")
    ap.add_argument("--all-tasks", action="store_true", help="score every task at every step, not only the seen")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--bootstrap-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default=None, help="LM suite: device the models are scored on")
    ap.add_argument("--add-device", default="cpu", help="device of each continual step (DOP on the LM suite: cuda)")
    ap.add_argument("--cache", type=Path, default=None, help="zoo cache root (default $MERGELAB_CACHE)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/continual-<suite>/")
    ap.add_argument("--fresh", action="store_true", help="measure every run again (default: reuse saved runs)")
    ap.add_argument("--memory", action="store_true", help="measure peak RSS and seconds per add (738M set)")
    ap.add_argument("--memory-methods", default="opcm,average")
    ap.add_argument("--memory-adds", type=int, default=8, help="adds per method (each a fresh child process)")
    ap.add_argument("--memory-highlight", default="1,4,8", help="adds shown in bold in the table")
    ap.add_argument(
        "--memory-inputs",
        type=Path,
        default=None,
        help="a folder with base/ and expert folders (default: the 738m set of make_inputs.py + 5 more experts)",
    )
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="input sets and states (--memory)")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    quiet_transformers()
    command = "python benchmarks/continual_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.memory:
        return _memory(args, command)

    out = args.out or HERE / "results" / f"continual-{args.suite}"
    zoo = load_suite_zoo(
        args.suite,
        args.zoo or ("default" if args.suite == "lm" else "zeroshot-full"),
        cache=args.cache,
        device=args.device,
    )
    suite = ContinualSuite(zoo, limit=args.limit)
    methods = _names(args.methods)
    params = _method_params(args.param, "--param")
    for m in params:
        if m not in methods:
            ap.error(f"--param {m}:...: {m} is not in --methods")
    offline = _names(args.offline)
    fixed = _method_params(args.offline_param, "--offline-param")
    orders = task_orders(zoo.tasks, args.orders, args.order_seed)
    stats = StatsConfig(bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed)
    config = {
        "suite": suite.name, "zoo_key": zoo.key, "test_limit": suite.limit, "split": "test",
        "all_tasks": args.all_tasks,
    }  # fmt: skip
    partial = out / "continual.partial.json"
    done: dict[tuple[str, int], dict[str, Any]] = {}
    if not args.fresh:
        done = _reusable(out, config, orders, params)
    print(
        f"{suite.name} zoo {zoo.name} ({zoo.key}): {len(zoo.tasks)} tasks, {len(methods)} method(s) x "
        f"{len(orders)} order(s); test rows per task: {suite.limit}; offline: {', '.join(offline) or 'none'}"
        + (f"; {len(done)} run(s) reused" if done else ""),
        flush=True,
    )
    saved: list[dict[str, Any]] = list(done.values())

    def on_run(run: dict[str, Any]) -> None:
        saved.append(run)
        out.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({"config": config, "runs": saved}, indent=1) + "\n")

    t0 = time.perf_counter()
    result = run_continual(
        suite, methods=methods, params=params, orders=orders, offline=offline, offline_fixed=fixed,
        validation_limit=args.validation_limit, all_tasks=args.all_tasks, stats=stats,
        threads=args.threads if args.threads > 0 else None, device=args.add_device,
        echo=lambda s: print(s, flush=True), on_run=on_run, done=done,
    )  # fmt: skip
    result["config"] = {**config, "threads": torch.get_num_threads(), "order_seed": args.order_seed}
    result["command"] = command
    paths = write_continual(result, out)
    partial.unlink(missing_ok=True)
    print(done_line(t0, paths))
    return 0


def _reusable(
    out: Path, config: dict[str, Any], orders: list[list[str]], params: dict[str, dict[str, Any]]
) -> dict[tuple[str, int], dict[str, Any]]:
    """Runs saved by an earlier run with the same settings (the same order at the same index, the same
    parameters given): from ``continual.partial.json`` (interrupted) or ``continual.json``."""
    for name in ("continual.partial.json", "continual.json"):
        path = out / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            continue
        old = data.get("config", {})
        if any(old.get(k) != config[k] for k in REUSE_KEYS):
            print(f"{path}: measured with other settings; nothing of it is reused")
            continue
        done = {}
        for run in data.get("runs", []):
            k = run.get("order_index")
            if k is None or k >= len(orders) or run["order"] != orders[k]:
                continue
            given = params.get(run["method"], {})
            if any(run["params"].get(key) != value for key, value in given.items()):
                continue
            done[(run["method"], k)] = run
        return done
    return {}


# --------------------------------------------------------------------------------------------
# --memory


def _memory_inputs(args: argparse.Namespace) -> tuple[Path, list[Path], str]:
    """The base and the experts: a given folder (base/ + the other folders), or the 738m set + 5 more."""
    if args.memory_inputs is not None:
        root = args.memory_inputs
        experts = sorted(p for p in root.iterdir() if p.is_dir() and p.name != "base" and (p / "config.json").exists())
        return root / "base", experts, f"`{root}`: base + {len(experts)} expert folders"
    sys.path.insert(0, str(HERE))
    import make_inputs

    from mergelab.synthetic import make_expert

    root = make_inputs.set_dir(args.workdir, "738m")
    if not make_inputs.is_complete(root):
        print(f"building the 738m input set in {root} (make_inputs.py; about 3 minutes)", flush=True)
        make_inputs.build(root, "738m")
    extra = args.workdir / "738m-continual"
    experts = [root / name for name in make_inputs.EXPERTS]
    for kind, seed in MEMORY_EXTRA:
        if len(experts) >= args.memory_adds:
            break
        path = extra / f"ft_{kind}_s{seed}"
        if not (path / "DONE").is_file():
            print(f"writing expert {path.name} ({kind}, seed {seed})", flush=True)
            make_expert(root / "base", path, kind=kind, seed=seed, partner_seed=1, scale=make_inputs.DELTA_SCALE)
            (path / "DONE").write_text("ok\n")
        experts.append(path)
    desc = (
        "the 738m set of `benchmarks/make_inputs.py` (random-init bf16 Llama, 738 M parameters, 1.48 GB per "
        "model, 2 shards): ft_dense, ft_sparse, ft_conflict, then 5 more written the same way "
        "(`mergelab.synthetic.make_expert`, kinds dense/sparse/conflict/dense/sparse, seeds 4-8, scale "
        f"{make_inputs.DELTA_SCALE}) in `{extra}`"
    )
    return root / "base", experts, desc


def _memory(args: argparse.Namespace, command: str) -> int:
    out = args.out or HERE / "results" / "continual-memory"
    base, experts, desc = _memory_inputs(args)
    experts = experts[: args.memory_adds]
    if len(experts) < args.memory_adds:
        print(f"only {len(experts)} experts for {args.memory_adds} adds: measuring {len(experts)}")
    methods = _names(args.memory_methods)
    params = _method_params(args.param, "--param")
    highlight = [int(x) for x in _names(args.memory_highlight)]
    print(f"memory: {', '.join(methods)} x {len(experts)} adds over {base}", flush=True)
    t0 = time.perf_counter()
    records = measure_adds(
        base, experts, args.workdir / "continual-memory", methods=methods, params=params,
        threads=args.threads if args.threads > 0 else None, echo=lambda s: print(s, flush=True),
    )  # fmt: skip
    memory = {
        "inputs": {"base": str(base), "experts": [str(e) for e in experts], "description": desc},
        "methods": methods,
        "params": params,
        "threads": args.threads,
        "highlight": highlight,
        "records": records,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": command,
    }
    paths = write_continual({"format": "mergelab-continual/1", "memory": memory}, out)
    print(done_line(t0, paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
