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


@pytest.mark.parametrize(
    "density",
    [["0.2", "0.8"], [0.2, "0.8"], [{"filter": "mlp", "value": ["0.2", "0.8"]}]],
)
def test_a_gradient_of_text_is_refused(density):
    """A gradient of quoted numbers was taken step by step instead of interpolated (a silent difference)."""
    base, expert = _sd(0), _sd(1)
    with pytest.raises(ParameterError, match=r"gradient .* holds text"):
        mergelab.merge_state_dicts("ties", [expert], base=base, parameters={"density": density})


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


# ------------------------------------------------------------------ float16 overflow at the output cast


def _folder(path, tensors, config=None):
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    return path


def _overflow_inputs(tmp_path, dtype):
    """Base at 60000 and two experts at +30000 each: task arithmetic gives 120000, beyond float16."""
    base = {
        "model.layers.0.mlp.weight": torch.full((4, 4), 60000.0, dtype=dtype),
        "model.norm.weight": torch.ones(4, dtype=dtype),
    }
    experts = [
        {
            "model.layers.0.mlp.weight": torch.full(
                (4, 4), 90000.0 if dtype != torch.float16 else 65000.0, dtype=dtype
            ),
            "model.norm.weight": torch.ones(4, dtype=dtype),
        }
        for _ in range(2)
    ]
    return base, experts


@pytest.mark.parametrize(
    ("executor", "in_dtype"),
    [
        ("streaming", torch.float32),
        ("streaming", torch.float16),
        ("memory", torch.float32),
        ("memory", torch.float16),
        ("ray", torch.float32),  # the workers run the streaming executor's merge pass
    ],
)
def test_float16_output_overflow_is_refused_and_writes_nothing(tmp_path, executor, in_dtype):
    if executor == "ray":
        pytest.importorskip("ray")
    from mergelab.errors import OutputError

    base, experts = _overflow_inputs(tmp_path, in_dtype)
    b = _folder(tmp_path / "base", base)
    es = [_folder(tmp_path / f"e{i}", e) for i, e in enumerate(experts)]
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(b),
        "models": [{"model": str(e)} for e in es],
        "out_dtype": "float16",
    }
    out = tmp_path / "out"
    kwargs = {"workers": 1} if executor == "ray" else {}
    with pytest.raises(OutputError) as info:
        mergelab.merge(recipe, out, executor=executor, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and "'model.layers.0.mlp.weight'" in msg and "float16" in msg
    assert "bfloat16" in msg and "float32" in msg
    peak = 60000.0 + 2 * (float(experts[0]["model.layers.0.mlp.weight"][0, 0]) - 60000.0)
    assert f"{peak:.6g}" in msg  # the largest magnitude, named
    assert not out.exists() and not list(tmp_path.glob(".out.mergelab-tmp-*"))
    # the same merge in bfloat16 is written, finite
    mergelab.merge({**recipe, "out_dtype": "bfloat16"}, tmp_path / "bf16", executor=executor, **kwargs)


def test_float16_overflow_is_refused_in_merge_state_dicts():
    from mergelab.errors import OutputError

    base, experts = _overflow_inputs(None, torch.float16)  # float16 in, float16 out (the base's dtype)
    with pytest.raises(OutputError, match=r"beyond float16's range"):
        mergelab.merge_state_dicts("task_arithmetic", experts, base=base)
    got = mergelab.merge_state_dicts("task_arithmetic", experts, base=base, out_dtype=torch.float32)
    b, e = float(base["model.layers.0.mlp.weight"][0, 0]), float(experts[0]["model.layers.0.mlp.weight"][0, 0])
    assert float(got["model.layers.0.mlp.weight"].max()) == b + 2 * (e - b)  # 60000 + 2 · 4992 (65000 in float16)


def test_float16_overflow_cli_exits_6(tmp_path):
    from typer.testing import CliRunner

    from mergelab.cli import app

    base, experts = _overflow_inputs(tmp_path, torch.float32)
    b = _folder(tmp_path / "base", base)
    e = _folder(tmp_path / "e0", experts[0])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {e}\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["merge", str(recipe), str(out), "--out-dtype", "float16"])
    assert res.exit_code == 6, res.output
    assert "inf" in res.output and not out.exists()


# ------------------------------------------------------------------ integer and bool tensors


def _with(extra: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    return {**_sd(seed), **extra}


def test_integer_tensor_with_float_experts_is_refused_at_plan_time():
    from mergelab.errors import PlanError

    base = _with({"model.q.weight": torch.arange(16, dtype=torch.int8).reshape(4, 4)}, 0)
    expert = _with({"model.q.weight": torch.randn(4, 4)}, 1)  # a dequantized expert
    with pytest.raises(PlanError, match=r"'model\.q\.weight' is float32 \[4, 4\] but <base> has int8") as info:
        mergelab.merge_state_dicts("task_arithmetic", [expert], base=base)
    assert "\n" not in str(info.value)
    # and the other way round (a float base, an integer expert)
    with pytest.raises(PlanError, match=r"'model\.q\.weight' is int8 but <base> has float32"):
        mergelab.merge_state_dicts("task_arithmetic", [base], base=expert)
    # integers of another width are a different tensor too
    wide = _with({"model.q.weight": torch.arange(16, dtype=torch.int64).reshape(4, 4)}, 1)
    with pytest.raises(PlanError, match="int64"):
        mergelab.merge_state_dicts("linear", [base, wide])


def test_equal_integer_and_bool_tensors_are_copied():
    ids = torch.arange(8, dtype=torch.int64)
    mask = torch.tensor([True, False, True, True])
    base = _with({"model.position_ids": ids, "model.mask": mask}, 0)
    experts = [_with({"model.position_ids": ids.clone(), "model.mask": mask.clone()}, s) for s in (1, 2)]
    got = mergelab.merge_state_dicts("task_arithmetic", experts, base=base)
    assert torch.equal(got["model.position_ids"], ids) and got["model.position_ids"].dtype == torch.int64
    assert torch.equal(got["model.mask"], mask)
    # an expert that lacks the tensor is not consulted (older/newer checkpoints of one architecture)
    got = mergelab.merge_state_dicts("task_arithmetic", [_sd(1)], base=base)
    assert torch.equal(got["model.position_ids"], ids)


@pytest.mark.parametrize("kind", ["int", "bool"])
def test_differing_integer_tensors_are_refused_in_memory(kind):
    from mergelab.errors import PlanError

    a = torch.arange(8, dtype=torch.int64) if kind == "int" else torch.ones(8, dtype=torch.bool)
    b = a.clone()
    b[3] = 0 if kind == "bool" else 99
    base = _with({"model.t": a}, 0)
    expert = _with({"model.t": b}, 1)
    with pytest.raises(PlanError, match=r"<expert 0>: tensor 'model\.t' .* differs from <base>'s in 1 of 8 entries"):
        mergelab.merge_state_dicts("task_arithmetic", [expert], base=base)


@pytest.mark.parametrize("executor", ["streaming", "memory", "ray"])
def test_differing_integer_tensors_are_refused_on_disk(tmp_path, executor):
    if executor == "ray":
        pytest.importorskip("ray")
    from mergelab.errors import PlanError

    q = torch.randint(-100, 100, (4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    b = _folder(tmp_path / "base", _with({"model.q.weight": q}, 0))
    e = _folder(tmp_path / "e0", _with({"model.q.weight": q + 1}, 1))  # an expert's own quantized weights
    recipe = {"merge_method": "task_arithmetic", "base_model": str(b), "models": [{"model": str(e)}]}
    out = tmp_path / "out"
    kwargs = {"workers": 1} if executor == "ray" else {}
    with pytest.raises(PlanError, match=r"'model\.q\.weight' \(int8\) differs .* in 16 of 16 entries"):
        mergelab.merge(recipe, out, executor=executor, **kwargs)
    assert not out.exists() and not list(tmp_path.glob(".out.mergelab-tmp-*"))


def test_integer_mismatch_cli_exits_4(tmp_path):
    from typer.testing import CliRunner

    from mergelab.cli import app

    b = _folder(tmp_path / "base", _with({"model.position_ids": torch.arange(8)}, 0))
    e = _folder(tmp_path / "e0", _with({"model.position_ids": torch.arange(8).float()}, 1))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {e}\n")
    runner = CliRunner()
    for cmd in (["validate", str(recipe)], ["merge", str(recipe), str(tmp_path / "out")]):
        res = runner.invoke(app, cmd)
        assert res.exit_code == 4, res.output
        assert "position_ids" in res.output and "int64" in res.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ tied in memory, untied expert


def test_a_tied_base_module_does_not_drop_an_untied_experts_head():
    """In memory, shared storage marks tied weights; an expert whose head is its own matrix was
    silently merged through the base's alias (its lm_head ignored)."""
    emb = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    base = {"model.embed_tokens.weight": emb, "lm_head.weight": emb}  # one storage: tied
    expert = {
        "model.embed_tokens.weight": torch.randn(6, 4, generator=torch.Generator().manual_seed(1)),
        "lm_head.weight": torch.randn(6, 4, generator=torch.Generator().manual_seed(2)),
    }
    got = mergelab.merge_state_dicts("task_arithmetic", [expert], base=base, compute_dtype=torch.float64)
    for name in expert:
        assert torch.equal(got[name], expert[name]), name
    # both tied: merged once, still one storage
    tied_expert = {"model.embed_tokens.weight": expert["lm_head.weight"], "lm_head.weight": expert["lm_head.weight"]}
    got = mergelab.merge_state_dicts("task_arithmetic", [tied_expert], base=base)
    assert got["lm_head.weight"].data_ptr() == got["model.embed_tokens.weight"].data_ptr()
