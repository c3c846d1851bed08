"""Linear merge (weight averaging, "model soup").

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML, arXiv:2203.05482.
θ = Σ_i w_i θ_i / Σ_i w_i (``normalize``, the default) or Σ_i w_i θ_i. The base is ignored:
list it under ``models`` to include it in the average. Granularity: per tensor, one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, TensorContext
from mergelab.methods.kernels.tensors import weighted_sum
from mergelab.methods.registry import method


class LinearParams(MethodParams):
    normalize: bool = Field(True, description="divide by the sum of weights")


class LinearModelParams(MethodParams):
    weight: float = Field(1.0, allow_inf_nan=False, description="weight of this model")


@method(
    "linear",
    paper="Wortsman et al. 2022, Model soups, arXiv:2203.05482",
    params=LinearParams,
    model_params=LinearModelParams,
    base="ignored",
    aliases=("average", "model_soup"),
    card=MethodCard(identity=({}, {"weight": 1.0}), grid=({}, {}), group="classic"),
)
def linear(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    params: LinearParams,
    model_params: Sequence[LinearModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Weighted average of the models' weights (a model soup)."""
    weights = [m.weight for m in model_params]
    out = weighted_sum(experts, weights, from_zero=True)
    if params.normalize:
        denom = sum(weights)
        if abs(denom) < 1e-12:
            raise ValueError("normalize=true needs weights that do not sum to zero")
        out.div_(denom)
    return out
