"""Routed (per-task) methods on the leaderboard: TALL masks, EMR.

A method registered with ``outputs="routed"`` produces a shared model plus per-task parts
(binary masks, per-task scales), and task t's model is the reconstruction

    θ̂_t = θ0 + s_t · m_t ⊙ (shared − θ0)

(TALL masks: θ0 + m_t ⊙ τ_MTL, s_t = 1; EMR: θ0 + λ_t m_t ⊙ τ_uni). One merged state dict
cannot represent that, and using it needs the task id at inference. The bench therefore merges
such a method exactly as ``mergelab merge`` does (to a folder, with ``routed/``), rebuilds
each task's model with :func:`mergelab.routed.task_state_dict` (the code behind
``mergelab extract``), and scores task t with task t's reconstruction only. The grid is chosen
on validation by the average normalized accuracy of those reconstructions; the row is marked
``routed`` and records the storage of the shared model + parts against N separate experts
(from the output's manifest).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab_bench.eval.grids import GridPoint
from mergelab_bench.eval.harness import Evaluator, load_state_dict_path
from mergelab_bench.eval.metrics import EvalReport
from mergelab_bench.zoo.build import Zoo


@dataclass
class RoutedMerge:
    """A routed merge output on disk and the zoo task of each of its tasks (by index)."""

    folder: Path
    tasks: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def storage(self) -> dict[str, Any]:
        return dict(self.manifest.get("storage", {}))

    def task_state(self, task: str) -> dict[str, Any]:
        """Task ``task``'s reconstruction, rebuilt by the extract code."""
        from mergelab.routed import task_state_dict

        return task_state_dict(self.folder, self.tasks.index(task))

    def evaluate(self, evaluator: Evaluator, name: str) -> EvalReport:
        """Score every task of ``evaluator`` with that task's own reconstruction."""
        preds = {}
        for t in evaluator.tasks:
            encoder = evaluator.encoder(self.task_state(t))
            preds[t] = evaluator.logits(encoder, t).argmax(-1)
        info = {
            "head": "expert",
            "limit": evaluator.limit,
            "routed": True,
            "reconstruction": self.manifest.get("reconstruction"),
        }
        return evaluator.report(name, preds, info)

    def evaluate_shared(self, evaluator: Evaluator, name: str) -> EvalReport:
        """The shared model alone (no task id), for comparison."""
        return evaluator.evaluate(load_state_dict_path(self.folder), name=name)  # the folder's own shards only

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


PER_TASK_AXES: dict[str, str] = {"tall_masks": "tall_lambda"}
"""Per-model parameters that only affect their own task's reconstruction, so each task's value
can be chosen from the grid's per-task validation scores with no further search. TALL masks:
m_t = 1{|τ_t| ≥ λ_t |τ_MTL − τ_t|} depends on λ_t alone once τ_MTL (the multi-task merge) is
fixed, and the paper (Wang et al. 2024) picks λ_t per task on validation."""


def routed_recipe(
    method: str, zoo: Zoo, point: GridPoint, seed: int, per_model: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, Any]:
    """The recipe of one routed merge; ``per_model`` overrides the point's per-model parameters
    task by task (in ``zoo.tasks`` order)."""
    overrides = list(per_model) if per_model is not None else [{} for _ in zoo.tasks]
    return {
        "merge_method": method,
        "base_model": str(zoo.base_dir),
        "models": [
            {"model": str(zoo.expert_model_dir(t)), "parameters": {**point.model_parameters, **o}}
            for t, o in zip(zoo.tasks, overrides)
        ],
        "parameters": dict(point.parameters),
        "seed": seed,
    }


def routed_merge(
    method: str,
    zoo: Zoo,
    point: GridPoint,
    out: str | os.PathLike[str],
    *,
    seed: int = 0,
    per_model: Sequence[Mapping[str, Any]] | None = None,
) -> RoutedMerge:
    """Merge the zoo's experts with ``method`` at ``point`` into ``out`` (as ``mergelab merge``)."""
    from mergelab.api import merge
    from mergelab.routed import read_manifest

    result = merge(routed_recipe(method, zoo, point, seed, per_model), out, force=True, hash_inputs=False)
    return RoutedMerge(result.path, list(zoo.tasks), read_manifest(result.path))


def per_task_choice(
    axis: str, chosen: GridPoint, reports: Sequence[tuple[GridPoint, EvalReport]], tasks: Sequence[str]
) -> dict[str, Any]:
    """Each task's best value of ``axis`` on validation, among the grid points that differ from
    ``chosen`` only in that axis (ties: the chosen point's value, then the first in grid order)."""
    others = {k: v for k, v in chosen.model_parameters.items() if k != axis}
    group = [
        (p, r)
        for p, r in reports
        if dict(p.parameters) == dict(chosen.parameters)
        and {k: v for k, v in p.model_parameters.items() if k != axis} == others
    ]
    out: dict[str, Any] = {}
    for task in tasks:
        best_value, best_score = chosen.model_parameters.get(axis), None
        for p, r in group:
            score = next((s.normalized for s in r.scores if s.task == task), None)
            if score is None:
                continue
            better = best_score is None or score > best_score
            if better or (score == best_score and p.model_parameters.get(axis) == chosen.model_parameters.get(axis)):
                best_value, best_score = p.model_parameters.get(axis), score
        out[task] = best_value
    return out


def routing_info(merged: RoutedMerge, shared_test: EvalReport | None) -> dict[str, Any]:
    """The leaderboard's record of a routed row."""
    storage = merged.storage
    return {
        "per_task": True,
        "needs_task_id": True,
        "reconstruction": merged.manifest.get("reconstruction"),
        "task_scales": [t.get("scale") for t in merged.manifest.get("tasks", [])],
        "mask_density": [round(float(t.get("mask_density", 0.0)), 4) for t in merged.manifest.get("tasks", [])],
        "storage": {k: v for k, v in storage.items() if k != "note"},
        "shared_model_test_average_normalized": None if shared_test is None else shared_test.average_normalized,
    }
