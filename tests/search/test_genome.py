"""The space file and the genome: coordinates decoded into recipe parameters as mergekit-evolve does,
checked against recipes written out by hand, and the merge those parameters give."""

from __future__ import annotations

import pytest
import torch
import yaml

from mergelab.errors import ParameterError, RecipeError
from mergelab.executors.memory import MergeSession
from mergelab.methods import get_method
from mergelab.recipe import Recipe
from mergelab.search.genome import Genome, apply_assignment
from mergelab.search.space import SearchSpace, decode_value, load_space, validate_space

EXPERTS = ["a", "b", "c"]


def _space(**kw) -> SearchSpace:
    return SearchSpace.model_validate(kw)


def test_one_group_genome_matches_mergekit_layout_x0_and_decoding() -> None:
    sp = _space(model_parameters={"weight": {"low": -1, "high": 1}, "density": {"low": -1, "high": 2}})
    g = Genome(sp, EXPERTS, num_layers=4)
    # (groups=1, models=3, sets=1, params=2) flattened in C order: model-major, then parameter
    assert g.names == ["weight.m0", "density.m0", "weight.m1", "density.m1", "weight.m2", "density.m2"]
    # mergekit-evolve's initial genotype: weight 1/N, density 1
    assert g.x0() == pytest.approx([1 / 3, 1, 1 / 3, 1, 1 / 3, 1])
    a = g.decode([-0.25, 1.5, 0.5, -0.3, 0.0, 0.7])
    # |x| for weights, clamp(|x|, 0, 1) for densities
    assert a.parameters == {}
    assert a.model_parameters == [
        {"weight": 0.25, "density": 1.0},
        {"weight": 0.5, "density": 0.3},
        {"weight": 0.0, "density": 0.7},
    ]


def test_negative_weights_and_direct_decoding() -> None:
    assert decode_value(_space(allow_negative_weights=True), "weight", -0.5) == -0.5
    assert decode_value(_space(decode="direct"), "density", 1.7) == 1.7
    assert decode_value(_space(), "density", -1.7) == 1.0
    assert decode_value(_space(), "gamma", -0.2) == -0.2  # only weight / t / density are decoded


def test_layer_groups_filters_and_globals_give_the_hand_written_recipe() -> None:
    sp = _space(
        model_parameters={"weight": {"low": 0, "high": 1}},
        parameters={"lambda": {"low": 0.5, "high": 2}},
        layer_granularity=2,
        filters=["self_attn"],
    )
    g = Genome(sp, ["a", "b"], num_layers=4)
    # per-model: (groups 2, models 2, sets 2, params 1); then global: (groups 2, sets 2, params 1)
    assert g.names == [
        "weight.m0.g0.s0", "weight.m0.g0.s1", "weight.m1.g0.s0", "weight.m1.g0.s1",
        "weight.m0.g1.s0", "weight.m0.g1.s1", "weight.m1.g1.s0", "weight.m1.g1.s1",
        "lambda.g0.s0", "lambda.g0.s1", "lambda.g1.s0", "lambda.g1.s1",
    ]  # fmt: skip
    x = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.1, 1.2, 1.3, 1.4]
    a = g.decode(x)
    # each layer holds its group's value (layers 0-1: group 0, layers 2-3: group 1); one condition per filter + rest
    assert a.model_parameters == [
        {
            "weight": [
                {"filter": "self_attn", "value": [0.1, 0.1, 0.5, 0.5]},
                {"filter": None, "value": [0.2, 0.2, 0.6, 0.6]},
            ]
        },
        {
            "weight": [
                {"filter": "self_attn", "value": [0.3, 0.3, 0.7, 0.7]},
                {"filter": None, "value": [0.4, 0.4, 0.8, 0.8]},
            ]
        },
    ]
    assert a.parameters == {
        "lambda": [
            {"filter": "self_attn", "value": [1.1, 1.1, 1.3, 1.3]},
            {"filter": None, "value": [1.2, 1.2, 1.4, 1.4]},
        ]
    }
    recipe = Recipe.model_validate(
        {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}]}
    )
    out = yaml.safe_load(apply_assignment(recipe, a, [0, 1]).to_yaml())
    assert out["models"][1]["parameters"]["weight"][0] == {"filter": "self_attn", "value": [0.3, 0.3, 0.7, 0.7]}
    assert out["parameters"]["lambda"][1]["value"] == [1.2, 1.2, 1.4, 1.4]


def test_smooth_groups_are_one_gradient_point_per_group() -> None:
    sp = _space(model_parameters={"weight": {"low": 0, "high": 1}}, layer_granularity=2, smooth=True)
    a = Genome(sp, ["a"], num_layers=6).decode([0.1, 0.2, 0.3])
    assert a.model_parameters == [{"weight": [0.1, 0.2, 0.3]}]  # mergekit-evolve's smooth: interpolated over depth


def test_only_the_listed_models_vary() -> None:
    sp = _space(model_parameters={"weight": {"low": 0, "high": 1}}, models=["c", 0])
    g = Genome(sp, EXPERTS, num_layers=2)
    assert g.names == ["weight.m2", "weight.m0"]
    assert g.x0() == pytest.approx([0.5, 0.5])  # 1/N over the varying experts
    assert g.decode([0.9, 0.4]).model_parameters == [{"weight": 0.4}, {}, {"weight": 0.9}]


def test_per_layer_values_reach_every_layer_of_the_merge() -> None:
    """Group values decoded into per-layer gradients merge each layer with exactly its group's values."""
    g0 = torch.Generator().manual_seed(0)
    base = {f"model.layers.{i}.w": torch.randn(4, 4, generator=g0) for i in range(4)}
    base["model.embed.weight"] = torch.randn(8, 4, generator=g0)
    experts = [{k: v + torch.randn(v.shape, generator=g0) for k, v in base.items()} for _ in range(2)]
    session = MergeSession.from_state_dicts("task_arithmetic", experts, base)
    sp = _space(
        model_parameters={"weight": {"low": 0, "high": 1}},
        parameters={"lambda": {"low": 0.1, "high": 2}},
        layer_granularity=2,
    )
    g = Genome(sp, session.experts, session.plan.num_layers)
    assert session.plan.num_layers == 4 and g.n_groups == 2
    x = [0.2, 0.7, 0.9, 0.1, 1.5, 0.5]  # group 0: w = (0.2, 0.7); group 1: w = (0.9, 0.1); λ = 1.5, 0.5
    a = g.decode(x)
    merged = session.merge(a.parameters, a.model_parameters)
    for layer in range(4):
        group = layer // 2
        w = x[2 * group : 2 * group + 2]
        lam = x[4 + group]
        name = f"model.layers.{layer}.w"
        want = base[name] + lam * sum(wi * (e[name] - base[name]) for wi, e in zip(w, experts))
        torch.testing.assert_close(merged[name], want, rtol=1e-6, atol=1e-6)
    # tensors outside the blocks take group 0's values (the gradient rule)
    name = "model.embed.weight"
    want = base[name] + 1.5 * sum(wi * (e[name] - base[name]) for wi, e in zip(x[:2], experts))
    torch.testing.assert_close(merged[name], want, rtol=1e-6, atol=1e-6)


def test_granularity_must_divide_the_layers() -> None:
    sp = _space(model_parameters={"weight": {"low": 0, "high": 1}}, layer_granularity=3)
    with pytest.raises(RecipeError, match="layer_granularity 3 does not divide the 4 layers"):
        Genome(sp, EXPERTS, num_layers=4, where="space.yaml")


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"model_parameters": {"densty": {"low": 0, "high": 1}}}, "has no per-model parameter 'densty'"),
        (
            {"model_parameters": {"lambda": {"low": 0, "high": 1}}},
            "'lambda' is a global parameter of ties: move it under parameters",
        ),
        (
            {"parameters": {"density": {"low": 0, "high": 1}}},
            "'density' is a per-model parameter of ties: move it under model_parameters",
        ),
        (
            {"decode": "direct", "model_parameters": {"density": {"low": 0.1, "high": 1.5}}},
            "density = 1.5 is refused by ties",
        ),
        ({"parameters": {"sign_tie": {"low": 0, "high": 1}}}, "'sign_tie' is not a number"),
    ],
)
def test_the_methods_parameter_model_validates_the_space(space, message) -> None:
    sp, _ = load_space(space)
    with pytest.raises(ParameterError, match=message):
        validate_space(sp, get_method("ties"), "space.yaml")


def test_space_file_errors_name_the_file_and_key(tmp_path) -> None:
    bad = tmp_path / "space.yaml"
    bad.write_text("model_parameters:\n  weight: {low: 1, high: 0}\n")
    with pytest.raises(RecipeError, match=r"space.yaml: model_parameters.weight: low \(1.0\) must be below high"):
        load_space(bad)
    bad.write_text("model_parameter:\n  weight: {low: 0, high: 1}\n")
    with pytest.raises(RecipeError, match=r"space\.yaml: model_parameter: unknown key"):
        load_space(bad)
    bad.write_text("model_parameters: [\n")
    with pytest.raises(RecipeError, match=r"space.yaml:\d+:\d+: invalid YAML"):
        load_space(bad)


def test_cma_starts_at_x0_with_sigma0_in_genome_units() -> None:
    pytest.importorskip("optuna")
    from mergelab.search.options import CmaOptions
    from mergelab.search.samplers import cma_sigma, grid_values, make_sampler

    sp = _space(model_parameters={"weight": {"low": 0, "high": 1}, "density": {"low": 0, "high": 1}})
    g = Genome(sp, ["a", "b"], num_layers=2)
    sigma, note = cma_sigma(g)
    assert sigma == pytest.approx(1 / 6) and note is None  # width 1: Optuna's [0, 1] scale is the genome's
    sampler = make_sampler("cma", g, CmaOptions(), seed=0, n_objectives=1)
    assert sampler._x0 == {"weight.m0": 0.5, "density.m0": 1.0, "weight.m1": 0.5, "density.m1": 1.0}
    assert sampler._sigma0 == pytest.approx(1 / 6)
    wide = _space(model_parameters={"weight": {"low": 0, "high": 2}}, parameters={"lambda": {"low": 0.5, "high": 1.0}})
    sigma, note = cma_sigma(Genome(wide, ["a"], num_layers=2))
    assert sigma == pytest.approx((1 / 6) / 0.5) and "narrowest" in note
    # grid values: evenly spaced, log-spaced on a log scale, or the bound's own list
    logsp = _space(parameters={"lambda": {"low": 0.1, "high": 10.0, "log": True}}, grid_points=3)
    assert grid_values(Genome(logsp, ["a"], num_layers=2))["lambda"] == pytest.approx([0.1, 1.0, 10.0])
