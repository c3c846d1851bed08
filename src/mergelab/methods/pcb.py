"""PCB-merging: score every task-vector entry by its importance within its task (intra-balancing)
and its agreement with the other tasks (inter-balancing), drop low scores, merge by the scores.

Du, Lee, Li, Jiang, Guo, Yu, Liu, Goh, Tang, He, Zhang 2024, "Parameter Competition Balancing
for Model Merging", NeurIPS 2024, arXiv:2410.02396.

On a *row* (one expert's task vector τ_i flattened; T experts):

1. Clip: |τ_i| clamped to [sorted(|τ_i|)[⌊d·q⌋], sorted(|τ_i|)[⌊d(1 − q) − 1⌋]]
   (d = row length, q = ``clip_ratio``); τ̄_i = sign(τ_i) · clipped |τ_i|.
2. Intra-balancing: β_intra,i = exp(T · N(|τ̄_i|)²), N = min–max normalisation over the row.
3. Inter-balancing (``inter``):
   ``pairwise`` β_inter,i = Σ_j tanh(ñ_i ⊙ ñ_j), ñ_j = sign(τ_j) · N(|τ̄_j|);
   ``summed``   β_inter,i = tanh(τ_i ⊙ Σ_j τ_j) (raw, unclipped task vectors).
4. β_i = β_intra,i ⊙ β_inter,i.
5. Drop and normalise: values of β_i below its (1 − r)-quantile sorted(β_i)[⌊d(1 − r)⌋] are raised
   to it, then min–max normalised over the row → s_i ∈ [0, 1] (r = ``pcb_ratio``; the dropped
   entries, and the threshold entry itself, get 0).
6. τ_m = Σ_i s_i ⊙ w_i τ̄_i / max(Σ_i s_i, 1e-12) (w_i: per-model ``weight``, the reference's
   per-task λ_i); θ = θ0 + λ τ_m.

Granularity (``scope``):

* ``tensor``: a row is one expert's tensor, so every statistic is per tensor and the merge is
  one streaming pass. A tensor keeps about d − ⌊d(1 − r)⌋ − 1 entries per expert, so a small
  one (d · r ≤ 1, e.g. a 10-entry bias or an 8-entry norm at r = 0.1) keeps none and stays at
  the base: every norm and bias of a model is left unmerged.
* ``global`` (default since issue 13, the paper's granularity; the default was ``tensor``
  before): the reference's rows — each expert's whole task vector, flattened. The quantiles
  (clip bounds, drop threshold) and the row maximum of β are exact model-wide order statistics,
  gathered in four read passes before the merge with bounded memory (two 65536-bin histograms
  per expert per statistic, see ``order_stats``); the min–max normalisations then need no more,
  since the clipped row's minimum and maximum are the clip bounds themselves. Five reads of the
  model in all; the result equals the reference on the concatenated model.

Reference code (duguodong7/pcb-merging) and choices:

* Three files disagree. ``pcb-merging.py`` (the README's "details of our method") and the NLP
  code use ``summed`` inter-balancing; the vision code (``vision_source_code/pcb_ES.py``, used for
  the ViT results) uses ``pairwise``, Σ_j act(Norm(τ_i) Norm(τ_j)), the form of the paper's
  inter-balancing sum over task pairs. Default ``inter: pairwise``; ``summed`` reproduces the
  root file. Clip ratio q: 1e-4 in the root file, 0.01 in the vision and NLP code; default 0.01.
* The paper writes the normalisation as a generic Norm(·) (and softmax for the activations);
  the code's min–max normalisation and exp/tanh are implemented here, as in every code file.
  exp(T·N²) is the code's unnormalised softmax: the per-row constant cancels in step 5.
* r = 0.1 (the ``pcb_ratio`` default of ``PCB_merge``; the example scripts use 0.05–0.2);
  λ = 1.0 (the per-task λ_i are searched by evolution strategy in [0.8, 1.3] from 1.0 in the
  reference; the vision script without search fixes them at 1.2).
* Degenerate rows, NaN in the reference (0/0): a row with no spread (all equal, e.g. an expert
  that did not change this tensor) normalises to 0 everywhere, in steps 2, 3 and 5.
* Min–max normalisation always gives each row's smallest score 0, so an entry every expert
  scores lowest is dropped by all, even at r = 1, and keeps the base (reference).
  ``unscored: mean`` (not in the references) uses the mean of the w_i τ̄_i there instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from mergelab.errors import ParameterError
from mergelab.methods.base import Fold, MethodCard, MethodParams, TensorContext
from mergelab.methods.kernels.select import (
    SIGNED_BINS,
    locate_from_bottom,
    signed_high_histogram,
    signed_key_to_float,
    signed_low_histogram,
    sorted_at,
)
from mergelab.methods.kernels.tensors import scale_add, task_vectors, weighted_sum
from mergelab.methods.registry import method

Tensor = torch.Tensor

#: ``ctx.folds`` keys of the global-scope gather passes.
PASS_ABS_HIGH = "pcb.global.abs_high"
PASS_ABS_LOW = "pcb.global.abs_low"
PASS_SCORE_HIGH = "pcb.global.score_high"
PASS_SCORE_LOW = "pcb.global.score_low"

DENOM_FLOOR = 1e-12


class PcbParams(MethodParams):
    pcb_ratio: float = Field(
        0.1,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="r: fraction of each task's highest balancing scores kept (reference default 0.1)",
    )
    lambda_: float = Field(1.0, alias="lambda", allow_inf_nan=False, description="scale of the merged task vector")
    clip_ratio: float = Field(
        0.01,
        ge=0.0,
        lt=0.5,
        allow_inf_nan=False,
        description="q: |τ| clipped to its [q, 1 − q] quantiles first (vision/NLP code 0.01; root file 1e-4)",
    )
    inter: Literal["pairwise", "summed"] = Field(
        "pairwise",
        description="inter-balancing: pairwise Σ_j tanh(ñ_i ñ_j) (paper form, vision code) or summed "
        "tanh(τ_i Σ_j τ_j) (pcb-merging.py, NLP code)",
    )
    scope: Literal["tensor", "global"] = Field(
        "global",
        description="global: rows are whole task vectors, as the reference (four extra read passes); "
        "tensor: rows are single tensors (one pass; a tensor with d·r ≤ 1 keeps nothing)",
    )
    unscored: Literal["zero", "mean"] = Field(
        "zero",
        description="entries every expert scores 0: zero keeps the base (reference); mean takes the mean "
        "of the clipped weighted task vectors",
    )


class PcbModelParams(MethodParams):
    weight: float = Field(
        1.0, allow_inf_nan=False, description="λ_i: scales this clipped task vector inside the weighted average"
    )


# --------------------------------------------------------------------------------------------
# The computation on rows (shared by both scopes)
# --------------------------------------------------------------------------------------------


def clip_index_low(d: int, q: float) -> int:
    """0-based index of the lower clip bound in the sorted row (the reference's ``int(d*q)``)."""
    return min(max(int(d * q), 0), d - 1)


def clip_index_high(d: int, q: float) -> int:
    """0-based index of the upper clip bound (the reference's ``int(d*(1-q)-1)``)."""
    return min(max(int(d * (1 - q) - 1), 0), d - 1)


def drop_index(d: int, r: float) -> int:
    """0-based index of the drop threshold in the sorted scores (the reference's ``int(d*(1-r))``)."""
    return min(max(int(d * (1 - r)), 0), d - 1)


def _minmax(x: Tensor, lo: float, hi: float) -> Tensor:
    """(x − lo)/(hi − lo), or zeros when hi ≤ lo (a row without spread)."""
    if not hi > lo:
        return torch.zeros_like(x)
    return (x - lo).div_(hi - lo)


def balancing_scores(
    taus: Sequence[Tensor], bounds: Sequence[tuple[float, float]], inter: str
) -> tuple[list[Tensor], list[Tensor]]:
    """(β_i, τ̄_i) for flattened float32 (or float64) task vectors with clip bounds (lo_i, hi_i): steps 1–4."""
    n = len(taus)
    clipped, normed = [], []
    for t, (lo, hi) in zip(taus, bounds):
        a = t.abs().clamp_(lo, hi)
        normed.append(_minmax(a, lo, hi))
        clipped.append(torch.sign(t).mul_(a))
        del a
    intra = [torch.exp(n * nm.square()) for nm in normed]
    if inter == "summed":
        total = weighted_sum(taus, from_zero=True)
        inter_terms = [torch.tanh(t * total) for t in taus]
    elif inter == "pairwise":
        signed = [torch.sign(t).mul_(nm) for t, nm in zip(taus, normed)]
        inter_terms = []
        for i in range(n):
            acc = torch.zeros_like(taus[0])
            for j in range(n):
                acc.add_(torch.tanh(signed[i] * signed[j]))
            inter_terms.append(acc)
        del signed
    else:
        raise ValueError(f"unknown inter-balancing {inter!r}")
    del normed
    betas = [a.mul_(b) for a, b in zip(intra, inter_terms)]
    return betas, clipped


def scale_scores(beta: Tensor, threshold: float, top: float) -> Tensor:
    """Step 5: raise β below ``threshold`` to it, min–max normalise with the row max ``top``.

    Thresholds are float32 values (the exact selections rank float32 keys), so a float64 β whose
    float32 rounding is at or below the threshold scores 0, as it does in a float32 run."""
    scaled = _minmax(beta.clamp(min=threshold), threshold, top)
    if beta.dtype == torch.float64:
        scaled.masked_fill_(beta.float() <= threshold, 0.0)
    return scaled


def weighted_merge(
    scales: Sequence[Tensor], clipped: Sequence[Tensor], weights: Sequence[float], unscored: str
) -> Tensor:
    """Step 6 without λ: Σ s_i w_i τ̄_i / max(Σ s_i, 1e-12)."""
    num = torch.zeros_like(clipped[0])
    den = torch.zeros_like(clipped[0])
    for s, c, w in zip(scales, clipped, weights):
        num.add_(s * c, alpha=float(w))
        den.add_(s)
    merged = num.div_(den.clamp(min=DENOM_FLOOR))
    if unscored == "mean":
        mean = torch.zeros_like(clipped[0])
        for c, w in zip(clipped, weights):
            mean.add_(c, alpha=float(w) / len(clipped))
        merged = torch.where(den == 0, mean, merged)
    return merged


def _flat_task_vectors(base: Tensor, experts: Sequence[Tensor]) -> list[Tensor]:
    return task_vectors(base, experts, flat=True)


def pcb_tensor_delta(taus: Sequence[Tensor], weights: Sequence[float], params: PcbParams) -> Tensor:
    """τ_m for one tensor with rows = this tensor (``scope: tensor``), flattened inputs."""
    d = taus[0].numel()
    q, r = params.clip_ratio, params.pcb_ratio
    bounds = []
    for t in taus:
        a = t.abs()
        bounds.append((sorted_at(a, clip_index_low(d, q)), sorted_at(a, clip_index_high(d, q))))
        del a
    betas, clipped = balancing_scores(taus, bounds, params.inter)
    scales = []
    for beta in betas:
        scales.append(scale_scores(beta, sorted_at(beta, drop_index(d, r)), float(beta.max())))
    del betas
    return weighted_merge(scales, clipped, weights, params.unscored)


# --------------------------------------------------------------------------------------------
# Global scope: exact model-wide quantiles in four passes
# --------------------------------------------------------------------------------------------
#
# PASS_ABS_HIGH  per expert: histogram of the high key halves of |τ_i| and the entry count D;
#                finish locates the bins of the two clip bounds.
# PASS_ABS_LOW   per expert: low-half histograms inside those two bins → clip bounds (lo_i, hi_i).
# PASS_SCORE_HIGH per expert: high-half histogram of β_i (computed with the clip bounds) and the
#                row maximum of β_i; finish locates the bin of the drop threshold.
# PASS_SCORE_LOW per expert: low-half histogram inside that bin → threshold t_i.
# The merge then scores each tensor with (lo_i, hi_i, t_i, max β_i), all model-wide.


def _check_global(params: PcbParams, stats: dict[str, Any]) -> None:
    if (
        stats["clip_ratio"] != params.clip_ratio
        or stats["pcb_ratio"] != params.pcb_ratio
        or stats["inter"] != params.inter
    ):
        raise ParameterError(
            "pcb scope=global: pcb_ratio, clip_ratio and inter must be one value for the whole model "
            "(no filters or gradients)"
        )


def _abs_high_init(params: PcbParams, n_experts: int) -> dict[str, Any]:
    return {"hist": [torch.zeros(SIGNED_BINS, dtype=torch.int64) for _ in range(n_experts)], "count": 0}


def _abs_high_update(state, base, experts, params, model_params, ctx) -> None:
    taus = _flat_task_vectors(base, experts)
    for i, t in enumerate(taus):
        state["hist"][i] += signed_high_histogram(t.abs())
    state["count"] += taus[0].numel()


def _abs_high_finish(state, params: PcbParams, n_experts: int) -> dict[str, Any]:
    d = state["count"]
    out: dict[str, Any] = {"count": d, "bins": []}
    if d == 0:
        return out
    k_lo = clip_index_low(d, params.clip_ratio) + 1
    k_hi = clip_index_high(d, params.clip_ratio) + 1
    for hist in state["hist"]:
        out["bins"].append((locate_from_bottom(hist, k_lo), locate_from_bottom(hist, k_hi)))
    return out


def _abs_low_init(params: PcbParams, n_experts: int) -> dict[str, Any]:
    return {
        "hist": [[torch.zeros(SIGNED_BINS, dtype=torch.int64) for _ in range(2)] for _ in range(n_experts)],
        "located": None,
    }


def _abs_low_update(state, base, experts, params, model_params, ctx) -> None:
    located = ctx.folds[PASS_ABS_HIGH]
    state["located"] = located
    for i, t in enumerate(_flat_task_vectors(base, experts)):
        a = t.abs()
        for j, (b, _) in enumerate(located["bins"][i]):
            state["hist"][i][j] += signed_low_histogram(a, b)


def _abs_low_finish(state, params: PcbParams, n_experts: int) -> list[tuple[float, float]]:
    located = state["located"]
    if located is None or not located["bins"]:
        return []
    bounds = []
    for (lo_loc, hi_loc), (h_lo, h_hi) in zip(located["bins"], state["hist"]):
        lo = signed_key_to_float(lo_loc[0], locate_from_bottom(h_lo, lo_loc[1])[0])
        hi = signed_key_to_float(hi_loc[0], locate_from_bottom(h_hi, hi_loc[1])[0])
        bounds.append((lo, hi))
    return bounds


def _located(a: dict[str, Any], b: dict[str, Any]) -> Any:
    return a["located"] if a["located"] is not None else b["located"]


def _abs_high_combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"hist": [x + y for x, y in zip(a["hist"], b["hist"])], "count": a["count"] + b["count"]}


def _abs_low_combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    hist = [[x + y for x, y in zip(ha, hb)] for ha, hb in zip(a["hist"], b["hist"])]
    return {"hist": hist, "located": _located(a, b)}


def _score_high_combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {
        "hist": [x + y for x, y in zip(a["hist"], b["hist"])],
        "max": [max(x, y) for x, y in zip(a["max"], b["max"])],
        "count": a["count"] + b["count"],
    }


def _score_low_combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"hist": [x + y for x, y in zip(a["hist"], b["hist"])], "located": _located(a, b)}


def _global_betas(base, experts, params: PcbParams, ctx) -> tuple[list[Tensor], list[Tensor]]:
    return balancing_scores(_flat_task_vectors(base, experts), ctx.folds[PASS_ABS_LOW], params.inter)


def _score_high_init(params: PcbParams, n_experts: int) -> dict[str, Any]:
    return {
        "hist": [torch.zeros(SIGNED_BINS, dtype=torch.int64) for _ in range(n_experts)],
        "max": [float("-inf")] * n_experts,
        "count": 0,
    }


def _score_high_update(state, base, experts, params, model_params, ctx) -> None:
    betas, _ = _global_betas(base, experts, params, ctx)
    for i, beta in enumerate(betas):
        state["hist"][i] += signed_high_histogram(beta)
        state["max"][i] = max(state["max"][i], float(beta.max()))
    state["count"] += betas[0].numel()


def _score_high_finish(state, params: PcbParams, n_experts: int) -> dict[str, Any]:
    d = state["count"]
    out: dict[str, Any] = {"count": d, "max": state["max"], "bins": []}
    if d == 0:
        return out
    k = drop_index(d, params.pcb_ratio) + 1
    out["bins"] = [locate_from_bottom(hist, k) for hist in state["hist"]]
    return out


def _score_low_init(params: PcbParams, n_experts: int) -> dict[str, Any]:
    return {"hist": [torch.zeros(SIGNED_BINS, dtype=torch.int64) for _ in range(n_experts)], "located": None}


def _score_low_update(state, base, experts, params, model_params, ctx) -> None:
    located = ctx.folds[PASS_SCORE_HIGH]
    state["located"] = located
    betas, _ = _global_betas(base, experts, params, ctx)
    for i, beta in enumerate(betas):
        state["hist"][i] += signed_low_histogram(beta, located["bins"][i][0])


def _score_low_finish(state, params: PcbParams, n_experts: int) -> dict[str, Any]:
    located = state["located"]
    out: dict[str, Any] = {
        "thresholds": [],
        "max": [],
        "pcb_ratio": params.pcb_ratio,
        "clip_ratio": params.clip_ratio,
        "inter": params.inter,
    }
    if located is None or not located["bins"]:
        return out
    for (b, rank), hist in zip(located["bins"], state["hist"]):
        out["thresholds"].append(signed_key_to_float(b, locate_from_bottom(hist, rank)[0]))
    out["max"] = located["max"]
    return out


def global_passes(params: PcbParams) -> tuple[Fold, ...]:
    """The gather passes ``scope: global`` needs (none for ``scope: tensor``)."""
    if getattr(params, "scope", "tensor") != "global":
        return ()
    return (
        Fold(PASS_ABS_HIGH, _abs_high_init, _abs_high_update, _abs_high_finish, _abs_high_combine),
        Fold(PASS_ABS_LOW, _abs_low_init, _abs_low_update, _abs_low_finish, _abs_low_combine),
        Fold(PASS_SCORE_HIGH, _score_high_init, _score_high_update, _score_high_finish, _score_high_combine),
        Fold(PASS_SCORE_LOW, _score_low_init, _score_low_update, _score_low_finish, _score_low_combine),
    )


def pcb_global_delta(base, experts, weights, params: PcbParams, ctx: TensorContext) -> Tensor:
    """τ_m for one tensor with the model-wide statistics of the gather passes (flattened)."""
    missing = [p for p in (PASS_ABS_LOW, PASS_SCORE_LOW) if p not in ctx.folds]
    if missing:
        raise RuntimeError(f"pcb scope=global: gather pass results missing for tensor {ctx.name!r}")
    final = ctx.folds[PASS_SCORE_LOW]
    _check_global(params, final)
    betas, clipped = _global_betas(base, experts, params, ctx)
    scales = [scale_scores(b, t, m) for b, t, m in zip(betas, final["thresholds"], final["max"])]
    del betas
    return weighted_merge(scales, clipped, weights, params.unscored)


def pcb_delta(
    base: Tensor,
    experts: Sequence[Tensor],
    params: PcbParams,
    model_params: Sequence[PcbModelParams],
    ctx: TensorContext,
) -> Tensor:
    """τ_m (float32; float64 under a float64 compute dtype; the base's shape): ``pcb == base + λ · pcb_delta``
    (cast to the base's dtype)."""
    weights = [m.weight for m in model_params]
    if params.scope == "global":
        delta = pcb_global_delta(base, experts, weights, params, ctx)
    else:
        delta = pcb_tensor_delta(_flat_task_vectors(base, experts), weights, params)
    return delta.reshape(base.shape)


@method(
    "pcb",
    paper="Du et al. 2024, Parameter Competition Balancing for Model Merging, NeurIPS, arXiv:2410.02396",
    params=PcbParams,
    model_params=PcbModelParams,
    base="required",
    passes=global_passes,
    aliases=("pcb_merging",),
    scale="lambda",
    delta=pcb_delta,
    card=MethodCard(
        identity=({"pcb_ratio": 1.0, "clip_ratio": 0.0, "unscored": "mean"}, {"weight": 1.0}),
        typical=({"pcb_ratio": 0.2, "scope": "global"}, {}),
        grid=({"pcb_ratio": (0.1, 0.2, 0.3), "lambda": (1.0, 1.2)}, {}),
        group="advanced",
    ),
)
def pcb(
    base: Tensor,
    experts: Sequence[Tensor],
    params: PcbParams,
    model_params: Sequence[PcbModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Score entries by intra- and inter-task balancing, drop low scores, score-weighted average."""
    delta = pcb_delta(base, experts, params, model_params, ctx)
    return scale_add(base.to(delta.dtype), delta, params.lambda_).to(base.dtype)
