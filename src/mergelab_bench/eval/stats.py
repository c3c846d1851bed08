"""Statistics of a leaderboard, for both suites: bootstrap intervals, paired comparisons, merge seeds.

Every score of a leaderboard is an estimate from a finite set of test rows. This module turns
the per-row results the harnesses keep (:class:`TaskRows`: a correct flag per row for accuracy
and exact match; a summed NLL and a token count per text for perplexity) into

* a **95 % percentile bootstrap interval** (Efron & Tibshirani 1993, ch. 13) for each task's
  score and for the average normalized score: the rows of each task are resampled with
  replacement, independently per task, each task's metric is recomputed on the resample
  (accuracy / exact match: the mean of the flags; perplexity: ``exp(Σ NLL / Σ tokens)`` over the
  resampled texts, so every text keeps its token weight), the expert's score is recomputed on
  the *same* resampled rows (the normalizer is an estimate on those rows too), and the
  normalized average is taken over tasks;
* a **paired bootstrap** against a reference row (task arithmetic): both rows are recomputed
  on the same resamples, and the 95 % interval of the difference of their average normalized
  scores says *better* (above 0), *worse* (below 0) or *not distinguishable* (contains 0);
* for **random methods** (``MethodCard.random``), the mean and standard deviation over merge
  seeds; their interval and their paired comparison use the mean over seeds of each resample.

The resamples are a function of (bootstrap seed, task name, number of rows) only, so every row
of a leaderboard — and a row added later with ``--update`` — is scored on the same resamples,
which is what makes the comparison paired. Nothing here depends on the suite: the metric of
each :class:`TaskRows` says how to recompute it.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergelab_bench.eval.metrics import LOWER_IS_BETTER

DEFAULT_BOOTSTRAP = 1000
"""Bootstrap resamples per leaderboard (``B``)."""
DEFAULT_BOOTSTRAP_SEED = 0
DEFAULT_MERGE_SEEDS = 3
"""Merge seeds of a random method's row (seed, seed + 1, ...)."""
CONFIDENCE = 0.95

BETTER, WORSE, SAME = "better", "worse", "not distinguishable"
VERDICT_SYMBOLS = {BETTER: "▲", WORSE: "▼", SAME: "≈"}
"""Markdown symbols of the paired comparison with the reference row."""


@dataclass(frozen=True)
class StatsConfig:
    """How a bench run computes its statistics (recorded in ``leaderboard.json``)."""

    bootstrap: int = DEFAULT_BOOTSTRAP
    bootstrap_seed: int = DEFAULT_BOOTSTRAP_SEED
    merge_seeds: int = DEFAULT_MERGE_SEEDS
    confidence: float = CONFIDENCE
    reference: str = "task_arithmetic"
    extend_edges: bool = True
    max_extensions: int = 6
    """Extension points per axis and direction before the search stops (marked ``extension limit``)."""

    def __post_init__(self) -> None:
        if self.bootstrap < 1:
            raise ValueError("bootstrap resamples must be at least 1")
        if self.merge_seeds < 1:
            raise ValueError("merge seeds must be at least 1")
        if not 0 < self.confidence < 1:
            raise ValueError("confidence must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        return {
            "bootstrap": self.bootstrap,
            "bootstrap_seed": self.bootstrap_seed,
            "merge_seeds": self.merge_seeds,
            "confidence": self.confidence,
            "interval": "percentile bootstrap over test rows, resampled within each task",
            "reference": self.reference,
            "extend_edges": self.extend_edges,
            "max_extensions": self.max_extensions,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StatsConfig:
        keys = ("bootstrap", "bootstrap_seed", "merge_seeds", "confidence", "reference", "extend_edges")
        return cls(**{k: d[k] for k in (*keys, "max_extensions") if k in d})


@dataclass(frozen=True)
class TaskRows:
    """One model's per-row results on one task: what its score is recomputed from.

    ``values``: a 0/1 flag per row (``accuracy``, ``exact_match``) or the summed NLL of each text
    (``perplexity``, with ``weights`` = its predicted-token count).
    """

    metric: str
    values: np.ndarray
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.weights is not None and self.weights.shape != self.values.shape:
            raise ValueError(f"{self.values.shape} values for {self.weights.shape} weights")

    @classmethod
    def flags(cls, metric: str, correct: Sequence[bool] | np.ndarray | Any) -> TaskRows:
        return cls(metric, np.asarray(correct, dtype=np.float64).reshape(-1))

    @classmethod
    def perplexity(cls, nll_sums: Sequence[float], tokens: Sequence[int]) -> TaskRows:
        return cls("perplexity", np.asarray(nll_sums, dtype=np.float64), np.asarray(tokens, dtype=np.float64))

    def __len__(self) -> int:
        return int(self.values.shape[0])

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    def statistic(self, index: np.ndarray) -> np.ndarray:
        """The metric on each resample: ``index`` [B, n] row ids -> [B] scores."""
        if self.weights is None:
            return self.values[index].mean(axis=-1)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            return np.exp(self.values[index].sum(axis=-1) / self.weights[index].sum(axis=-1))

    def value(self) -> float:
        """The metric on all rows (the identity resample)."""
        return float(self.statistic(np.arange(len(self))[None, :])[0])

    def to_dict(self) -> dict[str, Any]:
        if self.weights is None:
            return {"metric": self.metric, "correct": "".join("1" if v else "0" for v in self.values)}
        return {"metric": self.metric, "nll": [float(v) for v in self.values], "tokens": [int(w) for w in self.weights]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskRows:
        if "correct" in d:
            return cls.flags(d["metric"], [c == "1" for c in d["correct"]])
        return cls.perplexity(d["nll"], d["tokens"])


def rows_of(report_info: Mapping[str, Any]) -> dict[str, TaskRows]:
    """The per-row results an evaluation report keeps in ``info["per_row"]`` (empty when none)."""
    return {t: TaskRows.from_dict(d) for t, d in (report_info.get("per_row") or {}).items()}


def normalized(value: np.ndarray, expert: np.ndarray, lower_is_better: bool) -> np.ndarray:
    """Element-wise :func:`mergelab_bench.eval.metrics.normalized_score` (``nan`` where undefined)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        if lower_is_better:
            out = np.where((expert > 0) & (value > 0), expert / value, np.nan)
            return np.where(np.isinf(value) & (expert > 0), 0.0, out)
        return np.where(expert > 0, value / expert, np.nan)


def _nanmean(stack: np.ndarray, axis: int) -> np.ndarray:
    """Mean over ``axis`` of the defined values (``nan`` where none is)."""
    count = np.sum(~np.isnan(stack), axis=axis)
    total = np.nansum(stack, axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def interval(samples: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float | None, float | None]:
    """The percentile interval of bootstrap ``samples`` (``nan`` samples dropped; ``None`` if none left)."""
    s = samples[~np.isnan(samples)]
    if s.size == 0:
        return None, None
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(s, [tail, 100 - tail])
    return float(lo), float(hi)


class Bootstrap:
    """Resamples of a suite's test rows, shared by every row of one leaderboard.

    ``expert_rows``: each task's expert on the same rows (the normalizer, resampled with the row).
    """

    def __init__(self, tasks: Sequence[str], expert_rows: Mapping[str, TaskRows], *, resamples: int, seed: int) -> None:
        self.tasks = list(tasks)
        self.expert_rows = dict(expert_rows)
        self.resamples = resamples
        self.seed = seed
        self._index: dict[str, np.ndarray] = {}
        self._expert: dict[str, np.ndarray] = {}

    def index(self, task: str, n: int) -> np.ndarray:
        """[B, n] row ids of ``task``'s resamples: a function of (seed, task name, n) only."""
        if task not in self._index or self._index[task].shape[1] != n:
            rng = np.random.default_rng([self.seed, zlib.crc32(task.encode()), n])
            self._index[task] = rng.integers(0, n, size=(self.resamples, n), dtype=np.int64)
        return self._index[task]

    def _expert_stat(self, task: str) -> np.ndarray:
        if task not in self._expert:
            e = self.expert_rows[task]
            self._expert[task] = e.statistic(self.index(task, len(e)))
        return self._expert[task]

    def replicates(self, runs: Sequence[Mapping[str, TaskRows]]) -> dict[str, Any] | None:
        """Each resample's scores of a row, averaged over its runs (merge seeds; one run for most rows).

        Returns ``{"tasks": {t: {"value": [B], "normalized": [B]}}, "average_normalized": [B]}``,
        or ``None`` when a run lacks per-row results for a task or its rows do not match the expert's.
        """
        tasks: dict[str, dict[str, np.ndarray]] = {}
        for t in self.tasks:
            expert = self.expert_rows.get(t)
            if expert is None or any(t not in r or len(r[t]) != len(expert) for r in runs):
                return None
            idx = self.index(t, len(expert))
            values = np.stack([r[t].statistic(idx) for r in runs])
            norms = np.stack([normalized(v, self._expert_stat(t), expert.lower_is_better) for v in values])
            tasks[t] = {"value": values.mean(axis=0), "normalized": _nanmean(norms, axis=0)}
        average = _nanmean(np.stack([tasks[t]["normalized"] for t in self.tasks]), axis=0)
        return {"tasks": tasks, "average_normalized": average}


def summarize(
    reps: Mapping[str, Any],
    estimates: Mapping[str, Any],
    confidence: float = CONFIDENCE,
) -> dict[str, Any]:
    """Point estimates (``estimates``: the row's own scores) with their bootstrap intervals."""

    def entry(point: float | None, samples: np.ndarray) -> dict[str, float | None]:
        lo, hi = interval(samples, confidence)
        return {"estimate": point, "low": lo, "high": hi}

    out: dict[str, Any] = {"average_normalized": entry(estimates.get("average_normalized"), reps["average_normalized"])}
    out["tasks"] = {
        t: {
            "value": entry(estimates.get("tasks", {}).get(t, {}).get("value"), d["value"]),
            "normalized": entry(estimates.get("tasks", {}).get(t, {}).get("normalized"), d["normalized"]),
        }
        for t, d in reps["tasks"].items()
    }
    return out


def paired(reps: Mapping[str, Any], reference: Mapping[str, Any], confidence: float = CONFIDENCE) -> dict[str, Any]:
    """The paired bootstrap of a row against the reference row on the same resamples.

    The difference of average normalized scores per resample; its interval above 0: ``better``,
    below 0: ``worse``, else ``not distinguishable``.
    """
    diff = reps["average_normalized"] - reference["average_normalized"]
    lo, hi = interval(diff, confidence)
    valid = diff[~np.isnan(diff)]
    verdict = SAME if lo is None or hi is None else BETTER if lo > 0 else WORSE if hi < 0 else SAME
    return {
        "difference": float(valid.mean()) if valid.size else None,
        "low": lo,
        "high": hi,
        "verdict": verdict,
        "share_of_resamples_better": float((valid > 0).mean()) if valid.size else None,
    }


def seed_summary(seeds: Sequence[int], scores: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof 1) of a random method's per-seed scores."""
    vals = [s for s in scores if s is not None and not math.isnan(s)]
    mean = sum(vals) / len(vals) if vals else None
    std = (
        math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if mean is not None and len(vals) > 1 else None
    )
    return {"seeds": list(seeds), "average_normalized": list(scores), "mean": mean, "std": std}


def estimates_of(reports: Sequence[Any]) -> dict[str, Any]:
    """A row's point estimates from its test reports (one per merge seed): means over the seeds."""

    def avg(xs: Sequence[float | None]) -> float | None:
        v = [x for x in xs if x is not None and not math.isnan(x)]
        return sum(v) / len(v) if v else None

    tasks: dict[str, dict[str, float | None]] = {}
    for s in reports[0].scores:
        per = [r.score(s.task) for r in reports]
        tasks[s.task] = {"value": avg([p.value for p in per]), "normalized": avg([p.normalized for p in per])}
    return {"average_normalized": avg([r.average_normalized for r in reports]), "tasks": tasks}
