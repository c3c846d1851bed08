"""PCB-merging: a hand-worked drop/rescale case, an independent sort-based implementation of the
reference's formulas (both inter-balancing variants, per tensor and over whole flattened task
vectors via the gather passes), the order-statistic helper, degenerate rows, validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import mergelab
from mergelab.errors import ParameterError
from mergelab.methods.base import TensorContext
from mergelab.methods.kernels import select as order_stats
from mergelab.methods.kernels.select import kth_smallest, sorted_at
from mergelab.methods.pcb import PASS_SCORE_LOW
from mergelab.methods.registry import get_method

PCB = get_method("pcb")
T = torch.tensor


def params(**glob):
    glob.setdefault("scope", "tensor")  # direct per-tensor calls (the default, global, needs the folds)
    return PCB.params.model_validate(glob)


def run(base, experts, weights=None, name="w", stats=None, **glob):
    mps = [PCB.model_params.model_validate({"weight": w}) for w in (weights or [1.0] * len(experts))]
    return PCB(base, experts, params(**glob), mps, TensorContext(name=name, folds=stats or {}))


# ---------------------------------------------------------------------------- hand-worked

# τ1 = [4, 1, 2, 3], τ2 = [1, 4, 2, 3], q = 0 (no clipping), summed inter (every τ_i ⊙ Στ ≥ 4,
# tanh ≈ 1, so β follows exp(2 N²) with N = (|τ| − 1)/3): β1 is largest at 0, then 3; β2 at 1, then 3.
# r = 0.5, d = 4: threshold = sorted(β)[⌊4 · 0.5⌋] = the 2nd largest; min–max from the threshold
# gives s1 = [1, 0, 0, 0], s2 = [0, 1, 0, 0] (the threshold entry itself gets 0: one entry kept,
# not two). τ_m = [4, 4, 0, 0]; coordinates 2 and 3 are unscored (base kept).
TAU1, TAU2 = T([4.0, 1.0, 2.0, 3.0]), T([1.0, 4.0, 2.0, 3.0])
BASE = T([0.5, -0.5, 1.0, 2.0])


@pytest.mark.parametrize("inter", ["summed", "pairwise"])
def test_hand_worked_drop_and_rescale(inter):
    out = run(BASE, [BASE + TAU1, BASE + TAU2], pcb_ratio=0.5, clip_ratio=0.0, inter=inter)
    assert torch.allclose(out - BASE, T([4.0, 4.0, 0.0, 0.0]), atol=1e-6)


def test_weights_lambda_and_unscored_mean():
    out = run(BASE, [BASE + TAU1, BASE + TAU2], weights=[0.5, 1.0], pcb_ratio=0.5, clip_ratio=0.0, **{"lambda": 2.0})
    assert torch.allclose(out - BASE, T([4.0, 8.0, 0.0, 0.0]), atol=1e-6)
    out = run(BASE, [BASE + TAU1, BASE + TAU2], pcb_ratio=0.5, clip_ratio=0.0, unscored="mean")
    assert torch.allclose(out - BASE, T([4.0, 4.0, 2.0, 3.0]), atol=1e-6)


def test_clipping_bounds_follow_reference_indices():
    # d = 4, q = 0.25: lower bound sorted(|τ|)[⌊4 · 0.25⌋] = 2nd smallest, upper sorted[⌊4 · 0.75 − 1⌋]
    # = 3rd smallest. With one expert and r = 1 the result is s ⊙ τ̄ / s: τ̄ where s > 0.
    tau = T([-8.0, 1.0, 2.0, 3.0])  # |τ| sorted: 1, 2, 3, 8 → bounds 2, 3 → τ̄ = [-3, 2, 2, 3]
    out = run(torch.zeros(4), [tau], pcb_ratio=1.0, clip_ratio=0.25, unscored="mean")
    assert torch.allclose(out, T([-3.0, 2.0, 2.0, 3.0]), atol=1e-6)


# ------------------------------------------------------------- independent implementation


def ref_normalize(x):
    mn = x.min(dim=1, keepdim=True).values
    mx = x.max(dim=1, keepdim=True).values
    return (x - mn) / (mx - mn)


def ref_clamp(x, min_ratio, max_ratio):
    d = x.size(1)
    s = torch.sort(x, dim=1).values
    return torch.clamp(x, s[:, int(d * min_ratio)].unsqueeze(1), s[:, int(d * (1 - max_ratio) - 1)].unsqueeze(1))


def ref_pcb(checks, r, q, inter, lams=None):
    """The reference's formulas on an n × d matrix of flattened task vectors (sort-based)."""
    n = checks.shape[0]
    abs_c = ref_clamp(checks.abs(), q, q)
    clamped = torch.sign(checks) * abs_c
    intra = torch.exp(n * ref_normalize(abs_c) ** 2)
    if inter == "summed":
        inter_t = torch.tanh(checks * checks.sum(dim=0))
    else:
        normed = torch.sign(checks) * ref_normalize(abs_c)
        inter_t = torch.vstack([torch.tanh(normed[i] * normed).sum(dim=0) for i in range(n)])
    scale = ref_normalize(ref_clamp(intra * inter_t, 1 - r, 0))
    tvs = clamped if lams is None else clamped * torch.tensor(lams).unsqueeze(1)
    return (tvs * scale).sum(dim=0) / torch.clamp(scale.sum(dim=0), min=1e-12)


def make(n_experts, shape, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    taus = [torch.randn(shape, generator=g) * 0.1 * (i + 1) for i in range(n_experts)]
    return base, taus


@pytest.mark.parametrize("inter", ["pairwise", "summed"])
@pytest.mark.parametrize(
    ("n", "shape", "r", "q"), [(2, (20, 15), 0.1, 0.01), (3, (300,), 0.2, 1e-4), (4, (9, 7, 3), 0.5, 0.05)]
)
def test_per_tensor_matches_reference_formulas(inter, n, shape, r, q):
    base, taus = make(n, shape, seed=n)
    lams = [1.0 + 0.1 * i for i in range(n)]
    out = run(base, [base + t for t in taus], weights=lams, pcb_ratio=r, clip_ratio=q, inter=inter, **{"lambda": 0.7})
    expected = 0.7 * ref_pcb(torch.stack([t.reshape(-1) for t in taus]), r, q, inter, lams)
    assert torch.allclose((out - base).reshape(-1), expected, atol=1e-5)


def _model(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (16, 8), "b.bias": (8,), "c.weight": (5, 6)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = [{k: v + 0.1 * (i + 1) * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(n)]
    return base, experts


@pytest.mark.parametrize("inter", ["pairwise", "summed"])
def test_global_scope_matches_reference_on_flattened_model(inter):
    base, experts = _model(5)
    out = mergelab.merge_state_dicts(
        "pcb", experts, base, parameters={"scope": "global", "pcb_ratio": 0.15, "clip_ratio": 0.02, "inter": inter}
    )
    names = sorted(base)
    checks = torch.stack([torch.cat([(e[k] - base[k]).reshape(-1) for k in names]) for e in experts])
    expected = ref_pcb(checks, 0.15, 0.02, inter)
    got = torch.cat([(out[k] - base[k]).reshape(-1) for k in names])
    assert torch.allclose(got, expected, atol=1e-5)
    per_tensor = mergelab.merge_state_dicts(
        "pcb", experts, base, parameters={"scope": "tensor", "pcb_ratio": 0.15, "clip_ratio": 0.02, "inter": inter}
    )
    assert not all(torch.allclose(per_tensor[k], out[k]) for k in names)


def test_default_scope_is_the_papers_whole_model_rows():
    """Issue 13: the reference ranks each expert's whole task vector; per tensor, a 10-entry bias
    at pcb_ratio 0.1 keeps nothing (stays at the base). The default now merges it."""
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(40, 30, generator=g), "bias": torch.randn(10, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    assert PCB.params().scope == "global"
    default = mergelab.merge_state_dicts("pcb", experts, base, parameters={"pcb_ratio": 0.1})
    per_tensor = mergelab.merge_state_dicts("pcb", experts, base, parameters={"pcb_ratio": 0.1, "scope": "tensor"})
    assert torch.equal(per_tensor["bias"], base["bias"])  # d·r = 1: nothing kept
    assert not torch.equal(default["bias"], base["bias"])


def test_global_scope_refuses_per_tensor_ratios():
    base, experts = T([1.0, 2.0]), [T([1.5, 2.5]), T([0.5, 2.0])]
    stats = {
        PASS_SCORE_LOW: {
            "thresholds": [0.0, 0.0],
            "max": [1.0, 1.0],
            "pcb_ratio": 0.1,
            "clip_ratio": 0.01,
            "inter": "pairwise",
        },
        "pcb.global.abs_low": [(0.0, 1.0), (0.0, 1.0)],
    }
    with pytest.raises(ParameterError, match="one value for the whole model"):
        run(base, experts, stats=stats, scope="global", pcb_ratio=0.3)
    with pytest.raises(RuntimeError, match="gather pass"):
        run(base, experts, scope="global")


# ----------------------------------------------------------------------- helpers and edges


@pytest.mark.parametrize("radix", [True, False])
def test_order_statistics_match_sort(radix, monkeypatch):
    if radix:  # force the two-histogram path that large tensors and the global passes use
        monkeypatch.setattr(order_stats, "SMALL", 0)
    g = torch.Generator().manual_seed(3)
    x = torch.cat(
        [torch.randn(500, generator=g) * torch.logspace(-20, 20, 500), T([0.0, -0.0, 1.0, 1.0, -1.0, -1e-40])]
    )
    s = torch.sort(x).values
    for k in (1, 2, 250, 503, x.numel()):
        assert kth_smallest(x, k) == float(s[k - 1])
    assert sorted_at(x, -1) == float(s[-1])


def test_expert_without_change_and_constant_rows_stay_finite():
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(4))
    out = run(base, [base.clone(), base + 0.1], pcb_ratio=0.5)  # a zero row and a constant row
    assert torch.isfinite(out).all()
    assert torch.equal(out, base)  # nothing has spread: every score is 0 → base (reference: NaN)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "bad",
    [
        {"pcb_ratio": 0.0},
        {"pcb_ratio": 1.5},
        {"clip_ratio": 0.5},
        {"clip_ratio": -0.1},
        {"inter": "max"},
        {"scope": "layer"},
        {"unscored": "base"},
        {"lambda": float("nan")},
    ],
)
def test_invalid_parameters(bad):
    with pytest.raises(ValidationError):
        params(**bad)


def test_invalid_model_parameters():
    with pytest.raises(ValidationError):
        PCB.model_params.model_validate({"density": 0.5})
