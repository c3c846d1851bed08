"""Multi-SLERP: barycentric interpolation of several models on the hypersphere.

Goddard 2025, "Multi-SLERP" (blog post multislerp-wow-what-a-cool-idea, the author of mergekit),
mergekit 0.1.5's ``multislerp``, whose recipes run here; it generalises SLERP (Shoemake 1985,
"Animating rotation with quaternion curves", SIGGRAPH '85) to more than two points with one
tangent-space step, a cheaper cousin of the Karcher mean (``karcher``).

For one tensor, x_i (flattened) is model i's tensor, or its task vector θ_i − θ0 when a base is
given; w_i its ``weight`` (divided by Σ w when ``normalize_weights``, the default); ε = ``eps``:

1. onto the unit sphere: r_i = ‖x_i‖, u_i = x_i / (r_i + ε);
2. the tangent point: m = Σ w_i u_i, μ = m / ‖m‖;
3. into the tangent space at μ (orthogonal projection): v_i = u_i − <u_i, μ> μ; v = Σ w_i v_i;
4. back to the sphere (exponential map) and to the mean norm, with s = ‖v‖ + ε:
   x = (Σ w_i r_i) · (cos(s) μ + sin(s) v / s);

the result is x (plus θ0 when a base is given). One model gives that model back unchanged.

What the steps amount to: the tangent point is the direction of m itself, so the projected
tangent vectors sum to v = m − <m, μ> μ = 0 (up to rounding) and the exponential map does not
move: the merge is the normalised weighted mean of the directions, scaled by the weighted mean
norm (times cos ε ≈ 1). That is how mergekit's (its author's) code defines the method and what
this module computes; the geodesic barycentre that the name suggests (the weighted Karcher mean,
which iterates with the logarithmic map) is ``karcher``, which takes mergekit's ``weight`` too.

Edge cases: if ‖m‖ < ε (antipodal directions whose weights cancel, or every x_i zero), two models
fall back to the linear combination w_1 x_1 + w_2 x_2 (+ θ0), as mergekit; with three or more,
mergekit stops with an error, and so does this module, naming the tensor, except when every x_i
is zero (e.g. a tensor no fine-tune changed), where the merge is θ0 (mergekit's error there
stops any merge of ≥ 3 models with an untouched tensor; the linear combination it uses for two
models gives θ0 too). Otherwise as mergekit (no departure); computed in float32 (float64 for
float64 inputs), returned in the inputs' dtype. Granularity: per tensor (one point on the
sphere per model), one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.errors import InputDataError
from mergelab.methods.base import MethodCard, MethodParams, TensorContext
from mergelab.methods.kernels.tensors import work_dtype
from mergelab.methods.registry import method


class MultiSlerpParams(MethodParams):
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0.0, allow_inf_nan=False, description="added to norms before dividing by them")


class MultiSlerpModelParams(MethodParams):
    weight: float = Field(1.0, allow_inf_nan=False, description="weight of this model")


class AntipodalError(ValueError):
    """The weighted mean of the directions vanishes for three or more models."""


def multislerp_tensors(
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    base: torch.Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Multi-SLERP of ``tensors`` (of their task vectors against ``base`` when given), in the work dtype."""
    if len(tensors) != len(weights):
        raise ValueError(f"{len(tensors)} tensors but {len(weights)} weights")
    first = tensors[0]
    if len(tensors) == 1:
        return first.clone()
    dtype = work_dtype(first)
    shape = first.shape
    b = base.to(dtype).reshape(-1) if base is not None else None
    xs = torch.stack([t.to(dtype).reshape(-1) for t in tensors])
    if b is not None:
        xs = xs - b
    w = torch.tensor([float(x) for x in weights], dtype=dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(xs, dim=1)
    units = xs / (norms + eps).unsqueeze(1)
    m = (w.unsqueeze(1) * units).sum(dim=0)
    m_norm = torch.linalg.vector_norm(m)
    if float(m_norm) < eps:
        if len(tensors) == 2 or not bool((norms > 0).any()):
            out = (w.unsqueeze(1) * xs).sum(dim=0)
        else:
            raise AntipodalError(
                "the weighted mean of the models' directions is zero (opposite tensors whose weights cancel): "
                "change the weights"
            )
    else:
        mu = m / m_norm
        tangents = units - (units @ mu).unsqueeze(1) * mu.unsqueeze(0)
        v = (w.unsqueeze(1) * tangents).sum(dim=0)
        s = torch.linalg.vector_norm(v) + eps
        out = (norms * w).sum() * (mu * torch.cos(s) + v * (torch.sin(s) / s))
    if b is not None:
        out = out + b
    return out.reshape(shape)


@method(
    "multislerp",
    paper="Goddard 2025, Multi-SLERP (mergekit's multislerp), after Shoemake 1985, SIGGRAPH '85",
    params=MultiSlerpParams,
    model_params=MultiSlerpModelParams,
    base="optional",
    card=MethodCard(
        identity=({}, {}),  # copies: μ is their direction, no tangent step, the mean norm theirs
        typical=({}, {"weight": 1.0}),
        grid=({}, {}),  # tuning-free with equal weights
        group="advanced",
    ),
)
def multislerp(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    params: MultiSlerpParams,
    model_params: Sequence[MultiSlerpModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Multi-SLERP: the models' weighted mean direction on the sphere times their weighted mean norm."""
    try:
        out = multislerp_tensors(experts, [m.weight for m in model_params], base, params.normalize_weights, params.eps)
    except AntipodalError as exc:
        raise InputDataError(f"multislerp: tensor {ctx.name!r}: {exc}") from None
    return out.to(experts[0].dtype if base is None else base.dtype)
