"""DARE (dare_linear, dare_ties): drop-and-rescale properties, reproducibility, an independent
re-implementation (pinned to the documented sampling scheme), parameter validation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from reference.ties import elect_and_merge

from mergelab.methods.base import TensorContext
from mergelab.methods.registry import get_method

DARE_LINEAR = get_method("dare_linear")
DARE_TIES = get_method("dare_ties")
TA = get_method("task_arithmetic")


def run(method, base, experts, per_model, name="layers.0.w", seed=0, **glob):
    params = method.params.model_validate(glob)
    mps = [method.model_params.model_validate(p) for p in per_model]
    return method(base, experts, params, mps, TensorContext(name=name, seed=seed))


def family(shape=(12, 10), n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + torch.randn(shape, generator=g) * (0.5 + i) for i in range(n)]


# ---------------------------------------------------------------------------------- properties


@pytest.mark.parametrize("normalize", [False, True])
def test_density_one_equals_task_arithmetic(normalize):
    base, experts = family()
    w = [0.5, 1.0, -0.25]
    out = run(
        DARE_LINEAR, base, experts, [{"weight": x, "density": 1.0} for x in w], normalize=normalize, **{"lambda": 0.8}
    )
    ref = TA(
        base,
        experts,
        TA.params.model_validate({"lambda": 0.8, "normalize": normalize}),
        [TA.model_params(weight=x) for x in w],
        TensorContext(name="layers.0.w"),
    )
    assert torch.allclose(out, ref, atol=1e-6)


def test_survivors_are_divided_by_density():
    # p = 0.5: every entry of the result is 0 or 2·τ (DARE's anchor: 2 · mask ⊙ τ)
    base = torch.zeros(4000)
    tau = torch.linspace(0.1, 2.0, 4000)
    out = run(DARE_LINEAR, base, [base + tau], [{"density": 0.5}])
    kept = out != 0
    assert torch.allclose(out[kept], 2 * tau[kept])
    assert abs(kept.float().mean().item() - 0.5) < 0.04  # sd 0.008


def test_density_is_reached():
    base = torch.zeros(200, 100)
    out = run(DARE_LINEAR, base, [base + 1.0], [{"density": 0.3}])
    assert abs((out != 0).float().mean().item() - 0.3) < 0.015  # sd 0.0032


def test_inverse_rescale_is_unbiased():
    # E[m ⊙ τ / density] = τ: the mean over many seeds recovers τ (no rescale: 0.4 τ)
    base = torch.zeros(64)
    tau = torch.ones(64)
    mean = torch.stack([run(DARE_LINEAR, base, [tau], [{"density": 0.4}], seed=s) for s in range(400)]).mean(0)
    assert (mean - tau).abs().max().item() < 0.3  # per-entry sd ≈ 0.061


def test_l1_mode_matches_the_l1_norm_and_no_rescale_keeps_values():
    base, experts = family(n=1)
    tau = experts[0] - base
    l1 = run(DARE_LINEAR, base, experts, [{"density": 0.3}], rescale_mode="l1")
    assert abs((l1 - base).abs().sum().item() - tau.abs().sum().item()) < 1e-3
    raw = run(DARE_LINEAR, base, experts, [{"density": 0.3}], rescale=False)
    kept = (raw - base) != 0
    assert torch.allclose((raw - base)[kept], tau[kept], atol=1e-6)


def test_seeded_per_tensor_name():
    base, experts = family()
    pm = [{"density": 0.5}] * 3
    a = run(DARE_TIES, base, experts, pm, name="layers.0.w", seed=1)
    b = run(DARE_TIES, base, experts, pm, name="layers.0.w", seed=1)
    c = run(DARE_TIES, base, experts, pm, name="layers.1.w", seed=1)
    d = run(DARE_TIES, base, experts, pm, name="layers.0.w", seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_global_rng_untouched():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    base, experts = family()
    run(DARE_LINEAR, base, experts, [{"density": 0.5}] * 3)
    assert torch.equal(torch.get_rng_state(), state)


def test_density_zero_gives_the_base():
    base, experts = family()
    assert torch.equal(run(DARE_TIES, base, experts, [{"density": 0.0}] * 3), base)


# -------------------------------------------------------------------- independent reference


def naive_dare(
    method, base, experts, weights, densities, *, name, seed=0, lam=1.0, normalize=None, sign_tie="positive"
):
    """From the paper: m ~ Bernoulli(d), drawn as u < round(d·2¹⁶) with u the tensor's
    per-expert generator streams' 64-bit draws split into 16-bit lanes, experts in order; τ̃ = m τ / d̂ with
    d̂ = round(d·2¹⁶)/2¹⁶ the realised keep probability; then a sum, or TIES elect + mean."""
    ctx = TensorContext(name=name, seed=seed)
    dropped = []
    for i, (e, d) in enumerate(zip(experts, densities)):
        gen = ctx.generator(i + 1)  # each expert draws from its own stream
        tau = (e - base).double()
        if d < 1:
            n = tau.numel()
            words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=gen)
            u = words.view(torch.int16)[:n].to(torch.int32).reshape(tau.shape) + 32768
            t = round(d * 65536)
            keep = u < t
            tau = torch.where(keep, tau / (t / 65536), torch.zeros_like(tau))
        dropped.append(tau)
    W = torch.stack([w * t for w, t in zip(weights, dropped)])
    if method == "dare_linear":
        merged = W.sum(0) / (sum(weights) if normalize else 1.0)
    else:
        merged = elect_and_merge(list(W), weights, normalize=normalize, sign_tie=sign_tie)
    return (base.double() + lam * merged).float()


@pytest.mark.parametrize(
    ("method", "weights", "densities", "normalize", "lam"),
    [
        ("dare_linear", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], False, 1.0),
        ("dare_linear", [0.2, 0.3, 0.5], [0.1, 0.9, 1.0], True, 0.7),
        ("dare_ties", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], True, 1.0),
        ("dare_ties", [0.7, 1.3, 1.0], [0.3, 0.6, 1.0], False, 1.2),
    ],
)
def test_matches_naive_reimplementation(method, weights, densities, normalize, lam):
    base, experts = family(shape=(7, 9), seed=4)
    m = get_method(method)
    out = run(
        m,
        base,
        experts,
        [{"weight": w, "density": d} for w, d in zip(weights, densities)],
        name="blk.3.mlp",
        normalize=normalize,
        **{"lambda": lam},
    )
    ref = naive_dare(method, base, experts, weights, densities, name="blk.3.mlp", lam=lam, normalize=normalize)
    assert torch.allclose(out, ref, atol=1e-5)


# ----------------------------------------------------------------------------------- params


def test_defaults():
    lin, ties, mp = DARE_LINEAR.params(), DARE_TIES.params(), DARE_LINEAR.model_params()
    assert (lin.rescale, lin.rescale_mode) == (True, "inverse")
    assert (lin.normalize, lin.lambda_) == (False, 1.0)
    assert (ties.rescale, ties.rescale_mode) == (True, "inverse")
    assert (ties.normalize, ties.sign_tie) == (True, "positive")
    assert (mp.density, mp.weight) == (0.5, 1.0)


def test_mergekit_recipe_keys_accepted():
    p = DARE_TIES.params.model_validate({"lambda": 1.1, "normalize": False, "rescale": True, "int8_mask": True})
    assert p.lambda_ == 1.1 and p.rescale_mode == "inverse"


@pytest.mark.parametrize(
    "bad", [{"density": 1.01}, {"density": -0.5}, {"weight": math.nan}, {"epsilon": 0.1}, {"drop_rate": 0.5}]
)
def test_bad_model_params_rejected(bad):
    with pytest.raises(ValidationError):
        DARE_TIES.model_params.model_validate(bad)


@pytest.mark.parametrize("bad", [{"rescale_mode": "l2"}, {"lambda": math.inf}, {"scope": "global"}, {"sign_tie": "up"}])
def test_bad_global_params_rejected(bad):
    with pytest.raises(ValidationError):
        DARE_TIES.params.model_validate(bad)
    if "sign_tie" in bad:
        # dare_linear has no sign election: the key is unknown there
        with pytest.raises(ValidationError):
            DARE_LINEAR.params.model_validate({"sign_tie": "positive"})


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_chunked_equals_whole_tensor(name, monkeypatch):
    # each expert draws from its own stream in order, so chunking cannot change the masks
    import mergelab.methods.kernels.chunks as sp
    from mergelab.methods import get_method

    m = get_method(name)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(37, 29, generator=g)
    experts = [base + torch.randn(37, 29, generator=g) for _ in range(3)]
    mp = [m.model_params.model_validate({"density": 0.6, **({"epsilon": 0.1} if "della" in name else {})})] * 3
    ctx = TensorContext(name="x", seed=4)
    monkeypatch.setattr(sp, "CHUNK", 1 << 30)
    whole = m(base, experts, m.params(), mp, ctx)
    monkeypatch.setattr(sp, "CHUNK", 100)  # several chunks (DELLA: 3 rows each)
    assert torch.equal(m(base, experts, m.params(), mp, ctx), whole)


def test_experts_dropped_on_threads_equal_the_sequential_loop(monkeypatch):
    """Chunks large enough for the experts' masks to be drawn side by side on threads give
    exactly the sequential result (each expert has its own generator)."""
    import mergelab.methods.stages.pipeline as pipeline
    from mergelab.methods import get_method

    m = get_method("dare_ties")
    g = torch.Generator().manual_seed(8)
    base = torch.randn(600, 600, generator=g)
    experts = [base + torch.randn(600, 600, generator=g) for _ in range(3)]
    mp = [m.model_params.model_validate({"density": d}) for d in (0.3, 0.5, 0.7)]
    ctx = TensorContext(name="x", seed=2)
    threaded = m(base, experts, m.params(), mp, ctx)
    monkeypatch.setattr(pipeline, "parallel_map", lambda fn, items, numel: [fn(x) for x in items])
    assert torch.equal(m(base, experts, m.params(), mp, ctx), threaded)


@pytest.mark.parametrize("sign_tie", [None, "positive", "majority"])
def test_exact_sign_ties_follow_the_methods_rule_dare_ties(sign_tie):
    """Coordinates whose weighted sum is exactly 0 take +1 (the default, mergekit) or the
    tensor's majority sign; the reference applies the same rule."""
    from reference.ties import exact_tie_family

    base, experts = exact_tie_family()
    m = get_method("dare_ties")
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


def test_dare_ties_trim_density_is_dare_then_the_ties_trim():
    """Issue 13: ``trim_density`` runs the TIES trim on the dropped, rescaled task vectors (the
    DARE authors' DARE + TIES); independent restatement with the same masks (density 1: no drop)."""
    from mergelab.methods.base import TensorContext
    from mergelab.methods.registry import get_method

    m = get_method("dare_ties")
    g = torch.Generator().manual_seed(4)
    base = torch.randn(30, 20, generator=g)
    experts = [base + torch.randn(30, 20, generator=g) for _ in range(2)]
    ctx = TensorContext(name="x")
    mps = [m.model_params(density=1.0), m.model_params(density=1.0)]
    out = m(base, experts, m.params(trim_density=0.3, normalize=True), mps, ctx)
    ties = get_method("ties")
    ref = ties(base, experts, ties.params(), [ties.model_params(density=0.3)] * 2, ctx)
    assert torch.allclose(out, ref, atol=1e-6)
    # with drops: each expert's surviving entries are at most ⌊0.3·n⌋ (+ ties), all from its drop mask
    mps = [m.model_params(density=0.5), m.model_params(density=0.5)]
    trimmed = m(base, experts[:1], m.params(trim_density=0.3), mps[:1], ctx)
    dropped = m(base, experts[:1], m.params(), mps[:1], ctx)
    moved = trimmed != base
    assert int(moved.sum()) == int(0.3 * 600)
    assert bool((dropped[moved] == trimmed[moved]).all())
