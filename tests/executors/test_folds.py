"""Folds are sharded exactly: fold(all tensors) == combine(fold(first part), fold(rest)), bit for bit.

For every data-free method whose typical parameters need folds (model-wide statistics) that
declare ``combine``, the statistics computed over the whole ``family`` model equal those of two
shards folded separately and combined in tensor order (what the Ray executor does).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_equivalence import assert_same, recipe

from mergelab.executors.base import ExecutorOptions
from mergelab.executors.streaming import fold_jobs
from mergelab.methods import all_methods
from mergelab.plan import build_plan
from mergelab.recipe import Recipe

CPU = torch.device("cpu")


def fold_stats(plan: Any, split: int | None) -> dict[str, Any]:
    g = plan.graph
    jobs = g.merge_jobs
    opts = ExecutorOptions()
    stats: dict[str, Any] = {}
    for fold in g.folds:
        if split is None:
            state = fold_jobs(g, fold, jobs, stats, opts, CPU)
        else:
            a = fold_jobs(g, fold, jobs[:split], stats, opts, CPU)
            b = fold_jobs(g, fold, jobs[split:], stats, opts, CPU)
            state = fold.combine(a, b)
        stats[fold.name] = fold.finish(state, g.global_params, len(g.experts))
    return stats


def _cases() -> list[Any]:
    cases = [
        ("pcb", ({"pcb_ratio": 0.2, "scope": "global"}, {})),
        ("emr", ({}, {})),
        ("lines", ({"beta": 0.5}, {})),
        ("ties", ({"scope": "global"}, {"density": 0.3})),
        ("tall_masks", ({"multitask": "ties", "scope": "global"}, {"tall_lambda": 0.4, "density": 0.3})),
        ("ramplus", ({"epsilon": 0.01}, {})),
    ]
    names = {m.name for m in all_methods()}
    return [c for c in cases if c[0] in names]


@pytest.mark.parametrize("name, params", _cases())
def test_sharded_folds_combine_to_the_same_statistics(name, params, family):
    plan = build_plan(Recipe.model_validate(recipe(family, name, params)))
    try:
        folds = plan.graph.folds
        if not folds:
            pytest.skip(f"{name} with these parameters needs no fold")
        missing = [f.name for f in folds if f.combine is None]
        assert not missing, f"{name}: folds {missing} have no combine (the Ray executor would fold them on the driver)"
        split = len(plan.graph.merge_jobs) // 3
        assert_same(fold_stats(plan, None), fold_stats(plan, split), name)
    finally:
        plan.close()


def test_every_fold_of_fisher_emr_lines_pcb_combines(family):
    for name, params in [("pcb", ({"scope": "global"}, {})), ("emr", ({}, {})), ("lines", ({"beta": 0.5}, {}))]:
        plan = build_plan(Recipe.model_validate(recipe(family, name, params)))
        try:
            own = [f for f in plan.graph.folds if f.name.startswith(name)]
            assert own and all(f.combine is not None for f in own), name
        finally:
            plan.close()
    from mergelab.methods.fisher import FisherParams, fisher_passes

    (norm,) = fisher_passes(FisherParams())
    assert norm.combine is not None
    assert norm.combine([[1.0], [2.0]], [[3.0], []]) == [[1.0, 3.0], [2.0]]
    assert norm.finish([[3.0, 4.0**2 - 3.0]], FisherParams(), 1) == [4.0]
