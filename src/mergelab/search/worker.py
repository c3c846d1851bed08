"""The in-memory trial loop of one process: inputs read once, every trial merged and scored in memory.

A :class:`TrialWorker` holds a :class:`~mergelab.executors.memory.MergeSession` (every input tensor
of the recipe resident, read once; stage outputs a parameter change does not touch cached) and the
objective (its data tokenized once). A trial is ``session.merge(parameters, model_parameters)``
(any registered method, per-tensor filters and per-layer gradients resolved as in recipes) then
``objective.evaluate(state)``: no checkpoint is read again.

Workers are built from a picklable :class:`WorkerSpec` and cached per process by
:func:`get_worker`, so a Ray actor that Ray Tune reuses for trial after trial (``reuse_actors``)
builds its session once; the driver of an inline search does the same.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergelab.errors import MergelabError, ParameterError
from mergelab.search.genome import Assignment, Genome
from mergelab.search.objective import Objective, ObjectiveContext, Scores, build_objective
from mergelab.search.space import SearchSpace


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a process needs to build its worker (picklable; model paths absolute)."""

    recipe: Mapping[str, Any]
    objective: str
    objective_options: Mapping[str, str] = field(default_factory=dict)
    space: Mapping[str, Any] | None = None
    device: str = "cpu"
    threads: int | None = None
    seed: int = 0
    plugins: tuple[str, ...] = ()
    """Packages to import before the objective is built (they register its kind in this process)."""

    def key(self) -> str:
        text = json.dumps(
            [
                self.recipe,
                self.objective,
                dict(self.objective_options),
                self.space,
                self.device,
                self.threads,
                self.seed,
            ],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def measure_trial(
    state_fn: Callable[[], Mapping[str, torch.Tensor]],
    score: Callable[[Mapping[str, torch.Tensor]], Scores],
    where: str,
) -> dict[str, Any]:
    """Build a merged state (``state_fn``) and ``score`` it, timed: the measured fields of a trial record
    (``scores``, ``score``, ``merge_seconds``, ``eval_seconds``, ``seconds``, ``worker``: ``where``)."""
    t0 = time.perf_counter()
    state = state_fn()
    t1 = time.perf_counter()
    scores = score(state)
    t2 = time.perf_counter()
    return {
        "scores": scores.to_dict(),
        "score": scores.score,
        "merge_seconds": round(t1 - t0, 4),
        "eval_seconds": round(t2 - t1, 4),
        "seconds": round(t2 - t0, 4),
        "worker": where,
    }


class TrialWorker:
    """A resident merge session plus an objective (see the module docstring)."""

    def __init__(self, spec: WorkerSpec) -> None:
        from mergelab.executors.memory import MergeSession

        self.spec = spec
        for name in spec.plugins:
            importlib.import_module(name)
        t0 = time.perf_counter()
        if spec.threads:
            torch.set_num_threads(spec.threads)
        self.session = MergeSession(dict(spec.recipe), device=spec.device, seed=spec.seed)
        self.read_seconds = time.perf_counter() - t0
        self.objective: Objective = build_objective(
            spec.objective, ObjectiveContext(dict(spec.recipe), spec.device, dict(spec.objective_options))
        )
        self.genome: Genome | None = None
        if spec.space is not None:
            space = SearchSpace.model_validate(dict(spec.space))
            self.genome = Genome(space, self.session.experts, self.session.plan.num_layers)
        self.setup_seconds = time.perf_counter() - t0
        self.trials = 0

    @property
    def where(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def merge(self, assignment: Assignment) -> dict[str, torch.Tensor]:
        return self.session.merge(assignment.parameters, assignment.model_parameters)

    def score(self, state: Mapping[str, torch.Tensor]) -> Scores:
        with torch.no_grad():
            scores = self.objective.evaluate(state)
        if not scores.finite():
            raise ParameterError(f"objective {self.spec.objective} returned a non-finite score {scores.score}")
        return scores

    def evaluate(self, assignment: Assignment) -> dict[str, Any]:
        """Merge with ``assignment`` and score it: the trial record's measured part."""
        measured = measure_trial(lambda: self.merge(assignment), self.score, self.where)
        self.trials += 1
        return {
            "parameters": assignment.parameters,
            "model_parameters": assignment.model_parameters,
            "values": assignment.values,
            **measured,
        }

    def evaluate_vector(self, x: Sequence[float]) -> dict[str, Any]:
        """A trial at genome coordinates ``x``."""
        assert self.genome is not None, "a worker without a space evaluates assignments only"
        record = self.evaluate(self.genome.decode(x))
        record["config"] = self.genome.config(x)
        return record


_WORKERS: dict[str, TrialWorker] = {}


def get_worker(spec: WorkerSpec) -> TrialWorker:
    """This process's worker for ``spec`` (built on first use, then reused; one kept at a time)."""
    key = spec.key()
    worker = _WORKERS.get(key)
    if worker is None:
        _WORKERS.clear()  # a worker of another search: free its session first
        worker = _WORKERS[key] = TrialWorker(spec)
    return worker


def drop_workers() -> None:
    _WORKERS.clear()


def error_record(exc: BaseException) -> dict[str, Any]:
    """A failed trial's record (a user error keeps its message; others their type too)."""
    message = str(exc) if isinstance(exc, MergelabError) else f"{type(exc).__name__}: {exc}"
    return {"error": message.splitlines()[0][:500] if message else type(exc).__name__}
