"""TIES: a hand-worked case, an independent naive re-implementation (per tensor and global),
properties, the global-scope gather passes run as the engine runs them, parameter validation."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from reference.ties import elect_and_merge

from mergelab.methods.base import TensorContext
from mergelab.methods.registry import get_method
from mergelab.methods.ties import PASS_HIGH, PASS_LOW, PASS_SIGN

TIES = get_method("ties")
T = torch.tensor


def run(base, experts, per_model, name="w", **glob):
    params = TIES.params.model_validate(glob)
    mps = [TIES.model_params.model_validate(p) for p in per_model]
    return TIES(base, experts, params, mps, TensorContext(name=name))


# ------------------------------------------------------------------------------- hand-worked

# τ1 = [ 0.5, -1.0,  0.2,  2.0, -0.1]     K = 0.4, n = 5 -> k = 2 per vector
# τ2 = [-0.6,  0.3, -1.5,  0.1,  0.8]
# τ3 = [ 0.4, -1.1,  0.9, -0.2, -1.3]
# trim: τ̂1 = [0, -1.0, 0, 2.0, 0]        (|2.0|, |-1.0|)
#       τ̂2 = [0, 0, -1.5, 0, 0.8]        (|-1.5|, |0.8|)
#       τ̂3 = [0, -1.1, 0, 0, -1.3]       (|-1.3|, |-1.1|)
# elect: Σ = [0, -2.1, -1.5, 2.0, -0.5] -> γ = [·, -, -, +, -] (coord 0: nothing to merge)
# disjoint mean: [0, (-1.0 - 1.1)/2, -1.5, 2.0, -1.3] = [0, -1.05, -1.5, 2.0, -1.3]
# disjoint sum:  [0, -2.1, -1.5, 2.0, -1.3]
# weights (2, 1, 1): Σ w τ̂ = [0, -3.1, -1.5, 4.0, -0.5], same signs;
#   mean = [0, (-2.0 - 1.1)/3, -1.5/1, 4.0/2, -1.3/1] = [0, -1.0333, -1.5, 2.0, -1.3]
# weights (1, 3, 1): coord 4: 3·0.8 - 1.3 = 1.1 > 0 -> γ4 = +, only τ2 agrees: 2.4/3 = 0.8
# (mergekit 0.1.5 gives the same numbers. The original TIES code would keep ⌊0.4·5⌋ + 1 = 3
#  entries per vector: it thresholds at the (n − ⌊Kn⌋)-th smallest magnitude.)
TAU = [
    T([0.5, -1.0, 0.2, 2.0, -0.1]),
    T([-0.6, 0.3, -1.5, 0.1, 0.8]),
    T([0.4, -1.1, 0.9, -0.2, -1.3]),
]
BASE = T([1.0, 2.0, 3.0, 4.0, 5.0])
EXPERTS = [BASE + t for t in TAU]


@pytest.mark.parametrize(
    ("weights", "normalize", "expected"),
    [
        ([1, 1, 1], True, [0.0, -1.05, -1.5, 2.0, -1.3]),
        ([1, 1, 1], False, [0.0, -2.1, -1.5, 2.0, -1.3]),
        ([2, 1, 1], True, [0.0, -3.1 / 3, -1.5, 2.0, -1.3]),
        ([1, 3, 1], True, [0.0, -1.05, -1.5, 2.0, 0.8]),
    ],
)
def test_hand_worked_case(weights, normalize, expected):
    out = run(BASE, EXPERTS, [{"weight": w, "density": 0.4} for w in weights], normalize=normalize)
    assert torch.allclose(out - BASE, T(expected), atol=1e-6)


def test_lambda_scales_the_merged_delta():
    out = run(BASE, EXPERTS, [{"density": 0.4}] * 3, **{"lambda": 0.5})
    assert torch.allclose(out - BASE, 0.5 * T([0.0, -1.05, -1.5, 2.0, -1.3]), atol=1e-6)


def test_exactly_k_entries_kept_without_ties():
    out = run(torch.zeros(5), [TAU[0]], [{"density": 0.4}])
    assert int((out != 0).sum()) == 2


def test_kept_count_includes_ties_at_the_threshold():
    # k = max(1, ⌊0.25·4⌋) = 1 but three magnitudes equal the largest: all three kept.
    out = run(torch.zeros(4), [T([2.0, -2.0, 2.0, 1.0])], [{"density": 0.25}])
    assert out.tolist() == [2.0, -2.0, 2.0, 0.0]


def test_sign_tie_rules():
    # density 1; coord 0 sums to exactly 0; the tensor's elected signs are [tie, -, -].
    a, b = T([1.0, -2.0, -3.0]), T([-1.0, -1.0, -1.0])
    z = torch.zeros(3)
    majority = run(z, [a, b], [{"density": 1.0}] * 2, sign_tie="majority")
    assert majority.tolist() == [-1.0, -1.5, -2.0]  # coord 0 takes the tensor majority (-)
    positive = run(z, [a, b], [{"density": 1.0}] * 2, sign_tie="positive")
    assert positive.tolist() == [1.0, -1.5, -2.0]  # mergekit's rule (+)
    default = run(z, [a, b], [{"density": 1.0}] * 2)
    assert default.tolist() == positive.tolist()  # scope tensor defaults to mergekit's rule


def test_chunked_tensor_scope_equals_whole_tensor_reference(monkeypatch):
    # several chunks, uneven last chunk, ties at the threshold, exact sign cancellations
    import mergelab.methods.kernels.chunks as chunks

    monkeypatch.setattr(chunks, "CHUNK", 1000)
    g = torch.Generator().manual_seed(5)
    base = (torch.randn(3517, generator=g) * 4).round() / 4  # dyadic values: exact arithmetic
    experts = [base + (torch.randn(3517, generator=g) * 4).round() / 4 for _ in range(3)]
    experts.append(base - (experts[0] - base))  # cancels expert 0 exactly
    weights, densities = [1.0, 0.5, 2.0, 1.0], [0.3, 0.05, 0.7, 0.3]
    got = run(base, experts, [{"density": d, "weight": w} for d, w in zip(densities, weights)], **{"lambda": 0.7})
    ref = naive_ties(base, experts, weights, densities, 0.7, True, sign_tie="positive")
    assert torch.allclose(got, ref, atol=1e-6)


# ------------------------------------------------------------------- naive re-implementation


def naive_ties(base, experts, weights, densities, lam=1.0, normalize=True, sign_tie="majority"):
    """Straight from the paper's three steps, with a full sort (reference only)."""
    taus = [(e - base).reshape(-1).double() for e in experts]
    n = taus[0].numel()
    trimmed = []
    for tau, d in zip(taus, densities):
        k = n if d >= 1 else (0 if d <= 0 else max(1, int(d * n)))
        if k == 0:
            trimmed.append(torch.zeros_like(tau))
            continue
        kth = torch.sort(tau.abs(), descending=True).values[k - 1]
        trimmed.append(torch.where(tau.abs() >= kth, tau, torch.zeros_like(tau)))
    merged = elect_and_merge([w * t for w, t in zip(weights, trimmed)], weights, normalize=normalize, sign_tie=sign_tie)
    return (base.double() + lam * merged.reshape(base.shape)).float()


@pytest.mark.parametrize(
    ("shape", "weights", "densities", "lam", "normalize"),
    [
        ((6, 7), [1.0, 1.0, 1.0], [0.2, 0.2, 0.2], 1.0, True),
        ((6, 7), [0.3, 0.7], [0.1, 0.5], 1.3, True),
        ((101,), [1.0, 2.0, 0.5, 1.0], [0.3, 0.05, 0.9, 1.0], 0.8, False),
        ((3, 4, 5), [1.0, -0.5], [0.4, 0.4], 1.0, False),
        ((9, 2), [1.0, 1.0], [0.0, 0.5], 1.0, True),
    ],
)
def test_matches_naive_reimplementation(shape, weights, densities, lam, normalize):
    g = torch.Generator().manual_seed(sum(shape) + len(weights))
    base = torch.randn(shape, generator=g)
    scales = (1.0, 0.3, 2.0, 0.7)[: len(weights)]
    experts = [base + torch.randn(shape, generator=g) * s for s in scales]
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    out = run(base, experts, per_model, normalize=normalize, **{"lambda": lam})
    ref = naive_ties(base, experts, weights, densities, lam, normalize)
    assert out.shape == base.shape and out.dtype == base.dtype
    assert torch.allclose(out, ref, atol=1e-5)


def test_density_one_without_sign_conflict_is_normalized_task_arithmetic():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(4, 6, generator=g)
    # all task vectors positive: no sign conflict anywhere
    experts = [base + torch.rand(4, 6, generator=g) + 0.1 for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    out = run(base, experts, [{"weight": x, "density": 1.0} for x in w], **{"lambda": 0.9})
    ta = get_method("task_arithmetic")
    ref = ta(
        base,
        experts,
        ta.params.model_validate({"lambda": 0.9, "normalize": True}),
        [ta.model_params(weight=x) for x in w],
        TensorContext(name="w"),
    )
    assert torch.allclose(out, ref, atol=1e-6)


def test_returns_base_dtype_and_shape():
    base = torch.zeros(3, 4, dtype=torch.bfloat16)
    out = run(base, [torch.ones(3, 4)], [{"density": 0.5}])
    assert out.dtype == torch.bfloat16 and out.shape == (3, 4)


# ------------------------------------------------------------------------------- global scope


def run_engine(method, tensors, glob, per_model):
    """What the engine does: each gather pass reads every tensor, then the merge per tensor."""
    params = method.params.model_validate(glob)
    mps = [method.model_params.model_validate(p) for p in per_model]
    n = len(per_model)
    stats: dict = {}
    for gp in method.passes(params):
        state = gp.init(params, n)
        for name, (base, experts) in tensors.items():
            ctx = TensorContext(name=name, folds=dict(stats))
            gp.update(state, base, experts, params, mps, ctx)
        stats[gp.name] = gp.finish(state, params, n)
    return {
        name: method(base, experts, params, mps, TensorContext(name=name, folds=stats))
        for name, (base, experts) in tensors.items()
    }


def naive_global_ties(tensors, weights, densities, lam=1.0, normalize=True, sign_tie="majority"):
    """The original code's recipe: flatten the whole model per task, then the three steps."""
    names = list(tensors)
    sizes = [tensors[k][0].numel() for k in names]
    flat_base = torch.cat([tensors[k][0].reshape(-1) for k in names])
    flat_experts = [torch.cat([tensors[k][1][i].reshape(-1) for k in names]) for i in range(len(weights))]
    merged = naive_ties(flat_base, flat_experts, weights, densities, lam, normalize, sign_tie)
    return {k: part.reshape(tensors[k][0].shape) for k, part in zip(names, torch.split(merged, sizes))}


def model(seed, n_experts, duplicates=False):
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed.weight": (11, 6),
        "layers.0.q.weight": (6, 6),
        "layers.0.norm.weight": (6,),
        "layers.1.q.weight": (6, 6),
        "head.bias": (3,),
    }
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        base = torch.randn(shape, generator=g)
        experts = []
        for j in range(n_experts):
            d = torch.randn(shape, generator=g) * (0.2 + i * 0.3 + j * 0.1)
            if duplicates:
                d = torch.round(d * 4) / 4  # many equal magnitudes and zeros
            experts.append(base + d)
        out[name] = (base, experts)
    return out


@pytest.mark.parametrize(
    ("weights", "densities", "glob", "duplicates"),
    [
        ([1.0, 1.0, 1.0], [0.2, 0.2, 0.2], {}, False),
        ([1.0, 0.5], [0.1, 0.35], {"normalize": False, "lambda": 1.5}, False),
        ([1.0, 1.0, 2.0], [0.3, 0.3, 0.05], {"sign_tie": "positive"}, False),
        ([1.0, 1.0], [0.25, 0.5], {}, True),
        ([1.0, 1.0], [1.0, 0.0], {}, False),
    ],
)
def test_global_scope_equals_naive_global_implementation(weights, densities, glob, duplicates):
    seed = len(weights) * 7 + int(duplicates)
    tensors = model(seed=seed, n_experts=len(weights), duplicates=duplicates)
    per_model = [{"weight": w, "density": d} for w, d in zip(weights, densities)]
    out = run_engine(TIES, tensors, {"scope": "global", **glob}, per_model)
    ref = naive_global_ties(
        tensors,
        weights,
        densities,
        glob.get("lambda", 1.0),
        glob.get("normalize", True),
        glob.get("sign_tie", "majority"),
    )
    for name in tensors:
        assert torch.allclose(out[name], ref[name], atol=1e-5), name
    # and it is not the per-tensor merge
    if min(densities) > 0 and max(densities) < 1:
        per_tensor = run_engine(TIES, tensors, glob, per_model)
        assert any(not torch.allclose(out[k], per_tensor[k]) for k in tensors)


def test_global_threshold_is_the_exact_kth_largest_magnitude():
    tensors = model(seed=3, n_experts=2, duplicates=True)
    per_model = [{"density": 0.3}, {"density": 0.05}]
    params = TIES.params.model_validate({"scope": "global", "sign_tie": "positive"})
    mps = [TIES.model_params.model_validate(p) for p in per_model]
    stats: dict = {}
    for gp in TIES.passes(params):
        state = gp.init(params, 2)
        for name, (b, es) in tensors.items():
            gp.update(state, b, es, params, mps, TensorContext(name=name, folds=dict(stats)))
        stats[gp.name] = gp.finish(state, params, 2)
    for i, d in enumerate([0.3, 0.05]):
        mags = torch.cat([(es[i] - b).abs().reshape(-1) for b, es in tensors.values()])
        k = int(d * mags.numel())
        assert stats[PASS_LOW][i] == torch.sort(mags, descending=True).values[k - 1].item()


def test_global_sign_tie_uses_the_model_majority():
    # Tensor "a" has an exact cancellation at coord 0 and its own majority is -,
    # while the whole model's majority is + (tensor "b"). density 1: nothing trimmed.
    tensors = {
        "a": (torch.zeros(3), [T([1.0, -2.0, -3.0]), T([-1.0, -1.0, -1.0])]),
        "b": (torch.zeros(4), [T([1.0, 1.0, 1.0, 1.0]), T([1.0, 1.0, 1.0, 1.0])]),
    }
    per_model = [{"density": 1.0}] * 2
    glob_out = run_engine(TIES, tensors, {"scope": "global"}, per_model)
    assert glob_out["a"].tolist() == [1.0, -1.5, -2.0]
    tensor_out = run_engine(TIES, tensors, {"sign_tie": "majority"}, per_model)
    assert tensor_out["a"].tolist() == [-1.0, -1.5, -2.0]


def test_passes_declared_only_for_global_scope():
    assert TIES.passes(TIES.params()) == ()
    names = [p.name for p in TIES.passes(TIES.params(scope="global"))]
    assert names == [PASS_HIGH, PASS_LOW, PASS_SIGN]
    names = [p.name for p in TIES.passes(TIES.params(scope="global", sign_tie="positive"))]
    assert names == [PASS_HIGH, PASS_LOW]


def test_global_scope_without_pass_results_fails_loudly():
    with pytest.raises(RuntimeError, match="gather pass"):
        run(BASE, EXPERTS, [{"density": 0.4}] * 3, scope="global")


def test_global_density_zero_returns_the_base():
    tensors = model(seed=5, n_experts=2)
    out = run_engine(TIES, tensors, {"scope": "global"}, [{"density": 0.0}] * 2)
    for name, (base, _) in tensors.items():
        assert torch.equal(out[name], base)


# ----------------------------------------------------------------------------------- params


def test_defaults_are_the_papers():
    p, m = TIES.params(), TIES.model_params()
    assert (p.lambda_, p.normalize, p.scope, p.sign_rule) == (1.0, True, "tensor", "positive")
    assert TIES.params(scope="global").sign_rule == "majority"  # the original code's rule
    assert (p.rescale, p.int8_mask) == (False, False)
    assert (m.density, m.weight) == (0.2, 1.0)


def test_mergekit_recipe_keys_are_accepted():
    p = TIES.params.model_validate({"lambda": 0.5, "normalize": False, "rescale": True, "int8_mask": True})
    assert p.lambda_ == 0.5 and p.int8_mask
    assert TIES.params(lambda_=2.0).lambda_ == 2.0


@pytest.mark.parametrize(
    "bad",
    [
        {"density": 1.5},
        {"density": -0.1},
        {"density": 20},
        {"density": math.nan},
        {"weight": math.inf},
        {"gamma": 0.1},
        {"epsilon": 0.1},
    ],
)
def test_bad_model_params_rejected(bad):
    with pytest.raises(ValidationError):
        TIES.model_params.model_validate(bad)


@pytest.mark.parametrize(
    "bad",
    [
        {"scope": "layer"},
        {"sign_tie": "minority"},
        {"rescale_mode": "l2"},
        {"lambda": math.nan},
        {"density": 0.2},
        {"topk": 20},
    ],
)
def test_bad_global_params_rejected(bad):
    with pytest.raises(ValidationError):
        TIES.params.model_validate(bad)


@pytest.mark.parametrize("sign_tie", [None, "positive", "majority"])
def test_exact_sign_ties_follow_the_methods_rule_ties(sign_tie):
    """Coordinates whose weighted sum is exactly 0 take +1 (the default, mergekit) or the
    tensor's majority sign; the reference applies the same rule."""
    from reference.ties import exact_tie_family

    base, experts = exact_tie_family()
    m = get_method("ties")
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


def _original_code_trim(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Independent restatement of the original TIES code's trim on one flattened task vector:
    threshold at the (n − ⌊K·n⌋)-th smallest magnitude, keep magnitudes ≥ it."""
    n = flat.numel()
    kth = flat.abs().kthvalue(n - int(n * density)).values
    return flat * (flat.abs() >= kth)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_trim_count_original_keeps_one_more(scope):
    """Issue 13: the original code keeps ⌊K·N⌋ + 1 entries; ``trim_count: original`` does too
    (global: over the flattened model, exact parity; tensor: per tensor)."""
    import mergelab

    g = torch.Generator().manual_seed(11)
    base = {"a": torch.randn(7, 9, generator=g), "b": torch.randn(13, generator=g)}
    ex = {k: v + torch.randn(v.shape, generator=g) for k, v in base.items()}
    params = {"scope": scope, "trim_count": "original"}
    out = mergelab.merge_state_dicts("ties", [ex], base, parameters=params, model_parameters=[{"density": 0.3}])
    floor = mergelab.merge_state_dicts(
        "ties", [ex], base, parameters={"scope": scope}, model_parameters=[{"density": 0.3}]
    )
    names = ["a", "b"]
    if scope == "global":
        flat = torch.cat([(ex[k] - base[k]).reshape(-1) for k in names])
        expected = _original_code_trim(flat, 0.3)
        got = torch.cat([(out[k] - base[k]).reshape(-1) for k in names])
        assert torch.allclose(got, expected, atol=1e-6)
        assert int((got != 0).sum()) == int(0.3 * 76) + 1
        kept_floor = sum(int((floor[k] != base[k]).sum()) for k in names)
        assert kept_floor == int(0.3 * 76)
    else:
        for k in names:
            n = base[k].numel()
            assert int((out[k] != base[k]).sum()) == int(0.3 * n) + 1
            assert int((floor[k] != base[k]).sum()) == max(1, int(0.3 * n))
