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
