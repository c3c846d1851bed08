"""Adapters in, adapter out through ``mergelab merge`` with a factor-space ``combine:`` rule.

Adapters are made by ``peft`` itself on a tiny random Llama; the outputs are loaded back with
``PeftModel.from_pretrained`` and compared with the base plus the input adapters' own updates
(PEFT's ``merge_and_unload``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.synthetic import make_base

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

runner = CliRunner()
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("lora_combine")
    base = make_base(root / "base", hidden=32, intermediate=64, vocab=64, layers=2)
    out = []
    for i, (r, alpha) in enumerate([(4, 8), (2, 16)]):  # heterogeneous ranks, α/r ≠ 1
        torch.manual_seed(10 + i)
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False)
        pm = peft.get_peft_model(model, cfg)
        with torch.no_grad():  # make the updates large enough to move the logits visibly
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.05 / max(float(p.abs().mean()), 1e-8))
        pm.save_pretrained(root / f"adapter_{i}")
        cfg_path = root / f"adapter_{i}" / "adapter_config.json"
        data = json.loads(cfg_path.read_text())
        data["base_model_name_or_path"] = str(base)
        cfg_path.write_text(json.dumps(data))
        out.append(root / f"adapter_{i}")
    return base, out


def _recipe(tmp: Path, base: Path, adapters: list[Path], weights: list[float], adapter: dict) -> Path:
    rec = {
        "base_model": str(base),
        "models": [{"model": str(a), "parameters": {"weight": w}} for a, w in zip(adapters, weights)],
        "merge_method": "task_arithmetic",
        "output": "adapter",
        "adapter": adapter,
    }
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(12).reshape(2, 6) % 64
    with torch.no_grad():
        return model(input_ids=ids).logits


def _expected_sum(base: Path, adapters: list[Path], weights: list[float]) -> torch.Tensor:
    """Base + Σ wᵢ ΔWᵢ, each ΔWᵢ taken from PEFT's own merge_and_unload of adapter i."""
    w0 = transformers.AutoModelForCausalLM.from_pretrained(base)
    state = {k: v.clone() for k, v in w0.state_dict().items()}
    for a, w in zip(adapters, weights):
        merged = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), a)
        sd = merged.merge_and_unload().state_dict()
        for k in state:
            state[k] += w * (sd[k] - w0.state_dict()[k])
    w0.load_state_dict(state)
    return _logits(w0)


def test_cat_adapter_out_loads_in_peft_and_equals_the_sum_of_updates(adapters, tmp_path):
    base, ads = adapters
    weights = [0.7, -0.4]
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(_recipe(tmp_path, base, ads, weights, {"combine": "cat"})), str(out)])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), out)
    got = _logits(loaded)
    want = _expected_sum(base, ads, weights)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = _logits(transformers.AutoModelForCausalLM.from_pretrained(base))
    assert (got - plain).abs().max() > 1e-3  # the update is visible
    report = json.loads((out / "adapter_report.json").read_text())
    assert report["combine"] == "cat"
    assert report["ranks"]["max"] == 6  # 4 + 2


@pytest.mark.parametrize(
    ("adapter", "exact"),
    [
        ({"combine": "core_space"}, True),  # the recipe's task_arithmetic on the cores: the exact sum
        ({"combine": "core_space", "combine_parameters": {"method": "tsv_m"}}, False),
        ({"combine": "knots_ties", "combine_parameters": {"density": 0.5, "scale": 1.0}}, False),
        ({"combine": "knots_dare_ties", "combine_parameters": {"seed": 3}}, False),
    ],
)
def test_product_space_rules_write_loadable_adapters(adapters, tmp_path, adapter, exact):
    base, ads = adapters
    weights = [1.0, 1.0]
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(_recipe(tmp_path, base, ads, weights, adapter)), str(out)])
    assert res.exit_code == 0, res.output
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), out)
    got = _logits(loaded)
    assert torch.isfinite(got).all()
    if exact:
        torch.testing.assert_close(got, _expected_sum(base, ads, weights), rtol=1e-5, atol=1e-5)


def test_legacy_rule_refuses_heterogeneous_ranks_and_writes_nothing(adapters, tmp_path):
    base, ads = adapters
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["merge", str(_recipe(tmp_path, base, ads, [1.0, 1.0], {"combine": "linear_legacy"})), str(out)]
    )
    assert res.exit_code == 4, res.output
    assert "different ranks" in res.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("adapter", "code", "pattern"),
    [
        ({"combine": "cat", "rank": 4}, 2, "apply to combine: svd only"),
        ({"combine": "knots_ties", "combine_parameters": {"densty": 0.2}}, 2, "densty"),
        ({"combine": "catt"}, 2, "unknown rule 'catt'"),
    ],
)
def test_bad_combine_settings_are_one_line_errors(adapters, tmp_path, adapter, code, pattern):
    base, ads = adapters
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(_recipe(tmp_path, base, ads, [1.0, 1.0], adapter)), str(out)])
    assert res.exit_code == code, res.output
    assert pattern in res.output
    assert not out.exists()


def test_factor_rules_need_adapters_not_full_models(adapters, tmp_path):
    base, ads = adapters
    dense = make_base(tmp_path / "dense", hidden=32, intermediate=64, vocab=64, layers=2, seed=5)
    out = tmp_path / "out"
    res = runner.invoke(
        app, ["merge", str(_recipe(tmp_path, base, [ads[0], dense], [1.0, 1.0], {"combine": "cat"})), str(out)]
    )
    assert res.exit_code == 4, res.output
    assert "is not a PEFT adapter" in res.output
    assert not out.exists()


def _merge(tmp: Path, base: Path, ads: list[Path], weights: list[float], adapter: dict) -> Path:
    out = tmp / "out"
    res = runner.invoke(app, ["merge", str(_recipe(tmp, base, ads, weights, adapter)), str(out)])
    assert res.exit_code == 0, res.output
    return out


def _peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    return _logits(peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter))


def test_cat_on_gpt2_conv1d_and_llama_embeddings(llama, gpt2, tmp_path):
    from lora_helpers import make_adapter

    cases = [
        (gpt2, {"target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True}, {"r": 2}),
        (llama, {"target_modules": ["q_proj", "embed_tokens"]}, {"r": 3, "lora_alpha": 5}),
    ]
    for k, (base, common, second) in enumerate(cases):
        d = tmp_path / str(k)
        d.mkdir()
        ads = [
            make_adapter(base, d / "a0", seed=1, **common),
            make_adapter(base, d / "a1", seed=2, **{**common, **second}),
        ]
        weights = [0.6, 0.9]
        out = _merge(d, base, ads, weights, {"combine": "cat"})
        torch.testing.assert_close(_peft_logits(base, out), _expected_sum(base, ads, weights), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("combination", "rule", "extra"), [("linear", "linear_legacy", {}), ("ties", "ties_legacy", {"density": 0.5})]
)
def test_legacy_rules_give_what_peft_add_weighted_adapter_gives(llama, tmp_path, combination, rule, extra):
    from lora_helpers import make_adapter

    ads = [make_adapter(llama, tmp_path / f"a{i}", seed=i + 1, target_modules=["q_proj", "v_proj"]) for i in range(2)]
    weights = [0.8, 0.5]
    out = _merge(tmp_path, llama, ads, weights, {"combine": rule, "combine_parameters": extra})
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(llama), ads[0], "a0")
    model.load_adapter(ads[1], "a1")
    model.add_weighted_adapter(["a0", "a1"], weights, "m", combination_type=combination, **extra)
    model.set_adapter("m")
    torch.testing.assert_close(_peft_logits(llama, out), _logits(model), rtol=1e-5, atol=1e-5)
