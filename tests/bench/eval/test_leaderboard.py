"""The bench on the tiny zoo (real merges, tiny grids) and the leaderboard writer on fake results."""

from __future__ import annotations

import json

import pytest
import torch

from mergelab_bench.eval.grids import GRIDS, LEADERBOARD_METHODS, GridPoint, check_grid, grid_for, product
from mergelab_bench.eval.leaderboard import Leaderboard, MethodResult, markdown, run_bench, write_leaderboard
from mergelab_bench.eval.measure import measure
from mergelab_bench.eval.metrics import EvalReport, TaskScore
from mergelab_bench.zoo.build import Zoo

TINY_GRIDS = {
    "task_arithmetic": product({"lambda": (0.0, 1.0)}),
    "linear": (GridPoint(),),
    "slerp": (GridPoint({"t": 0.5}),),
}


def test_bench_on_tiny_zoo(tiny_zoo: Zoo) -> None:
    lb = run_bench(
        tiny_zoo,
        methods=["task_arithmetic", "linear", "slerp"],
        grids=TINY_GRIDS,
        validation_limit=None,
        test_limit=None,
    )
    ta = next(m for m in lb.methods if m.method == "task_arithmetic")
    assert ta.status == "ok" and len(ta.grid) == 2
    val_scores = [g.validation_average_normalized for g in ta.grid]
    assert ta.chosen == ta.grid[val_scores.index(max(val_scores))].point  # argmax, first on ties
    assert ta.test is not None and ta.test.split == "test" and ta.validation.split == "validation"
    assert ta.merge_seconds is not None and ta.merge_seconds >= 0 and ta.merge_peak_bytes is not None
    # lambda = 0 merges to the base: same validation score as the pretrained encoder
    from mergelab_bench.eval.harness import Evaluator

    base_val = Evaluator(tiny_zoo, split="validation", limit=None).evaluate("base")
    assert ta.grid[0].validation_average_normalized == pytest.approx(base_val.average_normalized)
    slerp = next(m for m in lb.methods if m.method == "slerp")
    assert slerp.status == "skipped" and "at most" in slerp.reason
    assert [r.model for r in lb.references][:2] == ["pretrained + expert heads", "pretrained + linear probe"]
    assert set(lb.expert_test) == {"alpha", "beta"}


def test_choice_is_made_on_validation_only(tiny_zoo: Zoo) -> None:
    base = {k: v.clone() for k, v in tiny_zoo_state(tiny_zoo, "base").items()}
    alpha = tiny_zoo_state(tiny_zoo, "alpha")
    calls = []

    def fake_merge(method, experts, base_sd, *, parameters, model_parameters, seed):
        calls.append(parameters["lambda"])
        return alpha if parameters["lambda"] == 1.0 else base

    grids = {"task_arithmetic": product({"lambda": (0.0, 1.0)})}
    lb = run_bench(
        tiny_zoo, methods=["task_arithmetic"], grids=grids, merge_fn=fake_merge, validation_limit=None, test_limit=None
    )
    m = lb.methods[0]
    assert calls == [0.0, 1.0]  # each point merged once; the chosen merge is not redone for test
    from mergelab_bench.eval.harness import Evaluator

    val = Evaluator(tiny_zoo, split="validation", limit=None)
    expected = max(
        (val.evaluate(base).average_normalized, 0.0),
        (val.evaluate(alpha).average_normalized, 1.0),
        key=lambda x: x[0],
    )
    assert m.chosen.parameters["lambda"] == expected[1] or (
        val.evaluate(base).average_normalized == val.evaluate(alpha).average_normalized
        and m.chosen.parameters["lambda"] == 0.0
    )


def tiny_zoo_state(zoo: Zoo, model: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(zoo.model_dir(model) / "model.safetensors"))


def test_invalid_grid_fails_before_merging(tiny_zoo: Zoo) -> None:
    def never(*a, **k):
        raise AssertionError("merged despite an invalid grid")

    with pytest.raises(ValueError, match="lambdaa"):
        run_bench(tiny_zoo, methods=["ties"], grids={"ties": (GridPoint({"lambdaa": 1.0}),)}, merge_fn=never)


def _fake_report(name: str, values: dict[str, float], split: str = "test") -> EvalReport:
    experts = {"a": 0.9, "b": 0.8}
    return EvalReport(name, split, [TaskScore(t, v, 100, experts[t]) for t, v in values.items()])


def _fake_leaderboard() -> Leaderboard:
    ties = MethodResult(
        "ties",
        chosen=GridPoint({"lambda": 1.0}, {"density": 0.2}),
        test=_fake_report("ties", {"a": 0.81, "b": 0.72}),
        validation=_fake_report("ties", {"a": 0.8, "b": 0.7}, "validation"),
        merge_seconds=1.5,
        merge_peak_bytes=300 * 2**20,
    )
    ta = MethodResult(
        "task_arithmetic",
        chosen=GridPoint({"lambda": 0.3}),
        test=_fake_report("task_arithmetic", {"a": 0.72, "b": 0.64}),
        validation=_fake_report("task_arithmetic", {"a": 0.7, "b": 0.6}, "validation"),
        merge_seconds=0.5,
        merge_peak_bytes=100 * 2**20,
    )
    skipped = MethodResult("slerp", status="skipped", reason="merges at most 1 expert(s) with a base; the zoo has 2")
    refs = [
        _fake_report("pretrained + expert heads", {"a": 0.45, "b": 0.2}),
        _fake_report("ensemble: majority vote", {"a": 0.88, "b": 0.79}),
    ]
    config = {
        "zoo": "fake",
        "methods": ["task_arithmetic", "ties", "slerp"],
        "validation_limit": 300,
        "test_limit": 1000,
        "seed": 0,
    }
    return Leaderboard(
        config,
        {"name": "fake", "key": "k", "config": {"train": {"steps": 3}}},
        ["a", "b"],
        [ta, ties, skipped],
        refs,
        {"a": 0.9, "b": 0.8},
    )


def test_markdown_ranks_methods_and_lists_references() -> None:
    md = markdown(_fake_leaderboard())
    lines = md.splitlines()
    ties_line = next(i for i, ln in enumerate(lines) if ln.startswith("| ties "))
    ta_line = next(i for i, ln in enumerate(lines) if ln.startswith("| task_arithmetic "))
    assert ties_line < ta_line  # 90.0 before 80.0
    # no per-row results in this fake: no interval, no comparison (dashes)
    assert "| ties | 90.0 | – | – | 76.5 | 90.0 | 90.0 | 1.5 | 300 | lambda=1.0, density=0.2 | 88.2 |" in md
    skipped = next(ln for ln in lines if ln.startswith("| slerp "))
    assert skipped.startswith("| slerp | skipped: merges at most 1") and skipped.count("|") == lines[ties_line].count(
        "|"
    )
    assert "| ensemble: majority vote | 98.3 | – | – | 83.5 | 97.8 | 98.8 |" in md
    assert "--validation-limit 300 --test-limit 1000 --seed 0" in md


def test_writer_outputs_round_trip(tmp_path) -> None:
    lb = _fake_leaderboard()
    paths = write_leaderboard(lb, tmp_path / "out")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    back = Leaderboard.from_dict(data)
    assert back.to_dict() == lb.to_dict()
    assert [m.method for m in back.ranked()] == ["ties", "task_arithmetic"]
    assert paths["markdown"].read_text() == markdown(lb)


def test_every_leaderboard_method_has_a_valid_grid() -> None:
    from mergelab.methods import all_methods
    from mergelab_bench.eval.grids import ROW_VARIANTS, method_of

    registered = {m.name for m in all_methods()}
    assert {method_of(m) for m in LEADERBOARD_METHODS} <= registered
    assert set(ROW_VARIANTS.values()) <= registered and not set(ROW_VARIANTS) & registered
    for name in LEADERBOARD_METHODS:
        assert check_grid(name, 8) is None, name
    assert {method_of(m) for m in GRIDS} <= registered


def test_grid_shapes() -> None:
    assert [p.parameters["lambda"] for p in grid_for("task_arithmetic")] == [
        0.1,
        0.2,
        0.3,
        0.4,
        0.5,
        0.6,
        0.7,
        0.8,
        0.9,
        1.0,
    ]
    ties = grid_for("ties")
    assert len(ties) == 15 and {p.model_parameters["density"] for p in ties} == {0.1, 0.2, 0.3}
    assert grid_for("not_in_the_table") == (GridPoint(),)
    assert product({"x": (1, 2)}, {"y": (3,)}) == (GridPoint({"x": 1}, {"y": 3}), GridPoint({"x": 2}, {"y": 3}))


def test_measure_sees_an_allocation() -> None:
    with measure() as m:
        big = torch.ones(64 * 2**20 // 4)  # 64 MiB
        big += 1
    assert m.result.seconds >= 0
    assert m.result.peak_bytes >= 32 * 2**20


def test_a_choice_on_the_grid_edge_is_flagged() -> None:
    from mergelab_bench.eval.grids import edge_axes

    grid = product({"lambda": (0.5, 1.0, 1.5)}, {"density": (0.1, 0.2), "gamma": (0.01,)})
    assert edge_axes(GridPoint({"lambda": 1.0}, {"density": 0.2, "gamma": 0.01}), grid) == ["density"]
    assert edge_axes(GridPoint({"lambda": 1.5}, {"density": 0.1, "gamma": 0.01}), grid) == ["lambda", "density"]
    m = MethodResult("ties", chosen=grid[0], grid=[])
    assert m.chosen_label() == "lambda=0.5, density=0.1, gamma=0.01"  # no grid recorded: nothing flagged


def test_thread_line_names_each_row_once_with_its_latest_run() -> None:
    lb = _fake_leaderboard()
    lb.info["updates"] = [
        {"torch_threads": 2, "methods": ["task_arithmetic", "ties", "slerp"]},
        {"torch_threads": 1, "methods": ["ties"]},
        {"torch_threads": 1, "methods": ["ties"]},  # a rerun replaces the row, it is not a second one
    ]
    md = markdown(lb)
    assert "task_arithmetic, slerp: 2 threads; ties: 1 threads" in md
    assert md.count("ties: 1 threads") == 1
    lb.info["updates"] = [{"torch_threads": 2, "methods": ["ties"]}, {"torch_threads": 2, "methods": ["slerp"]}]
    lb.info["torch_threads"] = 2
    assert "in-memory merge of 2 experts, 2 threads" in markdown(lb)


def test_bench_statistics_seeds_and_edges_on_tiny_zoo(tiny_zoo: Zoo, tmp_path) -> None:
    """End to end on the tiny zoo: intervals per task and for the average, the paired comparison with
    task arithmetic, a random method merged with 3 seeds, every edge either extended or marked, all
    of it in leaderboard.json and leaderboard.md."""
    import statistics as pystats

    from mergelab import merge_state_dicts
    from mergelab_bench.eval.harness import Evaluator
    from mergelab_bench.eval.stats import VERDICT_SYMBOLS, StatsConfig

    seeds_seen: list[tuple[str, int]] = []

    def recording_merge(method, experts, base, **kw):
        seeds_seen.append((method, kw["seed"]))
        return merge_state_dicts(method, experts, base, **kw)

    grids = {
        "task_arithmetic": product({"lambda": (0.5, 1.0)}),
        "dare_ties": product({"lambda": (1.0,)}, {"density": (0.5,)}),
        "linear": (GridPoint(),),
    }
    stats = StatsConfig(bootstrap=200, merge_seeds=3, max_extensions=2)
    lb = run_bench(
        tiny_zoo, methods=["task_arithmetic", "dare_ties", "linear"], grids=grids, validation_limit=None,
        test_limit=None, merge_fn=recording_merge, stats=stats, seed=5,
    )  # fmt: skip
    rows = {m.method: m for m in lb.methods}
    assert all(m.status == "ok" for m in rows.values()), [m.reason for m in rows.values()]

    # per-row results reproduce the scores exactly (accuracy = mean of the flags)
    test = Evaluator(tiny_zoo, split="test", limit=None)
    for m in rows.values():
        for s in m.test.scores:
            flags = m.test.info["per_row"][s.task]["correct"]
            assert len(flags) == s.n and flags.count("1") / len(flags) == s.value
    for t in tiny_zoo.tasks:
        assert test.expert_rows(t).value() == test.expert_score(t)

    # the random method: the chosen point merged with seeds 5, 6, 7, each scored on test
    dare = rows["dare_ties"]
    assert dare.seeds == [5, 6, 7] and len(dare.seed_tests) == 2 and len(dare.test_runs) == 3
    assert [s for m, s in seeds_seen if m == "dare_ties"][-2:] == [6, 7]
    per_seed = [r.average_normalized for r in dare.test_runs]
    assert dare.stats["seeds"]["mean"] == pytest.approx(sum(per_seed) / 3)
    assert dare.stats["seeds"]["std"] == pytest.approx(pystats.stdev(per_seed))
    assert dare.score == pytest.approx(sum(per_seed) / 3)
    assert rows["task_arithmetic"].seeds == [] and {s for m, s in seeds_seen if m == "task_arithmetic"} == {5}

    for m in rows.values():
        avg = m.stats["average_normalized"]
        assert avg["low"] <= avg["estimate"] <= avg["high"]
        assert set(m.stats["tasks"]) == set(tiny_zoo.tasks)
        for t in tiny_zoo.tasks:
            task = m.stats["tasks"][t]["normalized"]
            assert task["low"] <= task["estimate"] <= task["high"]
        # no row from an edge without its mark: every edge was extended and the rest is labelled
        if m.chosen_at_edge:
            assert "grid edge" in m.chosen_label()
        for e in m.extensions:
            assert e.outcome in ("interior", "hard bound", "extension limit", "no declared bound")
    assert rows["task_arithmetic"].extensions  # lambda 0.5 or 1.0 is on an edge of a 2-point grid
    assert "vs_reference" not in rows["task_arithmetic"].stats
    assert rows["linear"].stats["vs_reference"]["verdict"] in VERDICT_SYMBOLS
    assert set(lb.statistics["references"]) == {r.model for r in lb.references}

    paths = write_leaderboard(lb, tmp_path / "lb")
    data = json.loads(paths["json"].read_text())
    assert data["config"]["statistics"]["bootstrap"] == 200 and data["config"]["statistics"]["merge_seeds"] == 3
    assert data["statistics"]["config"]["bootstrap_seed"] == 0
    jd = {m["method"]: m for m in data["methods"]}
    assert jd["dare_ties"]["seeds"] == [5, 6, 7] and len(jd["dare_ties"]["seed_tests"]) == 2
    assert jd["task_arithmetic"]["grid_extensions"] and "low" in jd["linear"]["stats"]["average_normalized"]
    back = Leaderboard.from_dict(data)
    assert back.to_dict() == lb.to_dict()
    md = paths["markdown"].read_text()
    assert "| 95 % CI | vs task_arithmetic |" in md and "significantly better" in md
    ta_line = next(ln for ln in md.splitlines() if ln.startswith("| task_arithmetic "))
    assert " ref " in ta_line and "grid extended" in ta_line and "[" in ta_line
    dare_line = next(ln for ln in md.splitlines() if ln.startswith("| dare_ties "))
    assert "± " in dare_line and "(3 seeds)" in dare_line
    assert any(sym in dare_line for sym in VERDICT_SYMBOLS.values())
    assert "95 % intervals per task" in md
    assert "--seed 5 --bootstrap 200" in md and "--merge-seeds" not in md  # non-default settings reproduce

    # --update with a new row: the kept rows' statistics are recomputed on the same resamples
    again = run_bench(
        tiny_zoo, methods=["linear"], grids=grids, validation_limit=None, test_limit=None, stats=stats, seed=5
    )
    from mergelab_bench.eval.leaderboard import update_leaderboard

    merged = update_leaderboard(back, again)
    kept = {m.method: m for m in merged.methods}
    assert kept["dare_ties"].stats == rows["dare_ties"].stats
    assert kept["linear"].stats == rows["linear"].stats  # same merge, same rows, same resamples


def test_statistics_summary_labels_carry_no_home_folder(monkeypatch, tmp_path):
    from pathlib import Path

    from mergelab_bench.eval.data_informed import _portable

    monkeypatch.setattr(Path, "home", staticmethod(lambda: tmp_path))
    assert _portable(str(tmp_path / "zoo" / "expert-a" / "model")) == "~/zoo/expert-a/model"
    assert _portable(str(tmp_path) + "x/model") == str(tmp_path) + "x/model"  # a sibling folder is not home
    assert _portable("/elsewhere/model") == "/elsewhere/model"
