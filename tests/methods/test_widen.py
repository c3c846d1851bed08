"""WIDEN: a hand-worked 2 × 2 case, an independent implementation that follows the reference's
structure (direction matrices, cosine similarity, scatter ranks), 1-D scores, embeddings,
degenerate columns, parameter validation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from mergelab.methods.base import TensorContext
from mergelab.methods.registry import get_method

WIDEN = get_method("widen")


def run(base, experts, name="model.layers.0.mlp.up_proj.weight", **glob):
    params = WIDEN.params.model_validate(glob)
    return WIDEN(
        base, experts, params, [WIDEN.model_params.model_validate({})] * len(experts), TensorContext(name=name)
    )


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- hand-worked

# W0 = I (2 × 2); expert 1 scales the columns by (3, 1.5), expert 2 by (1.2, 2): directions do not
# change (Δd = 0 everywhere, ranks by column index: (0, 1/2) for both experts, mean 1/4), so the
# direction scores are softmax(0, 0) = 1/2 in column 0 and c in column 1 (1/2 > 1/4).
# Magnitude changes: expert 1 (2, 0.5) → ranks (1/2, 0); expert 2 (0.2, 1) → ranks (0, 1/2).
# Softmax over experts of (1/2, 0) gives (σ', σ) with σ = 1/(1 + e^0.5); the entries of rank 1/2
# get c. Weights w_i = (mag + dir)/2:
#   expert 1: column 0 (c + 1/2)/2, column 1 (σ + c)/2;  expert 2: column 0 (σ + 1/2)/2, column 1 c.
# τ1 = diag(2, 0.5), τ2 = diag(0.2, 1) → θ = I + diag(2 w1[0] + 0.2 w2[0], 0.5 w1[1] + w2[1]).
SIGMA = 1 / (1 + math.exp(0.5))


@pytest.mark.parametrize("c", [1.0, 0.3])
def test_hand_worked_case(c):
    base = torch.eye(2)
    e1 = torch.diag(torch.tensor([3.0, 1.5]))
    e2 = torch.diag(torch.tensor([1.2, 2.0]))
    out = run(base, [e1, e2], score_calibration_value=c)
    col0 = 1 + 2.0 * (c + 0.5) / 2 + 0.2 * (SIGMA + 0.5) / 2
    col1 = 1 + 0.5 * (SIGMA + c) / 2 + 1.0 * c
    assert torch.allclose(out, torch.diag(torch.tensor([col0, col1])), atol=1e-6)


def test_ratio_above_every_rank_disables_calibration():
    # t large: no column is "above average", weights are plain softmax averages.
    base = torch.eye(2)
    e1 = torch.diag(torch.tensor([3.0, 1.5]))
    e2 = torch.diag(torch.tensor([1.2, 2.0]))
    out = run(base, [e1, e2], above_average_value_ratio=10.0)
    col0 = 1 + 2.0 * ((1 - SIGMA) + 0.5) / 2 + 0.2 * (SIGMA + 0.5) / 2
    col1 = 1 + 0.5 * (SIGMA + 0.5) / 2 + 1.0 * ((1 - SIGMA) + 0.5) / 2
    assert torch.allclose(out, torch.diag(torch.tensor([col0, col1])), atol=1e-6)


# ------------------------------------------------------------------ independent implementation


def reference_like(base, experts, t=1.0, c=1.0):
    """Follows the reference's structure: D = W / ‖W[:, j]‖, cosine_similarity of directions,
    scatter-based ranks, softmax + calibration, ½(mag + dir) weights."""

    def mag_dir(w):
        m = torch.norm(w, p=2, dim=0)
        return m, w / m

    def rank(diff):
        idx = torch.argsort(diff, dim=1, stable=True)
        sig = (torch.arange(diff.shape[1]) / diff.shape[1]).repeat(diff.shape[0]).reshape(diff.shape)
        return torch.zeros(diff.shape).scatter(1, idx, sig)

    def scores(x):
        s = torch.softmax(x, dim=0)
        s[x > x.mean(dim=1, keepdim=True) * t] = c
        return s

    m0, d0 = mag_dir(base)
    mags, dirs = [], []
    for e in experts:
        m, d = mag_dir(e)
        mags.append((m - m0).abs())
        dirs.append(1.0 - torch.cosine_similarity(d, d0, dim=0))
    w = 0.5 * (scores(rank(torch.stack(mags))) + scores(rank(torch.stack(dirs))))
    deltas = torch.stack([e - base for e in experts])
    return base + (deltas * w.unsqueeze(1)).sum(dim=0)


@pytest.mark.parametrize(
    ("shape", "n", "t", "c"), [((6, 5), 2, 1.0, 1.0), ((4, 9), 3, 0.8, 0.6), ((10, 3), 4, 1.2, 1.0)]
)
def test_matches_reference_structure(shape, n, t, c):
    base = rand(*shape, seed=1)
    experts = [base + rand(*shape, seed=10 + i) * (0.05 * (i + 1)) for i in range(n)]
    out = run(base, experts, above_average_value_ratio=t, score_calibration_value=c)
    assert torch.allclose(out, reference_like(base, experts, t, c), atol=1e-5)


def test_vectors_use_raw_magnitudes_elementwise():
    base = rand(5, seed=2)
    taus = [rand(5, seed=3) * 0.5, rand(5, seed=4)]
    out = run(base, [base + t for t in taus], name="model.norm.weight")
    a = torch.stack([t.abs() for t in taus])
    s = torch.softmax(a, dim=0)
    s[a > a.mean(dim=1, keepdim=True)] = 1.0
    assert torch.allclose(out, base + (torch.stack(taus) * s).sum(0), atol=1e-6)


def test_input_embeddings_are_ranked_per_token():
    base = rand(7, 3, seed=5)  # vocab 7 × hidden 3
    experts = [base + rand(7, 3, seed=6) * 0.1, base + rand(7, 3, seed=7) * 0.2]
    out = run(base, experts, name="model.embed_tokens.weight")
    expected = reference_like(base.T, [e.T for e in experts]).T
    assert torch.allclose(out, expected, atol=1e-5)
    plain = run(base, experts, name="model.embed_tokens.weight", transpose_embeddings=False)
    assert torch.allclose(plain, reference_like(base, experts), atol=1e-5)
    assert not torch.allclose(out, plain, atol=1e-4)


def test_identical_experts_with_unit_calibration_double_important_columns():
    base = rand(4, 6, seed=8)
    expert = base + rand(4, 6, seed=9) * 0.1
    out = run(base, [expert, expert])
    factors = ((out - base) / (expert - base)).mean(dim=0)
    # every column gets 2·(½(1/2 or 1) + ½(1/2 or 1)) ∈ {1, 1.5, 2}; above-average ones exceed 1
    assert set(torch.round(factors * 2).tolist()) <= {2.0, 3.0, 4.0}
    assert float(factors.max()) > 1.4


def test_zero_columns_give_finite_results():
    base = rand(3, 4, seed=11)
    base[:, 1] = 0
    e1 = base.clone()
    e1[:, 2] += 0.3
    out = run(base, [e1, base.clone()])
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "bad", [{"above_average_value_ratio": -1.0}, {"score_calibration_value": float("nan")}, {"lambda": 1.0}]
)
def test_invalid_parameters(bad):
    with pytest.raises(ValidationError):
        WIDEN.params.model_validate(bad)


def test_no_per_model_parameters():
    with pytest.raises(ValidationError):
        WIDEN.model_params.model_validate({"weight": 1.0})
