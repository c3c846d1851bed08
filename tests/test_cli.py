"""The command line end to end: merge, validate, methods, inspect."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.methods import all_methods

runner = CliRunner()


def _recipe(tmp_path, base, experts, method="ties"):
    p = tmp_path / "r.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "merge_method": method,
                "base_model": str(base),
                "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.4}} for e in experts],
                "parameters": {"lambda": 1.0},
                "dtype": "bfloat16",
            }
        )
    )
    return p


def test_merge_writes_loadable_model(family, tmp_path):
    base, experts = family
    out = tmp_path / "out"
    res = runner.invoke(app, ["merge", str(_recipe(tmp_path, base, experts)), str(out), "--max-shard-size", "100KB"])
    assert res.exit_code == 0, res.output
    assert "merged" in res.output and "expected peak working memory" in res.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    for s in shards:
        assert all(t.dtype.is_floating_point for t in load_file(str(out / s)).values())


def test_validate_reads_no_tensor_data(family, tmp_path, monkeypatch):
    base, experts = family
    import mergelab.checkpoint.safetensors_file as stf

    def boom(*a, **k):
        raise AssertionError("validate must not read tensor data")

    monkeypatch.setattr(stf, "pread_tensor", boom)
    monkeypatch.setattr("mergelab.checkpoint.reader.pread_tensor", boom)
    res = runner.invoke(app, ["validate", str(_recipe(tmp_path, base, experts)), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["method"] == "ties" and summary["merged_tensors"] == 21
    assert summary["expected_peak_bytes"] > 0


def test_methods_lists_every_registered_method():
    res = runner.invoke(app, ["methods", "--markdown"])
    assert res.exit_code == 0
    for m in all_methods():
        assert f"`{m.name}" in res.output
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0 and "ties" in res.output


def test_inspect_shows_shards_and_dtypes(family):
    base, _ = family
    res = runner.invoke(app, ["inspect", str(base), "--all"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "LlamaForCausalLM" in res.output
    assert "model-00001-of-" in res.output
    assert "model.layers.1.mlp.down_proj.weight" in res.output


def test_inspect_missing_path_is_one_line_error(tmp_path):
    res = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert res.exit_code == 3
    assert "no such file or folder" in res.output and "Traceback" not in res.output


def test_merge_unknown_executor_is_one_line_error(family, tmp_path):
    base, experts = family
    res = runner.invoke(
        app, ["merge", str(_recipe(tmp_path, base, experts)), str(tmp_path / "out"), "--executor", "nosuch"]
    )
    assert res.exit_code != 0 and "unknown executor 'nosuch'" in res.output
    assert not (tmp_path / "out").exists()


def test_merge_with_the_ray_executor_matches_streaming_and_stops_its_ray(family, tmp_path):
    import pytest

    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    base, experts = family
    recipe = _recipe(tmp_path, base, experts)
    a, b = tmp_path / "streaming", tmp_path / "ray"
    res = runner.invoke(app, ["merge", str(recipe), str(a), "--max-shard-size", "100KB", "-q"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app, ["merge", str(recipe), str(b), "--max-shard-size", "100KB", "-q", "--executor", "ray", "--workers", "2"]
    )
    assert res.exit_code == 0, res.output
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert index == json.loads((b / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        assert (a / shard).read_bytes() == (b / shard).read_bytes(), shard
    assert not ray.is_initialized()  # the run started a local Ray and shut it down


def test_methods_never_wraps_the_name_column_narrow_or_piped():
    # CliRunner output is not a terminal (as when piped); COLUMNS=40 is a narrow window
    for env in ({"COLUMNS": "40"}, {"COLUMNS": "80"}, {"COLUMNS": "200"}, {}):
        res = runner.invoke(app, ["methods"], env=env)
        assert res.exit_code == 0, res.output
        lines = res.output.splitlines()
        for m in all_methods():
            # the name is whole on one line, delimited (not a prefix of a longer word)
            pat = re.compile(rf"(^|[\s│]){re.escape(m.name)}($|[\s│])")
            assert any(pat.search(line) for line in lines), (env, m.name)
        assert "task_arithm\n" not in res.output and "arithmet\n" not in res.output


def test_methods_json_lists_every_method_with_parameters_and_defaults():
    res = runner.invoke(app, ["methods", "--json"], env={"COLUMNS": "40"})
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert [d["name"] for d in data] == [m.name for m in all_methods()]
    ties = next(d for d in data if d["name"] == "ties")
    assert ties["kind"] == "data-free" and "Yadav" in ties["paper"] and ties["aliases"] == []
    params = {(p["scope"], p["name"]): p for p in ties["parameters"]}
    assert params[("per-model", "density")]["default"] == 0.2  # the TIES paper's k = 20 %
    assert params[("global", "lambda")] == {"name": "lambda", "scope": "global", "required": False, "default": 1.0}
    slerp = next(d for d in data if d["name"] == "slerp")
    assert {"name": "t", "scope": "global", "required": True, "default": None} in slerp["parameters"]
    assert next(d for d in data if d["name"] == "fisher")["kind"] == "data-informed"
    assert "fisher_merging" in next(d for d in data if d["name"] == "fisher")["aliases"]


def test_unexpected_exception_is_one_line_internal_error(family, tmp_path, monkeypatch):
    import mergelab.api

    def boom(*a, **k):
        raise ZeroDivisionError("something inside broke\nsecond line")

    monkeypatch.setattr(mergelab.api, "summarize", boom)
    monkeypatch.delenv("MERGELAB_DEBUG", raising=False)
    base, experts = family
    res = runner.invoke(app, ["validate", str(_recipe(tmp_path, base, experts))])
    assert res.exit_code == 1
    assert "internal error: ZeroDivisionError: something inside broke" in res.output
    assert "Traceback" not in res.output and "second line" not in res.output and "MERGELAB_DEBUG=1" in res.output


def test_every_user_error_class_has_a_documented_exit_code():
    """The README's exit-code table lists each family's code (the table, not the code, is under test)."""
    from pathlib import Path

    import mergelab.errors as E

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme[readme.index("<!-- exit-codes:start") : readme.index("<!-- exit-codes:end -->")]
    classes = [c for c in vars(E).values() if isinstance(c, type) and issubclass(c, E.MergelabError)]
    for cls in classes:
        if cls is E.MergelabError:
            continue
        row = next((line for line in table.splitlines() if f"`{cls.__name__}`" in line), None)
        assert row is not None, f"{cls.__name__} missing from the README's exit-code table"
        assert row.startswith(f"| {cls.exit_code} "), (cls.__name__, cls.exit_code, row)


@pytest.mark.parametrize("preset, want", [(None, "1"), ("0", "0")])
def test_the_command_puts_large_tensors_on_huge_pages_unless_the_environment_says_otherwise(preset, want, monkeypatch):
    from mergelab import cli

    if preset is None:
        monkeypatch.delenv(cli.HUGE_PAGES_ENV, raising=False)
    else:
        monkeypatch.setenv(cli.HUGE_PAGES_ENV, preset)
    seen = {}
    monkeypatch.setattr(cli, "app", lambda: seen.setdefault("value", os.environ.get(cli.HUGE_PAGES_ENV)))
    cli.main()
    assert seen["value"] == want
