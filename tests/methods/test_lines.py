"""LiNeS: depth factors on a 3-block toy (single-task and multi-task), the model-wide α from the
L1 pass against an independent computation, inner methods with their own gather passes,
forwarding of inner parameters, parameter validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import mergelab
from mergelab.errors import MergelabError, RecipeError
from mergelab.methods.base import TensorContext
from mergelab.methods.registry import get_method

LINES = get_method("lines")
NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.2.mlp.up_proj.weight",
    "model.layers.2.input_layernorm.weight",
    "model.norm.weight",
]
DEPTH = {NAMES[1]: 0.0, NAMES[2]: 0.5, NAMES[3]: 1.0, NAMES[4]: 1.0}  # ℓ/(L − 1), L = 3


def toy(n_experts, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {NAMES[0]: (10, 4), NAMES[1]: (6, 4), NAMES[2]: (6, 4), NAMES[3]: (6, 4), NAMES[4]: (4,), NAMES[5]: (4,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_experts)]
    return base, experts


def factor(alpha, beta, name):
    return alpha + beta * DEPTH[name] if name in DEPTH else alpha


# ------------------------------------------------------------------- factors on a 3-block toy


def test_single_task_factors():
    # α = 0.2, β = 1 − α = 0.8: blocks 0, 1, 2 get 0.2, 0.6, 1.0; embeddings and final norm 0.2.
    base, (expert,) = toy(1)
    out = mergelab.merge_state_dicts("lines", [expert], base, parameters={"alpha": 0.2})
    expected_factors = {NAMES[0]: 0.2, NAMES[1]: 0.2, NAMES[2]: 0.6, NAMES[3]: 1.0, NAMES[4]: 1.0, NAMES[5]: 0.2}
    for k, f in expected_factors.items():
        assert torch.allclose(out[k], base[k] + f * (expert[k] - base[k]), atol=1e-6), k


def test_single_task_beta_override():
    base, (expert,) = toy(1)
    out = mergelab.merge_state_dicts("lines", [expert], base, parameters={"alpha": 0.1, "beta": 0.4})
    k = NAMES[2]
    assert torch.allclose(out[k], base[k] + 0.3 * (expert[k] - base[k]), atol=1e-6)


def test_multi_task_on_task_arithmetic_has_alpha_one_over_t():
    base, experts = toy(3, seed=1)
    out = mergelab.merge_state_dicts("lines", experts, base, parameters={"beta": 0.6})
    for k in NAMES:
        summed = sum(e[k] - base[k] for e in experts)
        assert torch.allclose(out[k], base[k] + factor(1 / 3, 0.6, k) * summed, atol=1e-5), k


def test_multi_task_default_beta_is_half():
    base, experts = toy(2, seed=2)
    out = mergelab.merge_state_dicts("lines", experts, base)
    k = NAMES[3]
    summed = sum(e[k] - base[k] for e in experts)
    assert torch.allclose(out[k], base[k] + 1.0 * summed, atol=1e-5)  # 1/2 + 0.5 · 1


def test_multi_task_alpha_from_l1_norms_on_ties():
    # α = (‖Σ τ_i‖₁ / ‖τ_ties‖₁) / T over the whole model, computed here from an independent TIES run.
    base, experts = toy(3, seed=3)
    mp = [{"density": 0.3}] * 3
    ties = mergelab.merge_state_dicts("ties", experts, base, model_parameters=mp)
    tau_ties = {k: ties[k] - base[k] for k in NAMES}
    sum_l1 = sum(float(sum(e[k] - base[k] for e in experts).abs().sum()) for k in NAMES)
    ties_l1 = sum(float(t.abs().sum()) for t in tau_ties.values())
    alpha = sum_l1 / ties_l1 / 3
    out = mergelab.merge_state_dicts(
        "lines", experts, base, parameters={"merge_method": "ties", "beta": 0.4}, model_parameters=mp
    )
    for k in NAMES:
        assert torch.allclose(out[k], base[k] + factor(alpha, 0.4, k) * tau_ties[k], atol=1e-5), k


def test_inner_gather_passes_run_first():
    # TIES with scope: global needs its own passes; with α = 1 and β = 0 LiNeS must equal it.
    base, experts = toy(2, seed=4)
    mp = [{"density": 0.2}] * 2
    ties = mergelab.merge_state_dicts("ties", experts, base, parameters={"scope": "global"}, model_parameters=mp)
    out = mergelab.merge_state_dicts(
        "lines",
        experts,
        base,
        model_parameters=mp,
        parameters={"merge_method": "ties", "merge_parameters": "{scope: global}", "alpha": 1.0, "beta": 0.0},
    )
    for k in NAMES:
        assert torch.allclose(out[k], ties[k], atol=1e-6), k
    assert [
        p.name
        for p in LINES.passes(
            LINES.params.model_validate({"merge_method": "ties", "merge_parameters": {"scope": "global"}})
        )
    ] == ["ties.global.high", "ties.global.low", "ties.global.sign", "lines.l1"]


def test_merge_parameters_and_per_model_weights_are_forwarded():
    base, experts = toy(2, seed=5)
    k = NAMES[2]
    # inner λ = 2 doubles τ = 2 Σ τ_i and halves α to 1/4: the α part stays Σ τ_i / 2, the β part
    # doubles: factor (1/4 + 0.5 · 0.5) on 2 Σ τ_i (it would be (1/2 + 0.25) on Σ τ_i with λ = 1)
    out = mergelab.merge_state_dicts(
        "lines", experts, base, parameters={"merge_parameters": "{lambda: 2.0}", "beta": 0.5}
    )
    summed = sum(e[k] - base[k] for e in experts)
    assert torch.allclose(out[k], base[k] + (0.25 + 0.5 * 0.5) * 2 * summed, atol=1e-5)
    # weights (1, 0): τ = τ1 only
    out = mergelab.merge_state_dicts(
        "lines",
        experts,
        base,
        parameters={"alpha": 1.0, "beta": 0.0},
        model_parameters=[{"weight": 1.0}, {"weight": 0.0}],
    )
    assert torch.allclose(out[k], experts[0][k], atol=1e-6)


def test_depth_factor_uses_engine_layer_index():
    p = LINES.params.model_validate({"alpha": 0.3, "beta": 0.6})
    base = torch.zeros(3)
    experts = [torch.ones(3), torch.ones(3)]
    mps = [LINES.model_params.model_validate({})] * 2
    for layer, expected in [(None, 0.3), (0, 0.3), (2, 0.6), (4, 0.9)]:
        out = LINES(base, experts, p, mps, TensorContext(name="x", layer=layer, num_layers=5))
        assert torch.allclose(out, torch.full((3,), 2 * expected)), layer
    out = LINES(base, experts, p, mps, TensorContext(name="x", layer=0, num_layers=1))
    assert torch.allclose(out, torch.full((3,), 0.6))  # L = 1: depth 0


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "bad",
    [
        {"merge_method": "lines"},
        {"merge_parameters": "{no_such_key: 1}"},
        {"merge_parameters": "[1, 2]"},
        {"merge_parameters": "{lambda: [}"},
        {"mode": "single_task"},
        {"mode": "everything"},
        {"alpha": float("inf")},
    ],
)
def test_invalid_parameters(bad):
    with pytest.raises(ValidationError):
        LINES.params.model_validate(bad)


def test_unknown_inner_method_is_reported():
    with pytest.raises(RecipeError, match="unknown merge_method"):
        LINES.params.model_validate({"merge_method": "tiez"})


def test_single_expert_without_alpha_fails_clearly():
    base, experts = toy(1)
    with pytest.raises(MergelabError, match="needs alpha"):
        mergelab.merge_state_dicts("lines", experts, base)


def test_bad_forwarded_model_parameter_fails_clearly():
    base, experts = toy(2)
    with pytest.raises(MergelabError, match="per-model parameters for merge_method task_arithmetic"):
        mergelab.merge_state_dicts("lines", experts, base, model_parameters=[{"density": 1.5}] * 2)
