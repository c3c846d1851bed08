"""Recipes: mergekit format, per-tensor resolution of filters and gradients, validation."""

from __future__ import annotations

import pytest
import yaml

from mergelab.errors import RecipeError
from mergelab.plan import build_plan, layer_index, num_layers_from
from mergelab.recipe import load_recipe, resolve_setting


def test_resolve_scalar_gradient_and_filters():
    assert resolve_setting(0.3, "x", 0.7) == 0.3
    # gradient [0, 0.5, 1] interpolated over depth
    assert resolve_setting([0, 0.5, 1], "x", 0.0) == 0
    assert resolve_setting([0, 0.5, 1], "x", 0.25) == pytest.approx(0.25)
    assert resolve_setting([0, 0.5, 1], "x", 0.75) == pytest.approx(0.75)
    assert resolve_setting([0, 1, 0], "x", 0.5) == pytest.approx(1.0)
    assert resolve_setting([0.2, 0.8], "x", 1.0) == pytest.approx(0.8)
    conds = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}]
    assert resolve_setting(conds, "model.layers.3.self_attn.q_proj.weight", 0.5) == pytest.approx(0.5)
    assert resolve_setting(conds, "model.layers.3.self_attn.q_proj.weight", 1.0) == pytest.approx(1.0)
    assert resolve_setting(conds, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.9
    assert resolve_setting(conds, "model.norm.weight", 0.0) == 0.5
    assert resolve_setting([{"filter": "mlp", "value": 1}], "lm_head.weight", 0) is None


def test_layer_index_patterns():
    assert layer_index("model.layers.11.mlp.up_proj.weight") == 11
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("encoder.layer.5.attention.self.query.weight") == 5
    assert layer_index("encoder.block.2.layer.0.SelfAttention.q.weight") == 2
    assert layer_index("model.embed_tokens.weight") is None
    assert num_layers_from({"num_hidden_layers": 7}, []) == 7
    assert num_layers_from(None, ["a.layers.0.w", "a.layers.4.w"]) == 5


def test_mergekit_slerp_slices_recipe_runs_unchanged(family, tmp_path):
    base, experts = family
    text = f"""
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {experts[0]}
        layer_range: [0, 2]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""
    p = tmp_path / "slerp.yaml"
    p.write_text(text)
    recipe = load_recipe(p)
    plan = build_plan(recipe)
    try:
        t = {j.name: j.params.t for j in plan.merge_jobs}
        # 2 layers: layer 0 at depth 0, layer 1 at depth 1 (mergekit's rule)
        assert t["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(0)
        assert t["model.layers.1.self_attn.q_proj.weight"] == pytest.approx(1)
        assert t["model.layers.0.mlp.up_proj.weight"] == pytest.approx(1)
        assert t["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0)
        assert t["model.norm.weight"] == pytest.approx(0.5)
        assert [r.label for r in plan.experts] == [str(experts[0])]
    finally:
        plan.close()


def test_global_default_for_per_model_parameter(family):
    base, experts = family
    recipe = load_recipe(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(experts[0])}, {"model": str(experts[1]), "parameters": {"density": 0.7}}],
            "parameters": {"density": 0.3, "lambda": 0.9},
        }
    )
    plan = build_plan(recipe)
    try:
        job = plan.merge_jobs[0]
        assert [m.density for m in job.model_params] == [0.3, 0.7]
        assert job.params.lambda_ == 0.9
    finally:
        plan.close()


def test_base_listed_among_models_is_not_an_expert(family):
    base, experts = family
    recipe = load_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(experts[0])}],
        }
    )
    plan = build_plan(recipe)
    try:
        assert [r.label for r in plan.experts] == [str(experts[0])]
    finally:
        plan.close()


def test_relative_paths_resolve_against_recipe_folder(family, tmp_path):
    base, experts = family
    sub = tmp_path / "r"
    sub.mkdir()
    (sub / "base").symlink_to(base)
    (sub / "e0").symlink_to(experts[0])
    (sub / "x.yaml").write_text(
        yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "e0"}]})
    )
    recipe = load_recipe(sub / "x.yaml")
    assert recipe.base_model == str(sub / "base")


@pytest.mark.parametrize(
    "data,match",
    [
        ({"merge_method": "ties", "models": []}, "no models"),
        ({"merge_method": "ties", "models": [{"model": "a"}], "dtype": "float8"}, "unknown dtype"),
        ({"models": [{"model": "a"}]}, "merge_method"),
        (
            {"merge_method": "ties", "models": [{"model": "a"}], "tokenizer_source": "union", "tokenizer": {}},
            "tokenizer_source or a tokenizer: block, not both",
        ),
        ({"merge_method": "ties", "models": [{"model": "a"}], "chat_template": "chatlm"}, "chat_template 'chatlm'"),
    ],
)
def test_recipe_validation_errors(data, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(data)


def test_method_needs_base(family):
    _, experts = family
    with pytest.raises(RecipeError, match="needs a base_model"):
        build_plan(load_recipe({"merge_method": "ties", "models": [{"model": str(experts[0])}]}))


def test_global_parameter_given_per_model_is_explained(family):
    base, experts = family
    recipe = load_recipe(
        {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [{"model": str(experts[0]), "parameters": {"lambda": 2}}],
        }
    )
    with pytest.raises(RecipeError, match="global parameter"):
        build_plan(recipe)


def test_named_chat_template_is_bundled_and_jinja_written(family, tmp_path):
    base, experts = family
    assert load_recipe({"merge_method": "linear", "models": [{"model": str(base)}], "chat_template": "chatml"})
    import mergelab

    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    out = tmp_path / "o"
    mergelab.merge({"merge_method": "linear", "models": [{"model": str(experts[0])}], "chat_template": jinja}, out)
    assert (out / "chat_template.jinja").read_text() == jinja


def test_hub_ids_resolve_through_huggingface_hub(family, monkeypatch):
    base, _ = family
    import mergelab.checkpoint.reader as reader_mod

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(base)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    r = reader_mod.open_checkpoint("some-org/some-model")
    try:
        assert calls and calls[0][0] == "some-org/some-model"
        assert any(p.endswith(".safetensors") for p in calls[0][1])
        assert "model.layers.0.mlp.up_proj.weight" in r.tensors()
    finally:
        r.close()
