"""The hyperparameter grid of every method on the leaderboard, declared in one place.

Each point is ``(parameters, model_parameters)``: the method's global parameters and the
per-model parameters given to every expert alike (experts are weighted equally). The bench
merges each point, scores it on the validation split, keeps the best average normalized
accuracy and reports that point on the test split. Ranges follow the papers' recommendations
for merging many experts:

* task arithmetic: λ in 0.1…1.0 (Ilharco et al. 2023 pick λ on validation from this range);
* TIES: density (top-k fraction) 0.1/0.2/0.3 × λ from 1 to 3, since the disjoint mean is
  already an average (Yadav et al. 2023) and short LP-FT experts have small task vectors;
* DARE / DELLA: keep rate 0.1…0.5 (DARE) or 0.3…0.7 (DELLA), λ like their base method
  (linear variants sum the task vectors, ties variants average the agreeing ones);
* breadcrumbs: keep the 90 % / 70 % middle band after dropping the top 1 % (Davari &
  Belilovsky 2024 defaults), λ as for the base method;
* linear and Model Stock have no free parameter (one point).

Advanced data-free methods (:data:`ADVANCED_METHODS`), each grid at most six points:

* TALL masks (Wang et al. 2024, arXiv:2405.07813): λ_t from the reference grid 0.2…0.6
  (0.2/0.4/0.6 here) × τ_MTL from task arithmetic or TIES; a *routed* method: every task is
  scored with its own reconstruction θ0 + m_t ⊙ τ_MTL (see :mod:`mergelab_bench.eval.routed`);
* consensus (same paper): k = 2 (the reference), α over 0.4/0.7/1.0 (the reference picks it
  from 0.1…1.0 on validation) × TA / TIES dis-sum;
* EMR (Huang et al. 2024, arXiv:2405.17461): tuning-free (one point), routed like TALL
  (θ0 + λ_t m_t ⊙ τ_uni per task);
* TSV-M (Gargiulo et al. 2025, arXiv:2412.00081): α = 1 in the paper; 0.8/1.0/1.2 around it;
* ISO-C / ISO-CTS (Marczak et al. 2025, arXiv:2502.04959): the paper selects α on validation;
  0.5…2.0 (common_space_fraction 0.8, the references' default);
* WIDEN (Yu et al. 2024, arXiv:2408.03092): the reference defaults t = c = 1.0 and a few values
  around them (t: above-average ratio 1.0/1.5/2.0, c: score calibration 0.5/1.0);
* MagMax (Marczak et al. 2024, arXiv:2407.06322): λ = 0.5 in the paper's scripts; 0.3…1.0;
* PCB (Du et al. 2024, arXiv:2410.02396): r = ``pcb_ratio`` 0.05/0.1/0.2 (the example scripts'
  range) × λ = 1.0 (default) or 1.2 (the vision script's fixed λ_i without the ES search);
* LiNeS (Wang et al. 2024, arXiv:2410.17146) on task arithmetic: α automatic (1/T), β from the
  paper's task-arithmetic grid 0.1…1.0 (0.2/0.4/0.6/0.8/1.0).

Data-informed methods (:data:`DATA_INFORMED_METHODS`; their data phase is described in
:mod:`mergelab_bench.eval.data_informed`):

* Fisher (Matena & Raffel 2022, arXiv:2111.09832): the default, with and without the norm
  scaling of each expert's Fisher (``normalize``); one set of statistics serves both points;
* RegMean (Jin et al. 2023, arXiv:2212.09849): α (``reduce_non_diagonal_ratio``, off-diagonal
  scaling; the paper tunes it, fusion_bench uses 0.1 for LMs and 0.95 for CLIP, MergeLM 1.0)
  over 0.1/0.5/0.9/0.95/1.0; the Grams are computed once;
* RegMean++ (Nguyen et al. 2025, arXiv:2508.03121): α 0.5/0.9/0.95 (its Grams depend on α,
  since each block's inputs come from the already merged blocks: one data phase per point);
* AdaMerging (Yang et al. 2024, arXiv:2310.02575): two rows, ``adamerging_task`` and
  ``adamerging_layer`` (:data:`ROW_VARIANTS`), each one point with the paper's defaults (500
  Adam steps, λ from 0.3): each is a whole entropy-minimisation run (about an hour on 2 CPU
  cores for the full zoo), nothing to select on validation.

A leaderboard row is a registered method, or a variant of one (:data:`ROW_VARIANTS`: the
method with some parameters fixed, reported as its own row, as the papers report task- and
layer-wise AdaMerging side by side).

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
LAMBDA_SUM_SPARSE = (0.2, 0.4, 0.7, 1.0, 1.3)
LAMBDA_MEAN = (1.0, 1.5, 2.0, 2.5, 3.0)
LAMBDA_MEAN_SPARSE = (1.0, 1.5, 2.0, 2.5)

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
    # advanced data-free methods (see the module docstring for the papers' searches)
    "tall_masks": product({"multitask": ("sum", "ties")}, {"tall_lambda": (0.2, 0.4, 0.6)}),
    "consensus": product({"multitask": ("sum", "ties"), "lambda": (0.4, 0.7, 1.0), "k": (2,)}),
    "emr": (GridPoint(),),
    "tsv_m": product({"alpha": (0.8, 1.0, 1.2, 1.5)}),
    "iso_c": product({"alpha": (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)}),
    "iso_cts": product({"alpha": (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)}),
    "widen": product({"above_average_value_ratio": (1.0, 1.5, 2.0), "score_calibration_value": (0.5, 1.0)}),
    "magmax": product({"lambda": (0.3, 0.5, 0.7, 1.0, 1.3)}),
    "pcb": product({"pcb_ratio": (0.1, 0.2, 0.3), "lambda": (1.0, 1.2)}),
    "lines": product({"merge_method": ("task_arithmetic",), "beta": (0.2, 0.4, 0.6, 0.8, 1.0)}),
    # data-informed methods (statistics from the zoo's data: mergelab_bench.eval.data_informed)
    "fisher": product({"normalize": (True, False)}),
    "regmean": product({"reduce_non_diagonal_ratio": (0.1, 0.5, 0.9, 0.95, 1.0)}),
    "regmean_plusplus": product({"reduce_non_diagonal_ratio": (0.5, 0.9, 0.95)}),
    "adamerging_task": (GridPoint({"granularity": "task"}),),
    "adamerging_layer": (GridPoint({"granularity": "layer"}),),
}

ROW_VARIANTS: dict[str, str] = {
    "adamerging_task": "adamerging",
    "adamerging_layer": "adamerging",
}
"""Leaderboard rows that are a registered method with parameters fixed by their grid (row -> method)."""


def method_of(row: str) -> str:
    """The registered method behind a leaderboard row (the row's own name for a plain method)."""
    return ROW_VARIANTS.get(row, row)

CLASSIC_METHODS: tuple[str, ...] = (
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
"""The task-vector methods of the first leaderboard."""

ADVANCED_METHODS: tuple[str, ...] = (
    "tall_masks",
    "consensus",
    "emr",
    "tsv_m",
    "iso_c",
    "iso_cts",
    "widen",
    "magmax",
    "pcb",
    "lines",
)
"""Data-free methods after TIES/DARE; ``tall_masks`` and ``emr`` are routed (per-task parts)."""

DATA_INFORMED_METHODS: tuple[str, ...] = ("fisher", "regmean", "regmean_plusplus", "adamerging_task", "adamerging_layer")
"""Methods with a data phase (statistics from the zoo's splits, see mergelab_bench.eval.data_informed)."""

LEADERBOARD_METHODS: tuple[str, ...] = CLASSIC_METHODS + ADVANCED_METHODS + DATA_INFORMED_METHODS
"""Methods of ``mergelab bench`` when none are named (every multi-expert method)."""

METHOD_GROUPS: dict[str, tuple[str, ...]] = {
    "classic": CLASSIC_METHODS,
    "advanced": ADVANCED_METHODS,
    "informed": DATA_INFORMED_METHODS,
    "data_free": CLASSIC_METHODS + ADVANCED_METHODS,
    "all": LEADERBOARD_METHODS,
    "adamerging": ("adamerging_task", "adamerging_layer"),
}
"""Names ``mergelab bench --methods`` accepts for a group of methods."""


def expand_methods(names: Sequence[str]) -> list[str]:
    """Method names with group names (:data:`METHOD_GROUPS`) expanded, duplicates dropped, order kept."""
    out: list[str] = []
    for name in names:
        for m in METHOD_GROUPS.get(name, (name,)):
            if m not in out:
                out.append(m)
    return out

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

    spec = get_method(method_of(method))
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
