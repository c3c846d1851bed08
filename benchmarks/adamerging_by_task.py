"""Per-task entropy and accuracy of AdaMerging's merges: where the entropy surrogate helps and where it costs.

AdaMerging (Yang et al. 2024, arXiv:2310.02575) minimises the *sum over tasks* of the mean
prediction entropy. This script scores, on a classification zoo's split, the starting point
(task arithmetic with every λ at the run's ``init``) and every learned coefficient record
(``adamerging_coefficients.json``, as ``mergelab bench`` writes under ``OUT/statistics/adamerging/``
and ``mergelab merge`` next to its output) and prints, per task, the number of classes, the mean
entropy of the task head's predictions and the normalized accuracy (merged / expert, %).

Usage: python benchmarks/adamerging_by_task.py [--zoo full] [--split test] [--limit 1000]
       [--records FILE ...]   (default: every record under benchmarks/results/classification-<zoo>/statistics)
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch

from mergelab.informed.adamerging import entropy
from mergelab_bench.eval.harness import Evaluator, load_state_dict_path
from mergelab_bench.zoo.build import load_zoo

Coefficient = Callable[[int, str], float]


def _coefficients(record: dict, experts: list[str]) -> Coefficient:
    """λ(expert index, tensor name) from a record: one float per expert (task-wise) or per tensor (layer-wise)."""
    table = [record["coefficients"][e] for e in experts]

    def lam(i: int, name: str) -> float:
        c = table[i]
        if isinstance(c, (int, float)):
            return float(c)
        if name not in c:
            raise KeyError(f"{experts[i]}: no coefficient for tensor {name} in the record")
        return float(c[name])

    return lam


def merge(base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], lam: Coefficient) -> dict:
    """θ0 + Σ λ_i τ_i tensor by tensor, written apart from the engine so the table cross-checks the
    leaderboard; tensors that no expert changes are kept as they are."""
    out = {}
    for name, b in base.items():
        deltas = [(i, e[name].float() - b.float()) for i, e in enumerate(experts)] if b.is_floating_point() else []
        deltas = [(i, d) for i, d in deltas if bool(d.any())]
        out[name] = (b.float() + sum(lam(i, name) * d for i, d in deltas)).to(b.dtype) if deltas else b
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="full")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--records", nargs="*", type=Path)
    args = ap.parse_args()
    records = args.records or sorted(
        Path(f"benchmarks/results/classification-{args.zoo}/statistics").rglob("adamerging_coefficients.json")
    )
    if not records:
        raise SystemExit("no adamerging_coefficients.json found: run `mergelab bench --methods adamerging` first")
    zoo = load_zoo(args.zoo)
    ev = Evaluator(zoo, split=args.split, limit=args.limit)
    loaded = [json.loads(p.read_text()) for p in records]
    paths = list(loaded[0]["coefficients"])
    if any(list(r["coefficients"]) != paths for r in loaded):
        raise SystemExit("the records merge different experts; give records of one zoo")
    base = load_state_dict_path(zoo.base_dir)
    experts = [load_state_dict_path(Path(p)) for p in paths]
    init = float(loaded[0]["init"])
    models = {f"init λ={init:g}": lambda i, n: init}
    models |= {f"{r['granularity']}-wise": _coefficients(r, paths) for r in loaded}
    rows: dict[str, list[tuple[float, float]]] = {}
    classes: dict[str, int] = {}
    with torch.no_grad():
        for lam in models.values():
            encoder = ev.encoder(merge(base, experts, lam))
            for t in ev.tasks:
                logits = ev.logits(encoder, t)
                classes[t] = logits.shape[-1]
                acc = (logits.argmax(-1) == ev.labels[t]).float().mean().item()
                rows.setdefault(t, []).append((entropy(logits).item(), 100 * acc / ev.expert_score(t)))
    print(
        f"zoo {args.zoo}, {args.split} split, first {args.limit} rows per task; H = mean entropy (nats), "
        "norm = merged / expert accuracy (%)\n"
    )
    print("| task | classes | " + " | ".join(f"{m}: H | norm" for m in models) + " |")
    print("|---|---|" + "---|---|" * len(models))
    for t, values in rows.items():
        print(f"| {t} | {classes[t]} | " + " | ".join(f"{h:.3f} | {a:.1f}" for h, a in values) + " |")
    means = [sum(v[j][1] for v in rows.values()) / len(rows) for j in range(len(models))]
    print("| average | | " + " | ".join(f" | {m:.1f}" for m in means) + " |")


if __name__ == "__main__":
    main()
