"""The bench with routed (TALL masks, EMR) and data-informed methods, on the tiny zoo."""

from __future__ import annotations

import pytest
import torch

from mergelab.errors import RecipeError
from mergelab_bench.eval.data_informed import BenchCalibration
from mergelab_bench.eval.grids import (
    ADVANCED_METHODS,
    DATA_INFORMED_METHODS,
    GRIDS,
    LEADERBOARD_METHODS,
    GridPoint,
    check_grid,
    expand_methods,
    product,
)
from mergelab_bench.eval.harness import Evaluator
from mergelab_bench.eval.leaderboard import Leaderboard, markdown, run_bench
from mergelab_bench.zoo.build import Zoo

TINY_CAL = BenchCalibration(examples=8, fisher_examples=4, adamerging_examples=8, batch_size=4)


def test_every_declared_grid_validates_and_is_small() -> None:
    from mergelab.methods import all_methods

    for name, points in GRIDS.items():
        assert check_grid(name, 8, points) is None, name
    for name in ADVANCED_METHODS + DATA_INFORMED_METHODS:
        assert name in GRIDS and 1 <= len(GRIDS[name]) <= 6, name
    # every registered method that merges any number of experts is on the leaderboard
    from mergelab_bench.eval.grids import method_of

    multi = {m.name for m in all_methods() if m.max_experts is None}
    assert multi <= {method_of(m) for m in LEADERBOARD_METHODS}
    assert expand_methods(["informed", "fisher", "linear"]) == [*DATA_INFORMED_METHODS, "linear"]


def test_routed_method_is_scored_per_task_with_its_reconstruction(tiny_zoo: Zoo, tmp_path) -> None:
    from mergelab import merge
    from mergelab.routed import task_state_dict
    from mergelab_bench.eval.routed import routed_recipe

    grids = {"tall_masks": product({}, {"tall_lambda": (0.2, 0.6)}), "emr": (GridPoint(),)}
    lb = run_bench(
        tiny_zoo,
        methods=["tall_masks", "emr"],
        grids=grids,
        validation_limit=None,
        test_limit=None,
        work_dir=tmp_path / "work",
    )
    assert not (tmp_path / "work" / ".routed-merges").exists()  # merges removed once scored
    for row in lb.methods:
        assert row.status == "ok", row.reason
        assert row.routed and row.display_name() == f"{row.method} (routed)"
        storage = row.routing["storage"]
        assert storage["tasks"] == 2 and storage["separate_experts_bytes"] == 2 * storage["shared_bytes"]
        assert storage["total_bytes"] == storage["shared_bytes"] + storage["base_bytes"] + storage["masks_bytes"]
        # the choice is the argmax of the validation scores of the per-task reconstructions
        scores = [g.validation_average_normalized for g in row.grid]
        argmax = row.grid[scores.index(max(scores))].point
        per_task = (row.routing or {}).get("per_task_parameters")
        if per_task is None:
            assert row.chosen == argmax
            overrides = None
        else:  # TALL: λ_t chosen per task from the same grid's per-task validation scores
            ((axis, values),) = per_task.items()
            assert row.chosen.model_parameters[axis] == "per task"
            assert row.validation.average_normalized >= max(scores)
            overrides = [{axis: values[t]} for t in tiny_zoo.tasks]

        # rebuild the chosen merge independently and score each task with its own reconstruction
        point = argmax if per_task is not None else row.chosen
        out = merge(routed_recipe(row.method, tiny_zoo, point, 0, overrides), tmp_path / row.method)
        shared = dict(Evaluator(tiny_zoo, split="test", limit=None).encoder(out.path).state_dict())
        for i, task in enumerate(tiny_zoo.tasks):
            state = task_state_dict(out.path, i)
            differs = any(not torch.equal(state[k], shared[k]) for k in state if k in shared)
            assert differs, f"{row.method}: task {task}'s reconstruction equals the shared model"
            direct = Evaluator(tiny_zoo, tasks=[task], split="test", limit=None).evaluate(state).scores[0]
            reported = next(s for s in row.test.scores if s.task == task)
            assert reported.value == pytest.approx(direct.value) and reported.n == direct.n
    tall = next(m for m in lb.methods if m.method == "tall_masks")
    assert tall.routing["shared_model_test_average_normalized"] is not None
    assert lb.config["routed"]["methods"] == ["tall_masks", "emr"]
    md = markdown(lb)
    assert "| tall_masks (routed) |" in md and "separate experts" in md
    assert Leaderboard.from_dict(lb.to_dict()).to_dict() == lb.to_dict()


def test_data_informed_statistics_are_computed_once_and_reused(tiny_zoo: Zoo, tmp_path, monkeypatch) -> None:
    from mergelab.data import sources
    from mergelab.informed import gram, phase

    gram_calls = []
    real_gram = gram.gram_matrices

    def counting_gram(*a, **k):
        gram_calls.append(1)
        return real_gram(*a, **k)

    splits = []
    real_load = sources.load_examples

    def recording_load(source, limit):
        splits.append((source.zoo_task, source.split, limit))
        return real_load(source, limit)

    monkeypatch.setattr(gram, "gram_matrices", counting_gram)
    monkeypatch.setattr(phase, "load_examples", recording_load)
    grids = {
        "regmean": product({"reduce_non_diagonal_ratio": (0.5, 0.9)}),
        "adamerging_task": (GridPoint({"granularity": "task", "steps": 2}),),
    }
    lb = run_bench(
        tiny_zoo,
        methods=["regmean", "adamerging_task"],
        grids=grids,
        validation_limit=None,
        test_limit=None,
        calibration=TINY_CAL,
        work_dir=tmp_path / "work",
    )
    regmean, ada = lb.methods
    assert regmean.status == "ok" and ada.status == "ok", (regmean.reason, ada.reason)
    assert ada.method == "adamerging_task" and ada.chosen.parameters["granularity"] == "task"
    assert len(gram_calls) == len(tiny_zoo.tasks)  # one Gram pass per expert for every grid point
    extended = sum(len(e.added) for e in regmean.extensions)  # points past a grid edge reuse them too
    assert len(regmean.grid) == 2 + extended and all(g.statistics_seconds is not None for g in regmean.grid)
    assert regmean.statistics["collector"] == "gram" and regmean.statistics["split"] == "train"
    assert (tmp_path / "work" / "statistics" / "regmean" / "gram").is_dir()
    # RegMean reads each task's train rows; AdaMerging the unlabeled test inputs (its paper's protocol);
    # validation only selects
    assert sorted(splits) == sorted(
        [(t, "train", 8) for t in tiny_zoo.tasks] + [(t, "test", 8) for t in tiny_zoo.tasks]
    )
    assert ada.statistics["split"] == "test"
    assert (
        lb.config["calibration"]["examples"] == 8
        and "test split, without labels" in lb.config["calibration"]["sources"]["adamerging"]
    )
    assert "unlabeled test inputs, as in the AdaMerging paper" in markdown(lb)
    # the train variant reads train texts instead
    splits.clear()
    from dataclasses import replace

    lb_train = run_bench(
        tiny_zoo,
        methods=["adamerging_task"],
        grids=grids,
        validation_limit=None,
        test_limit=None,
        calibration=replace(TINY_CAL, adamerging_split="train"),
        work_dir=tmp_path / "work",
    )
    assert lb_train.methods[0].status == "ok" and lb_train.methods[0].statistics["split"] == "train"
    assert {s for _, s, _ in splits} == {"train"}
    # a second bench in the same folder reuses every statistic
    gram_calls.clear()
    lb2 = run_bench(
        tiny_zoo,
        methods=["regmean"],
        grids=grids,
        validation_limit=None,
        test_limit=None,
        calibration=TINY_CAL,
        work_dir=tmp_path / "work",
    )
    assert lb2.methods[0].status == "ok" and gram_calls == []
    assert lb2.methods[0].test.average_normalized == pytest.approx(regmean.test.average_normalized)
    # reused statistics still report what computing them took (from their metadata), not the reuse's 0 s
    assert regmean.statistics["compute_seconds"] > 0 and ada.statistics["compute_seconds"] > 0
    assert lb2.methods[0].statistics["compute_seconds"] == regmean.statistics["compute_seconds"]


def test_data_informed_choice_uses_validation_only(tiny_zoo: Zoo, tmp_path) -> None:
    """The merge function sees the statistics; the chosen point is the validation argmax."""
    from safetensors.torch import load_file

    base = load_file(str(tiny_zoo.model_dir("base") / "model.safetensors"))
    alpha = load_file(str(tiny_zoo.model_dir("alpha") / "model.safetensors"))
    seen = []

    def fake_merge(method, experts, base_sd, *, parameters, model_parameters, seed, statistics):
        seen.append((parameters["normalize"], len(statistics)))
        return alpha if parameters["normalize"] else base

    lb = run_bench(
        tiny_zoo,
        methods=["fisher"],
        grids={"fisher": product({"normalize": (False, True)})},
        merge_fn=fake_merge,
        validation_limit=None,
        test_limit=None,
        calibration=TINY_CAL,
        work_dir=tmp_path / "work",
    )
    m = lb.methods[0]
    assert m.status == "ok", m.reason
    assert seen == [(False, 2), (True, 2)]
    val = Evaluator(tiny_zoo, split="validation", limit=None)
    scores = {False: val.evaluate(base).average_normalized, True: val.evaluate(alpha).average_normalized}
    expected = scores[True] > scores[False]
    assert m.chosen.parameters["normalize"] is expected
    assert m.statistics["seconds_per_point"][1] <= m.statistics["seconds_per_point"][0]  # reused


def test_bench_command_runs_routed_and_data_informed_methods(tiny_zoo_manifest, tmp_path) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from mergelab_bench.eval import commands

    app = typer.Typer()
    app.command("bench")(commands.bench_command)
    app.command("noop")(lambda: None)
    out = tmp_path / "lb"
    args = [
        "bench",
        "--zoo",
        str(tiny_zoo_manifest.parent),
        "--methods",
        "emr,regmean",
        "--out",
        str(out),
        "--validation-limit",
        "0",
        "--test-limit",
        "0",
        "--calibration-examples",
        "4",
        "--threads",
        "1",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "leaderboard.json").read_text())
    rows = {m["method"]: m for m in data["methods"]}
    assert rows["emr"]["kind"] == "routed" and rows["emr"]["status"] == "ok"
    assert rows["regmean"]["status"] == "ok" and rows["regmean"]["statistics"]["examples_per_task"] == 4
    assert data["config"]["calibration"]["statistics_dir"] == str(out / "statistics")
    assert (out / "statistics" / "regmean").is_dir()
    assert "--calibration-examples 4" in (out / "leaderboard.md").read_text()
    bad = CliRunner().invoke(app, [*args[:6], "--fisher-examples", "0"])
    assert bad.exit_code != 0


def test_per_task_choice_takes_each_tasks_best_value_within_the_chosen_setting() -> None:
    from mergelab_bench.eval.metrics import EvalReport, TaskScore
    from mergelab_bench.eval.routed import per_task_choice

    def report(a: float, b: float) -> EvalReport:
        return EvalReport("m", "validation", [TaskScore("a", a, 10, 1.0), TaskScore("b", b, 10, 1.0)])

    p = lambda mt, lam: GridPoint({"multitask": mt}, {"tall_lambda": lam})
    reports = [
        (p("sum", 0.2), report(0.9, 0.5)),
        (p("sum", 0.4), report(0.7, 0.8)),
        (p("sum", 0.6), report(0.7, 0.8)),  # ties with 0.4 on b: the first in grid order wins
        (p("ties", 0.2), report(1.0, 1.0)),  # another multitask setting: not considered
    ]
    assert per_task_choice("tall_lambda", p("sum", 0.4), reports, ["a", "b"]) == {"a": 0.2, "b": 0.4}
    # a tie with the chosen point's own value keeps the chosen value
    assert per_task_choice("tall_lambda", p("sum", 0.6), reports, ["a", "b"]) == {"a": 0.2, "b": 0.6}


def test_per_task_values_are_merged_and_scored(tiny_zoo: Zoo, tmp_path, monkeypatch) -> None:
    """Force a per-task choice that differs from the grid's: the row is re-merged with one λ_t per
    task, kept only if validation does not get worse, and its routing records the values."""
    import mergelab_bench.eval.routed as routed

    forced = {tiny_zoo.tasks[0]: 0.2, tiny_zoo.tasks[1]: 0.6}
    monkeypatch.setattr(routed, "per_task_choice", lambda axis, chosen, reports, tasks: dict(forced))
    grids = {"tall_masks": product({}, {"tall_lambda": (0.2, 0.6)})}
    lb = run_bench(
        tiny_zoo,
        methods=["tall_masks"],
        grids=grids,
        validation_limit=None,
        test_limit=None,
        work_dir=tmp_path / "work",
    )
    row = lb.methods[0]
    assert row.status == "ok", row.reason
    best_grid = max(g.validation_average_normalized for g in row.grid)
    if row.routing.get("per_task_parameters") is not None:
        assert row.routing["per_task_parameters"] == {"tall_lambda": forced}
        assert row.chosen.model_parameters["tall_lambda"] == "per task"
        assert row.validation.average_normalized >= best_grid
    else:  # the per-task merge scored lower on validation: the grid's choice stays
        assert row.chosen.model_parameters["tall_lambda"] in (0.2, 0.6)
        assert row.validation.average_normalized == best_grid
    assert not (tmp_path / "work" / ".routed-merges").exists()


def test_a_per_task_value_on_the_grid_edge_is_flagged() -> None:
    from mergelab_bench.eval.leaderboard import GridResult, MethodResult

    grid = [GridResult(GridPoint({}, {"tall_lambda": v}), 0.9, 0.9, 0.0, 0) for v in (0.2, 0.4, 0.6)]
    row = MethodResult(
        "tall_masks",
        chosen=GridPoint({}, {"tall_lambda": "per task"}),
        grid=grid,
        kind="routed",
        routing={"per_task_parameters": {"tall_lambda": {"a": 0.4, "b": 0.6}}},
    )
    assert row.chosen_at_edge == ["tall_lambda"]
    row.routing["per_task_parameters"]["tall_lambda"] = {"a": 0.4, "b": 0.4}
    assert row.chosen_at_edge == []


def test_adamerging_is_two_rows_task_and_layer_wise() -> None:
    from mergelab_bench.eval.grids import grid_for, method_of

    assert expand_methods(["adamerging"]) == ["adamerging_task", "adamerging_layer"]
    assert {"adamerging_task", "adamerging_layer"} <= set(DATA_INFORMED_METHODS)
    assert [p.parameters for p in grid_for("adamerging_task")] == [{"granularity": "task"}]
    assert [p.parameters for p in grid_for("adamerging_layer")] == [{"granularity": "layer"}]
    assert method_of("adamerging_layer") == "adamerging" and method_of("ties") == "ties"
    assert check_grid("adamerging_task", 8) is None
    with pytest.raises(RecipeError, match="must be test or train"):
        BenchCalibration(adamerging_split="validation")


def test_bench_update_adds_rows_and_refuses_a_different_protocol(tiny_zoo_manifest, tmp_path) -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from mergelab_bench.eval import commands

    app = typer.Typer()
    app.command("bench")(commands.bench_command)
    app.command("noop")(lambda: None)
    out = tmp_path / "lb"
    common = [
        "bench",
        "--zoo",
        str(tiny_zoo_manifest.parent),
        "--out",
        str(out),
        "--validation-limit",
        "0",
        "--test-limit",
        "0",
        "--calibration-examples",
        "4",
        "--threads",
        "1",
    ]
    first = CliRunner().invoke(app, [*common, "--methods", "regmean,linear"])
    assert first.exit_code == 0, first.output
    before = json.loads((out / "leaderboard.json").read_text())
    rows_before = {m["method"]: m for m in before["methods"]}

    res = CliRunner().invoke(app, [*common, "--methods", "task_arithmetic,linear", "--update"])
    assert res.exit_code == 0, res.output
    after = json.loads((out / "leaderboard.json").read_text())
    rows = {m["method"]: m for m in after["methods"]}
    assert list(rows) == ["regmean", "linear", "task_arithmetic"]
    # kept as it was; its statistics are recomputed on the same resamples: same intervals, and now a
    # paired comparison with the task_arithmetic row added beside it
    assert {k: v for k, v in rows["regmean"].items() if k != "stats"} == {
        k: v for k, v in rows_before["regmean"].items() if k != "stats"
    }
    assert rows["regmean"]["stats"]["average_normalized"] == rows_before["regmean"]["stats"]["average_normalized"]
    assert "vs_reference" not in rows_before["regmean"]["stats"] and rows["regmean"]["stats"]["vs_reference"]
    assert after["config"]["methods"] == ["regmean", "linear", "task_arithmetic"]
    assert set(after["config"]["grids"]) == set(rows) and after["config"]["calibration"]["methods"] == ["regmean"]
    assert [u["methods"] for u in after["info"]["updates"]] == [["regmean", "linear"], ["task_arithmetic", "linear"]]
    md = (out / "leaderboard.md").read_text()
    assert "--methods regmean,linear,task_arithmetic" in md and "task_arithmetic" in md

    # a kept RegMean row computed with 4 examples cannot sit beside a data-informed run with 5
    bad = CliRunner().invoke(
        app,
        [
            *common[:-4],
            "--calibration-examples",
            "5",
            "--threads",
            "1",
            "--fisher-examples",
            "2",
            "--methods",
            "fisher",
            "--update",
        ],
    )
    assert bad.exit_code != 0 and "calibration examples=4" in str(bad.exception)
    other_limit = CliRunner().invoke(
        app, [*common[:5], "--validation-limit", "3", *common[7:], "--methods", "linear", "--update"]
    )
    assert other_limit.exit_code != 0 and "validation_limit" in str(other_limit.exception)
    assert json.loads((out / "leaderboard.json").read_text()) == after  # nothing rewritten by the refused runs
    missing = CliRunner().invoke(
        app, [*common[:3], "--out", str(tmp_path / "none"), *common[5:], "--methods", "linear", "--update"]
    )
    assert missing.exit_code != 0 and "does not exist" in str(missing.exception)
