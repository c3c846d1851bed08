"""Bad input: a one-line message naming the file/tensor and fix, a non-zero exit, no output, inputs untouched."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergelab.cli import app

runner = CliRunner()


def tree_digest(path: Path) -> dict[str, str]:
    """SHA-256 and mtime of every file under ``path`` (to prove inputs are never modified)."""
    out = {}
    for f in sorted(path.rglob("*")):
        if f.is_file():
            out[str(f.relative_to(path))] = hashlib.sha256(f.read_bytes()).hexdigest() + f":{f.stat().st_mtime_ns}"
    return out


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _recipe(tmp: Path, base: Path, experts: list[Path], method: str = "ties", **extra) -> Path:
    data = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(e), "parameters": {"weight": 1.0, "density": 0.5} if method == "ties" else {"weight": 1.0}}
            for e in experts
        ],
    }
    data.update(extra)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _edit_tensor(folder: Path, name: str, fn) -> None:
    for f in folder.glob("*.safetensors"):
        sd = load_file(str(f))
        if name in sd:
            sd[name] = fn(sd[name])
            save_file(sd, str(f), metadata={"format": "pt"})
            return
    raise KeyError(name)


def _run_fails(
    tmp: Path, recipe: Path, inputs: list[Path], *match: str, code: int | None = None, out: Path | None = None
):
    before = {str(p): tree_digest(p) for p in inputs}
    out = out or tmp / "out"
    result = runner.invoke(app, ["merge", str(recipe), str(out)])
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code
    text = " ".join(result.output.split())
    for m in match:
        assert m in text, f"{m!r} not in {text!r}"
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.mergelab-tmp-*")), "temporary folder left behind"
    for p in inputs:
        assert tree_digest(p) == before[str(p)], f"input {p} was modified"
    return text


def test_mismatched_shape(family, tmp_path):
    base, experts = family
    bad = _copy(experts[0], tmp_path / "bad")
    name = "model.layers.0.mlp.up_proj.weight"
    _edit_tensor(bad, name, lambda t: torch.zeros(t.shape[0] + 1, t.shape[1]))
    r = _recipe(tmp_path, base, [bad, experts[1]])
    _run_fails(tmp_path, r, [base, bad], str(bad), name, "shape", code=4)


def test_vocabulary_mismatch_names_the_fix(family, tmp_path):
    base, experts = family
    bad = _copy(experts[0], tmp_path / "bad")
    _edit_tensor(bad, "model.embed_tokens.weight", lambda t: torch.cat([t, t[:3]]))
    r = _recipe(tmp_path, base, [bad])
    _run_fails(tmp_path, r, [base, bad], "vocabulary size 131", "128", "vocab_mismatch: truncate")


def test_vocabulary_truncate_option_merges(family, tmp_path):
    base, experts = family
    bad = _copy(experts[0], tmp_path / "bigvocab")
    _edit_tensor(bad, "model.embed_tokens.weight", lambda t: torch.cat([t, t[:3]]))
    r = _recipe(tmp_path, base, [bad], vocab_mismatch="truncate")
    res = runner.invoke(app, ["merge", str(r), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    emb = {}
    for f in (tmp_path / "out").glob("*.safetensors"):
        emb.update(load_file(str(f)))
    assert emb["model.embed_tokens.weight"].shape[0] == 128


def test_missing_tensor(family, tmp_path):
    base, experts = family
    bad = _copy(experts[0], tmp_path / "bad")
    name = "model.layers.1.self_attn.q_proj.weight"
    for f in bad.glob("*.safetensors"):
        sd = load_file(str(f))
        if name in sd:
            del sd[name]
            save_file(sd, str(f), metadata={"format": "pt"})
    r = _recipe(tmp_path, base, [bad])
    _run_fails(tmp_path, r, [base, bad], str(bad), "missing tensor", name)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_input(family, tmp_path, value):
    base, experts = family
    bad = _copy(experts[1], tmp_path / "bad")
    name = "model.layers.1.mlp.down_proj.weight"

    def poison(t):
        t = t.clone()
        t[0, 0] = value
        return t

    _edit_tensor(bad, name, poison)
    r = _recipe(tmp_path, base, [experts[0], bad])
    _run_fails(tmp_path, r, [base, bad], str(bad), name, "NaN or Inf", code=5)


def test_truncated_safetensors(family, tmp_path):
    base, experts = family
    bad = _copy(experts[0], tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    r = _recipe(tmp_path, base, [bad])
    _run_fails(tmp_path, r, [base, bad], shard.name, "truncated", code=3)


def test_corrupt_safetensors_header(family, tmp_path):
    base, experts = family
    bad = _copy(experts[0], tmp_path / "bad")
    shard = sorted(bad.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[10:40] = b"\xff" * 30
    shard.write_bytes(bytes(data))
    r = _recipe(tmp_path, base, [bad])
    _run_fails(tmp_path, r, [base, bad], shard.name, "corrupt", code=3)


def test_nonexistent_path(family, tmp_path):
    base, _ = family
    r = _recipe(tmp_path, base, [tmp_path / "no-such-model"])
    _run_fails(tmp_path, r, [base], "no-such-model", "no such file or folder", code=3)


def test_unknown_method_suggests(family, tmp_path):
    base, experts = family
    r = _recipe(tmp_path, base, experts[:1], method="tiess")
    _run_fails(tmp_path, r, [base], "unknown merge_method 'tiess'", "did you mean ties", code=2)


@pytest.mark.parametrize(
    "params,match",
    [
        ({"density": 1.5}, "density"),
        ({"weight": float("nan")}, "weight"),
        ({"densty": 0.2}, "densty"),
    ],
)
def test_out_of_range_or_unknown_parameter(family, tmp_path, params, match):
    base, experts = family
    data = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(experts[0]), "parameters": params}],
    }
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(data))
    text = _run_fails(tmp_path, r, [base], match, code=2)
    assert str(experts[0]) in text


def test_bad_value_inside_a_filter_is_caught_before_reading(family, tmp_path):
    base, experts = family
    data = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [{"model": str(experts[0])}],
        "parameters": {"density": [{"filter": "mlp", "value": 2.0}, {"value": 0.2}]},
    }
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(data))
    _run_fails(tmp_path, r, [base], "mlp", "density", code=2)


def test_unknown_recipe_key(family, tmp_path):
    base, experts = family
    r = _recipe(tmp_path, base, experts[:1], merge_methd="ties")
    _run_fails(tmp_path, r, [base], "merge_methd", code=2)


def test_existing_destination_refused_then_forced(family, tmp_path):
    base, experts = family
    r = _recipe(tmp_path, base, experts[:1], method="task_arithmetic")
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    res = runner.invoke(app, ["merge", str(r), str(out)])
    assert res.exit_code != 0 and "--force" in " ".join(res.output.split())
    assert (out / "keep.txt").read_text() == "precious"
    res = runner.invoke(app, ["merge", str(r), str(out), "--force", "-q"])  # not a mergelab output
    assert res.exit_code == 6 and "--force-any" in " ".join(res.output.split()), res.output
    assert (out / "keep.txt").read_text() == "precious"
    res = runner.invoke(app, ["merge", str(r), str(out), "--force-any", "-q"])
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    res = runner.invoke(app, ["merge", str(r), str(out), "--force", "-q"])  # now a mergelab output
    assert res.exit_code == 0, res.output
    assert not list(tmp_path.glob(".exists.mergelab-*"))


def test_method_failure_leaves_no_output(family, tmp_path):
    _base, experts = family
    data = {
        "merge_method": "linear",
        "models": [
            {"model": str(experts[0]), "parameters": {"weight": 1.0}},
            {"model": str(experts[1]), "parameters": {"weight": -1.0}},
        ],
    }
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(data))
    _run_fails(tmp_path, r, [experts[0], experts[1]], "linear", "sum to zero")


# --- issue 13, "every error one line": recipes, options, Python arguments, adapters, Hub ids ----------


def _validate_fails(recipe: Path, *match: str, code: int) -> str:
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    text = " ".join(result.output.split())
    for m in match:
        assert m in text, f"{m!r} not in {text!r}"
    return text


def test_recipe_with_non_utf8_bytes_names_file_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"merge_method: ties\nbase_model: caf\xe9\n")  # 0xe9 at byte 19 + 15 = 34, line 2
    _validate_fails(path, str(path), "not UTF-8", "byte offset 34", "line 2", "0xe9", code=2)


@pytest.mark.parametrize("shape", ["flow", "block"])
def test_recipe_yaml_nested_thousands_deep_is_one_line(tmp_path, shape):
    path = tmp_path / "deep.yaml"
    if shape == "flow":
        path.write_text("merge_method: ties\nparameters: " + "[" * 5000 + "]" * 5000 + "\n")
    else:
        path.write_text("merge_method: ties\nparameters:\n" + "".join("  " * (i + 1) + f"k{i}:\n" for i in range(3000)))
    _validate_fails(path, str(path), "nested too deeply", code=2)


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = tmp_path / "recipe.yaml"
    # line 4 is indented one column less than the mapping it belongs to (line 3, column 5)
    path.write_text("merge_method: ties\nmodels:\n  - model: ./a\n   parameters: {weight: 1}\n")
    text = _validate_fails(path, f"{path}:4:4: invalid YAML", code=2)
    assert "line 3, column 3" in text
    path.write_text("merge_method: ties\nparameters: {lambda: [1, 2}\n")
    _validate_fails(path, f"{path}:2:27: invalid YAML", code=2)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--threads", "-1"], "--threads -1: give at least 1"),
        (["--threads", "0"], "--threads 0: give at least 1"),
        (["--device", "tpu"], "--device tpu: unknown device; use cpu, cuda, cuda:N, mps or auto"),
        (["--device", "cuda:banana"], "unknown device"),
    ],
)
def test_bad_threads_or_device_is_one_line_before_any_work(family, tmp_path, args, match):
    base, experts = family
    r = _recipe(tmp_path, base, experts[:2])
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", str(r), str(out), "-q", *args])
    assert result.exit_code == 2, result.output
    assert match in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()


def test_unavailable_cuda_or_mps_is_a_clear_message(family, tmp_path, monkeypatch):
    base, experts = family
    r = _recipe(tmp_path, base, experts[:2])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for dev, match in (("cuda", "no CUDA GPU is available"), ("mps", "MPS (Apple GPU) is not available")):
        result = runner.invoke(app, ["merge", str(r), str(tmp_path / "out"), "-q", "--device", dev])
        assert result.exit_code == 2, result.output
        assert match in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_api_merge_checks_options_before_any_work(family, tmp_path):
    import mergelab

    base, experts = family
    r = _recipe(tmp_path, base, experts[:2])
    out = tmp_path / "out"
    bad_calls = [
        ({"threads": -1}, "--threads -1"),
        ({"threads": 0}, "--threads 0"),
        ({"device": "tpu"}, "unknown device"),
        ({"device": 3}, "device: expected a string"),
        ({"seed": "x"}, "seed: expected a whole number"),
        ({"max_shard_size": None}, "max_shard_size"),
        ({"executor": None}, "executor: expected"),
        ({"out_dtype": 3}, "out_dtype: expected a dtype name"),
    ]
    for kwargs, match in bad_calls:
        with pytest.raises(mergelab.errors.RecipeError, match=match):
            mergelab.merge(r, out, **kwargs)
        assert not out.exists()
    with pytest.raises(mergelab.errors.RecipeError, match="out: expected a folder path"):
        mergelab.merge(r, None)  # type: ignore[arg-type]
    for bad in (None, 3, 2.5, ["a"]):
        with pytest.raises(mergelab.errors.RecipeError, match="recipe: expected a YAML file path"):
            mergelab.merge(bad, out)  # type: ignore[arg-type]
        with pytest.raises(mergelab.errors.RecipeError, match="recipe: expected a YAML file path"):
            mergelab.plan_merge(bad)  # type: ignore[arg-type]
        with pytest.raises(mergelab.errors.RecipeError, match="recipe: expected a YAML file path"):
            mergelab.load_recipe(bad)  # type: ignore[arg-type]


def test_merge_state_dicts_wrong_types_are_one_line_errors(tmp_path):
    import mergelab
    from mergelab.errors import InputDataError, OptionError

    sd = {"w": torch.ones(4)}
    cases = [
        (lambda: mergelab.merge_state_dicts("task_arithmetic", str(tmp_path), base=sd), "experts must be a list"),
        (lambda: mergelab.merge_state_dicts("task_arithmetic", None, base=sd), "(one entry per expert), got None"),
        (lambda: mergelab.merge_state_dicts("task_arithmetic", sd, base=sd), "experts must be a list"),
        (lambda: mergelab.merge_state_dicts("task_arithmetic", [str(tmp_path)], base=sd), "experts[0]: got the path"),
        (lambda: mergelab.merge_state_dicts("task_arithmetic", [tmp_path], base=sd), "experts[0]: got the path"),
        (lambda: mergelab.merge_state_dicts("task_arithmetic", [sd], base="base/"), "base: got the path"),
        (lambda: mergelab.merge_state_dicts("task_arithmetic", [None], base=sd), "experts[0]: expected a state dict"),
        (lambda: mergelab.merge_state_dicts("task_arithmetic", [{1: torch.ones(4)}], base=sd), "names must be"),
        (lambda: mergelab.merge_state_dicts(None, [sd], base=sd), "method: expected a method name"),
        (lambda: mergelab.merge_state_dicts("task_arithmetic", [sd], base=sd, parameters=[1]), "parameters: expected"),
        (
            lambda: mergelab.merge_state_dicts("task_arithmetic", [sd], base=sd, model_parameters={"weight": 1}),
            "model_parameters: expected a list",
        ),
        (lambda: mergelab.merge_state_dicts("task_arithmetic", [sd], base=sd, device="tpu"), "unknown device"),
        (lambda: mergelab.merge_state_dicts("task_arithmetic", [sd], base=sd, seed=None), "seed"),
        (lambda: mergelab.merge_tensors("task_arithmetic", torch.ones(2, 4), base=torch.ones(4)), "must be a list"),
        (lambda: mergelab.merge_tensors("task_arithmetic", None, base=torch.ones(4)), "must be a list"),
        (lambda: mergelab.merge_tensors("task_arithmetic", [sd], base=torch.ones(4)), "takes tensors"),
        (lambda: mergelab.merge_tensors("task_arithmetic", [torch.ones(4)], name=3), "name: expected"),
    ]
    for call, match in cases:
        with pytest.raises(OptionError) as info:
            call()
        assert match in str(info.value) and "\n" not in str(info.value)
    meta = {"w": torch.ones(4, device="meta")}
    with pytest.raises(InputDataError, match="'w' is on the meta device"):
        mergelab.merge_state_dicts("task_arithmetic", [meta], base=sd)
    with pytest.raises(InputDataError, match="base: tensor 'w' is on the meta device"):
        mergelab.merge_state_dicts("task_arithmetic", [sd], base=meta)
    with pytest.raises(InputDataError, match="meta device"):
        mergelab.merge_tensors("task_arithmetic", [torch.ones(4)], base=torch.ones(4, device="meta"))
    with torch.device("meta"):
        module = torch.nn.Linear(4, 4)
    with pytest.raises(InputDataError, match="experts\\[0\\]: tensor 'weight' is on the meta device"):
        mergelab.merge_state_dicts("task_arithmetic", [module], base=torch.nn.Linear(4, 4))


def _peft_adapter(folder: Path) -> Path:
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        '{"peft_type": "LORA", "base_model_name_or_path": "some/other-model", "r": 4, "target_modules": ["q_proj"]}'
    )
    save_file(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
        },
        str(folder / "adapter_model.safetensors"),
    )
    return folder


def test_peft_adapter_of_another_base_is_refused_and_without_a_base_says_it_is_an_adapter(family, tmp_path):
    # adapters are merge inputs now (tests/lora); one recorded on another base is refused in one line
    base, experts = family
    adapter = _peft_adapter(tmp_path / "my-lora")
    r = _recipe(tmp_path, base, [adapter, experts[1]])
    text = _run_fails(tmp_path, r, [base, adapter], str(adapter), "trained on 'some/other-model'", code=3)
    assert "allow_adapter_base_mismatch" in text
    result = runner.invoke(app, ["inspect", str(adapter / "adapter_model.safetensors")])
    assert result.exit_code == 3 and "PEFT adapter on some/other-model" in result.output


def test_single_name_hub_id_is_tried_on_the_hub(family, tmp_path, monkeypatch):
    import huggingface_hub

    base, _ = family
    tried: list[str] = []

    def fake_snapshot_download(repo_id, **kwargs):
        tried.append(repo_id)
        return str(base)  # as if the Hub had it in its cache

    monkeypatch.chdir(tmp_path)  # no local folder named gpt2
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    result = runner.invoke(app, ["inspect", "gpt2"])
    assert result.exit_code == 0, result.output
    assert tried == ["gpt2"] and "LlamaForCausalLM" in result.output


def test_single_name_hub_id_offline_is_one_line(family, tmp_path, monkeypatch):
    import huggingface_hub.constants

    base, _ = family
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty Hub cache
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    r = _recipe(tmp_path, base, ["gpt2"])
    text = _run_fails(tmp_path, r, [base], "gpt2: no such local file or folder", "Hugging Face Hub id", code=3)
    assert "offline" in text
