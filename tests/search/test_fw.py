"""Frank–Wolfe merging on a toy pool: the oracle (cosine with full checkpoints, zero fallback,
model granularity), the 2/(t+2) step, the update through the inner merge, a run and its replay."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from mergelab.executors.memory import MergeSession
from mergelab.search import fw
from mergelab.search.objective import Scores
from mergelab.search.options import FwOptions


def test_step_size_schedule() -> None:
    assert [fw.step_size(t) for t in range(4)] == pytest.approx([1.0, 2 / 3, 0.5, 0.4])
    assert fw.step_size(2, 0.1) == pytest.approx(0.05)


def test_oracle_picks_the_checkpoint_least_aligned_with_the_gradient() -> None:
    grad = {"w": torch.tensor([1.0, 0.0]), "v": torch.tensor([0.0, 1.0])}
    pool = [
        {"w": torch.tensor([1.0, 1.0]), "v": torch.tensor([1.0, 1.0])},  # cos w: +0.71, v: +0.71
        {"w": torch.tensor([-1.0, 0.5]), "v": torch.tensor([3.0, 0.1])},  # cos w: -0.89, v: +0.03
        {"w": torch.tensor([0.0, 1.0]), "v": torch.tensor([1.0, 0.0])},  # cos w: 0,     v: 0
    ]
    assert fw.lmo(grad, pool) == {"w": 1, "v": 2}
    # the official code's zero fallback: a least cosine >= 0 means "step toward zeros"
    assert fw.lmo(grad, pool, zero_fallback=True) == {"w": 1, "v": fw.ZERO}
    # one checkpoint for every tensor by the sum of cosines (FusionBench's task granularity)
    assert fw.lmo(grad, pool, granularity="model") == {"w": 1, "v": 1}
    s = fw.target({"w": 1, "v": fw.ZERO}, pool, {"w": torch.ones(2), "v": torch.ones(2)})
    assert torch.equal(s["w"], pool[1]["w"]) and torch.equal(s["v"], torch.zeros(2))
    kept = fw.target({"w": fw.KEEP}, pool, {"w": torch.tensor([7.0, 7.0])})
    assert torch.equal(kept["w"], torch.tensor([7.0, 7.0]))


def test_update_with_task_arithmetic_is_the_plain_frank_wolfe_step() -> None:
    opts = FwOptions(inner_method="task_arithmetic", inner_parameters={"lambda": 1.0}, inner_model_parameters={})
    theta = {"w": torch.tensor([1.0, -2.0, 0.5])}
    s = {"w": torch.tensor([3.0, 0.0, 0.5])}
    gamma = fw.step_size(1)
    out = fw.inner_merge(opts, theta, [s], gamma, seed=0)
    torch.testing.assert_close(out["w"], theta["w"] + gamma * (s["w"] - theta["w"]))


def test_update_with_ties_trims_the_step_model_wide_like_the_official_code() -> None:
    theta = {"a": torch.zeros(2), "b": torch.zeros(2)}
    s = {"a": torch.tensor([4.0, 3.0]), "b": torch.tensor([2.0, 0.5])}
    gamma = fw.step_size(2)
    # keep 50 % of (s - θ) over the whole model: 4 and 3 survive, b's entries do not; scale 0.9 γ
    opts = FwOptions(inner_model_parameters={"density": 0.5})
    out = fw.inner_merge(opts, theta, [s], gamma, seed=0)
    torch.testing.assert_close(out["a"], 0.9 * gamma * torch.tensor([4.0, 3.0]))
    torch.testing.assert_close(out["b"], torch.zeros(2))
    # per tensor instead: each keeps its own top half
    per = FwOptions(inner_parameters={"lambda": 0.9, "scope": "tensor"}, inner_model_parameters={"density": 0.5})
    out = fw.inner_merge(per, theta, [s], gamma, seed=0)
    torch.testing.assert_close(out["b"], 0.9 * gamma * torch.tensor([2.0, 0.0]))


TARGET = {"model.layers.0.w": torch.tensor([0.5, -0.5, 1.0, 0.0]), "model.layers.1.w": torch.tensor([1.0, 1.0])}


class _Quadratic:
    """loss = Σ |θ − target|², gradient 2 (θ − target)."""

    name = "python:toy"
    tasks = ("toy",)

    def __init__(self) -> None:
        self.gradients = 0

    def evaluate(self, state) -> Scores:
        return Scores.of(-self.loss(state))

    def loss(self, state) -> float:
        return float(sum(((state[k] - v) ** 2).sum() for k, v in TARGET.items()))

    def gradient(self, state):
        self.gradients += 1
        return self.loss(state), {k: 2 * (state[k] - v) for k, v in TARGET.items()}


class _Worker:
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(4)
        base = {k: torch.zeros_like(v) for k, v in TARGET.items()}
        experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in TARGET.items()} for _ in range(3)]
        self.session = MergeSession.from_state_dicts("task_arithmetic", experts, base)
        self.objective = _Quadratic()
        self.where = "test"
        self.spec = SimpleNamespace(objective="python:toy")

    def score(self, state) -> Scores:
        return self.objective.evaluate(state)


def test_a_run_lowers_the_loss_and_replays_its_log(tmp_path) -> None:
    opts = {
        "max_iters": 6,
        "inner_method": "task_arithmetic",
        "inner_parameters": {"lambda": 1.0},
        "inner_model_parameters": {},
    }
    worker = _Worker()
    records: list[dict] = []
    fw.run_in_worker(worker, {"options": opts, "seed": 0, "budget": 10, "out": str(tmp_path)}, records.append)  # type: ignore[arg-type]
    assert [r["key"] for r in records] == [f"fw/{t}" for t in range(6)]
    assert [r["step"] for r in records] == pytest.approx([fw.step_size(t) for t in range(6)])
    losses = [r["loss"] for r in records]
    final = -records[-1]["score"]
    assert final < losses[0]
    assert all(set(r["choices"].values()) <= {0, 1, 2, 3} for r in records)  # 3 experts + the initial merge
    merged = load_file(str(tmp_path / "fw" / "merged.safetensors"))
    assert worker.objective.loss(merged) == pytest.approx(final, rel=1e-5)
    assert json.loads((tmp_path / "fw" / "result.json").read_text())["pool"][-1] == "initial"
    # replay: the logged choices are re-applied, no gradient is computed, the same model comes out
    again = _Worker()
    out: list[dict] = []
    replay = {r["key"]: r for r in records}
    fw.run_in_worker(
        again, {"options": opts, "seed": 0, "budget": 10, "out": str(tmp_path / "r"), "replay": replay}, out.append
    )  # type: ignore[arg-type]
    assert out == [] and again.objective.gradients == 0
    merged2 = load_file(str(tmp_path / "r" / "fw" / "merged.safetensors"))
    for k in merged:
        torch.testing.assert_close(merged2[k], merged[k])
