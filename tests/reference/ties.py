"""TIES elect + disjoint merge (Yadav et al. 2023, arXiv:2306.01708, steps 2 and 3), naive.

Shared by the tests of TIES, DARE-TIES, Model Breadcrumbs-TIES, DELLA and TALL masks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def elect_and_merge(
    weighted: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool,
    sign_tie: str,
    majority: float | None = None,
) -> Tensor:
    """γ = sgn(Σ_i w_i τ̂_i), exact zeros resolved by ``sign_tie`` (``majority``: sgn(Σ_p γ_p)
    over this tensor, or the given ``majority``; ``positive``: +1; ``zero``: left at 0); then
    Σ_{i: sgn(w_i τ̂_i) = γ} w_i τ̂_i, divided by the agreeing weights' sum when ``normalize``
    (a divisor of 0 taken as 1). ``weighted`` holds the w_i τ̂_i (float64 advised)."""
    W = torch.stack(list(weighted))
    gamma = torch.sign(W.sum(0))
    if sign_tie == "majority":
        fill = torch.sign(gamma.sum()) if majority is None else torch.tensor(float(majority), dtype=W.dtype)
        gamma[gamma == 0] = fill
    elif sign_tie == "positive":
        gamma[gamma == 0] = 1.0
    elif sign_tie != "zero":
        raise ValueError(sign_tie)
    agree = (torch.sign(W) == gamma) & (W != 0)
    num = (W * agree).sum(0)
    if not normalize:
        return num
    den = (torch.tensor([float(w) for w in weights], dtype=W.dtype).reshape(-1, *[1] * (W.dim() - 1)) * agree).sum(0)
    den[den == 0] = 1
    return num / den


def elect_and_merge_lists(
    trimmed: Sequence[Sequence[float]], *, normalize: bool = False, sign_tie: str = "majority"
) -> list[float]:
    """:func:`elect_and_merge` with unit weights on plain lists, element by element."""
    n = len(trimmed[0])
    sums = [sum(t[p] for t in trimmed) for p in range(n)]
    signs = [(s > 0) - (s < 0) for s in sums]
    if sign_tie == "majority":
        fill = (sum(signs) > 0) - (sum(signs) < 0)
    elif sign_tie == "positive":
        fill = 1
    else:
        fill = 0
    signs = [s if s != 0 else fill for s in signs]
    out = []
    for p in range(n):
        agreeing = [t[p] for t in trimmed if t[p] * signs[p] > 0]
        total = sum(agreeing)
        out.append(total / len(agreeing) if normalize and agreeing else total)
    return out


def exact_tie_family(n: int = 64, seed: int = 7) -> tuple[Tensor, list[Tensor]]:
    """A base and three experts (float32, dyadic values: exact arithmetic) whose task vectors
    sum to exactly 0 with non-zero entries on the first half of the coordinates (expert 1
    cancels expert 0 there; expert 2 is 0 there), while the second half elects mostly −1, so
    the ``majority`` and ``positive`` tie rules give different merges."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 4).round() / 4
    t0 = (torch.randn(n, generator=g) * 4).round() / 4 + 0.25 * torch.sign(torch.randn(n, generator=g))
    t1 = -t0.clone()
    t1[n // 2 :] = (torch.rand(n - n // 2, generator=g) * 4).round() / 4 * -1 - 0.5
    t2 = torch.zeros(n)
    t2[n // 2 :] = -1.5
    return base, [base + t for t in (t0, t1, t2)]
