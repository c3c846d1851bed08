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


GROUPS: tuple[str, ...] = ("classic", "advanced", "informed")
"""The benchmark groups a method card may name (``MethodCard.group``), in leaderboard order."""

LEADERBOARD_ORDER: tuple[str, ...] = (
    # classic
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
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

METHOD_GROUPS: dict[str, tuple[str, ...]] = {
    "classic": CLASSIC_METHODS,
    "advanced": ADVANCED_METHODS,
    "informed": DATA_INFORMED_METHODS,
    "data_free": CLASSIC_METHODS + ADVANCED_METHODS,
    "all": LEADERBOARD_METHODS,
    **{m: tuple(r for r, v in ROW_VARIANTS.items() if v == m) for m in dict.fromkeys(ROW_VARIANTS.values())},
}
"""Names ``mergelab bench --methods`` accepts for a group of methods (a method with row variants,
e.g. ``adamerging``, names its rows)."""


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
