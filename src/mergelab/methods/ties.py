"""TIES-Merging: trim small deltas, elect a sign per coordinate, average the agreeing deltas.

Yadav, Tam, Choshen, Raffel, Bansal 2023, "TIES-Merging: Resolving Interference When Merging
Models", NeurIPS, arXiv:2306.01708.

θ = θ0 + λ · τ_m with, for each expert i, τ̂_i = τ_i restricted to its top-K magnitudes,
γ = sgn(Σ_i w_i τ̂_i) and τ_m = Σ_{i agreeing} w_i τ̂_i / Σ_{i agreeing} w_i (``normalize``,
the paper's "disjoint mean"; without it the "disjoint sum").

Granularity: ``scope: tensor`` (default, as mergekit and peft) trims each tensor on its own
(one pass, S1). ``scope: global`` is the paper's trim: the top-K over the whole model,
flattened, per expert; it needs gather passes before the merge (S2, see
:func:`global_passes`), memory bounded by two radix histograms per expert.

Defaults are the paper's: K = ``density`` = 0.2, λ = 1, ``normalize`` = true (dis-mean).

Departures and choices, each stated against the paper, the original code
(prateeky2806/ties-merging ``src/utils/merge_utils.py``) and mergekit 0.1.5:

* Trim count: exactly k = max(1, ⌊K·n⌋) magnitudes, the paper's "top-k%" and mergekit's count.
  The original code thresholds at the (n − ⌊K·n⌋)-th smallest value, which keeps ⌊K·n⌋ + 1;
  ``trim_count: original`` keeps that many (with ``scope: global``: exact parity with the
  original code on the flattened model; per tensor, one more entry per tensor).
  Entries tied with the k-th largest magnitude are all kept (as the original code does;
  mergekit keeps exactly k, breaking ties arbitrarily). K is a fraction in [0, 1]; the
  original also accepted percentages (K > 1 → K/100), here rejected.
* Weights: the paper has none (w_i = 1). As mergekit, the sign is elected on the weighted
  trimmed deltas, agreement is judged on w_i τ̂_i, and the mean is weighted. With unit weights
  this is exactly the paper's dis-mean.
* Sign ties (Σ_i w_i τ̂_i exactly 0 with non-zero entries that cancel): ``sign_tie: majority``
  (default, the original code) gives such coordinates the scope's majority elected sign
  (the tensor's for ``scope: tensor``, the whole model's for ``scope: global``);
  ``sign_tie: positive`` gives +1, mergekit's rule.
* ``rescale`` (off by default; the paper has no rescale) is mergekit's option: ``l1`` (default
  mode) scales each trimmed tensor back to its L1 norm; ``inverse`` divides by ``density``.
* ``density`` defaults to the paper's 0.2; mergekit's default is 1.0 (no trim), so a mergekit
  recipe that omits ``density`` trims here. ``int8_mask`` is accepted and ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from mergelab.methods.base import Fold, MethodCard, TensorContext
from mergelab.methods.kernels.select import (
    MAGNITUDE_HIGH_BINS,
    MAGNITUDE_LOW_BINS,
    locate_from_top,
    magnitude_bits_to_float,
    magnitude_high_histogram,
    magnitude_low_histogram,
)
from mergelab.methods.kernels.tensors import task_vectors
from mergelab.methods.registry import method
from mergelab.methods.stages.combine import DisjointMerge
from mergelab.methods.stages.pipeline import TaskVectorMerge
from mergelab.methods.stages.sign_consensus import SignTie, elect_sign, sign_balance
from mergelab.methods.stages.sparsify import (
    MagnitudeTopK,
    SparseMergeParams,
    SparseModelParams,
    apply_mask,
    magnitude_mask,
)

Tensor = torch.Tensor

#: ``ctx.folds`` keys of the global-scope gather passes.
PASS_HIGH = "ties.global.high"
PASS_LOW = "ties.global.low"
PASS_SIGN = "ties.global.sign"


class TiesParams(SparseMergeParams):
    normalize: bool = Field(
        True,
        description="disjoint mean (divide by the summed weights of the agreeing models); false: disjoint sum",
    )
    scope: Literal["tensor", "global"] = Field(
        "tensor",
        description="tensor: top-k per tensor (mergekit); global: top-k over the whole model "
        "per expert (the paper; two or three extra read passes)",
    )
    trim_count: Literal["floor", "original"] = Field(
        "floor",
        description="entries kept per trim: floor keeps k = max(1, ⌊K·n⌋) (paper, mergekit); original "
        "keeps ⌊K·n⌋ + 1, as the authors' code (its k-th-smallest threshold), for exact parity with it",
    )
    sign_tie: SignTie | None = Field(
        None,
        description="sign where the weighted sum is exactly 0: majority (original code: the "
        "scope's majority elected sign) or positive (mergekit); default: majority for "
        "scope global, positive for scope tensor",
    )

    @property
    def sign_rule(self) -> SignTie:
        """The tie rule in force: the explicit one, else the scope's default."""
        if self.sign_tie is not None:
            return self.sign_tie
        return "majority" if self.scope == "global" else "positive"


class TiesModelParams(SparseModelParams):
    density: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction K of this task vector's largest magnitudes kept (paper: 0.2; mergekit's default is 1.0)",
    )


def trimmer(
    params: SparseMergeParams, model_params: Sequence[SparseModelParams], thresholds: Sequence[float] | None = None
) -> MagnitudeTopK:
    """The TIES trim as a sparsifier stage: top-``density`` magnitudes per tensor, or
    magnitudes ≥ the model-wide ``thresholds`` (``scope: global``), then the optional rescale."""
    return MagnitudeTopK(
        densities=tuple(float(m.density) for m in model_params),
        rescale=params.rescale,
        mode=params.rescale_mode,
        thresholds=None if thresholds is None else tuple(float(t) for t in thresholds),
        plus_one=getattr(params, "trim_count", "floor") == "original",
    )


def trim(delta: Tensor, density: float, params: SparseMergeParams, threshold: float | None = None) -> Tensor:
    """τ̂ of one whole task vector: ``delta`` restricted to its top-``density`` magnitudes (per
    tensor), or to magnitudes ≥ ``threshold`` (global scope), then the optional rescale."""
    if threshold is None:
        mask = magnitude_mask(delta, density)
    elif math.isinf(threshold):
        mask = torch.zeros_like(delta, dtype=torch.bool)
    else:
        mask = delta.abs() >= threshold
    return apply_mask(delta, mask, rescale=params.rescale, mode=params.rescale_mode, keep_prob=density)


# --------------------------------------------------------------------------------------------
# Global scope: exact model-wide k-th largest |τ_i| per expert in two histogram passes
# --------------------------------------------------------------------------------------------
#
# Pass 1 (PASS_HIGH): per expert, a histogram of the high 16 bits of the float32 bit pattern of
#   |τ| (2**15 int64 bins: the pattern of a non-negative float is monotone in its value), plus
#   the keep budget k = Σ over distinct densities d of ⌊d · N_d⌋ (N_d: entries of tensors
#   resolved to density d; with one density K this is ⌊K·N⌋), at least 1 when some density is
#   positive. finish() finds the bin b holding the k-th largest and its rank r inside b.
# Pass 2 (PASS_LOW): per expert, a histogram of the low 16 bits of the entries whose high bits
#   are b. finish() finds the low bits l of the r-th largest there: threshold = float(b<<16|l),
#   exactly the k-th largest magnitude of the expert's whole task vector.
# Pass 3 (PASS_SIGN, only with sign_tie=majority): Σ_p γ_p over the model (exact int), so that
#   exact-zero sums take the model-wide majority sign, as the original code does.
# The merge then keeps |τ_i| ≥ threshold_i tensor by tensor. Memory: 2**15 + 2**16 int64 per
# expert, plus tensor-sized temporaries while one tensor is folded in.


def _delta(base: Tensor, expert: Tensor) -> Tensor:
    return task_vectors(base, [expert])[0]


def _high_init(params: TiesParams, n_experts: int) -> dict[str, Any]:
    return {
        "hist": [torch.zeros(MAGNITUDE_HIGH_BINS, dtype=torch.int64) for _ in range(n_experts)],
        "sizes": [{} for _ in range(n_experts)],  # density -> number of entries
    }


def _high_update(
    state: dict[str, Any],
    base: Tensor,
    experts: Sequence[Tensor],
    params: TiesParams,
    model_params: Sequence[TiesModelParams],
    ctx: TensorContext,
) -> None:
    for i, expert in enumerate(experts):
        delta = _delta(base, expert)
        state["hist"][i] += magnitude_high_histogram(delta)
        sizes = state["sizes"][i]
        d = float(model_params[i].density)
        sizes[d] = sizes.get(d, 0) + delta.numel()


def _high_finish(state: dict[str, Any], params: TiesParams, n_experts: int) -> list[dict]:
    out = []
    for hist, sizes in zip(state["hist"], state["sizes"]):
        total = int(hist.sum())
        k = sum(min(n, int(d * n)) if d < 1 else n for d, n in sizes.items())
        if params.trim_count == "original" and any(d < 1 for d in sizes):
            k += 1  # the authors' threshold: the (N − ⌊K·N⌋)-th smallest, so ⌊K·N⌋ + 1 kept
        elif k == 0 and total > 0 and any(d > 0 for d in sizes):
            k = 1
        if k <= 0 or total == 0:
            out.append({"k": 0, "n": total})
        elif k >= total:
            out.append({"k": total, "n": total})
        else:
            high, rank = locate_from_top(hist, k)
            out.append({"k": k, "n": total, "high": high, "rank": rank})
    return out


def _high_combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Histograms and per-density sizes of two disjoint sets of tensors, added (integers: exact)."""
    sizes = []
    for sa, sb in zip(a["sizes"], b["sizes"]):
        merged = dict(sa)
        for d, n in sb.items():
            merged[d] = merged.get(d, 0) + n
        sizes.append(merged)
    return {"hist": [x + y for x, y in zip(a["hist"], b["hist"])], "sizes": sizes}


def _low_init(params: TiesParams, n_experts: int) -> dict[str, Any]:
    return {
        "hist": [torch.zeros(MAGNITUDE_LOW_BINS, dtype=torch.int64) for _ in range(n_experts)],
        "located": None,  # PASS_HIGH's result, copied in by the first update
    }


def _low_update(
    state: dict[str, Any],
    base: Tensor,
    experts: Sequence[Tensor],
    params: TiesParams,
    model_params: Sequence[TiesModelParams],
    ctx: TensorContext,
) -> None:
    located = ctx.folds[PASS_HIGH]
    state["located"] = located
    for i, expert in enumerate(experts):
        if "high" in located[i]:
            state["hist"][i] += magnitude_low_histogram(_delta(base, expert), located[i]["high"])


def _low_finish(state: dict[str, Any], params: TiesParams, n_experts: int) -> list[float]:
    """Per-expert magnitude thresholds: keep |τ_i| ≥ t_i (inf: keep nothing, 0: keep all)."""
    located = state["located"]
    if located is None:  # no tensor at all
        return [math.inf] * n_experts
    out = []
    for loc, low in zip(located, state["hist"]):
        if loc["k"] == 0:
            out.append(math.inf)
        elif loc["k"] >= loc["n"]:
            out.append(0.0)
        else:
            low_bits, _ = locate_from_top(low, loc["rank"])
            out.append(magnitude_bits_to_float(loc["high"], low_bits))
    return out


def _low_combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    located = a["located"] if a["located"] is not None else b["located"]  # the same PASS_HIGH result
    return {"hist": [x + y for x, y in zip(a["hist"], b["hist"])], "located": located}


def _sign_init(params: TiesParams, n_experts: int) -> list[int]:
    return [0]


def _global_trimmed(
    base: Tensor,
    experts: Sequence[Tensor],
    params: TiesParams,
    model_params: Sequence[TiesModelParams],
    ctx: TensorContext,
) -> list[Tensor]:
    thresholds = ctx.folds[PASS_LOW]
    return [trim(_delta(base, e), m.density, params, threshold=t) for e, m, t in zip(experts, model_params, thresholds)]


def _sign_update(
    state: list[int],
    base: Tensor,
    experts: Sequence[Tensor],
    params: TiesParams,
    model_params: Sequence[TiesModelParams],
    ctx: TensorContext,
) -> None:
    trimmed = _global_trimmed(base, experts, params, model_params, ctx)
    weights = [m.weight for m in model_params]
    state[0] += sign_balance(elect_sign(trimmed, weights, on_zero="zero"))


def _sign_finish(state: list[int], params: TiesParams, n_experts: int) -> int:
    return (state[0] > 0) - (state[0] < 0)


def _sign_combine(a: list[int], b: list[int]) -> list[int]:
    return [a[0] + b[0]]


def global_passes(params: TiesParams) -> tuple[Fold, ...]:
    """The gather passes ``scope: global`` needs (none for ``scope: tensor``)."""
    if getattr(params, "scope", "tensor") != "global":
        return ()
    passes = [
        Fold(PASS_HIGH, _high_init, _high_update, _high_finish, _high_combine),
        Fold(PASS_LOW, _low_init, _low_update, _low_finish, _low_combine),
    ]
    if params.sign_rule == "majority":
        passes.append(Fold(PASS_SIGN, _sign_init, _sign_update, _sign_finish, _sign_combine))
    return tuple(passes)


def _pipeline(params: TiesParams, model_params: Sequence[TiesModelParams], ctx: TensorContext) -> TaskVectorMerge:
    """TIES as stages: trim (per tensor, or at the model-wide thresholds) × elect + disjoint merge.

    Chunk by chunk unless the L1 rescale or a tensor-wide majority sign needs the whole tensor.
    The per-tensor default (sign +1 for ties, no rescale) works in the compute dtype; the other
    paths in float32 (float64 stays float64).
    """
    thresholds = None
    majority: float | None = None
    if params.scope == "global":
        if PASS_HIGH not in ctx.folds or PASS_LOW not in ctx.folds:
            raise RuntimeError(f"ties scope=global: gather pass results missing for tensor {ctx.name!r}")
        thresholds = ctx.folds[PASS_LOW]
        if params.sign_rule == "majority":
            if PASS_SIGN not in ctx.folds:
                raise RuntimeError(f"ties scope=global: sign pass result missing for tensor {ctx.name!r}")
            majority = float(ctx.folds[PASS_SIGN])
    default_path = params.scope == "tensor" and params.sign_rule == "positive" and not params.rescale
    return TaskVectorMerge(
        trimmer(params, model_params, thresholds),
        DisjointMerge(normalize=params.normalize, on_zero=params.sign_rule, majority=majority),
        upcast=not default_path,
    )


def ties_delta(
    base: Tensor,
    experts: Sequence[Tensor],
    params: TiesParams,
    model_params: Sequence[TiesModelParams],
    ctx: TensorContext,
) -> Tensor:
    """τ_m, the unscaled merged task vector: ``ties == base + λ · ties_delta`` bit for bit."""
    weights = [m.weight for m in model_params]
    return _pipeline(params, model_params, ctx).delta(base, experts, weights)


@method(
    "ties",
    paper="Yadav et al. 2023, TIES-Merging: Resolving Interference When Merging Models, arXiv:2306.01708",
    params=TiesParams,
    model_params=TiesModelParams,
    base="required",
    passes=global_passes,
    scale="lambda",
    delta=ties_delta,
    card=MethodCard(
        identity=({"lambda": 1.0}, {"density": 1.0, "weight": 1.0}),
        typical=({}, {"density": 0.3}),
        grid=({"lambda": (1.0, 1.5, 2.0, 2.5, 3.0)}, {"density": (0.1, 0.2, 0.3)}),
        group="classic",
        # two leaderboard rows: per-tensor trim (mergekit's, the default) and the paper's whole-model trim
        variants={"ties": {}, "ties_global": {"scope": "global"}},
    ),
)
def ties(
    base: Tensor,
    experts: Sequence[Tensor],
    params: TiesParams,
    model_params: Sequence[TiesModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Trim each task vector to its top-K magnitudes, elect signs, average the agreeing deltas."""
    weights = [m.weight for m in model_params]
    return _pipeline(params, model_params, ctx).merge(base, experts, weights, params.lambda_)
