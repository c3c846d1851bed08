"""Evolver's operator on constructed vectors (interpolation toward the reference, per-coordinate
crossover, strict acceptance, the reference schedule), and both variants run on a toy population."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mergelab.executors.memory import MergeSession
from mergelab.search import evolver as ev
from mergelab.search.objective import Scores


def test_mutation_interpolates_toward_the_reference_and_crossover_picks_per_coordinate() -> None:
    x = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    ref = torch.tensor([8.0, 8.0, 8.0, 8.0, 0.0, 0.0, 0.0, 0.0])
    f, cr = 0.25, 0.5
    cand, mask = ev.mutate_crossover(x, ref, f, cr, torch.Generator().manual_seed(7))
    u = torch.rand(8, generator=torch.Generator().manual_seed(7))  # the same draws, by hand
    want = torch.where(u < cr, 0.75 * x + 0.25 * ref, x)
    assert torch.equal(mask, u < cr)
    torch.testing.assert_close(cand, want)
    assert 0 < int(mask.sum()) < 8  # with cr = 0.5, some coordinates come from each parent
    # cr = 1: every coordinate is mutated; f = 1: the mutant is the reference itself
    all_in, _ = ev.mutate_crossover(x, ref, 1.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(all_in, ref)
    half, _ = ev.mutate_crossover(x, ref, 0.5, 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(half, (x + ref) / 2)


def test_candidate_draws_one_mask_per_tensor_in_order() -> None:
    pop = [
        {"a": torch.zeros(5), "b": torch.zeros(3, 2)},
        {"a": torch.ones(5), "b": torch.ones(3, 2)},
    ]
    cand = ev.candidate(pop, 0, 1, 0.5, 0.5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    ua, ub = torch.rand(5, generator=g), torch.rand(3, 2, generator=g)
    assert torch.equal(cand["a"], torch.where(ua < 0.5, 0.5, 0.0))
    assert torch.equal(cand["b"], torch.where(ub < 0.5, 0.5, 0.0))


def test_reference_schedule_and_acceptance() -> None:
    # p = 0.5 / (max_iters - iter) + 0.5, iter from 0
    assert ev.reference_probability(0, 15) == pytest.approx(0.5 + 0.5 / 15)
    assert ev.reference_probability(14, 15) == pytest.approx(1.0)
    assert ev.best_other([0.3, 0.9, 0.9, 0.1], 1) == 2
    assert ev.best_other([0.3, 0.9, 0.5, 0.1], 0) == 1
    rng = np.random.default_rng(0)
    refs = {ev.choose_reference(rng, 2, 4, None, 0, 15) for _ in range(200)}
    assert refs == {0, 1, 3}  # with a merger: always a random other individual
    # without a merger at the last iteration p = 1: random others only; early on the best other shows up more
    late = [ev.choose_reference(rng, 0, 4, [0.1, 0.2, 0.9, 0.3], 14, 15) for _ in range(300)]
    early = [ev.choose_reference(rng, 0, 4, [0.1, 0.2, 0.9, 0.3], 0, 15) for _ in range(3000)]
    assert set(late) == {1, 2, 3} and abs(late.count(2) / 300 - 1 / 3) < 0.1
    want = (1 - ev.reference_probability(0, 15)) + ev.reference_probability(0, 15) / 3
    assert abs(early.count(2) / 3000 - want) < 0.03
    assert ev.accept(0.51, 0.5) and not ev.accept(0.5, 0.5) and not ev.accept(0.4, 0.5)


def _toy_session(method: str = "task_arithmetic") -> MergeSession:
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.w": torch.zeros(6), "model.layers.1.w": torch.zeros(4)}
    experts = [{k: torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    return MergeSession.from_state_dicts(method, experts, base, parameters={"lambda": 0.5})


TARGET = {"model.layers.0.w": torch.full((6,), 0.4), "model.layers.1.w": torch.full((4,), -0.2)}


def _score(state) -> float:
    return -float(sum(((state[k] - v) ** 2).sum() for k, v in TARGET.items()))


class _Worker:
    def __init__(self, session: MergeSession) -> None:
        self.session = session
        self.where = "test"
        self.spec = SimpleNamespace(objective="python:toy")
        self.evaluations = 0

    def score(self, state) -> Scores:
        self.evaluations += 1
        return Scores.of(_score(state))


@pytest.mark.parametrize("merger", [True, False])
def test_a_run_only_improves_and_replays_from_its_log(tmp_path, merger) -> None:
    session = _toy_session()
    worker = _Worker(session)
    records: list[dict] = []
    payload = {"options": {"merger": merger, "max_iters": 4}, "seed": 1, "budget": 100, "out": str(tmp_path)}
    ev.run_in_worker(worker, payload, records.append)  # type: ignore[arg-type]
    n = len(session.experts)
    assert len(records) == (1 if merger else n) + 4 * n
    result = json.loads((tmp_path / "evolver" / "result.json").read_text())
    if merger:
        inc = [r["incumbent"] for r in records]
        assert inc == sorted(inc)  # the incumbent only grows (strictly better candidates only)
        assert all(r["accepted"] == (r["score"] > prev) for r, prev in zip(records[1:], inc))
        assert result["score"] == inc[-1] == max(r["score"] for r in records)
        # the result is the final population: its merge scores the incumbent
        files = result["population"]
        assert len(files) == n
        from safetensors.torch import load_file

        pop = [load_file(f) for f in files]
        fresh = MergeSession.from_state_dicts(
            "task_arithmetic", pop, {k: torch.zeros_like(v) for k, v in pop[0].items()}, parameters={"lambda": 0.5}
        )
        assert _score(fresh.merge()) == pytest.approx(result["score"], rel=1e-5)
    else:
        per: dict[int, float] = {}
        for r in records:
            i = r["individual"]
            if r["iteration"] >= 0:
                assert r["accepted"] == (r["score"] > per[i])
            per[i] = r["incumbent"]
        assert result["best"] == max(per, key=lambda i: per[i])
    # a second run with the whole log replays without evaluating and ends in the same place
    session2 = _toy_session()
    worker2 = _Worker(session2)
    again: list[dict] = []
    replay = {r["key"]: r for r in records}
    ev.run_in_worker(worker2, {**payload, "replay": replay, "out": str(tmp_path / "2")}, again.append)  # type: ignore[arg-type]
    assert again == [] and worker2.evaluations == 0
    result2 = json.loads((tmp_path / "2" / "evolver" / "result.json").read_text())
    assert result2["score"] == result["score"]
    # half a log: the rest is evaluated, with the same draws as the uninterrupted run
    session3 = _toy_session()
    worker3 = _Worker(session3)
    rest: list[dict] = []
    half = dict(list(replay.items())[: len(replay) // 2])
    ev.run_in_worker(worker3, {**payload, "replay": half, "out": str(tmp_path / "3")}, rest.append)  # type: ignore[arg-type]
    assert [r["key"] for r in rest] == [r["key"] for r in records][len(half) :]
    assert [r["score"] for r in rest] == pytest.approx([r["score"] for r in records][len(half) :])


def test_the_budget_stops_the_run(tmp_path) -> None:
    records: list[dict] = []
    payload = {"options": {"merger": True, "max_iters": 15}, "seed": 0, "budget": 5, "out": str(tmp_path)}
    ev.run_in_worker(_Worker(_toy_session()), payload, records.append)  # type: ignore[arg-type]
    assert len(records) == 5
