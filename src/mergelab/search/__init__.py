"""Coefficient search: many merge-and-evaluate trials of one recipe, on Ray Tune.

Every method's result hinges on a few coefficients (λ, densities, per-layer weights). ``mergelab
search`` varies the ones a space file names (:mod:`mergelab.search.space`), decodes each point into
recipe parameters as mergekit-evolve does (:mod:`mergelab.search.genome`), merges in memory with the
inputs read once per worker (:mod:`mergelab.search.worker`, over
:class:`~mergelab.executors.memory.MergeSession`) and scores the merge with an objective
(:mod:`mergelab.search.objective`; ``zoo:``, ``lm:`` and ``lm-eval:`` come from the benchmark).

Algorithms: ``cma``, ``tpe``, ``random``, ``grid`` (Optuna samplers, :mod:`mergelab.search.samplers`),
``evolver`` (Du et al. 2024, :mod:`mergelab.search.evolver`), ``map`` (Li et al.,
:mod:`mergelab.search.map`) and ``fw`` (Frank–Wolfe merging, :mod:`mergelab.search.fw`). Trials run
on Ray Tune (:mod:`mergelab.search.backends`; a local Ray by default, a cluster with ``address``),
each logged to an append-only trial log that a killed search resumes from
(:mod:`mergelab.search.log`); the outputs are described in :mod:`mergelab.search.outputs`.

Needs the ``search`` extra (``pip install 'mergelab[search]'``: Ray Tune, Optuna, cmaes, pymoo,
scipy), imported only when a search runs.
"""

from __future__ import annotations

from typing import Any

from mergelab.search.genome import Assignment, Genome, apply_assignment
from mergelab.search.objective import (
    Objective,
    ObjectiveContext,
    Scores,
    build_objective,
    check_not_test,
    register_objective_kind,
)
from mergelab.search.space import SearchSpace, load_space, validate_space

__all__ = [
    "Assignment",
    "Genome",
    "Objective",
    "ObjectiveContext",
    "Scores",
    "SearchSpace",
    "apply_assignment",
    "build_objective",
    "check_not_test",
    "load_space",
    "register_objective_kind",
    "run_search",
    "validate_space",
]


def run_search(*args: Any, **kwargs: Any) -> Any:
    """:func:`mergelab.search.runner.run_search` (imported on first use)."""
    from mergelab.search.runner import run_search as run

    return run(*args, **kwargs)
