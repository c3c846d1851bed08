"""Karcher mean: hand-computed anchors on the circle, the optimality condition and an independent
float64 NumPy reference on the sphere, edge cases, parameters, a checkpoint round trip.

The expectations are written from the definition (μ minimises Σ a_i arccos(<μ, u_i>)² on the
unit sphere; the merge is (Σ a_i ‖x_i‖) μ), not from the code under test. The optional parity
test runs mergekit 0.1.5's ``karcher`` where its venv exists.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mergekit_live import needs_mergekit, run_mergekit
from pydantic import ValidationError
from tiny_models import load_dir

import mergelab
from mergelab.methods.base import TensorContext
from mergelab.methods.karcher import KarcherModelParams, KarcherParams
from mergelab.methods.registry import get_method

KARCHER = get_method("karcher")
CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight")


def run(tensors, weights=None, **params) -> torch.Tensor:
    weights = weights or [1.0] * len(tensors)
    return KARCHER(None, tensors, KarcherParams(**params), [KarcherModelParams(weight=w) for w in weights], CTX)


def reference(xs: list[np.ndarray], weights: list[float], iters: int = 200) -> np.ndarray:
    """Weighted spherical mean in float64, from the definition: Riemannian gradient descent
    (unit step) on Σ a_i d(μ, u_i)², iterated to convergence, times the weighted mean norm."""
    a = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    flat = np.stack([np.asarray(x, dtype=np.float64).ravel() for x in xs])
    r = np.linalg.norm(flat, axis=1)
    u = flat / r[:, None]
    mu = a @ u
    mu /= np.linalg.norm(mu)
    for _ in range(iters):
        c = np.clip(u @ mu, -1.0, 1.0)
        th = np.arccos(c)
        coef = np.where(th > 1e-15, th / np.sin(np.maximum(th, 1e-300)), 1.0)
        v = ((a * coef)[:, None] * (u - c[:, None] * mu[None, :])).sum(axis=0)
        n = np.linalg.norm(v)
        if n < 1e-14:
            break
        mu = np.cos(n) * mu + np.sin(n) * v / n
        mu /= np.linalg.norm(mu)
    return (a @ r * mu).reshape(np.shape(xs[0]))


def objective(mu: np.ndarray, us: np.ndarray, a: np.ndarray) -> float:
    return float((a * np.arccos(np.clip(us @ mu, -1.0, 1.0)) ** 2).sum())


# ---------------------------------------------------------------- hand-computed anchors


def test_two_orthogonal_vectors_give_the_geodesic_midpoint_times_the_mean_norm():
    out = run([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])])
    torch.testing.assert_close(out, torch.tensor([3.0, 3.0]) / math.sqrt(2), rtol=0, atol=1e-6)


def test_weights_move_the_mean_along_the_arc_not_to_the_chordal_mean():
    # on a circle the Karcher mean of angles 0 and 90° with weights 1:3 is at 67.5°; the
    # normalised Euclidean mean (the starting point) is at atan(3) = 71.57°
    out = run([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])], weights=[1.0, 3.0])
    angle = math.radians(67.5)
    scale = 0.25 * 2 + 0.75 * 4
    torch.testing.assert_close(out, torch.tensor([scale * math.cos(angle), scale * math.sin(angle)]), rtol=0, atol=1e-6)
    # no step at all stays at the chordal mean's direction
    start = run([torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])], weights=[1.0, 3.0], max_iter=0)
    assert math.isclose(math.atan2(start[1], start[0]), math.atan(3.0), abs_tol=1e-6)


def test_three_directions_on_a_circle_average_their_angles():
    angles = [0.1, 0.5, 1.3]
    norms = [1.0, 2.0, 0.5]
    xs = [torch.tensor([r * math.cos(t), r * math.sin(t)]) for r, t in zip(norms, angles)]
    out = run(xs, weights=[1.0, 1.0, 2.0], max_iter=50)
    mean_angle = (0.1 + 0.5 + 2 * 1.3) / 4
    scale = (1.0 + 2.0 + 2 * 0.5) / 4
    torch.testing.assert_close(
        out, torch.tensor([scale * math.cos(mean_angle), scale * math.sin(mean_angle)]), rtol=0, atol=1e-6
    )


# ---------------------------------------------------------------- optimality and the reference


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_result_is_a_minimiser_of_the_summed_squared_geodesic_distance(seed):
    rng = np.random.default_rng(seed)
    center = rng.normal(size=6)
    xs = [center + 0.6 * rng.normal(size=6) for _ in range(4)]
    w = [1.0, 2.0, 0.5, 1.5]
    out = run([torch.tensor(x) for x in xs], weights=w, max_iter=100, tol=1e-12).numpy()
    a = np.asarray(w) / sum(w)
    us = np.stack([x / np.linalg.norm(x) for x in xs])
    mu = out / np.linalg.norm(out)
    # first-order condition: the weighted mean of the log maps at μ vanishes
    c = us @ mu
    th = np.arccos(np.clip(c, -1, 1))
    grad = ((a * th / np.sin(th))[:, None] * (us - c[:, None] * mu)).sum(axis=0)
    assert np.linalg.norm(grad) < 1e-9
    # and μ beats every nearby point of the sphere
    f0 = objective(mu, us, a)
    for _ in range(50):
        p = mu + 1e-3 * rng.normal(size=6)
        assert objective(p / np.linalg.norm(p), us, a) >= f0 - 1e-12
    np.testing.assert_allclose(np.linalg.norm(out), a @ np.linalg.norm(np.stack(xs), axis=1), rtol=1e-12)


@pytest.mark.parametrize("shape", [(16,), (6, 5), (2, 3, 4)])
def test_matches_an_independent_float64_reference(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=gen)
    xs = [base + 0.5 * torch.randn(shape, generator=gen) for _ in range(3)]
    w = [1.0, 0.5, 2.0]
    got = run(xs, weights=w, max_iter=50, tol=1e-7)
    want = reference([x.numpy() for x in xs], w)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=2e-6)
    got64 = run([x.double() for x in xs], weights=w, max_iter=100, tol=1e-13)
    assert got64.dtype == torch.float64
    np.testing.assert_allclose(got64.numpy(), want, rtol=0, atol=1e-12)


def test_equivariant_under_a_rotation_of_every_model():
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(8, generator=gen, dtype=torch.float64) + 1.0 for _ in range(3)]
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    a = run(xs, max_iter=100, tol=1e-13)
    b = run([q @ x for x in xs], max_iter=100, tol=1e-13)
    torch.testing.assert_close(b, q @ a, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- edge cases


def test_identical_models_and_a_single_model_give_that_model():
    x = torch.randn(4, 3)
    torch.testing.assert_close(run([x, x, x]), x, rtol=0, atol=1e-6)
    y = run([x])
    assert torch.equal(y, x) and y is not x


def test_a_zero_model_is_left_out_of_the_direction_but_counts_in_the_norm():
    out = run([torch.tensor([3.0, 0.0]), torch.zeros(2)])
    torch.testing.assert_close(out, torch.tensor([1.5, 0.0]), rtol=0, atol=0)
    assert torch.equal(run([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


def test_opposite_directions_start_from_the_first_model():
    out = run([torch.tensor([1.0, 0.0]), torch.tensor([-3.0, 0.0])])
    torch.testing.assert_close(out, torch.tensor([2.0, 0.0]), rtol=0, atol=1e-6)


def test_a_zero_weight_drops_a_model():
    x, y = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(run([x, y], weights=[1.0, 0.0]), x, rtol=0, atol=1e-6)


def test_dtype_is_kept():
    xs = [torch.randn(7, 3).to(torch.bfloat16) for _ in range(2)]
    out = run(xs)
    assert out.dtype == torch.bfloat16
    want = reference([x.float().numpy() for x in xs], [1.0, 1.0])
    np.testing.assert_allclose(out.float().numpy(), want, rtol=0, atol=2e-2)


def test_parameters_are_validated():
    with pytest.raises(ValidationError):
        KarcherParams(max_iter=-1)
    with pytest.raises(ValidationError):
        KarcherParams(tol=0.0)
    with pytest.raises(ValidationError):
        KarcherModelParams(weight=-1.0)
    with pytest.raises(ValueError, match="positive sum"):
        run([torch.ones(2), torch.ones(2)], weights=[0.0, 0.0])
    assert KARCHER.base == "ignored" and KARCHER.card.group == "advanced"


# ---------------------------------------------------------------- a real checkpoint


def test_checkpoint_round_trip_matches_the_reference(family, tmp_path):
    _base, experts = family
    recipe = {
        "merge_method": "karcher",
        "models": [
            {"model": str(e), "parameters": {"weight": w}} for e, w in zip(experts, (1.0, 2.0, 1.0), strict=True)
        ],
        "parameters": {"max_iter": 30, "tol": 1e-7},
    }
    out = tmp_path / "out"
    mergelab.merge(recipe, out, max_shard_size="120KB", hash_inputs=False)
    merged = load_dir(out)
    inputs = [load_dir(e) for e in experts]
    assert set(merged) == set(inputs[0])
    for name, t in merged.items():
        assert t.dtype == inputs[0][name].dtype, name
        want = reference([sd[name].float().numpy() for sd in inputs], [1.0, 2.0, 1.0])
        slack = 1e-2 * float(np.abs(want).max()) if t.dtype != torch.float32 else 0.0  # bf16/fp16 inputs
        np.testing.assert_allclose(t.float().numpy(), want, rtol=0, atol=1e-5 + slack, err_msg=name)


# ---------------------------------------------------------------- mergekit (optional)

_MK_SCRIPT = r"""
import json, sys, torch
from mergekit.merge_methods.karcher import karcher_merge_tensors
cases = torch.load(sys.argv[1])
out = []
for c in cases:
    n = len(c["tensors"])
    out.append(karcher_merge_tensors(c["tensors"], [1.0 / n] * n, max_iter=c["max_iter"], tol=c["tol"]).tolist())
print(json.dumps(out))
"""


@needs_mergekit
def test_parity_with_mergekit(tmp_path):
    gen = torch.Generator().manual_seed(3)
    cases = []
    for shape, n, max_iter, tol in [
        ((16,), 2, 10, 1e-5),
        ((4, 8), 3, 10, 1e-5),
        ((3, 2, 5), 4, 25, 1e-7),
        ((8,), 3, 2, 1e-5),
    ]:
        center = torch.randn(shape, generator=gen)
        cases.append(
            {
                "tensors": [center + torch.randn(shape, generator=gen) for _ in range(n)],
                "max_iter": max_iter,
                "tol": tol,
            }
        )
    cases.append({"tensors": [torch.randn(6, generator=gen), torch.zeros(6)], "max_iter": 10, "tol": 1e-5})
    expected = run_mergekit(_MK_SCRIPT, cases, tmp_path)
    for case, exp in zip(cases, expected, strict=True):
        out = run(case["tensors"], max_iter=case["max_iter"], tol=case["tol"])
        torch.testing.assert_close(out, torch.tensor(exp), rtol=1e-5, atol=1e-6)
