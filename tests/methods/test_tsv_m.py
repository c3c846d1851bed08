"""TSV-M: one-task identity, hand-worked orthogonal case, an independent re-implementation
(zero-padded buffers as in the reference, and whitening by (UᵀU)^(-1/2) instead of an SVD),
the non-matrix fallback, exclusions and parameter validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import mergelab
from mergelab.methods.base import TensorContext
from mergelab.methods.registry import get_method

TSVM = get_method("tsv_m")


def run(base, experts, name="w", weights=None, **glob):
    params = TSVM.params.model_validate(glob)
    mps = [
        TSVM.model_params.model_validate({} if weights is None else {"weight": w})
        for w in (weights or [1.0] * len(experts))
    ]
    return TSVM(base, experts, params, mps, TensorContext(name=name))


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ anchors


@pytest.mark.parametrize("shape", [(6, 4), (4, 6), (5, 5)])
def test_one_task_returns_its_task_vector(shape):
    base, tau = rand(*shape, seed=1), rand(*shape, seed=2)
    out = run(base, [base + tau])
    assert torch.allclose(out - base, tau, atol=1e-5)


def test_orthogonal_rank_one_tasks_add_up():
    # τ1 = 3 e1 e2ᵀ, τ2 = 2 e2 e1ᵀ (2 × 2, T = 2, k = 1): the kept directions are already
    # orthonormal, so the orthogonalisation changes nothing and Δ = τ1 + τ2 = [[0, 3], [2, 0]].
    base = torch.zeros(2, 2)
    t1 = torch.tensor([[0.0, 3.0], [0.0, 0.0]])
    t2 = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    out = run(base, [t1, t2])
    assert torch.allclose(out, torch.tensor([[0.0, 3.0], [2.0, 0.0]]), atol=1e-6)


def test_alpha_and_weights():
    base, tau = rand(5, 3, seed=3), rand(5, 3, seed=4)
    assert torch.allclose(run(base, [base + tau], alpha=0.5) - base, 0.5 * tau, atol=1e-5)
    assert torch.allclose(run(base, [base + tau], weights=[2.0]) - base, 2.0 * tau, atol=1e-5)


def test_more_tasks_than_rank_gives_no_update():
    base = rand(4, 1, seed=5)  # r = 1 < T = 2: k = 0
    out = run(base, [base + rand(4, 1, seed=6), base + rand(4, 1, seed=7)])
    assert torch.equal(out, base)


# ------------------------------------------------------------ independent re-implementation


def naive_tsvm(taus, alpha=1.0):
    """Paper/reference steps with r-sized zero-padded buffers and whitening U (UᵀU)^(-1/2)."""
    t_count = len(taus)
    m, n = taus[0].shape
    r = min(m, n)
    k = r // t_count
    u_buf = torch.zeros(m, r, dtype=torch.float64)
    s_buf = torch.zeros(r, dtype=torch.float64)
    v_buf = torch.zeros(r, n, dtype=torch.float64)
    for i, t in enumerate(taus):
        u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
        u_buf[:, i * k : (i + 1) * k] = u[:, :k]
        s_buf[i * k : (i + 1) * k] = s[:k]
        v_buf[i * k : (i + 1) * k, :] = vh[:k, :]
    used = slice(0, k * t_count)

    def whiten_cols(a):  # a (Aᵀ A)^(-1/2): the orthogonal polar factor of a full-column-rank a
        w, q = torch.linalg.eigh(a.T @ a)
        return a @ q @ torch.diag(w.rsqrt()) @ q.T

    u_orth = whiten_cols(u_buf[:, used])
    v_orth = whiten_cols(v_buf[used, :].T).T
    return alpha * (u_orth @ torch.diag(s_buf[used]) @ v_orth)


@pytest.mark.parametrize(("shape", "n_tasks"), [((8, 6), 2), ((7, 9), 3), ((10, 7), 2), ((6, 6), 4)])
def test_matches_naive_implementation(shape, n_tasks):
    base = rand(*shape, seed=10)
    taus = [rand(*shape, seed=20 + i) * (1 + i) for i in range(n_tasks)]
    out = run(base, [base + t for t in taus], alpha=0.7)
    expected = naive_tsvm(taus, alpha=0.7).float()
    assert torch.allclose(out - base, expected, atol=2e-4), (out - base - expected).abs().max()


def test_weights_scale_task_vectors_before_svd():
    base = rand(6, 5, seed=30)
    taus = [rand(6, 5, seed=31), rand(6, 5, seed=32)]
    out = run(base, [base + t for t in taus], weights=[0.5, 2.0])
    expected = naive_tsvm([0.5 * taus[0], 2.0 * taus[1]]).float()
    assert torch.allclose(out - base, expected, atol=2e-4)


# ------------------------------------------------------------------- non-matrix tensors


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), ()])
def test_non_matrices_take_the_mean(shape):
    base = rand(*shape, seed=40)
    taus = [rand(*shape, seed=41), rand(*shape, seed=42), rand(*shape, seed=43)]
    out = run(base, [base + t for t in taus], alpha=2.0)
    assert torch.allclose(out - base, 2.0 * (taus[0] + taus[1] + taus[2]) / 3, atol=1e-5)


def test_excluded_names_take_the_mean():
    base = rand(6, 4, seed=50)
    taus = [rand(6, 4, seed=51), rand(6, 4, seed=52)]
    experts = [base + t for t in taus]
    mean = (taus[0] + taus[1]) / 2
    excluded = run(base, experts, name="model.embed_tokens.weight", exclude="lm_head, embed_tokens")
    assert torch.allclose(excluded - base, mean, atol=1e-6)
    kept = run(base, experts, name="model.layers.0.mlp.up_proj.weight", exclude="lm_head,embed_tokens")
    assert not torch.allclose(kept - base, mean, atol=1e-3)
    assert torch.allclose(run(base, experts, exclude="*") - base, mean, atol=1e-6)


def test_recipe_form_and_dtype():
    base = rand(6, 4, seed=60).bfloat16()
    tau = rand(6, 4, seed=61).bfloat16()
    out = mergelab.merge_tensors("tsv_m", [base + tau], base, parameters={"exclude": "nothing_matches"})
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), (base + tau).float(), atol=3e-2)


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [{"alpha": float("nan")}, {"exclude": 3}, {"exclude": ["a", 1]}, {"density": 0.5}])
def test_invalid_global_parameters(bad):
    with pytest.raises(ValidationError):
        TSVM.params.model_validate(bad)


def test_invalid_model_parameters():
    with pytest.raises(ValidationError):
        TSVM.model_params.model_validate({"weight": float("inf")})
    with pytest.raises(ValidationError):
        TSVM.model_params.model_validate({"density": 0.2})


def test_exclude_accepts_list_and_comma_string():
    assert TSVM.params.model_validate({"exclude": " a, b ,"}).exclude == ("a", "b")
    assert TSVM.params.model_validate({"exclude": ["a", "b,c"]}).exclude == ("a", "b", "c")
