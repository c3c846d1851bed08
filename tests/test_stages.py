"""Multi-stage recipes (mergekit-multi's form): several YAML documents, named stages read by later
ones, the unnamed final stage written to OUT. Expectations are computed from the inputs by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import load_dir
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.errors import OutputError, RecipeError
from mergelab.recipe import is_multi_stage, load_recipe, load_stages


def two_stages(base: Path, e0: Path, e1: Path) -> str:
    # stage "mid": the average of e0 and e1; final: base + 0.5 * (mid - base); "mid" is listed after its reader
    return f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - model: mid
    parameters: {{weight: 0.5}}
---
name: mid
merge_method: linear
models:
  - model: {e0}
  - model: {e1}
"""


def test_stages_run_in_dependency_order_and_the_final_goes_to_out(family, tmp_path):
    base, experts = family
    p = tmp_path / "multi.yaml"
    p.write_text(two_stages(base, experts[0], experts[1]))
    assert is_multi_stage(p) and not is_multi_stage(tmp_path / "none.yaml")
    res = mergelab.merge_stages(p, tmp_path / "out", hash_inputs=False)
    assert [r.name for r in res] == ["mid", None]
    b, a, c = load_dir(base), load_dir(experts[0]), load_dir(experts[1])
    got = load_dir(tmp_path / "out")
    assert set(got) == set(b)
    for k in b:
        want = b[k] + 0.5 * ((a[k] + c[k]) / 2 - b[k])
        torch.testing.assert_close(got[k], want, rtol=0, atol=1e-6)
    leftovers = [x.name for x in tmp_path.iterdir() if "mergelab-stages" in x.name]
    assert leftovers == []  # the temporary stage folder is removed


def test_kept_stages_are_reused_only_when_made_from_the_same_recipe(family, tmp_path):
    base, experts = family
    p = tmp_path / "multi.yaml"
    p.write_text(two_stages(base, experts[0], experts[1]))
    stages = tmp_path / "stages"
    first = mergelab.merge_stages(p, tmp_path / "out1", stages_dir=stages, hash_inputs=False)
    assert (stages / "mid" / "config.json").is_file() and first[0].result is not None
    again = mergelab.merge_stages(p, tmp_path / "out2", stages_dir=stages, hash_inputs=False)
    assert again[0].result is None and again[1].result is not None  # mid reused
    a, b = load_dir(tmp_path / "out1"), load_dir(tmp_path / "out2")
    assert all(torch.equal(a[k], b[k]) for k in a)
    p.write_text(two_stages(base, experts[0], experts[2]))
    with pytest.raises(OutputError, match="another recipe"):
        mergelab.merge_stages(p, tmp_path / "out3", stages_dir=stages, hash_inputs=False)
    assert not (tmp_path / "out3").exists()


def test_without_a_final_stage_every_stage_goes_under_out(family, tmp_path):
    _, experts = family
    p = tmp_path / "multi.yaml"
    p.write_text(
        f"""
name: one
merge_method: passthrough
slices:
  - sources: [{{model: {experts[0]}, layer_range: [0, 1]}}]
---
name: two
merge_method: passthrough
slices:
  - sources: [{{model: one, layer_range: [0, 1]}}]
  - sources: [{{model: {experts[1]}, layer_range: [1, 2]}}]
"""
    )
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(p), str(tmp_path / "out"), "--quiet", "--no-hash-inputs"])
    assert res.exit_code == 0, res.output
    # the stages, and the manifest that marks OUT as a mergelab output (so --force may replace it)
    assert sorted(x.name for x in (tmp_path / "out").iterdir()) == ["mergelab_output.json", "one", "two"]
    e0, e1, two = load_dir(experts[0]), load_dir(experts[1]), load_dir(tmp_path / "out" / "two")
    assert torch.equal(two["model.layers.0.mlp.up_proj.weight"], e0["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(two["model.layers.1.mlp.up_proj.weight"], e1["model.layers.1.mlp.up_proj.weight"])
    assert json.loads((tmp_path / "out" / "one" / "config.json").read_text())["num_hidden_layers"] == 1


def doc(model: str, name: str | None = None, extra: str = "") -> str:
    head = f"name: {name}\n" if name else ""
    return f"{head}merge_method: linear\nmodels: [{{model: {model}}}]\n{extra}"


@pytest.mark.parametrize(
    "text, match",
    [
        (doc("b", "a") + "---\n" + doc("a", "b"), "cycle"),
        (doc("x", "a") + "---\n" + doc("y", "a"), "unique"),
        (doc("x") + "---\n" + doc("y"), "no name"),
        (doc("x", "a") + "---\n" + doc("y", "b", "modelz: 1\n"), "stage b"),
    ],
)
def test_bad_multi_stage_recipes_are_one_line_recipe_errors(tmp_path, text, match):
    p = tmp_path / "multi.yaml"
    p.write_text(text)
    with pytest.raises(RecipeError, match=match) as exc:
        load_stages(p, tmp_path / "stages")
    assert "\n" not in str(exc.value)


def test_load_recipe_names_a_multi_stage_file(tmp_path):
    p = tmp_path / "multi.yaml"
    p.write_text(
        "merge_method: linear\nmodels: [{model: x}]\n---\nname: b\nmerge_method: linear\nmodels: [{model: y}]\n"
    )
    with pytest.raises(RecipeError, match="multi-stage"):
        load_recipe(p)


@pytest.mark.parametrize("final", [True, False])
def test_a_multi_stage_output_may_not_be_an_input(family, tmp_path, final):
    """OUT equal to (or holding) a model a stage reads is refused, --force or not, and the model survives."""
    base, experts = family
    p = tmp_path / "multi.yaml"
    text = two_stages(base, experts[0], experts[1])
    if not final:  # every stage named: OUT holds them all
        text = "name: last\n" + text
    p.write_text(text)
    before = {f.name: f.read_bytes() for f in Path(experts[0]).iterdir() if f.is_file()}
    for out in (Path(experts[0]), Path(experts[0]).parent):
        res = CliRunner().invoke(app, ["merge", str(p), str(out), "--quiet", "--force-any", "--no-hash-inputs"])
        assert res.exit_code == 6, res.output
        assert "input" in res.output
    assert {f.name: f.read_bytes() for f in Path(experts[0]).iterdir() if f.is_file()} == before
