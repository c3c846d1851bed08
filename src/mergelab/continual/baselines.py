"""Sequential baselines: the continual versions of the classic merges, each in constant memory.

The baselines the OPCM paper compares against, as FusionBench's ``method/opcm/`` runs them
(``weight_average.py``, ``task_arithmetic.py``, ``ties_merging.py``; defaults from
``config/method/opcm/*.yaml``), plus MagMax, which is sequential by design:

* ``average`` (model soup; Wortsman et al. 2022, arXiv:2203.05482): θ_t = θ0 + (1/t) Σ_{i≤t} τ_i,
  the running mean of the experts (R = Σ τ_i, scale 1/t). Equal to the static ``linear`` merge of
  the same experts.
* ``task_arithmetic`` (Ilharco et al. 2023, arXiv:2212.04089): θ_t = θ_{t−1} + λ τ_t, so
  θ_t = θ0 + λ Σ τ_i (R = Σ τ_i, scale λ); λ = 0.3 as the reference configuration. Equal to the
  static ``task_arithmetic`` with that λ.
* ``ties`` (Yadav et al. 2023, arXiv:2306.01708), as ``ContinualTiesMergingForCLIP``: the first
  expert gives θ0 + λ τ_1; then, with Δ = θ_{t−1} − θ0, θ_t = θ_{t−1} + λ · TIES(Δ, τ_t): TIES of the
  *pair* (trim each to its top ``density`` magnitudes, elect the sign of their sum, keep the
  entries that agree with it and add them, ``merge: sum``; ``mean`` divides by the number that
  agree). The running merge enters twice, as the base of the update and as one of the two
  trimmed vectors, so entries where it dominates grow by (1 + λ) per step: that is the reference's
  baseline, kept as is. λ = 0.5, density 0.2 (``threshold: 20``) as its configuration.
  Departure: the trim is per tensor (mergelab's ``ties`` with ``scope: tensor``, ``trim_count:
  original``, ``sign_tie: majority``); the reference trims over the whole flattened model, which
  in a stream would cost two extra passes per expert.
* ``magmax`` (Marczak et al. 2024, arXiv:2407.06322): per entry the task-vector value of largest
  magnitude so far (R_t = R_{t−1} where |R_{t−1}| > |τ_t|, else τ_t: ties go to the later expert,
  as mergelab's static ``magmax``), θ_t = θ0 + λ R_t with λ = 0.5. Exactly the static ``magmax`` of
  the same experts: the maximum folds one expert at a time.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field

from mergelab.continual.base import ContinualMethod, Role, StepContext, StepSums
from mergelab.methods.base import MethodParams, NoParams, TensorContext
from mergelab.methods.magmax import max_magnitude
from mergelab.methods.ties import TiesModelParams, TiesParams, ties_delta

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------- average


def sum_step(raw: Tensor | None, tau: Tensor, params: Any, ctx: StepContext) -> Tensor:
    """R_t = Σ_{i≤t} τ_i."""
    return tau if raw is None else raw.add_(tau)


def average_finish(stats: Mapping[str, Any], params: NoParams, t: int, sums: StepSums) -> tuple[dict[str, Any], float]:
    return {}, 1.0 / t


AVERAGE = ContinualMethod(
    name="average",
    paper="Wortsman et al. 2022, Model soups, arXiv:2203.05482 (running mean)",
    summary="the running mean of the experts (model soup); equals the static linear merge",
    params=NoParams,
    step=sum_step,
    finish=average_finish,
)


# -------------------------------------------------------------------------------- task arithmetic


class SequentialTaskArithmeticParams(MethodParams):
    lambda_: float = Field(
        0.3,
        alias="lambda",
        allow_inf_nan=False,
        description="scale of the summed task vectors (FusionBench's continual configuration: 0.3)",
    )


def lambda_finish(stats: Mapping[str, Any], params: Any, t: int, sums: StepSums) -> tuple[dict[str, Any], float]:
    return {}, float(params.lambda_)


TASK_ARITHMETIC = ContinualMethod(
    name="task_arithmetic",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089 (sequential)",
    summary="θ0 + λ Σ τ_i, one expert at a time; equals the static task_arithmetic with the same λ",
    params=SequentialTaskArithmeticParams,
    step=sum_step,
    finish=lambda_finish,
)


# ------------------------------------------------------------------------------------------ ties


class SequentialTiesParams(MethodParams):
    lambda_: float = Field(
        0.5, alias="lambda", allow_inf_nan=False, description="scale of each step's TIES update (reference: 0.5)"
    )
    density: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction of each of the pair's largest magnitudes kept, per tensor (reference: 20 %)",
    )
    merge: Literal["sum", "mean"] = Field(
        "sum", description="sum (reference) or mean of the agreeing trimmed entries of the pair"
    )


def ties_pair(delta: Tensor, tau: Tensor, params: SequentialTiesParams, name: str) -> Tensor:
    """TIES of the two task vectors (``delta``, ``tau``) without a scale: mergelab's ``ties`` per tensor."""
    ties_params = TiesParams.model_validate(
        {
            "lambda": 1.0,
            "normalize": params.merge == "mean",
            "scope": "tensor",
            "trim_count": "original",
            "sign_tie": "majority",
        }
    )
    model_params = [TiesModelParams(density=params.density)] * 2
    zero = torch.zeros_like(tau)
    return ties_delta(zero, [delta, tau], ties_params, model_params, TensorContext(name=name))


def ties_step(raw: Tensor | None, tau: Tensor, params: SequentialTiesParams, ctx: StepContext) -> Tensor:
    """R_1 = λ τ_1; R_t = R_{t−1} + λ · TIES(R_{t−1}, τ_t)."""
    lam = float(params.lambda_)
    if raw is None:
        return tau.mul_(lam)
    update = ties_pair(raw, tau, params, ctx.name)
    return raw.add_(update, alpha=lam)


def ties_workspace(name: str, shape: tuple[int, ...], role: Role, params: Any) -> int:
    """τ, the result, a zero base, the pair's task vectors, trimmed copies, masks and the merged update
    (measured: about 8 tensor-sized buffers beyond the inputs)."""
    n = math.prod(shape)
    return 10 * n


def unit_finish(stats: Mapping[str, Any], params: Any, t: int, sums: StepSums) -> tuple[dict[str, Any], float]:
    return {}, 1.0


TIES = ContinualMethod(
    name="ties",
    paper="Yadav et al. 2023, TIES-Merging, arXiv:2306.01708 (sequential, as FusionBench's continual baseline)",
    summary="θ_t = θ_{t−1} + λ·TIES(θ_{t−1} − θ0, τ_t): trim and elect against the running merge",
    params=SequentialTiesParams,
    step=ties_step,
    finish=unit_finish,
    workspace=ties_workspace,
)


# ---------------------------------------------------------------------------------------- magmax


class SequentialMagMaxParams(MethodParams):
    lambda_: float = Field(
        0.5, alias="lambda", allow_inf_nan=False, description="scale of the selected task vector (paper: 0.5)"
    )


def magmax_step(raw: Tensor | None, tau: Tensor, params: SequentialMagMaxParams, ctx: StepContext) -> Tensor:
    """R_t: per entry the τ_i (i ≤ t) of largest magnitude, the later one on ties."""
    return tau if raw is None else max_magnitude([raw, tau])


MAGMAX = ContinualMethod(
    name="magmax",
    paper="Marczak et al. 2024, MagMax: Leveraging Model Merging for Seamless Continual Learning, arXiv:2407.06322",
    summary="per entry the task-vector value of largest magnitude so far, times λ; equals the static magmax",
    params=SequentialMagMaxParams,
    step=magmax_step,
    finish=lambda_finish,
)
