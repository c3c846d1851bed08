"""Mixtures of experts on the LM suite: upcycle the domain experts, compress the MoE (issue 19).

1. Upcycling: the LM zoo's domain experts (default: all 5) become a top-2 MoE (``mergelab.moe.upcycle``),
   once per gate mode (hidden, hidden_avg, cheap_embed, random, uniform_random); each expert's positive prompts are the
   first ``--prompts`` texts of its domain's train split. Scored on every domain beside the base, every
   expert, and the best static merges and routed rows of ``--leaderboard`` (read, not recomputed, when
   it was measured on the same zoo and test rows).
2. Compression: an MoE of ``--compress-domains`` (default: the first 4 domains) compressed from 4 to 2
   experts per layer (``mergelab.moe.compress``: M-SMoE shared and distinct, Sub-MoE shared, frequency
   pruning), calibrated on the domains' train texts; ``--architectures mixtral,qwen2_moe`` repeats it on a
   Qwen2-MoE (the base as its shared expert).

Every model: total parameters, active parameters per token, size on disk, per-domain normalized scores
(LM bench's normalization) with a 95 % bootstrap interval. Writes moe.json, moe.md and moe.png into
``--out`` (default benchmarks/results/moe-lm/).

Usage:
  python benchmarks/moe_bench.py [--zoo default] [--limit N] [--parts upcycle,compress]
      [--domains python,go,german,italian,arithmetic] [--compress-domains python,go,german,italian]
      [--gate-modes hidden,hidden_avg,cheap_embed,random,uniform_random] [--prompts 12] [--prompt-chars 256]
      [--merged-base task_arithmetic:lambda=0.5]
      [--compress-methods msmoe:shared,msmoe:distinct,submoe:shared,prune-frequency:distinct] [--to 2]
      [--calibration-per-domain 64] [--architectures mixtral] [--threads 2] [--keep] [--out DIR]
  python benchmarks/moe_bench.py --combine UP/moe.json COMPRESS/moe.json --out DIR
      (one report from the parts run side by side: ``--parts upcycle --out UP`` and ``--parts compress --out COMPRESS``)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from mergelab_bench.eval.moe_bench import (
    COMPRESS_METHODS,
    FORMAT,
    GATE_MODES,
    MoeScorer,
    combine_moe,
    compression_rows,
    leaderboard_rows,
    merged_base_rows,
    reference_rows,
    upcycle_rows,
    write_moe,
)
from mergelab_bench.eval.runtime import done_line, quiet_transformers, set_threads
from mergelab_bench.eval.stats import StatsConfig

HERE = Path(__file__).resolve().parent


def _names(text: str | None) -> list[str]:
    return [] if not text else [x.strip() for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="default", help="LM zoo preset or folder")
    ap.add_argument("--cache", type=Path, default=None, help="zoo cache root (default $MERGELAB_CACHE)")
    ap.add_argument("--parts", default="upcycle,compress", help="upcycle, compress or both")
    ap.add_argument("--domains", default=None, help="domains of the upcycling table (default: every domain)")
    ap.add_argument("--compress-domains", default=None, help="domains of the compressed MoE (default: the first 4)")
    ap.add_argument("--gate-modes", default=",".join(GATE_MODES))
    ap.add_argument("--experts-per-token", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=12, help="positive prompts per expert (train split)")
    ap.add_argument("--prompt-chars", type=int, default=256, help="each prompt cut to this many characters (0: all)")
    ap.add_argument(
        "--merged-base", default=None, metavar="METHOD[:KEY=VALUE,...]",
        help="also upcycle onto a static merge of the experts as base_model (e.g. task_arithmetic:lambda=0.5)",
    )  # fmt: skip
    ap.add_argument("--to", type=int, default=2, help="experts per layer after compression")
    ap.add_argument(
        "--compress-methods", default=",".join(f"{m}:{layout}" for m, layout in COMPRESS_METHODS),
        help="METHOD:LAYOUT items (msmoe, submoe, prune-frequency; shared, distinct)",
    )  # fmt: skip
    ap.add_argument("--compress-gate-mode", default="hidden")
    ap.add_argument(
        "--shared-residual-scale", type=float, default=0.1,
        help="qwen2_moe: the shared expert's (the base's) down_proj multiplier (1: the whole base MLP)",
    )  # fmt: skip
    ap.add_argument("--calibration-per-domain", type=int, default=64, help="train texts per domain")
    ap.add_argument("--calibration-max-length", type=int, default=128, help="tokens per calibration text")
    ap.add_argument("--architectures", default="mixtral", help="compression on mixtral and/or qwen2_moe")
    ap.add_argument("--leaderboard", type=Path, default=HERE / "results" / "lm-default" / "leaderboard.json")
    ap.add_argument("--best-static", type=int, default=3, help="static merges read from the leaderboard")
    ap.add_argument("--limit", type=int, default=None, help="test rows per domain (default: the zoo's)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--bootstrap-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu", help="where the models run (scoring, gates, calibration)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the MoEs while scored (default: a tmp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the MoE folders in --work")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "moe-lm")
    ap.add_argument(
        "--combine", type=Path, nargs="+", default=None, metavar="MOE_JSON",
        help="write one report into --out from the moe.json of runs of separate parts (nothing is measured)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.combine:
        try:
            combined = combine_moe([json.loads(p.read_text()) for p in args.combine])
        except (OSError, ValueError) as e:
            ap.error(f"--combine: {e}")
        print(done_line(time.perf_counter(), write_moe(combined, args.out)))
        return 0
    set_threads(args.threads)
    quiet_transformers()
    from mergelab_bench.zoo.lm.build import load_lm_zoo

    parts = _names(args.parts)
    if not parts or any(p not in ("upcycle", "compress") for p in parts):
        ap.error("--parts: upcycle, compress or both")
    methods: list[tuple[str, str]] = []
    for item in _names(args.compress_methods):
        method, _, layout = item.partition(":")
        methods.append((method, layout or ("distinct" if method == "prune-frequency" else "shared")))
    zoo = load_lm_zoo(args.zoo, cache=args.cache, device=args.device)
    domains = _names(args.domains) or list(zoo.tasks)
    compress_domains = _names(args.compress_domains) or list(zoo.tasks)[:4]
    for t in {*domains, *compress_domains}:
        if t not in zoo.tasks:
            ap.error(f"{t}: not a domain of LM zoo {zoo.name} ({', '.join(zoo.tasks)})")
    stats = StatsConfig(bootstrap=args.bootstrap, bootstrap_seed=args.bootstrap_seed)
    limit: Any = args.limit if args.limit is not None else "zoo"
    threads = args.threads if args.threads > 0 else None
    prompt_chars = args.prompt_chars or None
    say = lambda s: print(s, flush=True)
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "format": FORMAT,
        "zoo": {"name": zoo.name, "key": zoo.key, "tasks": list(zoo.tasks)},
        "statistics": stats.to_dict(),
        "notes": [],
        "command": "python benchmarks/moe_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    work_parent = args.work
    if work_parent is not None:
        work_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moe-bench-", dir=work_parent) as tmp:
        work = Path(tmp) if not args.keep or work_parent is None else work_parent
        if "upcycle" in parts:
            scorer = MoeScorer(zoo, domains, limit=limit, stats=stats)
            result["test_limit"] = scorer.limit
            say(f"upcycling: {len(domains)} domains ({', '.join(domains)}), {scorer.limit} test rows per domain")
            rows = reference_rows(scorer, echo=say)
            board, note = leaderboard_rows(args.leaderboard, zoo, domains, scorer.limit, best=args.best_static)
            say(f"  {note}")
            rows += board
            rows += upcycle_rows(
                zoo, scorer, work, gate_modes=_names(args.gate_modes), prompts=args.prompts, prompt_chars=prompt_chars,
                experts_per_token=args.experts_per_token, threads=threads, device=args.device, keep=args.keep,
                echo=say,
            )  # fmt: skip
            merged_base: list[str] = []
            if args.merged_base:
                method, _, spec = args.merged_base.partition(":")
                params = {k: yaml.safe_load(v) for k, _, v in (x.partition("=") for x in _names(spec))}
                rows += merged_base_rows(
                    zoo, scorer, work, method=method, parameters=params, prompts=args.prompts,
                    prompt_chars=prompt_chars, experts_per_token=args.experts_per_token, threads=threads,
                    device=args.device, keep=args.keep, echo=say,
                )  # fmt: skip
                merged_base.append(args.merged_base)
            result["upcycling"] = {
                "domains": domains,
                "rows": rows,
                "leaderboard_note": note,
                "settings": {
                    "architecture": "mixtral", "experts_per_token": args.experts_per_token, "prompts": args.prompts,
                    "prompt_chars": prompt_chars, "gate_modes": _names(args.gate_modes), "merged_base": merged_base,
                },
            }  # fmt: skip
        if "compress" in parts:
            scorer = MoeScorer(zoo, compress_domains, limit=limit, stats=stats)
            result["test_limit"] = scorer.limit
            say(f"compression: {len(compress_domains)} domains ({', '.join(compress_domains)}) -> {args.to} per layer")
            rows = reference_rows(scorer, echo=say)
            board, note = leaderboard_rows(args.leaderboard, zoo, compress_domains, scorer.limit, best=1)
            rows += board
            for arch in _names(args.architectures):
                say(f" {arch}:")
                rows += compression_rows(
                    zoo, scorer, work, to=args.to, methods=methods, gate_mode=args.compress_gate_mode,
                    prompts=args.prompts, prompt_chars=prompt_chars, experts_per_token=args.experts_per_token,
                    architecture=arch, calibration_per_domain=args.calibration_per_domain,
                    calibration_max_length=args.calibration_max_length,
                    shared_residual_scale=args.shared_residual_scale, threads=threads, device=args.device,
                    keep=args.keep, echo=say,
                )  # fmt: skip
            result["compression"] = {
                "domains": compress_domains,
                "rows": rows,
                "leaderboard_note": note,
                "settings": {
                    "to": args.to, "methods": [f"{m}:{lay}" for m, lay in methods],
                    "gate_mode": args.compress_gate_mode,
                    "calibration_per_domain": args.calibration_per_domain,
                    "calibration_max_length": args.calibration_max_length, "architectures": _names(args.architectures),
                },
            }  # fmt: skip
    if "qwen3_moe" not in _names(args.architectures):
        result["notes"].append(
            "A Qwen3-MoE needs a Qwen3 dense base; the LM zoo's base is a Llama (SmolLM2), so the small real-family "
            "MoE offered here is a Qwen2-MoE upcycled from it (`--architectures mixtral,qwen2_moe`)."
        )
    result["config"] = {
        "limit": limit, "threads": torch.get_num_threads(), "device": args.device, "parts": parts,
        "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    paths = write_moe(result, args.out)
    print(done_line(t0, paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
