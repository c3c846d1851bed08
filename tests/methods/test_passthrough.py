"""passthrough: one model's tensor, unchanged or scaled (mergekit 0.1.5's definition), in memory and
through a checkpoint merge with a per-model scale filter."""

from __future__ import annotations

import pytest
import torch
from tiny_models import load_dir

import mergelab
from mergelab.errors import MergelabError, ParameterError
from mergelab.methods.base import NoParams, TensorContext
from mergelab.methods.passthrough import PassthroughModelParams
from mergelab.methods.registry import get_method

PASS = get_method("passthrough")
CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight")


def test_without_scale_the_tensor_is_returned_as_a_copy():
    x = torch.randn(5, 3)
    out = PASS(None, [x], NoParams(), [PassthroughModelParams()], CTX)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()


@pytest.mark.parametrize("scale", [0.0, 0.5, -2.0])
def test_scale_multiplies_the_tensor(scale):
    x = torch.tensor([[1.0, -2.0], [0.25, 4.0]])
    out = PASS(None, [x], NoParams(), [PassthroughModelParams(scale=scale)], CTX)
    assert torch.equal(out, torch.tensor([[1.0, -2.0], [0.25, 4.0]]) * scale)


def test_declared_as_mergekit_declares_it():
    assert PASS.base == "ignored" and PASS.min_experts == PASS.max_experts == 1
    with pytest.raises(ValueError):
        PASS(None, [torch.ones(2), torch.ones(2)], NoParams(), [PassthroughModelParams()] * 2, CTX)


def test_two_models_are_refused_and_a_bad_scale_is_a_parameter_error():
    a, b = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    with pytest.raises(MergelabError, match="at most 1"):
        mergelab.merge_state_dicts("passthrough", [a, b])
    with pytest.raises(ParameterError, match="scale"):
        mergelab.merge_state_dicts("passthrough", [a], model_parameters=[{"scale": "big"}])


def test_the_base_is_ignored():
    x = {"w": torch.tensor([1.0, 2.0])}
    out = mergelab.merge_state_dicts("passthrough", [x], base={"w": torch.zeros(2)}, model_parameters=[{"scale": 3.0}])
    assert torch.equal(out["w"], torch.tensor([3.0, 6.0]))


def test_checkpoint_merge_with_a_scale_filter(family, tmp_path):
    _, experts = family
    recipe = {
        "merge_method": "passthrough",
        "models": [
            {"model": str(experts[0]), "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}
        ],
    }
    mergelab.merge(recipe, tmp_path / "out", max_shard_size="120KB")
    src, got = load_dir(experts[0]), load_dir(tmp_path / "out")
    assert set(got) == set(src)
    for k, v in src.items():
        assert torch.equal(got[k], torch.zeros_like(v) if "o_proj" in k else v), k
