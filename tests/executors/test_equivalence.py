"""Every executor gives bit-identical tensors to the streaming executor, for every data-free method.

Each registered data-free method merges the session's ``family`` checkpoints (a 4-shard base and
three experts) with its typical parameters (the method card's, else the contract tests'),
through the executor protocol into an in-memory sink (and a collecting sink for per-task
parts); every output tensor and every part must equal the streaming executor's bit for bit.
The Ray part shares one local Ray session per module and also checks whole output folders
(checkpoint shards written in place by the workers, the masks artifact, the content hashes).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mergelab
from mergelab.executors.base import ExecutorOptions, get_executor
from mergelab.executors.sinks import MemorySink
from mergelab.ir import MASKS, MODEL
from mergelab.methods import all_methods, get_method
from mergelab.plan import build_plan
from mergelab.recipe import Recipe

try:  # the contract tests' table, until every method card declares `typical`
    from methods.test_contract import TYPICAL_PARAMS
except ImportError:  # pragma: no cover
    TYPICAL_PARAMS = {}

DATA_FREE = [m.name for m in all_methods() if m.statistics is None]

ray_available = importlib.util.find_spec("ray") is not None

EXECUTORS = [
    pytest.param("ray", marks=pytest.mark.skipif(not ray_available, reason="ray is not installed")),
    # ---- memory executor (helper STAGES: mergelab/executors/memory.py) ----------------------
    pytest.param(
        "memory",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("mergelab.executors.memory") is None,
            reason="mergelab.executors.memory not written yet",
        ),
    ),
]


def typical(name: str) -> tuple[dict, dict]:
    card = getattr(get_method(name), "card", None)
    t = getattr(card, "typical", None)
    if t is not None:
        return dict(t[0]), dict(t[1])
    return TYPICAL_PARAMS.get(name, ({}, {}))


def n_experts(name: str) -> int:
    m = get_method(name)
    return min(3, m.max_experts) if m.max_experts is not None else 3


def recipe(family: tuple[Path, list[Path]], name: str, params: tuple[dict, dict] | None = None) -> dict[str, Any]:
    base, experts = family
    gp, mp = params if params is not None else typical(name)
    return {
        "merge_method": name,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": dict(mp)} for e in experts[: n_experts(name)]],
        "parameters": dict(gp),
        "seed": 3,
    }


class Collect:
    def __init__(self) -> None:
        self.items: dict[str, Any] = {}

    def add(self, name: str, value: Any) -> None:
        self.items[name] = value


def run(executor: str, rec: dict[str, Any], **opts: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    plan = build_plan(Recipe.model_validate(rec))
    try:
        model, parts = MemorySink(), Collect()
        get_executor(executor).run(
            plan, {MODEL: model, MASKS: parts}, ExecutorOptions(seed=rec["seed"], hash_inputs=False, **opts)
        )
    finally:
        plan.close()
    return model.tensors, parts.items


def assert_same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (the executor leaves a running Ray alone)."""
    if not ray_available:
        yield None
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def streaming(family):
    """The streaming executor's outputs per method (computed once per module)."""
    cache: dict[str, tuple[dict, dict]] = {}

    def get(name: str) -> tuple[dict, dict]:
        if name not in cache:
            cache[name] = run("streaming", recipe(family, name))
        return cache[name]

    return get


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("name", DATA_FREE)
def test_executor_matches_streaming(executor, name, family, streaming, ray_session):
    want_model, want_parts = streaming(name)
    got_model, got_parts = run(executor, recipe(family, name), workers=2)
    assert_same(want_model, got_model, f"{name} model")
    assert_same(want_parts, got_parts, f"{name} parts")
    if get_method(name).outputs == "routed":
        assert want_parts, "a routed method hands per-task parts to the masks sink"


def _folder_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.relative_to(path)}:{k}"] = v
    return out


@pytest.mark.skipif(not ray_available, reason="ray is not installed")
@pytest.mark.parametrize(
    "name, params",
    [
        ("ties", ({"scope": "global"}, {"density": 0.3})),  # folds over 2 workers, combined on the driver
        ("tall_masks", None),  # the masks artifact
    ],
)
def test_ray_output_folder_matches_streaming(name, params, family, tmp_path, ray_session):
    rec = recipe(family, name, params)
    a = mergelab.merge(rec, tmp_path / "streaming", max_shard_size="150KB")
    b = mergelab.merge(rec, tmp_path / "ray", max_shard_size="150KB", executor="ray", workers=2)
    files_a = sorted(p.relative_to(a.path).as_posix() for p in a.path.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b.path).as_posix() for p in b.path.rglob("*") if p.is_file())
    assert files_a == files_b
    assert sum(f.endswith(".safetensors") and "/" not in f for f in files_a) > 1, "the output has several shards"
    ta, tb = _folder_tensors(a.path), _folder_tensors(b.path)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert (a.path / "model.safetensors.index.json").read_text() == (
        b.path / "model.safetensors.index.json"
    ).read_text()
    assert a.stats.hashes == b.stats.hashes and a.stats.hashes
    assert a.stats.tensors == b.stats.tensors and a.stats.passes == b.stats.passes
    if name == "tall_masks":
        assert (b.path / "routed" / "manifest.json").is_file()
    # the executor left the module's Ray session running (it did not start it)
    assert ray_session.is_initialized()


@pytest.mark.skipif(not ray_available, reason="ray is not installed")
def test_ray_matches_streaming_for_a_data_informed_method_with_a_fold(family, ray_session):
    """Fisher with normalize: statistics readers reopened from specs, the global-norm fold combined."""
    from mergelab.checkpoint.reader import StateDictReader

    rec = recipe(family, "fisher", ({"normalize": True}, {}))
    outs = []
    for executor in ("streaming", "ray"):
        plan = build_plan(Recipe.model_validate(rec))
        try:
            stats = []
            for i in range(len(plan.experts)):
                g = torch.Generator().manual_seed(100 + i)
                stats.append(
                    StateDictReader(
                        {f"{j.name}::fisher": torch.rand(j.shape, generator=g) + 0.01 for j in plan.merge_jobs},
                        f"<statistics {i}>",
                    )
                )
            plan.attach_aux(stats)
            assert plan.graph.folds and all(f.combine is not None for f in plan.graph.folds)
            sink = MemorySink()
            get_executor(executor).run(plan, {MODEL: sink}, ExecutorOptions(seed=3, hash_inputs=False, workers=2))
            outs.append(sink.tensors)
        finally:
            plan.close()
    assert_same(outs[0], outs[1], "fisher")


@pytest.mark.skipif(not ray_available, reason="ray is not installed")
def test_ray_reports_a_worker_failure_as_the_original_error(ray_session):
    """A NaN found by a worker surfaces as the same one-line error as in the streaming executor."""
    from mergelab.checkpoint.reader import StateDictReader
    from mergelab.errors import InputDataError

    base = {f"model.layers.{i}.w": torch.zeros(4, 4) for i in range(4)}
    bad = {k: v + 1 for k, v in base.items()}
    bad["model.layers.3.w"][0, 0] = float("nan")
    rec = Recipe.model_validate({"merge_method": "task_arithmetic", "base_model": "b", "models": [{"model": "e"}]})
    for executor in ("streaming", "ray"):
        plan = build_plan(rec, readers={"b": StateDictReader(base, "b"), "e": StateDictReader(bad, "e")})
        try:
            with pytest.raises(InputDataError, match=r"model.layers.3.w.*NaN"):
                get_executor(executor).run(plan, {MODEL: MemorySink()}, ExecutorOptions(workers=2))
        finally:
            plan.close()


@pytest.mark.skipif(not ray_available, reason="ray is not installed")
def test_ray_refuses_more_workers_than_the_session_has_cpus(family, ray_session):
    from mergelab.errors import MergelabError

    plan = build_plan(Recipe.model_validate(recipe(family, "linear")))
    try:
        with pytest.raises(MergelabError, match="--workers 3: the Ray cluster has 2 CPUs"):
            get_executor("ray").run(plan, {MODEL: MemorySink()}, ExecutorOptions(workers=3))
    finally:
        plan.close()
    assert ray_session.is_initialized()
