"""Model Breadcrumbs: per tensor, drop both the largest (outlier) and the smallest task-vector
entries, then add the surviving "breadcrumbs" to the base.

Davari, Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse
Masks", arXiv:2312.06795 (ECCV 2024).

For each expert and each tensor, mask the top ``gamma`` fraction of |τ| and as many of the
smallest as needed for a fraction ``density`` to remain; then

* ``breadcrumbs``: task arithmetic on the masked vectors, θ = θ0 + λ Σ_i w_i m_i ⊙ τ_i (the
  paper's merge, λ its α);
* ``breadcrumbs_ties``: TIES sign election and disjoint merge on them (a mergekit
  combination, not in the paper).

Granularity: per tensor ("per layer" in the paper), deterministic, one pass (S1). Counting is
mergekit's: n_top = ⌊γ n⌋, target = ⌊density n⌋, n_bottom = max(0, n − target − n_top), the
kept entries being the ascending-magnitude positions n_bottom … n_bottom + target − 1 (when
density + γ > 1 fewer outliers are removed so the density is met). The two magnitude bounds
come from selections, not a sort; entries tied with a bound are kept (mergekit keeps exactly
``target``, breaking ties arbitrarily).

Defaults: density 0.9 and gamma 0.01 (mergekit's gamma; the paper tunes the two percentiles per
setting); λ = 1; no rescale (the paper has none; ``rescale: true`` applies mergekit's L1-norm
match by default, ``rescale_mode: inverse`` divides by density instead). ``breadcrumbs_ties``
uses the TIES disjoint mean (``normalize: true``; mergekit: false) and, as mergekit, sign +1
for exact ties (``sign_tie: majority`` gives the tensor's majority sign instead).
mergekit's ``density`` default is 1.0 (no masking), ours the 0.9 above. ``int8_mask`` is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import TensorContext
from mergelab.methods.consensus import Scratch, SignTie, consensus_merge, linear_merge, merge_chunks
from mergelab.methods.registry import method
from mergelab.methods.sparsify import (
    SparseMergeParams,
    SparseModelParams,
    apply_mask,
    keep_count,
    kth_largest_magnitude,
    outlier_mask,
    parallel_map,
)

Tensor = torch.Tensor


class BreadcrumbsParams(SparseMergeParams):
    pass


class BreadcrumbsTiesParams(BreadcrumbsParams):
    normalize: bool = Field(
        True,
        description="disjoint mean over the agreeing models (TIES); false: disjoint sum "
        "(mergekit's default for breadcrumbs_ties)",
    )
    sign_tie: SignTie = Field(
        "positive",
        description="sign where the weighted sum is exactly 0: positive (mergekit; the "
        "default for per-tensor methods, which lets them run chunk by chunk) or majority "
        "(the tensor's majority elected sign, after the original TIES code)",
    )


class BreadcrumbsModelParams(SparseModelParams):
    density: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction of entries kept after removing outliers and small entries "
        "(mergekit's default is 1.0)",
    )
    gamma: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction of largest-magnitude entries removed as outliers",
    )


def _masked(
    base: Tensor,
    experts: Sequence[Tensor],
    params: BreadcrumbsParams,
    model_params: Sequence[BreadcrumbsModelParams],
) -> list[Tensor]:
    """Whole-tensor masking (used when the L1 rescale needs the whole task vector)."""
    out = []
    for e, m in zip(experts, model_params):
        delta = e.float() - base.float()
        mask = outlier_mask(delta, m.density, m.gamma)
        out.append(
            apply_mask(
                delta, mask, rescale=params.rescale, mode=params.rescale_mode, keep_prob=m.density
            )
        )
    return out


Bounds = tuple[float | None, float | None] | None
"""Magnitude bounds (lower, upper) of the kept entries (None: unbounded); None: keep nothing."""


def magnitude_bounds(base: Tensor, expert: Tensor, density: float, gamma: float) -> Bounds:
    """The bounds :func:`mergelab.methods.sparsify.outlier_mask` keeps between, from two exact
    selections on |expert − base| (no tensor-sized temporary)."""
    n = base.numel()
    if density >= 1:
        return (None, None)
    target = keep_count(n, density)
    if target == 0:
        return None
    n_top = min(n, int(gamma * n))
    n_bottom = max(0, n - target - n_top)
    lower = kth_largest_magnitude(expert, n - n_bottom, minus=base) if n_bottom > 0 else None
    upper = (
        kth_largest_magnitude(expert, n - n_bottom - target + 1, minus=base)
        if n_bottom + target < n
        else None
    )
    return (lower, upper)


def _merge_chunked(
    base: Tensor,
    experts: Sequence[Tensor],
    params: BreadcrumbsParams,
    model_params: Sequence[BreadcrumbsModelParams],
    *,
    elect: bool,
) -> Tensor:
    """Mask, rescale (inverse) and merge chunk by chunk: the same result as whole tensors,
    with temporaries of CHUNK entries."""
    weights = [m.weight for m in model_params]
    bounds = parallel_map(
        lambda em: magnitude_bounds(base, em[0], em[1].density, em[1].gamma),
        list(zip(experts, model_params)),
        numel=base.numel(),
    )

    def mask_chunk(i: int, d: Tensor, scratch: Scratch) -> None:
        if bounds[i] is None:
            d.zero_()
            return
        lower, upper = bounds[i]
        if lower is not None or upper is not None:
            mag = torch.abs(d, out=scratch.take("mag", d.numel()))
            keep = scratch.take("keep", d.numel())
            if lower is not None:
                d.mul_(torch.ge(mag, lower, out=keep))  # float-valued masks: fast on CPU
            if upper is not None:
                d.mul_(torch.le(mag, upper, out=keep))
        if params.rescale:  # inverse mode (l1 runs on whole tensors)
            density = model_params[i].density
            d.div_(density) if density > 0 else d.zero_()

    return merge_chunks(
        base, experts, mask_chunk, weights, lambda_=params.lambda_, normalize=params.normalize, elect=elect
    )


def _chunkable(params: BreadcrumbsParams, elect: bool) -> bool:
    l1 = params.rescale and params.rescale_mode == "l1"
    return not l1 and (not elect or params.sign_tie == "positive")


@method(
    "breadcrumbs",
    paper="Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795",
    params=BreadcrumbsParams,
    model_params=BreadcrumbsModelParams,
    base="required",
)
def breadcrumbs(
    base: Tensor,
    experts: Sequence[Tensor],
    params: BreadcrumbsParams,
    model_params: Sequence[BreadcrumbsModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Remove outliers and small entries of each task vector per tensor, then task arithmetic."""
    if _chunkable(params, elect=False):
        return _merge_chunked(base, experts, params, model_params, elect=False)
    masked = _masked(base, experts, params, model_params)
    weights = [m.weight for m in model_params]
    merged = linear_merge(masked, weights, normalize=params.normalize)
    return merged.mul_(params.lambda_).add_(base).to(base.dtype)


@method(
    "breadcrumbs_ties",
    paper="Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795; "
    "with TIES sign election, Yadav et al. 2023, arXiv:2306.01708",
    params=BreadcrumbsTiesParams,
    model_params=BreadcrumbsModelParams,
    base="required",
)
def breadcrumbs_ties(
    base: Tensor,
    experts: Sequence[Tensor],
    params: BreadcrumbsTiesParams,
    model_params: Sequence[BreadcrumbsModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Breadcrumbs masks, then TIES sign election and disjoint merge."""
    if _chunkable(params, elect=True):
        return _merge_chunked(base, experts, params, model_params, elect=True)
    masked = _masked(base, experts, params, model_params)
    weights = [m.weight for m in model_params]
    merged = consensus_merge(
        masked, weights, normalize=params.normalize, on_zero=params.sign_tie
    )
    return merged.mul_(params.lambda_).add_(base).to(base.dtype)
