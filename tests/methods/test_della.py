"""DELLA (della, della_linear): MagPrune per row, 1/p rescale, an independent re-implementation
(pinned to the documented sampling scheme), the DARE special case, parameter validation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from reference.ties import elect_and_merge

from mergelab.methods.base import TensorContext
from mergelab.methods.registry import get_method

DELLA = get_method("della")
DELLA_LINEAR = get_method("della_linear")
DARE_LINEAR = get_method("dare_linear")
DARE_TIES = get_method("dare_ties")
TA = get_method("task_arithmetic")


def run(method, base, experts, per_model, name="layers.0.mlp.down_proj.weight", seed=0, **glob):
    params = method.params.model_validate(glob)
    mps = [method.model_params.model_validate(p) for p in per_model]
    return method(base, experts, params, mps, TensorContext(name=name, seed=seed))


def family(shape=(10, 30), n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * (0.5 + i) for i in range(n)]


# ---------------------------------------------------------------------------------- properties


@pytest.mark.parametrize(("della", "dare"), [(DELLA_LINEAR, DARE_LINEAR), (DELLA, DARE_TIES)])
def test_epsilon_zero_is_dare(della, dare):
    base, experts = family()
    pm = [{"weight": w, "density": d} for w, d in zip([1.0, 0.5, 0.8], [0.4, 0.6, 0.7])]
    out = run(della, base, experts, [{**p, "epsilon": 0.0} for p in pm], seed=3)
    ref = run(dare, base, experts, pm, seed=3)
    assert torch.equal(out, ref)


def test_survivors_divided_by_their_own_keep_probability():
    # one row, |τ| ascending = index order: r_j = j / (n − 1), p_j = 0.4 + 0.4 r_j
    n = 101
    tau = torch.linspace(0.01, 1.0, n)
    out = run(DELLA_LINEAR, torch.zeros(n), [tau], [{"density": 0.6, "epsilon": 0.2}])
    p = 0.4 + 0.4 * torch.arange(n) / (n - 1)
    kept = out != 0
    assert 0 < int(kept.sum()) < n
    # divided by the realised keep probability round(p·2¹⁶)/2¹⁶, within 2⁻¹⁷/p of p
    assert torch.allclose(out[kept], tau[kept] / p[kept], rtol=5e-5)


def test_inverse_rescale_is_unbiased():
    base = torch.zeros(2, 32)
    tau = torch.rand(2, 32, generator=torch.Generator().manual_seed(0)) + 0.5
    mean = torch.stack(
        [run(DELLA_LINEAR, base, [tau], [{"density": 0.5, "epsilon": 0.3}], seed=s) for s in range(400)]
    ).mean(0)
    # per-entry sd ≤ τ·sqrt((1 − p)/p)/20 ≤ 1.5·2/20 = 0.15 (p ≥ 0.2)
    assert (mean - tau).abs().max().item() < 0.6
    assert abs((mean - tau).mean().item()) < 0.05


def test_keep_rate_per_row_and_by_rank():
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(40, 500, generator=g)
    out = run(DELLA_LINEAR, torch.zeros(40, 500), [tau], [{"density": 0.5, "epsilon": 0.3}])
    kept = (out != 0).float()
    rows = kept.mean(dim=1)
    assert (rows - 0.5).abs().max().item() < 0.1  # sd 0.022 per row
    # larger magnitudes are kept more often: top fifth ≈ 0.74, bottom fifth ≈ 0.26 expected
    ranks = tau.abs().argsort(dim=1).argsort(dim=1)
    top = kept[ranks >= 400].mean().item()
    bottom = kept[ranks < 100].mean().item()
    assert top > 0.68 and bottom < 0.32


def test_rows_are_ranked_independently():
    # row 1 is row 0 scaled by 1000: same ranks, so the same keep probabilities
    row = torch.linspace(-1, 1, 50)
    tau = torch.stack([row, row * 1000])
    base = torch.zeros(2, 50)
    out = run(DELLA_LINEAR, base, [tau], [{"density": 0.5, "epsilon": 0.4}], rescale=True)
    kept = out != 0
    p0 = (tau[0] / out[0])[kept[0]]
    p1 = (tau[1] / out[1])[kept[1]]
    probs = torch.cat([p0, p1])
    assert probs.min().item() >= 0.1 - 1e-6 and probs.max().item() <= 0.9 + 1e-6


def test_seeded_per_tensor_name():
    base, experts = family()
    pm = [{"density": 0.5, "epsilon": 0.1}] * 3
    a = run(DELLA, base, experts, pm, name="a", seed=5)
    assert torch.equal(a, run(DELLA, base, experts, pm, name="a", seed=5))
    assert not torch.equal(a, run(DELLA, base, experts, pm, name="b", seed=5))
    assert not torch.equal(a, run(DELLA, base, experts, pm, name="a", seed=6))


def test_l1_mode_preserves_the_l1_norm():
    base, experts = family(n=1)
    out = run(DELLA_LINEAR, base, experts, [{"density": 0.4, "epsilon": 0.1}], rescale_mode="l1")
    assert abs((out - base).abs().sum().item() - (experts[0] - base).abs().sum().item()) < 1e-3


def test_density_one_disables_pruning_whatever_epsilon():
    base, experts = family()
    out = run(DELLA_LINEAR, base, experts, [{"density": 1.0, "epsilon": 0.15}] * 3)
    ref = TA(base, experts, TA.params(), [TA.model_params()] * 3, TensorContext(name="x"))
    assert torch.allclose(out, ref, atol=1e-6)


def test_higher_dimensional_and_one_dimensional_tensors():
    g = torch.Generator().manual_seed(2)
    for shape in [(4, 3, 5), (17,), ()]:
        base = torch.randn(shape, generator=g)
        experts = [base + torch.randn(shape, generator=g) for _ in range(2)]
        out = run(DELLA, base, experts, [{"density": 0.5, "epsilon": 0.2}] * 2)
        assert out.shape == base.shape and torch.isfinite(out).all()


# -------------------------------------------------------------------- independent reference


def naive_della(
    base, experts, weights, densities, epsilons, *, ties, name, seed=0, lam=1.0, normalize=True, sign_tie="positive"
):
    """From the paper: per row, rank |τ| ascending (Python sort), r = rank/(n−1),
    p = d − ε + 2ε r, keep = u < round(p·2¹⁶) with u 16-bit lanes of the tensor's generator's
    64-bit draws (experts in order), τ̃ = keep τ / p̂ with p̂ = round(p·2¹⁶)/2¹⁶."""
    ctx = TensorContext(name=name, seed=seed)
    pruned = []
    for i, (e, d, eps) in enumerate(zip(experts, densities, epsilons)):
        gen = ctx.generator(i + 1)  # each expert draws from its own stream
        tau = (e - base).double()
        rows = tau.reshape(tau.shape[0], -1) if tau.dim() >= 2 else tau.reshape(1, -1)
        p = torch.empty_like(rows)
        n = rows.shape[1]
        for i in range(rows.shape[0]):
            order = sorted(range(n), key=lambda j: (abs(float(rows[i, j])), j))
            for rank, j in enumerate(order):
                p[i, j] = (d - eps) + 2 * eps * rank / (n - 1)
        p = p.reshape(tau.shape)
        n = tau.numel()
        words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=gen)
        u = words.view(torch.int16)[:n].to(torch.int32).reshape(tau.shape) + 32768
        t = (p.float() * 65536).round()  # keep iff u < round(p·2¹⁶); realised p̂ = t/2¹⁶
        keep = u < t
        pruned.append(torch.where(keep, tau / (t.double() / 65536), torch.zeros_like(tau)))
    W = torch.stack([w * t for w, t in zip(weights, pruned)])
    if not ties:
        merged = W.sum(0) / (sum(weights) if normalize else 1.0)
    else:
        merged = elect_and_merge(list(W), weights, normalize=normalize, sign_tie=sign_tie)
    return (base.double() + lam * merged).float()


@pytest.mark.parametrize(
    ("ties", "weights", "densities", "epsilons", "normalize", "lam"),
    [
        (True, [1.0, 1.0, 1.0], [0.7, 0.7, 0.7], [0.07, 0.07, 0.07], True, 1.0),
        (True, [0.5, 1.5], [0.4, 0.6], [0.3, 0.1], False, 1.1),
        (False, [1.0, 1.0, 1.0], [0.5, 0.3, 0.8], [0.2, 0.1, 0.2], False, 1.0),
        (False, [0.2, 0.8], [0.6, 0.5], [0.4, 0.0], True, 0.9),
    ],
)
def test_matches_naive_reimplementation(ties, weights, densities, epsilons, normalize, lam):
    base, experts = family(shape=(6, 13), n=len(weights), seed=7)
    per_model = [{"weight": w, "density": d, "epsilon": e} for w, d, e in zip(weights, densities, epsilons)]
    out = run(
        DELLA if ties else DELLA_LINEAR,
        base,
        experts,
        per_model,
        name="blk.1.ffn",
        normalize=normalize,
        **{"lambda": lam},
    )
    ref = naive_della(
        base, experts, weights, densities, epsilons, ties=ties, name="blk.1.ffn", lam=lam, normalize=normalize
    )
    assert torch.allclose(out, ref, atol=1e-4)


# ----------------------------------------------------------------------------------- params


def test_defaults():
    p, pl, m = DELLA.params(), DELLA_LINEAR.params(), DELLA.model_params()
    assert (p.normalize, p.rescale, p.rescale_mode) == (True, True, "inverse")
    assert p.sign_tie == "positive"
    assert (pl.normalize, pl.rescale, pl.rescale_mode) == (False, True, "inverse")
    assert (m.density, m.epsilon, m.weight) == (0.7, 0.07, 1.0)


@pytest.mark.parametrize(
    "good",
    [
        {"density": 0.85, "epsilon": 0.15},
        {"density": 0.5, "epsilon": 0.0},
        {"density": 1.0, "epsilon": 0.15},
        {"density": 0.6, "epsilon": 0.4},
    ],
)
def test_window_accepted(good):
    DELLA.model_params.model_validate(good)


@pytest.mark.parametrize(
    "bad",
    [
        {"density": 0.1, "epsilon": 0.15},
        {"density": 0.9, "epsilon": 0.15},
        {"density": 0.15, "epsilon": 0.15},
        {"density": 0.5, "epsilon": 0.5},
        {"density": 0.0},
        {"epsilon": -0.01},
        {"density": 1.2},
        {"epsilon": math.nan},
        {"gamma": 0.1},
        {"window_size": 0.14},
    ],
)
def test_window_rejected(bad):
    with pytest.raises(ValidationError):
        DELLA.model_params.model_validate(bad)


@pytest.mark.parametrize("bad", [{"rescale_mode": "linf"}, {"sign_tie": "negative"}, {"lambda": math.nan}])
def test_bad_global_params_rejected(bad):
    with pytest.raises(ValidationError):
        DELLA.params.model_validate(bad)


@pytest.mark.parametrize("sign_tie", [None, "positive", "majority"])
def test_exact_sign_ties_follow_the_methods_rule_della(sign_tie):
    """Coordinates whose weighted sum is exactly 0 take +1 (the default, mergekit) or the
    tensor's majority sign; the reference applies the same rule."""
    from reference.ties import exact_tie_family

    base, experts = exact_tie_family()
    m = get_method("della")
    gp = {} if sign_tie is None else {"sign_tie": sign_tie}
    mp = [m.model_params.model_validate({"density": 1.0})] * 3
    out = m(base, experts, m.params.model_validate(gp), mp, TensorContext(name="t", seed=1))
    taus = [(e - base).double() for e in experts]
    ref = base.double() + elect_and_merge(taus, [1.0] * 3, normalize=True, sign_tie=sign_tie or "positive")
    assert torch.allclose(out, ref.float(), atol=1e-6, rtol=0)
    other = "majority" if (sign_tie or "positive") == "positive" else "positive"
    assert not torch.allclose(
        out, (base.double() + elect_and_merge(taus, [1.0] * 3, normalize=True, sign_tie=other)).float(), atol=1e-3
    )
