"""DARE (Drop And REscale): drop task-vector entries at random, rescale the survivors, merge.

Yu, Yu, Yu, Huang, Li 2024, "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", ICML, arXiv:2311.03099.

Per expert and per element, drop with probability p = 1 − ``density``
(m ~ Bernoulli(density)) and divide the survivors by 1 − p = density, so E[τ̃] = τ:
τ̃_i = m_i ⊙ τ_i / density_i. Then

* ``dare_linear``: task arithmetic on the τ̃_i: θ = θ0 + λ Σ_i w_i τ̃_i (÷ Σ w_i if
  ``normalize``);
* ``dare_ties``: TIES sign election and disjoint merge on the τ̃_i (no magnitude trim), as in
  the paper's DARE + TIES-Merging combination: θ = θ0 + λ τ_m.

Granularity: elementwise mask, one tensor at a time (S1), computed chunk by chunk
(:mod:`mergelab.methods.stages.pipeline`). Randomness: the mask of expert i comes from its own
stream ``ctx.generator(i + 1)`` (seeded by (seed, tensor name, i + 1)): 16-bit uniforms, four
per 64-bit draw, an entry kept iff its lane is below round(density·2¹⁶)
(:mod:`mergelab.methods.kernels.random`), so a merge is reproducible whatever the tensor order
and chunking; a tensor with ``density`` 1 draws nothing.

Departures from mergekit 0.1.5 (same parameter names, so its recipes run):

* Rescale: mergekit's ``rescale: true`` scales each dropped tensor so its L1 norm equals the
  original's; the paper (and MergeLM, peft) divide by 1 − p. mergelab divides by ``density``
  by default (``rescale_mode: inverse``); ``rescale_mode: l1`` gives mergekit's rule.
* ``dare_ties`` uses the TIES disjoint *mean* by default (``normalize: true``); mergekit
  defaults to ``normalize: false`` (disjoint sum): set it to reproduce mergekit.
* Trim: the DARE authors' DARE + TIES-Merging runs the full TIES merge on the DARE'd models,
  trim included (MergeLM: ``param_value_mask_rate``, keep 20 %, over the flattened model);
  ``dare_ties`` here follows mergekit (drop, then elect, no trim). ``trim_density: K`` adds the
  trim: each dropped and rescaled task vector keeps its top K magnitudes, per tensor (the
  authors trim over the whole flattened model; per tensor keeps the merge one pass).
* Sign ties in ``dare_ties``: +1 by default (mergekit's rule, which lets the merge run chunk
  by chunk); ``sign_tie: majority`` gives the tensor's majority sign (original TIES code).
* ``density`` defaults to 0.5 (the paper sweeps p ∈ [0.1, 0.9]; p = 0.5 is the authors'
  MergeLLM example and fusion_bench's default); mergekit's default is 1.0 (no drop).
  ``int8_mask`` is accepted and ignored. The RNG stream differs from mergekit's (global RNG),
  so masks never match mergekit's bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, TensorContext
from mergelab.methods.registry import method
from mergelab.methods.stages.combine import Combiner, DisjointMerge, WeightedSum
from mergelab.methods.stages.pipeline import TaskVectorMerge
from mergelab.methods.stages.sign_consensus import SignTie
from mergelab.methods.stages.sparsify import (
    DropThenTrim,
    RandomDrop,
    RescaleMode,
    SparseMergeParams,
    SparseModelParams,
    dare_drop,
    per_tensor_sign_tie,
)

__all__ = ["DareLinearParams", "DareModelParams", "DareTiesParams", "dare_drop", "dare_linear", "dare_ties"]

Tensor = torch.Tensor


class DareLinearParams(SparseMergeParams):
    rescale: bool = Field(True, description="rescale the survivors (the paper's 1/(1 − p); see rescale_mode)")
    rescale_mode: RescaleMode = Field(
        "inverse",
        description="inverse: divide survivors by density = 1 − p (paper); l1: match the "
        "tensor's L1 norm (mergekit's rescale)",
    )


class DareTiesParams(DareLinearParams):
    normalize: bool = Field(
        True,
        description="disjoint mean over the agreeing models (TIES); false: disjoint sum "
        "(mergekit's default for dare_ties)",
    )
    sign_tie: SignTie = per_tensor_sign_tie()
    trim_density: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="after the drop, keep each rescaled task vector's top trim_density magnitudes per tensor "
        "(the TIES trim the DARE authors run after DARE); none: no trim (mergekit)",
    )


class DareModelParams(SparseModelParams):
    density: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="keep probability 1 − p of each entry (mergekit's default is 1.0)",
    )


def _pipeline(
    params: DareLinearParams, model_params: Sequence[DareModelParams], ctx: TensorContext, *, elect: bool
) -> TaskVectorMerge:
    """DARE as stages: random drop (expert i from its own stream ``ctx.generator(i + 1)``) ×
    elect + disjoint merge (``dare_ties``) or weighted sum (``dare_linear``), in float32 (float64 for a float64
    compute dtype)."""
    drop = RandomDrop(
        densities=tuple(float(m.density) for m in model_params),
        generators=tuple(ctx.generator(i + 1) for i in range(len(model_params))),
        rescale=params.rescale,
        mode=params.rescale_mode,
    )
    sparsify: RandomDrop | DropThenTrim = drop
    trim = getattr(params, "trim_density", None)
    if elect and trim is not None and trim < 1:
        sparsify = DropThenTrim(drop, float(trim))
    combine: Combiner
    if elect:
        assert isinstance(params, DareTiesParams)  # the electing method's parameters (sign_tie)
        combine = DisjointMerge(normalize=params.normalize, on_zero=params.sign_tie)
    else:
        combine = WeightedSum(normalize=params.normalize)
    return TaskVectorMerge(sparsify, combine, upcast=True)


def dare_linear_delta(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DareLinearParams,
    model_params: Sequence[DareModelParams],
    ctx: TensorContext,
) -> Tensor:
    """τ_m of ``dare_linear`` (unscaled): ``dare_linear == base + λ · dare_linear_delta``."""
    return _pipeline(params, model_params, ctx, elect=False).delta(base, experts, [m.weight for m in model_params])


def dare_ties_delta(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DareTiesParams,
    model_params: Sequence[DareModelParams],
    ctx: TensorContext,
) -> Tensor:
    """τ_m of ``dare_ties`` (unscaled): ``dare_ties == base + λ · dare_ties_delta``."""
    return _pipeline(params, model_params, ctx, elect=True).delta(base, experts, [m.weight for m in model_params])


@method(
    "dare_linear",
    paper="Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099",
    params=DareLinearParams,
    model_params=DareModelParams,
    base="required",
    scale="lambda",
    delta=dare_linear_delta,
    card=MethodCard(
        identity=({"lambda": 1.0, "normalize": True}, {"density": 1.0, "weight": 1.0}),
        typical=({}, {"density": 0.5}),
        grid=({"lambda": (0.2, 0.4, 0.7, 1.0, 1.3)}, {"density": (0.1, 0.3, 0.5)}),
        group="classic",
        random=True,
    ),
)
def dare_linear(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DareLinearParams,
    model_params: Sequence[DareModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Drop task-vector entries at random, rescale by 1/density, then task arithmetic."""
    weights = [m.weight for m in model_params]
    return _pipeline(params, model_params, ctx, elect=False).merge(base, experts, weights, params.lambda_)


@method(
    "dare_ties",
    paper="Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099; "
    "with TIES sign election, Yadav et al. 2023, arXiv:2306.01708",
    params=DareTiesParams,
    model_params=DareModelParams,
    base="required",
    scale="lambda",
    delta=dare_ties_delta,
    card=MethodCard(
        identity=({"lambda": 1.0}, {"density": 1.0, "weight": 1.0}),
        typical=({}, {"density": 0.5}),
        grid=({"lambda": (1.0, 1.5, 2.0, 2.5)}, {"density": (0.1, 0.3, 0.5)}),
        group="classic",
        random=True,
    ),
)
def dare_ties(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DareTiesParams,
    model_params: Sequence[DareModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Drop task-vector entries at random, rescale, then TIES sign election and disjoint merge."""
    weights = [m.weight for m in model_params]
    return _pipeline(params, model_params, ctx, elect=True).merge(base, experts, weights, params.lambda_)
