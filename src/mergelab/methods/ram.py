"""RAM and RAM+: average the entries several models changed, keep (and rescale) the unique ones.

Yuan et al. 2026, "Behavior Knowledge Merge in Reinforced Agentic Models", arXiv:2601.13572
(Reinforced Agent Merging); the authors' code (``ram-main.py`` of their repository: ``arm`` and
``arm-r-v2``). Also mergekit 0.1.5's ``ram`` and ``ramplus_tl``, whose recipes run here.

For one tensor with task vectors δ_j = θ_j − θ0 (j = 1..K), an entry is *changed* by model j when
|δ_j| > ε (``epsilon``); c = the number of models that changed it. Per entry:

* c = 0 (unchanged): the base's value;
* c = 1 (unique to model j): θ0 + λ_j δ_j;
* c ≥ 2 (shared): θ0 + (Σ_{j changed} δ_j) / c, the mean of the changes (entries a model left
  within ε of the base do not count, in the sum or in c).

``ram``: λ_j = 1 (unique changes kept whole; the authors' ``arm``, mergekit's ``ram``; the two agree).

``ramplus`` (RAM+, the paper's): λ_j = 1 + r · clip(ρ_j, 0, α), where ρ_j = (entries model j
changed that another model changed too) / (entries only model j changed), counted over every
merged tensor of the model (a fold before the merge), so a model whose changes are mostly shared,
and so diluted by the averaging, gets its unique changes scaled up. Defaults r = 0.05, α = 1:
the authors' code (``arm-r-v2``) scales by 1 + (r' − 1) · min(ρ_j, 1) with r' = 1.05 by default.

``ramplus_tl`` (RAM+, tensor-local, mergekit's): the same λ_j with ρ_j counted over the tensor in
hand only ("tl"), which needs no pass over the model before the merge; mergekit's defaults r = 0.1,
α = 0.2. Where a tensor's ratio differs from the model's, the two differ: ``ramplus`` is the paper's
method, ``ramplus_tl`` mergekit's variant of it (both under mergekit's parameter names).

In both, ρ_j's divisor is max(unique_j, ε) as mergekit's (the authors' code divides by the
unique count, which fails for a model with shared but no unique changes; such a model has no
unique entry to scale, so the floor changes nothing in the merge).

``ram`` and ``ramplus_tl`` are as mergekit's (no departure); computed in float32 (float64
for float64 inputs), returned in the base's dtype. Granularity: per element (ρ per tensor for
``ramplus_tl``, per model for ``ramplus``); one pass (``ramplus``: a counting fold, then the merge).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import Fold, MethodCard, MethodParams, NoParams, TensorContext
from mergelab.methods.kernels.tensors import work_dtype
from mergelab.methods.registry import method


class RamParams(MethodParams):
    epsilon: float = Field(
        1e-5,
        ge=0.0,
        allow_inf_nan=False,
        description="a model changed an entry when |θ_j − θ0| exceeds this",
    )


class RamPlusTLParams(RamParams):  # ramplus_tl: mergekit's names and defaults
    r: float = Field(0.1, ge=0.0, allow_inf_nan=False, description="rescaling strength of the unique changes")
    alpha: float = Field(
        0.2, ge=0.0, allow_inf_nan=False, description="bound on the shared/unique ratio ρ (λ ≤ 1 + r·alpha)"
    )


def ram_delta(deltas: torch.Tensor, epsilon: float, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The merged task vector of stacked task vectors (models on dim 0): shared entries averaged
    over the models that changed them, unique ones times ``scales[j]`` (1 when ``None``)."""
    changed = deltas.abs() > epsilon
    count = changed.sum(dim=0)
    kept = deltas * changed
    unique = count == 1
    shared_mean = kept.sum(dim=0) / count.clamp(min=1)
    if scales is None:
        unique_sum = kept.sum(dim=0)
    else:
        unique_sum = (kept * scales.reshape(-1, *([1] * (deltas.dim() - 1)))).sum(dim=0)
    return torch.where(unique, unique_sum, torch.where(count > 1, shared_mean, torch.zeros_like(shared_mean)))


def change_counts(deltas: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per model j (int64): the entries j changed that another model changed too, and those only j changed."""
    changed = deltas.abs() > epsilon
    count = changed.sum(dim=0)
    flat = changed.reshape(deltas.shape[0], -1)
    shared = (flat & (count > 1).reshape(1, -1)).sum(dim=1)
    unique = (flat & (count == 1).reshape(1, -1)).sum(dim=1)
    return shared, unique


def rescale_factors(
    shared: torch.Tensor, unique: torch.Tensor, epsilon: float, r: float, alpha: float, dtype: torch.dtype
) -> torch.Tensor:
    """λ_j = 1 + r · clip(ρ_j, 0, α), ρ_j = shared_j / max(unique_j, ε) (ε = 0 and no unique entry: α)."""
    s = shared.to(dtype)
    u = unique.to(dtype)
    rho = s / u.clamp(min=epsilon) if epsilon > 0 else s / u
    rho = torch.nan_to_num(rho, nan=0.0, posinf=alpha)
    return 1.0 + r * rho.clamp(min=0.0, max=alpha)


def ramplus_scales(deltas: torch.Tensor, epsilon: float, r: float, alpha: float) -> torch.Tensor:
    """RAM+'s λ_j with ρ_j counted over this tensor (tensor-local)."""
    shared, unique = change_counts(deltas, epsilon)
    return rescale_factors(shared, unique, epsilon, r, alpha, deltas.dtype)


def _stack(base: torch.Tensor, experts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = work_dtype(base)
    b = base.to(dtype)
    return b, torch.stack([e.to(dtype) - b for e in experts])


@method(
    "ram",
    paper="Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM), arXiv:2601.13572",
    params=RamParams,
    model_params=NoParams,
    base="required",
    card=MethodCard(
        identity=({}, {}),  # copies: every changed entry is shared by all, their mean is the change
        typical=({"epsilon": 0.02}, {}),
        grid=({"epsilon": (1e-5, 1e-3)}, {}),
        group="advanced",
    ),
)
def ram(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: RamParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Average the changes several models made to an entry, keep a change only one model made."""
    b, deltas = _stack(base, experts)
    return (b + ram_delta(deltas, params.epsilon)).to(base.dtype)


@method(
    "ramplus_tl",
    paper="Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM+), arXiv:2601.13572; "
    "tensor-local as mergekit's ramplus_tl",
    params=RamPlusTLParams,
    model_params=NoParams,
    base="required",
    card=MethodCard(
        identity=({}, {}),
        typical=({"epsilon": 0.02, "r": 0.5, "alpha": 1.0}, {}),
        grid=({"r": (0.05, 0.1, 0.2), "alpha": (0.2, 1.0)}, {}),
        group="advanced",
    ),
)
def ramplus_tl(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: RamPlusTLParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """RAM with each model's unique changes scaled by 1 + r·clip(shared/unique, 0, α), counted per tensor."""
    b, deltas = _stack(base, experts)
    scales = ramplus_scales(deltas, params.epsilon, params.r, params.alpha)
    return (b + ram_delta(deltas, params.epsilon, scales)).to(base.dtype)


# ------------------------------------------------------------------ RAM+ over the whole model

PASS_COUNTS = "ramplus_counts"
"""``ctx.folds`` key of RAM+'s model-wide counts of shared and unique changes per model."""


class RamPlusParams(RamPlusTLParams):
    """``ramplus``: the authors' code's defaults (rescale factor 1.05 on min(ρ, 1))."""

    r: float = Field(0.05, ge=0.0, allow_inf_nan=False, description="rescaling strength of the unique changes")
    alpha: float = Field(
        1.0, ge=0.0, allow_inf_nan=False, description="bound on the shared/unique ratio ρ (λ ≤ 1 + r·alpha)"
    )


def _counts_init(params: RamPlusParams, n: int) -> dict[str, list[int]]:
    return {"shared": [0] * n, "unique": [0] * n}


def _counts_update(
    state: dict[str, list[int]],
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: RamPlusParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> None:
    if base.numel() == 0:
        return
    _b, deltas = _stack(base, experts)
    shared, unique = change_counts(deltas, params.epsilon)
    for j in range(len(experts)):
        state["shared"][j] += int(shared[j])
        state["unique"][j] += int(unique[j])


def _counts_combine(a: dict[str, list[int]], b: dict[str, list[int]]) -> dict[str, list[int]]:
    return {k: [x + y for x, y in zip(a[k], b[k], strict=True)] for k in ("shared", "unique")}


def _counts_finish(state: dict[str, list[int]], params: RamPlusParams, n: int) -> dict[str, list[int]]:
    return state


def ramplus_passes(params: RamPlusParams) -> tuple[Fold, ...]:
    return (Fold(PASS_COUNTS, _counts_init, _counts_update, _counts_finish, _counts_combine),)


@method(
    "ramplus",
    paper="Yuan et al. 2026, Behavior Knowledge Merge in Reinforced Agentic Models (RAM+), arXiv:2601.13572",
    params=RamPlusParams,
    model_params=NoParams,
    base="required",
    passes=ramplus_passes,
    card=MethodCard(
        identity=({}, {}),
        typical=({"epsilon": 0.02, "r": 0.5, "alpha": 1.0}, {}),
        grid=({"r": (0.05, 0.1, 0.2)}, {}),
        group="advanced",
    ),
)
def ramplus(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: RamPlusParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """RAM with each model's unique changes scaled by 1 + r·clip(shared/unique, 0, α), counted over the model."""
    if PASS_COUNTS not in ctx.folds:
        raise RuntimeError(f"ramplus: the model-wide counts are missing for tensor {ctx.name!r}")
    counts = ctx.folds[PASS_COUNTS]
    b, deltas = _stack(base, experts)
    scales = rescale_factors(
        torch.tensor(counts["shared"]), torch.tensor(counts["unique"]), params.epsilon, params.r, params.alpha, b.dtype
    )
    return (b + ram_delta(deltas, params.epsilon, scales)).to(base.dtype)
