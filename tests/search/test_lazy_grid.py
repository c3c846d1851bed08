"""The grid sampler for grids too large to list: decoding, coverage, seeding, resume, and the
switch from Optuna's GridSampler in a search."""

from __future__ import annotations

import itertools
import tracemalloc

import pytest

optuna = pytest.importorskip("optuna")

from mergelab.search.lazy_grid import LazyGridSampler  # noqa: E402

VALUES = {"a": [0.0, 0.5, 1.0], "b": [-1.0, 1.0], "c": [0.1, 0.2, 0.3, 0.4]}


def _dists(values):
    return {k: optuna.distributions.FloatDistribution(min(v), max(v)) for k, v in values.items()}


def _study(sampler):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=sampler, direction="maximize")


def _ask(study, dists, n):
    got = []
    for _ in range(n):
        t = study.ask(dists)
        got.append(tuple(t.params[k] for k in dists))
        study.tell(t, 0.0)
    return got


def test_flat_index_decodes_in_product_order() -> None:
    s = LazyGridSampler(VALUES, _dists(VALUES), seed=0)
    assert s.size == 24
    # itertools.product varies the last coordinate fastest: index i is its i-th tuple
    for i, expected in enumerate(itertools.product(*VALUES.values())):
        assert tuple(s.point(i).values()) == expected
    with pytest.raises(IndexError, match="grid index 24 outside"):
        s.point(24)


def test_every_point_once_then_a_clear_error() -> None:
    dists = _dists(VALUES)
    study = _study(LazyGridSampler(VALUES, dists, seed=3))
    got = _ask(study, dists, 24)
    assert sorted(got) == sorted(itertools.product(*VALUES.values()))
    with pytest.raises(RuntimeError, match="every point of the 24-point grid has been visited"):
        study.ask(dists)


def test_a_grid_too_large_to_list_samples_distinct_points_seeded_and_resumable() -> None:
    values = {f"w{i}": [0.0, 1.0] for i in range(40)}  # 2^40 points
    dists = _dists(values)
    tracemalloc.start()
    first = _ask(_study(LazyGridSampler(values, dists, seed=7)), dists, 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6  # nothing of the 2^40-point product is listed
    assert len(set(first)) == 20 and all(x in (0.0, 1.0) for p in first for x in p)
    assert len({sum(p) for p in first}) > 3  # spread over the grid, not one corner's neighbourhood
    assert _ask(_study(LazyGridSampler(values, dists, seed=7)), dists, 20) == first
    assert _ask(_study(LazyGridSampler(values, dists, seed=8)), dists, 20) != first
    # resume: a new sampler on a study holding the first 8 trials continues the same sequence
    study = _study(LazyGridSampler(values, dists, seed=7))
    _ask(study, dists, 8)
    study.sampler = LazyGridSampler(values, dists, seed=7)
    assert _ask(study, dists, 12) == first[8:]


def test_log_scaled_coordinates_keep_their_distribution() -> None:
    values = {"lam": [0.1, 1.0, 10.0]}
    dists = {"lam": optuna.distributions.FloatDistribution(0.1, 10.0, log=True)}
    study = _study(LazyGridSampler(values, dists, seed=0))
    assert sorted(p[0] for p in _ask(study, dists, 3)) == [0.1, 1.0, 10.0]


def test_search_switches_to_the_lazy_sampler_above_the_listing_limit(llama_recipe, tmp_path, monkeypatch) -> None:
    from mergelab.search import run_search, samplers

    space = {"model_parameters": {"weight": {"low": 0.0, "high": 1.0, "grid": [0.0, 1.0]}}, "grid_points": 3}
    made = []
    real = LazyGridSampler.__init__

    def spy(self, *a, **k):
        made.append(self)
        real(self, *a, **k)

    monkeypatch.setattr(LazyGridSampler, "__init__", spy)
    monkeypatch.setattr(samplers, "GRID_LIST_LIMIT", 1)
    res = run_search(
        llama_recipe, out=tmp_path / "g", objective="python:search_objectives:closeness", space=space,
        algorithm="grid", budget=50, executor="inline",
    )  # fmt: skip
    assert made, "the lazy sampler was not used"
    assert sorted(tuple(r["values"].values()) for r in res.trials) == [(0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)]
