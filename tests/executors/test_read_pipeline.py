"""Pipelined reads (``ExecutorOptions.read_workers``): same tensors, hashes and errors as one read at a time.

Part sizes are shrunk (``READ_PART_BYTES``) so that the tiny checkpoints' tensors are split into
many range reads, as an embedding of a real model is.
"""

from __future__ import annotations

import os
import shutil
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.checkpoint import reader as reader_module
from mergelab.checkpoint.reader import SafetensorsReader, open_checkpoint
from mergelab.errors import CheckpointError, InputDataError, OptionError
from mergelab.executors import streaming
from mergelab.executors.base import ExecutorOptions, RunStats, get_executor
from mergelab.executors.sinks import MemorySink
from mergelab.ir import MODEL
from mergelab.plan import build_plan
from mergelab.recipe import Recipe
from mergelab.synthetic import make_family

SMALL_PART = 1000  # bytes: every tensor of the tiny models but the norms is read in several parts


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A bf16 base (3 shards) and 3 experts: inputs are converted to float32 on the reader thread."""
    return make_family(tmp_path_factory.mktemp("bf16"), dtype=torch.bfloat16, max_shard_size="60KB")


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "READ_PART_BYTES", SMALL_PART)


def _recipe(family: tuple[Path, list[Path]], method: str, experts: list[Path] | None = None) -> Recipe:
    base, default = family
    params = {"weight": 0.5, "density": 0.5} if method == "ties" else {"weight": 0.5}
    return Recipe.model_validate(
        {
            "merge_method": method,
            "base_model": str(base),
            "models": [{"model": str(e), "parameters": params} for e in (experts or default)],
            "seed": 1,
        }
    )


def _run(rec: Recipe, **opts: Any) -> tuple[dict[str, torch.Tensor], RunStats]:
    plan = build_plan(rec)
    try:
        sink = MemorySink()
        stats = get_executor("streaming").run(plan, {MODEL: sink}, ExecutorOptions(seed=1, **opts))
    finally:
        plan.close()
    return sink.tensors, stats


@pytest.mark.usefixtures("small_parts")
@pytest.mark.parametrize("which, method", [("fp32", "task_arithmetic"), ("bf16", "task_arithmetic"), ("bf16", "ties")])
def test_outputs_and_hashes_are_the_same_with_1_and_4_read_workers(which, method, family, bf16_family):
    rec = _recipe(family if which == "fp32" else bf16_family, method)
    want, want_stats = _run(rec, read_workers=1)
    assert want_stats.hashes and len(want_stats.hashes) == 4
    for opts in ({"read_workers": 4}, {"read_workers": 3, "prefetch": False}):
        got, stats = _run(rec, **opts)
        assert got.keys() == want.keys()
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), (opts, name)
        assert stats.hashes == want_stats.hashes, opts
        assert stats.bytes_read == want_stats.bytes_read and stats.tensors == want_stats.tensors


def test_a_range_split_read_equals_the_plain_read(bf16_family):
    reader = open_checkpoint(bf16_family[1][0])
    assert isinstance(reader, SafetensorsReader)
    with ThreadPoolExecutor(4) as pool:
        try:
            for name, meta in reader.tensors().items():
                plain = reader.read(name)
                nbytes = meta.numel * plain.element_size()
                for part in (1 if nbytes <= 256 else 3, 512, nbytes - 1, nbytes, 10 * nbytes + 1):
                    if part < 1:
                        continue
                    t, reads = reader.read_parts(name, part)
                    assert len(reads) == -(-nbytes // part)
                    list(pool.map(lambda read: read(), reversed(reads)))  # any order, several threads
                    assert t.dtype == plain.dtype and t.shape == plain.shape and torch.equal(t, plain), (name, part)
        finally:
            reader.close()


def test_a_nan_input_gives_the_same_error_with_pipelined_reads(family, tmp_path, small_parts):
    experts = family[1]
    bad = shutil.copytree(experts[1], tmp_path / "bad")
    name = "model.layers.1.mlp.down_proj.weight"
    for f in bad.glob("*.safetensors"):
        sd = load_file(str(f))
        if name in sd:
            sd[name][0, 0] = float("nan")
            save_file(sd, str(f), metadata={"format": "pt"})
    rec = _recipe(family, "task_arithmetic", [experts[0], bad, experts[2]])
    messages = {}
    for k in (1, 4):
        with pytest.raises(InputDataError) as info:
            _run(rec, read_workers=k)
        messages[k] = str(info.value)
    assert messages[1] == messages[4]
    assert "\n" not in messages[4] and name in messages[4] and "NaN or Inf" in messages[4] and str(bad) in messages[4]


def test_a_file_cut_short_during_the_merge_gives_the_same_error_with_pipelined_reads(family, tmp_path, small_parts):
    """The header was checked at open; the file shrinks before its tensors are read."""
    experts = family[1]
    messages = {}
    for k in (1, 4):
        bad = shutil.copytree(experts[0], tmp_path / f"bad{k}")
        shard = sorted(bad.glob("*.safetensors"))[-1]
        plan = build_plan(_recipe(family, "task_arithmetic", [bad, *experts[1:]]))
        try:
            os.truncate(shard, shard.stat().st_size // 2)
            with pytest.raises(CheckpointError) as info:
                get_executor("streaming").run(plan, {MODEL: MemorySink()}, ExecutorOptions(read_workers=k))
            messages[k] = str(info.value)
        finally:
            plan.close()
    assert messages[1] == messages[4].replace("bad4", "bad1")
    assert "\n" not in messages[4] and "truncated" in messages[4] and shard.name in messages[4]


def test_read_buffers_in_flight_are_bounded_by_two_jobs(family, monkeypatch, small_parts):
    """Reads of one job are all in flight at once, and no more than the job in compute and the job read."""
    live: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
    most = 0
    plain = reader_module.tensor_reads

    def counted(*args: Any) -> tuple[torch.Tensor, list[Callable[[], None]]]:
        nonlocal most
        t, reads = plain(*args)
        live.add(t)
        most = max(most, len(live))
        return t, reads

    monkeypatch.setattr(reader_module, "tensor_reads", counted)
    n_inputs = 1 + len(family[1])
    _run(_recipe(family, "task_arithmetic"), read_workers=4, hash_inputs=False)
    assert n_inputs <= most <= 2 * n_inputs


@pytest.mark.parametrize("bad, match", [(0, "--read-workers 0: give at least 1"), ("4", "read_workers: expected")])
def test_read_workers_must_be_a_whole_number_of_at_least_one(bad, match, family):
    with pytest.raises(OptionError, match=match):
        _run(_recipe(family, "task_arithmetic"), read_workers=bad)
