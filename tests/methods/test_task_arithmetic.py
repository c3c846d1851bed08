"""Task arithmetic (Ilharco et al. 2023) and the scaled form ``fn == base + λ · delta`` that every
method ending in ``θ0 + λ·τ_m`` declares (``@method(scale="lambda", delta=...)``)."""

from __future__ import annotations

import pytest
import torch

from mergelab.methods import all_methods, get_method
from mergelab.methods.base import TensorContext


def test_task_arithmetic_hand_computed():
    m = get_method("task_arithmetic")
    base = torch.tensor([1.0, 2.0, 3.0])
    experts = [torch.tensor([2.0, 2.0, 1.0]), torch.tensor([1.0, 4.0, 3.0])]
    mp = [m.model_params.model_validate({"weight": w}) for w in (1.0, 0.5)]
    out = m(base, experts, m.params.model_validate({"lambda": 0.5}), mp, TensorContext(name="w"))
    # τ = [1, 0, -2] and [0, 2, 0]; Σ w τ = [1, 1, -2]; θ0 + 0.5 Σ = [1.5, 2.5, 2]
    assert out.tolist() == [1.5, 2.5, 2.0]


SCALED = sorted(m.name for m in all_methods() if m.scale is not None)


def test_the_task_vector_family_declares_the_scaled_form():
    expected = {
        "task_arithmetic",
        "ties",
        "dare_linear",
        "dare_ties",
        "breadcrumbs",
        "breadcrumbs_ties",
        "della",
        "della_linear",
        "magmax",
        "consensus",
        "pcb",
    }
    assert expected <= set(SCALED)


def _field(params_model, key: str) -> str:
    for name, f in params_model.model_fields.items():
        if key in (name, f.alias):
            return name
    raise KeyError(key)


def _param_sets(m):
    sets = [({}, {})]
    if m.card.typical is not None:
        gp, mp = m.card.typical
        sets.append(({k: v for k, v in gp.items() if k != "scope"}, dict(mp)))  # global scope needs folds
    sets.append(({"sign_tie": "majority"}, {}) if "sign_tie" in m.params.model_fields else ({"normalize": True}, {}))
    return sets


@pytest.mark.parametrize("name", SCALED)
@pytest.mark.parametrize("lam", [0.7, 1.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fn_equals_base_plus_scale_times_delta_bit_for_bit(name, lam, dtype):
    m = get_method(name)
    g = torch.Generator().manual_seed(3)
    shapes = [(600, 1000), (37, 29), (50,)]  # one tensor over the 2**19-entry chunk
    for shape in shapes:
        base = torch.randn(shape, generator=g).to(dtype)
        experts = [(base.float() + 0.05 * (i + 1) * torch.randn(shape, generator=g)).to(dtype) for i in range(3)]
        for gp, mp in _param_sets(m):
            if "scope" in m.params.model_fields:  # direct per-tensor calls: no folds (pcb defaults to global)
                gp = {**gp, "scope": "tensor"}
            try:
                params = m.params.model_validate({**gp, m.scale: lam})
                mps = [m.model_params.model_validate(mp)] * 3
            except ValueError:
                continue
            ctx = TensorContext(name=f"model.layers.0.w{len(shape)}", seed=5)
            out = m(base, experts, params, mps, ctx)
            delta = m.delta(base, experts, params, mps, ctx)
            assert getattr(params, _field(m.params, m.scale)) == lam
            again = torch.add(base, delta, alpha=lam).to(base.dtype)
            assert again.dtype == out.dtype and torch.equal(again, out), (name, shape, gp, mp)
