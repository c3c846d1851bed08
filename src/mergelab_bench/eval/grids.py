"""The hyperparameter grid and group of every method on the leaderboard, read from the method cards.

Each method declares its grid and benchmark group with itself (``@method(...,
card=MethodCard(grid=(global axes, per-model axes), group=..., variants=...))``); this module
collects them into :data:`GRIDS`, the groups (:data:`METHOD_GROUPS`) and the row variants
(:data:`ROW_VARIANTS`), so that adding a method never edits this file.

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

A method whose card names a group but no grid gets one point with its defaults; a method
without a group is not on the leaderboard by default (``grid_for`` still gives it its card's
grid, or one point with its defaults). The values and the papers' searches they follow are
listed above; the cards hold them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
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


GROUPS: tuple[str, ...] = ("classic", "advanced", "informed")
"""The benchmark groups a method card may name (``MethodCard.group``), in leaderboard order."""

LEADERBOARD_ORDER: tuple[str, ...] = (
    # classic
    "linear", "task_arithmetic", "ties", "ties_global", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock",
    # advanced
    "tall_masks", "consensus", "emr", "tsv_m", "iso_c", "iso_cts", "widen", "magmax", "pcb", "lines",
    # informed
    "fisher", "regmean", "regmean_plusplus", "adamerging_task", "adamerging_layer",
)  # fmt: skip
"""The order of the rows on the committed leaderboards. Within its group a row listed here comes
at its place, any other row after them by name: a new method joins its group's end without an
edit here."""


def _card_rows() -> tuple[dict[str, tuple[GridPoint, ...]], dict[str, str], dict[str, str]]:
    """(grid per row, group per row, method per variant row), read from the method cards."""
    from mergelab.methods import all_methods

    grids: dict[str, tuple[GridPoint, ...]] = {}
    groups: dict[str, str] = {}
    variants: dict[str, str] = {}
    for m in all_methods():
        card = m.card
        if card.group is not None and card.group not in GROUPS:
            raise ValueError(f"method {m.name!r} ({m.fn.__module__}): card group {card.group!r} is not one of {GROUPS}")
        if card.grid is None and card.group is None:
            continue
        points = product(*card.grid) if card.grid is not None else (GridPoint(),)
        rows = {row: dict(fixed) for row, fixed in card.variants.items()} or {m.name: {}}
        for row, fixed in rows.items():
            grids[row] = tuple(
                GridPoint({**fixed, **{k: v for k, v in p.parameters.items() if k not in fixed}}, p.model_parameters)
                for p in points
            )
            if card.group is not None:
                groups[row] = card.group
            if row != m.name:
                variants[row] = m.name
    return grids, groups, variants


def _in_order(rows: Sequence[str]) -> tuple[str, ...]:
    rank = {r: i for i, r in enumerate(LEADERBOARD_ORDER)}
    return tuple(sorted(rows, key=lambda r: (rank.get(r, len(rank)), r)))


_GRIDS, _GROUP_OF, _VARIANTS = _card_rows()

GRIDS: dict[str, tuple[GridPoint, ...]] = {row: _GRIDS[row] for row in _in_order(list(_GRIDS))}
"""Every benchmarked row's grid, from the method cards (``MethodCard.grid``: global axes x
per-model axes; a row variant fixes some global parameters)."""

ROW_VARIANTS: dict[str, str] = {row: _VARIANTS[row] for row in _in_order(list(_VARIANTS))}
"""Leaderboard rows that are a registered method with parameters fixed by their grid (row -> method);
from ``MethodCard.variants``."""


def method_of(row: str) -> str:
    """The registered method behind a leaderboard row (the row's own name for a plain method)."""
    return ROW_VARIANTS.get(row, row)


def _group(name: str) -> tuple[str, ...]:
    return _in_order([row for row, g in _GROUP_OF.items() if g == name])


CLASSIC_METHODS: tuple[str, ...] = _group("classic")
"""The task-vector methods of the first leaderboard (cards with ``group="classic"``)."""

ADVANCED_METHODS: tuple[str, ...] = _group("advanced")
"""Data-free methods after TIES/DARE (``group="advanced"``); ``tall_masks`` and ``emr`` are routed (per-task parts)."""

DATA_INFORMED_METHODS: tuple[str, ...] = _group("informed")
"""Methods with a data phase (``group="informed"``).

Their statistics come from the zoo's splits; see mergelab_bench.eval.data_informed.
"""

LEADERBOARD_METHODS: tuple[str, ...] = CLASSIC_METHODS + ADVANCED_METHODS + DATA_INFORMED_METHODS
"""Methods of ``mergelab bench`` when none are named (every multi-expert method)."""

ROUTED_ROWS: dict[str, str] = {
    "twin_merging": "twin_merging",
    "split_merge": "split_merge",
    "smile": "smile",
    "wemoe": "wemoe",
    "tall_masks_router": "tall_masks",
    "emr_router": "emr",
}
"""Routed rows without the task id -> the method they build (``mergelab bench --methods routed``)."""

ROUTED_GRIDS: dict[str, tuple[GridPoint, ...]] = {
    "twin_merging": product({"density": (0.1,)}),
    "split_merge": (GridPoint(),),
    "smile": (GridPoint(),),
    "wemoe": (GridPoint(),),
    "tall_masks_router": product({"multitask": ("sum", "ties")}, {"tall_lambda": (0.2, 0.4, 0.6)}),
    "emr_router": (GridPoint(),),
}
"""One point with the paper's defaults for the routed methods (each point trains a router or gates);
TALL masks keeps its card's grid (the router is trained per point)."""

LM_ROUTED_GRIDS: dict[str, tuple[GridPoint, ...]] = {
    "smile": product({"k": (64,), "gate_k": (8,), "top_k": (1,)}),  # the reference's LLM configuration
}


METHOD_GROUPS: dict[str, tuple[str, ...]] = {
    "classic": CLASSIC_METHODS,
    "advanced": ADVANCED_METHODS,
    "informed": DATA_INFORMED_METHODS,
    "data_free": CLASSIC_METHODS + ADVANCED_METHODS,
    "all": LEADERBOARD_METHODS,
    "routed": tuple(ROUTED_ROWS),
    # a method whose rows are all variants (adamerging) names them; one that is a row itself (ties) stays one row
    **{
        m: tuple(r for r, v in ROW_VARIANTS.items() if v == m)
        for m in dict.fromkeys(ROW_VARIANTS.values())
        if m not in _GRIDS
    },
}
"""Names ``mergelab bench --methods`` accepts for a group of methods (a method with row variants,
e.g. ``adamerging``, names its rows; ``routed``: the routed rows without the task id, not in ``all``)."""


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
    return GRIDS.get(method) or ROUTED_GRIDS.get(method, (GridPoint(),))


def edge_axes(point: GridPoint, points: Sequence[GridPoint]) -> list[str]:
    """Names of the axes on which ``point`` sits at the smallest or largest value of the grid.

    A choice on the edge means the best value may lie outside the grid: widen it.
    """
    return [key for scope in ("parameters", "model_parameters") for key in edge_axes_scoped(point, points, scope)]


def check_grid(
    method: str, n_experts: int, points: Sequence[GridPoint] | None = None, *, spec: Any = None
) -> str | None:
    """Why ``method`` cannot run its grid on ``n_experts`` experts, or ``None`` if it can.

    Validates every point against the method's parameter models, so a typo in a grid fails
    before any merge is computed. ``spec`` is the method spec the row runs (default: the
    registered method behind the row, :func:`method_of`).
    """
    if spec is None:
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


# --------------------------------------------------------------------------------------------
# Grid edges: declared hard bounds per parameter and the extension of a grid past its edge


@dataclass(frozen=True)
class AxisBound:
    """The values a grid axis may take when the bench extends it: ``[low, high]``, either end open.

    Toward an open end the extension halves the distance to it and stops closer than ``resolution``;
    a closed end is proposed itself once, then the search stops there (``hard bound``).
    """

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    resolution: float = 1e-3
    integer: bool = False

    def describe(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"

    def propose(self, value: float, step: float, direction: str) -> float | None:
        """The next value past ``value`` in ``direction`` (``up``/``down``), ``step`` away unless that
        crosses the bound; ``None`` when the bound is reached."""
        sign = 1.0 if direction == "up" else -1.0
        end, open_end = (self.high, self.high_open) if direction == "up" else (self.low, self.low_open)
        candidate = value + sign * step
        crosses = sign * (candidate - end) > 0 or (open_end and candidate == end)
        if crosses:
            if open_end:
                if abs(end - value) < 2 * self.resolution:
                    return None
                candidate = (value + end) / 2  # halve the distance to an open bound
            else:
                if value == end:
                    return None
                candidate = end
        if self.integer:
            candidate = float(round(candidate))
        candidate = round(candidate, 9)
        return None if candidate == value else candidate


LAMBDA_MAX = 8.0
"""The largest λ (and α-like scale) the bench tries: far past every paper's range for merged task vectors."""

AXIS_BOUNDS: dict[str, AxisBound] = {
    "lambda": AxisBound(0.0, LAMBDA_MAX),
    "alpha": AxisBound(0.0, LAMBDA_MAX),
    "beta": AxisBound(0.0, 2.0),
    "density": AxisBound(0.0, 1.0, low_open=True),
    "tall_lambda": AxisBound(0.0, 2.0, low_open=True),
    "pcb_ratio": AxisBound(0.0, 1.0, low_open=True),
    "r": AxisBound(0.0, 1.0, low_open=True),
    "select_topk": AxisBound(0.0, 1.0, low_open=True),
    "reduce_non_diagonal_ratio": AxisBound(0.0, 1.0),
    "above_average_value_ratio": AxisBound(0.0, 4.0, low_open=True),
    "score_calibration_value": AxisBound(0.0, 2.0),
    "epsilon": AxisBound(0.0, 1.0, low_open=True, resolution=1e-8),
    "gamma": AxisBound(0.0, 0.5),
    "k": AxisBound(1.0, 8.0, integer=True),
    "scale": AxisBound(0.0, LAMBDA_MAX),
    "dare_density": AxisBound(0.0, 1.0, low_open=True),
}
"""Hard bounds of every numeric grid axis of the cards' and suites' grids (densities and keep
fractions in (0, 1], scales λ, α and KnOTS's ``scale`` ≥ 0 up to :data:`LAMBDA_MAX`, ...): the edge extension never
proposes a value outside them. An axis without an entry is not extended (its row says so)."""


@dataclass
class Extension:
    """One extension of a grid axis past the chosen point's edge, and how it ended.

    ``outcome``: ``interior`` (a worse point past the chosen one was found), ``hard bound`` (the
    declared bound was reached), ``extension limit`` (still improving after ``max_extensions``
    points) or ``no declared bound`` (the axis has no :data:`AXIS_BOUNDS` entry: not extended).
    """

    axis: str
    direction: str
    start: float
    added: list[float]
    outcome: str
    bound: str | None

    @property
    def at_edge(self) -> bool:
        return self.outcome != "interior"

    def to_dict(self) -> dict[str, Any]:
        return {
            "axis": self.axis,
            "direction": self.direction,
            "start": self.start,
            "added": list(self.added),
            "outcome": self.outcome,
            "bound": self.bound,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Extension:
        return cls(d["axis"], d["direction"], d["start"], list(d["added"]), d["outcome"], d.get("bound"))

    def label(self) -> str:
        arrow = "↑" if self.direction == "up" else "↓"
        added = "/".join(f"{v:g}" for v in self.added)
        text = f"{self.axis} {arrow} {added}" if added else f"{self.axis} {arrow}"
        return f"{text}: {self.outcome}" + (f" {self.bound}" if self.outcome == "hard bound" and self.bound else "")


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _with(point: GridPoint, scope: str, key: str, value: Any) -> GridPoint:
    if scope == "parameters":
        return GridPoint({**point.parameters, key: value}, point.model_parameters)
    return GridPoint(point.parameters, {**point.model_parameters, key: value})


def extend_grid(
    chosen: GridPoint,
    best_score: float,
    evaluated: Sequence[GridPoint],
    score: Callable[[GridPoint], float | None],
    *,
    bounds: Mapping[str, AxisBound] | None = None,
    max_extensions: int = 6,
) -> tuple[GridPoint, list[Extension]]:
    """Extend the grid past ``chosen`` wherever it sits on an edge, until it is interior or a bound stops it.

    For each axis on which ``chosen`` has the smallest or largest value of the ``evaluated`` points
    (:func:`edge_axes`), new points are proposed in that direction with every other parameter as
    chosen: the first one grid step away (the distance to the nearest other value of the axis),
    each next one with the step doubled, halved toward an open bound and clamped to a closed one
    (:class:`AxisBound`). ``score`` evaluates a point (on validation); a point better than the best
    so far (strictly, as in the grid search) becomes the chosen one and the search goes on, a point
    not better ends that direction (the chosen point is now interior). Every axis and direction is
    extended once, so the search ends. Returns the chosen point and the extensions made.
    """
    bounds = AXIS_BOUNDS if bounds is None else bounds
    points = list(evaluated)
    done: set[tuple[str, str]] = set()
    extensions: list[Extension] = []
    while True:
        todo = None
        for scope in ("parameters", "model_parameters"):
            for key in edge_axes_scoped(chosen, points, scope):
                value = getattr(chosen, scope)[key]
                others = sorted({getattr(p, scope).get(key) for p in points} - {None, value}, key=float)
                others = [v for v in others if _numeric(v)]
                direction = "up" if value > others[-1] else "down"
                if (key, direction) not in done:
                    todo = (scope, key, direction, others)
                    break
            if todo:
                break
        if todo is None:
            return chosen, extensions
        scope, key, direction, others = todo
        done.add((key, direction))
        start = getattr(chosen, scope)[key]
        bound = bounds.get(key)
        if bound is None:
            extensions.append(Extension(key, direction, start, [], "no declared bound", None))
            continue
        step = abs(start - (others[-1] if direction == "up" else others[0]))
        added: list[float] = []
        outcome = "extension limit"
        for _ in range(max_extensions):
            current = getattr(chosen, scope)[key]
            candidate = bound.propose(float(current), step, direction)
            if candidate is None:
                outcome = "hard bound"
                break
            point = _with(chosen, scope, key, candidate)
            value = score(point)
            points.append(point)
            added.append(candidate)
            if value is not None and value > best_score:
                chosen, best_score = point, value
                step *= 2
            else:
                outcome = "interior"
                break
        extensions.append(Extension(key, direction, start, added, outcome, bound.describe()))


def edge_axes_scoped(point: GridPoint, points: Sequence[GridPoint], scope: str) -> list[str]:
    """:func:`edge_axes` of one scope (``parameters`` or ``model_parameters``)."""
    out = []
    for key, value in getattr(point, scope).items():
        values = {getattr(p, scope).get(key) for p in points} - {None}
        numeric = [v for v in values if _numeric(v)]
        if len(numeric) > 1 and _numeric(value) and value in (min(numeric), max(numeric)):
            out.append(key)
    return out
