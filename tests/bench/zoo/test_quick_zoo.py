"""The real quick zoo end to end (minutes on 2 cores; reuses the cache): run with ``-m slow``."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_quick_zoo_builds_and_experts_beat_their_probes() -> None:
    from mergelab_bench.eval.grids import DEMO_GRIDS
    from mergelab_bench.eval.leaderboard import run_bench
    from mergelab_bench.zoo import SourceError, ZooConfig, build_zoo, zoo_summary

    try:
        zoo = build_zoo(ZooConfig.quick(), threads=2)
    except SourceError as exc:
        pytest.skip(f"zoo sources not installed: {exc}")
    for row in zoo_summary(zoo):
        # test is the unbiased comparison: the probe's L2 strength was picked on validation
        assert row["expert_test"] > row["probe_test"], row
    lb = run_bench(zoo, methods=["task_arithmetic"], grids=DEMO_GRIDS, validation_limit=100, test_limit=200)
    ta = lb.methods[0]
    pretrained = lb.references[0]
    assert ta.test is not None and ta.test.average_normalized > pretrained.average_normalized
