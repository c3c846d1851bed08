"""The accuracy-storage curve of a routed row (benchmarks/routed_storage_curve.py): each point is the
routed model the leaderboard would build at that value, scored on test without the task id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergelab_bench.eval.grids import GridPoint
from mergelab_bench.eval.leaderboard import run_bench
from mergelab_bench.eval.routed_curve import storage_curve, write_curve
from mergelab_bench.eval.routed_models import RoutedBenchSettings
from mergelab_bench.eval.stats import StatsConfig
from mergelab_bench.zoo.build import Zoo

pytest.importorskip("peft")

TINY = RoutedBenchSettings(train_examples=12, validation_examples=6, epochs=3, throughput_rows=2)


def test_twin_curve_points_match_the_leaderboard_row(tiny_zoo: Zoo, tmp_path: Path) -> None:
    stats = StatsConfig(bootstrap=200)
    curve = storage_curve(
        tiny_zoo, "twin_merging", "density", [0.1, 0.5], tmp_path / "work", limit=10, settings=TINY, stats=stats
    )
    assert not any((tmp_path / "work").iterdir())  # every build removed after scoring
    pts = curve["points"]
    assert [p["value"] for p in pts] == [0.1, 0.5]
    lo, hi = pts
    # more rank kept -> more bytes per expert; the shared model and the router do not change
    assert hi["storage"]["total_bytes"] > lo["storage"]["total_bytes"]
    assert hi["storage"]["shared_bytes"] == lo["storage"]["shared_bytes"]
    assert hi["storage"]["router_bytes"] == lo["storage"]["router_bytes"]
    assert lo["expert_fraction_of_model"] == pytest.approx(
        max(lo["storage"]["expert_bytes"].values()) / lo["storage"]["shared_bytes"]
    )
    for p in pts:
        # a wrong route scores 0, so the headline is at most the oracle head's
        assert p["average_normalized"] <= p["oracle_head_average_normalized"] + 1e-9
        assert 0.0 <= p["router_test_accuracy"] <= 1.0
        iv = p["interval"]
        assert iv["low"] <= p["average_normalized"] <= iv["high"]
        assert set(p["normalized"]) == set(tiny_zoo.tasks)

    # the point at density 0.5 is the leaderboard's row when its grid holds only that point
    lb = run_bench(
        tiny_zoo, methods=["twin_merging"], grids={"twin_merging": (GridPoint({"density": 0.5}),)},
        validation_limit=8, test_limit=10, work_dir=tmp_path / "bench", routed_settings=TINY, stats=stats,
    )  # fmt: skip
    (row,) = lb.methods
    assert row.test.average_normalized == pytest.approx(hi["average_normalized"], abs=1e-12)
    assert row.routing["storage"]["total_bytes"] == hi["storage"]["total_bytes"]

    paths = write_curve(curve, tmp_path / "out")
    assert {p.name for p in paths.values()} == {"curve.json", "curve.md", "curve.png"}
    md = paths["markdown"].read_text()
    assert md.count("\n| 0.1 |") == 1 and md.count("\n| 0.5 |") == 1
    assert json.loads(paths["json"].read_text())["points"][1]["value"] == 0.5


def test_curve_refuses_a_row_that_is_not_routed(tiny_zoo: Zoo, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'ties' is not a routed row: use one of twin_merging, .*emr_router"):
        storage_curve(tiny_zoo, "ties", "density", [0.1], tmp_path)
    with pytest.raises(ValueError, match="no values"):
        storage_curve(tiny_zoo, "twin_merging", "density", [], tmp_path)
