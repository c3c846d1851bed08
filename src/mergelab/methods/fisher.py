"""Fisher merging: a per-parameter average weighted by each expert's diagonal Fisher information.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging", NeurIPS, arXiv:2111.09832.

    θ = Σ_i c_i F̂_i ⊙ θ_i / Σ_i c_i F̂_i,   F̂_i = max(F_i, ε),   c_i = w_i (/ ‖F_i‖ with ``normalize``)

F_i comes from the data phase (:mod:`mergelab.informed.fisher`: per-example squared gradients of
the expert's own predictive log-likelihood on its calibration data; ``fisher_label`` and
``per_example`` are that phase's settings). The base is not used.

* Floor ε (``floor``, default 1e-6 as every reference): applied to every expert's raw Fisher,
  elementwise, before the c_i weighting (the original code clamps only its first, "target"
  model's Fisher; MergeLM and fusion_bench add 1e-6 to all). It keeps the denominator positive
  where no expert's Fisher is, and there the result is the c-weighted average.
* ``normalize`` (default true: the original's ``normalize_fishers=True``, fusion_bench's
  ``normalize_fisher_weight: true``): c_i = w_i / ‖F_i‖₂ with the norm over *every* merged tensor
  of expert i (a gather pass before the merge), so experts whose Fishers differ in scale count
  alike. MergeLM/fusion_bench then rescale the c_i to sum 1, which does not change θ.
* Tensors without Fisher statistics (float buffers that are not parameters) get the w-weighted
  average.

Defaults of the data phase: 256 examples per expert (fusion_bench/MergeLM; the original used
4096 GLUE examples at length 128), the exact expectation over labels for classification
(``expected``, the original), one sampled label per position for causal LMs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from pydantic import Field

from mergelab.methods.base import Fold, MethodCard, MethodParams, TensorContext
from mergelab.methods.registry import method

Tensor = torch.Tensor
PASS_NORM = "fisher.norm"


class FisherParams(MethodParams):
    fisher_label: Literal["auto", "expected", "sampled", "empirical"] = Field(
        "auto",
        description="data phase: labels of the log-likelihood (expected: exact E_y; sampled: y ~ p; empirical: "
        "the data's label / next token; auto: expected for classification, sampled for causal LMs)",
    )
    per_example: Literal["auto", "vmap", "loop"] = Field(
        "auto", description="data phase: per-example gradients by torch.func vmap or a loop (auto: vmap if it works)"
    )
    normalize: bool = Field(True, description="divide each expert's weight by its Fisher's global L2 norm")
    floor: float = Field(1e-6, ge=0.0, allow_inf_nan=False, description="ε: each Fisher is clamped to ≥ ε elementwise")


class FisherModelParams(MethodParams):
    weight: float = Field(1.0, gt=0.0, allow_inf_nan=False, description="c_i: this expert's merging coefficient")


def _norm_init(params: FisherParams, n_experts: int) -> list[list[float]]:
    return [[] for _ in range(n_experts)]


def _norm_update(state: list[list[float]], base, experts, params, model_params, ctx: TensorContext) -> None:
    for i, a in enumerate(ctx.statistics):
        f = a.get("fisher")
        if f is not None:
            state[i].append(float(f.double().square().sum()))


def _norm_combine(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """Concatenate per-tensor terms (``a``'s tensors first): the finish sums them in tensor order."""
    return [x + y for x, y in zip(a, b)]


def _ordered_sum(values: Sequence[float]) -> float:
    """Left-to-right float sum from 0.0: the same bits however the terms were folded and combined."""
    total = 0.0
    for v in values:
        total += v
    return total


def _norm_finish(state: list[list[float]], params: FisherParams, n_experts: int) -> list[float]:
    return [math.sqrt(_ordered_sum(s)) for s in state]


def fisher_passes(params: MethodParams) -> tuple[Fold, ...]:
    """The global-norm fold when ``normalize`` (per expert: ‖F_i‖₂ over every merged tensor)."""
    if not getattr(params, "normalize", False):
        return ()
    return (Fold(PASS_NORM, _norm_init, _norm_update, _norm_finish, _norm_combine),)


def fisher_merge(experts: Sequence[Tensor], fishers: Sequence[Tensor], coeffs: Sequence[float], floor: float) -> Tensor:
    """Σ c_i max(F_i, ε) θ_i / Σ c_i max(F_i, ε), elementwise (float32 or wider)."""
    num: Tensor | None = None
    den: Tensor | None = None
    for e, f, c in zip(experts, fishers, coeffs):
        wf = f.to(torch.float32 if e.dtype != torch.float64 else e.dtype).clamp_min(floor) * c
        term = wf * e
        num = term if num is None else num.add_(term)
        den = wf if den is None else den.add_(wf)
    assert num is not None and den is not None
    return num.div_(den).to(experts[0].dtype)


@method(
    "fisher",
    paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging, arXiv:2111.09832",
    params=FisherParams,
    model_params=FisherModelParams,
    base="optional",
    passes=fisher_passes,
    statistics="fisher",
    aliases=("fisher_merging",),
    card=MethodCard(
        identity=({}, {}),  # with any Fisher diagonals (tests/informed/test_contracts.py)
        grid=({"normalize": (True, False)}, {}),
        group="informed",
    ),
)
def fisher(base, experts, params: FisherParams, model_params, ctx: TensorContext) -> Any:
    """Σ cᵢ Fᵢ θᵢ / Σ cᵢ Fᵢ with each expert's diagonal Fisher (floored at ε, optionally norm-scaled)."""
    coeffs = [m.weight for m in model_params]
    aux = list(ctx.statistics) if ctx.statistics else [{} for _ in experts]
    have = [("fisher" in a) for a in aux]
    if not any(have):
        total = sum(coeffs)
        return sum(c / total * e for c, e in zip(coeffs, experts))
    if not all(have):
        raise ValueError(f"Fisher statistics missing for expert(s) {[i for i, h in enumerate(have) if not h]}")
    fishers = [a["fisher"] for a in aux]
    for f in fishers:
        if tuple(f.shape) != tuple(experts[0].shape):
            raise ValueError(f"Fisher of shape {list(f.shape)} for a tensor of shape {list(experts[0].shape)}")
    if params.normalize:
        norms = ctx.folds.get(PASS_NORM)
        if norms is None:
            raise RuntimeError("fisher normalize: the norm gather pass did not run")
        for i, n in enumerate(norms):
            if n <= 0:
                raise ValueError(f"expert {i}'s Fisher is zero everywhere: nothing to normalise (set normalize: false)")
        coeffs = [c / n for c, n in zip(coeffs, norms)]
    return fisher_merge(experts, fishers, coeffs, params.floor)
