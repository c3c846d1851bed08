"""Multi-SLERP: hand-computed points on the circle, an independent float64 NumPy reference of the
four steps, the two-model link to SLERP, edge cases (one model, zero and antipodal inputs), a
checkpoint round trip that loads; the optional parity test runs mergekit 0.1.5's ``multislerp``
where MERGEKIT_PYTHON is set."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mergekit_live import needs_mergekit, run_mergekit
from pydantic import ValidationError
from tiny_models import load_dir

import mergelab
from mergelab.errors import InputDataError
from mergelab.methods.base import TensorContext
from mergelab.methods.multislerp import MultiSlerpModelParams, MultiSlerpParams
from mergelab.methods.registry import get_method

MULTISLERP = get_method("multislerp")
CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight")


def run(experts, weights=None, base=None, **params) -> torch.Tensor:
    weights = weights or [1.0] * len(experts)
    mp = [MultiSlerpModelParams(weight=w) for w in weights]
    return MULTISLERP(base, experts, MultiSlerpParams(**params), mp, CTX)


def reference(xs, weights, base=None, normalize=True, eps=1e-8) -> np.ndarray:
    """The four steps in float64, written out with NumPy."""
    shape = np.shape(xs[0])
    x = np.stack([np.asarray(v, dtype=np.float64).ravel() for v in xs])
    b = None if base is None else np.asarray(base, dtype=np.float64).ravel()
    if b is not None:
        x = x - b
    w = np.asarray(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    r = np.linalg.norm(x, axis=1)
    u = x / (r + eps)[:, None]
    m = w @ u
    mu = m / np.linalg.norm(m)
    v = w @ (u - np.outer(u @ mu, mu))
    s = np.linalg.norm(v) + eps
    out = (w @ r) * (np.cos(s) * mu + np.sin(s) / s * v)
    return (out if b is None else out + b).reshape(shape)


# ---------------------------------------------------------------- hand-computed


def test_two_orthogonal_vectors_with_equal_weights_give_the_midpoint_direction():
    # m = (0.5, 0.5), μ at 45°, the tangent parts cancel (v = 0): the result is μ times the mean norm
    out = run([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])])
    torch.testing.assert_close(out, torch.tensor([3.0, 3.0]) / math.sqrt(2), rtol=0, atol=1e-6)


def test_unequal_weights_point_along_the_normalised_weighted_mean_of_the_directions():
    # weights 1:3 on angles 0 and 90°: m = (0.25, 0.75), μ at atan(3). The tangent step is
    # Σ w_i (u_i − <u_i, μ> μ) = m − <m, μ> μ = 0 (μ is m's direction), so the result is μ times
    # Σ w_i r_i = 3.5 (times cos(ε) ≈ 1): not the geodesic barycentre at 67.5° (karcher's)
    a, b = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 4.0], dtype=torch.float64)
    out = run([a, b], weights=[1.0, 3.0])
    angle = math.atan(3.0)
    want = torch.tensor([3.5 * math.cos(angle), 3.5 * math.sin(angle)], dtype=torch.float64)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-7)


def test_the_tangent_step_vanishes_in_any_dimension():
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(12, generator=gen, dtype=torch.float64) for _ in range(5)]
    w = torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1], dtype=torch.float64)
    out = run(xs, weights=w.tolist())
    units = torch.stack([x / x.norm() for x in xs])
    m = w @ units
    radius = float(w @ torch.stack([x.norm() for x in xs]))
    torch.testing.assert_close(out, radius * m / m.norm(), rtol=0, atol=1e-7)


def test_with_a_base_the_task_vectors_are_interpolated():
    base = torch.tensor([1.0, 1.0, 1.0])
    a = base + torch.tensor([2.0, 0.0, 0.0])
    b = base + torch.tensor([0.0, 2.0, 0.0])
    out = run([a, b], base=base)
    torch.testing.assert_close(out, base + torch.tensor([math.sqrt(2), math.sqrt(2), 0.0]), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the reference


@pytest.mark.parametrize("shape", [(16,), (6, 5), (2, 3, 4)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_matches_an_independent_float64_reference(shape, with_base, normalize):
    gen = torch.Generator().manual_seed(sum(shape) + 2 * with_base + normalize)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    xs = [base + 0.3 * torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4)]
    w = [1.0, 0.5, 2.0, 0.7]
    b = base if with_base else None
    got = run(xs, weights=w, base=b, normalize_weights=normalize)
    assert got.dtype == torch.float64
    want = reference([x.numpy() for x in xs], w, None if b is None else b.numpy(), normalize)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    got32 = run([x.float() for x in xs], weights=w, base=None if b is None else b.float(), normalize_weights=normalize)
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-5, atol=1e-5)


def test_two_models_stay_on_the_great_circle_between_them():
    # SLERP's arc: the result's direction is a combination of the two directions only
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(10, generator=gen, dtype=torch.float64), torch.randn(10, generator=gen, dtype=torch.float64)
    out = run([a, b], weights=[0.3, 0.7])
    basis, _ = torch.linalg.qr(torch.stack([a, b], dim=1))
    residual = out - basis @ (basis.T @ out)
    assert float(residual.norm()) < 1e-12


# ---------------------------------------------------------------- edge cases


def test_one_model_identical_models_and_zero_task_vectors():
    x = torch.randn(4, 3)
    y = run([x])
    assert torch.equal(y, x) and y is not x
    torch.testing.assert_close(run([x, x, x]), x, rtol=0, atol=1e-6)
    base = torch.randn(4, 3)
    for n in (2, 3):  # no model changed the tensor: the base (mergekit stops with an error for n ≥ 3)
        assert torch.equal(run([base.clone()] * n, base=base), base)


def test_antipodal_inputs_fall_back_to_linear_for_two_and_fail_cleanly_for_more():
    a = torch.tensor([1.0, 2.0, -1.0])
    torch.testing.assert_close(run([a, -a], weights=[1.0, 1.0]), torch.zeros(3), rtol=0, atol=1e-7)
    with pytest.raises(InputDataError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*weights"):
        run([a, -a, a, -a])
    x = {"w": a}
    with pytest.raises(InputDataError, match="'w'"):
        mergelab.merge_state_dicts("multislerp", [x, {"w": -a}, {"w": a}, {"w": -a}], None)


def test_dtype_and_parameters():
    xs = [torch.randn(5, 4).bfloat16() for _ in range(3)]
    assert run(xs).dtype == torch.bfloat16
    with pytest.raises(ValidationError):
        MultiSlerpParams(eps=0.0)
    with pytest.raises(ValidationError):
        MultiSlerpParams(t=0.5)
    with pytest.raises(ValidationError):
        MultiSlerpModelParams(weight=float("nan"))
    assert MULTISLERP.base == "optional" and MultiSlerpParams().eps == 1e-8


# ---------------------------------------------------------------- a real checkpoint


@pytest.mark.parametrize("with_base", [False, True])
def test_checkpoint_round_trip_matches_the_reference_and_loads(family, tmp_path, with_base):
    from transformers import AutoModelForCausalLM

    base, experts = family
    w = (1.0, 2.0, 0.5)
    recipe: dict = {
        "merge_method": "multislerp",
        "models": [{"model": str(e), "parameters": {"weight": x}} for e, x in zip(experts, w, strict=True)],
    }
    if with_base:
        recipe["base_model"] = str(base)
    mergelab.merge(recipe, tmp_path / "out", max_shard_size="120KB", hash_inputs=False)
    merged = load_dir(tmp_path / "out")
    sd0 = load_dir(base)
    sds = [load_dir(e) for e in experts]
    assert set(merged) == set(sd0)
    for name, t in merged.items():
        assert t.dtype == sds[0][name].dtype, name
        b = sd0[name].double().numpy() if with_base else None
        want = reference([sd[name].double().numpy() for sd in sds], list(w), b)
        half = t.dtype != torch.float32
        np.testing.assert_allclose(t.double().numpy(), want, rtol=1e-2 if half else 1e-5, atol=1e-6, err_msg=name)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


# ---------------------------------------------------------------- mergekit (optional)

_MK_SCRIPT = r"""
import importlib, json, sys, torch
from mergekit.merge_methods.base import TensorGroup
ms = importlib.import_module("mergekit.merge_methods.multislerp")

class Weights:
    def __init__(self, values):
        self.values = values
    def values_for(self, entries):
        return self.values

out = []
for c in torch.load(sys.argv[1]):
    tensors = ([c["base"]] if c["base"] is not None else []) + c["experts"]
    group = TensorGroup.from_tensors(tensors, base_index=0 if c["base"] is not None else None)
    res = ms.multislerp.implementation(group, weight=Weights(c["weights"]), normalize_weights=c["normalize"])
    out.append(res.tolist())
print(json.dumps(out))
"""


@needs_mergekit
def test_parity_with_mergekit(tmp_path):
    gen = torch.Generator().manual_seed(13)
    cases = []
    for shape, n, with_base, normalize in [
        ((16,), 2, False, True),
        ((6, 8), 3, True, True),
        ((2, 4, 5), 4, True, False),
        ((32,), 3, False, False),
        ((8,), 1, True, True),
    ]:
        base = torch.randn(shape, generator=gen)
        cases.append(
            {
                "base": base if with_base else None,
                "experts": [base + 0.2 * torch.randn(shape, generator=gen) for _ in range(n)],
                "weights": [0.5 + 0.5 * i for i in range(n)],
                "normalize": normalize,
            }
        )
    a = torch.randn(6, generator=gen)
    cases.append({"base": None, "experts": [a, -a], "weights": [1.0, 1.0], "normalize": True})
    expected = run_mergekit(_MK_SCRIPT, cases, tmp_path)
    for case, exp in zip(cases, expected, strict=True):
        out = run(case["experts"], case["weights"], case["base"], normalize_weights=case["normalize"])
        torch.testing.assert_close(out, torch.tensor(exp), rtol=1e-5, atol=1e-6)
