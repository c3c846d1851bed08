"""The leaderboard's statistics (mergelab_bench.eval.stats, grids.extend_grid) on constructed data with
known answers: interval coverage, paired detection, token-weighted perplexity, grid-edge extension,
and the method cards' ``random`` flag."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergelab_bench.eval.grids import AxisBound, GridPoint, edge_axes, extend_grid, product
from mergelab_bench.eval.stats import (
    BETTER,
    SAME,
    WORSE,
    Bootstrap,
    StatsConfig,
    TaskRows,
    estimates_of,
    interval,
    paired,
    seed_summary,
    summarize,
)

# --------------------------------------------------------------------------------------------
# intervals


def test_bootstrap_interval_has_its_nominal_coverage_on_bernoulli_rows() -> None:
    """Rows ~ Bernoulli(p) per task, experts always right (normalized = accuracy): over many data sets
    the 95 % interval of the average normalized score covers the true (p_a + p_b) / 2 about 95 % of
    the time (binomial sd of the coverage over 300 data sets: 1.3 points)."""
    p = {"a": 0.3, "b": 0.8}
    n, data_sets = 150, 300
    experts = {t: TaskRows.flags("accuracy", np.ones(n)) for t in p}
    boot = Bootstrap(list(p), experts, resamples=400, seed=1)
    rng = np.random.default_rng(123)
    truth = sum(p.values()) / 2
    covered = 0
    for _ in range(data_sets):
        runs = {t: TaskRows.flags("accuracy", rng.random(n) < q) for t, q in p.items()}
        reps = boot.replicates([runs])
        assert reps is not None
        lo, hi = interval(reps["average_normalized"])
        covered += lo <= truth <= hi
    assert 0.90 <= covered / data_sets <= 0.985


def test_interval_of_a_constant_score_is_that_score() -> None:
    rows = {"t": TaskRows.flags("accuracy", np.ones(40))}
    boot = Bootstrap(["t"], rows, resamples=50, seed=0)
    reps = boot.replicates([rows])
    assert reps is not None
    s = summarize(reps, {"average_normalized": 1.0, "tasks": {"t": {"value": 1.0, "normalized": 1.0}}})
    assert s["average_normalized"] == {"estimate": 1.0, "low": 1.0, "high": 1.0}


def test_resamples_depend_on_seed_task_and_size_only() -> None:
    a = Bootstrap(["x", "y"], {}, resamples=7, seed=3)
    b = Bootstrap(["y"], {}, resamples=7, seed=3)
    assert np.array_equal(a.index("y", 11), b.index("y", 11))
    assert not np.array_equal(a.index("x", 11), a.index("y", 11))
    assert not np.array_equal(a.index("y", 11), Bootstrap([], {}, resamples=7, seed=4).index("y", 11))


def test_mismatched_rows_give_no_statistics() -> None:
    experts = {"t": TaskRows.flags("accuracy", np.ones(10))}
    boot = Bootstrap(["t"], experts, resamples=5, seed=0)
    assert boot.replicates([{"t": TaskRows.flags("accuracy", np.ones(9))}]) is None
    assert boot.replicates([{}]) is None


# --------------------------------------------------------------------------------------------
# perplexity: rows resampled with their token counts


def test_perplexity_bootstrap_weights_texts_by_their_tokens() -> None:
    rng = np.random.default_rng(0)
    n = 30
    tokens = rng.integers(1, 40, size=n)
    merged_nll = tokens * rng.uniform(1.5, 3.0, size=n)
    expert_nll = tokens * rng.uniform(1.0, 2.0, size=n)
    merged = TaskRows.perplexity(merged_nll.tolist(), tokens.tolist())
    expert = TaskRows.perplexity(expert_nll.tolist(), tokens.tolist())
    boot = Bootstrap(["code"], {"code": expert}, resamples=20, seed=5)
    reps = boot.replicates([{"code": merged}])
    assert reps is not None
    idx = boot.index("code", n)
    for b in range(20):  # an independent computation, one resample at a time, in plain Python
        rows = [int(i) for i in idx[b]]
        ppl_merged = math.exp(sum(merged_nll[i] for i in rows) / sum(int(tokens[i]) for i in rows))
        ppl_expert = math.exp(sum(expert_nll[i] for i in rows) / sum(int(tokens[i]) for i in rows))
        assert reps["tasks"]["code"]["value"][b] == pytest.approx(ppl_merged, rel=1e-12)
        assert reps["tasks"]["code"]["normalized"][b] == pytest.approx(ppl_expert / ppl_merged, rel=1e-12)
        assert reps["average_normalized"][b] == pytest.approx(ppl_expert / ppl_merged, rel=1e-12)
    # the identity resample is the corpus perplexity (not the mean of per-text perplexities)
    assert merged.value() == pytest.approx(math.exp(merged_nll.sum() / tokens.sum()), rel=1e-12)


def test_rows_round_trip_through_json() -> None:
    flags = TaskRows.flags("exact_match", [True, False, True])
    assert flags.to_dict() == {"metric": "exact_match", "correct": "101"}
    back = TaskRows.from_dict(flags.to_dict())
    assert back.metric == "exact_match" and back.values.tolist() == [1.0, 0.0, 1.0] and back.weights is None
    ppl = TaskRows.perplexity([1.25, 3.5], [2, 5])
    again = TaskRows.from_dict(ppl.to_dict())
    assert again.values.tolist() == [1.25, 3.5] and again.weights.tolist() == [2, 5]


# --------------------------------------------------------------------------------------------
# paired comparison


def _paired_verdict(method: np.ndarray, reference: np.ndarray) -> dict:
    n = len(reference)
    experts = {"t": TaskRows.flags("accuracy", np.ones(n))}
    boot = Bootstrap(["t"], experts, resamples=1000, seed=0)
    a = boot.replicates([{"t": TaskRows.flags("accuracy", method)}])
    b = boot.replicates([{"t": TaskRows.flags("accuracy", reference)}])
    assert a is not None and b is not None
    return paired(a, b)


def test_paired_bootstrap_detects_a_constructed_difference() -> None:
    rng = np.random.default_rng(7)
    ref = rng.random(400) < 0.6
    better = ref.copy()
    wrong = np.flatnonzero(~ref)
    better[wrong[:40]] = True  # 40 of 400 rows fixed: +10 points, every other row the same
    up = _paired_verdict(better, ref)
    assert up["verdict"] == BETTER and up["low"] > 0 and up["difference"] == pytest.approx(0.1, abs=0.01)
    down = _paired_verdict(ref, better)
    assert down["verdict"] == WORSE and down["high"] < 0


def test_paired_bootstrap_finds_no_difference_where_there_is_none() -> None:
    rng = np.random.default_rng(8)
    ref = rng.random(400) < 0.6
    assert _paired_verdict(ref, ref)["verdict"] == SAME  # identical rows
    shuffled = rng.permutation(ref)  # same score, rows disagree: the paired interval straddles 0
    result = _paired_verdict(shuffled, ref)
    assert result["verdict"] == SAME and result["low"] < 0 < result["high"]


# --------------------------------------------------------------------------------------------
# merge seeds


def test_seed_summary_is_the_mean_and_sample_std() -> None:
    s = seed_summary([0, 1, 2], [0.80, 0.84, 0.82])
    assert s["mean"] == pytest.approx(0.82) and s["std"] == pytest.approx(0.02)
    assert seed_summary([0], [0.5])["std"] is None


def test_random_rows_average_their_seeds_on_every_resample() -> None:
    n = 50
    rng = np.random.default_rng(1)
    experts = {"t": TaskRows.flags("accuracy", np.ones(n))}
    runs = [{"t": TaskRows.flags("accuracy", rng.random(n) < 0.5)} for _ in range(3)]
    boot = Bootstrap(["t"], experts, resamples=30, seed=2)
    together = boot.replicates(runs)
    alone = [boot.replicates([r]) for r in runs]
    assert together is not None and all(a is not None for a in alone)
    expected = np.mean([a["average_normalized"] for a in alone if a is not None], axis=0)
    assert np.allclose(together["average_normalized"], expected)


def test_estimates_of_several_reports_are_means() -> None:
    from mergelab_bench.eval.metrics import EvalReport, TaskScore

    reports = [
        EvalReport("m", "test", [TaskScore("a", v, 10, expert=0.5), TaskScore("b", 0.4, 10, expert=0.8)])
        for v in (0.2, 0.4)
    ]
    est = estimates_of(reports)
    assert est["tasks"]["a"] == {"value": pytest.approx(0.3), "normalized": pytest.approx(0.6)}
    assert est["average_normalized"] == pytest.approx((0.6 + 0.5) / 2)


def test_stats_config_validates_and_round_trips() -> None:
    c = StatsConfig(bootstrap=200, merge_seeds=4)
    assert StatsConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        StatsConfig(merge_seeds=0)


# --------------------------------------------------------------------------------------------
# grid edges


def _search(points, f, **kw):
    chosen = max(points, key=f)  # the first of equals, as the grid search
    seen = []

    def score(p):
        seen.append(p)
        return f(p)

    best, ext = extend_grid(chosen, f(chosen), points, score, **kw)
    return best, ext, seen


def test_extension_finds_an_optimum_outside_the_grid() -> None:
    grid = product({"lambda": (0.5, 1.0, 1.5)})
    best, ext, seen = _search(grid, lambda p: -((p.parameters["lambda"] - 2.7) ** 2))
    # step 0.5 doubled each time: 2.0, 3.0 (better), 5.0 (worse): 3.0 is interior
    assert [p.parameters["lambda"] for p in seen] == [2.0, 3.0, 5.0]
    assert best.parameters["lambda"] == 3.0
    assert [e.to_dict()["outcome"] for e in ext] == ["interior"] and ext[0].direction == "up"
    assert edge_axes(best, [*grid, *seen]) == []


def test_extension_down_halves_toward_an_open_bound_and_other_axes_follow() -> None:
    grid = product({"lambda": (1.0, 2.0)}, {"density": (0.2, 0.4)})

    def f(p):  # best density far below the grid, best lambda 2 (interior once 4 is seen)
        return -abs(p.model_parameters["density"] - 0.03) - 0.1 * abs(p.parameters["lambda"] - 2.0)

    best, ext, seen = _search(grid, f)
    densities = [p.model_parameters["density"] for p in seen if p.parameters["lambda"] == 2.0]
    assert all(d > 0 for d in densities) and 0.025 in densities
    assert best.model_parameters["density"] == 0.025
    outcomes = {(e.axis, e.direction): e.outcome for e in ext}
    assert outcomes == {("lambda", "up"): "interior", ("density", "down"): "interior"}


def test_a_hard_bound_stops_the_extension_and_the_row_stays_marked() -> None:
    from mergelab_bench.eval.leaderboard import GridResult, MethodResult

    grid = product({"lambda": (0.5, 1.0, 1.5)})
    bounds = {"lambda": AxisBound(0.0, 2.2)}
    best, ext, seen = _search(grid, lambda p: p.parameters["lambda"], bounds=bounds)  # increasing: best is past any max
    assert [p.parameters["lambda"] for p in seen] == [2.0, 2.2]
    assert best.parameters["lambda"] == 2.2 and ext[0].outcome == "hard bound" and ext[0].bound == "[0, 2.2]"
    m = MethodResult(
        "task_arithmetic",
        chosen=best,
        grid=[GridResult(p, 0.0, 0.0, 0.0, 0) for p in [*grid, *seen]],
        extensions=ext,
    )
    assert m.chosen_at_edge == ["lambda"]
    label = m.chosen_label()
    assert "grid extended: lambda ↑ 2/2.2: hard bound [0, 2.2]" in label and "grid edge: lambda" in label
    d = m.to_dict()
    assert d["chosen_at_grid_edge"] == ["lambda"] and d["grid_extensions"][0]["outcome"] == "hard bound"
    assert MethodResult.from_dict(d).chosen_label() == label


def test_extension_limit_and_undeclared_axes_are_marked() -> None:
    grid = product({"lambda": (1.0, 2.0)}, {"mystery": (1.0, 2.0)})
    best, ext, _ = _search(grid, lambda p: p.parameters["lambda"] + p.model_parameters["mystery"], max_extensions=2)
    outcomes = {e.axis: e.outcome for e in ext}
    assert outcomes == {"lambda": "extension limit", "mystery": "no declared bound"}
    assert best.parameters["lambda"] == 5.0  # 3 (step 1), then 5 (step 2)
    assert set(edge_axes(best, [*grid, GridPoint({"lambda": 3.0}, {"mystery": 2.0}), best])) == {"lambda", "mystery"}


def test_bounds_propose_within_their_interval() -> None:
    density = AxisBound(0.0, 1.0, low_open=True)
    assert density.propose(0.9, 0.2, "up") == 1.0 and density.propose(1.0, 0.2, "up") is None
    assert density.propose(0.1, 0.2, "down") == 0.05
    assert density.propose(0.0015, 0.2, "down") is None  # closer to the open end than the resolution
    assert AxisBound(1, 8, integer=True).propose(2.0, 0.4, "up") is None  # rounds back to itself


# --------------------------------------------------------------------------------------------
# the method cards' random flag


def test_card_random_flag_matches_seed_dependence() -> None:
    """Every data-free method whose output changes with the merge seed (typical parameters, small
    tensors) declares ``MethodCard(random=True)``, and no other does: a later random method that
    forgets the flag fails here, so the bench scores it with several seeds."""
    from mergelab import merge_state_dicts
    from mergelab.methods import all_methods

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(16, 24, generator=g), "b": torch.randn(24, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    checked = []
    for m in all_methods():
        if m.statistics is not None or m.outputs == "routed":
            continue
        n = max(m.min_experts, min(3, m.max_experts or 3))
        gp, mp = m.card.typical or ({}, {})
        outs = [
            merge_state_dicts(
                m.name,
                experts[:n],
                None if m.base == "ignored" else base,
                parameters=dict(gp),
                model_parameters=[dict(mp)] * n,
                seed=s,
            )
            for s in (0, 1)
        ]
        depends = any(not torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
        assert depends == m.card.random, f"{m.name}: output {'depends' if depends else 'does not depend'} on the seed"
        checked.append(m.name)
    assert {"dare_linear", "dare_ties", "della", "della_linear", "task_arithmetic"} <= set(checked)
