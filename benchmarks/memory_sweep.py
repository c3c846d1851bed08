"""A 10-point λ sweep of TIES in memory: the memory session vs 10 independent merges.

Inputs: random state dicts with the tensor names and shapes of all-MiniLM-L6-v2 (BERT, 6 layers,
hidden 384, intermediate 1536, vocabulary 30522: 22.7M parameters), a base and 4 experts
(base + 0.01·N(0, 1)), float32. TIES with density 0.2 (per tensor, the default scope).

    python benchmarks/memory_sweep.py [--repeats 3] [--threads N]

Prints the median of the repeats for both ways, their ratio, and checks that every point of the
session equals the independent merge bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import mergelab
from mergelab.executors.memory import MergeSession

LAMBDAS = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5)


def minilm_shapes() -> dict[str, tuple[int, ...]]:
    h, inter, vocab = 384, 1536, 30522
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab, h),
        "embeddings.position_embeddings.weight": (512, h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for i in range(6):
        p = f"encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            shapes[p + m + ".weight"] = (h, h)
            shapes[p + m + ".bias"] = (h,)
        shapes[p + "attention.output.LayerNorm.weight"] = (h,)
        shapes[p + "attention.output.LayerNorm.bias"] = (h,)
        shapes[p + "intermediate.dense.weight"] = (inter, h)
        shapes[p + "intermediate.dense.bias"] = (inter,)
        shapes[p + "output.dense.weight"] = (h, inter)
        shapes[p + "output.dense.bias"] = (h,)
        shapes[p + "output.LayerNorm.weight"] = (h,)
        shapes[p + "output.LayerNorm.bias"] = (h,)
    shapes["pooler.dense.weight"] = (h, h)
    shapes["pooler.dense.bias"] = (h,)
    return shapes


def make_inputs(n_experts: int = 4) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) * 0.05 for k, s in minilm_shapes().items()}
    experts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_experts)]
    return base, experts


def independent(base, experts) -> list[dict[str, torch.Tensor]]:
    return [
        mergelab.merge_state_dicts(
            "ties", experts, base, parameters={"lambda": lam}, model_parameters=[{"density": 0.2}] * len(experts)
        )
        for lam in LAMBDAS
    ]


def session(base, experts) -> list[dict[str, torch.Tensor]]:
    s = MergeSession.from_state_dicts("ties", experts, base, model_parameters=[{"density": 0.2}] * len(experts))
    return [s.merge({"lambda": lam}) for lam in LAMBDAS]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base, experts = make_inputs()
    n = sum(v.numel() for v in base.values())
    print(
        f"all-MiniLM-L6-v2 shapes: {n / 1e6:.1f}M parameters, 4 experts + base, TIES density 0.2, "
        f"{len(LAMBDAS)} lambdas, torch threads {torch.get_num_threads()}"
    )
    times: dict[str, list[float]] = {"independent": [], "session": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("independent", independent), ("session", session)):
            t0 = time.perf_counter()
            results[name] = fn(base, experts)
            times[name].append(time.perf_counter() - t0)
    same = all(torch.equal(a[k], b[k]) for a, b in zip(results["independent"], results["session"]) for k in a)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in times.items():
        print(f"{k:12s} median {med[k]:7.2f} s   runs {', '.join(f'{x:.2f}' for x in v)}")
    print(f"ratio independent/session: {med['independent'] / med['session']:.2f}x   bit-identical: {same}")


if __name__ == "__main__":
    main()
