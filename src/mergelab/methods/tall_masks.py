"""TALL masks: one multi-task vector plus a binary mask per task that localizes its information.

Wang, Dimitriadis, Ortiz-Jiménez, Fleuret, Frossard 2024, "Localizing Task Information for
Improved Model Merging and Compression", ICML, arXiv:2405.07813 (reference code:
nik-dim/tall_masks, ``src/utils/tallmask_utils.py``, ``src/eval/aggregation.py``).

With τ_i = θ_i − θ0:

1. multi-task vector τ_MTL = Σ_i τ_i (``multitask: sum``, task arithmetic) or TIES with
   K = ``density`` = 0.2 and the disjoint *sum* (``multitask: ties``, the reference's
   ``use_ties`` with ``ties_agg: sum``); ``normalize: true`` divides instead (mean /
   disjoint mean, not in the paper; it makes n copies of one expert give that expert back);
2. TALL mask of task t: m_t = 1[|τ_t| > λ_t · |τ_MTL − τ_t|] elementwise (strict ``>``, as the
   reference; the reference writes it |θ0 − θ_t| > λ_t |θ_MTL − θ_t|, the same thing), with the
   untrimmed τ_t even when τ_MTL comes from TIES;
3. task t is reconstructed as θ̂_t = θ0 + m_t ⊙ τ_MTL (coefficient 1).

Output (``outputs="routed"``): the shared checkpoint holds θ0 + τ_MTL (task arithmetic with
λ = 1, or TIES dis-sum: a usable multi-task model on its own); the per-task parts are the
masks (bit-packed) and θ0, written to ``routed/`` of the output folder (see
:mod:`mergelab.routed`). ``mergelab extract OUT TASK DEST`` rebuilds θ̂_t as
``where(m_t, shared, θ0)``, a pure selection, so no rounding is added. The in-memory API
returns only the shared model.

λ_t is the per-model parameter ``tall_lambda``, default 0.6 (fusion_bench's fixed value). The
paper picks λ_t per task from {0.2, 0.3, 0.4, 0.5, 0.6} on that task's validation split: smaller
λ keeps more weights (λ = 0 keeps every weight the task moved). Select it on validation data,
never on the test split.

Granularity: elementwise masks; ``multitask: sum`` is one pass, per tensor (S1).
``multitask: ties`` trims with ``scope: global`` by default (the reference flattens the whole
model, K = 20 % of every task vector), which needs the TIES gather passes (two or three extra
reads, bounded memory; see :mod:`mergelab.methods.ties`); ``scope: tensor`` trims each tensor
on its own in one pass (mergekit's convention).

Reference differences: fusion_bench's ``tall_mask`` compares |θ0 − τ_t| (a base weight minus a
task vector) with λ|τ_MTL − τ_t|; we follow the paper and the original code (|τ_t|). The
original TA path also applies a top-k filter with k = 100 % (no-op), omitted here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from mergelab.methods.base import Fold, MethodCard, MethodOutput, MethodParams, TensorContext
from mergelab.methods.kernels.tensors import task_vectors, weighted_sum
from mergelab.methods.registry import method
from mergelab.methods.stages.sign_consensus import SignTie, consensus_merge
from mergelab.methods.ties import (
    PASS_HIGH,
    PASS_LOW,
    PASS_SIGN,
    TiesModelParams,
    TiesParams,
    global_passes,
    trim,
)

Tensor = torch.Tensor

#: The λ_t grid of the reference code, to select per task on validation data.
TALL_LAMBDA_GRID = (0.2, 0.3, 0.4, 0.5, 0.6)


class MultiTaskParams(MethodParams):
    """How τ_MTL is built (shared by ``tall_masks`` and ``consensus``)."""

    multitask: Literal["sum", "ties"] = Field(
        "sum",
        description="multi-task vector: sum (task arithmetic, Σ τ_i) or ties (TIES trim + elect + "
        "disjoint sum, the reference's use_ties)",
    )
    normalize: bool = Field(
        False,
        description="divide τ_MTL: mean instead of sum, TIES disjoint mean instead of disjoint sum (not in the paper)",
    )
    scope: Literal["tensor", "global"] = Field(
        "global",
        description="multitask: ties only: top-K over the whole model per expert (global, the "
        "reference; extra read passes) or per tensor",
    )
    sign_tie: SignTie = Field(
        "majority",
        description="multitask: ties only: sign where the sum of trimmed deltas is exactly 0 "
        "(majority: the scope's majority sign; positive: +1)",
    )


class TallParams(MultiTaskParams):
    pass


class TallModelParams(MethodParams):
    tall_lambda: float = Field(
        0.6,
        ge=0.0,
        allow_inf_nan=False,
        description="λ_t of the mask |τ_t| > λ_t·|τ_MTL − τ_t| (reference grid 0.2…0.6, chosen per "
        "task on validation data; fusion_bench fixes 0.6)",
    )
    density: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="multitask: ties only: fraction K of each task vector kept by the TIES trim (reference: 0.2)",
    )


# --------------------------------------------------------------------------------------------
# The multi-task vector, shared with consensus merging
# --------------------------------------------------------------------------------------------


def _as_ties(params: MultiTaskParams) -> TiesParams:
    return TiesParams.model_validate(
        {"normalize": params.normalize, "scope": params.scope, "sign_tie": params.sign_tie}
    )


def _as_ties_models(model_params: Sequence[Any]) -> list[TiesModelParams]:
    return [TiesModelParams.model_validate({"density": m.density, "weight": 1.0}) for m in model_params]


def _wrap_pass(gp: Fold) -> Fold:
    """A TIES gather pass fed with this module's parameters (same name, so same ctx.folds key)."""

    def init(params: MultiTaskParams, n: int) -> Any:
        return gp.init(_as_ties(params), n)

    def update(state, base, experts, params, model_params, ctx) -> None:
        gp.update(state, base, experts, _as_ties(params), _as_ties_models(model_params), ctx)

    def finish(state: Any, params: MultiTaskParams, n: int) -> Any:
        return gp.finish(state, _as_ties(params), n)

    return Fold(gp.name, init, update, finish, gp.combine)


def multitask_passes(params: MultiTaskParams) -> tuple[Fold, ...]:
    """The TIES global-trim passes when ``multitask: ties`` with ``scope: global``; else none."""
    if params.multitask != "ties":
        return ()
    return tuple(_wrap_pass(gp) for gp in global_passes(_as_ties(params)))


def multitask_vector(
    deltas: Sequence[Tensor],
    params: MultiTaskParams,
    model_params: Sequence[Any],
    ctx: TensorContext,
) -> Tensor:
    """τ_MTL from the task vectors: Σ τ_i (or the mean), or the TIES disjoint sum (or mean)."""
    n = len(deltas)
    if params.multitask == "sum":
        total = weighted_sum(deltas, from_zero=True)
        return total.div_(n) if params.normalize else total
    tp = _as_ties(params)
    majority: float | None = None
    if params.scope == "global":
        if PASS_HIGH not in ctx.folds or PASS_LOW not in ctx.folds:
            raise RuntimeError(f"multitask=ties scope=global: gather pass results missing for tensor {ctx.name!r}")
        thresholds = ctx.folds[PASS_LOW]
        trimmed = [trim(d, m.density, tp, threshold=t) for d, m, t in zip(deltas, model_params, thresholds)]
        if params.sign_tie == "majority":
            if PASS_SIGN not in ctx.folds:
                raise RuntimeError(f"multitask=ties scope=global: sign pass result missing for tensor {ctx.name!r}")
            majority = float(ctx.folds[PASS_SIGN])
    else:
        trimmed = [trim(d, m.density, tp) for d, m in zip(deltas, model_params)]
    return consensus_merge(trimmed, [1.0] * n, normalize=params.normalize, on_zero=params.sign_tie, majority=majority)


def tall_mask(delta: Tensor, tau_mtl: Tensor, lam: float) -> Tensor:
    """m_t = 1[|τ_t| > λ_t · |τ_MTL − τ_t|] (bool, the tensor's shape)."""
    return delta.abs() > (tau_mtl - delta).abs().mul_(lam)


# --------------------------------------------------------------------------------------------


@method(
    "tall_masks",
    paper="Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression, arXiv:2405.07813",
    params=TallParams,
    model_params=TallModelParams,
    base="required",
    passes=multitask_passes,
    aliases=("tall_mask",),
    outputs="routed",
    card=MethodCard(
        identity=({"normalize": True}, {}),
        typical=({"multitask": "ties"}, {"tall_lambda": 0.4, "density": 0.3}),
        grid=({"multitask": ("sum", "ties")}, {"tall_lambda": (0.2, 0.4, 0.6)}),
        group="advanced",
    ),
)
def tall_masks(
    base: Tensor,
    experts: Sequence[Tensor],
    params: TallParams,
    model_params: Sequence[TallModelParams],
    ctx: TensorContext,
) -> MethodOutput:
    """Shared θ0 + τ_MTL plus one bit mask per task; extract rebuilds θ0 + m_t ⊙ τ_MTL."""
    deltas = task_vectors(base, experts)
    tau = multitask_vector(deltas, params, model_params, ctx)
    masks = [tall_mask(d, tau, m.tall_lambda) for d, m in zip(deltas, model_params)]
    del deltas
    merged = tau.add_(base.to(tau.dtype)).to(base.dtype)
    return MethodOutput(merged, {"base": base, "mask": masks, "scale": [1.0] * len(masks)})
