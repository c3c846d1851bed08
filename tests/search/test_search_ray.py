"""Searches on Ray Tune with a local Ray (loopback only): Optuna's CMA-ES driven by Tune's
OptunaSearch over 2 reused actors, and MAP's batch of points as one Tune run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("optuna")
pytest.importorskip("ray.tune")

from mergelab.search import run_search

pytestmark = pytest.mark.slow  # a local Ray takes ~10 s to start on 2 busy cores


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (a search leaves a running Ray alone)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


class _Progress:
    """A progress display that cannot be pickled (as rich's is): Ray Tune must never need to."""

    def __init__(self) -> None:
        import threading

        self.lock = threading.RLock()
        self.seen: list[int] = []

    def start(self, total, done):
        return None

    def trial(self, done, total, best, last):
        self.seen.append(done)

    def note(self, message):
        return None

    def end(self):
        return None


def test_six_trial_cma_search_on_a_tiny_zoo_through_local_ray(tiny_zoo_recipe, tmp_path, local_ray) -> None:
    recipe, manifest = tiny_zoo_recipe
    space = {
        "model_parameters": {"weight": {"low": 0.0, "high": 1.0}, "density": {"low": 0.0, "high": 1.0}},
        "layer_granularity": 1,
    }
    res = run_search(
        recipe,
        objective="zoo:validation",
        objective_options={"zoo": str(manifest)},
        space=space,
        algorithm="cma",
        budget=6,
        out=tmp_path / "ray",
        workers=2,
        progress=(progress := _Progress()),
    )
    assert len(res.trials) == 6 and progress.seen == [1, 2, 3, 4, 5, 6]
    logged = [json.loads(line) for line in (tmp_path / "ray" / "trials.jsonl").read_text().splitlines()][1:]
    assert [e["trial"] for e in logged] == list(range(6))
    workers = {e["worker"] for e in logged}
    assert 1 <= len(workers) <= 2  # Tune reuses its actors: each reads the experts once
    # CMA-ES's first trial is x0 (mergekit-evolve: weight 1/N, density 1)
    assert logged[0]["values"]["weight.m0.g0"] == pytest.approx(0.5) and logged[0]["values"]["density.m1.g1"] == 1.0
    assert (tmp_path / "ray" / "best_recipe.yaml").is_file()
    assert not list((tmp_path / "ray").glob(".tune-*"))  # Tune's scratch is removed
    assert local_ray.is_initialized()  # a Ray the caller started is left running

    # MAP's samples as one batch of Tune trials, then its choice
    import yaml

    ta = tmp_path / "ta.yaml"
    ta.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "merge_method": "task_arithmetic"}))
    res = run_search(
        ta, objective="zoo:validation", objective_options={"zoo": str(manifest)}, algorithm="map", out=tmp_path / "map",
        workers=2,
    )  # fmt: skip
    assert [r["key"] for r in res.trials][-1] == "map/choice/0" and len(res.trials) == 9
    assert {r["key"] for r in res.trials[:-1]} == {f"map/0/{i}" for i in range(8)}
