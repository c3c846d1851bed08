"""The hyperparameter grid of every method on the leaderboard, declared in one place.

Each point is ``(parameters, model_parameters)``: the method's global parameters and the
per-model parameters given to every expert alike (experts are weighted equally). The bench
merges each point, scores it on the validation split, keeps the best average normalized
accuracy and reports that point on the test split. Ranges follow the papers' recommendations
for merging many experts:

* task arithmetic: λ in 0.1…1.0 (Ilharco et al. 2023 pick λ on validation from this range);
* TIES: density (top-k fraction) 0.1/0.2/0.3 × λ from 1 to 2.5, since the disjoint mean is
  already an average (Yadav et al. 2023) and short LP-FT experts have small task vectors;
* DARE / DELLA: keep rate 0.1…0.5 (DARE) or 0.3…0.7 (DELLA), λ like their base method
  (linear variants sum the task vectors, ties variants average the agreeing ones);
* breadcrumbs: keep the 90 % / 70 % middle band after dropping the top 1 % (Davari &
  Belilovsky 2024 defaults), λ as for the base method;
* linear and Model Stock have no free parameter (one point).

A method registered in :mod:`mergelab.methods` but absent here gets one point with its
defaults, so a new method shows up on the leaderboard without an edit here.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GridPoint:
    parameters: Mapping[str, Any] = field(default_factory=dict)
    model_parameters: Mapping[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        items = {**self.parameters, **self.model_parameters}
        return ", ".join(f"{k}={v}" for k, v in items.items()) or "defaults"

    def to_dict(self) -> dict[str, Any]:
        return {"parameters": dict(self.parameters), "model_parameters": dict(self.model_parameters)}


def product(
    params: Mapping[str, Sequence[Any]] | None = None, model: Mapping[str, Sequence[Any]] | None = None
) -> tuple[GridPoint, ...]:
    """Every combination of the listed values (global axes vary slowest)."""
    params, model = dict(params or {}), dict(model or {})
    axes = [(k, v, "p") for k, v in params.items()] + [(k, v, "m") for k, v in model.items()]
    points = []
    for combo in itertools.product(*[values for _, values, _ in axes]):
        p = {k: c for (k, _, s), c in zip(axes, combo, strict=True) if s == "p"}
        m = {k: c for (k, _, s), c in zip(axes, combo, strict=True) if s == "m"}
        points.append(GridPoint(p, m))
    return tuple(points)


LAMBDA_SUM = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LAMBDA_SUM_SPARSE = (0.2, 0.4, 0.7, 1.0)
LAMBDA_MEAN = (1.0, 1.5, 2.0, 2.5)
LAMBDA_MEAN_SPARSE = (1.0, 1.5, 2.0)

GRIDS: dict[str, tuple[GridPoint, ...]] = {
    "linear": (GridPoint(),),
    "task_arithmetic": product({"lambda": LAMBDA_SUM}),
    "ties": product({"lambda": LAMBDA_MEAN}, {"density": (0.1, 0.2, 0.3)}),
    "dare_linear": product({"lambda": LAMBDA_SUM_SPARSE}, {"density": (0.1, 0.3, 0.5)}),
    "dare_ties": product({"lambda": LAMBDA_MEAN_SPARSE}, {"density": (0.1, 0.3, 0.5)}),
    "breadcrumbs": product({"lambda": LAMBDA_SUM_SPARSE}, {"density": (0.7, 0.9), "gamma": (0.01,)}),
    "breadcrumbs_ties": product({"lambda": LAMBDA_MEAN_SPARSE}, {"density": (0.7, 0.9), "gamma": (0.01,)}),
    "della": product({"lambda": LAMBDA_MEAN_SPARSE}, {"density": (0.3, 0.5, 0.7)}),
    "della_linear": product({"lambda": LAMBDA_SUM_SPARSE}, {"density": (0.3, 0.5, 0.7)}),
    "model_stock": (GridPoint(),),
}

LEADERBOARD_METHODS: tuple[str, ...] = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
)
"""Methods of ``mergelab bench`` when none are named (every multi-expert method)."""

DEMO_METHODS: tuple[str, ...] = ("task_arithmetic", "ties", "dare_ties")

DEMO_GRIDS: dict[str, tuple[GridPoint, ...]] = {
    "task_arithmetic": product({"lambda": (0.4, 0.7, 1.0, 1.3)}),
    "ties": product({"lambda": (1.5, 2.0, 2.5)}, {"density": (0.2,)}),
    "dare_ties": product({"lambda": (1.0, 1.5, 2.0)}, {"density": (0.3,)}),
}
"""Smaller grids for ``mergelab demo`` (quick zoo, a minute or two of merging and scoring)."""


def grid_for(method: str) -> tuple[GridPoint, ...]:
    return GRIDS.get(method, (GridPoint(),))


def edge_axes(point: GridPoint, points: Sequence[GridPoint]) -> list[str]:
    """Names of the axes on which ``point`` sits at the smallest or largest value of the grid.

    A choice on the edge means the best value may lie outside the grid: widen it.
    """
    out = []
    for scope in ("parameters", "model_parameters"):
        mine = getattr(point, scope)
        for key, value in mine.items():
            values = {getattr(p, scope).get(key) for p in points} - {None}
            numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(numeric) > 1 and isinstance(value, (int, float)) and value in (min(numeric), max(numeric)):
                out.append(key)
    return out


def check_grid(method: str, n_experts: int, points: Sequence[GridPoint] | None = None) -> str | None:
    """Why ``method`` cannot run its grid on ``n_experts`` experts, or ``None`` if it can.

    Validates every point against the method's parameter models, so a typo in a grid fails
    before any merge is computed.
    """
    from mergelab.methods import get_method

    spec = get_method(method)
    if n_experts < spec.min_experts:
        return f"needs at least {spec.min_experts} experts"
    if spec.max_experts is not None and n_experts > spec.max_experts:
        return f"merges at most {spec.max_experts} expert(s) with a base; the zoo has {n_experts}"
    for point in grid_for(method) if points is None else points:
        try:
            spec.params.model_validate(dict(point.parameters))
            spec.model_params.model_validate(dict(point.model_parameters))
        except Exception as exc:  # pydantic.ValidationError
            raise ValueError(f"grid point {point.label()} of {method} is invalid: {exc}") from exc
    return None
