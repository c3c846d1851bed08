"""The job graph the planner builds, the executor protocol, reader specs and thread hygiene."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

import mergelab
from mergelab.checkpoint.reader import SafetensorsSpec, StateDictReader, StateDictSpec, TorchBinSpec, open_checkpoint
from mergelab.errors import MergelabError
from mergelab.executors.base import ExecutorOptions, get_executor, thread_limit
from mergelab.executors.sinks import MemorySink
from mergelab.ir import MASKS, MODEL, Artifact, Copy, Graph, Init, Job, MethodCall, NameMap, OutRef, TensorRef
from mergelab.plan import build_plan
from mergelab.recipe import Recipe


def _recipe(family, method="task_arithmetic", **params):
    base, experts = family
    return Recipe.model_validate(
        {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(e)} for e in experts[:2]],
            "parameters": params,
        }
    )


def test_planner_builds_a_graph_of_named_inputs_and_outputs(family):
    plan = build_plan(_recipe(family))
    try:
        g = plan.graph
        assert isinstance(g, Graph)
        assert list(g.sources) == ["base", "expert0", "expert1"] and g.base == "base" and g.reference == "base"
        assert g.artifacts == {MODEL: Artifact(MODEL, "hf_checkpoint")}
        job = plan.merge_jobs[0]
        assert isinstance(job.op, MethodCall) and job.op.base
        assert job.inputs == tuple(TensorRef(s, job.name) for s in ("base", "expert0", "expert1"))
        assert job.outputs == (OutRef(MODEL, job.name, job.shape, job.out_dtype),)
        # the Plan facade: readers in recipe roles, per-tensor attributes on each job
        assert plan.base is g.sources["base"] and plan.experts == [g.sources["expert0"], g.sources["expert1"]]
        assert plan.readers_for(job) == [plan.base, *plan.experts]
        assert job.kind == "merge" and job.params is not None and len(job.model_params) == 2
        assert plan.output_bytes() == sum(j.out_nbytes for j in plan.jobs)
    finally:
        plan.close()


def test_a_routed_method_writes_a_second_artifact(family):
    plan = build_plan(_recipe(family, "tall_masks"))
    try:
        assert plan.graph.artifacts[MASKS].kind == "masks"
        assert all(len(j.outputs) == 2 and j.outputs[1].artifact == MASKS for j in plan.merge_jobs)
    finally:
        plan.close()


def test_identical_readers_share_one_source():
    sd = {"w": torch.ones(3)}
    reader = StateDictReader(sd, "<m>")
    rec = Recipe.model_validate({"merge_method": "linear", "models": [{"model": "a"}, {"model": "a"}]})
    plan = build_plan(rec, readers={"a": reader})
    assert list(plan.graph.sources) == ["expert0"] and plan.graph.experts == ("expert0", "expert0")
    assert plan.inputs == [reader]


def test_name_map_is_data():
    m = NameMap({"expert0": {"model.layers.0.mlp.experts.1.w": "model.layers.0.mlp.w"}})
    assert m.ref("expert0", "model.layers.0.mlp.experts.1.w") == TensorRef("expert0", "model.layers.0.mlp.w")
    assert m.ref("base", "x") == TensorRef("base", "x")


def test_copy_and_init_jobs_run_in_the_streaming_executor():
    """A graph with a tensor no input has (zeros, seeded noise, a given value) and a copied one."""
    reader = StateDictReader({"ids": torch.arange(4)}, "<in>")
    from mergelab.methods import get_method

    method = get_method("linear")
    jobs = [
        Job((TensorRef("in", "ids"),), Copy(), (OutRef(MODEL, "ids", (4,), torch.int64),)),
        Job((), Init("zeros"), (OutRef(MODEL, "router.zero", (2, 3), torch.float32),)),
        Job((), Init("random", std=0.5), (OutRef(MODEL, "router.w", (2, 3), torch.bfloat16),)),
        Job((), Init("given", value=torch.full((2,), 7.0)), (OutRef(MODEL, "router.b", (2,), torch.float32),)),
    ]
    g = Graph(
        sources={"in": reader},
        artifacts={MODEL: Artifact(MODEL, "hf_checkpoint")},
        jobs=jobs,
        method=method,
        global_params=method.params(),
        base=None,
        experts=("in",),
        reference="in",
    )
    outs = []
    for _ in range(2):
        sink = MemorySink()
        get_executor("streaming").run(g, {MODEL: sink}, ExecutorOptions(seed=5, hash_inputs=False))
        outs.append(sink.tensors)
    a, b = outs
    assert torch.equal(a["ids"], torch.arange(4))
    assert torch.equal(a["router.zero"], torch.zeros(2, 3))
    assert a["router.w"].dtype == torch.bfloat16 and torch.equal(a["router.w"], b["router.w"])  # seeded per name
    assert a["router.w"].abs().sum() > 0
    assert torch.equal(a["router.b"], torch.full((2,), 7.0))


def test_unknown_executor_is_a_clear_error():
    with pytest.raises(MergelabError, match=r"unknown executor 'nosuch'.*streaming"):
        get_executor("nosuch")


def test_thread_count_is_restored_after_a_run(family, tmp_path):
    before = torch.get_num_threads()
    with thread_limit(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    base, experts = family
    mergelab.merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(e)} for e in experts[:2]],
        },
        tmp_path / "out",
        threads=1,
    )
    assert torch.get_num_threads() == before


def test_reader_specs_are_small_picklable_and_reopen_the_same_tensors(family, bin_family):
    base, _ = family
    bin_base, _ = bin_family
    for ref, kind in ((base, SafetensorsSpec), (bin_base, TorchBinSpec)):
        r = open_checkpoint(ref)
        try:
            spec = r.spec()
            assert isinstance(spec, kind)
            blob = pickle.dumps(spec)
            assert len(blob) < 4096  # paths, not tensors
            r2 = pickle.loads(blob).open()
            assert r2.label == r.label and r2.folder == r.folder and dict(r2.tensors()) == dict(r.tensors())
            name = next(iter(r.tensors()))
            assert torch.equal(r.read(name), r2.read(name))
            r2.close()
        finally:
            r.close()


def test_state_dict_spec_carries_the_tensors_by_value_and_keeps_ties():
    w = torch.randn(4, 3)
    r = StateDictReader({"embed_tokens.weight": w, "lm_head.weight": w, "b": torch.ones(2)}, "<sd>")
    spec = r.spec()
    assert isinstance(spec, StateDictSpec)
    r2 = pickle.loads(pickle.dumps(spec)).open()
    assert r2.aliases() == r.aliases() == {"lm_head.weight": "embed_tokens.weight"}
    assert torch.equal(r2.read("embed_tokens.weight"), w)


def test_ray_partition_is_contiguous_and_balanced():
    from mergelab.executors.ray import partition

    parts = partition([1, 1, 1, 1, 10, 1, 1, 1], 2)
    assert [i for r in parts for i in r] == list(range(8)) and len(parts) == 2
    assert partition([5], 4) == [range(0, 1)]
    assert partition([], 3) == []
    assert len(partition([1] * 10, 3)) == 3


def test_a_local_ray_runs_its_workers_at_the_callers_priority_on_loopback(monkeypatch):
    """Both local Ray starts (executor and search) set the flags before Ray reads them; a value
    the user exported is kept. Ray's own default is nice 15 for workers (measured: a search trial
    got 4 % of a core beside two busy single-threaded jobs)."""
    pytest.importorskip("ray")
    from mergelab.executors.ray import _import_ray
    from mergelab.search.backends import import_ray

    nice = "RAY_worker_niceness"  # Ray's flag names are case-sensitive
    for start in (_import_ray, import_ray):
        monkeypatch.delenv(nice, raising=False)
        monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)
        start(True)
        assert os.environ[nice] == "0" and os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    monkeypatch.setenv(nice, "5")
    import_ray(True)
    assert os.environ[nice] == "5"


def test_core_import_does_not_need_ray():
    import subprocess
    import sys

    code = "import sys, mergelab, mergelab.api, mergelab.executors; assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_an_unknown_executor_fails_before_any_input_is_opened(tmp_path: Path):
    """The executor is checked first: the missing input is not even reported."""
    with pytest.raises(MergelabError, match="unknown executor"):
        mergelab.merge(
            {"merge_method": "linear", "models": [{"model": str(tmp_path / "nope")}]},
            tmp_path / "out",
            executor="nosuch",
        )
    assert not (tmp_path / "out").exists()


def test_ray_merge_ranges_follow_output_shards(family, tmp_path):
    """With as many shards as workers, every shard file is written by exactly one worker."""
    from mergelab.checkpoint.writer import ShardedSafetensorsWriter
    from mergelab.executors.ray import _merge_ranges

    plan = build_plan(_recipe(family))
    try:
        g = plan.graph
        writer = ShardedSafetensorsWriter(tmp_path, [(j.name, j.out_dtype, j.shape) for j in g.jobs], 150_000)
        assert len(writer.shards) >= 2
        ranges = _merge_ranges(g, {MODEL: writer}, 2)
        assert [i for r in ranges for i in r] == list(range(len(g.jobs))) and len(ranges) == 2
        shard_of = {n: k for k, s in enumerate(writer.shards) for n in s.names}
        owners = [{shard_of[g.jobs[i].name] for i in r} for r in ranges]
        assert not owners[0] & owners[1]
        writer.abort()
    finally:
        plan.close()
