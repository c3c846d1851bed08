"""ISO-C and ISO-CTS: spectra with known SVDs, rank-1 sums, the subspace sizes, an independent
float64 NumPy implementation of both, the non-matrix fallback and parameter validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from mergelab.methods.base import TensorContext
from mergelab.methods.iso import cts_sizes
from mergelab.methods.registry import get_method

ISO_C = get_method("iso_c")
ISO_CTS = get_method("iso_cts")


def run(m, base, experts, name="w", **glob):
    params = m.params.model_validate(glob)
    return m(base, experts, params, [m.model_params.model_validate({})] * len(experts), TensorContext(name=name))


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def orthogonal(n, seed):
    q, _ = torch.linalg.qr(rand(n, n, seed=seed))
    return q


# ------------------------------------------------------------------------------- ISO-C anchors


def test_known_spectrum_is_flattened_to_its_mean():
    # M = Q diag(3, 1) Rᵀ split over two tasks: Δ = mean(3, 1) Q Rᵀ = 2 Q Rᵀ.
    q, r = orthogonal(2, 1), orthogonal(2, 2)
    m = q @ torch.diag(torch.tensor([3.0, 1.0])) @ r.T
    base = rand(2, 2, seed=3)
    out = run(ISO_C, base, [base + 0.25 * m, base + 0.75 * m])
    assert torch.allclose(out - base, 2.0 * q @ r.T, atol=1e-5)
    out = run(ISO_C, base, [base + 0.25 * m, base + 0.75 * m], alpha=1.5)
    assert torch.allclose(out - base, 3.0 * q @ r.T, atol=1e-5)


def test_rank_one_sum_with_rank_one_shape_is_unchanged():
    # r = min(m, n) = 1: the spectrum has one value, flattening changes nothing.
    base = rand(5, 1, seed=4)
    t1, t2 = rand(5, 1, seed=5), rand(5, 1, seed=6)
    out = run(ISO_C, base, [base + t1, base + t2])
    assert torch.allclose(out - base, t1 + t2, atol=1e-5)


def test_rank_one_sum_spreads_its_norm_over_all_directions():
    # M = 6 u vᵀ (4 × 4, r = 4): σ = (6, 0, 0, 0) → every singular value of Δ is 6/4; Δ v = 1.5 u;
    # ‖Δ‖_F = 6/√4 = 3.
    u = torch.tensor([1.0, 2.0, 2.0, 0.0]) / 3
    v = torch.tensor([0.0, 0.6, 0.0, 0.8])
    m = 6 * torch.outer(u, v)
    base = torch.zeros(4, 4)
    delta = run(ISO_C, base, [base + m / 3, base + 2 * m / 3])
    assert torch.allclose(torch.linalg.svdvals(delta), torch.full((4,), 1.5), atol=1e-5)
    assert torch.allclose(delta @ v, 1.5 * u, atol=1e-5)
    assert math.isclose(float(delta.norm()), 3.0, rel_tol=1e-5)


def np_iso_c(taus, alpha):
    m = sum(t.double().numpy() for t in taus)
    u, s, vh = np.linalg.svd(m, full_matrices=False)
    return alpha * s.mean() * (u @ vh)


@pytest.mark.parametrize(("shape", "n_tasks"), [((8, 5), 3), ((4, 9), 2)])
def test_iso_c_matches_numpy(shape, n_tasks):
    base = rand(*shape, seed=7)
    taus = [rand(*shape, seed=10 + i) for i in range(n_tasks)]
    out = run(ISO_C, base, [base + t for t in taus], alpha=1.3)
    assert np.allclose((out - base).double().numpy(), np_iso_c(taus, 1.3), atol=1e-4)


# ------------------------------------------------------------------------------- ISO-CTS


@pytest.mark.parametrize(
    ("r", "n_tasks", "fraction", "expected"),
    [
        (8, 3, 0.8, (5, 1)),  # k0 = 6, s = round(2/3) = 1
        (10, 4, 0.8, (10, 0)),  # k0 = 8, s = round(0.5) = 0 (half to even)
        (12, 4, 0.5, (4, 2)),  # k0 = 6, s = round(1.5) = 2
        (768, 8, 0.8, (616, 19)),  # k0 = 614, s = round(19.25) = 19
        (3, 2, 0.0, (1, 1)),  # round(1.5) = 2 would need 4 > r = 3 directions: s = ⌊3/2⌋
        (6, 1, 0.8, (4, 2)),  # k0 = 4, s = 2
    ],
)
def test_subspace_sizes(r, n_tasks, fraction, expected):
    k, s = cts_sizes(r, n_tasks, fraction)
    assert (k, s) == expected
    assert k + n_tasks * s == r and k >= 0


def np_iso_cts(taus, fraction, alpha):
    """The paper's steps with r-sized buffers, task blocks first, common block last."""
    mats = [t.double().numpy() for t in taus]
    n_tasks = len(mats)
    r = min(mats[0].shape)
    k0 = int(r * fraction)
    s = round((r - k0) / n_tasks)
    if n_tasks * s > r:
        s = r // n_tasks
    k = r - n_tasks * s
    u, sig, vh = np.linalg.svd(sum(mats), full_matrices=False)
    uc = u[:, :k]
    u_all = np.zeros((mats[0].shape[0], r))
    s_all = np.zeros(r)
    v_all = np.zeros((r, mats[0].shape[1]))
    for i, t in enumerate(mats):
        ut, st, vt = np.linalg.svd(t - uc @ uc.T @ t, full_matrices=False)
        u_all[:, i * s : (i + 1) * s] = ut[:, :s]
        s_all[i * s : (i + 1) * s] = st[:s]
        v_all[i * s : (i + 1) * s] = vt[:s]
    u_all[:, n_tasks * s :] = uc
    s_all[n_tasks * s :] = sig[:k]
    v_all[n_tasks * s :] = vh[:k]
    pu, _, qu = np.linalg.svd(u_all, full_matrices=False)
    pv, _, qv = np.linalg.svd(v_all, full_matrices=False)
    return alpha * s_all.mean() * (pu @ qu) @ (pv @ qv)


@pytest.mark.parametrize(("shape", "n_tasks", "fraction"), [((9, 8), 3, 0.8), ((6, 10), 2, 0.5), ((12, 12), 4, 0.5)])
def test_iso_cts_matches_numpy(shape, n_tasks, fraction):
    base = rand(*shape, seed=20)
    taus = [rand(*shape, seed=30 + i) * (1 + 0.5 * i) for i in range(n_tasks)]
    out = run(ISO_CTS, base, [base + t for t in taus], alpha=0.9, common_space_fraction=fraction)
    expected = np_iso_cts(taus, fraction, 0.9)
    assert np.allclose((out - base).double().numpy(), expected, atol=2e-4), np.abs(
        (out - base).numpy() - expected
    ).max()


def test_iso_cts_without_task_subspaces_is_iso_c():
    base = rand(7, 5, seed=40)
    experts = [base + rand(7, 5, seed=41), base + rand(7, 5, seed=42)]
    cts = run(ISO_CTS, base, experts, common_space_fraction=1.0)
    assert torch.allclose(cts, run(ISO_C, base, experts), atol=1e-5)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.8])
def test_iso_cts_with_one_task_is_iso_c(fraction):
    # T = 1: common + task-specific directions are all of τ's singular directions.
    base, tau = rand(6, 4, seed=43), rand(6, 4, seed=44)
    cts = run(ISO_CTS, base, [base + tau], common_space_fraction=fraction)
    assert torch.allclose(cts, run(ISO_C, base, [base + tau]), atol=1e-5)


def test_iso_cts_differs_from_iso_c_with_task_subspaces():
    base = rand(8, 8, seed=45)
    experts = [base + rand(8, 8, seed=46), base + rand(8, 8, seed=47)]
    assert not torch.allclose(
        run(ISO_CTS, base, experts, common_space_fraction=0.5), run(ISO_C, base, experts), atol=1e-3
    )


# ------------------------------------------------------------------------ non-matrix tensors


@pytest.mark.parametrize("m", [ISO_C, ISO_CTS], ids=["iso_c", "iso_cts"])
def test_vectors_and_excluded_matrices_take_the_mean(m):
    base = rand(6, seed=50)
    t1, t2 = rand(6, seed=51), rand(6, seed=52)
    out = run(m, base, [base + t1, base + t2], alpha=2.0)
    assert torch.allclose(out - base, t1 + t2, atol=1e-6)  # α · mean = 2 · (t1 + t2)/2
    mb = rand(4, 3, seed=53)
    e = [mb + rand(4, 3, seed=54), mb + rand(4, 3, seed=55)]
    out = run(m, mb, e, name="lm_head.weight", exclude="lm_head")
    assert torch.allclose(out - mb, ((e[0] - mb) + (e[1] - mb)) / 2, atol=1e-6)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "bad", [{"common_space_fraction": 1.5}, {"common_space_fraction": -0.1}, {"alpha": float("inf")}, {"lambda": 1.0}]
)
def test_invalid_parameters(bad):
    with pytest.raises(ValidationError):
        ISO_CTS.params.model_validate(bad)


def test_iso_c_has_no_subspace_parameter():
    with pytest.raises(ValidationError):
        ISO_C.params.model_validate({"common_space_fraction": 0.5})
    with pytest.raises(ValidationError):
        ISO_C.model_params.model_validate({"weight": 1.0})
