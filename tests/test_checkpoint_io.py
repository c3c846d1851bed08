"""Checkpoint round trips on tiny real transformers models: readers, writer, tied weights, .bin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import load_dir
from transformers import AutoModelForCausalLM

import mergelab
from mergelab.checkpoint.reader import open_checkpoint
from mergelab.checkpoint.writer import ShardedSafetensorsWriter, parse_size


def test_reader_matches_safetensors_on_sharded_model(family):
    base, _ = family
    assert (base / "model.safetensors.index.json").is_file()
    expected = load_dir(base)
    reader = open_checkpoint(base)
    try:
        assert set(reader.tensors()) == set(expected)
        for name, t in expected.items():
            got = reader.read(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(got, t)
            assert reader.tensors()[name].shape == tuple(t.shape)
    finally:
        reader.close()


def test_reader_reads_bin_weights_only(bin_family):
    base, _ = bin_family
    assert (base / "pytorch_model.bin").is_file()
    sd = torch.load(base / "pytorch_model.bin", weights_only=True)
    reader = open_checkpoint(base)
    try:
        for name, t in sd.items():
            assert torch.equal(reader.read(name), t)
    finally:
        reader.close()


def test_bin_rejects_arbitrary_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.zeros(2), "x": Evil()}, folder / "pytorch_model.bin")
    with pytest.raises(mergelab.MergelabError, match="weights-only"):
        open_checkpoint(folder)


def test_writer_shards_index_and_streaming(tmp_path):
    items = [(f"t{i}", torch.float32, (10, 10)) for i in range(5)] + [("ids", torch.int64, (3,))]
    w = ShardedSafetensorsWriter(tmp_path, items, max_shard_size=900)
    data = {f"t{i}": torch.randn(10, 10) for i in range(5)} | {"ids": torch.tensor([1, 2, 3])}
    for name, _, _ in items:
        w.add(name, data[name])
    w.finish()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == len(w.shards) > 1
    got = load_dir(tmp_path)
    assert set(got) == set(data)
    for k in data:
        assert torch.equal(got[k], data[k])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in data.values())


def test_writer_casts_to_planned_dtype(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path, [("w", torch.bfloat16, (4,))])
    w.add("w", torch.tensor([1.0, 2.0, 3.0, 4.5]))
    w.finish()
    got = load_file(str(tmp_path / "model.safetensors"))["w"]
    assert got.dtype == torch.bfloat16 and torch.equal(got.float(), torch.tensor([1.0, 2.0, 3.0, 4.5]))


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    with pytest.raises(mergelab.MergelabError):
        parse_size("lots")


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():
        return model(ids).logits


def test_merged_checkpoint_loads_with_automodel_and_matches_in_memory(family, tmp_path):
    base, experts = family
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 0.4}} for e in experts],
        "parameters": {"lambda": 1.0},
    }
    out = tmp_path / "merged"
    result = mergelab.merge(recipe, out, max_shard_size="150KB")
    assert result.path == out
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    # same weights loaded another way: merge the loaded modules in memory
    mods = [AutoModelForCausalLM.from_pretrained(str(p)) for p in (base, *experts)]
    sd = mergelab.merge_state_dicts("task_arithmetic", mods[1:], base=mods[0], model_parameters=[{"weight": 0.4}] * 3)
    ref = AutoModelForCausalLM.from_pretrained(str(base))
    ref.load_state_dict(sd)
    ids = torch.arange(0, 20).unsqueeze(0)
    with torch.no_grad():
        expected = ref(ids).logits
    assert torch.allclose(_logits(out, ids), expected, atol=1e-6)
    # and the merge actually moved the weights
    assert not torch.allclose(_logits(base, ids), expected, atol=1e-4)


def test_tied_embeddings_merge_once_and_stay_tied(tied_family, tmp_path):
    base, experts = tied_family
    names = set(load_file(str(base / "model.safetensors")))
    assert "lm_head.weight" not in names  # transformers stores a tied matrix once
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"density": 0.5}} for e in experts],
    }
    out = tmp_path / "merged"
    mergelab.merge(recipe, out)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    stored = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in stored
    assert torch.equal(model.model.embed_tokens.weight, stored["model.embed_tokens.weight"])


def test_tied_modules_in_memory_keep_tie(tied_family):
    base, experts = tied_family
    mods = [AutoModelForCausalLM.from_pretrained(str(p)) for p in (base, *experts)]
    sd = mergelab.merge_state_dicts("task_arithmetic", mods[1:], base=mods[0])
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()


def test_untied_checkpoint_keeps_both_matrices(family, tmp_path):
    _base, experts = family
    out = tmp_path / "m"
    mergelab.merge({"merge_method": "linear", "models": [{"model": str(experts[0])}]}, out)
    stored = load_dir(out)
    assert "lm_head.weight" in stored and "model.embed_tokens.weight" in stored
    assert torch.equal(stored["lm_head.weight"], load_dir(experts[0])["lm_head.weight"])


def test_bin_input_merges_like_safetensors(bin_family, tmp_path):
    base, experts = bin_family
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
    }
    out = tmp_path / "m"
    mergelab.merge(recipe, out)
    b = torch.load(base / "pytorch_model.bin", weights_only=True)
    es = [torch.load(e / "pytorch_model.bin", weights_only=True) for e in experts]
    got = load_dir(out)
    for k, v in got.items():
        want = b[k] + sum(e[k] - b[k] for e in es)
        assert torch.allclose(v, want, atol=1e-6), k


def test_model_card_records_recipe_and_hashes(family, tmp_path):
    base, experts = family
    recipe = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"density": 0.3, "weight": 1.0}} for e in experts],
        "parameters": {"lambda": 0.8},
    }
    out = tmp_path / "m"
    res = mergelab.merge(recipe, out)
    card = (out / "README.md").read_text()
    assert "ties" in card and "arXiv:2306.01708" in card
    assert "lambda: 0.8" in card  # the recipe YAML
    assert str(experts[1]) in card
    for digest in res.stats.hashes.values():
        assert len(digest) == 64 and digest in card
    # the content hash ignores sharding: a resharded copy of the base hashes the same
    copy = tmp_path / "base-one-shard"
    mergelab.merge({"merge_method": "linear", "models": [{"model": str(base)}]}, copy, max_shard_size="10GB")
    res2 = mergelab.merge({"merge_method": "linear", "models": [{"model": str(copy)}]}, tmp_path / "again")
    assert res2.stats.hashes[str(copy)] == res.stats.hashes[str(base)]
    assert (out / "mergelab_recipe.yaml").is_file()


def test_out_dtype_and_config(family, tmp_path):
    base, experts = family
    out = tmp_path / "m"
    mergelab.merge(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(experts[0])}],
            "dtype": "bfloat16",
        },
        out,
    )
    stored = load_dir(out)
    assert all(t.dtype == torch.bfloat16 for t in stored.values())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    AutoModelForCausalLM.from_pretrained(str(out))
