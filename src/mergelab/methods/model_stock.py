"""Model Stock: move from the base towards the experts' mean by a ratio set by their angle.

Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
arXiv:2403.19522.

Per tensor (or, with ``filter_wise``, per vector along the last dimension: per row ``W[i, :]`` of
a 2-D weight, the whole vector for a 1-D one), with N ≥ 2 experts and task vectors
τi = θi − θ0:

* cos = mean over pairs i < j of cos(τi, τj) (the paper assumes one common angle; averaging the
  pairwise cosines for N > 2 follows mergekit);
* t = N cos / (1 + (N − 1) cos);
* θ = t · mean_i(θi) + (1 − t) · θ0.

Edge cases:

* A pair with a zero task vector has cos = 0 (the angle is undefined); all task vectors zero
  gives the base.
* Where 1 + (N − 1) cos is within 1e-6 of 0 (e.g. N = 2 and τ2 = −τ1) the ratio is undefined;
  the base is kept (t = 0), as mergekit does.
* A negative cos gives t < 0 (or t > 1 when cos < −1/(N − 1)), as in the paper's formula and in
  mergekit; ``clamp_cos: true`` clamps cos to [0, 1] first so that t ∈ [0, 1] (negative
  agreement then keeps the base).

Departure from mergekit 0.1.5 (a difference that matters for small task vectors): mergekit
divides each dot product by max(‖τi‖‖τj‖, 1e-6), which shrinks the cosine, and with it t,
towards 0 whenever ‖τi‖‖τj‖ < 1e-6 (task-vector norms below about 1e-3, common for norm and
bias vectors of lightly fine-tuned models): two identical small task vectors then give t ≈ 0
(the base) instead of t = 1 (the expert). Here the cosine is exact, as in the paper.
``norm_product_floor: 1e-6`` restores mergekit's results. (The paper's own code adds 1e-8 to
the norm product, which has the same effect at norm products below about 1e-7.)
Granularity: per tensor, or per last-dimension vector with ``filter_wise``; one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, NoParams, TensorContext
from mergelab.methods.kernels import chunks
from mergelab.methods.registry import method

SINGULAR_EPS = 1e-6
"""Where |1 + (N − 1) cos| is below this, t = 0 (the base is kept)."""


class ModelStockParams(MethodParams):
    filter_wise: bool = Field(
        False,
        description=(
            "one ratio per vector along the last dimension (per row of a 2-D weight) instead of one per tensor"
        ),
    )
    norm_product_floor: float = Field(
        0.0,
        ge=0.0,
        allow_inf_nan=False,
        description=(
            "lower bound on ‖τi‖·‖τj‖ in each cosine; 0 = exact cosine (paper), "
            "1e-6 = mergekit 0.1.5 (shrinks t of small task vectors towards 0)"
        ),
    )
    clamp_cos: bool = Field(
        False,
        description="clamp the mean cosine to [0, 1] so that t stays in [0, 1] (paper, mergekit: off)",
    )


def interpolation_ratio(cos: torch.Tensor, n: int, clamp_cos: bool = False) -> torch.Tensor:
    """t = N cos / (1 + (N − 1) cos); 0 where the denominator vanishes."""
    if clamp_cos:
        cos = cos.clamp(0.0, 1.0)
    denom = 1.0 + (n - 1) * cos
    singular = denom.abs() < SINGULAR_EPS
    safe = torch.where(singular, torch.ones_like(denom), denom)
    return torch.where(singular, torch.zeros_like(cos), n * cos / safe)


@method(
    "model_stock",
    paper=(
        "Jang, Yun & Han 2024, Model Stock: All we need is just a few fine-tuned models, ECCV 2024, arXiv:2403.19522"
    ),
    params=ModelStockParams,
    model_params=NoParams,
    base="required",
    min_experts=2,
    card=MethodCard(identity=({}, {}), grid=({}, {}), group="classic"),
)
def model_stock(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: ModelStockParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Interpolate base → experts' mean with t = N cos / (1 + (N − 1) cos) from their angle."""
    n = len(experts)
    if n < 2:
        raise ValueError(f"model_stock needs at least two experts besides the base, got {n}")
    shape = base.shape
    if base.numel() == 0:
        return base.clone()
    if params.filter_wise and base.dim() >= 1:
        n_cols = shape[-1]
        w0 = base.reshape(-1, n_cols)
        ws = [e.reshape(-1, n_cols) for e in experts]
    else:
        w0 = base.reshape(1, -1)
        ws = [e.reshape(1, -1) for e in experts]

    dots, norms = _delta_products(w0, ws)
    cos = cosine_from_products(dots, norms, params.norm_product_floor)
    t = interpolation_ratio(cos, n, params.clamp_cos).unsqueeze(-1).to(w0.dtype)  # lerp needs one dtype

    out = torch.empty_like(w0)
    scratch = torch.empty(0, dtype=w0.dtype, device=w0.device)
    for rows, cols in _blocks(w0.shape):
        mean = scratch.resize_(w0[rows, cols].shape)  # Σ_i θ_i / N, one block at a time
        torch.add(ws[0][rows, cols], ws[1][rows, cols], out=mean)
        for w in ws[2:]:
            mean.add_(w[rows, cols])
        mean.div_(n)
        torch.lerp(w0[rows, cols], mean, t[rows], out=out[rows, cols])  # t·mean + (1 − t)·θ0
    return out.reshape(shape).to(base.dtype)


def _blocks(shape: torch.Size) -> list[tuple[slice, slice]]:
    """(row, column) slices covering an R × C tensor in blocks of about CHUNK entries: whole
    rows when R > 1, column ranges of the single row otherwise."""
    r, c = shape
    if r == 1:
        return [(slice(0, 1), sl) for sl in chunks.flat_chunks(c)]
    per = max(1, chunks.CHUNK // max(c, 1))
    return [(slice(i, min(r, i + per)), slice(0, c)) for i in range(0, r, per)]


def _delta_products(
    w0: torch.Tensor, ws: Sequence[torch.Tensor]
) -> tuple[dict[tuple[int, int], torch.Tensor], list[torch.Tensor]]:
    """Row-wise ⟨τi, τj⟩ (i < j) and ‖τi‖, accumulated block by block in float64, so that no
    tensor-sized task vector is ever held."""
    n, rows = len(ws), w0.shape[0]
    acc = torch.zeros((n * (n + 1)) // 2, rows, dtype=torch.float64, device=w0.device)
    pairs = [(i, j) for i in range(n) for j in range(i, n)]
    for r, c in _blocks(w0.shape):
        base = w0[r, c]
        deltas = [w[r, c] - base for w in ws]
        for k, (i, j) in enumerate(pairs):
            acc[k, r] += torch.linalg.vecdot(deltas[i], deltas[j], dim=-1).double()
    products = dict(zip(pairs, acc))
    norms = [products[(i, i)].clamp(min=0).sqrt() for i in range(n)]
    return {(i, j): v for (i, j), v in products.items() if i < j}, norms


def cosine_from_products(
    dots: dict[tuple[int, int], torch.Tensor], norms: Sequence[torch.Tensor], norm_product_floor: float = 0.0
) -> torch.Tensor:
    """Mean over pairs i < j of ⟨τi, τj⟩ / (‖τi‖ ‖τj‖) (float32). A zero vector has cosine 0 with
    everything; with ``norm_product_floor`` > 0 each dot product is divided by
    max(‖a‖‖b‖, floor) instead (mergekit's rule). Dividing one norm at a time keeps
    |dot / ‖a‖| ≤ ‖b‖, so nothing under- or overflows."""
    cosines = []
    for (i, j), dot in dots.items():
        if norm_product_floor > 0:
            cos = dot / (norms[i] * norms[j]).clamp(min=norm_product_floor)
        else:
            nonzero = (norms[i] > 0) & (norms[j] > 0)
            safe_i = torch.where(nonzero, norms[i], torch.ones_like(norms[i]))
            safe_j = torch.where(nonzero, norms[j], torch.ones_like(norms[j]))
            cos = torch.where(nonzero, dot / safe_i / safe_j, torch.zeros_like(dot))
        cosines.append(cos.clamp(-1.0, 1.0))
    return torch.stack(cosines).mean(dim=0).float()
