"""Scores and their arithmetic: accuracy, normalized score, averages, reports.

The *normalized score* of a merged model on a task is its accuracy divided by the accuracy of
that task's own expert on the same examples (Ilharco et al. 2023 and most of the merging
literature report it): 1.0 means "as good as the expert", and the average over tasks is the
headline number of a leaderboard. It is undefined (``None``) when the expert's accuracy is
0 or unknown.

For metrics where lower is better (:data:`LOWER_IS_BETTER`: perplexity, in the language-model
suite) the ratio is turned around, ``expert / merged``, so that in both cases 1.0 means "as
good as the expert", larger is better, and averages over tasks of mixed metrics mean the same
thing. For perplexity, ``expert_ppl / merged_ppl = exp(expert_nll - merged_nll)``: the
per-token geometric-mean likelihood of the merge relative to the expert (0.9 means the merge
gives the held-out tokens 10 % less probability per token than the expert does).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


def accuracy(predictions: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Fraction of equal entries; ``nan`` for no examples."""
    p = torch.as_tensor(predictions)
    y = torch.as_tensor(labels)
    if p.shape != y.shape:
        raise ValueError(f"{tuple(p.shape)} predictions for {tuple(y.shape)} labels")
    if y.numel() == 0:
        return math.nan
    return float((p == y).sum()) / y.numel()


LOWER_IS_BETTER: frozenset[str] = frozenset({"perplexity"})
"""Metrics whose normalized score is ``reference / value`` instead of ``value / reference``."""


def normalized_score(value: float | None, reference: float | None, *, lower_is_better: bool = False) -> float | None:
    """``value / reference`` (``reference / value`` with ``lower_is_better``).

    ``None`` when either is missing or NaN, or the reference is not positive (or, for a
    lower-is-better metric, the value is not positive); an infinite value gives 0.
    """
    if value is None or reference is None or not reference > 0 or math.isnan(value) or math.isnan(reference):
        return None
    if lower_is_better:
        if not value > 0:
            return None
        return reference / value
    return value / reference


def mean(values: Iterable[float | None]) -> float | None:
    """Mean of the defined values (``None`` and ``nan`` skipped); ``None`` if there are none."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


@dataclass(frozen=True)
class TaskScore:
    """One model on one task."""

    task: str
    value: float
    n: int
    expert: float | None = None
    metric: str = "accuracy"

    @property
    def normalized(self) -> float | None:
        return normalized_score(self.value, self.expert, lower_is_better=self.metric in LOWER_IS_BETTER)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "normalized": self.normalized}


@dataclass
class EvalReport:
    """A model's scores on a set of tasks, with averages."""

    model: str
    split: str
    scores: list[TaskScore]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def average(self) -> float | None:
        """Mean raw score; ``None`` when the tasks' metrics differ (a mean of unlike things)."""
        if len({s.metric for s in self.scores}) > 1:
            return None
        return mean(s.value for s in self.scores)

    @property
    def average_normalized(self) -> float | None:
        return mean(s.normalized for s in self.scores)

    def score(self, task: str) -> TaskScore:
        for s in self.scores:
            if s.task == task:
                return s
        raise KeyError(task)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "split": self.split,
            "average": self.average,
            "average_normalized": self.average_normalized,
            "tasks": {s.task: s.to_dict() for s in self.scores},
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        scores = [
            TaskScore(task=t, value=d["value"], n=d["n"], expert=d.get("expert"), metric=d.get("metric", "accuracy"))
            for t, d in data["tasks"].items()
        ]
        return cls(data["model"], data["split"], scores, dict(data.get("info", {})))


def fmt_pct(value: float | None, digits: int = 1) -> str:
    """``0.8734 -> '87.3'``; ``None -> '–'``."""
    return "–" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"
