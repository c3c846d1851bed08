"""RAM, RAM+ (model-wide counts) and RAM+ tensor-local: hand-computed entries, an independent
element-by-element NumPy reference, the fold over the whole model, edge cases, a checkpoint round
trip that loads; the optional parity test runs mergekit 0.1.5's ``ram`` / ``ramplus_tl`` where
MERGEKIT_PYTHON is set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mergekit_live import needs_mergekit, run_mergekit
from pydantic import ValidationError
from tiny_models import load_dir

import mergelab
from mergelab.methods.base import NoParams, TensorContext
from mergelab.methods.ram import RamParams, RamPlusTLParams
from mergelab.methods.registry import get_method

RAM = get_method("ram")
RAMPLUS_TL = get_method("ramplus_tl")
CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight")


def run_ram(base, experts, **params) -> torch.Tensor:
    return RAM(base, experts, RamParams(**params), [NoParams()] * len(experts), CTX)


def run_tl(base, experts, **params) -> torch.Tensor:
    return RAMPLUS_TL(base, experts, RamPlusTLParams(**params), [NoParams()] * len(experts), CTX)


def counts(bases: list[np.ndarray], experts: list[list[np.ndarray]], eps: float) -> tuple[list[int], list[int]]:
    """(shared_j, unique_j) over the given tensors, entry by entry."""
    k = len(experts)
    shared, unique = [0] * k, [0] * k
    for t, b in enumerate(bases):
        for i in np.ndindex(b.shape):
            changed = [j for j in range(k) if abs(experts[j][t][i] - b[i]) > eps]
            for j in changed:
                if len(changed) == 1:
                    unique[j] += 1
                else:
                    shared[j] += 1
    return shared, unique


def reference(base, experts, eps=1e-5, lambdas=None) -> np.ndarray:
    """RAM entry by entry (float64): unchanged -> base, unique -> λ_j δ_j, shared -> mean of the changes."""
    b = np.asarray(base, dtype=np.float64)
    es = [np.asarray(e, dtype=np.float64) for e in experts]
    lam = lambdas or [1.0] * len(es)
    out = b.copy()
    for i in np.ndindex(b.shape):
        d = [e[i] - b[i] for e in es]
        changed = [j for j in range(len(es)) if abs(d[j]) > eps]
        if len(changed) == 1:
            out[i] = b[i] + lam[changed[0]] * d[changed[0]]
        elif changed:
            out[i] = b[i] + sum(d[j] for j in changed) / len(changed)
    return out


def lambdas(shared, unique, eps, r, alpha) -> list[float]:
    out = []
    for s, u in zip(shared, unique):
        rho = s / max(u, eps)
        out.append(1.0 + r * min(max(rho, 0.0), alpha))
    return out


def sparse_experts(gen, base, n, p=0.4, scale=0.1):
    return [
        base + scale * torch.randn(base.shape, generator=gen) * (torch.rand(base.shape, generator=gen) < p)
        for _ in range(n)
    ]


# ---------------------------------------------------------------- hand-computed


def test_ram_keeps_unique_changes_and_averages_shared_ones():
    base = torch.zeros(5)
    a = torch.tensor([1.0, 2.0, 0.0, 0.0, 1e-6])
    b = torch.tensor([3.0, 0.0, 0.0, -4.0, 0.0])
    # entry 0 shared -> 2; 1 unique to a -> 2; 2 unchanged; 3 unique to b -> -4; 4 below ε -> 0
    torch.testing.assert_close(run_ram(base, [a, b]), torch.tensor([2.0, 2.0, 0.0, -4.0, 0.0]), rtol=0, atol=0)
    # a lower ε counts entry 4 as a's unique change
    torch.testing.assert_close(run_ram(base, [a, b], epsilon=0.0)[4], torch.tensor(1e-6), rtol=0, atol=0)


def test_ramplus_tl_scales_unique_changes_by_the_shared_unique_ratio():
    base = torch.zeros(6)
    a = torch.tensor([1.0, 1.0, 1.0, 2.0, 0.0, 0.0])  # shared 3, unique 1 -> ρ = 3
    b = torch.tensor([1.0, 1.0, 1.0, 0.0, 4.0, 4.0])  # shared 3, unique 2 -> ρ = 1.5
    out = run_tl(base, [a, b], r=0.1, alpha=0.2)  # both clipped to 0.2: λ = 1.02
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 1.0, 2.04, 4.08, 4.08]), rtol=0, atol=1e-6)
    out = run_tl(base, [a, b], r=0.5, alpha=2.0)  # λ_a = 1 + 0.5·2 = 2, λ_b = 1 + 0.5·1.5 = 1.75
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 1.0, 4.0, 7.0, 7.0]), rtol=0, atol=1e-6)
    # r = 0 or α = 0 is RAM
    assert torch.equal(run_tl(base, [a, b], r=0.0), run_ram(base, [a, b]))
    assert torch.equal(run_tl(base, [a, b], alpha=0.0), run_ram(base, [a, b]))


# ---------------------------------------------------------------- the reference


@pytest.mark.parametrize("shape", [(40,), (6, 7), (2, 3, 5)])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_match_an_independent_reference(shape, n):
    gen = torch.Generator().manual_seed(len(shape) * 10 + n)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    experts = sparse_experts(gen, base, n)
    bn, en = base.numpy(), [e.numpy() for e in experts]
    got = run_ram(base, experts)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), reference(bn, en), rtol=0, atol=1e-15)
    shared, unique = counts([bn], [[e] for e in en], 1e-5)
    for r, alpha in [(0.1, 0.2), (0.3, 5.0)]:
        want = reference(bn, en, lambdas=lambdas(shared, unique, 1e-5, r, alpha))
        np.testing.assert_allclose(run_tl(base, experts, r=r, alpha=alpha).numpy(), want, rtol=0, atol=1e-15)
        got32 = run_tl(base.float(), [e.float() for e in experts], r=r, alpha=alpha)
        np.testing.assert_allclose(got32.numpy(), want, rtol=0, atol=2e-6)


def test_ramplus_counts_over_the_whole_model():
    gen = torch.Generator().manual_seed(9)
    base = {
        "a.weight": torch.randn(8, 6, generator=gen, dtype=torch.float64),
        "b.weight": torch.randn(30, generator=gen, dtype=torch.float64),
    }
    # model 0 changes much of a (shared with model 1) and little of b; model 1 the opposite
    experts = [
        {
            "a.weight": sparse_experts(gen, base["a.weight"], 1, 0.8)[0],
            "b.weight": sparse_experts(gen, base["b.weight"], 1, 0.2)[0],
        },
        {
            "a.weight": sparse_experts(gen, base["a.weight"], 1, 0.7)[0],
            "b.weight": sparse_experts(gen, base["b.weight"], 1, 0.9)[0],
        },
        {
            "a.weight": sparse_experts(gen, base["a.weight"], 1, 0.3)[0],
            "b.weight": sparse_experts(gen, base["b.weight"], 1, 0.3)[0],
        },
    ]
    names = ["a.weight", "b.weight"]
    bn = [base[k].numpy() for k in names]
    en = [[e[k].numpy() for k in names] for e in experts]
    shared, unique = counts(bn, en, 1e-5)
    lam = lambdas(shared, unique, 1e-5, 0.5, 3.0)
    out = mergelab.merge_state_dicts(
        "ramplus", experts, base, parameters={"r": 0.5, "alpha": 3.0}, compute_dtype=torch.float64
    )
    tl = mergelab.merge_state_dicts(
        "ramplus_tl", experts, base, parameters={"r": 0.5, "alpha": 3.0}, compute_dtype=torch.float64
    )
    for t, k in enumerate(names):
        want = reference(bn[t], [e[t] for e in en], lambdas=lam)
        np.testing.assert_allclose(out[k].numpy(), want, rtol=0, atol=1e-15, err_msg=k)
        s_t, u_t = counts([bn[t]], [[e[t]] for e in en], 1e-5)
        want_tl = reference(bn[t], [e[t] for e in en], lambdas=lambdas(s_t, u_t, 1e-5, 0.5, 3.0))
        np.testing.assert_allclose(tl[k].numpy(), want_tl, rtol=0, atol=1e-15, err_msg=k)
        assert not np.allclose(want, want_tl, rtol=0, atol=1e-9), k  # the model-wide and local ratios differ here
    # the authors' defaults: λ_j = 1 + 0.05·min(ρ_j, 1)
    default = mergelab.merge_state_dicts("ramplus", experts, base, compute_dtype=torch.float64)
    lam = [1.0 + 0.05 * min(s / max(u, 1e-5), 1.0) for s, u in zip(shared, unique)]
    for t, k in enumerate(names):
        np.testing.assert_allclose(
            default[k].numpy(), reference(bn[t], [e[t] for e in en], lambdas=lam), rtol=0, atol=1e-15
        )


# ---------------------------------------------------------------- edge cases and parameters


def test_edge_cases():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(5, 4, generator=gen)
    expert = base + 0.1 * torch.randn(5, 4, generator=gen)
    # a single model: every change is unique, ρ = 0, λ = 1: that model (entries within ε excepted)
    for fn in (run_ram, run_tl):
        torch.testing.assert_close(fn(base, [expert]), expert, rtol=0, atol=1e-5)
        torch.testing.assert_close(fn(base, [expert, expert, expert]), expert, rtol=0, atol=1e-5)
        assert torch.equal(fn(base, [base.clone(), base.clone()]), base)  # zero task vectors
    # a model with shared but no unique changes, and one that changed nothing: no NaN, RAM's result
    a = base + 0.5
    out = run_tl(base, [a, a.clone(), base.clone()], r=1.0, alpha=10.0)
    torch.testing.assert_close(out, a, rtol=0, atol=1e-6)
    out = run_tl(base, [a, a.clone(), base.clone()], epsilon=0.0, r=1.0, alpha=10.0)
    assert torch.isfinite(out).all()
    assert run_tl(base.bfloat16(), [expert.bfloat16()] * 2).dtype == torch.bfloat16


def test_parameters_are_validated():
    for bad in ({"epsilon": -1.0}, {"r": -0.1}, {"alpha": -1.0}, {"epsilon": float("inf")}, {"lambda": 1.0}):
        with pytest.raises(ValidationError):
            RamPlusTLParams(**bad)
    assert RamPlusTLParams().r == 0.1 and RamPlusTLParams().alpha == 0.2 and RamParams().epsilon == 1e-5
    assert get_method("ramplus").params().r == 0.05 and get_method("ramplus").params().alpha == 1.0
    assert RAM.base == RAMPLUS_TL.base == get_method("ramplus").base == "required"


# ---------------------------------------------------------------- a real checkpoint


@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "ramplus"])
def test_checkpoint_round_trip_matches_the_reference_and_loads(family, tmp_path, method):
    from transformers import AutoModelForCausalLM

    base, experts = family
    params = {"epsilon": 0.01} if method == "ram" else {"epsilon": 0.01, "r": 0.5, "alpha": 2.0}
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "parameters": params,
    }
    mergelab.merge(recipe, tmp_path / "out", max_shard_size="120KB", hash_inputs=False)
    merged = load_dir(tmp_path / "out")
    sd0 = load_dir(base)
    sds = [load_dir(e) for e in experts]
    assert set(merged) == set(sd0)
    names = sorted(sd0)
    as64 = lambda sd: {k: sd[k].double().numpy() for k in names}
    b64, e64 = as64(sd0), [as64(sd) for sd in sds]
    lam = None
    if method == "ramplus":
        # the merged tensors: every one whose shape the base shares (all, in this family)
        shared, unique = counts([b64[k] for k in names], [[e[k] for k in names] for e in e64], 0.01)
        lam = lambdas(shared, unique, 0.01, 0.5, 2.0)
    for name in names:
        t = merged[name]
        assert t.dtype == sd0[name].dtype, name
        if method == "ramplus_tl":
            s_t, u_t = counts([b64[name]], [[e[name]] for e in e64], 0.01)
            lam = lambdas(s_t, u_t, 0.01, 0.5, 2.0)
        want = reference(b64[name], [e[name] for e in e64], 0.01, lam)
        half = t.dtype != torch.float32
        np.testing.assert_allclose(t.double().numpy(), want, rtol=1e-2 if half else 1e-6, atol=1e-6, err_msg=name)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


# ---------------------------------------------------------------- mergekit (optional)

_MK_SCRIPT = r"""
import importlib, json, sys, torch
from mergekit.merge_methods.base import TensorGroup
rm = importlib.import_module("mergekit.merge_methods.ram")
out = []
for c in torch.load(sys.argv[1]):
    group = TensorGroup.from_tensors([c["base"], *c["experts"]], base_index=0)
    if c["plus"]:
        out.append(rm.ramplus_tl_merge.implementation(group, r=c["r"], alpha=c["alpha"], epsilon=c["epsilon"]).tolist())
    else:
        out.append(rm.ram_merge.implementation(group, epsilon=c["epsilon"]).tolist())
print(json.dumps(out))
"""


@needs_mergekit
def test_parity_with_mergekit(tmp_path):
    gen = torch.Generator().manual_seed(21)
    cases = []
    for shape, n, plus, r, alpha, eps in [
        ((32,), 2, False, 0.1, 0.2, 1e-5),
        ((6, 8), 3, True, 0.1, 0.2, 1e-5),
        ((2, 4, 5), 4, True, 0.5, 3.0, 1e-5),
        ((64,), 3, True, 0.2, 1.0, 0.05),
        ((16,), 1, True, 0.1, 0.2, 1e-5),
    ]:
        base = torch.randn(shape, generator=gen)
        cases.append(
            {
                "base": base,
                "experts": sparse_experts(gen, base, n),
                "plus": plus,
                "r": r,
                "alpha": alpha,
                "epsilon": eps,
            }
        )
    expected = run_mergekit(_MK_SCRIPT, cases, tmp_path)
    for case, exp in zip(cases, expected, strict=True):
        if case["plus"]:
            out = run_tl(case["base"], case["experts"], r=case["r"], alpha=case["alpha"], epsilon=case["epsilon"])
        else:
            out = run_ram(case["base"], case["experts"], epsilon=case["epsilon"])
        torch.testing.assert_close(out, torch.tensor(exp), rtol=1e-6, atol=1e-7)
