"""NuSLERP: numbers produced by mergekit 0.1.5 (each also derived by hand), an independent
float64 re-implementation written from the description, edge cases and parameter checks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mergekit_live import needs_mergekit, run_mergekit
from pydantic import ValidationError

from mergelab.methods.base import TensorContext
from mergelab.methods.nuslerp import NuSlerpModelParams, NuSlerpParams, interpolation_factor
from mergelab.methods.registry import get_method

NUSLERP = get_method("nuslerp")
CTX = TensorContext(name="model.layers.1.self_attn.q_proj.weight")
# The live parity test runs mergekit 0.1.5 from this python (a venv with mergekit); unset: skipped.
S = math.sin


def run(base, first, second, w=(1.0, 1.0), **params) -> torch.Tensor:
    return NUSLERP(
        base,
        [first, second],
        NuSlerpParams(**params),
        [NuSlerpModelParams(weight=w[0]), NuSlerpModelParams(weight=w[1])],
        CTX,
    )


def reference_vector_slerp(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SLERP of two 1-D float64 vectors with NuSLERP's guards (norm floor 1e-7, exact colinear)."""
    ua = a / max(np.linalg.norm(a), 1e-7)
    ub = b / max(np.linalg.norm(b), 1e-7)
    c = float(np.clip(ua @ ub, -1.0, 1.0))
    if 1.0 - c * c <= 1e-16:
        return (1 - t) * a + t * b
    om = math.acos(c)
    return (S((1 - t) * om) * a + S(t * om) * b) / S(om)


def reference_nuslerp(base, first, second, w1, w2, flatten=True, row_wise=False) -> np.ndarray:
    """Loops over vectors explicitly; base may be None."""
    x = np.asarray(first, dtype=np.float64)
    y = np.asarray(second, dtype=np.float64)
    total = w1 + w2
    t = 0.5 if abs(total) < 1e-6 else w2 / total
    if base is not None:
        b0 = np.asarray(base, dtype=np.float64)
        x, y = x - b0, y - b0
    if flatten or x.ndim <= 1:
        out = reference_vector_slerp(t, x.ravel(), y.ravel()).reshape(x.shape)
    else:
        axis = 0 if row_wise else x.ndim - 1
        xm, ym = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
        out = np.empty_like(xm)
        for idx in np.ndindex(*xm.shape[:-1]):
            out[idx] = reference_vector_slerp(t, xm[idx], ym[idx])
        out = np.moveaxis(out, -1, axis)
    if base is not None:
        out = out + b0
    return out


# ---------------------------------------------------------------- mergekit numbers, by hand


def test_with_base_slerps_task_vectors():
    # τ1 = [1, 0], τ2 = [0, 2] orthogonal, t = 1/2: base + sin(π/4)(τ1 + τ2).
    # mergekit 0.1.5: [1.7071, 2.4142]
    base = torch.tensor([1.0, 1.0])
    out = run(base, base + torch.tensor([1.0, 0.0]), base + torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(out, torch.tensor([1 + S(math.pi / 4), 1 + 2 * S(math.pi / 4)]))
    torch.testing.assert_close(out, torch.tensor([1.7071, 2.4142]), rtol=0, atol=1e-4)


def test_without_base_weights_set_t():
    # t = 3 / (1 + 3) = 0.75, Ω = π/2: sin(π/8)·[1, 0] + sin(3π/8)·[0, 2].
    # mergekit 0.1.5: [0.3827, 1.8478]
    out = run(None, torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), w=(1.0, 3.0))
    torch.testing.assert_close(out, torch.tensor([S(math.pi / 8), 2 * S(3 * math.pi / 8)]))
    torch.testing.assert_close(out, torch.tensor([0.3827, 1.8478]), rtol=0, atol=1e-4)


def test_zero_task_vector_counts_as_orthogonal():
    # τ1 = 0 has cos 0 with τ2: base + sin(π/4)·τ2, not base + τ2/2. mergekit: [1.0, 2.4142]
    base = torch.tensor([1.0, 1.0])
    out = run(base, base.clone(), base + torch.tensor([0.0, 2.0]))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([1.0, 1 + 2 * S(math.pi / 4)]))


def test_not_flattened_slerps_each_row():
    # rows: [1,0] vs [0,1] orthogonal → [.7071, .7071]; [1,0] vs [1,0] colinear → [1, 0].
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = run(None, a, b, nuslerp_flatten=False)
    r = S(math.pi / 4)
    torch.testing.assert_close(out, torch.tensor([[r, r], [1.0, 0.0]]))


def test_row_wise_slerps_each_column():
    # columns: [1,1] vs [0,1]: Ω = π/4, coefficients sin(π/8)/sin(π/4) → 0.5412·[1, 2];
    # [0,0] vs [1,0]: zero vector, Ω = π/2 → sin(π/4)·[1, 0]. mergekit: [[.5412,.7071],[1.0824,0]]
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    out = run(None, a, b, nuslerp_flatten=False, nuslerp_row_wise=True)
    k = S(math.pi / 8) / S(math.pi / 4)
    expected = torch.tensor([[k, S(math.pi / 4)], [2 * k, 0.0]])
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out, torch.tensor([[0.5412, 0.7071], [1.0824, 0.0]]), rtol=0, atol=1e-4)


def test_flatten_ignores_row_wise():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    torch.testing.assert_close(run(None, a, b, nuslerp_row_wise=True), run(None, a, b))


# ---------------------------------------------------------------- weights → t


def test_interpolation_factor():
    assert interpolation_factor(1.0, 1.0) == 0.5
    assert interpolation_factor(1.0, 3.0) == 0.75
    assert interpolation_factor(2.0, 0.0) == 0.0
    assert interpolation_factor(1.0, -1.0) == 0.5  # weights cancel: mergekit falls back to 1/2


def test_weight_extremes_select_a_model():
    gen = torch.Generator().manual_seed(4)
    base, e1, e2 = (torch.randn(5, 3, generator=gen) for _ in range(3))
    torch.testing.assert_close(run(base, e1, e2, w=(1.0, 0.0)), e1)
    torch.testing.assert_close(run(base, e1, e2, w=(0.0, 2.0)), e2)
    torch.testing.assert_close(run(None, e1, e2, w=(1.0, 0.0)), e1)


def test_cancelling_weights_use_half():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(run(None, v0, v1, w=(1.0, -1.0)), run(None, v0, v1))


# ---------------------------------------------------------------- lerp path and zero norms


def test_exactly_colinear_is_lerp():
    out = run(None, torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0]), w=(3.0, 1.0))
    torch.testing.assert_close(out, torch.tensor([1.5, 3.0]))
    out = run(None, torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0]))
    torch.testing.assert_close(out, torch.zeros(2))


def test_near_parallel_stays_spherical_unlike_slerp():
    # cos = 0.9997 would take slerp's lerp path; NuSLERP has no such threshold.
    c = 0.9997
    a, b = torch.tensor([1.0, 0.0]), 2.0 * torch.tensor([c, math.sqrt(1 - c * c)])
    out = run(None, a, b, w=(0.7, 0.3))
    ref = reference_nuslerp(None, a.numpy(), b.numpy(), 0.7, 0.3)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert (out - (0.7 * a + 0.3 * b)).abs().max() > 5e-5


def test_only_exactly_colinear_is_lerp():
    # cos = 0.99999 (1 − cos² = 2e-5 ≫ 1e-16): still spherical. mergekit 0.1.5 at scale 1000:
    # [999.99744, 2.23607] where lerp gives [999.99500, 2.23606]
    c = 0.99999
    a = torch.tensor([1000.0, 0.0])
    b = 1000.0 * torch.tensor([c, math.sqrt(1 - c * c)])
    out = run(None, a, b)
    torch.testing.assert_close(out, torch.tensor([999.99744, 2.2360682]), rtol=2e-7, atol=0)
    assert (out - (a + b) / 2).abs().max() > 1e-3


def test_tiny_vector_is_normalised_by_at_least_1e_7():
    # ‖a‖ = 1e-8 < 1e-7: a/1e-7 has norm 0.1, so cos = 0.1 although a ∥ b:
    # result = (sin(Ω/2)·a + sin(Ω/2)·b)/sin Ω with Ω = acos 0.1. mergekit 0.1.5: [0.6741998, 0]
    om = math.acos(0.1)
    out = run(None, torch.tensor([1e-8, 0.0]), torch.tensor([1.0, 0.0]))
    expected = (S(om / 2) * (1 + 1e-8)) / S(om)
    torch.testing.assert_close(out, torch.tensor([expected, 0.0]))


def test_zero_inputs_give_no_nan():
    z = torch.zeros(4, 3)
    for flatten in (True, False):
        out = run(None, z, z, nuslerp_flatten=flatten)
        assert torch.isfinite(out).all() and (out == 0).all()
        base = torch.randn(4, 3)
        out = run(base, base.clone(), base.clone(), nuslerp_flatten=flatten)
        torch.testing.assert_close(out, base)  # zero task vectors give the base


def test_identical_experts_give_that_expert():
    gen = torch.Generator().manual_seed(5)
    base, e = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    torch.testing.assert_close(run(base, e, e.clone(), w=(0.3, 0.6)), e)
    torch.testing.assert_close(run(None, e, e.clone(), nuslerp_flatten=False), e)


# ---------------------------------------------------------------- random tensors vs reference


@pytest.mark.parametrize("shape", [(9,), (4, 6), (2, 3, 4), ()])
@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("with_base", [True, False])
def test_matches_reference(shape, flatten, row_wise, with_base):
    gen = torch.Generator().manual_seed(hash((shape, flatten, row_wise, with_base)) % 2**31)
    base = torch.randn(shape, generator=gen) if with_base else None
    e1, e2 = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    w = (0.4, 1.1)
    out = run(base, e1, e2, w=w, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    assert out.shape == e1.shape and out.dtype == torch.float32
    ref = reference_nuslerp(None if base is None else base.numpy(), e1.numpy(), e2.numpy(), *w, flatten, row_wise)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_inputs_untouched():
    base, a, b = torch.randn(3, 3), torch.randn(3, 3), torch.randn(3, 3)
    copies = [x.clone() for x in (base, a, b)]
    run(base, a, b, nuslerp_flatten=False, nuslerp_row_wise=True)
    assert all(torch.equal(x, y) for x, y in zip((base, a, b), copies))


# ---------------------------------------------------------------- parameters and registry


def test_defaults_and_validation():
    p = NuSlerpParams()
    assert p.nuslerp_flatten is True and p.nuslerp_row_wise is False
    assert NuSlerpModelParams().weight == 1.0
    with pytest.raises(ValidationError):
        NuSlerpParams.model_validate({"nuslerp_flatten": True, "t": 0.5})
    with pytest.raises(ValidationError):
        NuSlerpParams.model_validate({"nuslerp_row_wise": "maybe"})
    with pytest.raises(ValidationError):
        NuSlerpModelParams.model_validate({"weight": float("nan")})
    with pytest.raises(ValidationError):
        NuSlerpModelParams.model_validate({"weight": 1.0, "density": 0.5})


def test_registration():
    assert NUSLERP.name == "nuslerp"
    assert NUSLERP.base == "optional"
    assert NUSLERP.min_experts == 2 and NUSLERP.max_experts == 2
    assert NUSLERP.params is NuSlerpParams and NUSLERP.model_params is NuSlerpModelParams


# ---------------------------------------------------------------- live parity with mergekit

_MK_SCRIPT = r"""
import json, sys, torch
from mergekit.merge_methods.api import merge_tensors
cases = torch.load(sys.argv[1])
out = []
for c in cases:
    tensors = ([c["base"]] if c["base"] is not None else []) + [c["a"], c["b"]]
    params = {"weight": list(c["w"]), "nuslerp_flatten": c["flatten"],
              "nuslerp_row_wise": c["row_wise"]}
    out.append(merge_tensors(tensors, "nuslerp", parameters=params,
                             base_index=0 if c["base"] is not None else None).tolist())
print(json.dumps(out))
"""


@pytest.mark.slow
@needs_mergekit
def test_parity_with_mergekit(tmp_path):
    gen = torch.Generator().manual_seed(2)
    cases = []
    for shape in [(12,), (4, 6), (2, 3, 4)]:
        for flatten, row_wise in [(True, False), (False, False), (False, True)]:
            for with_base in (True, False):
                cases.append(
                    {
                        "base": torch.randn(shape, generator=gen) if with_base else None,
                        "a": torch.randn(shape, generator=gen),
                        "b": torch.randn(shape, generator=gen),
                        "w": (0.3, 0.9),
                        "flatten": flatten,
                        "row_wise": row_wise,
                    }
                )
    expected = run_mergekit(_MK_SCRIPT, cases, tmp_path)
    for c, exp in zip(cases, expected):
        out = run(c["base"], c["a"], c["b"], w=c["w"], nuslerp_flatten=c["flatten"], nuslerp_row_wise=c["row_wise"])
        torch.testing.assert_close(out, torch.tensor(exp), rtol=1e-5, atol=1e-6)
