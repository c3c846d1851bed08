"""Accuracy against storage for a routed method without the task id (issue 16's curve over ranks).

A routed method keeps each expert's exclusive part compressed (Twin-Merging: a rank ⌊d · min(m, n)⌋
SVD of the expert's difference to the shared model per matrix; Lu et al., NeurIPS 2024, §3.2), so
its one knob trades bytes on disk for accuracy. The leaderboard shows one point of that trade-off
(the grid point chosen on validation); this module measures the whole curve: for each value of
one axis (``density`` by default) it builds the routed model exactly as the leaderboard does
(:func:`mergelab_bench.eval.routed_models.routed_model_merge`: same recipe, router data, seed), scores
it on the test split without the task id (:meth:`RoutedModelMerge.evaluate`: a wrong route scores 0),
and records

* the average normalized score with its 95 % bootstrap interval over the test rows,
* the router's test accuracy and the score with the true task's head (oracle head, classification),
* the storage from the output's manifest: shared model + experts + router, against N separate
  experts, and the bytes of one expert's part as a fraction of one model.

Every point is reported; none is chosen on these test scores (the leaderboard's choice, made on
validation, is the row there). Writes ``curve.json``, ``curve.md`` and ``curve.png``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab_bench.eval.grids import ROUTED_ROWS, GridPoint
from mergelab_bench.eval.metrics import fmt_pct
from mergelab_bench.eval.plots import pyplot, save_figure
from mergelab_bench.eval.routed_models import RoutedBenchSettings, routed_model_merge, routed_row_spec
from mergelab_bench.eval.stats import Bootstrap, StatsConfig, estimates_of, rows_of, summarize
from mergelab_bench.zoo.cache import write_json

FORMAT = "mergelab-routed-curve/1"


def _evaluator(zoo: Any, limit: Any) -> Any:
    from mergelab_bench.zoo.lm.build import LMZoo

    if isinstance(zoo, LMZoo):
        from mergelab_bench.eval.lm_harness import LMEvaluator

        return LMEvaluator(zoo, split="test", limit=limit)
    from mergelab_bench.eval.harness import Evaluator

    return Evaluator(zoo, split="test", limit=limit)


def storage_curve(
    zoo: Any,
    row: str,
    axis: str,
    values: Sequence[float],
    work: str | os.PathLike[str],
    *,
    limit: Any = None,
    settings: RoutedBenchSettings | None = None,
    stats: StatsConfig | None = None,
    seed: int = 0,
    echo: Any = None,
) -> dict[str, Any]:
    """One point per value of ``axis`` for the routed row ``row`` (see the module docstring)."""
    spec = routed_row_spec(row)
    if spec is None:
        raise ValueError(f"{row!r} is not a routed row: use one of {', '.join(ROUTED_ROWS)}")
    if not values:
        raise ValueError(f"no values for the axis {axis!r}")
    settings = settings or RoutedBenchSettings()
    stats = stats or StatsConfig()
    say = echo or (lambda _: None)
    ev = _evaluator(zoo, limit)
    tasks = list(ev.tasks)
    boot = Bootstrap(tasks, {t: ev.expert_rows(t) for t in tasks}, resamples=stats.bootstrap, seed=stats.bootstrap_seed)
    points = []
    for value in values:
        t0 = time.perf_counter()
        merged = routed_model_merge(
            spec, zoo, GridPoint({axis: value}), Path(work) / f"{row}-{axis}-{value}", settings=settings, seed=seed
        )
        build_s = time.perf_counter() - t0
        try:
            report = merged.evaluate(ev, row)
            reps = boot.replicates([rows_of(report.info)])
            summary = None if reps is None else summarize(reps, estimates_of([report]), stats.confidence)
            interval = None if summary is None else summary["average_normalized"]
            storage = {k: v for k, v in merged.storage.items() if k != "note"}
            experts = storage.get("expert_bytes") or {}
            shared = storage.get("shared_bytes")
            per_expert = max(experts.values()) if experts else None
            point: dict[str, Any] = {
                "value": value,
                "average_normalized": report.average_normalized,
                "interval": interval,
                "normalized": {s.task: s.normalized for s in report.scores},
                "router_test_accuracy": (merged.router_test or {}).get("accuracy"),
                "oracle_head_average_normalized": merged.oracle.average_normalized if merged.oracle else None,
                "storage": storage,
                "storage_ratio": storage.get("ratio"),
                "expert_fraction_of_model": per_expert / shared if per_expert and shared else None,
                "build_seconds": round(build_s, 2),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            points.append(point)
        finally:
            merged.remove()
        say(
            f"  {axis}={value}: {fmt_pct(report.average_normalized)} % normalized, storage "
            f"{fmt_pct(storage.get('ratio'))} % of {len(tasks)} experts, router "
            f"{fmt_pct(point['router_test_accuracy'])} %"
        )
    return {
        "format": FORMAT,
        "row": row,
        "method": spec.method,
        "axis": axis,
        "zoo": {"name": getattr(zoo, "name", None), "key": getattr(zoo, "key", None)},
        "tasks": tasks,
        "test_limit": ev.limit,
        "seed": seed,
        "routed_settings": settings.describe(),
        "stats": {"bootstrap": stats.bootstrap, "bootstrap_seed": stats.bootstrap_seed, "confidence": stats.confidence},
        "points": points,
    }


def _ci(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("low") is None:
        return "–"
    return f"[{fmt_pct(entry['low'])}, {fmt_pct(entry['high'])}]"


def curve_markdown(result: Mapping[str, Any]) -> str:
    """The curve as a table, with what each column means."""
    tasks = result["tasks"]
    head = [
        result["axis"], "avg normalized %", "95 % CI", "router test acc %", "oracle head %",
        "storage % of N experts", "one expert % of a model", "total MB", *tasks,
    ]  # fmt: skip
    lines = [
        f"# {result['row']}: accuracy against storage over `{result['axis']}`",
        "",
        f"Zoo `{result['zoo']['name']}`, test split ({result['test_limit']} rows per task), no task id: each row is "
        "routed by the model (classification: a row routed to another task's head scores 0). Storage = shared "
        "model + every expert's part + router, against N separate experts (the output's manifest). Every point "
        "is reported; none is chosen on these test scores.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for p in result["points"]:
        st = p.get("storage") or {}
        total = st.get("total_bytes")
        cells = [
            str(p["value"]),
            fmt_pct(p.get("average_normalized")),
            _ci(p.get("interval")),
            fmt_pct(p.get("router_test_accuracy")),
            fmt_pct(p.get("oracle_head_average_normalized")),
            fmt_pct(p.get("storage_ratio")),
            fmt_pct(p.get("expert_fraction_of_model")),
            "–" if total is None else f"{total / 1e6:.1f}",
            *(fmt_pct((p.get("normalized") or {}).get(t)) for t in tasks),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_curve(result: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``curve.json``, ``curve.md`` and ``curve.png`` (normalized score against storage) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "curve.json", "markdown": out / "curve.md", "png": out / "curve.png"}
    write_json(paths["json"], dict(result))
    paths["markdown"].write_text(curve_markdown(result))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = [p for p in result["points"] if p.get("average_normalized") is not None and p.get("storage_ratio")]
    xs = [100 * p["storage_ratio"] for p in pts]
    ys = [100 * p["average_normalized"] for p in pts]
    ax.plot(xs, ys, marker="o")
    for p, x, y in zip(pts, xs, ys, strict=True):
        iv = p.get("interval") or {}
        if iv.get("low") is not None:
            ax.vlines(x, 100 * iv["low"], 100 * iv["high"], linewidth=1)
        ax.annotate(f"{result['axis']}={p['value']}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel(f"storage, % of {len(result['tasks'])} separate experts")
    ax.set_ylabel("average normalized score, % (no task id)")
    ax.set_title(f"{result['row']} on {result['zoo']['name']}: accuracy vs storage")
    ax.grid(alpha=0.3)
    save_figure(fig, paths["png"])
    return paths
