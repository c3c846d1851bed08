"""Run the task-vector analysis over checkpoints: plan from headers, then one streamed pass.

The inputs come from a recipe (its ``base_model`` and ``models``; the merge method and its
parameters are ignored) or from a base plus a list of models. A plan is built exactly as for a
merge (same validation of names, shapes, vocabularies and tied weights, before any tensor is
read); then each merged tensor is read from the base and every expert, folded into
:class:`~mergelab.analysis.stats.TaskVectorStats` and dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergelab.analysis.stats import AnalysisOptions, TaskVectorStats
from mergelab.errors import InputDataError, RecipeError
from mergelab.executors.streaming import all_finite
from mergelab.plan import Plan, build_plan
from mergelab.recipe import Recipe, load_recipe
from mergelab.routed.format import task_names


def analysis_recipe(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe | None = None,
    *,
    models: Sequence[str] | None = None,
    base: str | None = None,
) -> Recipe:
    """The recipe whose base and experts are analysed (a task-arithmetic recipe, no parameters)."""
    if recipe is not None:
        rec = load_recipe(recipe)
        base_ref = base or rec.base_model
        refs = [m for m in rec.model_refs if m != base_ref]  # a slices recipe: its sources' whole models
        vocab = rec.vocab_mismatch
    else:
        base_ref, refs, vocab = base, list(models or []), "error"
    if base_ref is None:
        raise RecipeError("the analysis needs a base model: set base_model in the recipe or pass --base")
    if not refs:
        raise RecipeError("the analysis needs at least one model besides the base")
    return Recipe.model_validate(
        {
            "merge_method": "task_arithmetic",
            "base_model": base_ref,
            "models": [{"model": r} for r in refs],
            "vocab_mismatch": vocab,
        }
    )


def _read(plan: Plan, job: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cache: dict[int, torch.Tensor] = {}

    def get(r: Any, name: str) -> torch.Tensor:
        if id(r) not in cache:
            t = r.read(name)  # job.name, or a tied input's stand-in (its embedding)
            if job.rows is not None:
                t = t[: job.rows]
            if not all_finite(t):
                raise InputDataError(
                    f"{r.label}: tensor {job.name!r} contains NaN or Inf values; this checkpoint is broken"
                )
            cache[id(r)] = t
        return cache[id(r)]

    assert plan.base is not None
    names = [ref.name for ref in job.inputs]  # base, then experts
    return get(plan.base, names[0]), [get(r, n) for r, n in zip(plan.experts, names[1:])]


def analyze(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe | None = None,
    *,
    models: Sequence[str] | None = None,
    base: str | None = None,
    options: AnalysisOptions | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Statistics of the experts' task vectors (see :mod:`mergelab.analysis.stats`) as a dict.

    Give a recipe (path, dict or :class:`Recipe`), or ``models`` and ``base``. ``progress``
    follows the engine's Progress protocol.
    """
    rec = analysis_recipe(recipe, models=models, base=base)
    opts = options or AnalysisOptions()
    plan = build_plan(rec)
    try:
        stats = TaskVectorStats(len(plan.experts), opts)
        jobs = plan.merge_jobs
        if progress is not None:
            progress.begin("analysis", len(jobs), plan.input_bytes(jobs))
        with torch.no_grad():
            for job in jobs:
                b, experts = _read(plan, job)
                stats.update(b, experts, job.layer)
                del b, experts
                if progress is not None:
                    progress.advance(1, plan.job_input_bytes(job))
        if progress is not None:
            progress.end()
        labels = [r.label for r in plan.experts]
        out = {
            "format": "mergelab-analysis",
            "version": 1,
            "base": plan.base.label if plan.base is not None else None,
            "experts": labels,
            "names": task_names(labels),
            "num_layers": plan.num_layers,
        }
        out.update(stats.result())
        return out
    finally:
        plan.close()
