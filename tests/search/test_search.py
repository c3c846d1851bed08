"""Searches end to end (inline, no Ray): outputs, the best recipe, resume after a kill and after a
cut log line, the test-split guard, one-line errors, and the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

pytest.importorskip("optuna")

import mergelab
from mergelab import cli
from mergelab.errors import OptionError, OutputError, RecipeError
from mergelab.search import run_search
from mergelab.search.log import TrialLog

SPACE = {
    "model_parameters": {"weight": {"low": 0.0, "high": 1.0}},
    "parameters": {"lambda": {"low": 0.2, "high": 2.0}},
    "layer_granularity": 1,
}


def _run(recipe: Path, out: Path, **kw):
    args = {
        "objective": "python:search_objectives:closeness",
        "space": SPACE,
        "algorithm": "random",
        "budget": 6,
        "executor": "inline",
    }
    args.update(kw)
    return run_search(recipe, out=out, **args)


def test_inline_search_writes_every_output_and_a_best_recipe_that_reproduces_its_score(llama_recipe, tmp_path) -> None:
    import search_objectives

    res = _run(llama_recipe, tmp_path / "s")
    out = res.out
    for name in ("trials.jsonl", "trials.json", "trials.csv", "best_recipe.yaml", "convergence.png", "search.json"):
        assert (out / name).is_file(), name
    assert len(res.trials) == 6 and [r["trial"] for r in res.trials] == list(range(6))
    assert res.best["score"] == max(r["score"] for r in res.trials)
    rows = (out / "trials.csv").read_text().splitlines()
    assert len(rows) == 7 and "param:weight.m0.g0" in rows[0] and "task:python:search_objectives:closeness" in rows[0]
    # the best recipe is a plain recipe: merging it gives the logged score
    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert best["merge_method"] == "task_arithmetic" and len(best["models"][0]["parameters"]["weight"]) == 2
    mergelab.merge(out / "best_recipe.yaml", tmp_path / "merged")
    from safetensors.torch import load_file

    state = {}
    for f in (tmp_path / "merged").glob("*.safetensors"):
        state.update(load_file(str(f)))
    assert search_objectives.closeness(state) == pytest.approx(res.best["score"], abs=1e-6)
    summary = json.loads((out / "search.json").read_text())
    assert summary["trials"] == 6 and summary["best"]["trial"] == res.best["trial"]


def test_a_killed_search_resumes_from_its_trial_log(llama_recipe, tmp_path, monkeypatch) -> None:
    import search_objectives

    out = tmp_path / "killed"
    kw = {"objective": "python:search_objectives:interrupting", "algorithm": "tpe"}
    monkeypatch.setenv("SEARCH_STOP_AT", "4")
    search_objectives.CALLS["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        _run(llama_recipe, out, **kw)
    logged = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in logged] == ["header", "trial", "trial", "trial"]
    # running the same command again goes on from trial 3 (the interrupted trial is not counted)
    res = _run(llama_recipe, out, **kw)
    assert len(res.trials) == 6 and [r["trial"] for r in res.trials] == list(range(6))
    assert any("resuming" in n and "3 trial(s)" in n for n in res.notes)
    assert search_objectives.CALLS["n"] == 4 + 3  # 3 + the interrupted one before, 3 new after
    # the Optuna study saw the same 6 trials (its interrupted one is failed, not re-run)
    import optuna

    from mergelab.search.backends import journal_storage

    study = optuna.load_study(study_name="mergelab", storage=journal_storage(out))
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 6
    # a larger budget later extends the same search
    assert len(_run(llama_recipe, out, budget=8, **kw).trials) == 8


def test_a_log_line_cut_by_a_kill_is_dropped_on_resume(llama_recipe, tmp_path) -> None:
    out = tmp_path / "cut"
    _run(llama_recipe, out, budget=3)
    with open(out / "trials.jsonl", "a") as fh:
        fh.write('{"kind": "trial", "trial": 3, "sco')  # the kill came mid-line
    res = _run(llama_recipe, out, budget=5)
    assert [r["trial"] for r in res.trials] == [0, 1, 2, 3, 4]
    for line in (out / "trials.jsonl").read_text().splitlines():
        json.loads(line)


def test_another_search_in_the_same_folder_is_refused(llama_recipe, tmp_path) -> None:
    out = tmp_path / "one"
    _run(llama_recipe, out, budget=2)
    with pytest.raises(OutputError, match=r"holds a different search.*--force"):
        _run(llama_recipe, out, budget=2, seed=1)
    assert len(_run(llama_recipe, out, budget=2, seed=1, force=True).trials) == 2
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds no search"):
        _run(llama_recipe, other, budget=2, force=True)
    assert (other / "notes.txt").read_text() == "mine"
    log = TrialLog(tmp_path / "locked", {"a": 1})
    try:
        with pytest.raises(OutputError, match="another search is running"):
            TrialLog(tmp_path / "locked", {"a": 1})
    finally:
        log.close()


def test_grid_cma_and_multi_objective(llama_recipe, tmp_path) -> None:
    space = {"model_parameters": {"weight": {"low": 0.0, "high": 1.0, "grid": [0.0, 1.0]}}, "grid_points": 3}
    res = _run(llama_recipe, tmp_path / "grid", space=space, algorithm="grid", budget=50)
    assert len(res.trials) == 4  # the 2 x 2 grid, not the budget
    assert sorted(tuple(r["values"].values()) for r in res.trials) == [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
    res = _run(llama_recipe, tmp_path / "cma", algorithm="cma", budget=5)
    x0 = res.trials[0]["values"]
    assert x0["weight.m0.g0"] == pytest.approx(0.5) and x0["lambda.g0"] == pytest.approx(1.1)  # x0: 1/N, midpoint
    res = _run(
        llama_recipe, tmp_path / "multi", objective="python:search_objectives:two_tasks", multi_objective=True, budget=5
    )
    assert (res.out / "pareto.png").is_file()
    front = json.loads((res.out / "pareto.json").read_text())
    assert front["tasks"] == ["first", "second"] and front["trials"]
    with pytest.raises(OptionError, match="cma optimises one objective"):
        _run(
            llama_recipe,
            tmp_path / "multi-cma",
            objective="python:search_objectives:two_tasks",
            multi_objective=True,
            algorithm="cma",
        )


def test_test_split_guard(tiny_zoo_recipe, tmp_path) -> None:
    recipe, manifest = tiny_zoo_recipe
    opts = {"zoo": str(manifest)}
    with pytest.raises(OptionError, match=r"zoo:test: the zoo's test split.*--i-know-this-tunes-on-test-data"):
        _run(recipe, tmp_path / "t", objective="zoo:test", objective_options=opts)
    for spec in ("lm-eval:mmlu_abstract_algebra", "lm-eval:my_task,arc_easy", "lm-eval:gsm8k", "lm:test"):
        with pytest.raises(OptionError, match="--i-know-this-tunes-on-test-data"):
            _run(recipe, tmp_path / "t", objective=spec)
    from mergelab.search.objective import check_not_test

    assert check_not_test("lm-eval:mmlu_train") is None  # a benchmark's train split is fine (mergekit's rule)
    assert check_not_test("lm-eval:my_local_task") is None
    assert check_not_test("zoo:test", allow_test=True) == "the zoo's test split"
    assert not (tmp_path / "t").exists()  # refused before anything was written
    res = _run(recipe, tmp_path / "allowed", objective="zoo:test", objective_options=opts, allow_test=True, budget=1)
    assert any("reads test data" in n for n in res.notes)


def test_zoo_objective_scores_normalized_accuracy(tiny_zoo_recipe, tmp_path) -> None:
    recipe, manifest = tiny_zoo_recipe
    res = _run(
        recipe,
        tmp_path / "zoo",
        objective="zoo:validation",
        objective_options={"zoo": str(manifest), "limit": "0"},
        budget=2,
    )
    scores = res.trials[0]["scores"]
    assert set(scores["tasks"]) == {"alpha", "beta"} and scores["kinds"] == {"alpha": "accuracy", "beta": "accuracy"}
    assert scores["score"] == pytest.approx(sum(scores["tasks"].values()) / 2)
    assert all(0 <= v <= 1 for v in scores["metrics"].values())


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"algorithm": "anneal"}, OptionError, "--algorithm 'anneal': unknown"),
        ({"objective": "nope"}, OptionError, "expected KIND:ARG"),
        ({"objective": "wandb:run"}, OptionError, "no objective kind 'wandb'"),
        ({"objective": "python:no_such_module:f"}, OptionError, "cannot import 'no_such_module'"),
        ({"space": {}}, RecipeError, "names no parameter to vary"),
        (
            {"algorithm": "tpe", "space": {**SPACE, "algorithms": {"tpe": {"n_startup": 3}}}},
            RecipeError,
            "algorithms.tpe.n_startup: unknown option",
        ),
        ({"algorithm": "map", "budget": 3}, OptionError, "MAP with these options evaluates 9 points"),
        ({"algorithm": "map", "space": {"algorithms": {"map": {"samples": 4}}}}, OptionError, "at least that many"),
        ({"budget": 0}, OptionError, "--budget must be at least 1"),
    ],
)
def test_errors_are_one_line_before_any_trial(llama_recipe, tmp_path, kw, error, message) -> None:
    with pytest.raises(error, match=message) as info:
        _run(llama_recipe, tmp_path / "e", **kw)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "e").exists()  # nothing written


def test_map_evolver_and_fw_through_the_runner(tiny_zoo_recipe, tmp_path) -> None:
    recipe, manifest = tiny_zoo_recipe
    ta = tmp_path / "ta.yaml"
    data = yaml.safe_load(recipe.read_text())
    ta.write_text(yaml.safe_dump({**data, "merge_method": "task_arithmetic"}))
    opts = {"zoo": str(manifest), "limit": "0"}
    res = _run(
        ta,
        tmp_path / "map",
        objective="zoo:validation",
        objective_options=opts,
        algorithm="map",
        space=None,
        budget=None,
    )
    assert len(res.trials) == 2 + 6 + 1  # anchors + (T+1)(T+2)/2 grid points + the chosen point
    detail = json.loads((res.out / "map.json").read_text())
    assert res.best["key"] == "map/choice/0" and detail["choice"]["coefficients"] == pytest.approx(
        res.best["coefficients"]
    )
    assert (res.out / "pareto.png").is_file()
    assert yaml.safe_load((res.out / "best_recipe.yaml").read_text())["models"][0]["parameters"][
        "weight"
    ] == pytest.approx(res.best["coefficients"][0])
    sp = {"algorithms": {"evolver": {"merger": True, "max_iters": 2}}}
    res = _run(
        recipe,
        tmp_path / "evo",
        objective="zoo:validation",
        objective_options=opts,
        algorithm="evolver",
        space=sp,
        budget=None,
    )
    assert len(res.trials) == 1 + 2 * 2 and (res.out / "evolver" / "population-1.safetensors").is_file()
    best = yaml.safe_load((res.out / "best_recipe.yaml").read_text())
    assert best["merge_method"] == "ties" and best["models"][0]["model"].endswith("population-0.safetensors")
    sp = {"algorithms": {"fw": {"max_iters": 2}}}
    res = _run(
        recipe,
        tmp_path / "fw",
        objective="zoo:validation",
        objective_options=opts,
        algorithm="fw",
        space=sp,
        budget=None,
    )
    assert [r["key"] for r in res.trials] == ["fw/0", "fw/1"] and res.best["key"] == "fw/1"
    assert all(math.isfinite(r["loss"]) for r in res.trials)
    assert yaml.safe_load((res.out / "best_recipe.yaml").read_text())["models"][0]["model"].endswith(
        "merged.safetensors"
    )


def test_nested_map_pairs_tasks_and_composes_their_coefficients(llama_recipe, tmp_path) -> None:
    sp = {"algorithms": {"map": {"nested": True, "nested_samples": 8}}}
    res = _run(
        llama_recipe,
        tmp_path / "nested",
        objective="python:search_objectives:two_accuracies",
        algorithm="map",
        space=sp,
        budget=None,
    )
    keys = [r["key"] for r in res.trials]
    assert keys[:2] == ["map/anchor/0", "map/anchor/1"] and keys[-1] == "map/r0/choice/0" and len(keys) == 2 + 7 + 1
    # 8 samples with 20 % isotropic: int(0.2 * 6) = 1 isotropic point, split 1 // 2 = 0 plain + 0 perturbed:
    # one point fewer, as in the official Sampling.generate_combined_points
    detail = json.loads((res.out / "map.json").read_text())
    (round0,) = detail["rounds"]
    assert round0["pair"] == ["first", "second"]
    # the final weights are the chosen coefficients on the two one-hot groups
    assert detail["final_weights"] == pytest.approx(round0["coefficients"])
    assert res.best["coefficients"] == pytest.approx(round0["coefficients"])


def test_the_command_line(llama_recipe, tmp_path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    runner = CliRunner()
    args = ["search", str(llama_recipe), "--space", str(space), "--objective", "python:search_objectives:closeness"]
    res = runner.invoke(
        cli.app,
        [
            *args,
            "--algorithm",
            "random",
            "--budget",
            "3",
            "--executor",
            "inline",
            "--out",
            str(tmp_path / "cli"),
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "3 trials, best score" in res.output and (tmp_path / "cli" / "best_recipe.yaml").is_file()
    res = runner.invoke(
        cli.app,
        [
            "search",
            str(llama_recipe),
            "--space",
            str(space),
            "--objective",
            "lm-eval:hellaswag",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "hellaswag" in res.output


@pytest.mark.parametrize(("module", "kw"), [("optuna", {"algorithm": "cma"}), ("ray", {"executor": "ray"})])
def test_a_missing_extra_is_one_line_naming_it(llama_recipe, tmp_path, monkeypatch, module, kw) -> None:
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    kw = {"executor": "inline", **kw}
    with pytest.raises(OptionError, match=r"pip install 'mergelab\[search\]'") as info:
        _run(llama_recipe, tmp_path / "x", **kw)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "x").exists()
