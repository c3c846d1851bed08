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

Granularity: elementwise mask, one tensor at a time (S1). Randomness: the mask of expert i
comes from ``ctx.generator()`` (seeded by (seed, tensor name)), drawn as
``rand(shape) < density`` for experts in recipe order, so a merge is reproducible whatever the
tensor order; a tensor with ``density`` 1 draws nothing.

Departures from mergekit 0.1.5 (same parameter names, so its recipes run):

* Rescale: mergekit's ``rescale: true`` scales each dropped tensor so its L1 norm equals the
  original's; the paper (and MergeLM, peft) divide by 1 − p. mergelab divides by ``density``
  by default (``rescale_mode: inverse``); ``rescale_mode: l1`` gives mergekit's rule.
* ``dare_ties`` uses the TIES disjoint *mean* by default (``normalize: true``); mergekit
  defaults to ``normalize: false`` (disjoint sum): set it to reproduce mergekit.
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

from mergelab.methods.base import TensorContext
from mergelab.methods.consensus import Scratch, SignTie, consensus_merge, linear_merge, scratch_view
from mergelab.methods.registry import method
from mergelab.methods.sparsify import (
    RescaleMode,
    SparseMergeParams,
    SparseModelParams,
    apply_mask,
    keep_indicator,
    flat_chunks,
    parallel_map,
    realised_keep_prob,
)

Tensor = torch.Tensor


class DareLinearParams(SparseMergeParams):
    rescale: bool = Field(
        True, description="rescale the survivors (the paper's 1/(1 − p); see rescale_mode)"
    )
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
    sign_tie: SignTie = Field(
        "positive",
        description="sign where the weighted sum is exactly 0: positive (mergekit; the "
        "default for per-tensor methods, which lets them run chunk by chunk) or majority "
        "(the tensor's majority elected sign, after the original TIES code)",
    )


class DareModelParams(SparseModelParams):
    density: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="keep probability 1 − p of each entry (mergekit's default is 1.0)",
    )


def dare_drop(
    delta: Tensor,
    density: float,
    generator: torch.Generator,
    *,
    rescale: bool = True,
    mode: RescaleMode = "inverse",
    inplace: bool = False,
    keep_out: Tensor | None = None,
) -> Tensor:
    """τ̃ = m ⊙ τ (÷ density, or L1-matched), m ~ Bernoulli(density) elementwise.

    ``inplace`` overwrites ``delta`` (the chunked merge passes its own scratch copy);
    ``keep_out`` is an optional buffer for the mask. The draws are those of
    :func:`bernoulli_mask`.
    """
    if density >= 1:
        return delta
    keep = keep_indicator(delta, density, generator, out=keep_out)
    if rescale and mode == "l1":
        return apply_mask(delta, keep, rescale=True, mode="l1")
    out = delta.mul_(keep) if inplace else delta * keep
    if rescale:
        p = realised_keep_prob(density)
        return out.zero_() if p <= 0 else out.div_(p)
    return out


def _dare_merge(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DareLinearParams,
    model_params: Sequence[DareModelParams],
    ctx: TensorContext,
    *,
    elect: bool,
) -> Tensor:
    """Drop (per expert, from its own RNG stream), then sum or elect + disjoint merge.

    Runs chunk by chunk unless a step needs the whole tensor (L1 rescale, majority sign ties);
    each expert's mask comes from its own stream ``ctx.generator(i + 1)`` drawn in order, so
    the result does not depend on the chunking. Temporaries live in one :class:`Scratch`.
    """
    weights = [m.weight for m in model_params]
    whole = (params.rescale and params.rescale_mode == "l1") or (
        elect and getattr(params, "sign_tie", "positive") != "positive"
    )
    gens = [ctx.generator(i + 1) for i in range(len(experts))]
    b_flat = base.reshape(-1).float()
    e_flat = [e.reshape(-1).float() for e in experts]
    out = torch.empty_like(b_flat)
    scratch = Scratch(out)
    for sl in [slice(0, b_flat.numel())] if whole else flat_chunks(b_flat.numel()):
        b = b_flat[sl]
        m = b.numel()
        deltas = [torch.sub(e[sl], b, out=scratch.take(f"delta{i}", m)) for i, e in enumerate(e_flat)]

        def drop(i: int) -> Tensor:  # one thread per expert: each has its own generator and mask buffer
            keep = scratch_view(scratch, f"keep{i}", deltas[i])
            return dare_drop(
                deltas[i], model_params[i].density, gens[i], rescale=params.rescale,
                mode=params.rescale_mode, inplace=True, keep_out=keep,
            )

        dropped = parallel_map(drop, list(range(len(e_flat))), numel=m)
        if elect:
            merged = consensus_merge(
                dropped, weights, normalize=params.normalize, on_zero=params.sign_tie, scratch=scratch
            )
        else:
            merged = linear_merge(dropped, weights, normalize=params.normalize)
        torch.add(b, merged, alpha=params.lambda_, out=out[sl])
    return out.reshape(base.shape).to(base.dtype)


@method(
    "dare_linear",
    paper="Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099",
    params=DareLinearParams,
    model_params=DareModelParams,
    base="required",
)
def dare_linear(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DareLinearParams,
    model_params: Sequence[DareModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Drop task-vector entries at random, rescale by 1/density, then task arithmetic."""
    return _dare_merge(base, experts, params, model_params, ctx, elect=False)


@method(
    "dare_ties",
    paper="Yu et al. 2024, Language Models are Super Mario (DARE), arXiv:2311.03099; "
    "with TIES sign election, Yadav et al. 2023, arXiv:2306.01708",
    params=DareTiesParams,
    model_params=DareModelParams,
    base="required",
)
def dare_ties(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DareTiesParams,
    model_params: Sequence[DareModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Drop task-vector entries at random, rescale, then TIES sign election and disjoint merge."""
    return _dare_merge(base, experts, params, model_params, ctx, elect=True)
