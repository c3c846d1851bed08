"""SCE: hand-computed anchors, an independent float64 NumPy reference, the options, edge cases,
a checkpoint round trip; the optional parity test runs mergekit 0.1.5's ``sce`` where its venv
exists (with ``uniform_below: 1e-6``, mergekit's equal-weight fallback)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mergekit_live import needs_mergekit, run_mergekit
from pydantic import ValidationError
from tiny_models import load_dir

import mergelab
from mergelab.methods.base import NoParams, TensorContext
from mergelab.methods.registry import get_method
from mergelab.methods.sce import SceParams

SCE = get_method("sce")
CTX = TensorContext(name="model.layers.0.mlp.up_proj.weight")


def run(base, experts, **params) -> torch.Tensor:
    return SCE(base, experts, SceParams(**params), [NoParams()] * len(experts), CTX)


def reference(base: np.ndarray, experts: list[np.ndarray], topk=1.0, normalize=True, uniform_below=0.0) -> np.ndarray:
    """SCE from its three steps, element by element where it reads clearer (float64)."""
    b = np.asarray(base, dtype=np.float64).ravel()
    d = np.stack([np.asarray(e, dtype=np.float64).ravel() - b for e in experts])
    n_models, n = d.shape
    keep = np.ones(n, dtype=bool)
    if topk < 1:
        var = d.var(axis=0)
        k = int(np.count_nonzero(var) * topk)
        order = sorted(range(n), key=lambda i: (-var[i], i))
        keep = np.zeros(n, dtype=bool)
        keep[order[:k]] = True
    d = d * keep
    s = np.array([np.mean(d[j] ** 2) for j in range(n_models)])
    eta = np.full(n_models, 1.0 / n_models) if s.sum() == 0 or s.sum() < uniform_below else s / s.sum()
    out = np.zeros(n)
    for i in range(n):
        elected = 1.0 if d[:, i].sum() >= 0 else -1.0
        agree = [j for j in range(n_models) if np.sign(d[j, i]) == elected]
        num = sum(eta[j] * d[j, i] for j in agree)
        den = sum(eta[j] for j in agree)
        out[i] = num / max(den, 1e-6) if normalize else num
    return (b + out).reshape(np.shape(base))


# ---------------------------------------------------------------- hand-computed anchors


def test_no_selection_weights_by_mean_squares_and_erases_minority_signs():
    base = torch.zeros(2)
    experts = [torch.tensor([2.0, -1.0]), torch.tensor([0.0, 3.0])]
    # η = (2.5, 4.5) / 7; both elected signs +; model 1 agrees on element 0 only, model 2 on 1 only
    torch.testing.assert_close(run(base, experts), torch.tensor([2.0, 3.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        run(base, experts, normalize=False), torch.tensor([5 / 14 * 2, 9 / 14 * 3]), rtol=0, atol=1e-6
    )


def test_selection_keeps_the_top_variance_elements_of_those_that_vary():
    base = torch.tensor([1.0, 1.0, 1.0])
    experts = [base + torch.tensor([2.0, -1.0, 0.1]), base + torch.tensor([0.0, 3.0, 0.1])]
    # variances 1, 4, 0: two vary, ⌊0.5·2⌋ = 1 kept (element 1); η = (1/3, 3) / (10/3)
    torch.testing.assert_close(run(base, experts, select_topk=0.5), torch.tensor([1.0, 4.0, 1.0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(
        run(base, experts, select_topk=0.5, normalize=False), torch.tensor([1.0, 1.0 + 0.9 * 3, 1.0]), rtol=0, atol=1e-6
    )
    # equal weights below the threshold: the agreeing model's entry counts with weight 1/2
    torch.testing.assert_close(
        run(base, experts, select_topk=0.5, normalize=False, uniform_below=100.0),
        torch.tensor([1.0, 2.5, 1.0]),
        rtol=0,
        atol=1e-6,
    )
    torch.testing.assert_close(run(base, experts, select_topk=0.0), base, rtol=0, atol=0)


# ---------------------------------------------------------------- the reference


@pytest.mark.parametrize("shape", [(40,), (6, 7), (2, 3, 5)])
@pytest.mark.parametrize(
    "opts",
    [{}, {"select_topk": 0.3}, {"select_topk": 0.7, "normalize": False}, {"select_topk": 0.5, "uniform_below": 1e-6}],
)
def test_matches_an_independent_float64_reference(shape, opts):
    gen = torch.Generator().manual_seed(len(shape) * 7 + len(opts))
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    experts = [base + s * torch.randn(shape, generator=gen, dtype=torch.float64) for s in (0.1, 0.02, 0.05)]
    got = run(base, experts, **opts)
    assert got.dtype == torch.float64
    want = reference(base.numpy(), [e.numpy() for e in experts], opts.get("select_topk", 1.0),
                     opts.get("normalize", True), opts.get("uniform_below", 0.0))  # fmt: skip
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)
    got32 = run(base.float(), [e.float() for e in experts], **opts)
    np.testing.assert_allclose(got32.numpy(), want, rtol=0, atol=1e-5)


def test_small_updates_keep_their_magnitude_weights_unless_asked_for_mergekits_fallback():
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(50, generator=gen)
    experts = [base + 1e-4 * torch.randn(50, generator=gen), base + 5e-4 * torch.randn(50, generator=gen)]
    paper = run(base, experts, normalize=False)
    equal = run(base, experts, normalize=False, uniform_below=1e-6)
    assert not torch.allclose(paper, equal, rtol=0, atol=1e-7)
    want = reference(base.double().numpy(), [e.double().numpy() for e in experts], normalize=False, uniform_below=1e-6)
    np.testing.assert_allclose(equal.double().numpy(), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------- edge cases and parameters


def test_identical_experts_give_that_expert_and_zero_task_vectors_the_base():
    base = torch.randn(5, 4)
    expert = base + 0.1 * torch.randn(5, 4)
    torch.testing.assert_close(run(base, [expert, expert, expert]), expert, rtol=0, atol=1e-6)
    assert torch.equal(run(base, [base.clone(), base.clone()], select_topk=0.5), base)


def test_dtype_follows_the_base():
    base = torch.randn(6, 3).to(torch.bfloat16)
    experts = [(base.float() + 0.05 * (i + 1)).to(torch.bfloat16) for i in range(2)]
    assert run(base, experts, select_topk=0.5).dtype == torch.bfloat16


def test_parameters_are_validated_and_mergekit_keys_accepted():
    for bad in ({"select_topk": 1.5}, {"select_topk": -0.1}, {"uniform_below": -1.0}, {"density": 0.5}):
        with pytest.raises(ValidationError):
            SceParams(**bad)
    assert SceParams(int8_mask=True).int8_mask
    assert SCE.base == "required" and SCE.card.group == "advanced"


# ---------------------------------------------------------------- a real checkpoint


def test_checkpoint_round_trip_matches_the_reference(family, tmp_path):
    base, experts = family
    recipe = {
        "merge_method": "sce",
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "parameters": {"select_topk": 0.4},
    }
    mergelab.merge(recipe, tmp_path / "out", max_shard_size="120KB", hash_inputs=False)
    merged = load_dir(tmp_path / "out")
    sd0 = load_dir(base)
    sds = [load_dir(e) for e in experts]
    assert set(merged) == set(sd0)
    for name, t in merged.items():
        assert t.dtype == sd0[name].dtype, name
        want = reference(sd0[name].double().numpy(), [sd[name].double().numpy() for sd in sds], 0.4)
        np.testing.assert_allclose(t.double().numpy(), want, rtol=0, atol=1e-5, err_msg=name)


# ---------------------------------------------------------------- mergekit (optional)

_MK_SCRIPT = r"""
import json, sys, torch
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.sce import sce_merge
cases = torch.load(sys.argv[1])
out = []
for c in cases:
    group = TensorGroup.from_tensors([c["base"], *c["experts"]], base_index=0)
    out.append(sce_merge.implementation(group, select_topk=c["topk"]).tolist())
print(json.dumps(out))
"""


@needs_mergekit
def test_parity_with_mergekit(tmp_path):
    gen = torch.Generator().manual_seed(8)
    cases = []
    for shape, n, topk, scale in [
        ((32,), 2, 1.0, 0.1),
        ((6, 8), 3, 0.3, 0.1),
        ((2, 4, 5), 4, 0.6, 0.05),
        ((64,), 3, 0.5, 1e-4),
    ]:
        base = torch.randn(shape, generator=gen)
        cases.append(
            {
                "base": base,
                "experts": [base + scale * torch.randn(shape, generator=gen) for _ in range(n)],
                "topk": topk,
            }
        )
    expected = run_mergekit(_MK_SCRIPT, cases, tmp_path)
    for case, exp in zip(cases, expected, strict=True):
        out = run(case["base"], case["experts"], select_topk=case["topk"], uniform_below=1e-6)
        torch.testing.assert_close(out, torch.tensor(exp), rtol=1e-5, atol=1e-6)
