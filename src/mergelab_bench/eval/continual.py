"""Continual merging on a zoo: experts added one at a time, every step scored (``benchmarks/continual_bench.py``).

The protocol (issue 17). For a zoo of T tasks (the classification zoo with fixed task heads, or
the LM suite's domains), a continual method (:mod:`mergelab.continual`: OPCM, DOP and the
sequential baselines) and an order of the tasks, :func:`run_order` adds the experts one at a time
with :class:`mergelab.continual.ContinualMerge` in memory and, after every step t, scores the
merged model on the test split of the tasks seen so far (``all_tasks``: every task), normalized
by each task's expert as the bench does (``merged / expert``; ``expert / merged`` for perplexity).
That gives the *accuracy matrix* ``A[t, j]`` (step × task; ``nan`` where task j was not scored).

From it (pure functions, tested on matrices built by hand):

* :func:`seen_averages`: after step t, the mean of ``A[t, j]`` over the tasks added so far;
* :func:`forgetting`: of task j at step t, ``A[s_j, j] − A[t, j]`` where ``s_j`` is the step
  that added j (its score right after it was added minus its score now; positive = forgotten),
  for every j added before step t;
* :func:`backward_transfer` (BWT, Lopez-Paz & Ranzato 2017): the mean over the tasks added before
  the last step of ``A[T, j] − A[s_j, j]`` (negative = forgetting).

:func:`run_continual` repeats this for every method and task order and adds the *offline* rows:
static methods (:func:`mergelab.merge_state_dicts`) on all experts at once, through the bench's own
grid search on validation (:func:`mergelab_bench.eval.leaderboard.run_suite`) or at fixed
parameters. The final step's average gets a 95 % percentile bootstrap interval over the test rows
(:mod:`mergelab_bench.eval.stats`, the same resamples as the offline rows; over the orders, each
resample's average of the orders' scores). :func:`write_continual` writes ``continual.json``,
``continual.md``, one ``heatmap_<method>.png`` per method and ``curves.png``.

The memory measurement (peak RSS and seconds of ``mergelab continual add`` as a child process,
after 1 … N adds of the 738M benchmark checkpoints) is :func:`measure_adds`.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergelab_bench.eval.metrics import EvalReport, fmt_pct
from mergelab_bench.eval.plots import pyplot, save_figure
from mergelab_bench.eval.stats import Bootstrap, StatsConfig, estimates_of, rows_of, summarize

FORMAT = "mergelab-continual/1"
DEFAULT_METHODS: tuple[str, ...] = ("opcm", "dop", "average", "task_arithmetic", "ties", "magmax")
DEFAULT_OFFLINE: tuple[str, ...] = ("task_arithmetic", "ties")

Echo = Callable[[str], None]
_NEVER = sys.maxsize


# --------------------------------------------------------------------------------------------
# The accuracy matrix and what is read from it


def task_orders(tasks: Sequence[str], n: int, seed: int) -> list[list[str]]:
    """``n`` orders of ``tasks``: the zoo's own order first, then random permutations drawn from ``seed``
    (distinct while there are permutations left)."""
    if n < 1:
        raise ValueError("at least one task order")
    orders = [list(tasks)]
    rng = random.Random(seed)
    tries = 0
    while len(orders) < n:
        perm = list(tasks)
        rng.shuffle(perm)
        tries += 1
        if perm not in orders or tries > 100 * n:
            orders.append(perm)
    return orders


def _positions(order: Sequence[str], tasks: Sequence[str]) -> list[int]:
    """The step (0-based) at which each task of ``tasks`` was added (a task not in ``order``: never)."""
    where = {t: i for i, t in enumerate(order)}
    return [where.get(t, _NEVER) for t in tasks]


def seen_averages(matrix: np.ndarray, order: Sequence[str], tasks: Sequence[str]) -> list[float]:
    """After each step t, the mean of ``matrix[t, j]`` over the tasks added at steps ≤ t (``nan`` values skipped)."""
    pos = _positions(order, tasks)
    out = []
    for t in range(matrix.shape[0]):
        vals = [matrix[t, j] for j in range(len(tasks)) if pos[j] <= t and not math.isnan(matrix[t, j])]
        out.append(float(np.mean(vals)) if vals else math.nan)
    return out


def forgetting(matrix: np.ndarray, order: Sequence[str], tasks: Sequence[str]) -> np.ndarray:
    """``F[t, j] = matrix[s_j, j] − matrix[t, j]`` for every task j added at a step ``s_j < t``, else ``nan``."""
    pos = _positions(order, tasks)
    out = np.full(matrix.shape, np.nan)
    for j, s in enumerate(pos):
        for t in range(s + 1, matrix.shape[0]) if s != _NEVER else ():
            out[t, j] = matrix[s, j] - matrix[t, j]
    return out


def backward_transfer(matrix: np.ndarray, order: Sequence[str], tasks: Sequence[str]) -> float:
    """BWT: the mean over the tasks added before the last step of (final score − score right after it was added)."""
    pos = _positions(order, tasks)
    last = matrix.shape[0] - 1
    diffs = [matrix[last, j] - matrix[s, j] for j, s in enumerate(pos) if s < last]
    diffs = [d for d in diffs if not math.isnan(d)]
    return float(np.mean(diffs)) if diffs else math.nan


def _mean_std(values: Sequence[float | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(vals)}


def _json_matrix(m: np.ndarray) -> list[list[float | None]]:
    return [[None if math.isnan(float(v)) else float(v) for v in row] for row in m]


def _np_matrix(rows: Sequence[Sequence[float | None]]) -> np.ndarray:
    return np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=float)


# --------------------------------------------------------------------------------------------
# A zoo of either suite, as the protocol needs it


class ContinualSuite:
    """A zoo of either suite: its base and expert folders, and scores of a merged state dict on any
    subset of its tasks (one evaluator per subset, sharing one scratch module)."""

    def __init__(self, zoo: Any, *, split: str = "test", limit: Any = None) -> None:
        from mergelab_bench.zoo.lm.build import LMZoo

        self.zoo = zoo
        self.lm = isinstance(zoo, LMZoo)
        self.name = "lm" if self.lm else "classification"
        self.split = split
        if limit is None:
            from mergelab_bench.eval.harness import DEFAULT_TEST_LIMIT

            limit = "zoo" if self.lm else DEFAULT_TEST_LIMIT
        self._full = self.evaluator(zoo.tasks, split, limit)
        self.limit = self._full.limit
        self._subsets: dict[tuple[str, ...], Any] = {tuple(zoo.tasks): self._full}

    @property
    def tasks(self) -> list[str]:
        return list(self.zoo.tasks)

    def evaluator(self, tasks: Sequence[str], split: str, limit: Any) -> Any:
        """The suite's evaluator (``Evaluator`` / ``LMEvaluator``) of ``tasks`` on ``split``."""
        if self.lm:
            from mergelab_bench.eval.lm_harness import LMEvaluator

            return LMEvaluator(self.zoo, tasks=list(tasks), split=split, limit=limit)
        from mergelab_bench.eval.harness import Evaluator

        return Evaluator(self.zoo, tasks=list(tasks), split=split, limit=limit)

    def _subset(self, tasks: Sequence[str]) -> Any:
        key = tuple(t for t in self.zoo.tasks if t in set(tasks))  # the zoo's order
        if key not in self._subsets:
            self._subsets[key] = self.evaluator(key, self.split, self.limit)
        return self._subsets[key]

    def base_path(self) -> Path:
        return Path(self.zoo.base_dir)

    def expert_path(self, task: str) -> Path:
        return Path(self.zoo.expert_model_dir(task))

    def evaluate(self, state: Mapping[str, torch.Tensor], tasks: Sequence[str], name: str) -> EvalReport:
        """``state`` (a merged state dict of the base's architecture) on ``tasks`` (zoo order)."""
        module = self._full.module(state)  # loaded into the one scratch module
        return self._subset(tasks).evaluate(module, name=name)

    def base_report(self) -> EvalReport:
        """The base on every task (cached zoo scores / features)."""
        if self.lm:
            return self._full.evaluate("base", name="base")
        ev = self._full
        return ev.report("base", {t: ev.zoo_logits("base", t).argmax(-1) for t in self.zoo.tasks})

    def expert_rows(self) -> dict[str, Any]:
        return {t: self._full.expert_rows(t) for t in self.zoo.tasks}

    def metric(self, task: str) -> str:
        return self.zoo.metrics(task)[0] if self.lm else "accuracy"


# --------------------------------------------------------------------------------------------
# One method, one order


def run_order(
    suite: ContinualSuite,
    method: str,
    params: Mapping[str, Any],
    order: Sequence[str],
    *,
    all_tasks: bool = False,
    threads: int | None = None,
    device: str = "cpu",
    echo: Echo | None = None,
    label: str = "",
) -> dict[str, Any]:
    """Add the experts of ``order`` one at a time with ``method`` (in memory) and score every step.

    Returns the run: the order, the resolved parameters, per step the added task, the seconds of
    the add (on ``device``) and of the scoring, the engine's expected and measured peak, the scores (raw and
    normalized) of the scored tasks, and the step × task matrix (zoo task order; ``None`` where a
    task was not scored). The last step's report is kept whole (``final_report``) for the bootstrap.
    """
    from mergelab.continual import ContinualMerge

    say = echo or (lambda _: None)
    tasks = suite.tasks
    cm = ContinualMerge.init(suite.base_path(), method=method, params=dict(params))
    matrix = np.full((len(order), len(tasks)), np.nan)
    values = np.full((len(order), len(tasks)), np.nan)
    steps: list[dict[str, Any]] = []
    report: EvalReport | None = None
    for t, task in enumerate(order):
        t0 = time.perf_counter()
        rep = cm.add(suite.expert_path(task), name=task, threads=threads, device=device)
        merged = cm.state_dict(out_dtype="float32")
        t1 = time.perf_counter()
        scored = tasks if all_tasks else list(order[: t + 1])
        report = suite.evaluate(merged, scored, name=f"{method} step {t + 1}")
        del merged
        t2 = time.perf_counter()
        for s in report.scores:
            j = tasks.index(s.task)
            values[t, j] = math.nan if s.value is None else s.value
            matrix[t, j] = math.nan if s.normalized is None else s.normalized
        seen = seen_averages(matrix[: t + 1], order[: t + 1], tasks)[-1]
        steps.append(
            {
                "step": t + 1,
                "added": task,
                "add_seconds": round(t1 - t0, 3),
                "engine_seconds": rep.expert.seconds,
                "eval_seconds": round(t2 - t1, 3),
                "expected_peak_bytes": rep.expected_peak_bytes,
                "peak_rss_bytes": rep.peak_rss_bytes,
                "scale": rep.expert.scale,
                "history": dict(rep.expert.history),
                "average_seen": seen,
            }
        )
        say(
            f"  {label}step {t + 1}/{len(order)} +{task}: avg over {t + 1} seen {fmt_pct(seen)} % "
            f"(add {t1 - t0:.1f} s, score {t2 - t1:.1f} s)"
        )
    assert report is not None
    return {
        "method": method,
        "params": dict(cm.record.params),
        "order": list(order),
        "steps": steps,
        "matrix": _json_matrix(matrix),
        "values": _json_matrix(values),
        "final_report": report.to_dict(),
    }


def summarize_run(run: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Add the read-outs of a run's matrix: average over seen tasks per step, forgetting, BWT, final average."""
    m = _np_matrix(run["matrix"])
    order = run["order"]
    run["average_seen"] = seen_averages(m, order, tasks)
    run["forgetting"] = _json_matrix(forgetting(m, order, tasks))
    run["bwt"] = backward_transfer(m, order, tasks)
    final = [m[-1, j] for j in range(len(tasks)) if not math.isnan(m[-1, j])]
    run["final_average"] = float(np.mean(final)) if final else None
    return run


# --------------------------------------------------------------------------------------------
# Offline rows: static methods on all experts at once


def offline_rows(
    suite: ContinualSuite,
    methods: Sequence[str],
    *,
    fixed: Mapping[str, Mapping[str, Any]] | None = None,
    validation_limit: int | None = None,
    stats: StatsConfig,
    seed: int = 0,
    echo: Echo | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Static merges of every expert at once (the offline upper bounds), scored on the same test rows.

    A method in ``fixed`` merges at those parameters (one grid point, no search); the others are
    tuned on ``validation_limit`` validation rows per task over the suite's grid (the bench's
    :func:`~mergelab_bench.eval.leaderboard.run_suite`, with its grid-edge extension). Returns the
    rows (chosen point, test report, bootstrap interval) and how they were chosen.
    """
    from mergelab_bench.eval.data_informed import BenchCalibration
    from mergelab_bench.eval.grids import GridPoint
    from mergelab_bench.eval.harness import load_state_dict_path
    from mergelab_bench.eval.leaderboard import CLASSIFICATION, _Steps, run_suite

    say = echo or (lambda _: None)
    fixed = dict(fixed or {})
    if suite.lm:
        from mergelab_bench.eval.lm_bench import DEFAULT_LM_VALIDATION_LIMIT, LM_SUITE

        bench_suite, val_limit = LM_SUITE, validation_limit or DEFAULT_LM_VALIDATION_LIMIT
    else:
        from mergelab_bench.eval.harness import DEFAULT_VALIDATION_LIMIT

        bench_suite, val_limit = CLASSIFICATION, validation_limit or DEFAULT_VALIDATION_LIMIT
    grids: dict[str, tuple[GridPoint, ...]] = {}
    for m in methods:
        if m in fixed:
            grids[m] = (_fixed_point(bench_suite.grid_for(m), fixed[m]),)
    base = load_state_dict_path(suite.base_path())
    experts = [load_state_dict_path(suite.expert_path(t)) for t in suite.tasks]
    out: list[dict[str, Any]] = []
    how: dict[str, Any] = {"validation_limit": val_limit, "methods": {}}
    for m in methods:  # one run_suite per method: a fixed method must not extend its one-point grid
        cfg = stats if m not in fixed else StatsConfig(**{**_stats_kwargs(stats), "extend_edges": False})
        val = suite.evaluator(suite.tasks, "validation", val_limit)
        lb = run_suite(
            bench_suite, suite.zoo, val=val, test=suite._full, base=base, experts=experts, references=[],
            expert_test={}, methods=[m], grids=grids, seed=seed, merge_fn=_merge_state_dicts(), progress=None,
            steps=_Steps(), say=say, calibration=BenchCalibration(), work_dir=None, t_start=time.perf_counter(),
            limits={"validation_limit": val_limit, "test_limit": suite.limit}, stats=cfg,
        )  # fmt: skip
        r = lb.methods[0]
        how["methods"][m] = (
            "fixed parameters (--offline-param)" if m in fixed else f"validation search over the bench's {m} grid"
        )
        row: dict[str, Any] = {
            "method": m,
            "status": r.status,
            "reason": r.reason,
            "chosen": r.chosen.to_dict() if r.chosen else None,
            "chosen_label": r.chosen_label(),
            "selection": how["methods"][m],
            "grid": [g.to_dict() for g in r.grid],
            "merge_seconds": r.merge_seconds,
            "test": r.test.to_dict() if r.test else None,
            "stats": r.stats,
        }
        out.append(row)
    del base, experts
    return out, how


def _merge_state_dicts() -> Any:
    from mergelab import merge_state_dicts

    return merge_state_dicts


def _stats_kwargs(stats: StatsConfig) -> dict[str, Any]:
    return {
        "bootstrap": stats.bootstrap,
        "bootstrap_seed": stats.bootstrap_seed,
        "merge_seeds": stats.merge_seeds,
        "confidence": stats.confidence,
        "reference": stats.reference,
        "extend_edges": stats.extend_edges,
        "max_extensions": stats.max_extensions,
    }


def _fixed_point(grid: Sequence[Any], values: Mapping[str, Any]) -> Any:
    """A grid point with ``values``, each key on the side (global / per-model) the method's grid puts it."""
    from mergelab_bench.eval.grids import GridPoint

    model_keys = {k for p in grid for k in p.model_parameters}
    params = {k: v for k, v in values.items() if k not in model_keys}
    model = {k: v for k, v in values.items() if k in model_keys}
    return GridPoint(params, model)


# --------------------------------------------------------------------------------------------
# Everything


def run_continual(
    suite: ContinualSuite,
    *,
    methods: Sequence[str] = DEFAULT_METHODS,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    orders: Sequence[Sequence[str]],
    offline: Sequence[str] = DEFAULT_OFFLINE,
    offline_fixed: Mapping[str, Mapping[str, Any]] | None = None,
    validation_limit: int | None = None,
    all_tasks: bool = False,
    stats: StatsConfig | None = None,
    threads: int | None = None,
    device: str = "cpu",
    echo: Echo | None = None,
    on_run: Callable[[dict[str, Any]], object] | None = None,
    done: Mapping[tuple[str, int], Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every method over every order, the offline rows and the base; returns the result ``continual.json`` holds.

    ``params``: parameters per continual method (default: each method's defaults, the reference
    code's). ``device``: where each continual step runs (DOP's per-layer optimisation wants a GPU on the
    LM suite). ``done`` maps (method, order index) to runs measured before with the same settings
    (returned as they are); ``on_run`` is called after each new run (the script saves as it goes).
    """
    say = echo or (lambda _: None)
    stats = stats or StatsConfig()
    params = dict(params or {})
    done = done or {}
    tasks = suite.tasks
    t0 = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for method in methods:
        for k, order in enumerate(orders):
            if (method, k) in done:
                runs.append(dict(done[(method, k)]))
                say(f"{method}, order {k}: reused")
                continue
            say(f"{method}, order {k}: {' → '.join(order)}")
            run = run_order(
                suite,
                method,
                params.get(method, {}),
                order,
                all_tasks=all_tasks,
                threads=threads,
                device=device,
                echo=say,
            )
            run["order_index"] = k
            runs.append(summarize_run(run, tasks))
            if on_run is not None:
                on_run(run)
            say(f"{method}, order {k}: final {fmt_pct(run['final_average'])} %, BWT {_pp(run['bwt'])}")
    rows: list[dict[str, Any]] = []
    how: dict[str, Any] = {}
    if offline:
        rows, how = offline_rows(
            suite, offline, fixed=offline_fixed, validation_limit=validation_limit, stats=stats, echo=say
        )
    for r in rows:
        ci = (r.get("stats") or {}).get("average_normalized") or {}
        say(f"offline {r['method']} ({r['chosen_label']}): {fmt_pct(ci.get('estimate'))} %")
    base = suite.base_report()
    result = {
        "format": FORMAT,
        "suite": suite.name,
        "zoo": {"name": suite.zoo.name, "key": suite.zoo.key, "tasks": tasks},
        "metrics": {t: suite.metric(t) for t in tasks},
        "split": suite.split,
        "test_limit": suite.limit,
        "all_tasks": all_tasks,
        "orders": [list(o) for o in orders],
        "methods": list(methods),
        "runs": runs,
        "offline": rows,
        "offline_selection": how,
        "base": base.to_dict(),
        "statistics": stats.to_dict(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    add_statistics(result, suite.expert_rows(), stats)
    return result


def add_statistics(result: dict[str, Any], expert_rows: Mapping[str, Any], stats: StatsConfig) -> dict[str, Any]:
    """Per method: mean ± std over the orders of the final average, BWT and the average over seen tasks per
    step; the bootstrap interval of the final average (each resample: the mean of the orders' scores)."""
    tasks = result["zoo"]["tasks"]
    boot = Bootstrap(tasks, expert_rows, resamples=stats.bootstrap, seed=stats.bootstrap_seed)
    summary: dict[str, Any] = {}
    for method in result["methods"]:
        runs = [r for r in result["runs"] if r["method"] == method]
        if not runs:
            continue
        steps = len(runs[0]["average_seen"])
        entry: dict[str, Any] = {
            "orders": len(runs),
            "params": runs[0]["params"],
            "final_average": _mean_std([r["final_average"] for r in runs]),
            "bwt": _mean_std([r["bwt"] for r in runs]),
            "average_seen": [_mean_std([r["average_seen"][t] for r in runs]) for t in range(steps)],
            "final_tasks": {t: _mean_std([r["matrix"][-1][j] for r in runs]) for j, t in enumerate(tasks)},
            "add_seconds": _mean_std([s["add_seconds"] for r in runs for s in r["steps"]]),
            "eval_seconds": _mean_std([s["eval_seconds"] for r in runs for s in r["steps"]]),
        }
        reports = [EvalReport.from_dict(r["final_report"]) for r in runs]
        reps = boot.replicates([rows_of(rep.info) for rep in reports])
        if reps is not None:
            entry["interval"] = summarize(reps, estimates_of(reports), stats.confidence)["average_normalized"]
        summary[method] = entry
    result["summary"] = summary
    result["expert_rows"] = {t: r.to_dict() for t, r in expert_rows.items()}
    return result


def _pp(x: float | None) -> str:
    """A difference of normalized scores in percentage points."""
    return "–" if x is None or math.isnan(x) else f"{100 * x:+.1f} pp"


# --------------------------------------------------------------------------------------------
# Writing


def write_continual(result: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``continual.json``, ``continual.md``, ``heatmap_<method>.png`` and ``curves.png`` into ``out_dir``
    (a ``memory`` section already in ``continual.json`` is kept when ``result`` has none)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dict(result)
    path = out / "continual.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        if "memory" in old and "memory" not in data:
            data["memory"] = old["memory"]
        if "runs" in old and "runs" not in data:  # a memory-only run keeps the protocol's results
            data = {**old, **data}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    paths = {"json": path, "markdown": out / "continual.md"}
    paths["markdown"].write_text(continual_markdown(data))
    if data.get("runs"):
        for method in data["methods"]:
            if any(r["method"] == method for r in data["runs"]):
                paths[f"heatmap_{method}"] = heatmap(data, method, out / f"heatmap_{method}.png")
        paths["curves"] = curves(data, out / "curves.png")
    return paths


def _ms(entry: Mapping[str, Any] | None, pp: bool = False) -> str:
    if not entry or entry.get("mean") is None:
        return "–"
    if pp:
        return f"{100 * entry['mean']:+.1f} ± {100 * (entry.get('std') or 0):.1f}"
    return f"{fmt_pct(entry['mean'])} ± {fmt_pct(entry.get('std') or 0)}"


def _ci(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("low") is None:
        return "–"
    return f"[{fmt_pct(entry['low'])}, {fmt_pct(entry['high'])}]"


def _params_text(p: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items() if v not in (None, [], "")) or "defaults"


def continual_markdown(data: Mapping[str, Any]) -> str:
    """The tables: final step beside the offline methods, the average over seen tasks per step, BWT, memory."""
    lines = ["# Continual merging", ""]
    if data.get("runs"):
        lines += _protocol_tables(data)
    memory = data.get("memory")
    if memory:
        lines += memory_markdown(memory)
    return "\n".join(lines) + "\n"


def _protocol_tables(data: Mapping[str, Any]) -> list[str]:
    tasks = data["zoo"]["tasks"]
    summary = data.get("summary", {})
    n_orders = len(data["orders"])
    stats = data.get("statistics", {})
    score = "normalized score" if data["suite"] == "lm" else "normalized accuracy"
    lines = [
        f"Suite `{data['suite']}`, zoo `{data['zoo']['name']}` ({data['zoo']['key']}), {len(tasks)} tasks; "
        f"{data['split']} split, {data['test_limit'] or 'all'} rows per task; {n_orders} task order(s) "
        "(order 0: the zoo's, then random permutations). The experts are added one at a time "
        "(`mergelab.continual.ContinualMerge`, in memory); after every step the merge is scored on "
        + ("every task" if data.get("all_tasks") else "the tasks seen so far")
        + f", {score} = merged / that task's expert (expert / merged for perplexity), 100 = as good as the expert. "
        "Continual methods run at the parameters listed (their defaults unless set with `--param`). "
        "Offline rows merge all experts at once with the static method (an upper bound that needs every "
        "expert at the same time). BWT = mean over the tasks added before the last step of (final score − score "
        "right after the task was added), in percentage points; negative = forgetting. "
        f"95 % CI: percentile bootstrap over the test rows ({stats.get('bootstrap')} resamples, resampled within "
        "each task, the expert recomputed on the same rows; continual rows: each resample's mean over the orders).",
        "",
        "## Final step (all tasks added)",
        "",
        "| method | kind | parameters | avg normalized % (mean ± std over orders) | 95 % CI | BWT pp (mean ± std) | "
        + " | ".join(tasks)
        + " | s per add |",
        "|" + "---|" * (7 + len(tasks)),
    ]
    for method, s in summary.items():
        cells = [
            method, "continual", _params_text(s["params"]), _ms(s["final_average"]), _ci(s.get("interval")),
            _ms(s["bwt"], pp=True), *(_ms(s["final_tasks"][t]) for t in tasks), f"{s['add_seconds']['mean']:.1f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    for r in data.get("offline", []):
        if r["status"] != "ok" or not r.get("test"):
            lines.append(f"| {r['method']} | offline | {r['status']}: {r['reason']} |" + " |" * (3 + len(tasks)))
            continue
        test = r["test"]
        avg = ((r.get("stats") or {}).get("average_normalized")) or {}
        cells = [
            r["method"], "offline (all at once)", r["chosen_label"], fmt_pct(test["average_normalized"]), _ci(avg),
            "–", *(fmt_pct(test["tasks"][t]["normalized"]) for t in tasks),
            f"{r['merge_seconds']:.1f} (whole merge)" if r.get("merge_seconds") is not None else "–",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    base = data.get("base")
    if base:
        cells = [
            "base", "reference", "–", fmt_pct(base["average_normalized"]), "–", "–",
            *(fmt_pct(base["tasks"][t]["normalized"]) for t in tasks), "–",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    sel = data.get("offline_selection", {})
    if sel.get("methods"):
        lines += [
            "",
            "Offline parameters: "
            + "; ".join(f"{m}: {how}" for m, how in sel["methods"].items())
            + f" (validation: first {sel.get('validation_limit')} rows per task).",
        ]
    steps = max((len(s["average_seen"]) for s in summary.values()), default=0)
    lines += [
        "",
        "## Average normalized score over the tasks seen so far, after each step (%, mean ± std over orders)",
        "",
        "| method | " + " | ".join(f"step {t + 1}" for t in range(steps)) + " |",
        "|" + "---|" * (1 + steps),
    ]
    for method, s in summary.items():
        lines.append("| " + " | ".join([method, *(_ms(e) for e in s["average_seen"])]) + " |")
    lines += [
        "",
        "## Per order",
        "",
        "| method | order | tasks in order | final avg % | BWT pp | s per add (mean) | s per scoring (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["runs"]:
        adds = [s["add_seconds"] for s in r["steps"]]
        evals = [s["eval_seconds"] for s in r["steps"]]
        cells = [
            r["method"], str(r.get("order_index", "")), " → ".join(r["order"]), fmt_pct(r["final_average"]),
            _pp(r["bwt"]).replace(" pp", ""), f"{sum(adds) / len(adds):.1f}", f"{sum(evals) / len(evals):.1f}",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Heat maps (`heatmap_<method>.png`): order 0's step × task matrix, the tasks in the order they were added. "
        "`curves.png`: the average over seen tasks against the step, mean ± std over the orders; dashed: offline.",
        "",
    ]
    return lines


def heatmap(data: Mapping[str, Any], method: str, path: str | os.PathLike[str]) -> Path:
    """Order 0's step × task matrix of ``method`` (tasks in the order they were added), values in %."""
    plt = pyplot()

    tasks = data["zoo"]["tasks"]
    run = next(r for r in data["runs"] if r["method"] == method)
    order = run["order"]
    m = _np_matrix(run["matrix"])[:, [tasks.index(t) for t in order]] * 100
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(order), 1.0 + 0.6 * len(order)), dpi=110)
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", aspect="auto")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if not math.isnan(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=7, color="white")
    ax.set_xticks(range(len(order)), order, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(m.shape[0]), [f"+{t}" for t in order], fontsize=8)
    ax.set_xlabel("task (in the order added)")
    ax.set_ylabel("step (expert added)")
    ax.set_title(f"{method}: normalized score % ({data['suite']}, order 0)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def curves(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Average normalized score over the seen tasks against the step, per method (mean ± std band over
    the orders); the offline rows as dashed lines at the final step."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7.0, 4.6), dpi=110)
    cmap = plt.get_cmap("tab10")
    steps = 0
    for i, (method, s) in enumerate(data.get("summary", {}).items()):
        mean = np.array([np.nan if e["mean"] is None else 100 * e["mean"] for e in s["average_seen"]])
        std = np.array([0.0 if e["std"] is None else 100 * e["std"] for e in s["average_seen"]])
        xs = np.arange(1, len(mean) + 1)
        steps = max(steps, len(mean))
        ax.plot(xs, mean, marker="o", ms=3, color=cmap(i % 10), label=method)
        ax.fill_between(xs, mean - std, mean + std, color=cmap(i % 10), alpha=0.18, lw=0)
    for j, r in enumerate(data.get("offline", [])):
        if r.get("test") and r["test"].get("average_normalized") is not None:
            ax.axhline(
                100 * r["test"]["average_normalized"], color=cmap((j + 6) % 10), ls="--", lw=1,
                label=f"offline {r['method']}",
            )  # fmt: skip
    ax.axhline(100, color="black", lw=0.6, ls=":")
    ax.set_xticks(range(1, steps + 1))
    ax.set_xlabel("step (experts added)")
    ax.set_ylabel("avg normalized score over seen tasks (%)")
    ax.set_title(f"continual merging, {data['suite']} ({len(data['orders'])} orders)", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    return save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Memory and time of `mergelab continual add` on large checkpoints

_PEAK_LINE = re.compile(r"expected peak working memory ([0-9.]+ [KMGT]?B): (.*?buffers)")
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def _parse_bytes(text: str) -> int:
    number, unit = text.split()
    return int(float(number) * _UNITS[unit])


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure_child(cmd: Sequence[str], log: Path, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd`` as a child process: wall seconds from spawn to exit, peak RSS from ``os.wait4``
    (``ru_maxrss`` of the child alone), exit code, the 1-minute load average before; output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    with open(log, "wb") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=dict(env or os.environ))
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    return {
        "seconds": round(wall, 3),
        "peak_rss_bytes": int(usage.ru_maxrss) * 1024,
        "exit_code": os.waitstatus_to_exitcode(status),
        "load_avg": round(load, 2),
        "log": str(log),
    }


def measure_adds(
    base: Path,
    experts: Sequence[Path],
    work: Path,
    *,
    methods: Sequence[str],
    params: Mapping[str, Mapping[str, Any]] | None = None,
    threads: int | None = None,
    mergelab: Sequence[str] | None = None,
    echo: Echo | None = None,
    keep_states: bool = False,
) -> list[dict[str, Any]]:
    """For each method: ``mergelab continual init`` a state of ``base`` under ``work``, then ``mergelab
    continual add`` each expert in turn, each add a fresh child process measured by :func:`measure_child`.

    Each record: method, add number, expert, seconds, the child's peak RSS, the expected peak the command
    printed (its line and bytes), the state folder's size after the add, the engine's own step seconds
    (from the state) and the exit code. A failed add ends that method's series.
    """
    say = echo or (lambda _: None)
    cli = list(mergelab or [sys.executable, "-m", "mergelab"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "400"}
    records: list[dict[str, Any]] = []
    for method in methods:
        state = work / method / "state"
        if state.exists():
            shutil.rmtree(state)
        state.parent.mkdir(parents=True, exist_ok=True)
        cmd = [*cli, "continual", "init", str(base), str(state), "--method", method]
        for k, v in (params or {}).get(method, {}).items():
            cmd += ["--param", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        init = measure_child(cmd, work / method / "logs" / "init.log", env)
        if init["exit_code"] != 0:
            raise RuntimeError(f"continual init ({method}) failed: see {init['log']}")
        for i, expert in enumerate(experts, 1):
            cmd = [*cli, "continual", "add", str(state), str(expert), "--quiet"]
            if threads:
                cmd += ["--threads", str(threads)]
            run = measure_child(cmd, work / method / "logs" / f"add-{i}.log", env)
            text = " ".join(Path(run["log"]).read_text(errors="replace").split())  # rich may wrap the line
            match = _PEAK_LINE.search(text)
            rec: dict[str, Any] = {
                "method": method,
                "add": i,
                "expert": str(expert),
                **run,
                "expected_peak_bytes": _parse_bytes(match[1]) if match else None,
                "expected_peak_line": f"{match[1]}: {match[2].strip()}" if match else None,
            }
            if run["exit_code"] == 0:
                record = json.loads((state / "continual.json").read_text())
                rec["engine_seconds"] = record["experts"][-1].get("seconds")
                rec["state_bytes"] = _dir_bytes(state)
            records.append(rec)
            say(
                f"  {method} add {i}/{len(experts)}: {run['seconds']:.1f} s, peak RSS "
                f"{run['peak_rss_bytes'] / 1e9:.2f} GB (expected working memory "
                f"{(rec['expected_peak_bytes'] or 0) / 1e9:.2f} GB), exit {run['exit_code']}"
            )
            if run["exit_code"] != 0:
                say(f"  {method}: add {i} failed; see {run['log']}")
                break
        if not keep_states:
            shutil.rmtree(state, ignore_errors=True)
    return records


def _gb(n: int | None) -> str:
    if not n:
        return "–"
    return f"{n / 1e9:.2f}" if n >= 1e7 else f"{n / 1e9:.5f}"


def memory_markdown(memory: Mapping[str, Any]) -> list[str]:
    """The table of :func:`measure_adds`' records (the adds in ``memory['highlight']`` in bold)."""
    highlight = set(memory.get("highlight", []))
    inputs = memory.get("inputs", {})
    lines = [
        "## Memory and time per `mergelab continual add`",
        "",
        f"Inputs: {inputs.get('description', '')}. Each add is `mergelab continual add STATE EXPERT --quiet` "
        "in a fresh child process: seconds from spawn to exit (interpreter start, imports, reading the base, "
        "the running task vector and the expert, writing the new state), peak RSS = the child's `ru_maxrss` "
        "(GB = 10⁹ bytes); expected = the working memory the command prints before the step (headers only). "
        "The state holds one float32 task vector whatever the number of experts, so neither should grow with "
        f"the number of adds. Torch threads: {memory.get('threads') or 'default'}.",
        "",
        "| method | add | seconds | peak RSS GB | expected working memory GB | state GB | load avg |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in memory.get("records", []):
        bold = (lambda s: f"**{s}**") if r["add"] in highlight else (lambda s: s)
        cells = [
            r["method"], bold(str(r["add"])), bold(f"{r['seconds']:.1f}"), bold(f"{r['peak_rss_bytes'] / 1e9:.2f}"),
            _gb(r.get("expected_peak_bytes")), _gb(r.get("state_bytes")), f"{r['load_avg']:.1f}",
        ]  # fmt: skip
        if r.get("exit_code"):
            cells[2] += f" (exit {r['exit_code']})"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines
