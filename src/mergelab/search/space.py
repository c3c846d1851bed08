"""The search space file: which parameters of the recipe's method vary, and how.

::

    # space.yaml
    model_parameters:            # per-model parameters: one coordinate per varying expert
      weight: {low: 0.0, high: 1.0}
      density: {low: 0.1, high: 1.0}
    parameters:                  # global parameters of the method
      lambda: {low: 0.3, high: 2.0, log: true}
    layer_granularity: 2         # layers per group: every coordinate once per group (0: one group)
    filters: [self_attn, mlp]    # one parameter set per filter plus one for the other tensors
    smooth: false                # groups as a gradient (interpolated) instead of piecewise constant
    models: [0, 2]               # the experts that vary (index or model reference; default: all)
    decode: mergekit             # |x| for weights, clamp(|x|, 0, 1) for densities (mergekit-evolve)
    sigma0: 0.16667              # CMA-ES's initial step in genome units (mergekit-evolve: 1/6)
    grid_points: 5               # points per coordinate for --algorithm grid (or `grid:` per parameter)
    algorithms:                  # options of the algorithms (each validated by its own model)
      evolver: {f: 0.5, cr: 0.5, max_iters: 15}

A bound is ``{low, high}`` with optional ``log`` (sample on a log scale), ``x0`` (CMA-ES's start;
default: mergekit-evolve's 1/N for weights and 1 for densities, else the midpoint) and ``grid``
(the values of the grid search). The coordinates are decoded into recipe parameters by
:mod:`mergelab.search.genome`; :func:`validate_space` checks every name, bound, start and grid
value against the method's own parameter models before any trial runs, so a typo or a density of
1.5 fails in a second, naming the file and the key.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.errors import ParameterError, RecipeError
from mergelab.methods.base import MergeMethod, MethodParams, is_numeric_annotation


class Bound(BaseModel):
    """The range of one parameter (in genome units: before decoding)."""

    model_config = ConfigDict(extra="forbid")
    low: float
    high: float
    log: bool = False
    x0: float | None = None
    grid: list[float] | None = None

    @model_validator(mode="after")
    def _check(self) -> Bound:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log: true needs low > 0 (got {self.low})")
        if self.x0 is not None and not self.low <= self.x0 <= self.high:
            raise ValueError(f"x0 {self.x0} lies outside [{self.low}, {self.high}]")
        for v in self.grid or ():
            if not self.low <= v <= self.high:
                raise ValueError(f"grid value {v} lies outside [{self.low}, {self.high}]")
        return self

    def grid_values(self, points: int) -> list[float]:
        if self.grid:
            return list(self.grid)
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            return [math.exp(a + (b - a) * i / (points - 1)) for i in range(points)]
        return [self.low + (self.high - self.low) * i / (points - 1) for i in range(points)]


class SearchSpace(BaseModel):
    """A validated space file (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    method: str | None = Field(None, description="the recipe's merge_method (checked when given)")
    parameters: dict[str, Bound] = Field(default_factory=dict)
    model_parameters: dict[str, Bound] = Field(default_factory=dict)
    models: list[int | str] | None = None
    layer_granularity: int = Field(0, ge=0)
    filters: list[str] = Field(default_factory=list)
    smooth: bool = False
    allow_negative_weights: bool = False
    decode: Literal["mergekit", "direct"] = "mergekit"
    sigma0: float = Field(1 / 6, gt=0)
    grid_points: int = Field(5, ge=2)
    algorithms: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("filters")
    @classmethod
    def _filters(cls, v: list[str]) -> list[str]:
        if any(not f for f in v):
            raise ValueError("a filter is an empty string; give a substring of tensor names such as self_attn")
        if len(set(v)) != len(v):
            raise ValueError("a filter is listed twice")
        return v

    @property
    def empty(self) -> bool:
        return not self.parameters and not self.model_parameters

    def options_for(self, algorithm: str) -> dict[str, Any]:
        return dict(self.algorithms.get(algorithm, {}))


def load_space(source: str | os.PathLike[str] | Mapping[str, Any] | SearchSpace | None) -> tuple[SearchSpace, str]:
    """A space and the name errors call it by (the file, or ``space``); None: an empty space."""
    if source is None:
        return SearchSpace(), "space"
    if isinstance(source, SearchSpace):
        return source, "space"
    where = "space"
    if isinstance(source, Mapping):
        data: Any = dict(source)
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise RecipeError(f"{path}: space file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: cannot read the space file ({exc})") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise RecipeError(f"{path}{at}: invalid YAML: {problem}; fix the syntax there") from None
        if data is None:
            data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a space file is a mapping (model_parameters:, parameters:, ...)")
    try:
        return SearchSpace.model_validate(data), where
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "space"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (allowed: " + ", ".join(sorted(SearchSpace.model_fields)) + ")"
        raise RecipeError(f"{where}: {loc}: {msg}") from None


def _field(model: type[MethodParams], key: str) -> tuple[str, Any] | None:
    for name, f in model.model_fields.items():
        if key in (name, f.alias):
            return name, f
    return None


def _keys(model: type[MethodParams]) -> list[str]:
    return sorted(f.alias or n for n, f in model.model_fields.items())


def check_value(
    method: MergeMethod,
    scope: Literal["global", "model"],
    key: str,
    value: float,
    where: str,
    context: Mapping[str, Any],
) -> None:
    """Refuse ``value`` for parameter ``key`` when the method's parameter model does (ParameterError)."""
    model = method.params if scope == "global" else method.model_params
    found = _field(model, key)
    assert found is not None
    name, _ = found
    data = {k: v for k, v in context.items() if _field(model, k) is not None and isinstance(v, (int, float, str, bool))}
    data = {k: v for k, v in data.items() if k not in (key, name)}
    try:
        model.model_validate({**data, key: value})
    except ValidationError as exc:
        for err in exc.errors():
            if err["loc"] and str(err["loc"][0]) in (key, name):
                msg = err["msg"].removeprefix("Value error, ")
                raise ParameterError(f"{where}: {key} = {value:g} is refused by {method.name}: {msg}") from None


def decode_value(space: SearchSpace, key: str, x: float) -> float:
    """A coordinate's value as the method receives it: with ``decode: mergekit`` (mergekit-evolve's
    ``genotype_merge_config``), ``density`` is clamp(|x|, 0, 1) and ``weight`` / ``t`` are |x| unless
    ``allow_negative_weights``; every other value passes unchanged."""
    if space.decode == "mergekit":
        if key == "density":
            return min(max(abs(x), 0.0), 1.0)
        if key in ("weight", "t") and not space.allow_negative_weights:
            return abs(x)
    return float(x)


def decoded_range(space: SearchSpace, key: str, bound: Bound) -> tuple[float, float]:
    """The values a coordinate can decode to (what the method receives)."""
    lo, hi = bound.low, bound.high
    if space.decode == "mergekit":
        if key == "density":
            a, b = sorted((min(abs(lo), 1.0), min(abs(hi), 1.0)))
            return (0.0 if lo <= 0 <= hi else a), b
        if key in ("weight", "t") and not space.allow_negative_weights:
            a, b = sorted((abs(lo), abs(hi)))
            return (0.0 if lo <= 0 <= hi else a), b
    return lo, hi


def validate_space(
    space: SearchSpace, method: MergeMethod, where: str, recipe_parameters: Mapping[str, Any] | None = None
) -> None:
    """Check the space against the method's parameter models (names, kinds, bounds, starts, grids)."""
    context = dict(recipe_parameters or {})
    if space.method is not None and space.method != method.name and space.method not in method.aliases:
        raise RecipeError(
            f"{where}: method: the space is for {space.method!r} but the recipe merges with {method.name!r}; "
            "make them agree"
        )
    Section = tuple[Literal["global", "model"], dict[str, Bound], type[MethodParams], type[MethodParams]]
    sections: tuple[Section, ...] = (
        ("global", space.parameters, method.params, method.model_params),
        ("model", space.model_parameters, method.model_params, method.params),
    )
    for scope, bounds, model, other in sections:
        section = "parameters" if scope == "global" else "model_parameters"
        for key, bound in bounds.items():
            found = _field(model, key)
            if found is None:
                if _field(other, key) is not None:
                    right = "model_parameters" if scope == "global" else "parameters"
                    raise ParameterError(
                        f"{where}: {section}.{key}: {key!r} is a "
                        f"{'per-model' if scope == 'global' else 'global'} parameter of {method.name}: "
                        f"move it under {right}"
                    )
                raise ParameterError(
                    f"{where}: {section}.{key}: {method.name} has no {'global' if scope == 'global' else 'per-model'} "
                    f"parameter {key!r} (allowed: {', '.join(_keys(model)) or 'none'})"
                )
            _, f = found
            if not is_numeric_annotation(f.annotation):
                raise ParameterError(
                    f"{where}: {section}.{key}: {method.name}'s {key!r} is not a number; only numeric parameters vary"
                )
            lo, hi = decoded_range(space, key, bound)
            starts = [
                decode_value(space, key, v) for v in (*(bound.grid or ()), *(() if bound.x0 is None else (bound.x0,)))
            ]
            for v in sorted({lo, hi, *starts}):
                check_value(method, scope, key, v, f"{where}: {section}.{key}", context)
    if space.smooth and space.layer_granularity == 0:
        raise RecipeError(f"{where}: smooth: true needs layer groups (layer_granularity > 0)")
