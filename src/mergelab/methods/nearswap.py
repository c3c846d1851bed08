"""NearSwap: take the other model's value where it is already near the base's.

alchemonaut 2024, the model card of QuartetAnemoi-70B-t0.0001 (the "NearSwap Algorithm" section,
with its reference code), the origin of mergekit 0.1.5's ``nearswap``, whose recipes run here.

For one tensor with base θ0 and the other model θ1, element by element, d = |θ0 − θ1| and

    w = clip(t / d, 0, 1),    θ = θ0 + w (θ1 − θ0)    (= (1 − w) θ0 + w θ1)

so an entry within ``t`` of the base takes the other model's value, and one further away moves
towards it by t / d (its change is at most t in magnitude: |θ − θ0| = min(d, t)). Where d = 0 the
weight is 1 (the values agree); ``t: 0`` gives the base. The model card's models apply it once
per secondary model, sequentially; a recipe merges one (chain recipes for more).

Departure from mergekit, kept as an option: mergekit divides by max(d, 10⁻⁶), so an entry closer
than 10⁻⁶ to the base gets weight t / 10⁻⁶ instead of t / d (a change of at most 10⁻⁶ of the
entry); ``diff_floor: 1.0e-6`` gives mergekit's rule, the default 0 divides by d as the model
card's code does (where d = 0 both give the base's value). mergekit refuses ``t ≤ 0`` in older
releases and accepts it in 0.1.5 (the base). Computed in float32 (float64 for float64 inputs),
returned in the base's dtype. Granularity: per element, one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, NoParams, TensorContext
from mergelab.methods.kernels.tensors import work_dtype
from mergelab.methods.registry import method


class NearSwapParams(MethodParams):
    t: float = Field(
        ...,
        ge=0.0,
        allow_inf_nan=False,
        description="sameness threshold: entries within t of the base take the other model's value",
    )
    diff_floor: float = Field(
        0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="divide by max(|θ0 − θ1|, diff_floor) (mergekit: 1e-6; 0: the model card's exact t / d)",
    )


def nearswap_weight(base: torch.Tensor, other: torch.Tensor, t: float, diff_floor: float = 0.0) -> torch.Tensor:
    """w = clip(t / max(|base − other|, diff_floor), 0, 1), with w = 1 where the divisor is 0."""
    d = (base - other).abs()
    if diff_floor > 0:
        d = d.clamp(min=diff_floor)
    if t == 0:
        return torch.where(d == 0, 1.0, 0.0).to(d.dtype)
    w = (t / d).clamp(max=1.0)  # t / 0 = inf -> 1
    return w


def nearswap_tensors(base: torch.Tensor, other: torch.Tensor, t: float, diff_floor: float = 0.0) -> torch.Tensor:
    """θ0 + w (θ1 − θ0) in the work dtype of ``base``."""
    dtype = work_dtype(base)
    b = base.to(dtype)
    o = other.to(dtype)
    return b + nearswap_weight(b, o, t, diff_floor) * (o - b)


@method(
    "nearswap",
    paper="alchemonaut 2024, NearSwap (model card of QuartetAnemoi-70B-t0.0001); as mergekit's nearswap",
    params=NearSwapParams,
    model_params=NoParams,
    base="required",
    min_experts=1,
    max_experts=1,
    card=MethodCard(
        identity=({"t": 1.0e6}, {}),  # every entry within t: the other model's values
        typical=({"t": 0.01}, {}),  # two-model method (as slerp): not benchmarked on its own
    ),
)
def nearswap(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: NearSwapParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Interpolate to the other model by clip(t / abs(θ0 − θ1), 0, 1): near entries swap, far ones barely move."""
    if len(experts) != 1:
        raise ValueError(f"nearswap merges exactly one model into the base, got {len(experts)}")
    return nearswap_tensors(base, experts[0], params.t, params.diff_floor).to(base.dtype)
