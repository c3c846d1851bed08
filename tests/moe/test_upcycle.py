"""Upcycling dense fine-tunes into an MoE (``mergelab moe``): loading, logits, gates, expert placement, errors.

References are computed here independently: gate vectors by running the base on one prompt at a
time (no padding at all), expert tensors by reading the inputs with safetensors, LoRA experts by
PEFT's own ``merge_and_unload``.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from moe_helpers import dense_base, load_strict
from safetensors.torch import load_file
from tiny_models import load_dir
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.errors import PlanError, RecipeError
from mergelab.moe import upcycle
from mergelab.moe.architectures import ARCHITECTURES

runner = CliRunner()
PROJ = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}  # Mixtral's names, written out by hand


def _logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


IDS = torch.tensor([[1, 3, 4, 5, 6, 7, 8, 9], [1, 10, 11, 12, 13, 0, 0, 0]])
MASK = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])


@pytest.mark.parametrize(
    ("base_kind", "arch"),
    [("llama", "mixtral"), ("qwen2", "qwen2_moe"), ("llama", "qwen2_moe"), ("qwen3", "qwen3_moe")],
)
def test_identical_experts_give_the_base_logits(tmp_path, base_kind, arch):
    """Every expert is the base's MLP, top-k weights renormalised (and a zeroed shared expert for
    Qwen2-MoE), so the MoE computes the base's function: same logits within 1e-5."""
    base = dense_base(tmp_path / "base", base_kind)
    recipe = {
        "base_model": str(base),
        "architecture": arch,
        "gate_mode": "random",
        "experts_per_token": 2,
        "experts": [{"source_model": str(base)} for _ in range(3)],
    }
    if arch == "qwen2_moe":
        recipe["shared_experts"] = [{"source_model": str(base), "residual_scale": 0.0}]
    res = upcycle(recipe, tmp_path / "moe", allow_all_same=True)
    assert res.architecture == arch
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["model_type"] == ARCHITECTURES[arch].model_type and cfg["num_experts_per_tok"] == 2
    moe = load_strict(tmp_path / "moe")
    assert type(moe).__name__ == ARCHITECTURES[arch].class_name
    dense = load_strict(base)
    torch.testing.assert_close(_logits(moe, IDS, MASK), _logits(dense, IDS, MASK), atol=1e-5, rtol=0)


def _ids(tok, prompt: str) -> list[int]:
    return [tok.bos_token_id, *tok(prompt, add_special_tokens=False)["input_ids"]]


def _reference_gates(base: Path, experts: list[dict], mode: str) -> torch.Tensor:
    """[L, N, H] by direct computation: one unpadded prompt per forward pass; the input of layer l is
    what a forward pre-hook on decoder layer l receives; last token or mean over the prompt's tokens;
    positives minus negatives; L2 norm."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    seen: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.register_forward_pre_hook(
            lambda mod, args, kwargs, i=i: seen.__setitem__(i, (args[0] if args else kwargs["hidden_states"])[0]),
            with_kwargs=True,
        )

    def per_prompt(p: str) -> torch.Tensor:
        with torch.no_grad():
            model(input_ids=torch.tensor([_ids(tok, p)]))
        return torch.stack([seen[i][-1] if mode == "hidden" else seen[i].mean(dim=0) for i in sorted(seen)])

    gates = []
    for e in experts:
        v = torch.stack([per_prompt(p) for p in e["positive_prompts"]]).mean(dim=0)
        if e.get("negative_prompts"):
            v = v - torch.stack([per_prompt(p) for p in e["negative_prompts"]]).mean(dim=0)
        gates.append(v / v.norm(dim=-1, keepdim=True))
    return torch.stack(gates, dim=1)


GATE_EXPERTS = [
    {"positive_prompts": ["the a of and to in is", "it"], "negative_prompts": ["that for on with as"]},
    {"positive_prompts": ["was at", "by the a of and to in is it that"]},
    {"positive_prompts": ["on with as was"], "negative_prompts": ["the", "a of"]},
]


@pytest.mark.parametrize("mode", ["hidden", "hidden_avg"])
def test_hidden_gates_equal_a_direct_computation(llama_family, tmp_path, mode):
    """Prompts of 2 to 11 tokens run batched and padded; the gates match unpadded single-prompt passes
    (last real token, or the mean over real tokens, of each layer's input)."""
    base, experts = llama_family
    spec = [{"source_model": str(e), **g} for e, g in zip(experts, GATE_EXPERTS)]
    upcycle({"base_model": str(base), "gate_mode": mode, "experts": spec}, tmp_path / "moe")
    out = load_dir(tmp_path / "moe")
    want = _reference_gates(base, GATE_EXPERTS, mode)
    for layer in range(2):
        got = out[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        torch.testing.assert_close(got, want[layer], atol=1e-5, rtol=0)


def test_qwen2_moe_shared_expert_gate_comes_from_its_prompts(tmp_path):
    """Qwen2-MoE from a Qwen2 base: routed gates and the shared expert's sigmoid gate are the hidden-mode
    vectors of their prompts; the shared expert is the given model's MLP; the model loads."""
    base = dense_base(tmp_path / "base", "qwen2")
    shared = {"positive_prompts": ["the a of and", "is it"], "negative_prompts": ["was"]}
    spec = [{"source_model": str(base), **g} for g in GATE_EXPERTS[:2]]
    recipe = {"base_model": str(base), "experts": spec, "shared_experts": [{"source_model": str(base), **shared}]}
    res = upcycle(recipe, tmp_path / "moe", allow_all_same=True)
    assert res.architecture == "qwen2_moe"
    out = load_dir(tmp_path / "moe")
    want = _reference_gates(base, [*GATE_EXPERTS[:2], shared], "hidden")
    src = load_dir(base)
    for layer in range(2):
        torch.testing.assert_close(out[f"model.layers.{layer}.mlp.gate.weight"], want[layer, :2], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            out[f"model.layers.{layer}.mlp.shared_expert_gate.weight"], want[layer, 2:], atol=1e-5, rtol=0
        )
        for proj in ("gate_proj", "up_proj", "down_proj"):
            mlp = src[f"model.layers.{layer}.mlp.{proj}.weight"]
            assert torch.equal(out[f"model.layers.{layer}.mlp.shared_expert.{proj}.weight"], mlp)
            assert torch.equal(out[f"model.layers.{layer}.mlp.experts.1.{proj}.weight"], mlp)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["shared_expert_intermediate_size"] == cfg["moe_intermediate_size"] == 48 and cfg["norm_topk_prob"]
    load_strict(tmp_path / "moe")


def test_cheap_embed_gates_are_normalised_embedding_sums(llama_family, tmp_path):
    base, experts = llama_family
    spec = [{"source_model": str(e), **g} for e, g in zip(experts, GATE_EXPERTS)]
    upcycle({"base_model": str(base), "gate_mode": "cheap_embed", "experts": spec}, tmp_path / "moe")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    embed = load_file(str(base / "model.safetensors"))["model.embed_tokens.weight"]

    def total(prompts: list[str]) -> torch.Tensor:
        v = sum(embed[_ids(tok, p)].sum(dim=0) for p in prompts)
        assert isinstance(v, torch.Tensor)
        return v / v.norm()

    out = load_dir(tmp_path / "moe")
    for e, g in enumerate(GATE_EXPERTS):
        v = total(g["positive_prompts"]) - (total(g["negative_prompts"]) if g.get("negative_prompts") else 0)
        v = v / v.norm()
        for layer in range(2):
            torch.testing.assert_close(
                out[f"model.layers.{layer}.block_sparse_moe.gate.weight"][e], v, atol=1e-6, rtol=0
            )


def test_experts_mlps_are_routed_experts_and_the_rest_is_the_base(llama_family, tmp_path):
    """Expert e's gate/up/down are Mixtral's w1/w3/w2 of slot e; residual_scale multiplies down_proj;
    noise is seeded per tensor (same recipe, same tensors); attention and embeddings are the base's."""
    base, experts = llama_family
    spec = [{"source_model": str(e), "positive_prompts": [p]} for e, p in zip(experts, ["the a", "of and", "to in"])]
    spec[1]["residual_scale"] = 0.5
    spec[2]["noise_scale"] = 0.01
    upcycle({"base_model": str(base), "gate_mode": "cheap_embed", "experts": spec}, tmp_path / "a")
    upcycle({"base_model": str(base), "gate_mode": "cheap_embed", "experts": spec}, tmp_path / "b")
    out, again = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    b = load_dir(base)
    ins = [load_dir(e) for e in experts]
    for layer in range(2):
        for proj, short in PROJ.items():
            src = f"model.layers.{layer}.mlp.{proj}.weight"
            for e in range(3):
                got = out[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{short}.weight"]
                if e == 0:
                    assert torch.equal(got, ins[0][src])
                elif e == 1:
                    want = ins[1][src] * (0.5 if proj == "down_proj" else 1.0)
                    assert torch.equal(got, want)
                else:
                    noise = got - ins[2][src]
                    assert 0.005 < float(noise.std()) < 0.02
                    assert torch.equal(got, again[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{short}.weight"])
        for name in ("self_attn.q_proj.weight", "self_attn.o_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{layer}.{name}"], b[f"model.layers.{layer}.{name}"])
    assert torch.equal(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert not any(".mlp." in n for n in out)
    load_strict(tmp_path / "a")


def test_output_dtype_and_side_files(llama_family, tmp_path):
    base, experts = llama_family
    spec = [{"source_model": str(e)} for e in experts[:2]]
    res = upcycle(
        {"base_model": str(base), "gate_mode": "uniform_random", "dtype": "bfloat16", "experts": spec}, tmp_path / "m"
    )
    out = load_dir(res.path)
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    bound = (1 / 32) ** 0.5
    assert float(out["model.layers.0.block_sparse_moe.gate.weight"].float().abs().max()) <= bound
    cfg = json.loads((res.path / "config.json").read_text())
    assert (
        cfg["dtype"] == "bfloat16" and cfg["num_local_experts"] == 2 and cfg["architectures"] == ["MixtralForCausalLM"]
    )
    for f in ("tokenizer.json", "mergelab_output.json", "mergelab_moe.yaml", "moe_report.json", "README.md"):
        assert (res.path / f).is_file(), f
    assert res.warnings == []  # 2 experts: a power of two


def test_lora_adapter_expert_is_merged_over_the_base(tmp_path):
    """An expert given as a PEFT LoRA adapter folder is its merge_and_unload'ed dense model."""
    pytest.importorskip("peft")
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    base = dense_base(tmp_path / "base", "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(str(base)),
            LoraConfig(
                r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], init_lora_weights=False
            ),
        )
        peft_model.save_pretrained(str(tmp_path / "adapter"))
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(tmp_path / "adapter"))
        dense = {k: v.detach() for k, v in merged.merge_and_unload().state_dict().items()}
    spec = [
        {"source_model": str(tmp_path / "adapter"), "positive_prompts": ["the a of"]},
        {"source_model": str(base), "positive_prompts": ["and to in"]},
    ]
    upcycle({"base_model": str(base), "experts": spec}, tmp_path / "moe")
    out = load_dir(tmp_path / "moe")
    for layer in range(2):
        for proj, short in PROJ.items():
            got = out[f"model.layers.{layer}.block_sparse_moe.experts.0.{short}.weight"]
            torch.testing.assert_close(got, dense[f"model.layers.{layer}.mlp.{proj}.weight"], atol=1e-6, rtol=0)
    load_strict(tmp_path / "moe")


def test_random_gates_are_seeded_per_tensor(llama_family, tmp_path):
    base, experts = llama_family
    spec = [{"source_model": str(e)} for e in experts]
    a = upcycle({"base_model": str(base), "gate_mode": "random", "experts": spec}, tmp_path / "a")
    b = upcycle({"base_model": str(base), "gate_mode": "random", "experts": spec, "seed": 1}, tmp_path / "b")
    ga, gb = load_dir(a.path), load_dir(b.path)
    name = "model.layers.0.block_sparse_moe.gate.weight"
    assert not torch.equal(ga[name], gb[name])
    c = upcycle({"base_model": str(base), "gate_mode": "random", "experts": spec}, tmp_path / "c")
    assert torch.equal(ga[name], load_dir(c.path)[name])
    assert any("power of two" in w for w in a.warnings)


def test_degenerate_gates_warn(llama_family, tmp_path):
    """Positive prompts that differ only in a shared suffix give almost parallel gates."""
    base, experts = llama_family
    spec = [
        {"source_model": str(experts[0]), "positive_prompts": ["the a of and to in is it that for on with as was at"]},
        {"source_model": str(experts[1]), "positive_prompts": ["a a of and to in is it that for on with as was at"]},
    ]
    res = upcycle({"base_model": str(base), "gate_mode": "cheap_embed", "experts": spec}, tmp_path / "m")
    assert any("degenerate gates" in w for w in res.warnings), res.warnings


# ------------------------------------------------------------------------------ bad inputs


def _recipe_file(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "moe.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _one_line_error(res, code: int, *needles: str) -> str:
    assert res.exit_code == code, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.output, res.output
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def test_cli_builds_a_loadable_moe(llama_family, tmp_path):
    """A mergekit-moe recipe with paths relative to the recipe's folder."""
    base, experts = llama_family

    def rel(p: Path) -> str:
        return os.path.relpath(p, tmp_path)

    recipe = _recipe_file(
        tmp_path,
        {
            "base_model": rel(base),
            "experts_per_token": 1,
            "experts": [{"source_model": rel(e), **g} for e, g in zip(experts, GATE_EXPERTS)],
        },
    )
    res = runner.invoke(app, ["moe", str(recipe), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert "built mixtral with 3 experts" in res.output
    assert "power of two" in res.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts_per_tok"] == 1
    load_strict(tmp_path / "out")


def test_bad_inputs_are_one_line_errors(llama_family, tmp_path):
    base, experts = llama_family
    ok = [{"source_model": str(e), "positive_prompts": [p]} for e, p in zip(experts, ["the", "a", "of"])]
    wide = dense_base(tmp_path / "wide", "llama", hidden_size=48)
    narrow_mlp = dense_base(tmp_path / "narrow", "llama", intermediate_size=32)
    cases = [
        # different base (other sizes)
        (
            {"base_model": str(base), "experts": [*ok[:2], {"source_model": str(wide), "positive_prompts": ["x"]}]},
            4,
            ["wide", "hidden_size", "fine-tune of base_model"],
        ),
        # mismatched MLP shapes
        (
            {
                "base_model": str(base),
                "experts": [*ok[:2], {"source_model": str(narrow_mlp), "positive_prompts": ["x"]}],
            },
            4,
            ["narrow", "intermediate_size"],
        ),
        # missing prompts for a mode that needs them
        (
            {"base_model": str(base), "experts": [ok[0], {"source_model": str(experts[1])}]},
            2,
            ["experts[1]", "positive_prompts", "hidden"],
        ),
        # identical prompts for every expert
        (
            {"base_model": str(base), "experts": [{**e, "positive_prompts": ["the"]} for e in ok]},
            2,
            ["same positive and negative prompts"],
        ),
        # the same model for every expert
        (
            {"base_model": str(base), "gate_mode": "random", "experts": [{"source_model": str(base)}] * 2},
            2,
            ["--i-understand-this-is-not-useful-without-training"],
        ),
        ({"base_model": str(base), "experts": ok, "experts_per_token": 4}, 2, ["experts_per_token is 4", "1 to 3"]),
        ({"base_model": str(base), "experts": ok, "gate_mode": "hiden"}, 2, ["unknown gate_mode 'hiden'"]),
        ({"base_model": str(base), "experts": ok, "gate_mod": "hidden"}, 2, ["gate_mod"]),
        ({"base_model": str(base), "experts": ok, "architecture": "qwen3_moe"}, 2, ["qwen3_moe", "'llama'"]),
        (
            {"base_model": str(base), "experts": ok, "shared_experts": ok[:1], "architecture": "mixtral"},
            2,
            ["no MoE output fits", "mixtral has no shared expert"],
        ),
        ({"base_model": str(tmp_path / "nope"), "experts": ok}, 3, ["nope"]),
    ]
    for i, (data, code, needles) in enumerate(cases):
        out = tmp_path / f"out{i}"
        res = runner.invoke(app, ["moe", str(_recipe_file(tmp_path, data)), str(out), "-q"])
        _one_line_error(res, code, *needles)
        assert not out.exists()


def test_python_api_raises_the_error_families(llama_family, tmp_path):
    base, experts = llama_family
    with pytest.raises(RecipeError, match="no positive_prompts"):
        upcycle({"base_model": str(base), "experts": [{"source_model": str(e)} for e in experts]}, tmp_path / "o")
    wide = dense_base(tmp_path / "wide", "qwen2")
    with pytest.raises(PlanError, match="model_type 'qwen2'"):
        upcycle(
            {
                "base_model": str(base),
                "gate_mode": "random",
                "experts": [{"source_model": str(wide)}, {"source_model": str(base)}],
            },
            tmp_path / "o",
        )


def test_sharded_inputs_and_outputs(family, tmp_path):
    """A base in 4 shards, experts likewise; the MoE written in several shards with an index loads."""
    base, experts = family
    spec = [{"source_model": str(e)} for e in experts[:2]]
    res = upcycle(
        {"base_model": str(base), "gate_mode": "random", "experts": spec}, tmp_path / "m", max_shard_size="100KB"
    )
    index = json.loads((res.path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.1.block_sparse_moe.experts.1.w2.weight" in index["weight_map"]
    load_strict(res.path)
