"""Merging PEFT adapters end to end: the same merge as of the dense merge_and_unload'ed models,
and bad adapters refused at plan time with one line, an exit code and nothing written."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lora_helpers import make_adapter, save_merged
from safetensors.torch import load_file, save_file
from tiny_models import load_dir
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app

pytest.importorskip("peft")
runner = CliRunner()
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest() + f":{f.stat().st_mtime_ns}"
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def _recipe(tmp: Path, base: Path, models: list[str | Path], method: str = "ties", **extra) -> Path:
    data = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": {"weight": 1.0 - 0.25 * i}} for i, m in enumerate(models)],
        "parameters": {"density": 0.5} if method == "ties" else {},
        **extra,
    }
    p = tmp / f"{method}-{len(list(tmp.glob('*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.fixture(scope="module")
def adapters(llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    a = make_adapter(llama, root / "lora-a", seed=1, target_modules=TARGETS)
    b = make_adapter(llama, root / "lora-b", seed=2, target_modules=TARGETS, use_rslora=True, r=6)
    dense = [save_merged(llama, x, root / f"dense-{x.name}") for x in (a, b)]
    return [a, b], dense


def _assert_same_model(a: Path, b: Path) -> None:
    sa, sb = load_dir(a), load_dir(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=0, msg=k)


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_cli_merge_of_adapters_equals_merge_of_dense_models(method, llama, adapters, tmp_path):
    (la, lb), dense = adapters
    before = {str(p): tree_digest(p) for p in (la, lb, llama)}
    forms = [la, f"{llama}+{lb}"]  # a folder, and mergekit's base+adapter string
    for name, models in (("lora", forms), ("dense", dense)):
        res = runner.invoke(app, ["merge", str(_recipe(tmp_path, llama, models, method)), str(tmp_path / name), "-q"])
        assert res.exit_code == 0, res.output
    _assert_same_model(tmp_path / "lora", tmp_path / "dense")
    base = load_dir(llama)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(load_dir(tmp_path / "lora")[name], base[name])
    assert {str(p): tree_digest(p) for p in (la, lb, llama)} == before


def test_memory_executor_and_mixed_inputs(llama, adapters, tmp_path):
    (la, _), dense = adapters
    mergelab.merge(_recipe(tmp_path, llama, [la, dense[1]]), tmp_path / "mem", executor="memory")
    mergelab.merge(_recipe(tmp_path, llama, dense), tmp_path / "dense")
    _assert_same_model(tmp_path / "mem", tmp_path / "dense")


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_executor_reopens_adapters_from_specs(llama, adapters, tmp_path):
    import ray

    (la, lb), dense = adapters
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        mergelab.merge(_recipe(tmp_path, llama, [la, lb]), tmp_path / "ray", executor="ray", workers=2)
    finally:
        ray.shutdown()
    mergelab.merge(_recipe(tmp_path, llama, dense), tmp_path / "dense")
    _assert_same_model(tmp_path / "ray", tmp_path / "dense")


def test_regmean_data_phase_runs_the_adapted_model(family, tmp_path):
    """RegMean's Grams come from forward passes of each expert: an adapter's are its adapted model's."""
    base, _ = family
    cal = tmp_path / "cal.jsonl"
    cal.write_text("".join(json.dumps({"text": f"the {w} of a {w} is it"}) + "\n" for w in ("cat", "and", "to", "on")))
    lor = [make_adapter(base, tmp_path / f"l{i}", seed=i, target_modules=TARGETS) for i in (1, 2)]
    dense = []
    for x in lor:
        d = save_merged(base, x, tmp_path / f"d-{x.name}")
        for f in base.glob("tokenizer*"):
            shutil.copy(f, d / f.name)
        dense.append(d)
    settings = {"num_examples": 4, "batch_size": 2, "max_length": 12}
    for name, models in (("lora", lor), ("dense", dense)):
        r = {
            "merge_method": "regmean",
            "base_model": str(base),
            "models": [{"model": str(m), "calibration": str(cal)} for m in models],
            "calibration": settings,
        }
        mergelab.merge(r, tmp_path / name)
    sa, sb = load_dir(tmp_path / "lora"), load_dir(tmp_path / "dense")
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=1e-5, msg=k)


def test_adapter_base_override_key_and_flag(llama, adapters, tmp_path):
    (la, _), dense = adapters
    other = tmp_path / "other-base"
    shutil.copytree(llama, other)
    (other / "config.json").write_text((llama / "config.json").read_text())
    bad = tmp_path / "lora-elsewhere"
    shutil.copytree(la, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    r = _recipe(tmp_path, llama, [bad, dense[1]])
    res = runner.invoke(app, ["merge", str(r), str(tmp_path / "out"), "-q", "--allow-adapter-base-mismatch"])
    assert res.exit_code == 0, res.output
    r2 = _recipe(tmp_path, llama, [bad, dense[1]], allow_adapter_base_mismatch=True)
    assert mergelab.merge(r2, tmp_path / "out2").path.is_dir()


# --- bad adapters: one line, exit code 3, nothing written, inputs untouched ---------------------


def _broken(src: Path, dst: Path, *, config: dict | None = None, tensors=None, drop: str | None = None) -> Path:
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        sd = load_file(str(dst / "adapter_model.safetensors"))
        save_file(tensors(sd), str(dst / "adapter_model.safetensors"))
    if drop:
        (dst / drop).unlink()
    return dst


def _rename(old: str, new: str):
    return lambda sd: {k.replace(old, new): v for k, v in sd.items()}


def _reshape(key_part: str, fn):
    return lambda sd: {k: (fn(v) if key_part in k else v) for k, v in sd.items()}


BAD = {
    "another base": (
        {"config": {"base_model_name_or_path": "someone/another-model"}},
        "trained on 'someone/another-model'",
    ),
    "unknown type": ({"config": {"peft_type": "IA3"}}, "peft_type IA3 is not supported"),
    "loha": ({"config": {"peft_type": "LOHA"}}, "peft_type LOHA is not supported"),
    "missing weights": ({"drop": "adapter_model.safetensors"}, "the adapter's weights are missing"),
    "rank mismatch": ({"config": {"r": 8}}, "rank 4 but adapter_config.json gives"),
    "missing module": (
        {"tensors": _rename("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj")},
        "'model.layers.7.self_attn.q_proj.weight' does not exist in the base",
    ),
    "A/B inconsistent": (
        {"tensors": _reshape("layers.0.self_attn.q_proj.lora_B", lambda v: torch.cat([v, v], 1))},
        "B's columns must equal A's rows",
    ),
    "shape vs base": (
        {"tensors": _reshape("layers.0.mlp.up_proj.lora_A", lambda v: torch.cat([v, v], 1))},
        "the adapter does not fit this base",
    ),
    "int factors": (
        {"tensors": _reshape("layers.0.self_attn.v_proj.lora_A", lambda v: v.to(torch.int8))},
        "is not a float dtype",
    ),
    "half of a pair": (
        {"tensors": lambda sd: {k: v for k, v in sd.items() if "layers.0.self_attn.o_proj.lora_B" not in k}},
        "has no lora_B",
    ),
    "pissa": ({"config": {"init_lora_weights": "pissa"}}, "applies to a modified base"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_adapter_is_one_line_exit_3_nothing_written(case, llama, adapters, tmp_path):
    (la, _), dense = adapters
    kw, match = BAD[case]
    bad = _broken(la, tmp_path / "bad-lora", **kw)
    r = _recipe(tmp_path, llama, [bad, dense[1]])
    before = {str(p): tree_digest(p) for p in (bad, llama, dense[1])}
    for cmd in (["validate", str(r)], ["merge", str(r), str(tmp_path / "out")]):
        res = runner.invoke(app, cmd)
        text = " ".join(res.output.split())
        assert res.exit_code == 3, res.output
        assert match in text and "Traceback" not in res.output, text
        assert len(res.output.strip().splitlines()) <= 3  # one error line (wrapped by the console at most)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.mergelab-tmp-*"))
    assert {str(p): tree_digest(p) for p in (bad, llama, dense[1])} == before


def test_dora_on_an_embedding_is_refused_naming_adapter_and_key(llama, adapters, tmp_path):
    _, dense = adapters
    bad = make_adapter(llama, tmp_path / "dora-emb", target_modules=["embed_tokens"], use_dora=True)
    res = runner.invoke(app, ["validate", str(_recipe(tmp_path, llama, [bad, dense[1]]))])
    assert res.exit_code == 3 and "DoRA on an embedding is not supported" in " ".join(res.output.split())
    assert "adapter_model.safetensors: key 'base_model.model.model.embed_tokens" in " ".join(res.output.split())


def test_adapter_without_a_base_says_how_to_name_one(llama, adapters, tmp_path):
    (la, _), dense = adapters
    r = tmp_path / "nobase.yaml"
    r.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": str(la)}, {"model": str(dense[1])}]}))
    res = runner.invoke(app, ["validate", str(r)])
    assert res.exit_code == 3 and "PEFT adapter" in res.output and "base+adapter" in " ".join(res.output.split())


def test_validation_reads_no_tensor_data(llama, adapters, tmp_path, monkeypatch):
    import mergelab.checkpoint.reader as ckpt

    (la, lb), _ = adapters

    def no_reads(*a, **k):
        raise AssertionError("tensor data read at plan time")

    monkeypatch.setattr(ckpt, "pread_tensor", no_reads)
    res = runner.invoke(app, ["validate", str(_recipe(tmp_path, llama, [la, lb]))])
    assert res.exit_code == 0, res.output


def test_relative_base_plus_adapter_in_a_recipe_file(llama, adapters, tmp_path):
    (la, _), dense = adapters
    shutil.copytree(llama, tmp_path / "base")
    shutil.copytree(la, tmp_path / "lora-a")
    r = tmp_path / "rel.yaml"
    r.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": "base",
                "models": [{"model": "base+lora-a"}, {"model": str(dense[1])}],
            }
        )
    )
    from mergelab.recipe import load_recipe

    assert load_recipe(r).models[0].model == f"{tmp_path / 'base'}+{tmp_path / 'lora-a'}"
    res = runner.invoke(app, ["validate", str(r)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
