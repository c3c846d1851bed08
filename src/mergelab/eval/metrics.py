"""Scores and their arithmetic: accuracy, normalized score, averages, reports.

The *normalized score* of a merged model on a task is its accuracy divided by the accuracy of
that task's own expert on the same examples (Ilharco et al. 2023 and most of the merging
literature report it): 1.0 means "as good as the expert", and the average over tasks is the
headline number of a leaderboard. It is undefined (``None``) when the expert's accuracy is
0 or unknown.
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


def normalized_score(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, or ``None`` when either is missing or the reference is not positive."""
    if value is None or reference is None or not reference > 0 or math.isnan(value):
        return None
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
        return normalized_score(self.value, self.expert)

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
