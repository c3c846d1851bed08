"""Task arithmetic: add scaled task vectors to the base; a negative weight unlearns.

Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR, arXiv:2212.04089.
θ = θ0 + λ · Σ_i w_i τ_i with τ_i = θ_i − θ0 (divided by Σ_i w_i when ``normalize``).
Granularity: per tensor (elementwise), one pass. mergekit 0.1.5 accepts ``density``,
``rescale`` and ``int8_mask`` for this method and ignores them; so does mergelab, with a warning
for the first two (:data:`mergelab.methods.mergekit_defaults.IGNORED`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, TensorContext
from mergelab.methods.kernels.tensors import scale_add, weighted_sum
from mergelab.methods.registry import method


class TaskArithmeticParams(MethodParams):
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the summed task vectors")
    normalize: bool = Field(False, description="divide the weighted sum by the sum of weights")
    rescale: bool = Field(False, description="accepted so mergekit recipes run; no effect (nothing is sparsified)")
    int8_mask: bool = Field(False, description="accepted so mergekit recipes run; no effect")


class TaskArithmeticModelParams(MethodParams):
    weight: float = Field(1.0, allow_inf_nan=False, description="weight of this task vector (negative: negation)")
    density: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description=(
            "accepted so mergekit recipes run; no effect (a warning says so): task arithmetic does not "
            "sparsify; use ties or dare_linear"
        ),
    )


def weighted_task_vector_sum(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> torch.Tensor:
    """Σ_i w_i (θ_i − θ0), computed as Σ_i w_i θ_i − (Σ_i w_i) θ0 in one buffer (no temporaries)."""
    return weighted_sum(experts, weights).sub_(base, alpha=sum(weights))


def task_arithmetic_delta(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: TaskArithmeticParams,
    model_params: Sequence[TaskArithmeticModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Σ_i w_i τ_i (÷ Σ_i w_i with ``normalize``): ``task_arithmetic == base + λ · this``."""
    weights = [m.weight for m in model_params]
    delta = weighted_task_vector_sum(base, experts, weights)
    if params.normalize:
        denom = sum(weights)
        if abs(denom) < 1e-12:
            raise ValueError("normalize=true needs weights that do not sum to zero")
        delta.div_(denom)
    return delta


@method(
    "task_arithmetic",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089",
    params=TaskArithmeticParams,
    model_params=TaskArithmeticModelParams,
    base="required",
    scale="lambda",
    delta=task_arithmetic_delta,
    card=MethodCard(
        identity=({"lambda": 1.0, "normalize": True}, {"weight": 1.0}),
        grid=({"lambda": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)}, {}),
        group="classic",
    ),
)
def task_arithmetic(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: TaskArithmeticParams,
    model_params: Sequence[TaskArithmeticModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """θ0 + λ Σ w_i τ_i: add (or, with negative weights, subtract) task vectors."""
    delta = task_arithmetic_delta(base, experts, params, model_params, ctx)
    return scale_add(base, delta, params.lambda_)
