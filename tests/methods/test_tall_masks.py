"""TALL masks: a hand-worked case, the paper's identity anchor, an independent naive
implementation (task arithmetic and TIES, per tensor and global), parameter validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from reference.ties import elect_and_merge_lists

import mergelab
from mergelab.methods.base import MethodOutput, TensorContext
from mergelab.methods.registry import get_method

TALL = get_method("tall_masks")
T = torch.tensor


def run(base, experts, per_model=None, **glob) -> MethodOutput:
    params = TALL.params.model_validate(glob)
    mps = [TALL.model_params.model_validate(p) for p in (per_model or [{}] * len(experts))]
    return TALL(base, experts, params, mps, TensorContext(name="w"))


# τ1 = [1, 0,  2, -1,  0.5]      τ_MTL = [1, 3, 1, 0, 0.8]
# τ2 = [0, 3, -2, -1,  0.5]      λ = 0.5:
# τ3 = [0, 0,  1,  2, -0.2]
# task 1: |τ1| = [1, 0, 2, 1, 0.5]   vs 0.5·|τ_MTL − τ1| = [0, 1.5, 0.5, 0.5, 0.15] -> [1, 0, 1, 1, 1]
# task 2: |τ2| = [0, 3, 2, 1, 0.5]   vs 0.5·|τ_MTL − τ2| = [0.5, 0, 1.5, 0.5, 0.15] -> [0, 1, 1, 1, 1]
# task 3: |τ3| = [0, 0, 1, 2, 0.2]   vs 0.5·|τ_MTL − τ3| = [0.5, 1.5, 0, 1, 0.5]    -> [0, 0, 1, 1, 0]
TAU = [T([1.0, 0.0, 2.0, -1.0, 0.5]), T([0.0, 3.0, -2.0, -1.0, 0.5]), T([0.0, 0.0, 1.0, 2.0, -0.2])]
BASE = T([0.1, -0.2, 0.3, 0.4, -0.5])
EXPERTS = [BASE + t for t in TAU]
MASKS = [[1, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 1, 1, 0]]


def test_hand_worked_case():
    out = run(BASE, EXPERTS, [{"tall_lambda": 0.5}] * 3)
    assert isinstance(out, MethodOutput)
    for m, want in zip(out.parts["mask"], MASKS):
        assert m.dtype == torch.bool
        assert m.tolist() == [bool(x) for x in want]
    assert torch.allclose(out.merged, BASE + T([1.0, 3.0, 1.0, 0.0, 0.8]), atol=1e-6)
    assert out.parts["scale"] == [1.0, 1.0, 1.0]
    assert out.parts["base"] is BASE


def test_identity_anchor_where_only_one_task_moves():
    # wherever only task t is non-zero, τ_MTL = τ_t there, so |τ_t| > λ·0 whatever λ
    g = torch.Generator().manual_seed(0)
    n = 60
    owner = torch.randint(0, 3, (n,), generator=g)
    taus = [torch.where(owner == t, torch.randn(n, generator=g), 0.0) for t in range(3)]
    base = torch.randn(n, generator=g)
    for lam in (0.2, 0.6, 5.0):
        out = run(base, [base + t for t in taus], [{"tall_lambda": lam}] * 3)
        for t, m in enumerate(out.parts["mask"]):
            assert torch.equal(m, owner == t)


def test_per_task_lambdas_and_lambda_zero_keeps_every_moved_weight():
    out = run(BASE, EXPERTS, [{"tall_lambda": 0.0}, {"tall_lambda": 0.5}, {"tall_lambda": 100.0}])
    assert out.parts["mask"][0].tolist() == [t != 0 for t in TAU[0].tolist()]
    assert out.parts["mask"][1].tolist() == [bool(x) for x in MASKS[1]]
    # |τ_MTL − τ3| = [1, 3, 0, 2, 1]: only coordinate 2 (where τ_MTL = τ3) survives λ = 100
    assert out.parts["mask"][2].tolist() == [False, False, True, False, False]


# ----------------------------------------------------------------------- independent naive version


def naive_ties_dis_sum(taus: list[list[float]], k_frac: float) -> list[float]:
    """TIES with a per-vector top-k (k = max(1, ⌊K·n⌋), ties with the k-th kept), majority sign for
    exact zeros, disjoint sum: straight from the paper, element by element."""
    n = len(taus[0])
    trimmed = []
    for tau in taus:
        k = max(1, int(k_frac * n)) if k_frac < 1 else n
        kth = sorted((abs(x) for x in tau), reverse=True)[k - 1]
        trimmed.append([x if abs(x) >= kth else 0.0 for x in tau])
    return elect_and_merge_lists(trimmed, sign_tie="majority")


def naive_tall(base, experts, lams, multitask="sum", k_frac=0.2):
    taus = [[float(e[p] - base[p]) for p in range(len(base))] for e in experts]
    if multitask == "sum":
        mtl = [sum(t[p] for t in taus) for p in range(len(base))]
    else:
        mtl = naive_ties_dis_sum(taus, k_frac)
    masks = [[abs(t[p]) > lam * abs(mtl[p] - t[p]) for p in range(len(base))] for t, lam in zip(taus, lams)]
    return mtl, masks


@pytest.mark.parametrize("multitask", ["sum", "ties"])
def test_matches_naive_implementation(multitask):
    g = torch.Generator().manual_seed(1)
    n = 40
    base = torch.randn(n, generator=g)
    experts = [base + torch.randn(n, generator=g) * s for s in (0.5, 1.0, 2.0)]
    lams = [0.2, 0.4, 0.6]
    out = run(
        base, experts, [{"tall_lambda": lam, "density": 0.3} for lam in lams], multitask=multitask, scope="tensor"
    )
    mtl, masks = naive_tall(base.tolist(), [e.tolist() for e in experts], lams, multitask, 0.3)
    assert torch.allclose(out.merged, base + T(mtl), atol=1e-5)
    for m, want in zip(out.parts["mask"], masks):
        assert m.tolist() == want


def test_ties_global_scope_through_the_engine():
    """scope: global runs the TIES gather passes over every tensor: compare with a naive TIES on
    the flattened model."""
    g = torch.Generator().manual_seed(2)
    base = {"a": torch.randn(6, 5, generator=g), "b": torch.randn(17, generator=g)}
    experts = [{k: v + torch.randn(v.shape, generator=g) * s for k, v in base.items()} for s in (0.3, 1.0, 3.0)]
    out = mergelab.merge_state_dicts(
        "tall_masks", experts, base, parameters={"multitask": "ties"}, model_parameters=[{"density": 0.25}] * 3
    )
    flat = lambda sd: torch.cat([sd["a"].reshape(-1), sd["b"]]).tolist()
    mtl, _ = naive_tall(flat(base), [flat(e) for e in experts], [0.6] * 3, "ties", 0.25)
    want = torch.tensor(flat(base)) + torch.tensor(mtl)
    got = torch.cat([out["a"].reshape(-1), out["b"]])
    assert torch.allclose(got, want, atol=1e-5)


def test_normalize_gives_mean():
    out = run(BASE, EXPERTS, normalize=True)
    assert torch.allclose(out.merged, BASE + sum(TAU) / 3, atol=1e-6)


def test_parameters_are_validated():
    with pytest.raises(ValidationError):
        TALL.model_params.model_validate({"tall_lambda": -0.1})
    with pytest.raises(ValidationError):
        TALL.params.model_validate({"multitask": "mean"})
    assert TALL.model_params().tall_lambda == 0.6
    assert TALL.params().multitask == "sum"
    assert TALL.outputs == "routed"
    assert get_method("tall_mask") is TALL
