"""SLERP: spherical linear interpolation between the base model and one other model.

Shoemake 1985, "Animating rotation with quaternion curves", SIGGRAPH '85 (Computer Graphics
19(3):245-254); applied to model weights as in mergekit (Goddard et al. 2024, "Arcee's MergeKit:
A Toolkit for Merging Large Language Models", arXiv:2403.13257).

For one tensor, v0 = the base model's tensor and v1 = the other model's, both flattened:

* c = <v0/‖v0‖, v1/‖v1‖>, clamped to [-1, 1]; a norm ≤ ε = 1e-8 is taken as 1 (the vector is
  not normalised, so a zero tensor gives c = 0 and no NaN);
* if |c| > 0.9995 (nearly parallel or antiparallel): θ = (1 − t) v0 + t v1 (lerp);
* else, with Ω = arccos c: θ = sin((1 − t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1, applied to the
  *unnormalised* tensors (so norms are interpolated along with directions).

t = 0 gives the base model, t = 1 the other model: the semantics and the parameter name (``t``,
required, per tensor, so layer gradients and name filters work) of mergekit 0.1.5, whose recipes
run unchanged. Departure: ``t`` must lie in [0, 1] here (mergekit does not check it; outside that
range the formula extrapolates). Granularity: per tensor (whole tensor flattened), one pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, NoParams, TensorContext
from mergelab.methods.registry import method

DOT_THRESHOLD = 0.9995
"""Above this |cos| the two tensors count as colinear and are interpolated linearly."""

NORM_EPS = 1e-8
"""Norms at or below this are not divided by (treated as 1)."""


class SlerpParams(MethodParams):
    t: float = Field(
        ...,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="interpolation factor: 0 gives the base model, 1 the other model",
    )


def slerp_coefficients(t: float, v0: torch.Tensor, v1: torch.Tensor) -> tuple[float, float]:
    """The two scalars (a, b) with slerp(t, v0, v1) = a·v0 + b·v1, both tensors flattened."""
    if v0.numel() == 0:
        return 1.0 - t, t
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    norm_a = float(torch.linalg.vector_norm(a))
    norm_b = float(torch.linalg.vector_norm(b))
    if not norm_a > NORM_EPS:
        norm_a = 1.0
    if not norm_b > NORM_EPS:
        norm_b = 1.0
    cos = float(torch.dot(a, b)) / norm_a / norm_b
    cos = min(1.0, max(-1.0, cos))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two same-shape tensors (flattened); t = 0 gives ``v0``."""
    if v0.shape != v1.shape:
        raise ValueError(f"slerp needs tensors of one shape, got {tuple(v0.shape)} and {tuple(v1.shape)}")
    coef_a, coef_b = slerp_coefficients(t, v0, v1)
    return (v0 * coef_a).add_(v1, alpha=coef_b)


@method(
    "slerp",
    paper=(
        "Shoemake 1985, Animating rotation with quaternion curves, SIGGRAPH '85; "
        "as in mergekit, Goddard et al. 2024, arXiv:2403.13257"
    ),
    params=SlerpParams,
    model_params=NoParams,
    base="required",
    min_experts=1,
    max_experts=1,
    card=MethodCard(identity=({"t": 1.0}, {}), typical=({"t": 0.3}, {})),
)
def slerp(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: SlerpParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Spherical interpolation from the base (t = 0) to the other model (t = 1), per tensor."""
    if len(experts) != 1:
        raise ValueError(f"slerp merges the base with exactly one other model, got {len(experts)}")
    return slerp_tensors(params.t, base, experts[0]).to(base.dtype)
