"""Consensus merging: a hand-worked case, k = 0 equals task arithmetic / TIES, k > T gives the
base, an independent naive implementation."""

from __future__ import annotations

import pytest
import torch

import mergelab
from mergelab.methods.base import TensorContext
from mergelab.methods.registry import get_method

CONS = get_method("consensus")
T = torch.tensor

# the TALL example of test_tall_masks.py: λ = 0.5 masks [1,0,1,1,1], [0,1,1,1,1], [0,0,1,1,0]
# -> counts c = [1, 1, 3, 3, 2], τ_MTL = [1, 3, 1, 0, 0.8]
TAU = [T([1.0, 0.0, 2.0, -1.0, 0.5]), T([0.0, 3.0, -2.0, -1.0, 0.5]), T([0.0, 0.0, 1.0, 2.0, -0.2])]
BASE = T([0.1, -0.2, 0.3, 0.4, -0.5])
EXPERTS = [BASE + t for t in TAU]
MTL = T([1.0, 3.0, 1.0, 0.0, 0.8])


def run(base, experts, per_model=None, **glob):
    params = CONS.params.model_validate(glob)
    mps = [CONS.model_params.model_validate(p) for p in (per_model or [{}] * len(experts))]
    return CONS(base, experts, params, mps, TensorContext(name="w"))


@pytest.mark.parametrize(
    ("k", "keep"),
    [(0, [1, 1, 1, 1, 1]), (1, [1, 1, 1, 1, 1]), (2, [0, 0, 1, 1, 1]), (3, [0, 0, 1, 1, 0]), (4, [0, 0, 0, 0, 0])],
)
def test_hand_worked_case(k, keep):
    out = run(BASE, EXPERTS, [{"tall_lambda": 0.5}] * 3, k=k, **{"lambda": 0.7})
    assert torch.allclose(out, BASE + 0.7 * MTL * T(keep, dtype=torch.float32), atol=1e-6)


def test_k0_equals_task_arithmetic_and_ties():
    g = torch.Generator().manual_seed(3)
    base = {"a": torch.randn(8, 6, generator=g), "b": torch.randn(11, generator=g)}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    cons = mergelab.merge_state_dicts("consensus", experts, base, parameters={"k": 0, "lambda": 0.4})
    ta = mergelab.merge_state_dicts("task_arithmetic", experts, base, parameters={"lambda": 0.4})
    for key in base:
        assert torch.allclose(cons[key], ta[key], atol=1e-6)
    for scope in ("tensor", "global"):
        cons = mergelab.merge_state_dicts(
            "consensus",
            experts,
            base,
            parameters={"k": 0, "lambda": 0.4, "multitask": "ties", "scope": scope},
            model_parameters=[{"density": 0.3}] * 3,
        )
        ties = mergelab.merge_state_dicts(
            "ties",
            experts,
            base,
            parameters={"lambda": 0.4, "normalize": False, "scope": scope},
            model_parameters=[{"density": 0.3}] * 3,
        )
        for key in base:
            assert torch.allclose(cons[key], ties[key], atol=1e-6), (scope, key)


def test_matches_naive_implementation():
    g = torch.Generator().manual_seed(4)
    n, t = 50, 4
    base = torch.randn(n, generator=g)
    taus = [torch.randn(n, generator=g) * (0.5 + i) for i in range(t)]
    lams = [0.2, 0.3, 0.5, 0.6]
    out = run(base, [base + x for x in taus], [{"tall_lambda": lam} for lam in lams], k=2, **{"lambda": 0.3})
    want = []
    for p in range(n):
        tv = [float(x[p]) for x in taus]
        mtl = sum(tv)
        count = sum(abs(v) > lam * abs(mtl - v) for v, lam in zip(tv, lams))
        want.append(float(base[p]) + 0.3 * mtl * (count >= 2))
    assert torch.allclose(out, T(want), atol=1e-5)


def test_aliases_and_defaults():
    assert get_method("tall_consensus") is CONS
    p = CONS.params()
    assert (p.k, p.lambda_, p.multitask) == (2, 1.0, "sum")
    assert CONS.outputs == "model"
