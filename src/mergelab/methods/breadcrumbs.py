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
come from selections, not a sort; entries tied with a bound are kept (``bound_ties: keep``).

Granularity ``scope: row`` follows the authors' code (``TaskVectorMiddleKeep``: per row along
the last dimension, remove the top ⌊γ c⌋ with ``torch.topk``, then keep the top ⌊density c⌋ of
the rest): exact counts per row, and when density + γ > 1 it keeps c − ⌊γ c⌋ (all but the
outliers) where the tensor rule removes fewer outliers to reach the density. Whole tensors.

Ties at a bound (issue 13: 3 % of one 32-entry tensor differed from mergekit, weights 1/1,
density 0.8, gamma 0.05, float32, on task vectors so small that float32 rounding makes
magnitudes repeat): here the departure is mergelab's. mergekit 0.1.5 (a ``torch.sort`` of
|τ|) and the authors' code (``TaskVectorMiddleKeep``: ``torch.topk`` per row) both keep exactly
the count, tied entries ordered arbitrarily; ``keep`` keeps every entry tied with a bound, so
it can keep more than ⌊density n⌋ and remove fewer than ⌊γ n⌋ outliers. The paper defines the
band by percentiles, which does not say how ties fall. ``bound_ties: sort`` counts exactly,
with ties in the order of the same float32 ``torch.sort`` mergekit runs (its result bit for
bit on the same torch build; it needs the whole tensor and a sort). ``keep`` stays the default
so existing merges keep their bits and the merge streams chunk by chunk; with continuous
task vectors ties at a bound do not occur and the two agree.

Defaults: density 0.9 and gamma 0.01 (mergekit's gamma; the paper tunes the two percentiles per
setting); λ = 1; no rescale (the paper has none; ``rescale: true`` applies mergekit's L1-norm
match by default, ``rescale_mode: inverse`` divides by density instead). ``breadcrumbs_ties``
uses the TIES disjoint mean (``normalize: true``; mergekit: false) and, as mergekit, sign +1
for exact ties (``sign_tie: majority`` gives the tensor's majority sign instead).
mergekit's ``density`` default is 1.0 (no masking), ours the 0.9 above. ``int8_mask`` is ignored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, TensorContext
from mergelab.methods.registry import method
from mergelab.methods.stages.combine import DisjointMerge, WeightedSum
from mergelab.methods.stages.pipeline import TaskVectorMerge
from mergelab.methods.stages.sign_consensus import SignTie
from mergelab.methods.stages.sparsify import (
    OutlierBands,
    SparseMergeParams,
    SparseModelParams,
    per_tensor_sign_tie,
)

Tensor = torch.Tensor


class BreadcrumbsParams(SparseMergeParams):
    scope: Literal["tensor", "row"] = Field(
        "tensor",
        description="tensor: one band per tensor (the paper's per layer; mergekit); row: per row along the "
        "last dimension, ⌊γ·c⌋ removed then ⌊density·c⌋ kept per row (the authors' code)",
    )
    bound_ties: Literal["keep", "sort"] = Field(
        "keep",
        description="entries whose magnitude equals a band bound: keep (all kept, so the kept count "
        "can exceed density·n; streams chunk by chunk) or sort (exact counts, ties in torch.sort's "
        "order: mergekit's result; a full sort of each tensor)",
    )


class BreadcrumbsTiesParams(BreadcrumbsParams):
    normalize: bool = Field(
        True,
        description="disjoint mean over the agreeing models (TIES); false: disjoint sum "
        "(mergekit's default for breadcrumbs_ties)",
    )
    sign_tie: SignTie = per_tensor_sign_tie()


class BreadcrumbsModelParams(SparseModelParams):
    density: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction of entries kept after removing outliers and small entries (mergekit's default is 1.0)",
    )
    gamma: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction of largest-magnitude entries removed as outliers",
    )


def _pipeline(
    params: BreadcrumbsParams, model_params: Sequence[BreadcrumbsModelParams], *, elect: bool
) -> TaskVectorMerge:
    """Breadcrumbs as stages: outlier bands × weighted sum (``breadcrumbs``) or elect + disjoint
    merge (``breadcrumbs_ties``). Chunked in the compute dtype; whole tensors in float32 (float64 stays float64) when
    the L1 rescale or the tensor's majority sign needs them."""
    bands = OutlierBands(
        densities=tuple(float(m.density) for m in model_params),
        gammas=tuple(float(m.gamma) for m in model_params),
        rescale=params.rescale,
        mode=params.rescale_mode,
        exact=params.bound_ties == "sort",
        per_row=params.scope == "row",
    )
    if elect:
        assert isinstance(params, BreadcrumbsTiesParams)
        combine: DisjointMerge | WeightedSum = DisjointMerge(normalize=params.normalize, on_zero=params.sign_tie)
    else:
        combine = WeightedSum(normalize=params.normalize)
    merge = TaskVectorMerge(bands, combine)
    return TaskVectorMerge(bands, combine, upcast=merge.whole)


def breadcrumbs_delta(
    base: Tensor,
    experts: Sequence[Tensor],
    params: BreadcrumbsParams,
    model_params: Sequence[BreadcrumbsModelParams],
    ctx: TensorContext,
) -> Tensor:
    """τ_m of ``breadcrumbs`` (unscaled): ``breadcrumbs == base + λ · breadcrumbs_delta``."""
    return _pipeline(params, model_params, elect=False).delta(base, experts, [m.weight for m in model_params])


def breadcrumbs_ties_delta(
    base: Tensor,
    experts: Sequence[Tensor],
    params: BreadcrumbsTiesParams,
    model_params: Sequence[BreadcrumbsModelParams],
    ctx: TensorContext,
) -> Tensor:
    """τ_m of ``breadcrumbs_ties`` (unscaled): ``breadcrumbs_ties == base + λ · breadcrumbs_ties_delta``."""
    return _pipeline(params, model_params, elect=True).delta(base, experts, [m.weight for m in model_params])


@method(
    "breadcrumbs",
    paper="Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795",
    params=BreadcrumbsParams,
    model_params=BreadcrumbsModelParams,
    base="required",
    scale="lambda",
    delta=breadcrumbs_delta,
    card=MethodCard(
        identity=({"lambda": 1.0, "normalize": True}, {"density": 1.0, "gamma": 0.0, "weight": 1.0}),
        typical=({}, {"density": 0.8, "gamma": 0.05}),
        grid=({"lambda": (0.2, 0.4, 0.7, 1.0, 1.3)}, {"density": (0.7, 0.9), "gamma": (0.01,)}),
        group="classic",
    ),
)
def breadcrumbs(
    base: Tensor,
    experts: Sequence[Tensor],
    params: BreadcrumbsParams,
    model_params: Sequence[BreadcrumbsModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Remove outliers and small entries of each task vector per tensor, then task arithmetic."""
    weights = [m.weight for m in model_params]
    return _pipeline(params, model_params, elect=False).merge(base, experts, weights, params.lambda_)


@method(
    "breadcrumbs_ties",
    paper="Davari & Belilovsky 2023, Model Breadcrumbs, arXiv:2312.06795; "
    "with TIES sign election, Yadav et al. 2023, arXiv:2306.01708",
    params=BreadcrumbsTiesParams,
    model_params=BreadcrumbsModelParams,
    base="required",
    scale="lambda",
    delta=breadcrumbs_ties_delta,
    card=MethodCard(
        identity=({"lambda": 1.0}, {"density": 1.0, "gamma": 0.0, "weight": 1.0}),
        typical=({}, {"density": 0.8, "gamma": 0.05}),
        grid=({"lambda": (1.0, 1.5, 2.0, 2.5)}, {"density": (0.7, 0.9), "gamma": (0.01,)}),
        group="classic",
    ),
)
def breadcrumbs_ties(
    base: Tensor,
    experts: Sequence[Tensor],
    params: BreadcrumbsTiesParams,
    model_params: Sequence[BreadcrumbsModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Breadcrumbs masks, then TIES sign election and disjoint merge."""
    weights = [m.weight for m in model_params]
    return _pipeline(params, model_params, elect=True).merge(base, experts, weights, params.lambda_)
