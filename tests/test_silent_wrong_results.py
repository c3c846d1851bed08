"""Issue 13, "silent wrong results": inputs that used to merge into a wrong model with exit 0.

Each case is now either merged correctly or refused with a one-line error before any output.
"""

from __future__ import annotations

import pytest
import torch

import mergelab
from mergelab.errors import ParameterError

# ------------------------------------------------------------------ booleans for numbers


def _sd(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.mlp.weight": torch.randn(4, 4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g),
    }


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("ties", {"model_parameters": [{"density": True}]}),  # per-model scalar
        ("ties", {"parameters": {"density": True}}),  # a per-model parameter set at the top level
        ("dare_linear", {"parameters": {"density": {"filter": "mlp", "value": True}}}),  # a condition
        ("dare_ties", {"parameters": {"density": [{"filter": "norm", "value": 0.5}, {"value": False}]}}),
        ("breadcrumbs", {"model_parameters": [{"density": [0.5, True]}]}),  # a gradient's point
        ("della", {"model_parameters": [{"density": [True, 0.5]}]}),  # resolved for no tensor either
        ("task_arithmetic", {"parameters": {"lambda": True}}),  # a global parameter
        ("task_arithmetic", {"model_parameters": [{"weight": False}]}),
        ("slerp", {"parameters": {"t": True}}),
    ],
)
def test_boolean_is_refused_for_numeric_parameters(method, kwargs):
    base, expert = _sd(0), _sd(1)
    with pytest.raises(ParameterError, match=r"boolean .* where a number is expected") as info:
        mergelab.merge_state_dicts(method, [expert], base=base, **kwargs)
    assert "\n" not in str(info.value)


def test_boolean_parameters_still_take_booleans_and_numbers_their_strings():
    base, expert = _sd(0), _sd(1)
    got = mergelab.merge_state_dicts("task_arithmetic", [expert], base=base, parameters={"normalize": True})
    want = mergelab.merge_state_dicts("task_arithmetic", [expert], base=base, parameters={"normalize": 1})
    assert all(torch.equal(got[k], want[k]) for k in got)
    # a numeric string names its number exactly (YAML 1.1 reads `1e-3` as a string): accepted
    a = mergelab.merge_state_dicts("ties", [expert], base=base, model_parameters=[{"density": "0.5"}])
    b = mergelab.merge_state_dicts("ties", [expert], base=base, model_parameters=[{"density": 0.5}])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_boolean_density_in_a_yaml_recipe_exits_2(family, tmp_path):
    from typer.testing import CliRunner

    from mergelab.cli import app

    base, experts = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {experts[0]}\n    parameters:\n"
        "      density: true\n      weight: 1.0\n"
    )
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["merge", str(recipe), str(out)])
    assert res.exit_code == 2, res.output
    assert "density" in res.output and "boolean" in res.output
    assert not out.exists()
