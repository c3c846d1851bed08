"""NuSLERP: SLERP of two models (or of their task vectors) with weights and vector granularity.

The method of mergekit (Goddard et al. 2024, "Arcee's MergeKit: A Toolkit for Merging Large
Language Models", arXiv:2403.13257; ``nuslerp`` in mergekit 0.1.5), built on Shoemake 1985,
"Animating rotation with quaternion curves", SIGGRAPH '85.

Two non-base models with weights w1, w2 give t = w2 / (w1 + w2) (t = 0.5 when |w1 + w2| < 1e-6).

* Without a base model: θ = slerp(t, θ1, θ2).
* With a base model: θ = θ0 + slerp(t, τ1, τ2), τi = θi − θ0 (SLERP of the task vectors).

slerp(t, a, b) here works on vectors: the whole tensor flattened (``nuslerp_flatten``, the
default), else every vector along the last dimension (``W[i, :]`` of a 2-D weight), or, with
``nuslerp_row_wise``, every vector along the first dimension (``W[:, j]``). Per vector:
c = <a/max(‖a‖, 1e-7), b/max(‖b‖, 1e-7)> clamped to [-1, 1]; if 1 − c² ≤ 1e-16 (exactly
colinear in float32) the result is (1 − t)a + t b, else, with Ω = arccos c,
(sin((1 − t)Ω) a + sin(tΩ) b) / sin Ω. Unlike ``slerp`` there is no 0.9995 lerp threshold, and a
zero vector (e.g. a task vector of a model equal to the base) has c = 0, so it is interpolated
as if orthogonal: the other vector is scaled by sin(tπ/2) or sin((1 − t)π/2). These are mergekit
0.1.5's semantics and parameter names, reproduced exactly. Granularity: per tensor or per row /
column vector (see above), one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, TensorContext
from mergelab.methods.registry import method

COLINEAR_EPS = 1e-8
"""Vectors with 1 − cos² ≤ COLINEAR_EPS² are interpolated linearly."""

NORMALIZE_EPS = 1e-7
"""Lower bound on a norm when normalising a vector."""


class NuSlerpParams(MethodParams):
    nuslerp_flatten: bool = Field(
        True, description="SLERP each tensor as one flattened vector (else per row or column)"
    )
    nuslerp_row_wise: bool = Field(
        False,
        description=(
            "without flatten: SLERP the vectors along the first dimension (W[:, j]) instead of "
            "those along the last (W[i, :])"
        ),
    )


class NuSlerpModelParams(MethodParams):
    weight: float = Field(
        1.0,
        allow_inf_nan=False,
        description="relative weight; t = w2 / (w1 + w2) (0.5 when the weights sum to 0)",
    )


def interpolation_factor(w1: float, w2: float) -> float:
    """t = w2 / (w1 + w2), or 0.5 when the weights (nearly) cancel."""
    total = w1 + w2
    return 0.5 if abs(total) < 1e-6 else w2 / total


def nuslerp_tensors(
    t: float,
    v0: torch.Tensor,
    v1: torch.Tensor,
    *,
    flatten: bool = True,
    row_wise: bool = False,
) -> torch.Tensor:
    """Vector-wise SLERP of two same-shape tensors (see the module docstring); t = 0 gives v0."""
    if v0.shape != v1.shape:
        raise ValueError(f"nuslerp needs tensors of one shape, got {tuple(v0.shape)} and {tuple(v1.shape)}")
    shape = v0.shape
    if flatten or v0.dim() == 0:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1

    unit_a = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=NORMALIZE_EPS)
    unit_b = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=NORMALIZE_EPS)
    cos = (unit_a * unit_b).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    del unit_a, unit_b
    colinear = (1.0 - cos.square()) <= COLINEAR_EPS**2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin_omega = torch.where(colinear, torch.ones_like(cos), torch.sin(omega))
    coef_a = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * omega) / sin_omega)
    coef_b = torch.where(colinear, t, torch.sin(t * omega) / sin_omega)
    out = coef_a * a + coef_b * b

    if row_wise and not flatten and v0.dim() > 0:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@method(
    "nuslerp",
    paper=(
        "mergekit's NuSLERP (Goddard et al. 2024, arXiv:2403.13257), after Shoemake 1985, "
        "Animating rotation with quaternion curves, SIGGRAPH '85"
    ),
    params=NuSlerpParams,
    model_params=NuSlerpModelParams,
    base="optional",
    min_experts=2,
    max_experts=2,
    card=MethodCard(identity=({}, {"weight": 1.0}), typical=({}, {"weight": 1.0})),
)
def nuslerp(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    params: NuSlerpParams,
    model_params: Sequence[NuSlerpModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Weighted SLERP of two models, or of their task vectors added to the base when one is given."""
    if len(experts) != 2:
        raise ValueError(f"nuslerp merges exactly two non-base models, got {len(experts)}")
    t = interpolation_factor(model_params[0].weight, model_params[1].weight)
    first, second = experts
    if base is None:
        return nuslerp_tensors(t, first, second, flatten=params.nuslerp_flatten, row_wise=params.nuslerp_row_wise).to(
            first.dtype
        )
    delta = nuslerp_tensors(
        t,
        first - base,
        second - base,
        flatten=params.nuslerp_flatten,
        row_wise=params.nuslerp_row_wise,
    )
    return (base + delta).to(base.dtype)
