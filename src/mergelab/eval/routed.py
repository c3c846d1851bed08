"""Routed (per-task) methods on the leaderboard: TALL masks, EMR.

A method registered with ``outputs="modulated"`` produces a shared model plus per-task parts
(binary masks, per-task scales), and task t's model is the reconstruction

    θ̂_t = θ0 + s_t · m_t ⊙ (shared − θ0)

(TALL masks: θ0 + m_t ⊙ τ_MTL, s_t = 1; EMR: θ0 + λ_t m_t ⊙ τ_uni). One merged state dict
cannot represent that, and using it needs the task id at inference. The bench therefore merges
such a method exactly as ``mergelab merge`` does (to a folder, with ``modulators/``), rebuilds
each task's model with :func:`mergelab.modulators.task_state_dict` (the code behind
``mergelab extract``), and scores task t with task t's reconstruction only. The grid is chosen
on validation by the average normalized accuracy of those reconstructions; the row is marked
``routed`` and records the storage of the shared model + parts against N separate experts
(from the output's manifest).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.eval.grids import GridPoint
from mergelab.eval.harness import Evaluator, load_state_dict_path
from mergelab.eval.metrics import EvalReport
from mergelab.zoo.build import Zoo


def is_routed(method: str) -> bool:
    """True for methods whose output is a shared model plus per-task parts."""
    from mergelab.methods import get_method

    return get_method(method).outputs == "modulated"


@dataclass
class RoutedMerge:
    """A modulated merge output on disk and the zoo task of each of its tasks (by index)."""

    folder: Path
    tasks: list[str]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def storage(self) -> dict[str, Any]:
        return dict(self.manifest.get("storage", {}))

    def task_state(self, task: str) -> dict[str, Any]:
        """Task ``task``'s reconstruction, rebuilt by the extract code."""
        from mergelab.modulators import task_state_dict

        return task_state_dict(self.folder, self.tasks.index(task))

    def evaluate(self, evaluator: Evaluator, name: str) -> EvalReport:
        """Score every task of ``evaluator`` with that task's own reconstruction."""
        preds = {}
        for t in evaluator.tasks:
            encoder = evaluator.encoder(self.task_state(t))
            preds[t] = evaluator.logits(encoder, t).argmax(-1)
        info = {"head": "expert", "limit": evaluator.limit, "routed": True,
                "reconstruction": self.manifest.get("reconstruction")}
        return evaluator.report(name, preds, info)

    def evaluate_shared(self, evaluator: Evaluator, name: str) -> EvalReport:
        """The shared model alone (no task id), for comparison."""
        return evaluator.evaluate(load_state_dict_path(self.folder), name=name)  # the folder's own shards only

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def routed_recipe(method: str, zoo: Zoo, point: GridPoint, seed: int) -> dict[str, Any]:
    return {
        "merge_method": method,
        "base_model": str(zoo.base_dir),
        "models": [{"model": str(zoo.expert_model_dir(t)), "parameters": dict(point.model_parameters)}
                   for t in zoo.tasks],
        "parameters": dict(point.parameters),
        "seed": seed,
    }


def routed_merge(method: str, zoo: Zoo, point: GridPoint, out: str | os.PathLike[str], *, seed: int = 0) -> RoutedMerge:
    """Merge the zoo's experts with ``method`` at ``point`` into ``out`` (as ``mergelab merge``)."""
    from mergelab.api import merge
    from mergelab.modulators import read_manifest

    result = merge(routed_recipe(method, zoo, point, seed), out, force=True, hash_inputs=False)
    return RoutedMerge(result.path, list(zoo.tasks), read_manifest(result.path))


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
