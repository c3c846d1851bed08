"""The LM suite's leaderboard: the LM zoo's domain experts merged, tuned on validation, scored on test.

The protocol is the classification bench's (:mod:`mergelab_bench.eval.leaderboard`): for each
method, merge the SmolLM2 experts into their base at every point of a small grid
(:data:`LM_GRIDS`), score each merge on the first ``validation_limit`` validation rows of
every domain, keep the point with the best average normalized score (ties: the earlier
point) and score that merge on the test split (the rows the experts' own records use).

Normalized score per domain (:mod:`mergelab_bench.eval.metrics`): ``expert / merged`` perplexity,
``merged / expert`` exact match, so 100 % is "as good as the domain's expert" and higher is
better everywhere. Reference rows: the base and every expert on every domain (no ensembles:
averaging the next-token distributions of N language models is not a model anyone ships).

The grids are smaller than the classification bench's: every validation point is a forward
pass of a 135M-parameter model over every domain (about 30 s at 32 rows per domain on 2
CPU cores), and each expert's task vector comes from 100 short steps, so the useful λ are
large (the experts moved little).

Data-informed methods (Fisher, RegMean, RegMean++, AdaMerging) run their data phase on the
causal LMs themselves (:mod:`mergelab_bench.eval.data_informed`): calibration texts are the first
rows of each domain's train split file; Fisher takes the log-likelihood of the next tokens
with one label sampled from the model per position (the exact expectation over a 49k-token
vocabulary is out of reach), RegMean the Grams of every linear layer's inputs at the real
positions. Their statistics are kept under ``<work_dir>/statistics``. Per-task reconstructions
(TALL masks, EMR with the task id) are not on this leaderboard; the routed rows without the task
id (``--methods routed``: Twin-Merging, Split-Merge, SMILE, WEMoE, TALL/EMR with a router) are,
scored as any causal LM (:mod:`mergelab_bench.eval.routed_models`).

:func:`run_lm_suite` is the leaderboard over any set of experts; with the zoo's LoRA experts
(``--experts adapters``) it runs :mod:`mergelab_bench.eval.adapter_bench`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from mergelab_bench.eval.data_informed import BenchCalibration
from mergelab_bench.eval.grids import LM_ROUTED_GRIDS, GridPoint, grid_for, product
from mergelab_bench.eval.harness import load_state_dict_path
from mergelab_bench.eval.leaderboard import Leaderboard, MergeFn, Suite, _Steps, run_suite
from mergelab_bench.eval.lm_harness import Limit, LMEvaluator
from mergelab_bench.eval.metrics import EvalReport
from mergelab_bench.eval.routed_models import RoutedBenchSettings
from mergelab_bench.eval.stats import StatsConfig
from mergelab_bench.zoo.lm.build import LMZoo

LM_METHODS: tuple[str, ...] = (
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "breadcrumbs",
    "della",
    "model_stock",
)
"""The engine's core methods, on the LM leaderboard by default (the suite's choice; any registered
method can be named with ``--methods``)."""

LM_GRIDS: dict[str, tuple[GridPoint, ...]] = {
    "linear": (GridPoint(),),
    "task_arithmetic": product({"lambda": (0.3, 0.5, 0.7, 1.0)}),
    "ties": product({"lambda": (1.0, 1.5, 2.0)}, {"density": (0.2, 0.5)}),
    "dare_ties": product({"lambda": (1.0, 1.5, 2.0)}, {"density": (0.3,)}),
    "breadcrumbs": product({"lambda": (0.5, 1.0)}, {"density": (0.9,), "gamma": (0.01,)}),
    "della": product({"lambda": (1.0, 1.5, 2.0)}, {"density": (0.7,)}),
    "model_stock": (GridPoint(),),
    "fisher": product({"normalize": (True, False)}),
    "regmean": product({"reduce_non_diagonal_ratio": (0.1, 0.5, 0.9, 1.0)}),
    **LM_ROUTED_GRIDS,
}
"""The LM suite's overrides of the method cards' grids (see the module docstring: every point is
a forward pass over every domain, so these are smaller); a method not listed here gets its card's
grid (:func:`mergelab.eval.grids.grid_for`)."""

DEFAULT_LM_VALIDATION_LIMIT = 32


def lm_grid_for(method: str) -> tuple[GridPoint, ...]:
    """The LM grid of a method or row variant: the LM suite's override, else the method card's grid."""
    return LM_GRIDS.get(method, grid_for(method))


LM_SUITE = Suite(
    name="lm",
    selection="best average normalized score on the validation split",
    normalized="expert perplexity / merged perplexity; merged exact match / expert exact match",
    grid_for=lm_grid_for,
    routed=False,
    routed_skip="per-task reconstructions (needing the task id) are not on the LM leaderboard; "
    "tall_masks_router / emr_router run them with a router",
    base_source_key="base",
    work_prefix="mergelab-lm-bench-",
)
"""The LM leaderboard's protocol over the shared runner (:func:`mergelab_bench.eval.leaderboard.run_suite`)."""


def run_lm_bench(
    zoo: LMZoo,
    *,
    methods: Sequence[str] | None = None,
    validation_limit: int | None = DEFAULT_LM_VALIDATION_LIMIT,
    test_limit: Limit = "zoo",
    seed: int = 0,
    grids: Mapping[str, Sequence[GridPoint]] | None = None,
    merge_fn: MergeFn | None = None,
    progress=None,
    echo: Callable[[str], None] | None = None,
    calibration: BenchCalibration | None = None,
    work_dir: str | os.PathLike[str] | None = None,
    stats: StatsConfig | None = None,
    routed_settings: RoutedBenchSettings | None = None,
) -> Leaderboard:
    """Tune every method on validation, score it on test, add the base and expert rows.

    ``calibration`` and ``work_dir`` serve the data-informed methods as in
    :func:`mergelab_bench.eval.leaderboard.run_bench` (statistics in ``work_dir/statistics``; without
    ``work_dir`` a temporary folder, removed at the end); ``stats`` the bootstrap, merge seeds and
    grid-edge extension, as there. The zoo's LoRA experts instead of its full fine-tunes:
    :func:`mergelab_bench.eval.adapter_bench.run_adapter_bench` (``--experts adapters``).
    """
    t_start = time.perf_counter()
    references = [("base", "base", "pretrained"), *((f"expert:{t}", f"expert: {t}", "expert") for t in zoo.tasks)]
    return run_lm_suite(
        LM_SUITE,
        zoo,
        val=LMEvaluator(zoo, split="validation", limit=validation_limit),
        test=LMEvaluator(zoo, split="test", limit=test_limit),
        reference_models=references,
        load_experts=lambda: [load_state_dict_path(zoo.expert_model_dir(t)) for t in zoo.tasks],
        methods=list(methods or LM_METHODS), validation_limit=validation_limit, seed=seed, grids=grids,
        merge_fn=merge_fn, progress=progress, echo=echo, calibration=calibration, work_dir=work_dir, stats=stats,
        t_start=t_start, routed_settings=routed_settings,
    )  # fmt: skip


def run_lm_suite(
    suite: Suite,
    zoo: LMZoo,
    *,
    val: LMEvaluator,
    test: LMEvaluator,
    reference_models: Sequence[tuple[str, str, str]],
    load_experts: Callable[[], list[dict[str, torch.Tensor]]],
    methods: Sequence[str],
    validation_limit: int | None,
    seed: int,
    grids: Mapping[str, Sequence[GridPoint]] | None,
    merge_fn: MergeFn | None,
    progress: Any,
    echo: Callable[[str], None] | None,
    calibration: BenchCalibration | None,
    work_dir: str | os.PathLike[str] | None,
    stats: StatsConfig | None,
    t_start: float,
    routed_settings: RoutedBenchSettings | None = None,
) -> Leaderboard:
    """The LM leaderboard over some set of experts: score the reference rows on test, then
    :func:`mergelab_bench.eval.leaderboard.run_suite`.

    ``val`` / ``test`` normalize by the experts' own scores (``expert_scores``); ``reference_models``
    lists ``(model, row name, kind)`` in row order (models as ``LMEvaluator.evaluate`` takes them);
    ``load_experts`` gives the state dicts ``merge_fn`` (default :func:`mergelab.merge_state_dicts`)
    merges, one per domain in the zoo's order, loaded after the reference rows are scored.
    """
    if merge_fn is None:
        from mergelab import merge_state_dicts as merge_fn  # type: ignore[no-redef]
    say = echo or (lambda _: None)
    steps = _Steps(progress)
    references: list[EvalReport] = []
    with steps.phase("reference rows", len(reference_models)) as tick:
        for model, name, kind in reference_models:
            report = test.evaluate(model, name=name)
            report.info["kind"] = kind
            references.append(report)
            tick()
    expert_test = {t: test.expert_scores(t)[zoo.metrics(t)[0]]["value"] for t in zoo.tasks}
    for t in zoo.tasks:
        val.expert_scores(t)

    base = load_state_dict_path(zoo.base_dir)
    experts = load_experts()
    return run_suite(
        suite, zoo, val=val, test=test, base=base, experts=experts, references=references,
        expert_test=expert_test, methods=methods, grids=grids, seed=seed, merge_fn=merge_fn, progress=progress,
        steps=steps, say=say, calibration=calibration or BenchCalibration(), work_dir=work_dir, t_start=t_start,
        limits={"validation_limit": validation_limit, "test_limit": test.limit},
        info={"metrics": {t: zoo.metrics(t)[0] for t in zoo.tasks}}, stats=stats, routed_settings=routed_settings,
    )  # fmt: skip
