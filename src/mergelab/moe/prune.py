"""Frequency pruning: keep the ``K`` most used experts of each layer, drop the rest.

The baseline M-SMoE compares against (its "prune non-core experts" scripts keep the dominant
experts and remove the others). Kept experts are unchanged; the router keeps their rows, in their
original order, so the output has ``K`` distinct experts per layer (``layout: distinct``).
"""

from __future__ import annotations

from torch import Tensor

from mergelab.moe.grouping import LayerGroups, stable_order


def keep_most_used(freq: Tensor, k: int) -> LayerGroups:
    """The ``k`` most used experts (ties by lower index) as groups of one; the others dropped."""
    n = freq.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} with {n} experts")
    kept = sorted(stable_order(freq)[:k])
    dropped = tuple(e for e in range(n) if e not in kept)
    return LayerGroups(n, tuple((e,) for e in kept), tuple(kept), dropped)
