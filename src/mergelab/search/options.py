"""The options of each search algorithm, typed and validated before any trial runs.

They are given in the space file under ``algorithms: {<name>: {...}}`` (or from Python as a
mapping); unknown keys are refused, and the defaults are the papers' (or the official code's, where
the paper is silent), each noted where it is used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergelab.errors import ParameterError

ALGORITHMS = ("cma", "tpe", "random", "grid", "evolver", "map", "fw")
OPTUNA_ALGORITHMS = ("cma", "tpe", "random", "grid")


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CmaOptions(_Options):
    """CMA-ES through Optuna's ``CmaEsSampler`` (mergekit-evolve runs ``cma.fmin2`` the same way:
    x0 from the genome, σ0 = the space's ``sigma0``)."""

    popsize: int | None = Field(None, ge=2, description="population size (default: CMA-ES's 4 + 3 ln n)")
    restart_strategy: Literal["ipop", "bipop"] | None = None
    start_at_x0: bool = Field(True, description="evaluate x0 itself first (the first CMA-ES mean)")


class TpeOptions(_Options):
    """Optuna's TPE (Bergstra et al. 2011)."""

    n_startup_trials: int = Field(10, ge=1)
    multivariate: bool = False


class RandomOptions(_Options):
    """Uniform (log-uniform on log scales) sampling within the bounds."""


class GridOptions(_Options):
    """Every point of the grid (the space's ``grid_points`` per coordinate, or its ``grid`` values),
    in Optuna's ``GridSampler`` order (above 2^20 points: distinct points drawn uniformly, see
    :mod:`mergelab.search.lazy_grid`); the budget is capped at the grid's size."""


class EvolverOptions(_Options):
    """Evolver (Du et al., ACL Findings 2024): see :mod:`mergelab.search.evolver`."""

    f: float = Field(0.5, gt=0, le=1, description="interpolation factor toward the reference individual")
    cr: float = Field(0.5, gt=0, le=1, description="per-coordinate crossover rate")
    max_iters: int = Field(15, ge=1)
    merger: bool = Field(
        False,
        description="score the merged population with the recipe's method (Evolver + merger) instead of each "
        "individual on its own (the paper's Evolver)",
    )


class MapOptions(_Options):
    """MAP (Li et al.): see :mod:`mergelab.search.map`."""

    samples: int | None = Field(
        None, ge=1, description="evaluated points, one-hot anchors included (default: T anchors + (T+1)(T+2)/2)"
    )
    prop_isotropic: float = Field(0.0, ge=0, lt=1, description="share of isotropic (and perturbed isotropic) points")
    preference: list[float] | None = Field(None, description="one weight per task (default: equal)")
    domain: tuple[float, float] = Field((-3.0, 3.0), description="NSGA-III's search box per coefficient")
    population: int = Field(100, ge=4)
    generations: int = Field(25, ge=1)
    nested: bool = Field(False, description="merge pairs of tasks with the closest accuracies, one MAP each")
    nested_samples: int = Field(20, ge=6)
    nested_prop_isotropic: float = Field(0.2, ge=0, lt=1)
    coefficient: str = Field("weight", description="the per-model parameter that carries each task's coefficient")

    @model_validator(mode="after")
    def _domain(self) -> MapOptions:
        if not self.domain[0] < self.domain[1]:
            raise ValueError("domain: low must be below high")
        return self


class FwOptions(_Options):
    """Frank–Wolfe merging (FW-Merging): see :mod:`mergelab.search.fw`."""

    max_iters: int = Field(10, ge=1)
    step_size: float = Field(1.0, gt=0)
    inner_method: str = Field("ties", description="the merge that initialises and applies each step")
    inner_parameters: dict[str, Any] = Field(default_factory=lambda: {"lambda": 0.9, "scope": "global"})
    inner_model_parameters: dict[str, Any] = Field(default_factory=lambda: {"density": 0.3})
    zero_fallback: bool = Field(
        False, description="official code: a tensor whose best cosine is >= 0 steps toward zero"
    )
    granularity: Literal["tensor", "model"] = "tensor"
    include_initial: bool = Field(True, description="add the initial merge to the pool (official code)")
    score_each: bool = Field(True, description="score every iterate on the objective (the convergence curve)")


OPTIONS: dict[str, type[_Options]] = {
    "cma": CmaOptions,
    "tpe": TpeOptions,
    "random": RandomOptions,
    "grid": GridOptions,
    "evolver": EvolverOptions,
    "map": MapOptions,
    "fw": FwOptions,
}


def algorithm_options(algorithm: str, given: Mapping[str, Any] | None, where: str) -> Any:
    """The algorithm's options model from the space file's ``algorithms.<name>`` mapping."""
    if algorithm not in OPTIONS:
        raise ParameterError(f"--algorithm {algorithm!r}: unknown; use one of {', '.join(ALGORITHMS)}")
    try:
        return OPTIONS[algorithm].model_validate(dict(given or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or algorithm
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown option (allowed: " + ", ".join(sorted(OPTIONS[algorithm].model_fields)) + ")"
        raise ParameterError(f"{where}: algorithms.{algorithm}.{loc}: {msg}") from None
