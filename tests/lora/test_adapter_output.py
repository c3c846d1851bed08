"""Merges written as PEFT LoRA adapters (``output: adapter`` / ``--adapter-out``): the ``svd`` rule.

Expectations come from outside the code under test: PEFT itself loads the adapter and runs the
model (logits compared with the dense merge mergelab writes), numpy computes singular values and
reconstruction errors, and energy ranks are computed by hand on matrices of known spectrum.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergelab.api import merge, plan_merge
from mergelab.cli import app
from mergelab.errors import MergelabError, OptionError, OutputError, PlanError, RecipeError
from mergelab.lora.svd import energy_rank, truncated_svd

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

runner = CliRunner()


def _llama_config():
    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )


def _gpt2_config():
    return transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)


ARCH = {
    "llama": (_llama_config, "LlamaForCausalLM"),
    "gpt2": (_gpt2_config, "GPT2LMHeadModel"),
}


def _model_class(arch: str):
    return getattr(transformers, ARCH[arch][1])


def make_family(root: Path, arch: str, n_experts: int = 2, scale: float = 0.02) -> tuple[Path, list[Path]]:
    """A random tiny base and experts that move every parameter (norms and biases too)."""
    torch.manual_seed(0 if arch == "llama" else 1)
    cls = _model_class(arch)
    base = cls(ARCH[arch][0]())
    base.save_pretrained(root / "base")
    experts = []
    for i in range(n_experts):
        e = cls(ARCH[arch][0]())
        e.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in e.parameters():
                p.add_(torch.randn_like(p) * scale)
        e.save_pretrained(root / f"expert_{i}")
        experts.append(root / f"expert_{i}")
    return root / "base", experts


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def fam(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"aout_{request.param}")
    base, experts = make_family(root, request.param)
    return request.param, base, experts


def _recipe(base, experts, method="ties", **extra):
    params = {"weight": 1.0, "density": 0.5} if method == "ties" else {"weight": 0.7}
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": dict(params)} for e in experts],
        "parameters": {"lambda": 1.0},
        "dtype": "float32",
        "defaults": "paper",
        **extra,
    }


def _logits(model, seed=0):
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits


def _peft_model(arch, base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_model_class(arch).from_pretrained(base), adapter).eval()


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_full_rank_adapter_equals_dense_merge(fam, tmp_path, method):
    arch, base, experts = fam
    rec = _recipe(base, experts, method)
    dense = merge(rec, tmp_path / "dense").path
    full = {**rec, "output": "adapter", "adapter": {"rank": 64, "non_lora": "modules_to_save"}}
    res = merge(full, tmp_path / "adapter")
    out = res.path
    ref = _logits(_model_class(arch).from_pretrained(dense).eval())
    got = _logits(_peft_model(arch, base, out))
    assert torch.allclose(got, ref, atol=1e-5, rtol=0), (got - ref).abs().max()
    rep = res.plan_summary["adapter"]
    assert rep["max_rel_error"] < 1e-5
    assert all(m["rank"] == m["full_rank"] for m in rep["modules"].values())
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == str(base)
    assert cfg["fan_in_fan_out"] is (arch == "gpt2")
    # target_modules name exactly the written modules, and every key is PEFT's
    keys = load_file(out / "adapter_model.safetensors")
    written = {k.removeprefix("base_model.model.").removesuffix(".lora_A.weight") for k in keys if "lora_A" in k}
    assert set(cfg["target_modules"]) == written
    assert all(k.startswith("base_model.model.") for k in keys)


def test_truncated_adapter_matches_peft_merge_of_its_factors(fam, tmp_path):
    """At rank 2, PEFT's merge_and_unload of the written adapter equals base + the rank-2 SVD of ΔW (numpy)."""
    arch, base, experts = fam
    rec = {**_recipe(base, experts, "task_arithmetic"), "output": "adapter", "adapter": {"rank": 2}}
    res = merge(rec, tmp_path / "a")
    dense = merge(_recipe(base, experts, "task_arithmetic"), tmp_path / "d").path
    merged = _peft_model(arch, base, res.path).merge_and_unload().state_dict()
    dense_sd = _model_class(arch).from_pretrained(dense).state_dict()
    base_sd = _model_class(arch).from_pretrained(base).state_dict()
    for module, m in res.plan_summary["adapter"]["modules"].items():
        name = module + ".weight"
        delta = (dense_sd[name] - base_sd[name]).double().numpy()
        if arch == "gpt2":
            delta = delta.T
        u, s, vh = np.linalg.svd(delta, full_matrices=False)
        want = (u[:, :2] * s[:2]) @ vh[:2]
        tail = np.sqrt((s[2:] ** 2).sum()) / np.sqrt((s**2).sum())
        got = (merged[name] - base_sd[name]).double().numpy()
        if arch == "gpt2":
            got = got.T
        np.testing.assert_allclose(got, want, atol=2e-6)
        assert m["rank"] == 2
        assert m["rel_error"] == pytest.approx(tail, rel=1e-4)


def test_dropped_non_lora_tensors_are_reported(fam, tmp_path):
    arch, base, experts = fam
    rec = {**_recipe(base, experts, "task_arithmetic"), "output": "adapter", "adapter": {"rank": 4}}
    res = merge(rec, tmp_path / "a")
    rep = res.plan_summary["adapter"]
    norm = "model.norm.weight" if arch == "llama" else "transformer.ln_f.weight"
    assert norm in rep["dropped"] and not rep["modules_to_save"]
    cfg = json.loads((res.path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] is None and cfg["lora_bias"] is False
    report_file = json.loads((res.path / "adapter_report.json").read_text())
    assert report_file["dropped"] == rep["dropped"]
    _peft_model(arch, base, res.path)  # loads as it is


def test_model_card_tags_the_adapter(fam, tmp_path):
    _arch, base, experts = fam
    res = merge({**_recipe(base, experts), "output": "adapter", "adapter": {"energy": 0.8}}, tmp_path / "a")
    card = (res.path / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and {"lora", "adapter", "mergelab"} <= set(front["tags"])
    assert "## Adapter" in card and "relative Frobenius error" in card
    assert not (res.path / "config.json").exists()  # an adapter folder, not a model folder
    manifest = json.loads((res.path / "mergelab_output.json").read_text())
    assert manifest["kind"] == "adapter" and "adapter_model.safetensors" in manifest["files"]


def _orth(n, seed):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


def test_energy_rank_by_hand():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: total 14
    assert energy_rank(s, 0.5) == 1  # 9 ≥ 7
    assert energy_rank(s, 9 / 14) == 1
    assert energy_rank(s, 0.9) == 2  # 13 ≥ 12.6 > 9
    assert energy_rank(s, 13.5 / 14) == 3
    assert energy_rank(s, 1.0) == 3  # every nonzero singular value, not the zero one
    assert energy_rank(torch.zeros(3), 0.9) == 0


def test_energy_mode_picks_per_module_ranks(tmp_path):
    """Two modules with constructed spectra: energy 0.9 keeps ranks 2 and 1 (hand-computed)."""
    root = tmp_path / "m"
    cls = _model_class("llama")
    torch.manual_seed(0)
    base = cls(_llama_config())
    base.save_pretrained(root / "base")
    expert = cls(_llama_config())
    expert.load_state_dict(base.state_dict())
    spectra = {
        "model.layers.0.self_attn.q_proj": [3.0, 2.0, 1.0],  # 9+4 = 13 ≥ 0.9·14 = 12.6: rank 2
        "model.layers.1.mlp.down_proj": [5.0, 1.0, 0.5, 0.1],  # 25 ≥ 0.9·26.26: rank 1
    }
    sd = expert.state_dict()
    for i, (mod, s) in enumerate(spectra.items()):
        w = sd[mod + ".weight"]
        m, n = w.shape
        u, v = _orth(m, i)[:, : len(s)], _orth(n, 10 + i)[:, : len(s)]
        w += torch.from_numpy((u * np.array(s)) @ v.T).float()
    expert.load_state_dict(sd)
    expert.save_pretrained(root / "expert")
    rec = {
        **_recipe(root / "base", [root / "expert"], "task_arithmetic"),
        "output": "adapter",
        "adapter": {"energy": 0.9},
    }
    rec["models"][0]["parameters"] = {"weight": 1.0}
    res = merge(rec, tmp_path / "a")
    rep = res.plan_summary["adapter"]
    assert {m: r["rank"] for m, r in rep["modules"].items()} == {
        "model.layers.0.self_attn.q_proj": 2,
        "model.layers.1.mlp.down_proj": 1,
    }
    assert rep["modules"]["model.layers.0.self_attn.q_proj"]["rel_error"] == pytest.approx(1 / np.sqrt(14), rel=1e-4)
    assert len(rep["zero_update_modules"]) == 12  # unchanged modules are not written
    cfg = json.loads((res.path / "adapter_config.json").read_text())
    ranks = {m: cfg["rank_pattern"].get(m, cfg["r"]) for m in cfg["target_modules"]}
    alphas = {m: cfg["alpha_pattern"].get(m, cfg["lora_alpha"]) for m in cfg["target_modules"]}
    assert ranks == {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 1}
    assert alphas == ranks  # scaling exactly 1 in every module
    merged = _peft_model("llama", root / "base", res.path).merge_and_unload().state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    d = (merged[name] - base.state_dict()[name]).double()
    assert torch.linalg.svdvals(d)[0].item() == pytest.approx(5.0, abs=1e-5)


def test_truncated_svd_error_is_the_tail_energy():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((20, 12))
    res = truncated_svd(torch.from_numpy(a).float(), rank=5)
    s = np.linalg.svd(a, compute_uv=False)
    tail = np.sqrt((s[5:] ** 2).sum() / (s**2).sum())
    f = res.factors
    assert f is not None and f.A.shape == (5, 12) and f.B.shape == (20, 5)
    recon = f.B.double().numpy() @ f.A.double().numpy()
    measured = np.linalg.norm(a - recon) / np.linalg.norm(a)
    assert measured == pytest.approx(tail, rel=1e-5)
    assert res.rel_error == pytest.approx(tail, rel=1e-5) and res.tail_error == pytest.approx(tail, rel=1e-5)
    r64 = truncated_svd(torch.from_numpy(a), rank=5, svd_dtype=torch.float64)
    assert r64.factors is not None and r64.factors.A.dtype == torch.float64
    assert r64.rel_error == pytest.approx(tail, rel=1e-12)
    assert truncated_svd(torch.zeros(4, 3), rank=2).factors is None
    assert truncated_svd(torch.from_numpy(a).float(), rank=99).rank == 12  # capped at min(out, in)


def _nothing_written(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize(
    ("adapter", "error"),
    [
        ({"rank": 0}, RecipeError),
        ({"energy": 0.0}, RecipeError),
        ({"energy": 1.5}, RecipeError),
        ({"rank": 2, "energy": 0.5}, RecipeError),
        ({}, RecipeError),  # neither rank nor energy
        ({"rank": 2, "target_modules": ["input_layernorm"]}, PlanError),  # not a matrix
        ({"rank": 2, "target_modules": ["no_such_proj"]}, PlanError),
        ({"rank": 2, "combine": "nope"}, RecipeError),
    ],
)
def test_bad_adapter_settings_one_line_nothing_written(fam, tmp_path, adapter, error):
    arch, base, experts = fam
    if arch == "gpt2" and "target_modules" in adapter:
        targets = [t.replace("input_layernorm", "ln_1") for t in adapter["target_modules"]]
        adapter = {**adapter, "target_modules": targets}
    with pytest.raises(error) as info:
        merge({**_recipe(base, experts), "output": "adapter", "adapter": adapter}, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert _nothing_written(tmp_path, "out")


def test_adapter_refusals(fam, tmp_path):
    _arch, base, experts = fam
    rec = _recipe(base, experts)
    with pytest.raises(OptionError, match="--adapter-out"):
        merge(rec, tmp_path / "o", rank=4)
    with pytest.raises(OptionError, match="streaming"):
        merge(rec, tmp_path / "o", adapter_out=True, rank=4, executor="ray")
    with pytest.raises(RecipeError, match="base_model"):
        merge({**rec, "base_model": None, "parameters": {}}, tmp_path / "o", adapter_out=True, rank=4)
    with pytest.raises(RecipeError, match="ignores it"):
        lin = {**rec, "merge_method": "linear", "parameters": {}, "models": [{"model": str(e)} for e in experts]}
        merge(lin, tmp_path / "o", adapter_out=True, rank=4)
    with pytest.raises(MergelabError, match="output: adapter"):
        plan_merge({**rec, "adapter": {"rank": 4}})  # an adapter block without output: adapter
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputError, match="exists"):
        merge(rec, tmp_path / "exists", adapter_out=True, rank=4)
    assert _nothing_written(tmp_path, "o")


def test_cli_adapter_out(fam, tmp_path):
    arch, base, experts = fam
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(base, experts)))
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(recipe), str(out), "--adapter-out", "--energy", "0.9", "-q"])
    assert res.exit_code == 0, res.output
    assert "adapter: relative Frobenius error" in res.output
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    _peft_model(arch, base, out)
    bad = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "o2"), "--adapter-out", "--rank", "0"])
    assert bad.exit_code == 2 and "rank 0" in bad.output and len(bad.output.strip().splitlines()) == 1
    assert _nothing_written(tmp_path, "o2")
