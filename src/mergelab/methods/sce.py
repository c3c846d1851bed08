"""SCE: select the high-variance elements, calculate per-model weights, erase minority signs.

Wan et al. 2025, "FuseChat: Knowledge Fusion of Chat Models", EMNLP, arXiv:2408.07990 (its
merging stage). The merging coefficients follow the variation-ratio weights of the same authors'
FusionChat report (Wan et al. 2024, arXiv:2402.16107): a model's weight is the mean squared
change of its parameters, normalised over the models. Also mergekit 0.1.5's ``sce``, whose
recipes (``select_topk``, ``int8_mask``) run here.

For one tensor with task vectors δ_j = θ_j − θ_0 (j = 1..K):

1. **select**: the element-wise variance across the K task vectors (population variance);
   keep the k = ⌊τ · n⌋ elements of largest variance, n the number of elements whose variance is
   non-zero, τ = ``select_topk`` (τ ≥ 1: keep everything; τ ≤ 0: nothing); the same elements
   for every model: δ̂_j = m ⊙ δ_j. Ties in variance keep the element of lower flat index.
2. **calculate**: s_j = mean(δ̂_j²), η_j = s_j / Σ_i s_i (equal weights when Σ_i s_i is 0, or
   below ``uniform_below``).
3. **erase**: the elected sign of each element is that of Σ_j δ̂_j (+ for a zero sum); e_j = 1
   where sign(δ̂_j) is the elected sign (zeros never are).

θ = θ_0 + Σ_j η_j e_j δ̂_j / max(Σ_j η_j e_j, 10⁻⁶) (``normalize``, the default: the mean of the
agreeing models' entries, weighted by η, as mergekit), or θ_0 + Σ_j η_j e_j δ̂_j (``normalize:
false``: the η-weighted sum of the erased task vectors, which counts a model's entry with its
matrix-level weight whether or not the other models agree).

Departure from mergekit, kept as an option: mergekit falls back to equal weights whenever
Σ_j mean(δ̂_j²) < 10⁻⁶, an absolute threshold that small fine-tuning updates fall below
(entries of order 10⁻⁴ give about 10⁻⁸, less after selection), which silently replaces the
paper's magnitude-based weights by equal ones; here the weights follow the formula unless the
sum is exactly zero. ``uniform_below: 1.0e-6`` gives
mergekit's rule. ``int8_mask`` is accepted and ignored (masks are boolean here). Computed in
float32 (float64 for float64 inputs), returned in the base's dtype. Granularity: per tensor (the
selection and the weights are per tensor), one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, NoParams, TensorContext
from mergelab.methods.registry import method

DENOM_FLOOR = 1e-6
"""The smallest divisor of the normalised merge (where few, light models agree), as mergekit."""


class SceParams(MethodParams):
    select_topk: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction of the elements with non-zero variance kept (largest variance across the models)",
    )
    normalize: bool = Field(
        True, description="divide by the weights of the models that agree on each element (mergekit)"
    )
    uniform_below: float = Field(
        0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="weigh the models equally when the summed mean squared updates are below this (mergekit: 1e-6)",
    )
    int8_mask: bool = Field(False, description="accepted for mergekit compatibility; no effect")


def variance_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask (one tensor's shape) of the ⌊fraction · n⌋ elements of largest variance
    across ``deltas`` (stacked on dim 0), n the count of non-zero variances; ties: lower index."""
    shape = deltas.shape[1:]
    if fraction >= 1:
        return torch.ones(shape, dtype=torch.bool, device=deltas.device)
    var = deltas.var(dim=0, unbiased=False).reshape(-1)
    k = int(int(torch.count_nonzero(var)) * fraction) if fraction > 0 else 0
    mask = torch.zeros(var.numel(), dtype=torch.bool, device=deltas.device)
    if k > 0:
        order = torch.argsort(var, descending=True, stable=True)
        mask[order[:k]] = True
    return mask.reshape(shape)


def sce_weights(selected: torch.Tensor, uniform_below: float = 0.0) -> torch.Tensor:
    """η_j = mean(δ̂_j²) / Σ_i mean(δ̂_i²) over the stacked task vectors; equal weights when the sum
    is zero or below ``uniform_below``."""
    k = selected.shape[0]
    s = selected.square().reshape(k, -1).mean(dim=1)
    total = float(s.sum())
    if total == 0.0 or total < uniform_below:
        return torch.full_like(s, 1.0 / k)
    return s / total


def sce_delta(experts_minus_base: torch.Tensor, params: SceParams) -> torch.Tensor:
    """The merged task vector of stacked task vectors (models on dim 0)."""
    selected = experts_minus_base * variance_mask(experts_minus_base, params.select_topk)
    eta = sce_weights(selected, params.uniform_below).reshape(-1, *([1] * (selected.dim() - 1)))
    elected = torch.where(selected.sum(dim=0) >= 0, 1.0, -1.0).to(selected.dtype)
    agree = (torch.sign(selected) == elected).to(selected.dtype)
    kept = eta * agree
    merged = (selected * kept).sum(dim=0)
    if params.normalize:
        merged = merged / kept.sum(dim=0).clamp(min=DENOM_FLOOR)
    return merged


@method(
    "sce",
    paper="Wan et al. 2025, FuseChat: Knowledge Fusion of Chat Models, EMNLP, arXiv:2408.07990",
    params=SceParams,
    model_params=NoParams,
    base="required",
    card=MethodCard(
        identity=({}, {}),  # copies: no variance, nothing selected out at τ = 1, all agree
        typical=({"select_topk": 0.5}, {}),
        grid=({"select_topk": (0.1, 0.3, 0.5, 1.0)}, {}),
        group="advanced",
    ),
)
def sce(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: SceParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Select top-variance elements, weigh models by their squared updates, erase minority signs."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    b = base.to(dtype)
    deltas = torch.stack([e.to(dtype) - b for e in experts])
    return (b + sce_delta(deltas, params)).to(base.dtype)
