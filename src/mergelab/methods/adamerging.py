"""AdaMerging: task-arithmetic coefficients learned by test-time entropy minimisation.

Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR,
arXiv:2310.02575; reference code EnnengYang/AdaMerging (``main_task_wise_adamerging.py``,
``main_layer_wise_adamerging.py``).

    θ = θ0 + Σ_i λ_i τ_i   (task-wise: one λ_i per expert; layer-wise: one λ_{i,k} per expert and tensor k)

The coefficients are learned by the data phase (:mod:`mergelab.informed.adamerging`): initialised
at ``init`` (0.3), clamped to [0, 1] in the forward pass (``clamp``, as the paper's code; fusion_bench
leaves them unclamped by default), Adam with ``lr`` 1e-3, betas (0.9, 0.999), for ``steps`` (500)
steps, each summing over tasks the mean Shannon entropy of the merged model's predictions on
``batches_per_step`` (2) batches of that task's unlabeled inputs (the paper: its test inputs),
with the task's own classification head (or, for causal LMs, the next-token distributions at
real positions). The merge below applies the learned λ (``lambda`` statistics) tensor by tensor.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, TensorContext
from mergelab.methods.registry import method


class AdaMergingParams(MethodParams):
    granularity: Literal["task", "layer"] = Field(
        "layer", description="data phase: one λ per expert (task) or per expert and tensor (layer)"
    )
    steps: int = Field(500, ge=0, description="data phase: Adam steps (paper: 500)")
    lr: float = Field(1e-3, gt=0.0, allow_inf_nan=False, description="data phase: Adam learning rate")
    init: float = Field(0.3, allow_inf_nan=False, description="data phase: initial λ")
    clamp: bool = Field(True, description="data phase: clamp λ to [0, 1] in the forward pass (paper's code)")
    batches_per_step: int = Field(2, ge=1, description="data phase: batches per task per step (paper's code: 2)")


@method(
    "adamerging",
    paper="Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning, arXiv:2310.02575",
    params=AdaMergingParams,
    base="required",
    statistics="adamerging",
    card=MethodCard(
        identity=({}, {}),  # with coefficients summing to 1 (tests/informed/test_contracts.py)
        group="informed",
        # the paper reports task- and layer-wise AdaMerging side by side: two benchmark rows
        variants={"adamerging_task": {"granularity": "task"}, "adamerging_layer": {"granularity": "layer"}},
    ),
)
def adamerging(base, experts, params: AdaMergingParams, model_params, ctx: TensorContext) -> torch.Tensor:
    """θ0 + Σ λᵢ τᵢ with λ learned by minimising prediction entropy on unlabeled data (task- or layer-wise)."""
    aux = list(ctx.statistics) if ctx.statistics else []
    if len(aux) != len(experts) or not all("lambda" in a for a in aux):
        raise ValueError("adamerging needs the learned coefficients (`lambda` statistics) of every expert")
    out = base.clone()
    for e, a in zip(experts, aux):
        out.add_(e - base, alpha=float(a["lambda"]))
    return out
