"""Accuracy against storage of a routed method without the task id, over its rank knob (issue 16).

Builds the routed row (default Twin-Merging) at each value of one axis (default ``density``: the
fraction of each matrix's rank kept in an expert's exclusive part) exactly as ``mergelab bench``
builds its routed rows, scores each on the test split without the task id, and writes the curve
(normalized score with a 95 % bootstrap interval, router accuracy, oracle-head score, storage
against N experts) as curve.{json,md,png}. The protocol is in
``src/mergelab_bench/eval/routed_curve.py``.

Usage:
  python benchmarks/routed_storage_curve.py [--suite classification|lm] [--zoo zeroshot-full]
      [--row twin_merging] [--axis density] [--values 0.02,0.05,0.1,0.2,0.4] [--limit 1000]
      [--threads 1] [--out benchmarks/results/routed-storage-<zoo>]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mergelab_bench.eval.routed_curve import storage_curve, write_curve
from mergelab_bench.eval.routed_models import RoutedBenchSettings
from mergelab_bench.eval.runtime import done_line, quiet_transformers, set_threads
from mergelab_bench.eval.stats import StatsConfig

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=("classification", "lm"), default="classification")
    ap.add_argument("--zoo", default=None, help="zoo preset or folder (default: zeroshot-full / default)")
    ap.add_argument("--cache", type=Path, default=None, help="zoo cache root (default $MERGELAB_CACHE)")
    ap.add_argument("--row", default="twin_merging", help="routed row of the bench (twin_merging, emr_router, ...)")
    ap.add_argument("--axis", default="density", help="the method parameter the curve varies")
    ap.add_argument("--values", default="0.02,0.05,0.1,0.2,0.4", help="comma-separated values of --axis")
    ap.add_argument("--limit", type=int, default=None, help="test rows per task (default: 1000; LM: the zoo's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--work", type=Path, default=None, help="folder for the builds (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/routed-storage-<zoo>")
    args = ap.parse_args(argv)
    try:
        values = [float(v) for v in args.values.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--values: numbers separated by commas, not {args.values!r}")
    set_threads(args.threads)
    quiet_transformers()
    zoo: Any
    limit: Any
    if args.suite == "lm":
        from mergelab_bench.zoo.lm.build import load_lm_zoo

        zoo = load_lm_zoo(args.zoo or "default", cache=args.cache)
        limit = args.limit if args.limit is not None else "zoo"
    else:
        from mergelab_bench.zoo.build import load_zoo

        zoo = load_zoo(args.zoo or "zeroshot-full", cache=args.cache)
        limit = args.limit if args.limit is not None else 1000
    out = args.out or HERE / "results" / f"routed-storage-{zoo.name}"
    t0 = time.perf_counter()
    print(f"{args.row} on {zoo.name}: {args.axis} in {values}", flush=True)
    with tempfile.TemporaryDirectory(prefix="routed-curve-", dir=args.work) as work:
        result = storage_curve(
            zoo, args.row, args.axis, values, work, limit=limit, settings=RoutedBenchSettings(),
            stats=StatsConfig(bootstrap=args.bootstrap), seed=args.seed, echo=lambda s: print(s, flush=True),
        )  # fmt: skip
    result["command"] = "python benchmarks/routed_storage_curve.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    result["seconds"] = round(time.perf_counter() - t0, 1)
    paths = write_curve(result, out)
    print(done_line(t0, paths), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
