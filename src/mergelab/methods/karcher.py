"""Karcher mean: the Riemannian (Fréchet) mean of the models' weight tensors on the unit sphere.

Wang, Ye & Yin 2026, "Functionality-Oriented LLM Merging on the Fisher–Rao Manifold",
arXiv:2603.04972: merging as a weighted Karcher mean on the Fisher–Rao manifold, computed with a
spherical proxy that keeps norms (their code is mergekit 0.1.5's ``karcher``, whose recipes run
unchanged). The mean itself: Karcher 1977, "Riemannian center of mass and mollifier smoothing",
Comm. Pure Appl. Math. 30(5):509-541; on the sphere, with its fixed-point iteration: Buss &
Fillmore 2001, "Spherical averages and applications to spherical splines and interpolation",
ACM TOG 20(2):95-126.

For one tensor, each model's tensor x_i (flattened) is split into its norm r_i = ‖x_i‖ and its
direction u_i = x_i / r_i, a point on the unit sphere. With weights a_i = w_i / Σ_j w_j
(``weight``, equal by default), the direction of the merge is the weighted Karcher mean

    μ = argmin_{‖μ‖=1} Σ_i a_i d(μ, u_i)²,    d(μ, u) = arccos <μ, u> (the geodesic distance),

found by Riemannian gradient descent with unit step from the normalised Euclidean mean: with
θ_i = arccos <μ, u_i>, the mean of the log maps v = Σ_i a_i θ_i / sin θ_i (u_i − cos θ_i μ) is
the negative gradient; step along the great circle μ ← cos‖v‖ μ + sin‖v‖ v/‖v‖, renormalise,
stop when ‖v‖ < ``tol`` or after ``max_iter`` steps. The merged tensor is (Σ_i a_i r_i) μ:
the mean direction scaled by the mean norm.

Edge cases (as mergekit): directions of models whose norm is ≤ ``tol`` are left out of the
mean (their weight is shared among the others; their norm still counts in the scale); a model
within ``tol`` radians of μ adds nothing to v; if the Euclidean mean of the directions has a
norm < ``tol`` (opposite directions) the iteration starts from the first kept direction; if
every norm is ≤ ``tol`` the result is zero. One model gives that model back.

The paper's mean is weighted; mergekit's method weighs every model equally and takes no
``weight``: with the default weights (all 1.0) this is mergekit's computation. Departure from
mergekit: it computes in the recipe dtype (bfloat16 directions for a bfloat16 merge), this
module in float32 (float64 for float64 inputs), returning the inputs' dtype. The base is
ignored: list it under ``models`` to include it. Granularity: per tensor (the whole tensor is
one point on the sphere), one pass; at most ``max_iter`` tensor-sized steps per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, TensorContext
from mergelab.methods.registry import method


class KarcherParams(MethodParams):
    max_iter: int = Field(10, ge=0, description="most gradient steps on the sphere")
    tol: float = Field(
        1e-5,
        gt=0,
        allow_inf_nan=False,
        description="stop when the step is shorter; also the norm below which a model's direction is left out",
    )


class KarcherModelParams(MethodParams):
    weight: float = Field(1.0, ge=0, allow_inf_nan=False, description="weight of this model (normalised to sum 1)")


def karcher_mean(
    tensors: Sequence[torch.Tensor], weights: Sequence[float], max_iter: int = 10, tol: float = 1e-5
) -> torch.Tensor:
    """The weighted Karcher mean of ``tensors`` on the unit sphere, scaled by their weighted mean norm.

    ``weights`` are normalised to sum 1. The result has the tensors' shape and dtype.
    """
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("karcher needs weights with a positive sum")
    first = tensors[0]
    if len(tensors) == 1:
        return first.clone()
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    alphas = [float(w) / total for w in weights]
    flat = [t.reshape(-1).to(dtype) for t in tensors]
    norms = [torch.linalg.vector_norm(x) for x in flat]
    kept = [i for i, r in enumerate(norms) if float(r) > tol and alphas[i] > 0]
    if not kept:
        return torch.zeros_like(first)
    kept_sum = sum(alphas[i] for i in kept)
    a = [alphas[i] / kept_sum for i in kept]
    units = [flat[i] / norms[i] for i in kept]

    mu = torch.zeros_like(units[0])
    for ai, u in zip(a, units, strict=True):
        mu.add_(u, alpha=ai)
    mu_norm = torch.linalg.vector_norm(mu)
    mu = units[0].clone() if float(mu_norm) < tol else mu / mu_norm

    for _ in range(max_iter):
        v = torch.zeros_like(mu)
        for ai, u in zip(a, units, strict=True):
            cos = torch.clamp(torch.dot(mu, u), -1.0, 1.0)
            theta = torch.arccos(cos)
            if float(theta) < tol:
                continue
            v.add_((u - cos * mu) * (ai * theta / torch.sin(theta)))
        step = torch.linalg.vector_norm(v)
        if float(step) < tol:
            break
        mu = torch.cos(step) * mu + torch.sin(step) * (v / step)
        mu_norm = torch.linalg.vector_norm(mu)
        if float(mu_norm) > tol:
            mu = mu / mu_norm

    scale = sum(ai * r for ai, r in zip(alphas, norms, strict=True))
    return (scale * mu).reshape(first.shape).to(first.dtype)


@method(
    "karcher",
    paper="Wang et al. 2026, Functionality-Oriented LLM Merging on the Fisher–Rao Manifold, arXiv:2603.04972; "
    "Karcher 1977",
    params=KarcherParams,
    model_params=KarcherModelParams,
    base="ignored",
    card=MethodCard(
        identity=({}, {}),  # copies of one tensor: μ is its direction, the mean norm its norm
        typical=({"max_iter": 20, "tol": 1e-6}, {}),
        grid=({}, {}),  # tuning-free (max_iter and tol only control convergence)
        group="advanced",
    ),
)
def karcher(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    params: KarcherParams,
    model_params: Sequence[KarcherModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Riemannian (Karcher) mean of the weight tensors' directions on the sphere, times their mean norm."""
    return karcher_mean(experts, [m.weight for m in model_params], params.max_iter, params.tol)
