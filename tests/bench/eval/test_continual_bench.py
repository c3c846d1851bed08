"""The continual-merging benchmark (``benchmarks/continual_bench.py``, :mod:`mergelab_bench.eval.continual`):
the read-outs of the step × task matrix by hand, and the script end to end on tiny zoos of both suites
(the protocol, reuse of saved runs, and ``--memory`` on a tiny input set)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tiny_models import load_benchmark

from mergelab_bench.eval import continual as C
from mergelab_bench.zoo.build import Zoo

nan = math.nan


def test_readouts_of_a_matrix_built_by_hand() -> None:
    tasks = ["a", "b", "c"]
    order = ["b", "c", "a"]  # b at step 0, c at step 1, a at step 2
    m = np.array(
        [
            [nan, 0.90, nan],  # after +b: only b seen
            [nan, 0.80, 0.95],  # after +c
            [0.70, 0.60, 0.85],  # after +a
        ]
    )
    assert C.seen_averages(m, order, tasks) == pytest.approx([0.90, (0.80 + 0.95) / 2, (0.70 + 0.60 + 0.85) / 3])
    f = C.forgetting(m, order, tasks)
    assert np.isnan(f[0]).all()  # nothing added before step 0
    assert np.isnan(f[1, 0]) and f[1, 1] == pytest.approx(0.10) and np.isnan(f[1, 2])  # b: 0.90 -> 0.80
    assert np.isnan(f[2, 0]) and f[2, 1] == pytest.approx(0.30) and f[2, 2] == pytest.approx(0.10)
    # BWT over the tasks added before the last step (b, c): ((0.60 - 0.90) + (0.85 - 0.95)) / 2
    assert C.backward_transfer(m, order, tasks) == pytest.approx(-0.20)
    # every task scored at every step (--all-tasks): the unseen scores do not enter the read-outs
    full = np.where(np.isnan(m), 0.5, m)
    assert C.seen_averages(full, order, tasks) == pytest.approx(C.seen_averages(m, order, tasks))
    assert C.backward_transfer(full, order, tasks) == pytest.approx(-0.20)
    assert C.backward_transfer(m[:1], order[:1], tasks) != C.backward_transfer(m[:1], order[:1], tasks)  # nan


def test_task_orders() -> None:
    tasks = [f"t{i}" for i in range(8)]
    orders = C.task_orders(tasks, 3, seed=0)
    assert orders[0] == tasks and len({tuple(o) for o in orders}) == 3
    assert all(sorted(o) == sorted(tasks) for o in orders)
    assert C.task_orders(tasks, 3, seed=0) == orders and C.task_orders(tasks, 3, seed=1) != orders
    assert C.task_orders(["x", "y"], 3, seed=0)[:2] in (
        [["x", "y"], ["y", "x"]],
        [["x", "y"], ["x", "y"]],
    )  # only two permutations: a repeat is allowed


def test_script_on_the_tiny_classification_zoo(tiny_zoo: Zoo, tmp_path: Path, capsys, monkeypatch) -> None:
    script = load_benchmark("continual_bench")
    out = tmp_path / "out"
    args = ["--suite", "classification", "--zoo", str(tiny_zoo.root), "--out", str(out), "--orders", "2"]
    args += ["--methods", "opcm,average", "--param", "opcm:alpha=0.6", "--offline", "task_arithmetic,ties"]
    args += ["--offline-param", "ties:lambda=1.0", "--offline-param", "ties:density=0.3", "--bootstrap", "30"]
    args += ["--threads", "1", "--validation-limit", "10"]
    assert script.main(args) == 0
    data = json.loads((out / "continual.json").read_text())
    assert data["format"] == C.FORMAT and data["orders"] == [["alpha", "beta"], ["beta", "alpha"]]
    assert [(r["method"], r["order_index"]) for r in data["runs"]] == [
        ("opcm", 0), ("opcm", 1), ("average", 0), ("average", 1),
    ]  # fmt: skip
    for run in data["runs"]:
        m = run["matrix"]
        assert len(m) == 2 and all(len(row) == 2 for row in m)  # step x task
        first = tiny_zoo.tasks.index(run["order"][0])
        assert m[0][1 - first] is None and m[0][first] is not None  # only the seen task scored after step 1
        assert all(v is not None for v in m[1])
        assert run["bwt"] == pytest.approx(m[1][first] - m[0][first])
        assert run["final_average"] == pytest.approx(sum(m[1]) / 2)
        assert len(run["steps"]) == 2 and run["steps"][0]["expected_peak_bytes"] > 0
    assert data["runs"][0]["params"]["alpha"] == 0.6
    s = data["summary"]["opcm"]
    assert s["orders"] == 2 and s["interval"]["low"] <= s["interval"]["high"]
    assert s["final_average"]["mean"] == pytest.approx(np.mean([r["final_average"] for r in data["runs"][:2]]))
    offline = {r["method"]: r for r in data["offline"]}
    assert offline["ties"]["chosen"] == {"parameters": {"lambda": 1.0}, "model_parameters": {"density": 0.3}}
    assert len(offline["ties"]["grid"]) == 1 and offline["ties"]["stats"]["average_normalized"]["low"] is not None
    assert len(offline["task_arithmetic"]["grid"]) >= 10  # the bench's grid, searched on validation
    text = (out / "continual.md").read_text()
    assert "## Final step" in text and "| opcm | continual | alpha=0.6" in text and "offline (all at once)" in text
    for name in ("heatmap_opcm.png", "heatmap_average.png", "curves.png"):
        assert (out / name).stat().st_size > 0
    assert not (out / "continual.partial.json").exists()
    assert "opcm, order 1" in capsys.readouterr().out

    def no_run(*a, **k):
        raise AssertionError("a saved run was measured again")

    monkeypatch.setattr(C, "run_order", no_run)
    assert script.main(args) == 0  # same settings: every run is reused
    assert "reused" in capsys.readouterr().out
    assert json.loads((out / "continual.json").read_text())["runs"] == data["runs"]


def test_script_on_the_tiny_lm_zoo_scores_every_task(tiny_lm_zoo4, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--suite", "lm", "--zoo", str(tiny_lm_zoo4.root), "--out", str(out), "--orders", "1"]
    args += ["--methods", "ties", "--offline", "none", "--all-tasks", "--bootstrap", "20", "--threads", "1"]
    assert load_benchmark("continual_bench").main(args) == 0
    data = json.loads((out / "continual.json").read_text())
    (run,) = data["runs"]
    assert run["order"] == tiny_lm_zoo4.tasks and len(run["matrix"]) == 4
    ppl = [j for j, t in enumerate(tiny_lm_zoo4.tasks) if data["metrics"][t] == "perplexity"]
    assert all(run["matrix"][t][j] is not None for t in range(4) for j in ppl)  # every task at every step
    assert data["offline"] == [] and data["test_limit"] == 8
    assert (out / "heatmap_ties.png").is_file() and (out / "curves.png").is_file()


def test_memory_mode_measures_each_add_in_a_child(tmp_path: Path) -> None:
    from mergelab.synthetic import make_base, make_expert

    inputs = tmp_path / "inputs"
    base = make_base(inputs / "base", hidden=32, layers=1, intermediate=64, vocab=64)
    for i in range(2):
        make_expert(base, inputs / f"ft{i}", seed=i + 1, scale=0.01)
    out = tmp_path / "out"
    args = ["--memory", "--memory-inputs", str(inputs), "--memory-methods", "average", "--memory-adds", "2"]
    args += ["--memory-highlight", "1,2", "--workdir", str(tmp_path / "work"), "--out", str(out), "--threads", "1"]
    assert load_benchmark("continual_bench").main(args) == 0
    memory = json.loads((out / "continual.json").read_text())["memory"]
    records = memory["records"]
    assert [(r["method"], r["add"], r["exit_code"]) for r in records] == [("average", 1, 0), ("average", 2, 0)]
    for r in records:
        assert r["peak_rss_bytes"] > 10**7 and r["seconds"] > 0 and r["expected_peak_bytes"] > 0
        assert "tensor-sized float32 buffers" in r["expected_peak_line"] and r["state_bytes"] > 0
    assert "| average | **2** |" in (out / "continual.md").read_text()
    assert not (tmp_path / "work" / "continual-memory" / "average" / "state").exists()
