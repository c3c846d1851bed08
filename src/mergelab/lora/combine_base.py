"""What every rule that combines LoRA adapters into one adapter shares.

A combination rule takes, per LoRA module (keyed by the module's name), one
:class:`~mergelab.lora.factors.LoraFactors` per input adapter in recipe order (``None`` where that
adapter does not adapt the module), plus one weight per adapter and the rule's typed parameters,
and returns one :class:`LoraFactors` per module: the merged adapter. Rules are pure functions of
tensors; reading adapters and writing the result belong to :mod:`mergelab.lora.reader` and the
``peft_adapter`` sink.

This module holds the input checks, the parameter base class and :func:`merge_groups`, which runs a
registered merge method (:mod:`mergelab.methods.registry`) on small per-module matrices (Core Space's
core matrices, KnOTS's per-task ``sV`` blocks) as if they were a model's tensors: the method's folds
first, over every module in order (so ``scope: global`` statistics span all modules, exactly as the
streaming executor folds a model), then the method per module with a zero base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import ValidationError

from mergelab.errors import InternalError, MergelabError, ParameterError, PlanError, RecipeError
from mergelab.lora.factors import LoraFactors
from mergelab.methods.base import MethodOutput, MethodParams, TensorContext
from mergelab.methods.registry import get_method

Tensor = torch.Tensor

#: Per module name, one entry per input adapter (recipe order); ``None``: the adapter lacks the module.
AdapterModules = Mapping[str, Sequence["LoraFactors | None"]]

#: ``apply``: ΔWᵢ = sᵢ·Bᵢ·Aᵢ with each adapter's true scaling (α/r, α/√r, patterns);
#: ``ignore``: ΔWᵢ = Bᵢ·Aᵢ, the raw factors, as the KnOTS and Core Space reference code does
#: (harmless only when every adapter has α = r).
LoraScaling = Literal["apply", "ignore"]

SvdDtype = Literal["float32", "float64"]


class CombineParams(MethodParams):
    """Base of every combination rule's parameter model (unknown keys rejected, values validated)."""


def torch_dtype(name: SvdDtype) -> torch.dtype:
    return torch.float64 if name == "float64" else torch.float32


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 factors are combined in float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def validate_params(
    model: type[CombineParams] | type[MethodParams], values: Mapping[str, Any] | None, where: str
) -> Any:
    """``model(**values)`` or a one-line :class:`ParameterError` naming ``where`` and each bad key."""
    if values is not None and not isinstance(values, Mapping):
        raise ParameterError(f"{where}: expected a mapping of parameter names to values, got {type(values).__name__}")
    try:
        return model.model_validate(dict(values or {}))
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "parameters"
            parts.append(f"{loc}: {err['msg']}")
        raise ParameterError(f"{where}: " + "; ".join(parts)) from None


def check_weights(weights: Sequence[float] | None, n: int, rule: str) -> list[float]:
    """One finite float per adapter (default 1.0 each)."""
    if weights is None:
        return [1.0] * n
    out = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not torch.isfinite(torch.tensor(float(w))):
            raise ParameterError(f"combine {rule}: weight of adapter {i} is {w!r}; give a finite number")
        out.append(float(w))
    if len(out) != n:
        raise ParameterError(f"combine {rule}: {len(out)} weights for {n} adapters; give one weight per adapter")
    return out


def check_modules(modules: AdapterModules, rule: str, *, min_adapters: int = 1) -> int:
    """The number of adapters T; every module lists T entries whose shapes and layouts agree.

    Raises a one-line :class:`PlanError` naming the module and the adapter otherwise.
    """
    if not isinstance(modules, Mapping):
        raise RecipeError(f"combine {rule}: expected a mapping module name -> factors per adapter")
    counts = {len(v) for v in modules.values()}
    if not modules:
        raise PlanError(f"combine {rule}: no LoRA module to combine; the adapters adapt nothing")
    if len(counts) != 1:
        raise PlanError(
            f"combine {rule}: modules list different numbers of adapters ({sorted(counts)}); one entry each"
        )
    (n,) = counts
    if n < min_adapters:
        raise PlanError(f"combine {rule}: needs at least {min_adapters} adapter(s), got {n}")
    for name, entries in modules.items():
        shape: tuple[int, int] | None = None
        transposed: bool | None = None
        for i, f in enumerate(entries):
            if f is None:
                continue
            if not isinstance(f, LoraFactors):
                raise RecipeError(
                    f"combine {rule}: module {name!r}, adapter {i}: expected LoraFactors, got {type(f).__name__}"
                )
            a, b = f.A, f.B
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
                raise PlanError(
                    f"combine {rule}: module {name!r}, adapter {i}: A {list(a.shape)} and B {list(b.shape)} are not "
                    "r×in and out×r factors of one rank; the adapter file is inconsistent"
                )
            if a.shape[0] == 0:
                raise PlanError(
                    f"combine {rule}: module {name!r}, adapter {i}: rank 0; drop the module from the adapter"
                )
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise PlanError(f"combine {rule}: module {name!r}, adapter {i}: NaN or Inf in the factors")
            here = (int(b.shape[0]), int(a.shape[1]))
            if shape is None:
                shape, transposed = here, f.transposed
            elif here != shape:
                raise PlanError(
                    f"combine {rule}: module {name!r}: adapter {i} updates a {here[0]}×{here[1]} weight, an earlier "
                    f"adapter a {shape[0]}×{shape[1]} one; the adapters must be of the same base model"
                )
            elif f.transposed != transposed:
                raise PlanError(
                    f"combine {rule}: module {name!r}: adapter {i} has fan_in_fan_out={f.transposed}, an earlier "
                    f"adapter {transposed}; the adapters disagree on the module's layout"
                )
    return n


def present(entries: Sequence[LoraFactors | None]) -> list[tuple[int, LoraFactors]]:
    """(adapter index, factors) of the adapters that adapt this module."""
    return [(i, f) for i, f in enumerate(entries) if f is not None]


def module_shape(entries: Sequence[LoraFactors | None]) -> tuple[int, int, bool]:
    """(out, in, transposed) of a module (some entry is not ``None``)."""
    f = next(e for e in entries if e is not None)
    return int(f.B.shape[0]), int(f.A.shape[1]), f.transposed


def merge_groups(
    method_name: str,
    groups: Mapping[str, Sequence[Tensor]],
    parameters: Mapping[str, Any] | None,
    model_parameters: Sequence[Mapping[str, Any]],
    *,
    seed: int = 0,
    where: str = "combine",
) -> dict[str, Tensor]:
    """Merge each group of same-shaped tensors (one per adapter) with a registered merge method.

    The method sees every group as one tensor of a model whose base is zero, so the result is the
    merged update itself. Its folds (model-wide statistics such as TIES ``scope: global`` thresholds)
    run first over all groups in mapping order, as the streaming executor runs them over a model's
    tensors, so a global selection spans every module. Routed and data-informed methods are refused
    (they need task parts or calibration data that adapter combination has no place for).
    """
    spec = get_method(method_name)
    if spec.outputs != "model":
        raise RecipeError(f"{where}: method {spec.name!r} writes routed parts, not one tensor; pick a model method")
    if spec.statistics is not None:
        raise RecipeError(
            f"{where}: method {spec.name!r} needs calibration statistics of full models; pick a data-free method"
        )
    n = len(model_parameters)
    if n < spec.min_experts or (spec.max_experts is not None and n > spec.max_experts):
        if spec.max_experts is None:
            span = f"at least {spec.min_experts}"
        elif spec.max_experts == spec.min_experts:
            span = f"exactly {spec.min_experts}"
        else:
            span = f"{spec.min_experts} to {spec.max_experts}"
        raise RecipeError(
            f"{where}: method {spec.name!r} merges {span} expert(s) besides its base, got {n} adapters; "
            "pick another method or change the number of adapters"
        )
    params = validate_params(spec.params, parameters, f"{where}: {spec.name} parameters")
    model_params = tuple(
        validate_params(spec.model_params, mp, f"{where}: {spec.name} parameters of adapter {i}")
        for i, mp in enumerate(model_parameters)
    )

    def base_of(experts: Sequence[Tensor]) -> Tensor | None:
        return None if spec.base == "ignored" else torch.zeros_like(experts[0])

    folds: dict[str, Any] = {}
    try:
        with torch.no_grad():
            for fold in spec.passes(params):
                state = fold.init(params, n)
                for name, experts in groups.items():
                    ctx = TensorContext(name=name, seed=seed, folds=dict(folds))
                    fold.update(state, base_of(experts), list(experts), params, model_params, ctx)
                folds[fold.name] = fold.finish(state, params, n)
            out: dict[str, Tensor] = {}
            for name, experts in groups.items():
                ctx = TensorContext(name=name, seed=seed, folds=dict(folds))
                merged = spec(base_of(experts), list(experts), params, model_params, ctx)
                if isinstance(merged, MethodOutput):
                    merged = merged.merged
                if tuple(merged.shape) != tuple(experts[0].shape):
                    raise InternalError(
                        f"{where}: {spec.name} returned shape {list(merged.shape)} for {name!r}, "
                        f"expected {list(experts[0].shape)} (a method bug: please report it)"
                    )
                out[name] = merged
    except MergelabError:
        raise
    except Exception as exc:
        raise InternalError(f"{where}: {spec.name} failed: {type(exc).__name__}: {exc}") from exc
    return out
