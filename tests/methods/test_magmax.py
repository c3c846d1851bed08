"""MagMax: hand-worked selection (ties to the later expert), the default λ = 0.5, an independent
argmax implementation, parameter validation."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

import mergelab
from mergelab.methods.base import TensorContext
from mergelab.methods.registry import get_method

MAGMAX = get_method("magmax")
T = torch.tensor


def run(base, experts, **glob):
    params = MAGMAX.params.model_validate(glob)
    return MAGMAX(
        base, experts, params, [MAGMAX.model_params.model_validate({})] * len(experts), TensorContext(name="w")
    )


# τ1 = [ 1.0, -3.0, 0.5,  2.0, 0.0]
# τ2 = [-2.0,  1.0, 0.5, -2.0, 0.0]
# τ3 = [ 0.5,  2.5, -0.1, 1.0, 0.0]
# largest |τ|: [-2.0 (τ2), -3.0 (τ1), 0.5 (tie τ1/τ2: later → τ2's 0.5), -2.0 (tie ±2: later → τ2), 0]
TAU = [T([1.0, -3.0, 0.5, 2.0, 0.0]), T([-2.0, 1.0, 0.5, -2.0, 0.0]), T([0.5, 2.5, -0.1, 1.0, 0.0])]
BASE = T([10.0, 20.0, 30.0, 40.0, 50.0])
SELECTED = T([-2.0, -3.0, 0.5, -2.0, 0.0])


def test_picks_the_largest_magnitude_with_default_lambda_half():
    out = run(BASE, [BASE + t for t in TAU])
    assert torch.allclose(out - BASE, 0.5 * SELECTED)


def test_lambda_one_and_tie_goes_to_later_expert():
    out = run(BASE, [BASE + t for t in TAU], **{"lambda": 1.0})
    assert torch.allclose(out - BASE, SELECTED)
    # order matters only for ties: swapping τ1 and τ2 makes coordinate 3 take τ1's +2
    swapped = run(BASE, [BASE + TAU[1], BASE + TAU[0], BASE + TAU[2]], **{"lambda": 1.0})
    assert torch.allclose(swapped - BASE, T([-2.0, -3.0, 0.5, 2.0, 0.0]))


def test_matches_argmax_implementation():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 7, generator=g)
    taus = [torch.randn(6, 7, generator=g) * (i + 1) for i in range(4)]
    stacked = torch.stack(taus)
    # argmax over the reversed stack picks the last maximum, as the reference's ">=" does
    idx = stacked.abs().flip(0).argmax(dim=0)
    chosen = stacked.flip(0).gather(0, idx.unsqueeze(0)).squeeze(0)
    out = mergelab.merge_tensors("magmax", [base + t for t in taus], base, parameters={"lambda": 0.8})
    assert torch.allclose(out, base + 0.8 * chosen, atol=1e-6)


@pytest.mark.parametrize("bad", [{"lambda": float("nan")}, {"density": 0.5}])
def test_invalid_parameters(bad):
    with pytest.raises(ValidationError):
        MAGMAX.params.model_validate(bad)


def test_no_per_model_parameters():
    with pytest.raises(ValidationError):
        MAGMAX.model_params.model_validate({"weight": 2.0})
