"""What a search writes into its folder, each file replaced in one rename (never half-written).

* ``trials.jsonl``: the append-only trial log (:mod:`mergelab.search.log`), the resume point;
* ``trials.json`` / ``trials.csv``: every trial: key, parameters (decoded values), score, the
  objective per task, times, worker;
* ``best_recipe.yaml``: the best trial as a plain recipe (mergelab and mergekit read it; Evolver and
  Frank–Wolfe results are weights files, which their recipe names);
* ``convergence.png``: every trial's score and the best so far;
* ``pareto.png`` / ``pareto.json``: multi-objective searches (the non-dominated trials) and MAP
  (the predicted front against the evaluated points);
* ``search.json``: the search's settings and summary (best trial, time, trials per minute, notes).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab.errors import OutputError


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write ``path`` through a temporary file beside it and one rename."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from None


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(_finite(data), indent=2, default=str) + "\n")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def trial_rows(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per trial for ``trials.csv``."""
    rows = []
    for r in records:
        row: dict[str, Any] = {
            "trial": r.get("trial"),
            "key": r.get("key", ""),
            "score": r.get("score"),
        }
        for task, v in (r.get("scores") or {}).get("tasks", {}).items():
            row[f"task:{task}"] = v
        for name, v in (r.get("values") or {}).items():
            row[f"param:{name}"] = v
        for k in ("seconds", "merge_seconds", "eval_seconds", "worker", "finished"):
            row[k] = r.get(k)
        rows.append(row)
    return rows


def write_trials(folder: Path, records: Sequence[Mapping[str, Any]]) -> None:
    write_json(folder / "trials.json", list(records))
    rows = trial_rows(records)
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    write_atomic(folder / "trials.csv", buf.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save_png(plt: Any, fig: Any, path: Path) -> None:
    """Lay ``fig`` out, close it and write it as a PNG to ``path`` atomically."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def plot_convergence(path: Path, records: Sequence[Mapping[str, Any]], title: str) -> None:
    """Every trial's score (dots) and the best so far (line), by trial number."""
    plt = _pyplot()
    xs = [r["trial"] for r in records]
    ys = [float(r["score"]) for r in records]
    best, run = [], -math.inf
    for y in ys:
        run = max(run, y)
        best.append(run)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    ax.scatter(xs, ys, s=10, alpha=0.5, label="trial")
    ax.plot(xs, best, color="C3", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("score (validation)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    _save_png(plt, fig, path)


def plot_pareto(
    path: Path,
    tasks: Sequence[str],
    measured: Sequence[Sequence[float]],
    front: Sequence[Sequence[float]] | None = None,
    chosen: Sequence[float] | None = None,
    title: str = "",
    front_label: str = "Pareto front",
) -> None:
    """Pairwise scatter of the tasks' values: measured points, the front, the chosen point."""
    plt = _pyplot()
    m = len(tasks)
    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)][:6] or [(0, 0)]
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), dpi=110, squeeze=False)
    for ax, (i, j) in zip(axes.flat, pairs):
        if measured:
            ax.scatter([p[i] for p in measured], [p[j] for p in measured], s=14, alpha=0.6, label="evaluated")
        if front:
            ax.scatter([p[i] for p in front], [p[j] for p in front], s=8, marker=">", alpha=0.5, label=front_label)
        if chosen is not None:
            ax.scatter([chosen[i]], [chosen[j]], s=80, marker="*", color="C3", label="chosen")
        ax.set_xlabel(tasks[i])
        ax.set_ylabel(tasks[j])
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    _save_png(plt, fig, path)


def non_dominated_records(records: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> list[Mapping[str, Any]]:
    """Trials no other trial beats on every task (higher is better), in trial order."""
    pts = [[float(r["scores"]["tasks"][t]) for t in tasks] for r in records]
    out = []
    for i, p in enumerate(pts):
        dominated = any(
            all(q[k] >= p[k] for k in range(len(p))) and any(q[k] > p[k] for k in range(len(p))) for q in pts
        )
        if not dominated:
            out.append(records[i])
    return out
