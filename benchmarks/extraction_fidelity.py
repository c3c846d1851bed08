"""Extraction fidelity: the normalized score of base + a LoRA adapter extracted from each full fine-tune.

For every full fine-tune expert of the LM zoo and of a classification zoo, and every cut (ranks 4,
16, 64, every module's full rank, retained energy 0.9 by default), extract an adapter with
``mergelab.lora.extract.extract_lora``, load base + adapter with PEFT (or mergelab's reader), score
it on the expert's own task (test split, the bench's evaluators) against the expert, with a 95 %
bootstrap interval (:mod:`mergelab_bench.eval.extraction`). Writes ``extraction.json``,
``extraction.md`` and ``extraction.png`` into ``--out``, saving after every point: a rerun with the
same settings reuses the points already there (``--fresh`` measures everything again), so an
interrupted run resumes.

Usage: python benchmarks/extraction_fidelity.py [--suites lm,classification] [--lm-zoo default]
       [--classification-zoo zeroshot-full] [--cuts 4,16,64,full,e0.9] [--tasks a,b] [--keep-non-lora]
       [--loader peft|mergelab] [--out benchmarks/results/lora-extraction] [--threads 2] [--replot]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mergelab_bench.eval.extraction import (
    DEFAULT_CUTS,
    extraction_fidelity,
    parse_cuts,
    read_extraction,
    write_extraction,
)
from mergelab_bench.eval.runtime import done_line, load_suite_zoo, quiet_transformers, set_threads

SETTINGS = ("keep_non_lora", "loader", "svd_dtype", "bootstrap", "bootstrap_seed", "lm_limit", "classification_limit")
"""What a saved point depends on besides its zoo, task and cut: a rerun reuses points only when these match."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suites", default="lm,classification", help="lm, classification or both (comma-separated)")
    ap.add_argument("--lm-zoo", default="default", help="LM zoo preset or folder (default: default)")
    ap.add_argument("--classification-zoo", default="zeroshot-full", help="classification zoo (default: zeroshot-full)")
    ap.add_argument(
        "--cuts", default=",".join(c.token for c in DEFAULT_CUTS), help="ranks, full, e<energy> (comma-separated)"
    )
    ap.add_argument("--tasks", default=None, help="only these tasks/domains (comma-separated; default: all)")
    ap.add_argument("--lm-limit", type=int, default=None, help="LM test rows per domain (default: the zoo's)")
    ap.add_argument("--classification-limit", type=int, default=1000, help="classification test rows per task")
    ap.add_argument(
        "--keep-non-lora", action="store_true", help="keep changed norms/biases/embeddings whole (extract-lora's flag)"
    )
    ap.add_argument("--loader", choices=("peft", "mergelab"), default="peft", help="how base + adapter is loaded")
    ap.add_argument("--svd-dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test rows")
    ap.add_argument("--bootstrap-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument(
        "--cache", type=Path, default=None, help="zoo cache root (default $MERGELAB_CACHE or ~/.cache/mergelab)"
    )
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lora-extraction"))
    ap.add_argument("--fresh", action="store_true", help="measure every point again (default: reuse saved points)")
    ap.add_argument("--replot", action="store_true", help="only rewrite extraction.md/.png from extraction.json")
    args = ap.parse_args(argv)

    json_path = args.out / "extraction.json"
    if args.replot:
        saved, points = read_extraction(json_path)
        paths = write_extraction(points, args.out, saved)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return 0
    try:
        cuts = parse_cuts(args.cuts)
    except ValueError as exc:
        ap.error(str(exc))
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    if not suites or any(s not in ("lm", "classification") for s in suites):
        ap.error(f"--suites {args.suites!r}: use lm, classification or both")
    set_threads(args.threads)
    quiet_transformers()

    config: dict[str, Any] = {
        "keep_non_lora": args.keep_non_lora,
        "loader": args.loader,
        "svd_dtype": args.svd_dtype,
        "bootstrap": args.bootstrap,
        "bootstrap_seed": args.bootstrap_seed,
        "lm_limit": args.lm_limit,
        "classification_limit": args.classification_limit,
        "cuts": [c.token for c in cuts],
        "torch_threads": torch.get_num_threads(),
    }
    results: dict[tuple[str, str, str], dict[str, Any]] = {}  # (zoo key, task, cut) -> point
    if json_path.is_file() and not args.fresh:
        old_config, old_points = read_extraction(json_path)
        if all(old_config.get(k) == config[k] for k in SETTINGS):
            results = {_key(p): p for p in old_points}
        else:
            print(f"{json_path}: measured with other settings; nothing of it is reused (as with --fresh)")
    done = {k: p for k, p in results.items() if p["cut"] != "base"}
    zoos = {
        s: load_suite_zoo(s, args.lm_zoo if s == "lm" else args.classification_zoo, cache=args.cache) for s in suites
    }
    tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    t0 = time.perf_counter()

    def save(point: dict[str, Any] | None = None) -> dict[str, Path]:
        if point is not None:
            results[_key(point)] = point
        seconds = round(time.perf_counter() - t0, 1)
        return write_extraction(_ordered(list(results.values())), args.out, {**config, "seconds": seconds})

    for suite, zoo in zoos.items():
        names = [t for t in tasks if t in zoo.tasks] if tasks else list(zoo.tasks)
        if not names:
            print(f"{suite} zoo {zoo.name}: none of the tasks {tasks}; skipped")
            continue
        print(f"{suite} zoo {zoo.name} ({zoo.key}): {len(names)} expert(s) x {len(cuts)} cut(s)")
        new = extraction_fidelity(
            zoo, cuts=cuts, tasks=names, limit=args.lm_limit if suite == "lm" else args.classification_limit,
            keep_non_lora=args.keep_non_lora, loader=args.loader, svd_dtype=args.svd_dtype, bootstrap=args.bootstrap,
            bootstrap_seed=args.bootstrap_seed, work_dir=args.out, done=done, on_point=save, echo=print,
        )  # fmt: skip
        for point in new:
            results[_key(point)] = point
    paths = save()
    print(done_line(t0, paths))
    return 0


def _key(p: dict[str, Any]) -> tuple[str, str, str]:
    return (p["zoo_key"], p["task"], p["cut"])


def _ordered(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Grouped by suite (LM first) and task in first-seen order; the base first, then the ranks, full
    rank and the energy cuts."""
    tasks = {k: i for i, k in enumerate(dict.fromkeys((p["suite"], p["task"]) for p in points))}

    def cut_order(p: dict[str, Any]) -> tuple[int, float]:
        cut = p["cut"]
        if cut == "base":
            return (0, 0.0)
        if cut.startswith("e"):
            return (3, float(cut[1:]))
        return (2, 0.0) if cut == "full" else (1, float(cut))

    return sorted(points, key=lambda p: (p["suite"] != "lm", tasks[(p["suite"], p["task"])], cut_order(p)))


if __name__ == "__main__":
    from mergelab.errors import MergelabError

    try:
        sys.exit(main())
    except (MergelabError, ValueError) as exc:  # a missing zoo, a bad extraction.json: one line
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 2))
