"""Arcee Fusion: hand-computed quartile threshold and KL importance, an independent float64 NumPy
reference, the options, edge cases, a checkpoint round trip that loads; the optional parity test
runs mergekit 0.1.5's ``arcee_fusion`` where MERGEKIT_PYTHON is set."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mergekit_live import needs_mergekit, run_mergekit
from pydantic import ValidationError
from tiny_models import load_dir

import mergelab
from mergelab.methods.arcee_fusion import ArceeFusionParams, fusion_importance, fusion_mask
from mergelab.methods.base import NoParams, TensorContext
from mergelab.methods.registry import get_method

FUSION = get_method("arcee_fusion")
CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight")


def run(base, other, ctx=CTX, **params) -> torch.Tensor:
    return FUSION(base, [other], ArceeFusionParams(**params), [NoParams()], ctx)


def reference(base: np.ndarray, other: np.ndarray, fence: float = 1.5) -> np.ndarray:
    """The three steps in float64 with NumPy (rows along the last axis)."""
    b = np.atleast_1d(np.asarray(base, dtype=np.float64))
    o = np.atleast_1d(np.asarray(other, dtype=np.float64))

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p = softmax(o) + 1e-8
    q = softmax(b) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    s = np.abs(o - b) * kl
    ordered = np.sort(s.ravel())
    n = ordered.size
    q1, q2, q3 = (ordered[math.floor(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    keep = s >= q2 + fence * (q3 - q1)
    return np.where(keep, b + (o - b), b).reshape(np.shape(base))


# ---------------------------------------------------------------- hand-computed


def test_threshold_is_the_upper_tukey_fence_of_order_statistic_quartiles():
    scores = torch.tensor([5.0, 0.0, 3.0, 100.0, 1.0, 8.0, 2.0, 7.0, 4.0, 6.0])
    # sorted 0..8, 100; n = 10: Q1 = s(2) = 2, Q2 = s(4) = 4, Q3 = s(6) = 6; τ = 4 + 1.5·4 = 10
    assert fusion_mask(scores).tolist() == [False, False, False, True] + [False] * 6
    # fence 0: τ = Q2 = 4: the scores ≥ 4
    assert fusion_mask(scores, fence=0.0).tolist() == [s >= 4 for s in scores.tolist()]


def test_importance_is_the_change_times_the_rows_softmax_kl():
    base = torch.zeros(2, 3, dtype=torch.float64)
    other = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    # row 0: p = (1/2, 1/4, 1/4) (+1e-8), q uniform: KL = ½ log(3/2) + ½ log(3/4); row 1 unchanged: 0
    kl = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    got = fusion_importance(base, other)
    want = torch.tensor([[math.log(2.0) * kl, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


# ---------------------------------------------------------------- the reference


@pytest.mark.parametrize("shape", [(50,), (12, 9), (3, 4, 6)])
@pytest.mark.parametrize("fence", [1.5, 0.5])
def test_matches_an_independent_reference(shape, fence):
    gen = torch.Generator().manual_seed(len(shape) * 3 + int(fence * 2))
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    other = base + 0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)
    got = run(base, other, fence=fence)
    assert got.dtype == torch.float64
    want = reference(base.numpy(), other.numpy(), fence)
    np.testing.assert_array_equal(got.numpy(), want)
    fused = (got != base).float().mean()
    assert 0.0 < float(fused) < 0.5, fused  # only the outliers of importance


def test_quantile_sample_estimates_from_a_seeded_draw():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(64, 64, generator=gen)
    other = base + 0.05 * torch.randn(64, 64, generator=gen)
    exact = run(base, other)
    a = run(base, other, quantile_sample=500)
    b = run(base, other, quantile_sample=500)
    other_name = run(base, other, ctx=TensorContext(name="other.weight"), quantile_sample=500)
    assert torch.equal(a, b)  # reproducible: the tensor's seeded generator
    assert not torch.equal(a, exact) and not torch.equal(a, other_name)
    assert torch.equal(run(base, other, quantile_sample=64 * 64), exact)  # not more entries than the sample: exact


# ---------------------------------------------------------------- edge cases and parameters


def test_edge_cases():
    base = torch.randn(6, 5)
    assert torch.equal(run(base, base.clone()), base)  # no change
    other = base + 0.1 * torch.randn(6, 5)
    torch.testing.assert_close(run(base, other, fence=-1e12), other, rtol=0, atol=1e-6)  # keep every change
    assert torch.equal(run(base, other, fence=1e12), base)  # keep none (IQR > 0 here)
    vec = torch.randn(7)  # a 1-D tensor is one row
    np.testing.assert_array_equal(
        run(vec, vec + 0.1 * torch.arange(7.0)).numpy(), reference(vec.numpy(), (vec + 0.1 * torch.arange(7.0)).numpy())
    )
    one = torch.tensor([2.0])
    assert torch.equal(run(one, torch.tensor([3.0])), torch.tensor([3.0]))  # one entry: its own quartiles
    assert run(base.bfloat16(), other.bfloat16()).dtype == torch.bfloat16


def test_parameters_and_model_count():
    assert ArceeFusionParams(normalize=True, int8_mask=True, rescale=False).fence == 1.5  # mergekit's keys
    for bad in ({"fence": float("nan")}, {"quantile_sample": -1}, {"density": 0.5}, {"t": 0.5}):
        with pytest.raises(ValidationError):
            ArceeFusionParams(**bad)
    assert FUSION.base == "required" and FUSION.max_experts == 1
    x = torch.zeros(3)
    with pytest.raises(mergelab.errors.MergelabError, match="at most 1"):
        mergelab.merge_state_dicts("arcee_fusion", [{"w": x}, {"w": x}], {"w": x})


# ---------------------------------------------------------------- a real checkpoint


def test_checkpoint_round_trip_matches_the_reference_and_loads(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, experts = family
    recipe = {
        "merge_method": "arcee_fusion",
        "base_model": str(base),
        "models": [{"model": str(experts[0])}],
        "parameters": {"normalize": True, "int8_mask": True, "rescale": False},  # as recipes in use set them
    }
    mergelab.merge(recipe, tmp_path / "out", max_shard_size="120KB", hash_inputs=False)
    merged = load_dir(tmp_path / "out")
    sd0, sd1 = load_dir(base), load_dir(experts[0])
    assert set(merged) == set(sd0)
    for name, t in merged.items():
        assert t.dtype == sd0[name].dtype, name
        if t.dtype == torch.float32:  # the mask is a threshold: compare exactly where no rounding intervenes
            want = reference(sd0[name].double().numpy(), sd1[name].double().numpy())
            kept = want != sd0[name].double().numpy()
            got_kept = t.numpy() != sd0[name].numpy()
            assert (kept != got_kept).mean() < 1e-3, name  # float32 vs float64 scores at the threshold
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")


# ---------------------------------------------------------------- mergekit (optional)

_MK_SCRIPT = r"""
import importlib, json, sys, torch
from mergekit.merge_methods.base import TensorGroup
af = importlib.import_module("mergekit.merge_methods.arcee_fusion")
out = []
for c in torch.load(sys.argv[1]):
    group = TensorGroup.from_tensors([c["base"], c["other"]], base_index=0)
    out.append(af.arcee_fusion_merge_method.implementation(group).tolist())
print(json.dumps(out))
"""


@needs_mergekit
def test_parity_with_mergekit(tmp_path):
    gen = torch.Generator().manual_seed(17)
    cases = []
    for shape, scale in [((40,), 0.05), ((16, 12), 0.02), ((2, 6, 8), 0.1), ((1,), 0.1)]:
        base = torch.randn(shape, generator=gen)
        cases.append({"base": base, "other": base + scale * torch.randn(shape, generator=gen)})
    expected = run_mergekit(_MK_SCRIPT, cases, tmp_path)
    for case, exp in zip(cases, expected, strict=True):
        torch.testing.assert_close(run(case["base"], case["other"]), torch.tensor(exp), rtol=0, atol=0)
