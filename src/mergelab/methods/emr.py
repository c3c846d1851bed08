"""EMR-Merging: elect one unified task vector, then a binary mask and a rescaler per task.

Huang, Ye, Li, Zhao, Sun, Wang 2024, "EMR-Merging: Tuning-Free High-Performance Model
Merging", NeurIPS, arXiv:2405.17461 (reference code: harveyhuang18/EMR_Merging
``merge_vit/src/main_emr_merging.py``; the same computation in tanganke/fusion_bench
``method/emr_merging/utils.py``).

With τ_i = θ_i − θ0:

1. Elect: γ = sgn(Σ_i τ_i) per element; where the sum is exactly 0 both references use −1
   (``sign_zero: negative``, default); ``sign_zero: zero`` leaves 0 there (sgn(0) = 0, so
   nothing is kept at those elements);
2. τ_uni = γ ⊙ max_i {|τ_i| : τ_i γ > 0} (0 where no task agrees);
3. mask M_i = 1[τ_i ⊙ γ > 0] (a task's zero entries are never in its mask);
4. rescaler λ_i = Σ_tensors mean|τ_i| / Σ_tensors mean|M_i ⊙ τ_uni| (``rescaler:
   tensor_mean``, the reference code: every tensor weighs the same whatever its size) or
   Σ|τ_i| / Σ|M_i ⊙ τ_uni| over every element of the model (``rescaler: l1``, the ratio of
   L1 norms as the paper writes it). Where the denominator is 0 (nothing of task i
   survives) λ_i = 1: the reconstruction is θ0 whatever λ_i;
5. task i at inference: θ̂_i = θ0 + λ_i · (M_i ⊙ τ_uni).

No hyperparameters (the fusion_bench config is empty). Granularity: elementwise masks, one
scalar per task over the whole model: the rescalers need sums over every tensor, so a gather
pass computes them before the merge pass (S2: two reads of the inputs, O(T) memory).

Output (``outputs="routed"``): the shared checkpoint holds θ0 + τ_uni; the per-task parts
are the masks (bit-packed), the rescalers (in the manifest) and θ0, in ``routed/`` (see
:mod:`mergelab.routed`). ``mergelab extract`` rebuilds θ0 + λ_t·M_t ⊙ (shared − θ0). The
in-memory API returns only the shared model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from mergelab.methods.base import (
    Fold,
    MethodCard,
    MethodOutput,
    MethodParams,
    NoParams,
    TensorContext,
)
from mergelab.methods.kernels.tensors import task_vectors, weighted_sum, work_dtype
from mergelab.methods.registry import method

Tensor = torch.Tensor

#: ``ctx.folds`` key of the rescaler pass.
PASS_RESCALE = "emr.rescalers"


class EmrParams(MethodParams):
    sign_zero: Literal["negative", "zero"] = Field(
        "negative",
        description="elected sign where Σ τ_i is exactly 0: negative (−1, the reference code) or "
        "zero (sgn(0) = 0: nothing kept there)",
    )
    rescaler: Literal["tensor_mean", "l1"] = Field(
        "tensor_mean",
        description="λ_i = Σ_tensors mean|τ_i| / Σ_tensors mean|M_i⊙τ_uni| (tensor_mean, the "
        "reference code) or the ratio of model-wide L1 norms (l1, the paper's formula)",
    )


def elect(deltas: Sequence[Tensor], sign_zero: str = "negative") -> tuple[Tensor, list[Tensor]]:
    """(τ_uni, [M_i]) for one tensor's task vectors (in their dtype: float32, or float64; masks bool)."""
    total = weighted_sum(deltas, from_zero=True)
    if sign_zero == "negative":
        gamma = torch.where(total > 0, 1.0, -1.0).to(total.dtype)
    else:
        gamma = torch.sign(total)
    del total
    magnitude = torch.zeros_like(deltas[0])
    masks = []
    for d in deltas:
        agree = (d * gamma) > 0
        masks.append(agree)
        torch.maximum(magnitude, d.abs().masked_fill_(~agree, 0.0), out=magnitude)
    return magnitude.mul_(gamma), masks


def _stat(t: Tensor, rescaler: str) -> float:
    s = float(t.abs().sum(dtype=torch.float64))
    return s / t.numel() if rescaler == "tensor_mean" else s


def _init(params: EmrParams, n: int) -> dict[str, list[list[float]]]:
    return {"num": [[] for _ in range(n)], "den": [[] for _ in range(n)]}


def _update(
    state: dict[str, list[list[float]]],
    base: Tensor,
    experts: Sequence[Tensor],
    params: EmrParams,
    model_params: Sequence[Any],
    ctx: TensorContext,
) -> None:
    if base.numel() == 0:
        return
    deltas = task_vectors(base, experts, dtype=work_dtype(base))
    tau_uni, masks = elect(deltas, params.sign_zero)
    for i, (d, m) in enumerate(zip(deltas, masks)):
        state["num"][i].append(_stat(d, params.rescaler))
        state["den"][i].append(_stat(tau_uni.masked_fill(~m, 0.0), params.rescaler))


def _combine(a: dict[str, list[list[float]]], b: dict[str, list[list[float]]]) -> dict[str, list[list[float]]]:
    """Concatenate per-tensor terms (``a``'s tensors first): the finish sums them in tensor order."""
    return {k: [x + y for x, y in zip(a[k], b[k])] for k in ("num", "den")}


def _ordered_sum(values: Sequence[float]) -> float:
    """Left-to-right float sum from 0.0: the same bits however the terms were folded and combined."""
    total = 0.0
    for v in values:
        total += v
    return total


def _finish(state: dict[str, list[list[float]]], params: EmrParams, n: int) -> list[float]:
    out = []
    for num_terms, den_terms in zip(state["num"], state["den"]):
        num, den = _ordered_sum(num_terms), _ordered_sum(den_terms)
        out.append(num / den if den > 0 else 1.0)
    return out


def emr_passes(params: EmrParams) -> tuple[Fold, ...]:
    return (Fold(PASS_RESCALE, _init, _update, _finish, _combine),)


@method(
    "emr",
    paper="Huang et al. 2024, EMR-Merging: Tuning-Free High-Performance Model Merging, arXiv:2405.17461",
    params=EmrParams,
    model_params=NoParams,
    base="required",
    passes=emr_passes,
    aliases=("emr_merging",),
    outputs="routed",
    card=MethodCard(identity=({}, {}), typical=({}, {}), grid=({}, {}), group="advanced"),
)
def emr(
    base: Tensor,
    experts: Sequence[Tensor],
    params: EmrParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> MethodOutput:
    """Shared θ0 + τ_uni plus per-task masks and rescalers; extract rebuilds θ0 + λ_t M_t ⊙ τ_uni."""
    if PASS_RESCALE not in ctx.folds:
        raise RuntimeError(f"emr: rescaler pass result missing for tensor {ctx.name!r}")
    scales = [float(s) for s in ctx.folds[PASS_RESCALE]]
    deltas = task_vectors(base, experts, dtype=work_dtype(base))
    tau_uni, masks = elect(deltas, params.sign_zero)
    del deltas
    merged = tau_uni.add_(base.to(tau_uni.dtype)).to(base.dtype)
    return MethodOutput(merged, {"base": base, "mask": masks, "scale": scales})
