"""Routed rows without the task id on both suites (``mergelab bench --methods routed``): each row is
built with its router and scored by the routed model itself; a classification row routed to another
task counts as wrong (the routed task's head); router accuracy, storage and throughput are recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mergelab_bench.eval.grids import GridPoint, expand_methods
from mergelab_bench.eval.leaderboard import run_bench, write_leaderboard
from mergelab_bench.eval.routed_models import RoutedBenchSettings, RoutedModelMerge, routed_row_spec
from mergelab_bench.zoo.build import Zoo
from mergelab_bench.zoo.lm.build import LMZoo, LMZooConfig, build_lm_zoo
from mergelab_bench.zoo.lm.testing import write_lm_sources, write_tiny_causal_lm
from mergelab_bench.zoo.lm.train import LMTrainConfig

pytest.importorskip("peft")

TINY = RoutedBenchSettings(
    train_examples=12, validation_examples=6, epochs=3, wemoe_examples=8, wemoe_steps=2, throughput_rows=2
)


def test_routed_group_names_the_rows():
    assert expand_methods(["routed"]) == [
        "twin_merging", "split_merge", "smile", "wemoe", "tall_masks_router", "emr_router",
    ]  # fmt: skip
    spec = routed_row_spec("tall_masks_router")
    assert spec is not None and spec.method == "tall_masks" and spec.outputs == "routed_model"
    assert routed_row_spec("ties") is None


def test_router_batch_gives_several_adam_steps_per_epoch():
    from mergelab.errors import RecipeError
    from mergelab_bench.eval.routed_models import router_batch

    assert router_batch(RoutedBenchSettings(), 4) == 150  # 1200 rows / 8
    assert router_batch(RoutedBenchSettings(), 2) == 75
    assert router_batch(RoutedBenchSettings(train_examples=5500), 8) == 1024  # the reference's batch, at most
    assert router_batch(RoutedBenchSettings(train_examples=1), 2) == 2
    assert router_batch(RoutedBenchSettings(router_batch_size=64), 4) == 64
    with pytest.raises(RecipeError, match="batch size"):
        RoutedBenchSettings(router_batch_size=1)


def test_classification_rows_route_every_test_row(tiny_zoo: Zoo, tmp_path: Path) -> None:
    grids = {
        "twin_merging": (GridPoint({"density": 0.5}),),
        "smile": (GridPoint({"k": 4}),),
        "wemoe": (GridPoint(),),
        "tall_masks_router": (GridPoint({}, {"tall_lambda": 0.4}),),
    }
    lb = run_bench(
        tiny_zoo, methods=list(grids), grids=grids, validation_limit=8, test_limit=10,
        work_dir=tmp_path / "work", routed_settings=TINY,
    )  # fmt: skip
    assert not (tmp_path / "work" / ".routed-merges").exists() or not any(
        (tmp_path / "work" / ".routed-merges").iterdir()
    )
    for row in lb.methods:
        assert row.status == "ok", (row.method, row.reason)
        assert row.routed_model and row.display_name().endswith("(routed, no task id)")
        r = row.routing
        assert r["needs_task_id"] is False and 0.0 <= r["router_test_accuracy"]["accuracy"] <= 1.0
        conf = r["router_test_accuracy"]["confusion"]
        assert [sum(v) for v in conf.values()] == [10, 10]
        assert r["storage"]["total_bytes"] > 0 and r["throughput"]["rows"] == 4
        assert r["oracle_head_test_average_normalized"] is not None
        # a wrong route scores 0: the headline can only be at most the oracle head's
        assert row.test.average_normalized <= r["oracle_head_test_average_normalized"] + 1e-9
    assert lb.config["routed_model"]["wemoe_split"] == "test"
    paths = write_leaderboard(lb, tmp_path / "out")
    md = paths["markdown"].read_text() if "markdown" in paths else (tmp_path / "out" / "leaderboard.md").read_text()
    assert "routed, no task id" in md and "router test accuracy" in md
    data = json.loads((tmp_path / "out" / "leaderboard.json").read_text())
    assert {m["kind"] for m in data["methods"]} == {"routed_model"}


def test_routed_head_rule_on_a_forced_wrong_route(tiny_zoo: Zoo, tmp_path: Path) -> None:
    """Forcing every row to task 0 leaves task 1 at 0 % and task 0 at the oracle head's score."""
    from mergelab_bench.eval.harness import Evaluator
    from mergelab_bench.eval.routed_models import routed_model_merge

    spec = routed_row_spec("twin_merging")
    assert spec is not None
    merged = routed_model_merge(spec, tiny_zoo, GridPoint({"density": 0.5}), tmp_path / "m", settings=TINY)
    model = merged.model()
    ev = Evaluator(tiny_zoo, split="test", limit=10)
    with model.fixed_route(0):
        report = merged.evaluate(ev, "forced")
    scores = {s.task: s.value for s in report.scores}
    oracle = {s.task: s.value for s in merged.oracle.scores}
    assert scores[tiny_zoo.tasks[1]] == 0.0 and scores[tiny_zoo.tasks[0]] == oracle[tiny_zoo.tasks[0]]
    assert merged.router_test["per_task"] == {tiny_zoo.tasks[0]: 1.0, tiny_zoo.tasks[1]: 0.0}
    assert isinstance(merged, RoutedModelMerge)
    merged.remove()


@pytest.fixture(scope="module")
def lm_zoo(tmp_path_factory: pytest.TempPathFactory) -> LMZoo:
    root = tmp_path_factory.mktemp("lmzoo")
    train = LMTrainConfig(steps=2, batch_size=4, max_len=24, lr=1e-3, eval_limit=6, eval_batch_size=4)
    return build_lm_zoo(
        LMZooConfig(name="tiny", tasks=("german", "arithmetic"), train=train), cache=root / "cache",
        reader=write_lm_sources(root / "src"), base_source=write_tiny_causal_lm(root / "tiny"), threads=1,
    )  # fmt: skip


def test_lm_rows_route_without_the_task_id(lm_zoo: LMZoo, tmp_path: Path) -> None:
    from mergelab_bench.eval.lm_bench import run_lm_bench

    torch.manual_seed(0)
    grids = {
        "twin_merging": (GridPoint({"density": 0.5}),),
        "smile": (GridPoint({"k": 8, "gate_k": 2}),),
        "wemoe": (GridPoint(),),
        "emr_router": (GridPoint(),),
    }
    lb = run_lm_bench(
        lm_zoo, methods=list(grids), grids=grids, validation_limit=4, work_dir=tmp_path / "work", routed_settings=TINY
    )
    for row in lb.methods:
        assert row.status == "ok", (row.method, row.reason)
        assert row.routed_model and row.routing["router_test_accuracy"]["accuracy"] is not None
        assert row.routing["throughput"]["rows"] == 4 and row.routing["oracle_head_test_average_normalized"] is None
