"""SLERP: hand-computed anchors, an independent float64 re-implementation, edge cases, params.

The reference below is written from the formulas (Shoemake 1985, mergekit's conventions:
flatten, |cos| > 0.9995 → lerp, norms ≤ 1e-8 not normalised, unnormalised tensors), not from
the code under test. The optional parity test runs mergekit 0.1.5 where its venv exists.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mergekit_live import needs_mergekit, run_mergekit
from pydantic import ValidationError

from mergelab.methods.base import NoParams, TensorContext
from mergelab.methods.registry import get_method
from mergelab.methods.slerp import DOT_THRESHOLD, SlerpParams

SLERP = get_method("slerp")
CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight")
# The live parity test runs mergekit 0.1.5 from this python (a venv with mergekit); unset: skipped.


def run(base, other, t: float) -> torch.Tensor:
    return SLERP(base, [other], SlerpParams(t=t), [NoParams()], CTX)


def reference_slerp(t: float, v0: np.ndarray, v1: np.ndarray) -> np.ndarray:
    """Textbook SLERP on flattened float64 copies, mergekit's thresholds."""
    a = np.asarray(v0, dtype=np.float64).ravel()
    b = np.asarray(v1, dtype=np.float64).ravel()
    na = np.sqrt((a * a).sum())
    nb = np.sqrt((b * b).sum())
    ua = a / na if na > 1e-8 else a
    ub = b / nb if nb > 1e-8 else b
    c = float(np.clip((ua * ub).sum(), -1.0, 1.0))
    if abs(c) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        om = math.acos(c)
        out = (math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)
    return out.reshape(np.shape(v0))


# ---------------------------------------------------------------- hand-computed anchors


def test_orthogonal_unit_vectors_midpoint():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    out = run(v0, v1, 0.5)
    torch.testing.assert_close(out, (v0 + v1) / math.sqrt(2), rtol=0, atol=1e-7)
    assert abs(out.norm().item() - 1.0) < 1e-6  # stays on the sphere, unlike lerp (norm 0.707)


def test_orthogonal_quarter_angle():
    out = run(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.25)
    expected = torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-7)


def test_t0_gives_base_and_t1_gives_other():
    gen = torch.Generator().manual_seed(0)
    base, other = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    torch.testing.assert_close(run(base, other, 0.0), base, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(base, other, 1.0), other, rtol=0, atol=1e-6)


def test_whole_tensor_is_flattened_not_row_wise():
    # Flattened, a = [1,0,0,1] and b = [0,1,1,0] are orthogonal: every entry becomes 1/√2.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    torch.testing.assert_close(run(a, b, 0.5), torch.full((2, 2), 1 / math.sqrt(2)))
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # Second rows equal: row-wise would keep [1, 0] there. Flattened: cos = 1/2, Ω = π/3,
    # both coefficients sin(π/6)/sin(π/3) = 1/√3.
    expected = (a + b) / math.sqrt(3)
    torch.testing.assert_close(run(a, b, 0.5), expected, rtol=0, atol=1e-6)


def test_unnormalised_tensors_interpolate_norms():
    # Orthogonal, norms 2 and 4: result = (v0 + v1)/√2 = [√2, 2√2].
    out = run(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0]), 0.5)
    torch.testing.assert_close(out, torch.tensor([math.sqrt(2), 2 * math.sqrt(2)]))


# ---------------------------------------------------------------- lerp path


def test_parallel_vectors_lerp():
    out = run(torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0]), 0.5)
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0]), rtol=0, atol=0)


def test_antiparallel_vectors_lerp():
    out = run(torch.tensor([1.0, 2.0]), torch.tensor([-1.0, -2.0]), 0.25)
    torch.testing.assert_close(out, torch.tensor([0.5, 1.0]), rtol=0, atol=1e-7)


def _pair_with_cos(c: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([1.0, 0.0]), torch.tensor([c, math.sqrt(1 - c * c)]) * 2.0


def test_near_parallel_above_threshold_is_exact_lerp():
    v0, v1 = _pair_with_cos(0.9997)  # |cos| > 0.9995
    out = run(v0, v1, 0.3)
    # the spherical formula would differ from lerp by ~1e-4 here (Ω ≈ 0.0245)
    torch.testing.assert_close(out, 0.7 * v0 + 0.3 * v1, rtol=0, atol=1e-6)


def test_just_below_threshold_is_spherical():
    v0, v1 = _pair_with_cos(0.999)  # |cos| < 0.9995: slerp, measurably different from lerp
    out = run(v0, v1, 0.5)
    ref = torch.from_numpy(reference_slerp(0.5, v0.numpy(), v1.numpy())).float()
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert (out - 0.5 * (v0 + v1)).abs().max() > 1e-5
    assert DOT_THRESHOLD == 0.9995


# ---------------------------------------------------------------- zero norms, shapes, dtypes


def test_zero_base_is_not_normalised_and_gives_no_nan():
    # ‖v0‖ = 0: cos = 0, Ω = π/2, result = sin(tπ/2)·v1 (mergekit 0.1.5: [0, 0.7071] at t=.5)
    out = run(torch.zeros(2), torch.tensor([0.0, 1.0]), 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([0.0, math.sin(math.pi / 4)]))


def test_norm_below_eps_is_not_normalised():
    # ‖v0‖ = 1e-9 ≤ 1e-8: v0 is not divided by its norm, so cos ≈ 1e-9 although v0 ∥ v1,
    # and the spherical branch runs with Ω ≈ π/2. mergekit 0.1.5: [0.70711, 0]
    out = run(torch.tensor([1e-9, 0.0]), torch.tensor([1.0, 0.0]), 0.5)
    torch.testing.assert_close(out, torch.tensor([math.sin(math.pi / 4), 0.0]))


def test_both_zero_give_zero():
    out = run(torch.zeros(3, 2), torch.zeros(3, 2), 0.7)
    assert torch.isfinite(out).all() and (out == 0).all()


def test_tiny_norms_below_eps_no_nan():
    out = run(torch.full((4,), 1e-12), torch.full((4,), -1e-12), 0.5)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5), ()])
@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.83, 1.0])
def test_matches_reference_on_random_tensors(shape, t):
    gen = torch.Generator().manual_seed(hash((shape, t)) % 2**31)
    base = torch.randn(shape, generator=gen)
    other = torch.randn(shape, generator=gen)
    out = run(base, other, t)
    assert out.shape == base.shape and out.dtype == base.dtype
    ref = reference_slerp(t, base.numpy(), other.numpy())
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_inputs_untouched_and_empty_tensor():
    base, other = torch.randn(3, 3), torch.randn(3, 3)
    b0, o0 = base.clone(), other.clone()
    run(base, other, 0.4)
    assert torch.equal(base, b0) and torch.equal(other, o0)
    assert run(torch.empty(0, 4), torch.empty(0, 4), 0.5).shape == (0, 4)


# ---------------------------------------------------------------- parameters and registry


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan"), float("inf")])
def test_t_outside_unit_interval_rejected(bad):
    with pytest.raises(ValidationError):
        SlerpParams(t=bad)


def test_t_required_and_unknown_keys_rejected():
    with pytest.raises(ValidationError):
        SlerpParams()
    with pytest.raises(ValidationError):
        SlerpParams.model_validate({"t": 0.5, "weight": 1.0})
    assert SlerpParams.model_validate({"t": 0.5}).t == 0.5


def test_registration():
    assert SLERP.name == "slerp"
    assert SLERP.base == "required"
    assert SLERP.min_experts == 1 and SLERP.max_experts == 1
    assert SLERP.params is SlerpParams
    assert "Shoemake" in SLERP.paper


def test_rejects_more_than_one_other_model():
    with pytest.raises(ValueError):
        SLERP(torch.ones(2), [torch.ones(2), torch.ones(2)], SlerpParams(t=0.5), [NoParams()] * 2, CTX)


# ---------------------------------------------------------------- live parity with mergekit

_MK_SCRIPT = r"""
import json, sys, torch
from mergekit.merge_methods.api import merge_tensors
cases = torch.load(sys.argv[1])
out = [merge_tensors([c["base"], c["other"]], "slerp", parameters={"t": c["t"]},
                     base_index=0).tolist() for c in cases]
print(json.dumps(out))
"""


@pytest.mark.slow
@needs_mergekit
def test_parity_with_mergekit(tmp_path):
    gen = torch.Generator().manual_seed(1)
    cases = []
    for shape, t in [((16,), 0.3), ((4, 8), 0.5), ((3, 2, 5), 0.9), ((8,), 0.25)]:
        base = torch.randn(shape, generator=gen)
        other = torch.randn(shape, generator=gen)
        cases.append({"base": base, "other": other, "t": t})
    near = torch.randn(32, generator=gen)
    cases.append({"base": near, "other": near * 1.5 + 1e-3 * torch.randn(32, generator=gen), "t": 0.4})
    cases.append({"base": torch.zeros(5), "other": torch.randn(5, generator=gen), "t": 0.6})
    expected = run_mergekit(_MK_SCRIPT, cases, tmp_path)
    for case, exp in zip(cases, expected):
        out = run(case["base"], case["other"], case["t"])
        torch.testing.assert_close(out, torch.tensor(exp), rtol=1e-5, atol=1e-6)
