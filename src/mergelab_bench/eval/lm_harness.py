"""Evaluating a causal LM (a merge, an expert, the base) on every domain of an LM zoo.

Per domain the report holds the domain's headline metric (perplexity on held-out text;
exact match for arithmetic), the number of texts, the domain expert's own score on the same
texts and the normalized score: ``merged / expert`` for exact match and ``expert / merged``
for perplexity (lower is better), so that 1.0 is "as good as the expert" and higher is better
for every domain (see :mod:`mergelab_bench.eval.metrics`). The other metrics of a domain (the
perplexity of the arithmetic texts) are reported beside it in ``info["secondary"]``, with the
same fields; ``info["tokens"]`` gives the number of predicted tokens behind each perplexity.

Accepted models: an HF causal-LM checkpoint directory (of any architecture ``AutoModelForCausalLM``
loads, e.g. a Mixtral or Qwen2-MoE built by ``mergelab moe``), a ``.safetensors`` file or a directory
of them (a state dict of the base's architecture: a merge output without a config), an
in-memory state dict, an ``nn.Module``, or the names ``base`` and ``expert:<task>`` for the
zoo's own models (their scores are read from the zoo's cache when there), and ``adapter:<task>``
for a zoo built with ``--adapters`` (the base with the domain's PEFT LoRA adapter merged in).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mergelab_bench.eval.evaluator import ZooEvaluator
from mergelab_bench.eval.metrics import EvalReport, TaskScore, fmt_pct
from mergelab_bench.eval.stats import TaskRows
from mergelab_bench.zoo.lm.base import causal_lm_from_state_dict, load_causal_lm, load_lm_weights
from mergelab_bench.zoo.lm.build import LMZoo, load_lm_zoo
from mergelab_bench.zoo.lm.scorer import Scores

LMModelLike = str | os.PathLike | Mapping[str, torch.Tensor] | nn.Module
Limit = int | None | Literal["zoo"]
"""Rows per domain: a number, ``None`` for all, or ``"zoo"`` for the zoo's ``eval_limit`` (the default)."""


def _value(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _task_rows(metric: str, score: Mapping[str, Any], who: str) -> TaskRows:
    """A metric's per-row results (``score["rows"]``, from :class:`DomainScorer`) as :class:`TaskRows`."""
    rows = score.get("rows")
    if rows is None:
        raise ValueError(f"{who}: the {metric} scores have no per-row results (a cache from an older version)")
    if metric == "perplexity":
        return TaskRows.perplexity(rows["nll"], rows["tokens"])
    return TaskRows.flags(metric, [c == "1" for c in rows["correct"]])


class LMEvaluator(ZooEvaluator):
    """Scores causal LMs on an LM zoo's domains (one split, the first ``limit`` rows of each)."""

    def __init__(
        self,
        zoo: LMZoo,
        *,
        tasks: Sequence[str] | None = None,
        split: str = "test",
        limit: Limit = "zoo",
    ) -> None:
        resolved: int | None = zoo.eval_settings.get("eval_limit") if limit == "zoo" else limit  # type: ignore[assignment]
        super().__init__(zoo, tasks=tasks, split=split, limit=resolved)
        if split not in ("test", "validation"):
            raise ValueError("split must be test or validation")

    # -- models
    def _load_dir(self, path: Path) -> nn.Module:
        return load_causal_lm(path, self.zoo.device)

    def _from_state_dict(self, state: Mapping[str, torch.Tensor]) -> nn.Module:
        return causal_lm_from_state_dict(self.zoo.base_dir, dict(state)).to(self.zoo.device)

    def _load_into(self, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
        load_lm_weights(module, dict(state))

    def _prepare(self, module: nn.Module) -> nn.Module:
        return module.to(self.zoo.device)

    def model(self, model: LMModelLike) -> nn.Module:
        """A causal-LM module for any accepted model form (see the module docstring)."""
        return self.module(model)

    def _zoo_model_name(self, text: str) -> str | None:
        if text == "base":
            return "base"
        if text.startswith("expert:"):
            task = text.split(":", 1)[1]
            self.zoo.expert_dir(task)  # unknown task: ZooError
            return task
        if text.startswith("adapter:"):  # a LoRA expert: base + adapter via PEFT's merge_and_unload
            self.zoo.adapter_dir(text.split(":", 1)[1])  # none built: ZooError
            return text
        return None

    # -- scores
    def expert_scores(self, task: str) -> Scores:
        """The domain expert's own scores on these rows (disk-cached)."""
        return self.zoo.zoo_scores(task, task, self.split, self.limit)

    def expert_rows(self, task: str) -> TaskRows:
        """The domain expert's per-row results on its headline metric (the bootstrap's normalizer)."""
        metric = self.zoo.metrics(task)[0]
        return _task_rows(metric, self.expert_scores(task)[metric], f"expert {task}")

    def scores(self, model: LMModelLike, task: str) -> Scores:
        """Every metric of ``task`` for ``model`` (the zoo's own models: from the cache)."""
        if isinstance(model, (str, os.PathLike)):
            name = self._zoo_model_name(os.fspath(model))
            if name is not None:
                return self.zoo.zoo_scores(name, task, self.split, self.limit)
        return self.zoo.scorer.score(self.model(model), self.zoo.data(task), self.split, self.limit)

    def report(self, name: str, scores: Mapping[str, Scores], info: dict | None = None) -> EvalReport:
        """A report from each task's scores (headline metric in ``scores``, the others in ``info``;
        ``info["per_row"]``: the headline metric's per-row results, for the leaderboard's bootstrap)."""
        rows: list[TaskScore] = []
        secondary: dict[str, dict[str, Any]] = {}
        tokens: dict[str, int] = {}
        per_row: dict[str, dict[str, Any]] = {}
        for t in self.tasks:
            expert = self.expert_scores(t)
            metrics = self.zoo.metrics(t)
            made = {
                m: TaskScore(
                    task=t,
                    value=_value(scores[t][m]["value"]),
                    n=int(scores[t][m]["n"]),
                    expert=expert[m]["value"],
                    metric=m,
                )
                for m in metrics
            }
            rows.append(made[metrics[0]])
            if "rows" in scores[t][metrics[0]]:
                per_row[t] = _task_rows(metrics[0], scores[t][metrics[0]], name).to_dict()
            if len(metrics) > 1:
                secondary[t] = {m: made[m].to_dict() for m in metrics[1:]}
            if "perplexity" in scores[t]:
                tokens[t] = int(scores[t]["perplexity"].get("tokens", 0))
        extra: dict[str, Any] = {"secondary": secondary, "tokens": tokens}
        if per_row:
            extra["per_row"] = per_row
        return EvalReport(name, self.split, rows, {**(info or {}), **extra})

    def evaluate(
        self, model: LMModelLike, *, name: str | None = None, on_task: Callable[[str], None] | None = None
    ) -> EvalReport:
        """Score ``model`` on every domain: headline metric, n, expert's score, normalized score."""
        resolved: LMModelLike = model
        if not (isinstance(model, (str, os.PathLike)) and self._zoo_model_name(os.fspath(model)) is not None):
            resolved = self.model(model)  # load a checkpoint or state dict once, not once per task
        scores = {}
        for t in self.tasks:
            scores[t] = self.scores(resolved, t)
            if on_task:
                on_task(t)
        label = name or (os.fspath(model) if isinstance(model, (str, os.PathLike)) else "model")
        return self.report(label, scores, {"limit": self.limit, "suite": "lm"})


def evaluate_lm_model(
    model: LMModelLike,
    zoo: LMZoo | str | os.PathLike = "default",
    *,
    tasks: Sequence[str] | None = None,
    split: str = "test",
    limit: Limit = "zoo",
    name: str | None = None,
    cache: str | os.PathLike | None = None,
    device: str | None = None,
    on_task: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate ``model`` on every domain of an LM zoo (a :class:`LMZoo`, a preset name or a path).

    ``limit`` defaults to the zoo's ``eval_limit`` (the rows its experts were scored on);
    ``None`` scores every row of the split.
    """
    if not isinstance(zoo, LMZoo):
        zoo = load_lm_zoo(zoo, cache=cache, device=device)
    evaluator = LMEvaluator(zoo, tasks=tasks, split=split, limit=limit)
    report = evaluator.evaluate(model, name=name, on_task=on_task)
    report.info.update({"zoo": zoo.name, "zoo_key": zoo.key})
    return report


def fmt_metric(metric: str, value: float | None) -> str:
    """Perplexity with 2 decimals, rates as percentages, a dash when undefined."""
    if value is None or math.isnan(value):
        return fmt_pct(None)
    return f"{value:.2f}" if metric == "perplexity" else fmt_pct(value)


def lm_report_table(report: EvalReport, title: str | None = None):
    """A rich Table of an LM report: task, metric, n, score, expert, normalized (+ secondary rows)."""
    from rich.table import Table

    table = Table(title=title or f"{report.model} ({report.split})")
    for col in ("task", "metric", "n", "score", "expert", "normalized %"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    secondary = report.info.get("secondary", {})
    for s in report.scores:
        metric = s.metric + (" %" if s.metric != "perplexity" else "")
        table.add_row(
            s.task, metric, str(s.n), fmt_metric(s.metric, s.value), fmt_metric(s.metric, s.expert),
            fmt_pct(s.normalized),
        )  # fmt: skip
        for m, d in secondary.get(s.task, {}).items():
            table.add_row(
                "", f"({m})", str(d["n"]), fmt_metric(m, d["value"]), fmt_metric(m, d["expert"]),
                f"({fmt_pct(d['normalized'])})",
            )  # fmt: skip
    table.add_section()
    table.add_row("average", "", "", "", "", fmt_pct(report.average_normalized))
    return table
