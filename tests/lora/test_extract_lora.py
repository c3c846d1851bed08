"""``mergelab extract-lora``: adapters from full fine-tunes, checked through PEFT and numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.errors import OptionError, OutputError, PlanError
from mergelab.lora.extract import extract_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

runner = CliRunner()


def _config(arch: str):
    if arch == "llama":
        return transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        )
    return transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)


def _cls(arch: str):
    return transformers.LlamaForCausalLM if arch == "llama" else transformers.GPT2LMHeadModel


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory) -> tuple[str, Path, Path]:
    """A random base and a "full fine-tune" that moves every parameter (embeddings, norms, biases too)."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"extract_{arch}")
    torch.manual_seed(7)
    base = _cls(arch)(_config(arch))
    base.save_pretrained(root / "base")
    expert = _cls(arch)(_config(arch))
    expert.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    expert.save_pretrained(root / "expert")
    return arch, root / "base", root / "expert"


def _logits(model):
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x).logits


def _load(arch, base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_cls(arch).from_pretrained(base), adapter).eval()


def test_full_rank_extraction_with_non_lora_kept_is_the_expert(pair, tmp_path):
    """Linear LoRA modules + modules_to_save (norms, embeddings) + lora_bias (GPT-2): logits of the expert."""
    arch, base, expert = pair
    res = extract_lora(expert, base, tmp_path / "a", rank=64, keep_non_lora=True)
    ref = _cls(arch).from_pretrained(expert).eval()
    got, want = _logits(_load(arch, base, res.path)), _logits(ref)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert not res.report["dropped"]
    cfg = json.loads((res.path / "adapter_config.json").read_text())
    assert cfg["lora_bias"] is (arch == "gpt2")  # GPT-2's Conv1D layers have biases, Llama's projections none
    assert cfg["modules_to_save"]


def test_full_rank_extraction_reconstructs_tau(pair, tmp_path):
    arch, base, expert = pair
    res = extract_lora(expert, base, tmp_path / "a", rank=64, embeddings=True, keep_non_lora=True)
    peft_model = _load(arch, base, res.path)
    ref = _cls(arch).from_pretrained(expert).eval()
    if arch == "llama":  # no biases: everything is kept exactly, embeddings as embedding LoRA
        got, want = _logits(peft_model), _logits(ref)
        assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    else:  # PEFT refuses lora_bias with embedding LoRA: the bias updates are dropped and reported
        assert "transformer.h.0.attn.c_attn.bias" in res.report["dropped"]
        # wte is tied to the head: kept whole (with the head), not as embedding LoRA; wpe is embedding LoRA
        assert "transformer.wte.weight" in res.report["modules_to_save"]
        assert res.report["modules"]["transformer.wpe"]["kind"] == "embedding"
    merged = peft_model.merge_and_unload().state_dict()
    exp_sd, base_sd = ref.state_dict(), _cls(arch).from_pretrained(base).state_dict()
    for module in res.report["modules"]:
        name = module + ".weight"
        tau = exp_sd[name] - base_sd[name]
        assert torch.allclose(merged[name] - base_sd[name], tau, atol=1e-6, rtol=0), name
    assert res.report["max_rel_error"] < 1e-5
    kinds = {m["kind"] for m in res.report["modules"].values()}
    assert "embedding" in kinds and ("conv1d" if arch == "gpt2" else "linear") in kinds
    keys = load_file(res.path / "adapter_model.safetensors")
    emb = "model.embed_tokens" if arch == "llama" else "transformer.wpe"
    assert f"base_model.model.{emb}.lora_embedding_A" in keys


def test_truncated_extraction_errors_match_numpy(pair, tmp_path):
    arch, base, expert = pair
    res = extract_lora(expert, base, tmp_path / "a", rank=3)
    exp_sd = _cls(arch).from_pretrained(expert).state_dict()
    base_sd = _cls(arch).from_pretrained(base).state_dict()
    assert res.report["lora_modules"] == 14 if arch == "llama" else 8
    for module, m in res.report["modules"].items():
        tau = (exp_sd[module + ".weight"] - base_sd[module + ".weight"]).double().numpy()
        s = np.linalg.svd(tau, compute_uv=False)
        assert m["rank"] == 3 and m["full_rank"] == min(tau.shape)
        assert m["rel_error"] == pytest.approx(np.sqrt((s[3:] ** 2).sum() / (s**2).sum()), rel=1e-4)
    # sizes: the factors of rank 3 against the dense expert's tensors
    assert 0 < res.report["adapter_bytes"] < res.expert_bytes
    dense = load_file(expert / "model.safetensors")
    assert res.expert_bytes == sum(t.numel() * t.element_size() for t in dense.values())
    # non-LoRA updates dropped (no --keep-non-lora) and listed
    assert res.report["dropped"] and not res.report["modules_to_save"]
    assert json.loads((res.path / "adapter_report.json").read_text())["modules"] == res.report["modules"]


def test_energy_extraction_ranks_per_module(pair, tmp_path):
    arch, base, expert = pair
    res = extract_lora(expert, base, tmp_path / "a", energy=0.6, svd_dtype="float64")
    exp_sd = _cls(arch).from_pretrained(expert).state_dict()
    base_sd = _cls(arch).from_pretrained(base).state_dict()
    for module, m in res.report["modules"].items():
        tau = (exp_sd[module + ".weight"] - base_sd[module + ".weight"]).double().numpy()
        s2 = np.linalg.svd(tau, compute_uv=False) ** 2
        want = int(np.searchsorted(np.cumsum(s2), 0.6 * s2.sum()) + 1)
        assert m["rank"] == want, module
    _load(arch, base, res.path)


def test_extract_refusals_write_nothing(pair, tmp_path):
    _arch, base, expert = pair
    for kwargs in ({"rank": 0}, {"energy": 0.0}, {"energy": 1.01}, {"rank": 2, "energy": 0.5}, {}):
        with pytest.raises(OptionError) as info:
            extract_lora(expert, base, tmp_path / "o", **kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(PlanError, match="not a 2-D"):
        extract_lora(expert, base, tmp_path / "o", rank=2, target_modules=["norm" if _arch == "llama" else "ln_f"])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists"):
        extract_lora(expert, base, tmp_path / "taken", rank=2)
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "o").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_cli_extract_lora(pair, tmp_path):
    arch, base, expert = pair
    out = tmp_path / "adapter"
    res = runner.invoke(app, ["extract-lora", str(expert), str(out), "--base", str(base), "--rank", "4"])
    assert res.exit_code == 0, res.output
    assert "extracted" in res.output and "of the dense expert" in res.output
    assert "relative Frobenius error" in res.output
    _load(arch, base, out)
    card = (out / "README.md").read_text()
    assert "library_name: peft" in card
    again = runner.invoke(app, ["extract-lora", str(expert), str(out), "--base", str(base), "--rank", "4"])
    assert again.exit_code == 6 and "exists" in again.output and len(again.output.strip().splitlines()) == 1
    bad = runner.invoke(app, ["extract-lora", str(expert), str(tmp_path / "b"), "--base", str(base), "--energy", "2"])
    assert bad.exit_code == 2 and "energy" in bad.output and not (tmp_path / "b").exists()
    as_json = runner.invoke(
        app, ["extract-lora", str(expert), str(tmp_path / "j"), "--base", str(base), "--energy", "0.9", "--json", "-q"]
    )
    assert as_json.exit_code == 0, as_json.output


def test_headless_checkpoint_gets_the_head_models_module_names(tmp_path):
    """The original gpt2 layout: tensors ``h.0.*`` stored without ``transformer.``, config naming GPT2LMHeadModel.

    transformers loads it into GPT2LMHeadModel (modules ``transformer.h.0.*``); the adapter's keys
    must carry the prefix, or PEFT would silently leave every factor at its initial value.
    """
    torch.manual_seed(3)
    cfg = _config("gpt2")
    models = {}
    for name in ("base", "expert"):
        m = transformers.GPT2LMHeadModel(cfg)
        if name == "expert":
            m.load_state_dict(models["base"].state_dict())
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.03)
        models[name] = m
        m.transformer.save_pretrained(tmp_path / name)
        conf = json.loads((tmp_path / name / "config.json").read_text())
        conf["architectures"] = ["GPT2LMHeadModel"]
        (tmp_path / name / "config.json").write_text(json.dumps(conf))
    assert "h.0.attn.c_attn.weight" in load_file(tmp_path / "base" / "model.safetensors")
    res = extract_lora(tmp_path / "expert", tmp_path / "base", tmp_path / "a", rank=64, keep_non_lora=True)
    assert "transformer.h.0.attn.c_attn" in res.report["modules"]
    got = _logits(_load("gpt2", tmp_path / "base", res.path))
    want = _logits(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "expert").eval())
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_keep_non_lora_adapter_of_a_tied_model_reads_back_in_mergelab(arch, tmp_path):
    """A tied LM's --keep-non-lora adapter stores lm_head beside the embedding (as PEFT does): mergelab's
    own adapter reader accepts it and materialises the expert, as PEFT's merge_and_unload does."""
    from mergelab.checkpoint.reader import open_checkpoint

    cfg = _config(arch)
    cfg.tie_word_embeddings = True
    torch.manual_seed(11)
    base = _cls(arch)(cfg)
    base.save_pretrained(tmp_path / "base")
    expert = _cls(arch)(cfg)
    expert.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in expert.parameters():
            p.add_(torch.randn_like(p) * 0.03)
    expert.save_pretrained(tmp_path / "expert")
    res = extract_lora(tmp_path / "expert", tmp_path / "base", tmp_path / "a", rank=64, keep_non_lora=True)
    assert any(k.endswith("lm_head.weight") for k in load_file(res.path / "adapter_model.safetensors"))
    want = load_file(tmp_path / "expert" / "model.safetensors")
    reader = open_checkpoint(str(res.path), base=open_checkpoint(str(tmp_path / "base")))
    try:
        assert set(reader.tensors()) == set(want)
        for name, w in want.items():
            assert torch.allclose(reader.read(name).float(), w.float(), atol=1e-5, rtol=0), name
    finally:
        reader.close()


def test_tied_head_copy_that_differs_from_the_embedding_is_refused(tmp_path):
    from safetensors.torch import save_file

    from mergelab.checkpoint.reader import open_checkpoint
    from mergelab.errors import CheckpointError

    cfg = _config("llama")
    cfg.tie_word_embeddings = True
    base = _cls("llama")(cfg)
    base.save_pretrained(tmp_path / "base")
    expert = _cls("llama")(cfg)
    expert.load_state_dict(base.state_dict())
    with torch.no_grad():
        expert.model.embed_tokens.weight.add_(0.1)
        expert.model.layers[0].mlp.up_proj.weight.add_(0.1)
    expert.save_pretrained(tmp_path / "expert")
    res = extract_lora(tmp_path / "expert", tmp_path / "base", tmp_path / "a", rank=4, keep_non_lora=True)
    path = res.path / "adapter_model.safetensors"
    tensors = load_file(path)
    head = next(k for k in tensors if k.endswith("lm_head.weight"))
    tensors[head] = tensors[head] + 1.0
    save_file(tensors, path)
    reader = open_checkpoint(str(res.path), base=open_checkpoint(str(tmp_path / "base")))
    try:
        with pytest.raises(CheckpointError, match="differs from its input embedding"):
            reader.read("model.embed_tokens.weight")
    finally:
        reader.close()
