"""RegMean and RegMean++: per linear layer, the weight that best reproduces every expert's outputs
on its own inputs.

Jin, Ren, Preotiuc-Pietro, Cheng 2023, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR, arXiv:2212.09849. Nguyen et al. 2025, "RegMean++", arXiv:2508.03121.

For a linear layer with weight W (out × in) and Gram matrices G_i = X_iᵀX_i of its inputs under
expert i on task i's data, W minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², whose closed form is

    Wᵀ = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ,   G̃_i = w_i (α G_i + (1 − α) diag(G_i))

(GPT-2 ``Conv1D`` stores W as in × out already: the ``in_out`` statistic says so). α is
``reduce_non_diagonal_ratio``: off-diagonal entries are multiplied by α, the diagonal kept. Every
other tensor (biases, norms, embeddings) is the w-weighted average, or with ``nonlinear:
task_arithmetic`` θ0 + λ Σ w_i τ_i (needs a base).

Statistics: ``gram`` (Σ over rows of x xᵀ, float32) and ``rows`` per expert from the data phase
(:mod:`mergelab.informed.gram`); ``gram: mean`` (default, as every reference) divides each by its
row count, ``sum`` does not (the two differ when experts saw different numbers of rows).

Solve: float64 Cholesky of Σ G̃ (+ δI, δ = ``ridge`` × mean diagonal, with δ W̄ added on the
right so that directions no expert's data excites keep the weighted average W̄ instead of going
to zero). When Σ G̃ is singular and ``ridge`` is 0 the solve is retried with ridge 1e-6; an
all-zero Σ G̃ (the layer never ran) gives W̄. The references invert in float32 (``torch.inverse``).

Defaults: α = 0.9 (the issue's choice; the paper tunes α on validation data; the original code
applies no shrink unless configured, fusion_bench uses 0.1 for language models and 0.95 for CLIP,
MergeLM 1.0); 256 examples per expert (fusion_bench; the original's GLUE configs 1000).

RegMean++ (``regmean_plusplus``) differs only in the data phase: the inputs of block ℓ come from
the already-merged blocks 0..ℓ−1 (expert i's block ℓ then runs on them), so the phase merges the
blocks one after another while it collects (:mod:`mergelab.informed.regmean_pp`); it stores the
Grams it used and the merge pass below recomputes exactly the weights it merged with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, TensorContext
from mergelab.methods.registry import method

Tensor = torch.Tensor


class RegMeanParams(MethodParams):
    reduce_non_diagonal_ratio: float = Field(
        0.9,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="α: off-diagonal Gram entries multiplied by α, the diagonal kept (1: exact RegMean)",
    )
    gram: Literal["mean", "sum"] = Field(
        "mean", description="mean: each Gram divided by its number of input rows (references); sum: raw XᵀX"
    )
    nonlinear: Literal["average", "task_arithmetic"] = Field(
        "average", description="tensors without a Gram (biases, norms, embeddings): weighted average, or θ0 + λ Σ w τ"
    )
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="λ of nonlinear: task_arithmetic")
    ridge: float = Field(
        0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="δ/mean(diag ΣG̃): solve (ΣG̃ + δI)Wᵀ = ΣG̃ᵢWᵢᵀ + δW̄ᵀ (pulls unseen directions to the average)",
    )


class RegMeanModelParams(MethodParams):
    weight: float = Field(
        1.0, gt=0.0, allow_inf_nan=False, description="w_i: scales this expert's Gram and average weight"
    )


def _as_in_out(w: Tensor, in_out: bool) -> Tensor:
    return w if in_out else w.transpose(0, 1)


def regmean_solve(
    weights: Sequence[Tensor],
    grams: Sequence[Tensor],
    *,
    alpha: float = 1.0,
    coeffs: Sequence[float] | None = None,
    rows: Sequence[float] | None = None,
    in_out: bool = False,
    ridge: float = 0.0,
) -> Tensor:
    """The RegMean weight from expert weights and Gram matrices (float64 solve, input dtype out).

    ``rows`` (one count per expert) divides each Gram by its count; ``coeffs`` scale the Grams.
    """
    coeffs = list(coeffs) if coeffs is not None else [1.0] * len(weights)
    dtype = weights[0].dtype
    wt = [_as_in_out(w, in_out).double() for w in weights]  # in × out
    s: Tensor | None = None
    r: Tensor | None = None
    for i, (g, w, c) in enumerate(zip(grams, wt, coeffs)):
        gg = g.double()
        if rows is not None:
            gg = gg / max(float(rows[i]), 1.0)
        if alpha != 1.0:
            diag = gg.diagonal().clone()
            gg = gg * alpha
            gg.diagonal().copy_(diag)
        gg = gg * c
        s = gg if s is None else s + gg
        gw = gg @ w
        r = gw if r is None else r + gw
    assert s is not None and r is not None
    total = sum(coeffs)
    avg = cast(Tensor, sum(c * w for c, w in zip(coeffs, wt)) / total)  # a sum of tensors
    scale = float(s.diagonal().mean()) if s.numel() else 0.0
    if scale <= 0.0:  # the layer never saw an input
        return _as_in_out(avg, in_out).to(dtype)
    for delta in [ridge] if ridge > 0 else [0.0, 1e-6]:
        a = s + (delta * scale) * torch.eye(s.shape[0], dtype=s.dtype, device=s.device) if delta else s
        b = r + (delta * scale) * avg if delta else r
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            out = torch.cholesky_solve(b, chol)
            if bool(torch.isfinite(out).all()):
                return _as_in_out(out, in_out).to(dtype)
    raise ValueError(
        "the summed Gram matrix is singular even with a ridge of 1e-6; set `ridge` (e.g. 1e-4) "
        "or reduce_non_diagonal_ratio < 1"
    )


def _nonlinear(
    base: Tensor | None, experts: Sequence[Tensor], coeffs: Sequence[float], params: RegMeanParams
) -> Tensor:
    if params.nonlinear == "task_arithmetic":
        if base is None:
            raise ValueError("nonlinear: task_arithmetic needs a base_model")
        delta = sum(c * (e - base) for c, e in zip(coeffs, experts))
        return base + params.lambda_ * delta
    total = sum(coeffs)
    out = torch.mul(experts[0], coeffs[0] / total)
    for e, c in zip(experts[1:], coeffs[1:]):
        out.add_(e, alpha=c / total)
    return out


def regmean_tensor(base, experts, params: RegMeanParams, model_params, ctx: TensorContext) -> Tensor:
    coeffs = [m.weight for m in model_params]
    aux = list(ctx.statistics) if ctx.statistics else [{} for _ in experts]
    have = [("gram" in a) for a in aux]
    if not any(have) or experts[0].dim() != 2:
        return _nonlinear(base, experts, coeffs, params)
    if not all(have):
        missing = [i for i, h in enumerate(have) if not h]
        raise ValueError(f"Gram statistics missing for expert(s) {missing} (present for the others)")
    in_out = bool(float(aux[0].get("in_out", torch.zeros(())).item()))
    rows = [float(a["rows"]) for a in aux] if params.gram == "mean" and all("rows" in a for a in aux) else None
    if params.gram == "mean" and rows is None:
        raise ValueError("gram: mean needs the `rows` statistic beside each Gram")
    d_in = experts[0].shape[0] if in_out else experts[0].shape[1]
    for a in aux:
        if tuple(a["gram"].shape) != (d_in, d_in):
            raise ValueError(f"Gram of shape {list(a['gram'].shape)} for a weight with {d_in} inputs")
    return regmean_solve(
        experts,
        [a["gram"] for a in aux],
        alpha=params.reduce_non_diagonal_ratio,
        coeffs=coeffs,
        rows=rows,
        in_out=in_out,
        ridge=params.ridge,
    )


@method(
    "regmean",
    paper=(
        "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean), arXiv:2212.09849"
    ),
    params=RegMeanParams,
    model_params=RegMeanModelParams,
    base="optional",
    statistics="gram",
    card=MethodCard(
        identity=({}, {}),  # with any Grams (tests/informed/test_contracts.py)
        grid=({"reduce_non_diagonal_ratio": (0.1, 0.5, 0.9, 0.95, 1.0)}, {}),
        group="informed",
    ),
)
def regmean(base, experts, params, model_params, ctx):
    """Per linear layer, (Σ G̃ᵢ)⁻¹ Σ G̃ᵢ Wᵢ from the Grams of each expert's inputs; other tensors averaged."""
    return regmean_tensor(base, experts, params, model_params, ctx)


@method(
    "regmean_plusplus",
    paper="Nguyen et al. 2025, RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for Model "
    "Merging, arXiv:2508.03121",
    params=RegMeanParams,
    model_params=RegMeanModelParams,
    base="optional",
    statistics="gram_plusplus",
    aliases=("regmean++",),
    card=MethodCard(
        identity=({}, {}),
        grid=({"reduce_non_diagonal_ratio": (0.5, 0.9, 0.95)}, {}),
        group="informed",
    ),
)
def regmean_plusplus(base, experts, params, model_params, ctx):
    """RegMean with each block's inputs taken from the merged previous blocks (merged block by block)."""
    return regmean_tensor(base, experts, params, model_params, ctx)
