"""Evaluating an encoder (a merge, an expert, the base) on every task of a zoo.

A merged encoder is scored on task *t* with task *t*'s head (heads are never merged; in the
``zeroshot`` zoo variant that is the task's fixed zero-shot head, see
:mod:`mergelab_bench.zoo.heads`): the
accuracy, the number of examples, the expert's own accuracy on the same examples and the
normalized score (merged / expert). :class:`Evaluator` keeps the tokenized batches and the
experts' scores, so scoring many merges (a hyperparameter grid) only pays for the forward
passes; :func:`evaluate_model` is the one-call form behind ``mergelab eval``.

Accepted models: an HF checkpoint directory, a ``.safetensors`` file or a directory of them
(a state dict of the same architecture), an in-memory state dict, an ``nn.Module``, or the
names ``base`` and ``expert:<task>`` for the zoo's own models.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergelab_bench.eval.ensembles import majority_vote, probability_average
from mergelab_bench.eval.evaluator import ZooEvaluator, load_state_dict_path  # noqa: F401 - re-exported
from mergelab_bench.eval.metrics import EvalReport, TaskScore, accuracy, fmt_pct
from mergelab_bench.eval.stats import TaskRows
from mergelab_bench.zoo.backbone import embed_batches, encoder_from_state_dict, load_encoder, load_weights
from mergelab_bench.zoo.build import Zoo, load_zoo

ModelLike = str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module

DEFAULT_TEST_LIMIT = 1000
DEFAULT_VALIDATION_LIMIT = 300


class Evaluator(ZooEvaluator):
    """Scores encoders on a zoo's tasks (one split, the first ``limit`` rows of each)."""

    def __init__(
        self,
        zoo: Zoo,
        *,
        tasks: Sequence[str] | None = None,
        split: str = "test",
        limit: int | None = DEFAULT_TEST_LIMIT,
    ) -> None:
        super().__init__(zoo, tasks=tasks, split=split, limit=limit)
        self.labels = {t: torch.tensor(zoo.examples(t, split, limit)[1]) for t in self.tasks}
        self._expert: dict[str, float] = {}

    # -- models
    def _load_dir(self, path: Path) -> nn.Module:
        return load_encoder(path)

    def _from_state_dict(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        return encoder_from_state_dict(self.zoo.base_dir, state)

    def _load_into(self, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        load_weights(module, state)

    def encoder(self, model: ModelLike) -> nn.Module:
        """An encoder module for any accepted model form (see the module docstring)."""
        return self.module(model)

    # -- scores
    def expert_score(self, task: str) -> float:
        """The task expert's own accuracy on these examples (disk-cached features)."""
        if task not in self._expert:
            self._expert[task] = self.zoo.expert_accuracy(task, self.split, self.limit)
        return self._expert[task]

    def logits(self, encoder: nn.Module, task: str, head: str = "expert") -> torch.Tensor:
        feats = embed_batches(encoder, self.zoo.batches(task, self.split, self.limit))
        return self.zoo.head(task, head)(feats)

    def expert_rows(self, task: str) -> TaskRows:
        """The task expert's per-row correct flags on these examples (the bootstrap's normalizer)."""
        correct = self.zoo_logits(task, task).argmax(-1) == self.labels[task]
        return TaskRows.flags("accuracy", correct.numpy())

    def report(self, name: str, predictions: Mapping[str, torch.Tensor], info: dict | None = None) -> EvalReport:
        """A report from predicted class ids per task; ``info["per_row"]`` keeps each row's correct flag
        (:class:`mergelab_bench.eval.stats.TaskRows`, for the leaderboard's bootstrap)."""
        scores = [
            TaskScore(
                task=t,
                value=accuracy(predictions[t], self.labels[t]),
                n=len(self.labels[t]),
                expert=self.expert_score(t),
            )
            for t in self.tasks
        ]
        per_row = {
            t: TaskRows.flags("accuracy", (torch.as_tensor(predictions[t]) == self.labels[t]).numpy()).to_dict()
            for t in self.tasks
        }
        return EvalReport(name, self.split, scores, {**(info or {}), "per_row": per_row})

    def evaluate(
        self,
        model: ModelLike,
        *,
        name: str | None = None,
        head: str = "expert",
        on_task: Callable[[str], None] | None = None,
    ) -> EvalReport:
        """Score ``model`` on every task with each task's ``expert`` (or ``probe``) head."""
        encoder = self.encoder(model)
        preds = {}
        for t in self.tasks:
            preds[t] = self.logits(encoder, t, head).argmax(-1)
            if on_task:
                on_task(t)
        label = name or (os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model")
        return self.report(label, preds, {"head": head, "limit": self.limit})

    # -- reference rows from the zoo's own models (features cached on disk)
    def zoo_logits(self, model: str, task: str, head: str = "expert") -> torch.Tensor:
        """Logits of zoo model ``model`` (``base`` or an expert's task) on ``task`` with its head."""
        return self.zoo.head(task, head)(self.zoo.features(model, task, self.split, self.limit))

    def reference_reports(self, on_step: Callable[[str], None] | None = None) -> list[EvalReport]:
        """Pretrained (+ the task heads, + probe heads), each expert, and the two ensembles.

        Every row scores task *t* with task *t*'s head: in the ``zeroshot`` variant that is the
        task's fixed zero-shot head (so the first row is the zero-shot classifier), in ``lpft``
        the head trained with task *t*'s expert."""
        tick = on_step or (lambda _: None)
        experts = self.zoo.tasks
        reports = []
        task_heads = "zero-shot heads" if getattr(self.zoo, "variant", "lpft") == "zeroshot" else "expert heads"
        for head, label in (("expert", f"pretrained + {task_heads}"), ("probe", "pretrained + linear probe")):
            reports.append(
                self.report(
                    label,
                    {t: self.zoo_logits("base", t, head).argmax(-1) for t in self.tasks},
                    {"kind": "pretrained", "head": head},
                )
            )
            tick(label)
        cross: dict[str, dict[str, torch.Tensor]] = {e: {} for e in experts}
        for e in experts:
            for t in self.tasks:
                cross[e][t] = self.zoo_logits(e, t)
            reports.append(
                self.report(f"expert: {e}", {t: cross[e][t].argmax(-1) for t in self.tasks}, {"kind": "expert"})
            )
            tick(f"expert {e}")
        avg = {t: probability_average([cross[e][t] for e in experts]).argmax(-1) for t in self.tasks}
        vote = {t: majority_vote([cross[e][t] for e in experts]) for t in self.tasks}
        info = {"kind": "ensemble", "members": len(experts), "forward_passes_per_input": len(experts)}
        reports.append(self.report("ensemble: probability average", avg, info))
        reports.append(self.report("ensemble: majority vote", vote, info))
        tick("ensembles")
        return reports


def evaluate_model(
    model: ModelLike,
    zoo: Zoo | str | os.PathLike = "quick",
    *,
    tasks: Sequence[str] | None = None,
    split: str = "test",
    limit: int | None = DEFAULT_TEST_LIMIT,
    head: str = "expert",
    name: str | None = None,
    cache: str | os.PathLike | None = None,
    on_task: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate ``model`` on every task of ``zoo`` (a :class:`Zoo`, a preset name or a path)."""
    if not isinstance(zoo, Zoo):
        zoo = load_zoo(zoo, cache=cache)
    evaluator = Evaluator(zoo, tasks=tasks, split=split, limit=limit)
    report = evaluator.evaluate(model, name=name, head=head, on_task=on_task)
    report.info.update({"zoo": zoo.name, "zoo_key": zoo.key})
    return report


def report_table(report: EvalReport, title: str | None = None):
    """A rich Table of one report (task, n, accuracy, expert, normalized)."""
    from rich.table import Table

    table = Table(title=title or f"{report.model} ({report.split})")
    table.add_column("task")
    table.add_column("n", justify="right")
    table.add_column("accuracy %", justify="right")
    table.add_column("expert %", justify="right")
    table.add_column("normalized %", justify="right")
    for s in report.scores:
        table.add_row(s.task, str(s.n), fmt_pct(s.value), fmt_pct(s.expert), fmt_pct(s.normalized))
    table.add_section()
    table.add_row("average", "", fmt_pct(report.average), "", fmt_pct(report.average_normalized))
    return table


def report_json(report: EvalReport) -> dict[str, Any]:
    return report.to_dict()
