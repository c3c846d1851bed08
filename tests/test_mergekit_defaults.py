"""Defaults that differ from mergekit 0.1.5 (``defaults: paper | mergekit`` and its warnings) and
parameters mergekit accepts without effect (issue 13), on the frozen mergekit fixtures."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from test_mergekit_parity import ATOL, CASES, max_diff, mergekit_output, run_mergelab, substitute

import mergelab
from mergelab.errors import RecipeError
from mergelab.methods import get_method
from mergelab.methods.mergekit_defaults import DIFFERENCES, IGNORED, markdown_table

FIXTURES = Path(__file__).parent / "fixtures" / "mergekit"
PATHS = {label: FIXTURES / "inputs" / label for label in ("base", "ft1", "ft2", "ft3", "tiny1", "tiny2", "tiny3")}


def warnings_of(recipe: dict) -> list[str]:
    plan = mergelab.plan_merge(substitute(recipe, PATHS))
    try:
        return list(plan.warnings)
    finally:
        plan.close()


def test_every_row_names_a_real_parameter_with_mergelab_default():
    for d in DIFFERENCES:
        m = get_method(d.method)
        model = m.params if d.scope == "global" else m.model_params
        fields = {(f.alias or n): f for n, f in model.model_fields.items()}
        assert d.parameter in fields, (d.method, d.parameter)
        assert fields[d.parameter].default == d.ours, (d.method, d.parameter, fields[d.parameter].default)
        model.model_validate({d.parameter: d.mergekit})  # mergekit's value is accepted here


def test_omitted_parameter_warns_naming_both_defaults():
    w = warnings_of(CASES["ties_default_density"])
    assert any("'density' not set" in x and "0.2" in x and "1.0" in x and "defaults: mergekit" in x for x in w), w
    assert warnings_of({**CASES["ties_default_density"], "defaults": "paper"}) == []
    assert warnings_of({**CASES["ties_default_density"], "defaults": "mergekit"}) == []
    # given for every model: no warning
    assert not any("density" in x for x in warnings_of(CASES["ties"]))


def test_warning_shows_in_validate_and_quiet_merge(tmp_path):
    from typer.testing import CliRunner

    from mergelab.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(substitute(CASES["ties_default_density"], PATHS)))
    runner = CliRunner()
    for args in (["validate", str(recipe)], ["merge", str(recipe), str(tmp_path / "out"), "-q", "--no-hash-inputs"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        assert "'density' not set" in " ".join(res.output.split()), args


@pytest.mark.parametrize("case", ["ties_default_density", "model_stock_small_tv", "breadcrumbs_ties_bound_ties"])
def test_defaults_mergekit_gives_mergekit_tensors(case, tmp_path):
    """The three documented departures vanish with ``defaults: mergekit`` alone."""
    theirs = mergekit_output(case)
    assert max_diff(run_mergelab(CASES[case], tmp_path / "paper"), theirs) > 1e-6
    assert max_diff(run_mergelab({**CASES[case], "defaults": "mergekit"}, tmp_path / "mk"), theirs) <= ATOL


def test_defaults_key_is_checked():
    with pytest.raises(RecipeError, match="defaults"):
        mergelab.plan_merge(substitute({**CASES["ties"], "defaults": "mergekt"}, PATHS))


def test_explicit_values_win_over_defaults_mergekit(tmp_path):
    recipe = {**CASES["ties"], "defaults": "mergekit"}  # every model sets density: mergekit's 1.0 not used
    assert max_diff(run_mergelab(recipe, tmp_path / "a"), mergekit_output("ties")) <= ATOL


def test_task_arithmetic_accepts_mergekits_ignored_parameters(tmp_path):
    """mergekit 0.1.5 accepts ``density`` (per model), ``rescale`` and ``int8_mask`` for
    task_arithmetic and ignores them: the recipe runs, gives mergekit's tensors, and warns."""
    recipe = CASES["task_arithmetic"]
    models = [{**m, "parameters": {**m["parameters"], "density": 0.5}} for m in recipe["models"]]
    noisy = {**recipe, "models": models, "parameters": {**recipe["parameters"], "rescale": True, "int8_mask": True}}
    w = warnings_of(noisy)
    assert any("'density' has no effect" in x for x in w) and any("'rescale' has no effect" in x for x in w), w
    assert not any("int8_mask" in x for x in w)  # a memory option in mergekit: results unchanged anyway
    assert max_diff(run_mergelab(noisy, tmp_path / "out"), mergekit_output("task_arithmetic")) <= ATOL
    assert set(IGNORED["task_arithmetic"]) == {"density", "rescale"}


def test_docs_list_every_default_difference():
    doc = (Path(__file__).parents[1] / "docs" / "mergekit.md").read_text()
    assert markdown_table() in doc, "regenerate the table: python -m mergelab.methods.mergekit_defaults"


MERGEKIT_PYTHON = os.environ.get("MERGEKIT_PYTHON")

_SPECS = """
import json
from mergekit.merge_methods.registry import registered_methods
print(json.dumps({m.spec.name: {p.name: (None if p.required else p.default) for p in m.spec.parameters}
                  for m in registered_methods()}))
"""


@pytest.mark.skipif(not MERGEKIT_PYTHON, reason="set MERGEKIT_PYTHON to a python with mergekit 0.1.5")
def test_mergekit_values_are_mergekits_own_defaults():
    """Each row's mergekit value is the default in mergekit's parameter spec; every other shared
    parameter's default agrees between the tools (so the table is complete)."""
    specs = json.loads(
        subprocess.run([MERGEKIT_PYTHON, "-c", _SPECS], capture_output=True, text=True, check=True).stdout
    )
    listed = {(d.method, d.parameter) for d in DIFFERENCES}
    for d in DIFFERENCES:
        if d.mergekit_key:
            assert specs[d.method][d.parameter] == d.mergekit, d
    from mergelab.methods import all_methods

    for m in all_methods():
        for name in {m.name, *m.aliases} & set(specs):
            ours = {
                (f.alias or n): f.default for model in (m.params, m.model_params) for n, f in model.model_fields.items()
            }
            for p, theirs in specs[name].items():
                if theirs is None or (m.name, p) in listed or p not in ours:
                    continue  # required in mergekit, listed, or accepted elsewhere
                assert ours[p] == theirs or (
                    isinstance(theirs, float) and torch.isclose(torch.tensor(float(ours[p])), torch.tensor(theirs))
                ), (name, p, ours[p], theirs)
