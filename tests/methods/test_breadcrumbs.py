"""Model Breadcrumbs (breadcrumbs, breadcrumbs_ties): hand cases, a naive sort-based
re-implementation, properties, parameter validation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from reference.ties import elect_and_merge

from mergelab.methods.base import TensorContext
from mergelab.methods.registry import get_method

BC = get_method("breadcrumbs")
BCT = get_method("breadcrumbs_ties")
TA = get_method("task_arithmetic")
T = torch.tensor


def run(method, base, experts, per_model, **glob):
    params = method.params.model_validate(glob)
    mps = [method.model_params.model_validate(p) for p in per_model]
    return method(base, experts, params, mps, TensorContext(name="layers.2.o_proj.weight"))


# τ, magnitudes ascending (index):
#   .02(5) .05(0) .08(9) .12(3) .25(7) .30(2) .45(8) .60(4) .90(1) 1.5(6)
TAU = T([0.05, -0.9, 0.3, 0.12, -0.6, 0.02, 1.5, -0.25, 0.45, -0.08])


@pytest.mark.parametrize(
    ("density", "gamma", "kept"),
    [
        # n_top = ⌊.1·10⌋ = 1, target = 6, n_bottom = 10 − 6 − 1 = 3: positions 3..8
        (0.6, 0.1, [1, 2, 3, 4, 7, 8]),
        # target 5, n_top 2, n_bottom 3: positions 3..7 (drops 1.5 and .9)
        (0.5, 0.25, [2, 3, 4, 7, 8]),
        # density + gamma > 1: target 9, n_bottom = max(0, 10 − 9 − 1) = 0: only 1.5 removed
        (0.95, 0.1, [0, 1, 2, 3, 4, 5, 7, 8, 9]),
        # gamma 0: plain top-k (target 3): the three largest, .6 .9 1.5
        (0.3, 0.0, [1, 4, 6]),
    ],
)
def test_hand_cases(density, gamma, kept):
    # (mergekit 0.1.5 returns the same entries for these four cases.)
    out = run(BC, torch.zeros(10), [TAU], [{"density": density, "gamma": gamma}])
    assert out.nonzero().flatten().tolist() == kept
    assert torch.equal(out[kept], TAU[kept])


def test_weights_and_lambda():
    base = torch.ones(10)
    out = run(
        BC,
        base,
        [base + TAU, base - TAU],
        [{"weight": 2.0, "density": 0.6, "gamma": 0.1}, {"weight": 0.5, "density": 0.6, "gamma": 0.1}],
        **{"lambda": 0.5},
    )
    mask = torch.zeros(10, dtype=torch.bool)
    mask[[1, 2, 3, 4, 7, 8]] = True
    assert torch.allclose(out - base, 0.5 * 1.5 * TAU * mask)


def test_ties_variant_hand_case():
    # two experts, density 1 (no masking): τa = [1, -2, 3], τb = [-2, -1, 1]
    # Σ = [-1, -3, 4] -> γ = [-, -, +]; mean of agreeing: [-2, -1.5, 2]; sum: [-2, -3, 4]
    a, b = T([1.0, -2.0, 3.0]), T([-2.0, -1.0, 1.0])
    z = torch.zeros(3)
    pm = [{"density": 1.0}] * 2
    assert run(BCT, z, [a, b], pm).tolist() == [-2.0, -1.5, 2.0]
    assert run(BCT, z, [a, b], pm, normalize=False).tolist() == [-2.0, -3.0, 4.0]


def test_density_one_is_task_arithmetic_whatever_gamma():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5, 5, generator=g)
    experts = [base + torch.randn(5, 5, generator=g) for _ in range(2)]
    out = run(
        BC,
        base,
        experts,
        [{"weight": 0.3, "density": 1.0, "gamma": 0.2}, {"weight": 0.6, "density": 1.0, "gamma": 0.2}],
    )
    ref = TA(
        base, experts, TA.params(), [TA.model_params(weight=0.3), TA.model_params(weight=0.6)], TensorContext(name="x")
    )
    assert torch.allclose(out, ref, atol=1e-6)


def test_ties_at_the_bounds_are_kept():
    # magnitudes 1,1,1,2,2,2,3,3,3,9 ; density .3 gamma .1: target 3, n_top 1, n_bottom 6,
    # kept ascending positions 6..8 = the three 3s (no dropped entry shares a bound value).
    # density .2: target 2, n_bottom 7, positions 7..8; the lower bound 3 is tied with
    # position 6, so all three 3s are kept (3 entries instead of 2).
    x = T([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 9.0])
    out3 = run(BC, torch.zeros(10), [x], [{"density": 0.3, "gamma": 0.1}])
    assert out3.nonzero().flatten().tolist() == [6, 7, 8]
    out2 = run(BC, torch.zeros(10), [x], [{"density": 0.2, "gamma": 0.1}])
    assert out2.nonzero().flatten().tolist() == [6, 7, 8]


def test_bound_ties_sort_keeps_exact_counts():
    """``bound_ties: sort``: exactly ⌊density n⌋ kept and ⌊γ n⌋ outliers removed, tied
    magnitudes in the order of torch.sort (as mergekit 0.1.5's magnitude_outliers; issue 13).
    x: the same magnitudes as above, with the 3s at indices 6, 7, 8."""
    x = T([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 9.0])
    out = run(BC, torch.zeros(10), [x], [{"density": 0.2, "gamma": 0.1}], bound_ties="sort")
    kept = out.nonzero().flatten().tolist()
    assert len(kept) == 2 and set(kept) <= {6, 7, 8}  # two of the three tied 3s, never the 9
    order = torch.sort(x.abs(), descending=False).indices  # the order mergekit takes the ties in
    assert sorted(kept) == sorted(order[7:9].tolist())
    # a tied top: two 9s, n_top = 1 removes exactly one of them (keep removes none)
    y = T([9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])
    out = run(BC, torch.zeros(10), [y], [{"density": 0.5, "gamma": 0.1}], bound_ties="sort")
    assert int((out == 9.0).sum()) == 1 and int((out != 0).sum()) == 5
    keep = run(BC, torch.zeros(10), [y], [{"density": 0.5, "gamma": 0.1}])
    assert int((keep == 9.0).sum()) == 2
    # without ties the two rules agree
    z = run(BC, torch.zeros(10), [TAU], [{"density": 0.6, "gamma": 0.1}], bound_ties="sort")
    assert torch.equal(z, run(BC, torch.zeros(10), [TAU], [{"density": 0.6, "gamma": 0.1}]))


# ------------------------------------------------------------------- naive re-implementation


def naive_breadcrumbs(
    base, experts, weights, densities, gammas, *, ties, lam=1.0, normalize=False, sign_tie="positive"
):
    masked = []
    for e, d, gm in zip(experts, densities, gammas):
        tau = (e - base).reshape(-1).double()
        n = tau.numel()
        if d >= 1:
            masked.append(tau)
            continue
        target, n_top = int(d * n), int(gm * n)
        n_bottom = max(0, n - target - n_top)
        order = torch.sort(tau.abs(), stable=True).indices
        keep = torch.zeros(n, dtype=torch.bool)
        keep[order[n_bottom : n_bottom + target]] = True
        masked.append(torch.where(keep, tau, torch.zeros_like(tau)))
    W = torch.stack([w * t for w, t in zip(weights, masked)])
    if not ties:
        merged = W.sum(0) / (sum(weights) if normalize else 1.0)
    else:
        merged = elect_and_merge(list(W), weights, normalize=normalize, sign_tie=sign_tie)
    return (base.double() + lam * merged.reshape(base.shape)).float()


@pytest.mark.parametrize(
    ("ties", "weights", "densities", "gammas", "normalize", "lam"),
    [
        (False, [1.0, 1.0, 1.0], [0.9, 0.9, 0.9], [0.01, 0.01, 0.01], False, 1.0),
        (False, [0.3, 0.7], [0.5, 0.8], [0.1, 0.3], True, 1.2),
        (True, [1.0, 1.0, 1.0], [0.9, 0.6, 0.4], [0.05, 0.1, 0.0], True, 1.0),
        (True, [0.5, 2.0], [0.7, 0.95], [0.2, 0.1], False, 0.6),
    ],
)
def test_matches_naive_reimplementation(ties, weights, densities, gammas, normalize, lam):
    g = torch.Generator().manual_seed(len(weights) + int(ties))
    base = torch.randn(23, 9, generator=g)
    experts = [base + torch.randn(23, 9, generator=g) * (1 + i) for i in range(len(weights))]
    per_model = [{"weight": w, "density": d, "gamma": gm} for w, d, gm in zip(weights, densities, gammas)]
    out = run(BCT if ties else BC, base, experts, per_model, normalize=normalize, **{"lambda": lam})
    ref = naive_breadcrumbs(base, experts, weights, densities, gammas, ties=ties, lam=lam, normalize=normalize)
    assert torch.allclose(out, ref, atol=1e-5)


def test_density_reached_per_tensor():
    g = torch.Generator().manual_seed(0)
    base = torch.zeros(40, 25)
    out = run(BC, base, [torch.randn(40, 25, generator=g)], [{"density": 0.9, "gamma": 0.01}])
    assert int((out != 0).sum()) == 900


def test_rescale_options():
    base = torch.zeros(10)
    l1 = run(BC, base, [TAU], [{"density": 0.6, "gamma": 0.1}], rescale=True)
    assert abs(l1.abs().sum().item() - TAU.abs().sum().item()) < 1e-5
    pm = [{"density": 0.6, "gamma": 0.1}]
    inv = run(BC, base, [TAU], pm, rescale=True, rescale_mode="inverse")
    plain = run(BC, base, [TAU], [{"density": 0.6, "gamma": 0.1}])
    assert torch.allclose(inv, plain / 0.6)


# ----------------------------------------------------------------------------------- params


def test_defaults():
    p, pt, m = BC.params(), BCT.params(), BC.model_params()
    assert (p.normalize, p.rescale, p.lambda_) == (False, False, 1.0)
    assert (pt.normalize, pt.sign_tie) == (True, "positive")
    assert (m.density, m.gamma, m.weight) == (0.9, 0.01, 1.0)


@pytest.mark.parametrize(
    "bad", [{"gamma": 1.5}, {"gamma": -0.01}, {"density": 2.0}, {"gamma": math.nan}, {"epsilon": 0.1}]
)
def test_bad_model_params_rejected(bad):
    with pytest.raises(ValidationError):
        BC.model_params.model_validate(bad)


@pytest.mark.parametrize("bad", [{"sign_tie": "positive"}, {"scope": "global"}, {"lambda": math.inf}])
def test_bad_global_params_rejected(bad):
    with pytest.raises(ValidationError):
        BC.params.model_validate(bad)


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("n", [3517, 4 * 65536 + 999])  # small path, and the sampled-bracket path
def test_chunked_merge_equals_whole_tensor_masks(name, n, monkeypatch):
    """The chunked path (bounds from two selections, masks per chunk) must equal masking whole
    tensors with outlier_mask; dyadic values make the arithmetic exact and create ties."""
    import mergelab.methods.kernels.chunks as sp
    from mergelab.methods import get_method
    from mergelab.methods.stages.pipeline import TaskVectorMerge

    m = get_method(name)
    g = torch.Generator().manual_seed(11)
    base = (torch.randn(n, generator=g) * 8).round() / 8
    experts = [base + (torch.randn(n, generator=g) * 8).round() / 8 for _ in range(3)]
    mp = [
        m.model_params.model_validate({"density": d, "gamma": gm, "weight": w})
        for d, gm, w in [(0.9, 0.01, 1.0), (0.5, 0.2, 0.5), (0.3, 0.0, 2.0)]
    ]
    params = m.params.model_validate({"lambda": 0.7})
    ctx = TensorContext(name="x", seed=0)
    monkeypatch.setattr(sp, "CHUNK", 1000 if n < 10_000 else 100_000)
    chunked = m(base, experts, params, mp, ctx)
    monkeypatch.setattr(TaskVectorMerge, "whole", property(lambda self: True))
    whole = m(base, experts, params, mp, ctx)
    assert torch.allclose(chunked, whole, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sign_tie", [None, "positive", "majority"])
def test_exact_sign_ties_follow_the_methods_rule_breadcrumbs_ties(sign_tie):
    """Coordinates whose weighted sum is exactly 0 take +1 (the default, mergekit) or the
    tensor's majority sign; the reference applies the same rule."""
    from reference.ties import exact_tie_family

    base, experts = exact_tie_family()
    m = get_method("breadcrumbs_ties")
    gp = {} if sign_tie is None else {"sign_tie": sign_tie}
    mp = [m.model_params.model_validate({"density": 1.0, "gamma": 0.0})] * 3
    out = m(base, experts, m.params.model_validate(gp), mp, TensorContext(name="t", seed=1))
    taus = [(e - base).double() for e in experts]
    ref = base.double() + elect_and_merge(taus, [1.0] * 3, normalize=True, sign_tie=sign_tie or "positive")
    assert torch.allclose(out, ref.float(), atol=1e-6, rtol=0)
    other = "majority" if (sign_tie or "positive") == "positive" else "positive"
    assert not torch.allclose(
        out, (base.double() + elect_and_merge(taus, [1.0] * 3, normalize=True, sign_tie=other)).float(), atol=1e-3
    )


def _authors_rows(tau: torch.Tensor, keep: float, remove: float) -> torch.Tensor:
    """Independent restatement of the authors' per-row rule (remove first, then keep the top)."""
    c = tau.shape[-1]
    out = tau.clone()
    if int(c * remove):
        idx = torch.topk(out.abs(), int(c * remove), dim=-1).indices
        out.scatter_(-1, idx, 0.0)
    mask = torch.zeros_like(out)
    if int(c * keep):
        mask.scatter_(-1, torch.topk(out.abs(), int(c * keep), dim=-1).indices, 1.0)
    return out * mask


@pytest.mark.parametrize(("density", "gamma"), [(0.8, 0.05), (0.5, 0.2), (0.9, 0.2)])
@pytest.mark.parametrize("shape", [(6, 40), (50,), (3, 4, 10)])
def test_scope_row_matches_the_authors_rows(shape, density, gamma):
    """Issue 13: the authors' code masks per row (last dimension); ``scope: row`` does too."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g)
    tau = torch.randn(shape, generator=g)
    out = run(BC, base, [base + tau], [{"density": density, "gamma": gamma}], scope="row")
    expected = _authors_rows(tau, density, gamma)
    assert torch.allclose(out - base, expected, atol=1e-6)
    c = shape[-1]
    per_row = ((out - base) != 0).reshape(-1, c).sum(dim=1)
    assert per_row.tolist() == [min(int(density * c), c - int(gamma * c))] * per_row.numel()
    tensor = run(BC, base, [base + tau], [{"density": density, "gamma": gamma}])
    if len(shape) > 1:
        assert not torch.equal(tensor, out)  # per tensor, rows keep unequal counts
