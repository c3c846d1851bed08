"""PEFT LoRA adapters as merge inputs: the materialised weights are PEFT's own merge_and_unload().

Every adapter here is made by peft itself (``get_peft_model`` + ``save_pretrained``) on a tiny
random transformers model, with all of its trainable tensors randomised, and the expectation is
peft's ``PeftModel.from_pretrained(base, adapter).merge_and_unload()`` state dict.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
from lora_helpers import make_adapter, merged_state

from mergelab.checkpoint.reader import open_checkpoint
from mergelab.lora.config import AdapterConfig, pattern_key
from mergelab.lora.factors import LoraFactors
from mergelab.lora.reader import AdapterReader

pytest.importorskip("peft")

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

LLAMA_CASES = {
    "plain": {"target_modules": LLAMA_ALL},
    "rslora": {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_rslora": True, "r": 6, "lora_alpha": 5},
    "patterns": {
        "target_modules": LLAMA_ALL,
        "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
        "alpha_pattern": {"v_proj": 3, "up_proj": 20},
    },
    "rslora_patterns": {
        "target_modules": ["q_proj", "o_proj"],
        "use_rslora": True,
        "rank_pattern": {"o_proj": 3},
        "alpha_pattern": {"q_proj": 7},
    },
    "modules_to_save_and_embedding": {"target_modules": ["embed_tokens", "q_proj"], "modules_to_save": ["lm_head"]},
    "dora": {"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": True},
    "lora_bias": {"target_modules": ["q_proj", "k_proj"], "lora_bias": True},
    "bin": {"target_modules": ["q_proj", "up_proj"], "_safe": False},
}

GPT2_CASES = {
    "fan_in_fan_out": {"target_modules": ["c_attn", "c_proj", "c_fc"], "fan_in_fan_out": True},
    # peft corrects the flag per Conv1D layer (warning): the square attn.c_proj must still be transposed
    "fan_in_fan_out_unset": {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": False},
    "dora_conv1d": {"target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True, "use_dora": True},
    "embedding_and_head": {"target_modules": ["wte", "c_fc"], "fan_in_fan_out": True, "rank_pattern": {"wte": 5}},
}


def _check_equal(base: Path, adapter: Path) -> AdapterReader:
    reader = open_checkpoint(adapter, base=open_checkpoint(base))
    assert isinstance(reader, AdapterReader)
    want = merged_state(base, adapter)
    base_reader = open_checkpoint(base)
    changed = 0
    for name, meta in reader.tensors().items():
        got = reader.read(name)
        assert tuple(got.shape) == meta.shape
        torch.testing.assert_close(got.to(want[name].dtype), want[name], atol=1e-6, rtol=0, msg=name)
        changed += not torch.equal(got.to(meta.dtype), base_reader.read(name))
    assert changed >= 2, "the adapter changed nothing: the test would prove nothing"
    return reader


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_adapter_equals_merge_and_unload(case, llama, tmp_path):
    kw = dict(LLAMA_CASES[case])
    safe = kw.pop("_safe", True)
    adapter = make_adapter(llama, tmp_path / case, safe=safe, **kw)
    assert (adapter / ("adapter_model.safetensors" if safe else "adapter_model.bin")).is_file()
    reader = _check_equal(llama, adapter)
    if case == "modules_to_save_and_embedding":
        assert "lm_head.weight" in reader.replaced() and "model.embed_tokens.weight" in reader.lora_targets()
    if case == "lora_bias":
        assert reader.bias_update("model.layers.0.self_attn.q_proj.bias") is not None


@pytest.mark.parametrize("case", list(GPT2_CASES))
def test_gpt2_adapter_equals_merge_and_unload(case, gpt2, tmp_path):
    adapter = make_adapter(gpt2, tmp_path / case, **GPT2_CASES[case])
    reader = _check_equal(gpt2, adapter)
    if case != "dora_conv1d":
        f = reader.factors(
            "transformer.h.0.attn.c_proj.weight"
            if "c_proj" in str(GPT2_CASES[case])
            else "transformer.h.0.mlp.c_fc.weight"
        )
        assert f is not None and f.transposed  # Conv1D stores in × out


def test_factors_reconstruct_the_update_and_carry_the_scaling(llama, tmp_path):
    adapter = make_adapter(llama, tmp_path / "a", **LLAMA_CASES["patterns"])
    reader = open_checkpoint(adapter, base=open_checkpoint(llama))
    assert isinstance(reader, AdapterReader)
    base = open_checkpoint(llama)
    f = reader.factors("model.layers.0.self_attn.v_proj.weight")
    assert isinstance(f, LoraFactors) and f.rank == 4 and f.scaling == pytest.approx(3 / 4) and not f.transposed
    assert reader.factors("model.layers.0.self_attn.q_proj.weight").rank == 2  # type: ignore[union-attr]
    assert reader.factors("model.layers.1.mlp.down_proj.weight").rank == 6  # type: ignore[union-attr]
    assert reader.factors("model.layers.0.mlp.down_proj.weight").rank == 4  # type: ignore[union-attr]
    assert reader.factors("model.norm.weight") is None
    name = "model.layers.1.mlp.up_proj.weight"
    g = reader.factors(name)
    assert g is not None and g.scaling == pytest.approx(20 / 4)
    torch.testing.assert_close(reader.read(name), base.read(name) + g.stored_delta(), atol=0, rtol=0)


def test_dora_factors_are_refused_but_materialised(llama, tmp_path):
    from mergelab.errors import CheckpointError

    adapter = make_adapter(llama, tmp_path / "d", target_modules=["q_proj"], use_dora=True)
    reader = open_checkpoint(adapter, base=open_checkpoint(llama))
    assert isinstance(reader, AdapterReader) and reader.is_dora("model.layers.0.self_attn.q_proj.weight")
    with pytest.raises(CheckpointError, match=r"DoRA module 'model\.layers\.0\.self_attn\.q_proj' is not a low-rank"):
        reader.factors("model.layers.0.self_attn.q_proj.weight")


def test_bf16_base_keeps_a_small_update(tmp_path):
    """A bf16 base: tensors() reports bf16 (the output dtype), read() gives W0 + ΔW in float32."""
    from lora_helpers import llama_base

    base = llama_base(tmp_path / "bf16", dtype=torch.bfloat16)
    adapter = make_adapter(base, tmp_path / "a", target_modules=["q_proj"])
    reader = open_checkpoint(adapter, base=open_checkpoint(base))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert reader.tensors()[name].dtype == torch.bfloat16
    got = reader.read(name)
    assert got.dtype == torch.float32
    f = reader.factors(name)  # type: ignore[attr-defined]
    w0 = open_checkpoint(base).read(name).float()
    torch.testing.assert_close(got, w0 + f.stored_delta(), atol=0, rtol=0)
    tiny = f.stored_delta() * 1e-3  # far below bf16's resolution at |W0|: lost if added in bf16
    assert not torch.equal((w0.bfloat16() + tiny.bfloat16()).float(), w0 + tiny)


def test_spec_reopens_the_adapter_by_pickling(llama, tmp_path):
    adapter = make_adapter(llama, tmp_path / "a", target_modules=["q_proj"])
    reader = open_checkpoint(adapter, base=open_checkpoint(llama))
    again = pickle.loads(pickle.dumps(reader.spec())).open()
    name = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(again.read(name), reader.read(name)) and again.label == reader.label
    again.close()


def test_base_plus_adapter_string_and_adapter_file(llama, tmp_path):
    adapter = make_adapter(llama, tmp_path / "a", target_modules=["v_proj"])
    name = "model.layers.0.self_attn.v_proj.weight"
    want = merged_state(llama, adapter)[name]
    for ref, base in ((f"{llama}+{adapter}", None), (adapter / "adapter_model.safetensors", open_checkpoint(llama))):
        r = open_checkpoint(ref, base=base)
        torch.testing.assert_close(r.read(name), want, atol=1e-6, rtol=0)
        r.close()


def test_hub_adapter_id_is_resolved_like_other_hub_ids(llama, tmp_path, monkeypatch):
    import mergelab.checkpoint.reader as ckpt

    adapter = make_adapter(llama, tmp_path / "cache" / "models--me--my-lora", target_modules=["q_proj"])
    monkeypatch.setattr(ckpt, "resolve_hub", lambda repo, revision=None: adapter if repo == "me/my-lora" else 1 / 0)
    r = open_checkpoint("me/my-lora", base=open_checkpoint(llama))
    assert isinstance(r, AdapterReader) and r.label == "me/my-lora"
    name = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(r.read(name), merged_state(llama, adapter)[name], atol=1e-6, rtol=0)


# --- the config: PEFT's pattern rule and scaling, independently hand-computed ------------------


def test_pattern_rule_matches_at_a_dot_boundary_first_key_wins():
    pats = {"q_proj": 1, r"layers\.0\.self_attn\.k_proj": 2, "proj": 3}
    assert pattern_key(pats, "model.layers.3.self_attn.q_proj") == "q_proj"
    assert pattern_key(pats, "q_proj") == "q_proj"
    assert pattern_key(pats, "model.layers.0.self_attn.k_proj") == r"layers\.0\.self_attn\.k_proj"
    assert pattern_key(pats, "model.layers.10.self_attn.k_proj") is None  # layer 10 is not layer 0
    assert pattern_key({"q_proj": 1}, "model.layers.0.self_attn.xq_proj") is None
    assert pattern_key({"proj": 1}, "model.layers.0.self_attn.q_proj") is None  # "proj" is not a whole part
    cfg = AdapterConfig(r=8, lora_alpha=16, rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 4})
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == 16 / 2
    assert cfg.scaling_for("model.layers.0.self_attn.v_proj") == 4 / 8
    assert cfg.scaling_for("model.layers.0.self_attn.o_proj") == 2.0
    rs = AdapterConfig(r=16, lora_alpha=8, use_rslora=True, rank_pattern={"o_proj": 4})
    assert rs.scaling_for("a.o_proj") == 8 / math.sqrt(4) and rs.scaling_for("a.q_proj") == 8 / 4


def test_base_match_rules(tmp_path):
    from mergelab.checkpoint.reader import StateDictReader
    from mergelab.lora.reader import base_matches

    class Named(StateDictReader):
        def __init__(self, label: str, folder: Path | None, cfg: dict | None = None):
            super().__init__({}, label)
            self.folder, self._cfg = folder, cfg  # type: ignore[misc]

        def config(self) -> dict | None:
            return self._cfg

    local = Named("./models/Tiny-Llama", tmp_path / "models" / "Tiny-Llama")
    assert base_matches("org/tiny-llama", local)  # a Hub id and a local copy named after it
    assert base_matches(str(tmp_path / "models" / "Tiny-Llama") + "/", local)
    assert not base_matches("org/other-llama", local)
    cached = Named("org/x", tmp_path / "hub" / "models--org--x" / "snapshots" / "abc")
    assert base_matches("org/x", cached)
    assert base_matches("team/base-v2", Named("./b", tmp_path / "b", {"_name_or_path": "team/base-v2"}))
