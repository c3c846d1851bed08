"""LiNeS: scale a task vector (one expert's, or a merged one) linearly with layer depth.

Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret, Frossard 2024, "LiNeS: Post-training Layer
Scaling Prevents Forgetting and Enhances Model Merging", arXiv:2410.17146.

θ = θ0 + f(ℓ) ⊙ τ with, for a tensor in transformer block ℓ of L blocks (ℓ = 0..L − 1),
f(ℓ) = α + β · ℓ/(L − 1), and f = α for tensors outside the blocks (embeddings, final norm, head).
ℓ and L come from the engine (``ctx.layer``/``ctx.num_layers``: the block index parsed from the
tensor name, the depth from config.json); with L = 1 every block gets α. No further λ.

Two uses (``mode``):

``multi_task`` — on top of any merge: τ = the merged task vector of ``merge_method`` (a registered
    method, default ``task_arithmetic``) called with ``merge_parameters`` and the per-model
    parameters, per tensor: τ = merged − θ0. α = (‖Σ_i τ_i‖₁ / ‖τ‖₁) · (1/T), the L1 norms taken
    over the whole model (unweighted Σ_i τ_i, as the reference), unless ``alpha`` is given; for
    plain task arithmetic this is 1/T. β (``beta``) is swept by the user on validation data (the
    paper's grids: 0.1–1.0 for task arithmetic, 0.1–1.5 for TIES); default 0.5, the middle of the
    task-arithmetic grid (the paper reports no single default).
``single_task`` — editing one fine-tuned model (one expert): τ = that expert's task vector through
    the same ``merge_method`` (with the default task arithmetic and one expert, exactly τ_1),
    α given (``alpha``, required; the paper sweeps 0, 0.1, …, 1), β = 1 − α unless ``beta`` is set,
    so the last block keeps the whole update.
``auto`` (default) — ``single_task`` with one expert, ``multi_task`` otherwise.

Granularity: the factor is per block (every tensor of block ℓ gets f(ℓ)); the multi-task α is
global (two model-wide L1 norms, gathered in one read pass before the merge: one float64 pair per
tensor, summed in name order so that any tensor order gives the same α); the inner merge keeps its
own granularity, and its own gather passes (e.g. TIES ``scope: global``) run first.

Reference code (wang-kee/LiNeS ``src/eval/eval.py`` ``LiNeS_scaling``, ``src/eval/aggregation.py``):

* The reference finds blocks by the substring ``.{i}.`` in the key (which can match other
  numbers in a name) and hard-codes L (12 or 24); here the engine's layer index and depth are used.
* The reference's merged vectors carry no λ (TIES dis-mean/sum, TA sum); the inner method's own
  λ (default 1) multiplies τ, which the norm ratio cancels in the α term but not in the β term.
* Where the whole model's merged task vector is zero (α = 0/0) α is taken as 1/T (τ is 0 anyway).

Recipe form: ``merge_parameters`` is a YAML/JSON mapping *written as a string* in recipes and in
``merge_state_dicts``/``merge_tensors`` (e.g. ``merge_parameters: "{lambda: 1.0, scope: global}"``),
because the recipe resolver reads a mapping value as a filter condition; a list of
``{filter, value}`` conditions whose values are such strings varies it per tensor. Python code
calling the method directly may pass a dict. Per-model ``weight``, ``density``, ``gamma`` and
``epsilon`` are forwarded to the inner method when set (and validated by it when a tensor is merged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, cast

import torch
import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from mergelab.errors import ParameterError
from mergelab.methods.base import Fold, MergeMethod, MethodCard, MethodParams, TensorContext
from mergelab.methods.kernels.tensors import work_dtype
from mergelab.methods.registry import get_method, method

Tensor = torch.Tensor

#: ``ctx.folds`` key of the L1-norm pass.
PASS_L1 = "lines.l1"

#: Per-model parameters forwarded to the inner method when set.
FORWARDED_MODEL_PARAMS = ("weight", "density", "gamma", "epsilon")


def parse_mapping(value: Any) -> dict[str, Any]:
    """A dict from a dict, or from a YAML/JSON mapping string ("" or None → {})."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"merge_parameters is not a YAML/JSON mapping: {exc}") from None
        if parsed is None:
            return {}
        if not isinstance(parsed, dict):
            # ValueError, not TypeError: pydantic reports a validator's ValueError only
            raise ValueError(f"merge_parameters must be a mapping such as '{{lambda: 1.0}}', got {value!r}")
        return parsed
    raise ValueError(f"merge_parameters must be a mapping (a string in recipes), got {value!r}")


class LinesParams(MethodParams):
    merge_method: str = Field("task_arithmetic", description="registered method whose merged task vector is scaled")
    merge_parameters: dict[str, Any] | str = Field(
        "",
        description="global parameters of merge_method, as a YAML/JSON mapping string in recipes, e.g. '{lambda: 1.0}'",
    )
    mode: Literal["auto", "multi_task", "single_task"] = Field(
        "auto", description="auto: single_task with one expert, multi_task otherwise"
    )
    alpha: float | None = Field(
        None,
        allow_inf_nan=False,
        description="factor of the first block and of tensors outside blocks; multi_task default: "
        "(‖Σ τ_i‖₁/‖τ_merged‖₁)/T over the model; required for single_task",
    )
    beta: float | None = Field(
        None,
        allow_inf_nan=False,
        description="increase of the factor from the first to the last block; default 0.5 (multi_task), "
        "1 − alpha (single_task)",
    )

    _inner: MergeMethod = PrivateAttr()
    _inner_params: MethodParams = PrivateAttr()

    @model_validator(mode="after")
    def _resolve_inner(self) -> LinesParams:
        inner = get_method(self.merge_method)
        if inner.name == "lines":
            raise ValueError("merge_method cannot be lines itself")
        if inner.outputs != "model":
            raise ValueError(f"merge_method {inner.name} returns per-task parts, not one merged model")
        self._inner = inner
        try:
            self._inner_params = inner.params.model_validate(parse_mapping(self.merge_parameters))
        except ValidationError as exc:
            allowed = sorted(f.alias or n for n, f in inner.params.model_fields.items())
            detail = "; ".join(
                f"unknown parameter {'.'.join(str(x) for x in e['loc'])!r}"
                if e["type"] == "extra_forbidden"
                else f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}"
                for e in exc.errors()
            )
            raise ValueError(
                f"merge_parameters for {inner.name}: {detail} (its global parameters: {', '.join(allowed) or 'none'})"
            ) from None
        if self.mode == "single_task" and self.alpha is None:
            raise ValueError("mode single_task needs alpha (the paper sweeps 0, 0.1, …, 1; beta = 1 − alpha)")
        return self

    @property
    def inner(self) -> MergeMethod:
        """The validated inner method."""
        return self._inner

    @property
    def inner_params(self) -> MethodParams:
        """The inner method's validated global parameters."""
        return self._inner_params


class LinesModelParams(MethodParams):
    weight: float | None = Field(None, allow_inf_nan=False, description="forwarded to merge_method when set")
    density: float | None = Field(None, allow_inf_nan=False, description="forwarded to merge_method when set")
    gamma: float | None = Field(None, allow_inf_nan=False, description="forwarded to merge_method when set")
    epsilon: float | None = Field(None, allow_inf_nan=False, description="forwarded to merge_method when set")


def inner_model_params(params: LinesParams, model_params: Sequence[LinesModelParams]) -> list[MethodParams]:
    """Validate the forwarded per-model parameters against the inner method (a ParameterError,
    reported as is by the engine, also from a gather pass)."""
    out = []
    for i, mp in enumerate(model_params):
        values = {k: getattr(mp, k) for k in FORWARDED_MODEL_PARAMS if getattr(mp, k) is not None}
        try:
            out.append(params.inner.model_params.model_validate(values))
        except ValidationError as exc:
            detail = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ParameterError(
                f"lines: per-model parameters for merge_method {params.inner.name} (expert {i + 1}): {detail}"
            ) from None
    return out


def merged_task_vector(
    base: Tensor,
    experts: Sequence[Tensor],
    params: LinesParams,
    model_params: Sequence[LinesModelParams],
    ctx: TensorContext,
) -> Tensor:
    """τ = inner merge − θ0 for this tensor (float32; float64 under a float64 compute dtype)."""
    inner = params.inner
    n = len(experts)
    if n < inner.min_experts or (inner.max_experts is not None and n > inner.max_experts):
        raise ParameterError(f"lines: merge_method {inner.name} cannot merge {n} experts")
    # LinesParams accepts only inner methods with outputs == "model": a tensor, never a MethodOutput
    merged = cast(
        Tensor,
        inner.fn(
            None if inner.base == "ignored" else base,
            experts,
            params.inner_params,
            inner_model_params(params, model_params),
            ctx,
        ),
    )
    w = work_dtype(base)
    return merged.to(w) - base.to(w)


def _single(params: LinesParams, n_experts: int) -> bool:
    return params.mode == "single_task" or (params.mode == "auto" and n_experts == 1)


# --------------------------------------------------------------------------------------------
# Gather passes: the inner method's (translated to its parameters), then the two L1 norms
# --------------------------------------------------------------------------------------------


def _wrap_inner_pass(gp: Fold) -> Fold:
    def init(params: LinesParams, n_experts: int) -> Any:
        return gp.init(params.inner_params, n_experts)

    def update(state, base, experts, params: LinesParams, model_params, ctx) -> None:
        gp.update(state, base, experts, params.inner_params, inner_model_params(params, model_params), ctx)

    def finish(state, params: LinesParams, n_experts: int) -> Any:
        return gp.finish(state, params.inner_params, n_experts)

    return Fold(gp.name, init, update, finish, gp.combine)


def _l1_init(params: LinesParams, n_experts: int) -> dict[str, Any]:
    return {"n": n_experts, "per_tensor": {}}


def _l1_update(state, base, experts, params: LinesParams, model_params, ctx) -> None:
    if _single(params, len(experts)) or params.alpha is not None:
        return
    w = work_dtype(base)
    b = base.to(w)
    total = torch.zeros_like(b)
    for e in experts:
        total.add_(e.to(w)).sub_(b)
    sum_l1 = float(total.abs().sum(dtype=torch.float64))
    del total
    merged = merged_task_vector(base, experts, params, model_params, ctx)
    state["per_tensor"][ctx.name] = (sum_l1, float(merged.abs().sum(dtype=torch.float64)))


def _l1_combine(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"n": a["n"], "per_tensor": {**a["per_tensor"], **b["per_tensor"]}}


def _l1_finish(state, params: LinesParams, n_experts: int) -> dict[str, float]:
    sum_l1 = math.fsum(state["per_tensor"][k][0] for k in sorted(state["per_tensor"]))
    merged_l1 = math.fsum(state["per_tensor"][k][1] for k in sorted(state["per_tensor"]))
    n = max(n_experts, 1)
    alpha = (sum_l1 / merged_l1) / n if merged_l1 > 0 else 1.0 / n
    return {"sum_l1": sum_l1, "merged_l1": merged_l1, "alpha": alpha}


def lines_passes(method_params: MethodParams) -> tuple[Fold, ...]:
    """The inner method's passes, then the L1 pass when α is computed (multi-task, no ``alpha``)."""
    params = cast(LinesParams, method_params)  # the registry validates lines' parameters as LinesParams
    passes = [_wrap_inner_pass(gp) for gp in params.inner.passes(params.inner_params)]
    if params.alpha is None and params.mode != "single_task":
        passes.append(Fold(PASS_L1, _l1_init, _l1_update, _l1_finish, _l1_combine))
    return tuple(passes)


def depth_factor(alpha: float, beta: float, ctx: TensorContext) -> float:
    """f = α + β·ℓ/(L − 1) inside block ℓ, α outside blocks (and for L = 1, 0 depth)."""
    depth = ctx.depth
    return alpha if depth is None else alpha + beta * depth


@method(
    "lines",
    paper="Wang et al. 2024, LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model "
    "Merging, arXiv:2410.17146",
    params=LinesParams,
    model_params=LinesModelParams,
    base="required",
    passes=lines_passes,
    card=MethodCard(
        identity=({"beta": 0.0}, {}),  # task arithmetic: tau_m = T tau, alpha = 1/T
        typical=({"beta": 0.5, "merge_method": "ties", "merge_parameters": "{scope: global}"}, {"density": 0.3}),
        grid=({"merge_method": ("task_arithmetic",), "beta": (0.2, 0.4, 0.6, 0.8, 1.0)}, {}),
        group="advanced",
    ),
)
def lines(
    base: Tensor,
    experts: Sequence[Tensor],
    params: LinesParams,
    model_params: Sequence[LinesModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Scale a (merged) task vector by α + β·depth: shallow blocks stay near the base."""
    if _single(params, len(experts)):
        if params.alpha is None:
            raise ParameterError("lines on one expert (single-task edit) needs alpha; beta defaults to 1 − alpha")
        alpha = params.alpha
        beta = 1.0 - alpha if params.beta is None else params.beta
    else:
        if params.alpha is not None:
            alpha = params.alpha
        else:
            if PASS_L1 not in ctx.folds:
                raise RuntimeError(f"lines: the L1-norm gather pass result is missing for tensor {ctx.name!r}")
            alpha = ctx.folds[PASS_L1]["alpha"]
        beta = 0.5 if params.beta is None else params.beta
    tau = merged_task_vector(base, experts, params, model_params, ctx)
    factor = depth_factor(alpha, beta, ctx)
    return (base.to(tau.dtype) + factor * tau).to(base.dtype)
