"""The leaderboard: every method, tuned on validation, scored on test, against reference rows.

:func:`run_bench` does, for each method: merge the zoo's experts into its base at every point
of the method's grid (:mod:`mergelab_bench.eval.grids`), score each merge on the validation split,
keep the point with the best average normalized accuracy (ties: the earlier point), and score
that merge on the test split, recording the merge's wall time and peak memory. The test split
is never looked at during the search.

Two kinds of methods need more than a merged state dict:

* routed methods (``tall_masks``, ``emr``: a shared model plus per-task masks and scales) are
  merged as ``mergelab merge`` does and every task is scored with its own reconstruction
  (:mod:`mergelab_bench.eval.routed`); their rows are marked ``routed`` (they need the task id at
  inference) and record the storage of the shared model + parts against N separate experts;
* routed rows without the task id (``twin_merging``, ``split_merge``, ``smile``, ``wemoe``,
  ``tall_masks_router``, ``emr_router``: ``--methods routed``) are built with their router and
  scored through :class:`mergelab.routed.RoutedModel`, every row routed by the model itself
  (:mod:`mergelab_bench.eval.routed_models`); they record the router's test accuracy, the storage
  and the routed model's throughput against the shared model;
* data-informed methods (``fisher``, ``regmean``, ``regmean_plusplus``, AdaMerging's
  ``adamerging_task`` and ``adamerging_layer`` rows) first run their data phase on the zoo's
  data (:mod:`mergelab_bench.eval.data_informed`: train split for the statistics, the unlabeled test
  inputs for AdaMerging as in its paper), cached under ``<work_dir>/statistics`` so grid points
  and reruns reuse them; the data phase's time is recorded beside the merge's.

Reference rows (no merge) come from the zoo's own models: the pretrained encoder with the
experts' heads and with linear-probe heads, each expert alone on every task, and the
probability-average and majority-vote ensembles.

:func:`write_leaderboard` writes ``leaderboard.json`` (everything, including every grid
point's validation score and the exact config), ``leaderboard.md`` and ``leaderboard.png``;
:func:`update_leaderboard` adds rows from a later run of the same protocol (``--update``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab_bench.eval.data_informed import PER_POINT_COLLECTORS, BenchCalibration, compute_statistics
from mergelab_bench.eval.grids import (
    LEADERBOARD_METHODS,
    Extension,
    GridPoint,
    check_grid,
    edge_axes,
    extend_grid,
    grid_for,
    method_of,
)
from mergelab_bench.eval.harness import DEFAULT_TEST_LIMIT, DEFAULT_VALIDATION_LIMIT, Evaluator, load_state_dict_path
from mergelab_bench.eval.measure import measure
from mergelab_bench.eval.metrics import EvalReport, fmt_pct
from mergelab_bench.eval.plots import pyplot, save_figure
from mergelab_bench.eval.routed_models import RoutedBenchSettings
from mergelab_bench.eval.stats import (
    SAME,
    VERDICT_SYMBOLS,
    Bootstrap,
    StatsConfig,
    TaskRows,
    estimates_of,
    paired,
    rows_of,
    seed_summary,
    summarize,
)
from mergelab_bench.zoo.build import Zoo

MergeFn = Callable[..., dict[str, torch.Tensor]]


@dataclass
class GridResult:
    point: GridPoint
    validation_average_normalized: float | None
    validation_average: float | None
    merge_seconds: float
    merge_peak_bytes: int
    statistics_seconds: float | None = None  # data phase of this point (data-informed methods)

    def to_dict(self) -> dict[str, Any]:
        d = {
            **self.point.to_dict(),
            "validation_average_normalized": self.validation_average_normalized,
            "validation_average": self.validation_average,
            "merge_seconds": round(self.merge_seconds, 3),
            "merge_peak_mb": round(self.merge_peak_bytes / 2**20, 1),
        }
        if self.statistics_seconds is not None:
            d["statistics_seconds"] = round(self.statistics_seconds, 3)
        return d


@dataclass
class MethodResult:
    """One method's row: the chosen grid point and its test report, or why it was skipped."""

    method: str
    status: str = "ok"
    reason: str = ""
    chosen: GridPoint | None = None
    test: EvalReport | None = None
    validation: EvalReport | None = None
    grid: list[GridResult] = field(default_factory=list)
    merge_seconds: float | None = None
    merge_peak_bytes: int | None = None
    search_seconds: float | None = None
    kind: str = "merge"
    """``merge`` (one merged model for every task) or ``routed`` (one reconstruction per task)."""
    routing: dict[str, Any] | None = None
    """Routed rows: reconstruction, storage (shared + parts vs N experts), the shared model's score."""
    statistics: dict[str, Any] | None = None
    """Data-informed rows: the data phase (collector, seconds per grid point, cache folder)."""
    extensions: list[Extension] = field(default_factory=list)
    """How the grid was extended past the chosen point's edges (:func:`mergelab_bench.eval.grids.extend_grid`)."""
    seeds: list[int] = field(default_factory=list)
    """Random methods: the merge seeds of the test reports (``test`` is the first, ``seed_tests`` the others)."""
    seed_tests: list[EvalReport] = field(default_factory=list)
    stats: dict[str, Any] | None = None
    """Bootstrap intervals, the paired comparison with the reference row and the seeds' spread
    (:func:`leaderboard_statistics`)."""
    info: dict[str, Any] | None = None
    """What a suite records about a row beyond the grid search (``label``: the name shown in the
    markdown and the chart; ``note``: a line under the table; e.g. an adapter row's rank and size,
    :mod:`mergelab_bench.eval.adapter_bench`). Written to JSON only when set."""

    @property
    def test_runs(self) -> list[EvalReport]:
        """The test reports of the row: one per merge seed (one for a deterministic method)."""
        return [] if self.test is None else [self.test, *self.seed_tests]

    @property
    def score(self) -> float | None:
        """The row's headline: average normalized test score (random methods: the mean over seeds)."""
        runs = self.test_runs
        if not runs:
            return None
        return runs[0].average_normalized if len(runs) == 1 else estimates_of(runs)["average_normalized"]

    @property
    def routed(self) -> bool:
        """Needs the task id (a per-task reconstruction)."""
        return self.kind == "routed"

    @property
    def routed_model(self) -> bool:
        """A routed model scored without the task id (its own router)."""
        return self.kind == "routed_model"

    def display_name(self) -> str:
        label = (self.info or {}).get("label") or self.method
        if self.routed:
            return f"{label} (routed)"
        return f"{label} (routed, no task id)" if self.routed_model else label

    @property
    def chosen_at_edge(self) -> list[str]:
        """Grid axes on which the chosen point is at the smallest or largest value."""
        if self.chosen is None:
            return []
        points = [g.point for g in self.grid]
        out = edge_axes(self.chosen, points)
        per_task = (self.routing or {}).get("per_task_parameters") or {}
        for axis, values in per_task.items():  # one value per task: flag the axis if any task sits on an edge
            for value in values.values():
                probe = GridPoint(self.chosen.parameters, {**self.chosen.model_parameters, axis: value})
                if axis in edge_axes(probe, points) and axis not in out:
                    out.append(axis)
        return out

    def chosen_label(self) -> str:
        """The chosen point, with every extension of the grid and every axis still on its edge."""
        if self.chosen is None:
            return "–"
        notes = []
        extended = [e for e in self.extensions if e.added or e.at_edge]
        if extended:
            notes.append("grid extended: " + "; ".join(e.label() for e in extended))
        edge = self.chosen_at_edge
        if edge:
            notes.append(f"grid edge: {', '.join(edge)}")
        return self.chosen.label() + (f" ({'; '.join(notes)})" if notes else "")

    def to_dict(self) -> dict[str, Any]:
        extra = {"info": self.info} if self.info is not None else {}
        return {
            "method": self.method,
            "status": self.status,
            "reason": self.reason,
            "chosen": self.chosen.to_dict() if self.chosen else None,
            "chosen_at_grid_edge": self.chosen_at_edge,
            "test": self.test.to_dict() if self.test else None,
            "validation": self.validation.to_dict() if self.validation else None,
            "grid": [g.to_dict() for g in self.grid],
            "merge_seconds": None if self.merge_seconds is None else round(self.merge_seconds, 3),
            "merge_peak_mb": None if self.merge_peak_bytes is None else round(self.merge_peak_bytes / 2**20, 1),
            "search_seconds": None if self.search_seconds is None else round(self.search_seconds, 1),
            "kind": self.kind,
            "routing": self.routing,
            "statistics": self.statistics,
            "grid_extensions": [e.to_dict() for e in self.extensions],
            "seeds": list(self.seeds),
            "seed_tests": [r.to_dict() for r in self.seed_tests],
            "stats": self.stats,
            **extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MethodResult:
        chosen = GridPoint(d["chosen"]["parameters"], d["chosen"]["model_parameters"]) if d.get("chosen") else None
        grid = [
            GridResult(
                GridPoint(g["parameters"], g["model_parameters"]),
                g["validation_average_normalized"],
                g["validation_average"],
                g["merge_seconds"],
                int(g["merge_peak_mb"] * 2**20),
                g.get("statistics_seconds"),
            )
            for g in d.get("grid", [])
        ]
        return cls(
            method=d["method"],
            status=d["status"],
            reason=d.get("reason", ""),
            chosen=chosen,
            test=EvalReport.from_dict(d["test"]) if d.get("test") else None,
            validation=EvalReport.from_dict(d["validation"]) if d.get("validation") else None,
            grid=grid,
            merge_seconds=d.get("merge_seconds"),
            merge_peak_bytes=None if d.get("merge_peak_mb") is None else int(d["merge_peak_mb"] * 2**20),
            search_seconds=d.get("search_seconds"),
            kind=d.get("kind", "merge"),
            routing=d.get("routing"),
            statistics=d.get("statistics"),
            extensions=[Extension.from_dict(e) for e in d.get("grid_extensions", [])],
            seeds=list(d.get("seeds", [])),
            seed_tests=[EvalReport.from_dict(r) for r in d.get("seed_tests", [])],
            stats=d.get("stats"),
            info=d.get("info"),
        )


@dataclass
class Leaderboard:
    config: dict[str, Any]
    zoo: dict[str, Any]
    tasks: list[str]
    methods: list[MethodResult]
    references: list[EvalReport]
    expert_test: dict[str, float]
    info: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    """The bootstrap's settings, the experts' per-row test results and the reference rows' intervals
    (:func:`leaderboard_statistics`; each method's own are in its ``stats``)."""

    def ranked(self) -> list[MethodResult]:
        """Methods that ran, best average normalized test score first (random methods: mean over seeds)."""
        ok = [m for m in self.methods if m.status == "ok" and m.test is not None]
        return sorted(ok, key=lambda m: -(m.score or 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "mergelab-leaderboard/1",
            "config": self.config,
            "zoo": self.zoo,
            "tasks": self.tasks,
            "expert_test_accuracy": self.expert_test,
            "methods": [m.to_dict() for m in self.methods],
            "references": [r.to_dict() for r in self.references],
            "info": self.info,
            "statistics": self.statistics,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Leaderboard:
        return cls(
            config=d["config"],
            zoo=d["zoo"],
            tasks=list(d["tasks"]),
            methods=[MethodResult.from_dict(m) for m in d["methods"]],
            references=[EvalReport.from_dict(r) for r in d["references"]],
            expert_test=dict(d["expert_test_accuracy"]),
            info=dict(d.get("info", {})),
            statistics=dict(d.get("statistics", {})),
        )


class _Steps:
    """Optional rich progress: one bar per phase."""

    def __init__(self, progress=None) -> None:
        self.progress = progress

    @contextlib.contextmanager
    def phase(self, description: str, total: int) -> Iterator[Callable[[], None]]:
        if self.progress is None:
            yield lambda: None
            return
        tid = self.progress.add_task(description, total=total)
        try:
            yield lambda: self.progress.advance(tid)
        finally:
            self.progress.update(tid, completed=total)


def _load_models(zoo: Zoo) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    base = load_state_dict_path(zoo.base_dir / "model.safetensors")
    experts = [load_state_dict_path(zoo.expert_model_dir(t) / "model.safetensors") for t in zoo.tasks]
    return base, experts


def run_bench(
    zoo: Zoo,
    *,
    methods: Sequence[str] | None = None,
    validation_limit: int | None = DEFAULT_VALIDATION_LIMIT,
    test_limit: int | None = DEFAULT_TEST_LIMIT,
    seed: int = 0,
    grids: Mapping[str, Sequence[GridPoint]] | None = None,
    merge_fn: MergeFn | None = None,
    progress=None,
    echo: Callable[[str], None] | None = None,
    calibration: BenchCalibration | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    stats: StatsConfig | None = None,
    routed_settings: RoutedBenchSettings | None = None,
) -> Leaderboard:
    """Tune every method on validation, score it on test, add the reference rows.

    ``grids`` overrides :func:`mergelab_bench.eval.grids.grid_for` per method (tests use tiny ones);
    ``merge_fn`` defaults to :func:`mergelab.merge_state_dicts` (data-informed methods get the
    keyword ``statistics``; routed methods merge to disk through :func:`mergelab.merge`).
    ``calibration`` sets the data of the data-informed methods; their statistics are kept in
    ``work_dir/statistics`` (reused by later grid points and later runs) and routed merges are
    written under ``work_dir`` while they are scored; without ``work_dir`` a temporary folder
    is used and removed. ``stats`` sets the bootstrap, the merge seeds of random methods and the
    grid-edge extension (:class:`mergelab_bench.eval.stats.StatsConfig`; default: its defaults).
    """
    if merge_fn is None:
        from mergelab import merge_state_dicts as merge_fn  # type: ignore[no-redef]
    say = echo or (lambda _: None)
    steps = _Steps(progress)
    methods = list(methods or LEADERBOARD_METHODS)
    cal = calibration or BenchCalibration()
    t_start = time.perf_counter()
    val = Evaluator(zoo, split="validation", limit=validation_limit)
    test = Evaluator(zoo, split="test", limit=test_limit)

    with steps.phase("reference rows", len(zoo.tasks) + 3) as tick:
        references = test.reference_reports(on_step=lambda _: tick())
    expert_test = {t: test.expert_score(t) for t in zoo.tasks}
    with steps.phase("expert validation scores", len(zoo.tasks)) as tick:
        for t in zoo.tasks:
            val.expert_score(t)
            tick()

    base, experts = _load_models(zoo)
    return run_suite(
        CLASSIFICATION, zoo, val=val, test=test, base=base, experts=experts, references=references,
        expert_test=expert_test, methods=methods, grids=grids, seed=seed, merge_fn=merge_fn, progress=progress,
        steps=steps, say=say, calibration=cal, work_dir=work_dir, t_start=t_start,
        limits={"validation_limit": validation_limit, "test_limit": test_limit}, stats=stats,
        routed_settings=routed_settings,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# The suite-agnostic part of a bench run


def registered_method(row: str) -> Any:
    """The registered method behind a leaderboard row (:func:`mergelab_bench.eval.grids.method_of`), or
    the spec of a routed row without the task id (:mod:`mergelab_bench.eval.routed_models`)."""
    from mergelab.methods import get_method
    from mergelab_bench.eval.routed_models import routed_row_spec

    spec = routed_row_spec(row)
    return spec if spec is not None else get_method(method_of(row))


@dataclass(frozen=True)
class Suite:
    """What a bench suite declares; :func:`run_suite` does the rest (the grid search, the config,
    zoo and calibration blocks of the leaderboard, the working folder).

    ``grid_for`` gives a row's default grid; ``method_for`` the method spec a row runs (default:
    the registered method behind the row; a suite with rows of its own, such as the adapter
    bench's adapter-output rows, resolves them to specs whose ``name`` is the row, which is what
    its ``merge_fn`` is then called with); ``routed``: routed methods are merged to disk and
    scored per task (else skipped with ``routed_skip``); ``base_source_key`` is the manifest entry
    the leaderboard's ``zoo.base_source`` comes from.
    """

    name: str
    selection: str
    grid_for: Callable[[str], Sequence[GridPoint]]
    normalized: str | None = None
    routed: bool = True
    routed_skip: str = ""
    base_source_key: str = "base_source"
    work_prefix: str = "mergelab-bench-"
    method_for: Callable[[str], Any] = registered_method


CLASSIFICATION = Suite(
    name="classification",
    selection="best average normalized accuracy on the validation split",
    grid_for=grid_for,
)


def run_suite(
    suite: Suite,
    zoo: Any,
    *,
    val: Any,
    test: Any,
    base: dict[str, torch.Tensor],
    experts: list[dict[str, torch.Tensor]],
    references: list[EvalReport],
    expert_test: dict[str, float | None],
    methods: Sequence[str],
    grids: Mapping[str, Sequence[GridPoint]] | None,
    seed: int,
    merge_fn: MergeFn,
    progress: Any,
    steps: _Steps,
    say: Callable[[str], None],
    calibration: BenchCalibration,
    work_dir: str | os.PathLike[str] | None,
    t_start: float,
    limits: Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
    stats: StatsConfig | None = None,
    routed_settings: RoutedBenchSettings | None = None,
) -> Leaderboard:
    """Run every method of ``methods`` through the grid search and assemble the leaderboard.

    ``val``/``test`` are the suite's evaluators, ``references`` and ``expert_test`` its reference
    rows and the experts' test scores; ``limits`` the validation and test limits as the
    leaderboard's config records them. Both evaluators give per-row results (``info["per_row"]``
    of each report, ``test.expert_rows(task)``), from which :func:`leaderboard_statistics` adds the
    intervals and the paired comparisons.
    """
    specs = {m: suite.method_for(m) for m in methods}
    temporary = work_dir is None
    work = Path(tempfile.mkdtemp(prefix=suite.work_prefix)) if work_dir is None else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stats_root = work / "statistics"
    routed_root = work / ".routed-merges"
    stats = stats or StatsConfig()
    ctx = _BenchContext(
        zoo, base, experts, val, test, merge_fn, seed, progress, steps, calibration, stats_root, routed_root, temporary,
        stats, routed_settings or RoutedBenchSettings(),
    )  # fmt: skip
    results: list[MethodResult] = []
    try:
        for name, spec in specs.items():
            points = list((grids or {}).get(name, suite.grid_for(name)))
            reason = check_grid(name, len(experts), points, spec=spec)
            if not reason and not suite.routed and spec.outputs == "routed":
                reason = suite.routed_skip
            result = (
                MethodResult(name, status="skipped", reason=reason)
                if reason
                else _run_method(ctx, spec, points, row=name)
            )
            announce(result, say)
            results.append(result)
    finally:
        if routed_root is not None:
            shutil.rmtree(routed_root, ignore_errors=True)
        if temporary:
            shutil.rmtree(work, ignore_errors=True)

    config: dict[str, Any] = {
        "suite": suite.name,
        "zoo": zoo.name,
        "methods": list(methods),
        **limits,
        "seed": seed,
        "selection": suite.selection,
        "grids": {m: [p.to_dict() for p in (grids or {}).get(m, suite.grid_for(m))] for m in methods},
        "statistics": stats.to_dict(),
    }
    if suite.normalized:
        config["normalized"] = suite.normalized
    routed_models = [m for m, sp in specs.items() if sp.outputs == "routed_model"]
    if routed_models:
        config["routed_model"] = {"methods": routed_models, **ctx.routed_settings.describe()}
    routed = [m for m, sp in specs.items() if sp.outputs == "routed"]
    if routed and suite.routed:
        config["routed"] = {
            "methods": routed,
            "evaluation": "task t is scored with its own reconstruction theta_0 + s_t * m_t * (shared - theta_0) "
            "(mergelab extract); selection by the average normalized validation accuracy of the reconstructions; "
            "needs the task id at inference",
        }
    informed = [m for m, sp in specs.items() if sp.statistics is not None]
    if informed:
        config["calibration"] = {
            "methods": informed,
            **calibration.describe(zoo),
            "statistics_dir": "temporary (removed)" if temporary else str(stats_root),
        }
    zoo_info = {
        "name": zoo.name,
        "key": zoo.key,
        "tasks": zoo.tasks,
        "config": zoo.manifest.get("config", {}),
        "base_source": zoo.manifest.get(suite.base_source_key, {}),
    }
    lb = Leaderboard(
        config, zoo_info, list(zoo.tasks), results, references, expert_test, run_info(t_start, **(info or {}))
    )
    expert_rows = {t: test.expert_rows(t) for t in zoo.tasks}
    lb.statistics = {"expert_rows": {t: r.to_dict() for t, r in expert_rows.items()}}
    leaderboard_statistics(lb, stats)
    return lb


def leaderboard_statistics(lb: Leaderboard, stats: StatsConfig | None = None) -> Leaderboard:
    """Add the bootstrap intervals, the paired comparison with the reference row and the seeds' spread.

    Reads the experts' per-row test results (``lb.statistics["expert_rows"]``) and each report's
    (``info["per_row"]``); writes each method's ``stats`` and, in ``lb.statistics``, the settings
    and the reference rows' intervals. A row without per-row results (a leaderboard from an older
    version) gets no statistics. Returns ``lb``.
    """
    stats = stats or StatsConfig.from_dict(lb.config.get("statistics", {}))
    expert_rows = {t: TaskRows.from_dict(d) for t, d in lb.statistics.get("expert_rows", {}).items()}
    boot = Bootstrap(lb.tasks, expert_rows, resamples=stats.bootstrap, seed=stats.bootstrap_seed)
    replicates: dict[str, Any] = {}
    for m in lb.methods:
        m.stats = None
        runs = m.test_runs
        if m.status != "ok" or not runs:
            continue
        reps = boot.replicates([rows_of(r.info) for r in runs])
        if reps is None:
            continue
        replicates[m.method] = reps
        m.stats = summarize(reps, estimates_of(runs), stats.confidence)
        if len(runs) > 1:
            m.stats["seeds"] = seed_summary(m.seeds, [r.average_normalized for r in runs])
    reference = replicates.get(stats.reference)
    if reference is not None:
        for m in lb.methods:
            if m.stats is not None and m.method != stats.reference:
                m.stats["vs_reference"] = {"reference": stats.reference, **paired(replicates[m.method], reference)}
    refs: dict[str, Any] = {}
    for r in lb.references:
        reps = boot.replicates([rows_of(r.info)])
        if reps is not None:
            refs[r.model] = summarize(reps, estimates_of([r]), stats.confidence)
            if reference is not None:
                refs[r.model]["vs_reference"] = {"reference": stats.reference, **paired(reps, reference)}
    lb.statistics = {**lb.statistics, "config": stats.to_dict(), "references": refs}
    return lb


_PROTOCOL = ("suite", "zoo", "validation_limit", "test_limit", "seed", "experts")
_PROTOCOL_DEFAULTS: dict[str, Any] = {"suite": "classification", "experts": "full"}
"""Values of protocol keys a leaderboard's config leaves out (written before the key existed, or at
its default: a full-expert leaderboard has no ``experts`` entry)."""


def update_conflict(previous: Leaderboard, zoo_key: str | None, **protocol: Any) -> str | None:
    """Why a run with ``protocol`` (any of suite, zoo, validation_limit, test_limit, seed, experts) on
    the zoo ``zoo_key`` cannot update ``previous``, or ``None``. The CLI asks before running, with what
    it knows."""
    for key, value in protocol.items():
        old = previous.config.get(key, _PROTOCOL_DEFAULTS.get(key))
        if value is None and key in _PROTOCOL_DEFAULTS:
            value = _PROTOCOL_DEFAULTS[key]
        if value != old:
            return (
                f"the existing leaderboard has {key}={old!r}, this run {value!r}: run with the same setting, "
                "or write to another --out"
            )
    if zoo_key is not None and previous.zoo.get("key") != zoo_key:
        return (
            f"the existing leaderboard is of zoo {previous.zoo.get('key')}, this run of {zoo_key} "
            "(the zoo was rebuilt): rerun the whole bench"
        )
    return None


def update_leaderboard(previous: Leaderboard, new: Leaderboard) -> Leaderboard:
    """``previous`` with the rows of ``new`` added, or replacing the rows of the same name.

    Both must come from the same protocol (suite, zoo key, validation and test limits, seed), and
    the calibration settings that ``previous``'s kept data-informed rows depend on must be equal,
    so every row of the result is reproduced by its one reproduce command. Reference rows and
    expert scores are ``new``'s (same protocol, same numbers).
    """
    problem = update_conflict(previous, new.zoo.get("key"), **{k: new.config.get(k) for k in _PROTOCOL})
    if problem:
        raise ValueError(problem)
    fresh = {m.method: m for m in new.methods}
    kept = [m for m in previous.methods if m.method not in fresh]
    old_cal, new_cal = previous.config.get("calibration"), new.config.get("calibration")
    for m in kept:
        collector = (m.statistics or {}).get("collector")
        if collector is None or new_cal is None:
            continue
        for f in BenchCalibration.fields_for(collector):
            if (old_cal or {}).get(f) != new_cal.get(f):
                raise ValueError(
                    f"row {m.method} was computed with calibration {f}={(old_cal or {}).get(f)!r}, this "
                    f"run uses {new_cal.get(f)!r}: pass the same setting or rerun {m.method} too"
                )
    old_names = {m.method for m in previous.methods}
    methods = [fresh.get(m.method, m) for m in previous.methods] + [m for m in new.methods if m.method not in old_names]
    names = [m.method for m in methods]
    config = {**previous.config, **{k: v for k, v in new.config.items() if k not in ("methods", "grids")}}
    config["methods"] = names
    config["grids"] = {
        n: (new.config["grids"] if n in fresh else previous.config.get("grids", {})).get(n, []) for n in names
    }
    informed = [m.method for m in methods if m.statistics]
    if old_cal or new_cal:
        config["calibration"] = {**(old_cal or {}), **(new_cal or {}), "methods": informed}
        config["calibration"]["sources"] = {**(old_cal or {}).get("sources", {}), **(new_cal or {}).get("sources", {})}
    if not informed:
        config.pop("calibration", None)
    routed = [m.method for m in methods if m.routed]
    if routed:
        config["routed"] = {**previous.config.get("routed", {}), **new.config.get("routed", {}), "methods": routed}
    else:
        config.pop("routed", None)
    fields = ("date", "bench_seconds", "torch_threads")
    history = list(previous.info.get("updates", [])) or [
        {k: previous.info.get(k) for k in fields} | {"methods": [m.method for m in previous.methods]}
    ]
    history.append({k: new.info.get(k) for k in fields} | {"methods": [m.method for m in new.methods]})
    info = {
        **new.info,
        "bench_seconds": round(sum(h.get("bench_seconds") or 0.0 for h in history), 1),
        "updates": history,
    }
    merged = Leaderboard(
        config, new.zoo, new.tasks, methods, new.references, new.expert_test, info, dict(new.statistics)
    )
    if new.statistics.get("expert_rows"):  # same protocol: the new run's resamples serve every row
        leaderboard_statistics(merged, StatsConfig.from_dict(new.config.get("statistics", {})))
    return merged


def run_info(t_start: float, **extra: Any) -> dict[str, Any]:
    """The ``info`` block of a leaderboard: bench wall time since ``t_start``, threads, platform, date."""
    return {
        "bench_seconds": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(),
        "platform": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def announce(result: MethodResult, say: Callable[[str], None]) -> None:
    """One line per finished method: its chosen point and test score, or why it has none."""
    if result.status == "ok" and result.test is not None:
        say(
            f"{result.display_name()}: {result.chosen.label() if result.chosen else ''} -> "
            f"test normalized {fmt_pct(result.score)} %"
            + (f" (mean of {len(result.test_runs)} merge seeds)" if len(result.test_runs) > 1 else "")
        )
    else:
        say(f"{result.method}: {result.status} ({result.reason})")


@dataclass
class _BenchContext:
    """What a method's grid search needs. ``zoo``/``val``/``test`` are a classification zoo and its
    :class:`Evaluator`s or an LM zoo and its ``LMEvaluator``s (same ``evaluate`` interface);
    the last four fields serve only routed and data-informed methods."""

    zoo: Any
    base: dict[str, torch.Tensor]
    experts: list[dict[str, torch.Tensor]]
    val: Any
    test: Any
    merge_fn: MergeFn
    seed: int
    progress: Any
    steps: _Steps
    calibration: BenchCalibration | None = None
    stats_root: Path | None = None
    routed_root: Path | None = None
    temporary: bool = True
    stats: StatsConfig = field(default_factory=StatsConfig)
    routed_settings: RoutedBenchSettings = field(default_factory=RoutedBenchSettings)


def _run_method(ctx: _BenchContext, spec: Any, points: Sequence[GridPoint], row: str | None = None) -> MethodResult:
    """Merge and score every grid point on validation, extend the grid past an edge, then score the
    chosen point on test (random methods: once per merge seed).

    ``row`` names the leaderboard row (a variant of ``spec``'s method; default: the method's name).
    """
    from mergelab_bench.eval.routed import PER_TASK_AXES, RoutedMerge, per_task_choice, routed_merge, routing_info
    from mergelab_bench.eval.routed_models import RoutedModelMerge, routed_model_info, routed_model_merge

    name = spec.name
    row = row or name
    routed_model = spec.outputs == "routed_model"
    routed = spec.outputs == "routed" or routed_model
    informed = spec.statistics is not None
    stats_config = ctx.stats
    result = MethodResult(row, kind="routed_model" if routed_model else "routed" if routed else "merge")
    on_disk = (RoutedMerge, RoutedModelMerge)
    state: dict[str, Any] = {"best": None, "best_score": -float("inf")}  # the chosen point's merge and score
    stats_seconds: list[float] = []
    stats_summary: dict[str, str] = {}
    stats_peak = 0
    compute_seconds: list[float] = []  # what computing each point's statistics took (also when reused)
    reports: list[tuple[GridPoint, EvalReport]] = []  # routed rows: every point's validation report
    per_task: dict[str, Any] | None = None
    t_search = time.perf_counter()

    def merge_point(point: GridPoint, seed: int, folder: str) -> Any:
        """The merge at ``point`` (a state dict, or a RoutedMerge folder) with its measure."""
        nonlocal stats_summary, stats_peak
        statistics = None
        if informed:
            statistics = compute_statistics(
                name, ctx.zoo, point, ctx.calibration, ctx.stats_root, seed=ctx.seed, progress=ctx.progress
            )
            if not stats_seconds or statistics.seconds > max(stats_seconds):
                stats_summary = statistics.summary  # the point that computed (later points reuse)
            stats_seconds.append(statistics.seconds)
            stats_peak = max(stats_peak, statistics.peak_bytes)
            compute_seconds.append(statistics.compute_seconds)
        try:
            with measure() as m:
                if routed_model:
                    merged = routed_model_merge(
                        spec, ctx.zoo, point, ctx.routed_root / folder, settings=ctx.routed_settings, seed=seed
                    )
                elif routed:
                    merged = routed_merge(name, ctx.zoo, point, ctx.routed_root / folder, seed=seed)
                else:
                    extra = {"statistics": statistics.readers} if statistics is not None else {}
                    merged = ctx.merge_fn(
                        name,
                        ctx.experts,
                        None if spec.base == "ignored" else ctx.base,
                        parameters=dict(point.parameters),
                        model_parameters=[dict(point.model_parameters) for _ in ctx.experts],
                        seed=seed,
                        **extra,
                    )
        finally:
            if statistics is not None:
                statistics.close()
        return merged, m.result, statistics.seconds if statistics is not None else None

    def evaluate_point(point: GridPoint) -> float | None:
        """Merge ``point``, score it on validation, keep it when it beats the best so far (strictly)."""
        merged, measured, data_seconds = merge_point(point, ctx.seed, f"{row}-{len(result.grid)}")
        if isinstance(merged, on_disk):
            report = merged.evaluate(ctx.val, row)
            reports.append((point, report))
        else:
            report = ctx.val.evaluate(merged, name=row)
        score = report.average_normalized
        result.grid.append(
            GridResult(point, score, report.average, measured.seconds, measured.peak_bytes, data_seconds)
        )
        if score is not None and score > state["best_score"]:
            if isinstance(state["best"], on_disk):
                state["best"].remove()
            state["best_score"], state["best"] = score, merged
            result.chosen, result.validation = point, report
            result.merge_seconds, result.merge_peak_bytes = measured.seconds, measured.peak_bytes
        elif isinstance(merged, on_disk):
            merged.remove()
        del merged
        return score

    try:
        with ctx.steps.phase(f"{row}: {len(points)} grid point(s) on validation", len(points)) as tick:
            for point in points:
                evaluate_point(point)
                tick()
        if stats_config.extend_edges and result.chosen is not None:
            _, result.extensions = extend_grid(
                result.chosen,
                state["best_score"],
                [g.point for g in result.grid],
                evaluate_point,
                max_extensions=stats_config.max_extensions,
            )
        best = state["best"]
        axis = PER_TASK_AXES.get(name)
        if isinstance(best, RoutedMerge) and axis and result.chosen and axis in result.chosen.model_parameters:
            choice = per_task_choice(axis, result.chosen, reports, ctx.zoo.tasks)
            if any(v != result.chosen.model_parameters[axis] for v in choice.values()):
                with measure() as m:
                    tuned = routed_merge(
                        name,
                        ctx.zoo,
                        result.chosen,
                        ctx.routed_root / f"{row}-per-task",
                        seed=ctx.seed,
                        per_model=[{axis: choice[t]} for t in ctx.zoo.tasks],
                    )
                report = tuned.evaluate(ctx.val, row)
                if report.average_normalized is not None and report.average_normalized >= state["best_score"]:
                    best.remove()
                    best, per_task = tuned, {axis: choice}
                    state["best"], state["best_score"] = tuned, report.average_normalized
                    result.validation = report
                    result.chosen = GridPoint(
                        result.chosen.parameters, {**result.chosen.model_parameters, axis: "per task"}
                    )
                    result.merge_seconds, result.merge_peak_bytes = m.result.seconds, m.result.peak_bytes
                else:
                    tuned.remove()
        result.search_seconds = time.perf_counter() - t_search
        if informed:
            result.statistics = {
                "collector": spec.statistics,
                "split": ctx.calibration.split(spec.statistics),
                "examples_per_task": ctx.calibration.num_examples(spec.statistics),
                "seconds_per_point": [round(x, 3) for x in stats_seconds],
                "seconds_total": round(sum(stats_seconds), 3),
                # one set of statistics per point (RegMean++, AdaMerging) or one shared by every point
                "compute_seconds": round(
                    sum(compute_seconds)
                    if spec.statistics in PER_POINT_COLLECTORS
                    else max(compute_seconds, default=0.0),
                    3,
                ),
                "summary": stats_summary,
                "peak_mb": round(stats_peak / 2**20, 1),
                "cache": None if ctx.temporary else str(ctx.stats_root / name),
            }
        if best is None:
            result.status, result.reason = "failed", "no grid point gave a score"
        elif isinstance(best, RoutedModelMerge):
            result.test = best.evaluate(ctx.test, row)
            shared = best.evaluate_shared(ctx.test, f"{row} (shared model)")
            best.measure_throughput(ctx.test)
            result.routing = routed_model_info(best, shared)
        elif isinstance(best, RoutedMerge):
            result.test = best.evaluate(ctx.test, row)
            shared = best.evaluate_shared(ctx.test, f"{row} (shared model)")
            result.routing = routing_info(best, shared)
            if per_task is not None:
                result.routing["per_task_parameters"] = per_task
        else:
            result.test = ctx.test.evaluate(best, name=row)
        state["best"] = best
        if result.test is not None and is_random(spec) and result.chosen is not None:
            _other_seeds(ctx, result, merge_point, routed, per_task)
    except Exception as exc:  # one method failing must not lose the others' rows
        result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
    finally:
        if isinstance(state["best"], on_disk):
            state["best"].remove()
    return result


def is_random(spec: Any) -> bool:
    """Whether a method's output depends on its merge seed (``MethodCard.random``)."""
    return bool(getattr(spec.card, "random", False))


def _other_seeds(
    ctx: _BenchContext, result: MethodResult, merge_point: Callable[..., Any], routed: bool, per_task: Any
) -> None:
    """A random method's chosen point merged again with seeds ``seed + 1, ...`` and scored on test."""
    from mergelab_bench.eval.routed import RoutedMerge
    from mergelab_bench.eval.routed_models import RoutedModelMerge

    if routed and per_task is not None:
        raise ValueError("extra merge seeds of a routed method with per-task parameters are not supported")
    assert result.chosen is not None and result.test is not None
    result.seeds = [ctx.seed]
    for k in range(1, ctx.stats.merge_seeds):
        seed = ctx.seed + k
        merged, _, _ = merge_point(result.chosen, seed, f"{result.method}-seed{seed}")
        try:
            if isinstance(merged, (RoutedMerge, RoutedModelMerge)):
                report = merged.evaluate(ctx.test, result.method)
            else:
                report = ctx.test.evaluate(merged, name=result.method)
        finally:
            if isinstance(merged, (RoutedMerge, RoutedModelMerge)):
                merged.remove()
        report.info["seed"] = seed
        result.seed_tests.append(report)
        result.seeds.append(seed)


# --------------------------------------------------------------------------------------------
# Writing


def _row_cells(report: EvalReport, tasks: Sequence[str]) -> list[str]:
    by_task = {s.task: s for s in report.scores}
    return [fmt_pct(report.average_normalized), fmt_pct(report.average)] + [
        fmt_pct(by_task[t].normalized) if t in by_task else "–" for t in tasks
    ]


def _ci(entry: Mapping[str, Any] | None) -> str:
    """``[low, high]`` of a bootstrap entry in %, ``–`` without one."""
    if not entry or entry.get("low") is None or entry.get("high") is None:
        return "–"
    return f"[{fmt_pct(entry['low'])}, {fmt_pct(entry['high'])}]"


def _verdict(stats: Mapping[str, Any] | None, is_reference: bool) -> str:
    """The paired comparison's symbol (:data:`VERDICT_SYMBOLS`), ``ref`` on the reference row itself."""
    if is_reference:
        return "ref"
    vs = (stats or {}).get("vs_reference")
    return VERDICT_SYMBOLS[vs["verdict"]] if vs else "–"


def _method_cells(m: MethodResult, tasks: Sequence[str], reference: str) -> list[str]:
    """avg normalized (random methods: mean ± std over seeds), its interval, vs reference, avg score, tasks."""
    assert m.test is not None
    runs = m.test_runs
    if len(runs) == 1:
        cells = _row_cells(m.test, tasks)
        head = cells[0]
    else:
        est = estimates_of(runs)
        seeds = (m.stats or {}).get("seeds") or seed_summary(m.seeds, [r.average_normalized for r in runs])
        std = seeds.get("std")
        head = f"{fmt_pct(est['average_normalized'])} ± {fmt_pct(std) if std is not None else '–'} ({len(runs)} seeds)"
        averages = [r.average for r in runs]
        avg = None if any(a is None for a in averages) else sum(a for a in averages if a is not None) / len(averages)
        cells = [head, fmt_pct(avg)] + [fmt_pct(est["tasks"].get(t, {}).get("normalized")) for t in tasks]
    ci = _ci((m.stats or {}).get("average_normalized"))
    return [head, ci, _verdict(m.stats, m.method == reference), *cells[1:]]


def _reference_cells(lb: Leaderboard, r: EvalReport, tasks: Sequence[str]) -> list[str]:
    st = lb.statistics.get("references", {}).get(r.model)
    cells = _row_cells(r, tasks)
    return [cells[0], _ci((st or {}).get("average_normalized")), _verdict(st, False), *cells[1:]]


def _statistics_text(lb: Leaderboard) -> list[str]:
    """The legend of the interval and comparison columns."""
    cfg = lb.statistics.get("config") or lb.config.get("statistics")
    if not cfg:
        return []
    ref = cfg.get("reference", "task_arithmetic")
    conf = round(100 * cfg.get("confidence", 0.95))
    return [
        "",
        f"`{conf} % CI`: percentile bootstrap interval of the average normalized score over the test rows "
        f"({cfg.get('bootstrap')} resamples, seed {cfg.get('bootstrap_seed')}; the rows of each task are resampled "
        "within the task, each task's metric and its expert's are recomputed on the resample, then averaged). "
        f"`vs {ref}`: paired bootstrap on the same resamples against the `{ref}` row: "
        f"{VERDICT_SYMBOLS['better']} significantly better, {VERDICT_SYMBOLS['worse']} significantly worse, "
        f"{VERDICT_SYMBOLS[SAME]} not distinguishable (the {conf} % interval of the difference contains 0). "
        f"Random methods (their card says so: DARE, DELLA, ...) are merged with {cfg.get('merge_seeds')} seeds: "
        "mean ± standard deviation over the seeds; their interval and comparison use the mean over seeds. "
        "A chosen point on the edge of its grid was extended past it (the step doubled outward, halved toward "
        "an open bound) until it was interior or a declared hard bound stopped it: `grid extended` lists the "
        "added values and how the search ended, `grid edge` marks a row still reported from an edge.",
    ]


def _task_interval_table(lb: Leaderboard, tasks: Sequence[str]) -> list[str]:
    rows = [m for m in lb.ranked() if m.stats]
    if not rows:
        return []
    out = [
        "",
        "### 95 % intervals per task (normalized, %)",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|" + "---|" * (len(tasks) + 1),
    ]
    for m in rows:
        task_stats = (m.stats or {}).get("tasks", {})
        cells = [_ci(task_stats.get(t, {}).get("normalized")) for t in tasks]
        out.append("| " + " | ".join([m.display_name(), *cells]) + " |")
    return out


def _is_lm(lb: Leaderboard) -> bool:
    return lb.config.get("suite") == "lm"


def _zoo_title(lb: Leaderboard) -> str:
    kind = "LM zoo" if _is_lm(lb) else "classification zoo"
    return f"{kind} `{lb.zoo['name']}` ({len(lb.tasks)} {'domains' if _is_lm(lb) else 'tasks'})"


def _score_word(lb: Leaderboard) -> str:
    return "normalized score" if _is_lm(lb) else "normalized accuracy"


def reproduce_command(lb: Leaderboard) -> str:
    c = lb.config
    vl = c["validation_limit"] if c["validation_limit"] is not None else 0
    tl = c["test_limit"] if c["test_limit"] is not None else 0
    cmd = (
        f"mergelab bench --suite {c.get('suite', 'classification')} --zoo {c['zoo']} "
        + (f"--experts {c['experts']} " if c.get("experts", "full") != "full" else "")
        + f"--methods {','.join(c['methods'])} "
        f"--validation-limit {vl} --test-limit {tl} --seed {c['seed']}"
    )
    cal = c.get("calibration")
    if cal:
        cmd += (
            f" --calibration-examples {cal['examples']} --fisher-examples {cal['fisher_examples']}"
            f" --adamerging-examples {cal['adamerging_examples']} --calibration-device {cal['device']}"
        )
        if "adamerging_split" in cal:
            cmd += f" --adamerging-split {cal['adamerging_split']}"
    st = c.get("statistics")
    if st:
        defaults = StatsConfig()
        if st.get("bootstrap", defaults.bootstrap) != defaults.bootstrap:
            cmd += f" --bootstrap {st['bootstrap']}"
        if st.get("bootstrap_seed", defaults.bootstrap_seed) != defaults.bootstrap_seed:
            cmd += f" --bootstrap-seed {st['bootstrap_seed']}"
        if st.get("merge_seeds", defaults.merge_seeds) != defaults.merge_seeds:
            cmd += f" --merge-seeds {st['merge_seeds']}"
        if not st.get("extend_edges", True):
            cmd += " --no-extend-grid"
    rm = c.get("routed_model")
    if rm:
        defaults_rm = RoutedBenchSettings()
        for key, flag in (
            ("train_examples", "--router-examples"),
            ("validation_examples", "--router-validation-examples"),
            ("epochs", "--router-epochs"),
            ("router_batch_size", "--router-batch-size"),
            ("wemoe_split", "--wemoe-split"),
            ("wemoe_examples", "--wemoe-examples"),
            ("wemoe_steps", "--wemoe-steps"),
            ("device", "--routed-device"),
        ):
            if key in rm and rm[key] != getattr(defaults_rm, key):
                cmd += f" {flag} {rm[key]}"
    if lb.info.get("updates"):
        cmd += "  (the rows were computed in several runs with --update; this one command gives them all)"
    return cmd


def markdown(lb: Leaderboard) -> str:
    """The leaderboard as a markdown document."""
    tasks = lb.tasks
    lm = _is_lm(lb)
    reference = (lb.statistics.get("config") or lb.config.get("statistics") or {}).get("reference", "task_arithmetic")
    head = [
        "model", "avg normalized", "95 % CI", f"vs {reference}", "avg score" if lm else "avg accuracy", *tasks
    ]  # fmt: skip
    measure_text = (
        "Normalized score (%: expert perplexity / merged perplexity; merged exact match / expert exact match for "
        "answers that are exact; 100 = as good as the domain's expert, higher is better)"
        if lm
        else "Normalized accuracy (merged / expert, %)"
    )
    lines = [
        f"# Leaderboard: {_zoo_title(lb)}",
        "",
        f"{measure_text} on the test split (first {lb.config['test_limit']} rows per task). "
        f"Hyperparameters were chosen on the validation split (first {lb.config['validation_limit']} rows per task) "
        f"by average {_score_word(lb)}; the test split was not used for the choice.",
        "",
        "## Merges",
        "",
        "| " + " | ".join([*head, "merge s", "peak MB", "chosen hyperparameters", "val avg norm."]) + " |",
        "|" + "---|" * (len(head) + 4),
    ]
    for m in lb.ranked():
        assert m.test is not None
        cells = [m.display_name(), *_method_cells(m, tasks, reference)]
        cells += [
            f"{m.merge_seconds:.1f}" if m.merge_seconds is not None else "–",
            f"{m.merge_peak_bytes / 2**20:.0f}" if m.merge_peak_bytes is not None else "–",
            m.chosen_label(),
            fmt_pct(m.validation.average_normalized if m.validation else None),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for m in lb.methods:
        if m.status != "ok":
            lines.append(f"| {m.method} | {m.status}: {m.reason} |" + " |" * (len(head) + 2))
    lines += _statistics_text(lb)
    lines += _task_interval_table(lb, tasks)
    lines += _notes(lb)
    lines += ["", "## Reference rows (no merge)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in lb.references:
        lines.append("| " + " | ".join([r.model, *_reference_cells(lb, r, tasks)]) + " |")
    if lm:
        metrics = lb.info.get("metrics", {})
        lines += [
            "",
            (
                "LoRA experts' own test scores: "
                if lb.config.get("experts") == "adapters"
                else "Experts' own test scores: "
            )
            + ", ".join(f"{t} {metrics.get(t, '')} {lb.expert_test[t]:.4g}" for t in tasks)
            + ".",
        ]
    else:
        lines += [
            "",
            "Ensembles run every expert on every input (one forward pass per expert) with the task's head.",
            "`pretrained + linear probe` is the pretrained encoder with a head trained on its frozen features.",
            "",
            "Experts' own test accuracy (%): " + ", ".join(f"{t} {fmt_pct(lb.expert_test[t])}" for t in tasks) + ".",
        ]
    lines += [
        "",
        "## Setup",
        "",
        f"- zoo `{lb.zoo['name']}`, key `{lb.zoo['key']}`; "
        f"build config: `{_short_zoo_config(lb.zoo.get('config', {}))}`",
        "- merge wall time and peak memory (RSS above the pre-merge level) are for the chosen point, "
        f"in-memory merge of {len(tasks)} experts, {_threads(lb)}",
        f"- whole bench: {lb.info.get('bench_seconds', '?')} s; {lb.info.get('platform', {})}",
        f"- reproduce: `{reproduce_command(lb)}`",
        "",
    ]
    return "\n".join(lines)


def _notes(lb: Leaderboard) -> list[str]:
    """Markdown paragraphs about routed and data-informed rows (none when there are none), then the
    suite's own: the paragraphs of ``lb.info["notes"]`` and one line per row with an ``info["note"]``."""
    out: list[str] = []
    routed = [m for m in lb.ranked() if m.routed]
    if routed:
        out += [
            "",
            (
                "Rows marked `(routed)` are not one merged model: each task is scored with its own reconstruction "
                "θ0 + s_t·m_t ⊙ (shared − θ0) (`mergelab extract`), so they need the task id at inference. "
                "Storage is the shared model + θ0 + bit-packed masks, against N separate experts; their merge time "
                "and peak memory are those of `mergelab merge` writing that output to disk."
            ),
            "",
        ]
        for m in routed:
            r = m.routing or {}
            storage = r.get("storage", {})
            shared = r.get("shared_model_test_average_normalized")
            out.append(
                f"- {m.method}: {storage.get('summary', 'storage not recorded')}; "
                f"shared model alone (no task id): {fmt_pct(shared)} % normalized"
            )
    no_id = [m for m in lb.ranked() if m.routed_model]
    if no_id:
        out += [
            "",
            (
                "Rows marked `(routed, no task id)` run as deployed: the model's own router (or gates) routes every "
                "test row, and a classification row is predicted with the head of the task it was routed to, so "
                "a wrong route scores 0 (`oracle head`: the same model with the true task's head, for comparison). "
                "Routers train on train rows and choose their epoch on validation rows; WEMoE's gates minimise "
                "entropy on unlabeled inputs (`"
                + str(lb.config.get("routed_model", {}).get("wemoe_split", "test"))
                + "` split), as in its paper. Throughput: one batch mixing every task, routed model vs the shared "
                "model alone."
            ),
            "",
        ]
        for m in no_id:
            r = m.routing or {}
            rt = (r.get("router_test_accuracy") or {}).get("accuracy")
            tp = r.get("throughput") or {}
            storage = (r.get("storage") or {}).get("summary", "storage not recorded")
            oracle = r.get("oracle_head_test_average_normalized")
            out.append(
                f"- {m.method}: router test accuracy {fmt_pct(rt)} % (validation "
                f"{fmt_pct(r.get('router_validation_accuracy'))} %); "
                + (f"oracle head {fmt_pct(oracle)} %; " if oracle is not None else "")
                + f"{storage}; throughput {tp.get('routed_rows_per_s', '?')} rows/s vs shared model "
                f"{tp.get('shared_rows_per_s', '?')} rows/s ({tp.get('slowdown', '?')}× the time)"
            )
    informed = [m for m in lb.methods if m.statistics]
    cal = lb.config.get("calibration")
    if informed and cal:
        out += [
            "",
            (
                "Data-informed rows: statistics from the zoo's data (labels are used by no method; validation rows "
                f"by none: they only choose the grid point), at most {cal.get('max_length')} tokens per example; "
                "`merge s` excludes the data phase:"
            ),
            "",
        ]
        for m in informed:
            st = m.statistics or {}
            test_time = ": unlabeled test inputs, as in the AdaMerging paper" if st.get("split") == "test" else ""
            # the peak is this run's: shown only when this run computed the statistics (not reused them)
            computed_here = st.get("seconds_total", 0.0) >= 0.5 * st.get("compute_seconds", 0.0)
            peak = f", peak {st['peak_mb'] / 1024:.1f} GB" if st.get("peak_mb") and computed_here else ""
            learned = st.get("summary", {}).get("adamerging")
            out.append(
                f"- {m.method}: {st.get('examples_per_task')} examples per task ({st.get('split')} split{test_time}), "
                f"data phase {st.get('compute_seconds', st.get('seconds_total', 0)):.1f} s for "
                f"{len(st.get('seconds_per_point', []))} grid point(s){peak}" + (f"; {learned}" if learned else "")
            )
    for paragraph in lb.info.get("notes") or []:
        out += ["", paragraph]
    noted = [m for m in lb.methods if (m.info or {}).get("note")]
    if noted:
        out.append("")
        out += [f"- {m.display_name()}: {(m.info or {})['note']}" for m in noted]
    return out


def _threads(lb: Leaderboard) -> str:
    """The torch CPU threads of the run, or of each run that added rows (``--update``)."""
    updates = lb.info.get("updates") or []
    if len({u.get("torch_threads") for u in updates}) <= 1:
        return f"{lb.info.get('torch_threads', '?')} threads"
    latest = {name: u.get("torch_threads") for u in updates for name in u["methods"]}  # a rerun replaces its row
    by_threads: dict[Any, list[str]] = {}
    for m in lb.methods:
        by_threads.setdefault(latest.get(m.method), []).append(m.method)
    return "; ".join(f"{', '.join(names)}: {threads or '?'} threads" for threads, names in by_threads.items())


def _short_zoo_config(config: dict[str, Any]) -> str:
    train = config.get("train", {})
    keys = ("steps", "batch_size", "max_len", "lr", "head_lr", "freeze_embeddings", "seed")
    return ", ".join(f"{k}={train[k]}" for k in keys if k in train) or "?"


def bar_chart(lb: Leaderboard, path: str | os.PathLike) -> Path:
    """Horizontal bars of average normalized test accuracy per row, per-task values as dots."""
    plt = pyplot()

    rows: list[tuple[str, EvalReport, str]] = [
        (m.display_name(), m.test, "merge") for m in lb.ranked() if m.test is not None
    ]
    rows += [(r.model, r, "reference") for r in lb.references]
    fig_h = 1.2 + 0.32 * len(rows)
    fig, ax = plt.subplots(figsize=(10, fig_h), dpi=110)
    y = list(range(len(rows)))[::-1]
    colors = {"merge": "#3b6ea8", "reference": "#b0b0b0"}
    merges = [m for m in lb.ranked() if m.test is not None]
    ref_stats = lb.statistics.get("references", {})
    heights = [100 * (m.score or 0) for m in merges] + [100 * (r.average_normalized or 0) for r in lb.references]
    intervals = [(m.stats or {}).get("average_normalized") for m in merges] + [
        ref_stats.get(r.model, {}).get("average_normalized") for r in lb.references
    ]
    err = [
        [max(0.0, h - 100 * e["low"]) if e and e.get("low") is not None else 0.0 for h, e in zip(heights, intervals)],
        [max(0.0, 100 * e["high"] - h) if e and e.get("high") is not None else 0.0 for h, e in zip(heights, intervals)],
    ]
    ax.barh(y, heights, color=[colors[k] for *_, k in rows], height=0.65, xerr=err, ecolor="#333333", capsize=2)
    markers = "o^sDvP*Xh<>"
    cmap = plt.get_cmap("tab10")
    for j, task in enumerate(lb.tasks):
        xs, ys = [], []
        for yi, (_, rep, _) in zip(y, rows, strict=True):
            s = next((s for s in rep.scores if s.task == task), None)
            if s is not None and s.normalized is not None:
                xs.append(100 * s.normalized)
                ys.append(yi)
        ax.scatter(xs, ys, s=14, marker=markers[j % len(markers)], color=cmap(j % 10), label=task, zorder=3)
    ax.set_yticks(y)
    ax.set_yticklabels([name for name, *_ in rows], fontsize=8)
    ax.axvline(100, color="black", lw=0.8, ls="--")
    ax.set_xlabel(f"{_score_word(lb)} (% of the expert), test split")
    ax.set_title(
        f"mergelab {_zoo_title(lb).replace('`', chr(39))}: bars = average (95 % CI), markers = tasks", fontsize=9
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="task", title_fontsize=7)
    lowest = min(
        [100 * (r.average_normalized or 0) for _, r, _ in rows]
        + [100 * s.normalized for _, r, _ in rows for s in r.scores if s.normalized is not None]
    )
    ax.set_xlim(left=max(0.0, 10 * ((lowest - 5) // 10)))  # zoom in: the interesting part is near 100
    return save_figure(fig, path)


def write_leaderboard(lb: Leaderboard, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``leaderboard.{json,md,png}`` into ``out_dir``; returns their paths."""
    from mergelab_bench.zoo.cache import write_json

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "leaderboard.json", "markdown": out / "leaderboard.md", "png": out / "leaderboard.png"}
    write_json(paths["json"], lb.to_dict())
    paths["markdown"].write_text(markdown(lb))
    bar_chart(lb, paths["png"])
    return paths


def leaderboard_table(lb: Leaderboard):
    """A rich Table of the leaderboard (merges ranked, then reference rows); chosen points in the caption."""
    from rich.table import Table

    chosen = "; ".join(f"{m.method}: {m.chosen_label()}" for m in lb.ranked())
    skipped = "; ".join(f"{m.method}: {m.status} ({m.reason})" for m in lb.methods if m.status != "ok")
    caption = "chosen on validation: " + chosen + (f"\nnot run: {skipped}" if skipped else "")
    table = Table(
        title=f"{_zoo_title(lb).replace('`', chr(39))}: {_score_word(lb)} on test (%)",
        caption=caption,
        caption_justify="left",
    )
    table.add_column("model", no_wrap=True, max_width=22, overflow="ellipsis")
    table.add_column("avg", justify="right", no_wrap=True, min_width=5)
    table.add_column("95 % CI", justify="right", no_wrap=True)
    table.add_column("vs TA", justify="center", no_wrap=True)
    for t in lb.tasks:
        table.add_column(t, justify="right", no_wrap=True, min_width=5)
    table.add_column("merge s", justify="right", no_wrap=True, min_width=5)
    reference = (lb.statistics.get("config") or {}).get("reference", "task_arithmetic")
    for m in lb.ranked():
        assert m.test is not None
        cells = _method_cells(m, lb.tasks, reference)
        table.add_row(m.display_name(), *cells[:3], *cells[4:], f"{m.merge_seconds or 0:.1f}")
    table.add_section()
    for r in lb.references:
        cells = _reference_cells(lb, r, lb.tasks)
        table.add_row(f"[dim]{r.model}[/]", *cells[:3], *cells[4:], "")
    return table
