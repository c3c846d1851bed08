"""DELLA-Merging: drop task-vector entries with magnitude-ranked probabilities (MagPrune),
rescale by each entry's own keep probability, then elect signs and fuse.

Deep, Bhardwaj, Poria 2024, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", arXiv:2406.11617.

MagPrune, per row of each tensor (rows of a 2-D weight; a 1-D tensor is one row; a k-D tensor
is viewed as (shape[0], rest)): rank |τ| ascending, r ∈ [0, 1] the normalised rank
(0 = smallest, 1 = largest), keep probability p = (density − ε) + 2ε·r (mean = density),
keep ~ Bernoulli(p), survivors divided by p (the paper's 1/(1 − p_drop)). Then

* ``della``: TIES sign election and disjoint mean (the paper's Elect and Fuse steps),
  θ = θ0 + λ τ_m;
* ``della_linear``: no election, θ = θ0 + λ Σ_i w_i τ̃_i (mergekit's variant).

Granularity: per row, one pass (S1). Ranks: one stable argsort per row, integer ranks
normalised in float32 (float64 for rows over 2**24); equal magnitudes get distinct ranks in
index order; a one-element row gets r = 0.5 (p = density). Randomness: ``ctx.generator()``
(seeded per (seed, tensor name)), ``rand(shape) < p`` per expert in recipe order; a tensor
with density 1 draws nothing. With ε = 0 DELLA reduces to DARE (identical masks for the same
seed and tensor name).

Defaults: density 0.7 and ε = 0.07, the authors' reference command (drop rate 0.3, window
size 0.14 = 2ε); λ = 1; rescale on. Constraint (model validator): 0 < density − ε and
density + ε ≤ 1, except density = 1, which disables pruning as in mergekit.

Departures from mergekit 0.1.5 (same parameter names):

* Rescale: mergekit's ``rescale: true`` matches the tensor's L1 norm; the paper and the
  authors' code divide each kept entry by its own keep probability. mergelab follows the
  paper (``rescale_mode: inverse``); ``rescale_mode: l1`` restores mergekit's rule.
* Ranks: mergekit converts ranks to the working dtype, bf16 for bf16 models, where a row of
  5504 entries keeps only ~800 distinct rank values (quantised keep probabilities); here ranks
  stay exact. mergekit ranks k-D tensors along dim 1 only; here rows are (shape[0], rest).
  mergekit requires density + ε < 1 strictly; here ≤ 1 is allowed.
* Sign ties in ``della``: +1 by default (mergekit's rule, which lets the merge run chunk by
  chunk); ``sign_tie: majority`` gives the tensor's majority sign (original TIES code). ε defaults to 0.07 (mergekit: 0.15) and density to
  0.7 (mergekit: 1.0, no pruning). ``int8_mask`` is accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, model_validator

from mergelab.methods.base import TensorContext
from mergelab.methods.consensus import Scratch, SignTie, consensus_merge, linear_merge, scratch_view
from mergelab.methods.registry import method
from mergelab.methods.sparsify import (
    RescaleMode,
    SparseMergeParams,
    SparseModelParams,
    apply_mask,
    PROB_BITS,
    keep_indicator,
    row_chunks,
    realised_keep_prob,
    rank_keep_probs,
)

Tensor = torch.Tensor

_TOL = 1e-12


class DellaLinearParams(SparseMergeParams):
    rescale: bool = Field(True, description="rescale the survivors (see rescale_mode)")
    rescale_mode: RescaleMode = Field(
        "inverse",
        description="inverse: divide each survivor by its own keep probability (paper); "
        "l1: match the tensor's L1 norm (mergekit's rescale)",
    )


class DellaParams(DellaLinearParams):
    normalize: bool = Field(
        True, description="disjoint mean over the agreeing models; false: disjoint sum"
    )
    sign_tie: SignTie = Field(
        "positive",
        description="sign where the weighted sum is exactly 0: positive (mergekit; the "
        "default for per-tensor methods, which lets them run chunk by chunk) or majority "
        "(the tensor's majority elected sign, after the original TIES code)",
    )


class DellaModelParams(SparseModelParams):
    density: float = Field(
        0.7,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="mean keep probability (1 − drop rate); mergekit's default is 1.0",
    )
    epsilon: float = Field(
        0.07,
        ge=0.0,
        le=0.5,
        allow_inf_nan=False,
        description="half-width of the keep-probability window [density − ε, density + ε] "
        "(mergekit's default is 0.15)",
    )

    @model_validator(mode="after")
    def _window_inside_unit_interval(self) -> DellaModelParams:
        if self.density >= 1.0:
            return self  # no pruning, whatever epsilon (as mergekit)
        if not (self.density - self.epsilon > 0.0 and self.density + self.epsilon <= 1.0 + _TOL):
            raise ValueError(
                f"della needs 0 < density - epsilon and density + epsilon <= 1; got "
                f"density={self.density}, epsilon={self.epsilon}"
            )
        return self


def magprune(
    delta: Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    *,
    rescale: bool = True,
    mode: RescaleMode = "inverse",
    inplace: bool = False,
    scratch: Scratch | None = None,
) -> Tensor:
    """DELLA's MagPrune on one task vector: rank-based Bernoulli drop per row, then rescale.

    ``inplace`` overwrites ``delta``; ``scratch`` holds the mask buffer. The draws are those
    of :func:`mergelab.methods.sparsify.bernoulli_mask` with the rank-based probabilities.
    """
    if density >= 1:
        return delta
    probs = realised_keep_prob(rank_keep_probs(delta, density, epsilon))
    keep = keep_indicator(delta, probs, generator, out=scratch_view(scratch, "keep", delta))
    if rescale and mode == "l1":
        return apply_mask(delta, keep, rescale=True, mode="l1")
    out = delta.mul_(keep) if inplace else delta * keep
    if rescale:
        out.div_(probs.clamp_(min=2.0**-PROB_BITS))  # kept entries have p ≥ 2⁻¹⁶; guards 0/0
    return out


def _della_merge(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DellaLinearParams,
    model_params: Sequence[DellaModelParams],
    ctx: TensorContext,
    *,
    elect: bool,
) -> Tensor:
    """MagPrune (per expert, from its own RNG stream), then sum or elect + disjoint merge.

    Runs in chunks of whole rows unless a step needs the whole tensor (L1 rescale, majority
    sign ties); ranks are per row and each expert's draws come from its own stream
    ``ctx.generator(i + 1)`` in order, so the result does not depend on the chunking.
    """
    weights = [m.weight for m in model_params]
    whole = (params.rescale and params.rescale_mode == "l1") or (
        elect and getattr(params, "sign_tie", "positive") != "positive"
    )
    gens = [ctx.generator(i + 1) for i in range(len(experts))]
    shape = base.shape
    cols = base.numel() // shape[0] if base.dim() >= 2 and base.numel() else max(base.numel(), 1)
    b_flat = base.reshape(-1).float()
    e_flat = [e.reshape(-1).float() for e in experts]
    out = torch.empty_like(b_flat)
    scratch = Scratch(out)
    for sl in [slice(0, b_flat.numel())] if whole else row_chunks(shape):
        b = b_flat[sl]
        rows = (-1, cols) if base.dim() >= 2 else (-1,)
        pruned = [
            magprune(
                torch.sub(e[sl], b, out=scratch.take(f"delta{i}", b.numel())).view(rows), m.density,
                m.epsilon, g, rescale=params.rescale, mode=params.rescale_mode, inplace=True, scratch=scratch,
            ).reshape(-1)
            for i, (e, m, g) in enumerate(zip(e_flat, model_params, gens))
        ]
        if elect:
            merged = consensus_merge(
                pruned, weights, normalize=params.normalize, on_zero=params.sign_tie, scratch=scratch
            )
        else:
            merged = linear_merge(pruned, weights, normalize=params.normalize)
        torch.add(b, merged, alpha=params.lambda_, out=out[sl])
    return out.reshape(shape).to(base.dtype)


@method(
    "della",
    paper="Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through "
    "Magnitude-Based Sampling, arXiv:2406.11617",
    params=DellaParams,
    model_params=DellaModelParams,
    base="required",
)
def della(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DellaParams,
    model_params: Sequence[DellaModelParams],
    ctx: TensorContext,
) -> Tensor:
    """MagPrune (rank-based random drop per row, 1/p rescale), then sign election and fuse."""
    return _della_merge(base, experts, params, model_params, ctx, elect=True)


@method(
    "della_linear",
    paper="Deep et al. 2024, DELLA-Merging, arXiv:2406.11617 (without the Elect step)",
    params=DellaLinearParams,
    model_params=DellaModelParams,
    base="required",
)
def della_linear(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DellaLinearParams,
    model_params: Sequence[DellaModelParams],
    ctx: TensorContext,
) -> Tensor:
    """MagPrune each task vector, then a weighted sum (no sign election)."""
    return _della_merge(base, experts, params, model_params, ctx, elect=False)
