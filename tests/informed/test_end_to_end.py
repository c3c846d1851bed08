"""Recipes with a `calibration:` block through `mergelab merge` and the Python API, on tiny real
transformers checkpoints (Llama causal LM; BERT encoder with separate zoo-style heads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import load_dir
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.informed import Calibration, open_statistics

runner = CliRunner()
CAL = {"num_examples": 8, "batch_size": 4, "max_length": 16}


def _recipe(tmp_path: Path, method: str, base: Path, experts: list[Path], cals: list[Path], **extra) -> Path:
    r = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "calibration": str(c)} for e, c in zip(experts, cals)],
        "calibration": {**CAL, **extra.pop("calibration", {})},
        **extra,
    }
    p = tmp_path / f"{method}.yaml"
    p.write_text(yaml.safe_dump(r))
    return p


def _load_lm(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_cli_merges_a_causal_lm_with_a_data_phase(method, family, cal_files, tmp_path):
    base, experts = family
    stats_dir = tmp_path / "stats"
    recipe = _recipe(tmp_path, method, base, experts[:2], cal_files[:2], calibration={"statistics_dir": str(stats_dir)})
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "data phase" in res.output and "expected memory" in res.output
    model = _load_lm(tmp_path / "out")
    ids = torch.tensor([[1, 3, 4, 5]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "data phase" in card
    # statistics kept and reused: a second merge does not recompute them
    folders = sorted(p for p in stats_dir.rglob("statistics.json"))
    assert len(folders) == 2
    stamp = [p.stat().st_mtime_ns for p in folders]
    res = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out2")])
    assert res.exit_code == 0, res.output
    assert "reusing statistics" in res.output
    assert [p.stat().st_mtime_ns for p in folders] == stamp
    # the data-informed merge is not the plain average
    merged = load_dir(tmp_path / "out")
    avg = mergelab.merge_state_dicts("linear", [load_dir(p) for p in experts[:2]])
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.allclose(merged[name], avg[name], atol=1e-6)


def test_regmean_plusplus_and_adamerging_from_python(family, cal_files, tmp_path):
    base, experts = family
    r = yaml.safe_load(_recipe(tmp_path, "regmean_plusplus", base, experts[:2], cal_files[:2]).read_text())
    res = mergelab.merge(r, tmp_path / "pp")
    assert res.plan_summary["data_phase"]["seconds"] > 0 and res.plan_summary["data_phase"]["peak_bytes"] > 0
    _load_lm(tmp_path / "pp")
    plus = load_dir(tmp_path / "pp")
    mergelab.merge({**r, "merge_method": "regmean"}, tmp_path / "rm")
    plain = load_dir(tmp_path / "rm")
    # RegMean++ feeds each block the merged model's hidden states, RegMean each expert's own
    name = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(plus[name], plain[name])

    r = {**r, "merge_method": "adamerging", "parameters": {"steps": 3, "granularity": "layer"}}
    mergelab.merge(r, tmp_path / "ada")
    coeffs = json.loads((tmp_path / "ada" / "adamerging_coefficients.json").read_text())
    assert coeffs["granularity"] == "layer" and len(coeffs["entropy"]["per_step"]) == 3
    per_expert = list(coeffs["coefficients"].values())
    assert len(per_expert) == 2 and len(per_expert[0]) == len(load_dir(tmp_path / "ada"))
    assert all(0.0 <= v <= 1.0 for d in per_expert for v in d.values())
    _load_lm(tmp_path / "ada")


def test_encoder_with_separate_heads_and_python_calibration(bert_family, cal_files, tmp_path):
    from transformers import AutoModel

    base, experts, heads = bert_family
    models = [
        {"model": str(e), "calibration": {"path": str(c), "head": str(h)}} for e, c, h in zip(experts, cal_files, heads)
    ]
    recipe = {
        "merge_method": "fisher",
        "base_model": str(base),
        "models": models,
        "calibration": CAL,
        "parameters": {"fisher_label": "empirical"},
    }
    mergelab.merge(recipe, tmp_path / "fisher")
    AutoModel.from_pretrained(str(tmp_path / "fisher"))
    # the same experts with batches and a logits function from Python
    from mergelab.data import load_tokenizer, read_text_file, tokenize_batches
    from mergelab.informed import LinearHead, pool

    tok = load_tokenizer(base)
    cals = []
    for c, h in zip(cal_files, heads):
        head = LinearHead.load(h)
        batches = tokenize_batches(tok, read_text_file(c).texts[:8], batch_size=4, max_length=16)
        cals.append(
            Calibration(
                batches=batches,
                logits_fn=lambda m, b, lin=head.linear: lin(
                    pool(
                        m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state,
                        b["attention_mask"],
                        "mean",
                    )
                ),
            )
        )
    py = mergelab.merge({**recipe, "parameters": {"fisher_label": "expected"}}, tmp_path / "py", calibration=cals)
    assert py.path.is_dir()
    mergelab.merge({**recipe, "parameters": {"fisher_label": "expected"}}, tmp_path / "yml")
    a, b = load_dir(tmp_path / "py"), load_dir(tmp_path / "yml")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    rm = mergelab.merge({**recipe, "merge_method": "regmean", "parameters": {}}, tmp_path / "rm")
    AutoModel.from_pretrained(str(rm.path))


def test_precomputed_statistics_folder_in_the_recipe(family, cal_files, tmp_path):
    base, experts = family
    stats_dir = tmp_path / "stats"
    r = yaml.safe_load(
        _recipe(
            tmp_path, "regmean", base, experts[:2], cal_files[:2], calibration={"statistics_dir": str(stats_dir)}
        ).read_text()
    )
    mergelab.merge(r, tmp_path / "a")
    folders = sorted(p.parent for p in stats_dir.rglob("statistics.json"))
    reader = open_statistics(folders[0])
    kinds = {k.rpartition("::")[2] for k in reader.tensors()}
    assert kinds == {"gram", "rows"}
    pre = {**r, "models": [{"model": str(e), "statistics": str(f)} for e, f in zip(experts[:2], folders)]}
    pre.pop("calibration")
    mergelab.merge(pre, tmp_path / "b")
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validate_reports_missing_calibration(family, tmp_path):
    _, experts = family
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({"merge_method": "fisher", "models": [{"model": str(e)} for e in experts[:2]]}))
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and "needs calibration data" in res.output
    p.write_text(
        yaml.safe_dump(
            {"merge_method": "fisher", "models": [{"model": str(e), "calibration": "nope.jsonl"} for e in experts[:2]]}
        )
    )
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2 and "nope.jsonl" in res.output


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_statistics_beyond_the_memory_budget_are_collected_in_groups_with_the_same_result(
    method, family, cal_files, tmp_path
):
    base, experts = family
    r = yaml.safe_load(
        _recipe(tmp_path, method, base, experts[:2], cal_files[:2], calibration={"num_examples": 4}).read_text()
    )
    mergelab.merge(r, tmp_path / "one")
    small = {**r, "calibration": {**r["calibration"], "memory_budget": "40KB"}}

    class Phases:
        def __init__(self):
            self.names: list[str] = []

        def begin(self, phase, total_items, total_bytes):
            self.names.append(phase)

        def advance(self, items, nbytes):
            pass

        def end(self):
            pass

    rec = Phases()
    mergelab.merge(small, tmp_path / "groups", progress=rec)
    assert any("[2/" in n for n in rec.names), rec.names  # more than one pass over the data per expert
    a, b = load_dir(tmp_path / "one"), load_dir(tmp_path / "groups")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
