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

Granularity: per row, one pass (S1), in chunks of whole rows. Ranks: exact integer ranks per
row (:func:`mergelab.methods.kernels.ranks.row_ranks`: on the CPU a NumPy sort of packed int64
keys ``|τ| bits << 32 | column``, which orders entries as a stable argsort does), normalised in
float32 (float64 for rows over 2**24); equal magnitudes get distinct ranks in index order; a
one-element row gets r = 0.5 (p = density). Randomness: expert i draws from its own stream
``ctx.generator(i + 1)`` (seeded per (seed, tensor name, i + 1)) the 16-bit lanes of
:mod:`mergelab.methods.kernels.random`, an entry kept iff its lane is below round(p·2¹⁶); a
tensor with density 1 draws nothing. With ε = 0 DELLA reduces to DARE (identical masks for the same
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
  chunk); ``sign_tie: majority`` gives the tensor's majority sign (original TIES code). ε defaults to
  0.07 (mergekit: 0.15) and density to 0.7 (mergekit: 1.0, no pruning). ``int8_mask`` is accepted and ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field, model_validator

from mergelab.methods.base import MethodCard, TensorContext
from mergelab.methods.registry import method
from mergelab.methods.stages.combine import Combiner, DisjointMerge, WeightedSum
from mergelab.methods.stages.pipeline import TaskVectorMerge
from mergelab.methods.stages.sign_consensus import SignTie
from mergelab.methods.stages.sparsify import (
    MagPrune,
    RescaleMode,
    SparseMergeParams,
    SparseModelParams,
    magprune,
    per_tensor_sign_tie,
)

__all__ = ["DellaLinearParams", "DellaModelParams", "DellaParams", "della", "della_linear", "magprune"]

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
    normalize: bool = Field(True, description="disjoint mean over the agreeing models; false: disjoint sum")
    sign_tie: SignTie = per_tensor_sign_tie()


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
        description="half-width of the keep-probability window [density − ε, density + ε] (mergekit's default is 0.15)",
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


def _pipeline(
    params: DellaLinearParams, model_params: Sequence[DellaModelParams], ctx: TensorContext, *, elect: bool
) -> TaskVectorMerge:
    """DELLA as stages: MagPrune (rows; expert i from its own stream ``ctx.generator(i + 1)``) ×
    elect + disjoint merge (``della``) or weighted sum (``della_linear``), in float32 (float64 for a float64
    compute dtype)."""
    prune = MagPrune(
        densities=tuple(float(m.density) for m in model_params),
        epsilons=tuple(float(m.epsilon) for m in model_params),
        generators=tuple(ctx.generator(i + 1) for i in range(len(model_params))),
        rescale=params.rescale,
        mode=params.rescale_mode,
    )
    combine: Combiner
    if elect:
        assert isinstance(params, DellaParams)  # the electing method's parameters (sign_tie)
        combine = DisjointMerge(normalize=params.normalize, on_zero=params.sign_tie)
    else:
        combine = WeightedSum(normalize=params.normalize)
    return TaskVectorMerge(prune, combine, upcast=True)


def della_delta(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DellaParams,
    model_params: Sequence[DellaModelParams],
    ctx: TensorContext,
) -> Tensor:
    """τ_m of ``della`` (unscaled): ``della == base + λ · della_delta`` bit for bit."""
    return _pipeline(params, model_params, ctx, elect=True).delta(base, experts, [m.weight for m in model_params])


def della_linear_delta(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DellaLinearParams,
    model_params: Sequence[DellaModelParams],
    ctx: TensorContext,
) -> Tensor:
    """τ_m of ``della_linear`` (unscaled): ``della_linear == base + λ · della_linear_delta``."""
    return _pipeline(params, model_params, ctx, elect=False).delta(base, experts, [m.weight for m in model_params])


@method(
    "della",
    paper="Deep et al. 2024, DELLA-Merging: Reducing Interference in Model Merging through "
    "Magnitude-Based Sampling, arXiv:2406.11617",
    params=DellaParams,
    model_params=DellaModelParams,
    base="required",
    scale="lambda",
    delta=della_delta,
    card=MethodCard(
        identity=({"lambda": 1.0}, {"density": 1.0, "epsilon": 0.0, "weight": 1.0}),
        typical=({}, {"density": 0.5, "epsilon": 0.1}),
        grid=({"lambda": (1.0, 1.5, 2.0, 2.5)}, {"density": (0.3, 0.5, 0.7)}),
        group="classic",
        random=True,
    ),
)
def della(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DellaParams,
    model_params: Sequence[DellaModelParams],
    ctx: TensorContext,
) -> Tensor:
    """MagPrune (rank-based random drop per row, 1/p rescale), then sign election and fuse."""
    weights = [m.weight for m in model_params]
    return _pipeline(params, model_params, ctx, elect=True).merge(base, experts, weights, params.lambda_)


@method(
    "della_linear",
    paper="Deep et al. 2024, DELLA-Merging, arXiv:2406.11617 (without the Elect step)",
    params=DellaLinearParams,
    model_params=DellaModelParams,
    base="required",
    scale="lambda",
    delta=della_linear_delta,
    card=MethodCard(
        identity=({"lambda": 1.0, "normalize": True}, {"density": 1.0, "epsilon": 0.0, "weight": 1.0}),
        typical=({}, {"density": 0.5, "epsilon": 0.1}),
        grid=({"lambda": (0.2, 0.4, 0.7, 1.0, 1.3)}, {"density": (0.3, 0.5, 0.7)}),
        group="classic",
        random=True,
    ),
)
def della_linear(
    base: Tensor,
    experts: Sequence[Tensor],
    params: DellaLinearParams,
    model_params: Sequence[DellaModelParams],
    ctx: TensorContext,
) -> Tensor:
    """MagPrune each task vector, then a weighted sum (no sign election)."""
    weights = [m.weight for m in model_params]
    return _pipeline(params, model_params, ctx, elect=False).merge(base, experts, weights, params.lambda_)
