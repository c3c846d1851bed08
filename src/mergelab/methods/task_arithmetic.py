"""Task arithmetic: add scaled task vectors to the base; a negative weight unlearns.

Ilharco et al. 2023, "Editing Models with Task Arithmetic", ICLR, arXiv:2212.04089.
θ = θ0 + λ · Σ_i w_i τ_i with τ_i = θ_i − θ0 (divided by Σ_i w_i when ``normalize``).
Granularity: per tensor (elementwise), one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodParams, TensorContext
from mergelab.methods.registry import method


class TaskArithmeticParams(MethodParams):
    lambda_: float = Field(
        1.0, alias="lambda", allow_inf_nan=False, description="scale of the summed task vectors"
    )
    normalize: bool = Field(False, description="divide the weighted sum by the sum of weights")


class TaskArithmeticModelParams(MethodParams):
    weight: float = Field(
        1.0, allow_inf_nan=False, description="weight of this task vector (negative: negation)"
    )
    density: float = Field(
        1.0, ge=1.0, le=1.0,
        description="accepted (only as 1) so mergekit recipes run: task arithmetic does not sparsify; use ties or dare_linear",
    )


def weighted_task_vector_sum(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    weights: Sequence[float],
) -> torch.Tensor:
    """Σ_i w_i (θ_i − θ0), computed as Σ_i w_i θ_i − (Σ_i w_i) θ0 in one buffer (no temporaries)."""
    total = torch.mul(experts[0], weights[0])
    for expert, w in zip(experts[1:], weights[1:]):
        total.add_(expert, alpha=w)
    return total.sub_(base, alpha=sum(weights))


@method(
    "task_arithmetic",
    paper="Ilharco et al. 2023, Editing Models with Task Arithmetic, arXiv:2212.04089",
    params=TaskArithmeticParams,
    model_params=TaskArithmeticModelParams,
    base="required",
)
def task_arithmetic(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: TaskArithmeticParams,
    model_params: Sequence[TaskArithmeticModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """θ0 + λ Σ w_i τ_i: add (or, with negative weights, subtract) task vectors."""
    weights = [m.weight for m in model_params]
    delta = weighted_task_vector_sum(base, experts, weights)
    if params.normalize:
        denom = sum(weights)
        if abs(denom) < 1e-12:
            raise ValueError("normalize=true needs weights that do not sum to zero")
        delta.div_(denom)
    return delta.mul_(params.lambda_).add_(base)
