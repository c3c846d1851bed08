"""Sign election and disjoint merge: hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from mergelab.methods.stages.combine import linear_merge
from mergelab.methods.stages.sign_consensus import (
    consensus_merge,
    disjoint_merge,
    elect_sign,
    majority_sign,
    sign_balance,
)

T = torch.tensor


def test_mass_election_is_the_sign_of_the_sum():
    a = T([1.0, -2.0, 0.5, 0.0])
    b = T([-3.0, 1.0, 0.5, 0.0])
    # sums: -2, -1, 1, 0 -> signs -1, -1, +1, tie (all zero: irrelevant to the merge)
    assert elect_sign([a, b], on_zero="zero").tolist() == [-1.0, -1.0, 1.0, 0.0]


def test_weighted_election_can_flip_the_sign():
    a = T([1.0, -2.0])
    b = T([-3.0, 1.0])
    # weights (4, 1): 4 - 3 = 1 > 0 ; -8 + 1 < 0
    assert elect_sign([a, b], [4.0, 1.0]).tolist() == [1.0, -1.0]
    assert elect_sign([a, b]).tolist() == [-1.0, -1.0]


def test_zero_sum_resolution_rules():
    a = T([1.0, -2.0, -3.0])
    b = T([-1.0, -1.0, -1.0])
    # sums 0, -3, -4: the tensor's majority elected sign is -1
    assert elect_sign([a, b], on_zero="majority").tolist() == [-1.0, -1.0, -1.0]
    assert elect_sign([a, b], on_zero="positive").tolist() == [1.0, -1.0, -1.0]
    assert elect_sign([a, b], on_zero="zero").tolist() == [0.0, -1.0, -1.0]
    # a model-wide majority passed in overrides the tensor's
    assert elect_sign([a, b], on_zero="majority", majority=1.0).tolist() == [1.0, -1.0, -1.0]
    with pytest.raises(ValueError):
        elect_sign([a, b], on_zero="bogus")  # type: ignore[arg-type]


def test_majority_of_a_balanced_tensor_is_zero():
    s = T([1.0, -1.0, 0.0])
    assert sign_balance(s) == 0 and majority_sign(s) == 0
    assert majority_sign(T([1.0, 1.0, -1.0])) == 1
    assert majority_sign(T([-1.0, 0.0])) == -1


def test_disjoint_mean_and_sum_by_hand():
    a = T([2.0, -1.0, 3.0, 0.0])
    b = T([4.0, 1.0, -1.0, 0.0])
    c = T([-1.0, -3.0, 0.0, 0.0])
    sign = T([1.0, -1.0, 1.0, 1.0])
    # agreeing: coord0 {a, b}, coord1 {a, c}, coord2 {a}, coord3 none
    mean = disjoint_merge([a, b, c], [1.0, 1.0, 1.0], sign, normalize=True)
    assert mean.tolist() == [3.0, -2.0, 3.0, 0.0]
    total = disjoint_merge([a, b, c], [1.0, 1.0, 1.0], sign, normalize=False)
    assert total.tolist() == [6.0, -4.0, 3.0, 0.0]
    # weighted mean: (1*2 + 3*4) / 4 = 3.5 ; (1*-1 + 2*-3)/(1+2) = -7/3
    weighted = disjoint_merge([a, b, c], [1.0, 3.0, 2.0], sign, normalize=True)
    assert torch.allclose(weighted, T([3.5, -7.0 / 3.0, 3.0, 0.0]))


def test_agreement_is_judged_on_the_weighted_entry():
    a = T([2.0])
    b = T([1.0])
    # weight -1 turns b into -1, which disagrees with +1
    assert disjoint_merge([a, b], [1.0, -1.0], T([1.0]), normalize=False).tolist() == [2.0]


def test_consensus_merge_equals_elect_then_disjoint():
    g = torch.Generator().manual_seed(0)
    ds = [torch.randn(50, generator=g) for _ in range(3)]
    w = [0.5, 1.0, 2.0]
    expected = disjoint_merge(ds, w, elect_sign(ds, w), normalize=True)
    assert torch.equal(consensus_merge(ds, w, normalize=True), expected)


def test_linear_merge():
    a, b = T([1.0, 2.0]), T([3.0, -2.0])
    assert linear_merge([a, b], [1.0, 3.0], normalize=False).tolist() == [10.0, -4.0]
    assert linear_merge([a, b], [1.0, 3.0], normalize=True).tolist() == [2.5, -1.0]
    with pytest.raises(ValueError):
        linear_merge([a, b], [1.0, -1.0], normalize=True)
