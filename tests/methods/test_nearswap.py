"""NearSwap: hand-computed entries, an independent NumPy reference of the model card's rule,
mergekit's floor as an option, edge cases, a checkpoint round trip that loads; the optional
parity test runs mergekit 0.1.5's ``nearswap`` where MERGEKIT_PYTHON is set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mergekit_live import needs_mergekit, run_mergekit
from pydantic import ValidationError
from tiny_models import load_dir

import mergelab
from mergelab.errors import MergelabError
from mergelab.methods.base import NoParams, TensorContext
from mergelab.methods.nearswap import NearSwapParams
from mergelab.methods.registry import get_method

NEARSWAP = get_method("nearswap")
CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight")


def run(base, other, **params) -> torch.Tensor:
    return NEARSWAP(base, [other], NearSwapParams(**params), [NoParams()], CTX)


def reference(v0: np.ndarray, v1: np.ndarray, t: float, floor: float = 0.0) -> np.ndarray:
    """The model card's rule, entry by entry in float64: w = t/|v0 − v1| (nan/inf -> 1), clipped to [0, 1]."""
    v0 = np.asarray(v0, dtype=np.float64)
    v1 = np.asarray(v1, dtype=np.float64)
    out = np.empty_like(v0)
    for i in np.ndindex(v0.shape):
        d = max(abs(v0[i] - v1[i]), floor)
        w = 1.0 if d == 0 else min(max(t / d, 0.0), 1.0)
        out[i] = (1 - w) * v0[i] + w * v1[i]
    return out


def test_near_entries_swap_and_far_ones_move_by_t():
    base = torch.tensor([0.0, 1.0, 2.0, -1.0, 5.0])
    other = torch.tensor([0.05, 1.5, 2.0, -3.0, 5.1])
    # d = 0.05, 0.5, 0, 2, 0.1; t = 0.1: w = 1, 0.2, 1, 0.05, 1
    want = torch.tensor([0.05, 1.1, 2.0, -1.1, 5.1])
    torch.testing.assert_close(run(base, other, t=0.1), want, rtol=0, atol=1e-6)
    # the change is min(d, t) in magnitude
    out = run(base, other, t=0.3)
    torch.testing.assert_close(
        (out - base).abs(), torch.minimum((other - base).abs(), torch.tensor(0.3)), rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("t", [1e-4, 1e-2, 0.3])
def test_matches_an_independent_reference(t):
    gen = torch.Generator().manual_seed(int(t * 1e4))
    base = torch.randn(7, 9, generator=gen, dtype=torch.float64)
    other = base + 0.05 * torch.randn(7, 9, generator=gen, dtype=torch.float64)
    other[0, :3] = base[0, :3]  # d = 0
    got = run(base, other, t=t)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), reference(base.numpy(), other.numpy(), t), rtol=0, atol=1e-15)
    got32 = run(base.float(), other.float(), t=t)
    np.testing.assert_allclose(got32.numpy(), reference(base.numpy(), other.numpy(), t), rtol=0, atol=1e-6)


def test_mergekits_floor_is_an_option():
    base = torch.zeros(3, dtype=torch.float64)
    other = torch.tensor([4e-7, 2e-6, 0.0], dtype=torch.float64)
    t = 1e-7
    # exact: w = 0.25, 0.05, 1 ; floored at 1e-6: w = 0.1, 0.05, (d = 0 -> floored d = 1e-6) 0.1
    np.testing.assert_allclose(run(base, other, t=t).numpy(), [1e-7, 1e-7, 0.0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(run(base, other, t=t, diff_floor=1e-6).numpy(), [4e-8, 1e-7, 0.0], rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        run(base, other, t=t, diff_floor=1e-6).numpy(), reference(base.numpy(), other.numpy(), t, 1e-6), rtol=1e-12
    )


def test_bounds_and_edge_cases():
    base = torch.randn(4, 5)
    other = base + torch.randn(4, 5)
    assert torch.equal(run(base, other, t=0.0), base)  # t = 0: the base
    torch.testing.assert_close(run(base, other, t=1e6), other, rtol=0, atol=1e-6)  # every entry within t
    assert torch.equal(run(base, base.clone(), t=0.01), base)  # zero task vector
    bf = run(base.bfloat16(), other.bfloat16(), t=0.5)
    assert bf.dtype == torch.bfloat16


def test_parameters_and_model_count_are_validated(tmp_path):
    for bad in ({"t": -0.1}, {"t": float("nan")}, {"t": 0.1, "diff_floor": -1.0}, {"t": 0.1, "weight": 1.0}):
        with pytest.raises(ValidationError):
            NearSwapParams(**bad)
    with pytest.raises(ValidationError):
        NearSwapParams()  # t is required, as in mergekit
    assert NEARSWAP.base == "required" and NEARSWAP.max_experts == 1
    x = torch.zeros(3)
    with pytest.raises(MergelabError, match="at most 1"):
        mergelab.merge_state_dicts("nearswap", [{"w": x}, {"w": x}], {"w": x}, parameters={"t": 0.1})


# ---------------------------------------------------------------- a real checkpoint


def test_checkpoint_round_trip_matches_the_reference_and_loads(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, experts = family
    recipe = {
        "merge_method": "nearswap",
        "base_model": str(base),
        "models": [{"model": str(base)}, {"model": str(experts[0])}],  # mergekit's form: the base listed too
        "parameters": {"t": 0.003},
    }
    mergelab.merge(recipe, tmp_path / "out", max_shard_size="120KB", hash_inputs=False)
    merged = load_dir(tmp_path / "out")
    sd0, sd1 = load_dir(base), load_dir(experts[0])
    assert set(merged) == set(sd0)
    for name, t in merged.items():
        assert t.dtype == sd0[name].dtype, name
        want = reference(sd0[name].double().numpy(), sd1[name].double().numpy(), 0.003)
        half = t.dtype != torch.float32  # bf16/fp16 tensors of the family: one rounding of the output
        np.testing.assert_allclose(t.double().numpy(), want, rtol=1e-2 if half else 0, atol=1e-6, err_msg=name)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


# ---------------------------------------------------------------- mergekit (optional)

_MK_SCRIPT = r"""
import importlib, json, sys, torch
from mergekit.merge_methods.base import TensorGroup
ns = importlib.import_module("mergekit.merge_methods.nearswap")
out = []
for c in torch.load(sys.argv[1]):
    group = TensorGroup.from_tensors([c["base"], c["other"]], base_index=0)
    out.append(ns.nearswap_merge.implementation(group, t=c["t"]).tolist())
print(json.dumps(out))
"""


@needs_mergekit
def test_parity_with_mergekit(tmp_path):
    gen = torch.Generator().manual_seed(11)
    cases = []
    for shape, scale, t in [((32,), 0.05, 0.01), ((6, 8), 1e-3, 1e-4), ((3, 4, 5), 1e-7, 1e-8), ((16,), 0.1, 0.0)]:
        base = torch.randn(shape, generator=gen)
        cases.append({"base": base, "other": base + scale * torch.randn(shape, generator=gen), "t": t})
    expected = run_mergekit(_MK_SCRIPT, cases, tmp_path)
    for case, exp in zip(cases, expected, strict=True):
        out = run(case["base"], case["other"], t=case["t"], diff_floor=1e-6)
        torch.testing.assert_close(out, torch.tensor(exp), rtol=1e-6, atol=1e-7)
