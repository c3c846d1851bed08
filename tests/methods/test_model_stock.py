"""Model Stock: hand-computed anchors (several also produced by mergekit 0.1.5), an independent
float64 re-implementation written from the paper's formula, edge cases and parameter checks.
"""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
from mergekit_live import needs_mergekit, run_mergekit
from pydantic import ValidationError

from mergelab.methods.base import NoParams, TensorContext
from mergelab.methods.model_stock import ModelStockParams, interpolation_ratio
from mergelab.methods.registry import get_method

MODEL_STOCK = get_method("model_stock")
CTX = TensorContext(name="model.layers.0.self_attn.o_proj.weight")
# The live parity test runs mergekit 0.1.5 from this python (a venv with mergekit); unset: skipped.


def run(base, experts, **params) -> torch.Tensor:
    return MODEL_STOCK(base, list(experts), ModelStockParams(**params), [NoParams()] * len(experts), CTX)


def reference_model_stock(base, experts, filter_wise=False, floor=0.0, clamp_cos=False):
    """Paper formula on float64 copies, one vector at a time."""
    b = np.asarray(base, dtype=np.float64)
    es = [np.asarray(e, dtype=np.float64) for e in experts]
    n = len(es)
    if filter_wise and b.ndim >= 1:
        rows0 = b.reshape(-1, b.shape[-1])
        rows = [e.reshape(-1, b.shape[-1]) for e in es]
    else:
        rows0 = b.reshape(1, -1)
        rows = [e.reshape(1, -1) for e in es]
    out = np.empty_like(rows0)
    for r in range(rows0.shape[0]):
        taus = [x[r] - rows0[r] for x in rows]
        cosines = []
        for u, v in combinations(taus, 2):
            nu, nv = np.linalg.norm(u), np.linalg.norm(v)
            if floor > 0:
                c = (u @ v) / max(nu * nv, floor)
            else:
                c = 0.0 if nu == 0 or nv == 0 else (u @ v) / (nu * nv)
            cosines.append(min(1.0, max(-1.0, c)))
        cos = sum(cosines) / len(cosines)
        if clamp_cos:
            cos = min(1.0, max(0.0, cos))
        denom = 1 + (n - 1) * cos
        t = 0.0 if abs(denom) < 1e-6 else n * cos / denom
        mean = sum(x[r] for x in rows) / n
        out[r] = t * mean + (1 - t) * rows0[r]
    return out.reshape(b.shape)


X = torch.tensor([1.0, 0.0, 0.0])
Y = torch.tensor([0.0, 1.0, 0.0])
Z3 = torch.zeros(3)


# ---------------------------------------------------------------- hand-computed anchors


def test_orthogonal_task_vectors_keep_base():
    # cos = 0 → t = 0. mergekit 0.1.5: [0, 0, 0]
    base = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(run(base, [base + X, base + Y]), base)


def test_sixty_degrees_two_experts():
    # cos = 1/2, N = 2: t = 1 / 1.5 = 2/3; mean = [3/4, √3/4, 0] → [1/2, √3/6, 0].
    # mergekit 0.1.5: [0.5000, 0.2887, 0.0000]
    e2 = torch.tensor([0.5, math.sqrt(3) / 2, 0.0])
    out = run(Z3, [X, e2])
    torch.testing.assert_close(out, torch.tensor([0.5, math.sqrt(3) / 6, 0.0]))


def test_three_experts_pairwise_sixty_degrees():
    # unit vectors with all pairwise cosines 1/2: t = 3·½ / (1 + 2·½) = 3/4
    e1 = torch.tensor([1.0, 0.0, 0.0])
    e2 = torch.tensor([0.5, math.sqrt(3) / 2, 0.0])
    e3 = torch.tensor([0.5, math.sqrt(3) / 6, math.sqrt(2 / 3)])
    base = torch.tensor([1.0, 2.0, 3.0])
    out = run(base, [base + e1, base + e2, base + e3])
    expected = base + 0.75 * (e1 + e2 + e3) / 3
    torch.testing.assert_close(out, expected)


def test_mean_of_pairwise_cosines_for_three_experts():
    # cosines (X, Y) = 0, (X, X+Y) = (Y, X+Y) = 1/√2: mean = √2/3; t = 3c / (1 + 2c)
    c = math.sqrt(2) / 3
    t = 3 * c / (1 + 2 * c)
    out = run(Z3, [X, Y, X + Y])
    torch.testing.assert_close(out, t * (2 * X + 2 * Y) / 3)


def test_ratio_formula():
    cos = torch.tensor([0.0, 0.5, 1.0, -0.5])
    torch.testing.assert_close(interpolation_ratio(cos, 2), torch.tensor([0.0, 2 / 3, 1.0, -2.0]))
    torch.testing.assert_close(interpolation_ratio(cos, 4)[1], torch.tensor(2 / 2.5))


# ---------------------------------------------------------------- edge cases


def test_identical_experts_return_that_expert():
    gen = torch.Generator().manual_seed(0)
    base, e = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    for n in (2, 3, 5):
        torch.testing.assert_close(run(base, [e.clone() for _ in range(n)]), e)
        torch.testing.assert_close(run(base, [e.clone() for _ in range(n)], filter_wise=True), e)


def test_zero_task_vectors_return_base():
    base = torch.randn(4, 3)
    for fw in (False, True):
        out = run(base, [base.clone(), base.clone(), base.clone()], filter_wise=fw)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, base, rtol=0, atol=0)


def test_one_zero_task_vector_has_cosine_zero():
    # N = 2, τ1 = 0: cos = 0, t = 0 → base (no NaN)
    base = torch.tensor([1.0, 1.0, 1.0])
    out = run(base, [base.clone(), base + X])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base)


def test_negative_cosine_follows_paper_formula():
    # cos = −1/2, N = 2: t = −1 / (1/2) = −2 (not clamped, as paper and mergekit);
    # mean = [1/4, √3/4, 0] → [−1/2, −√3/2, 0]. mergekit 0.1.5: [-0.5000, -0.8660, 0.0000]
    e2 = torch.tensor([-0.5, math.sqrt(3) / 2, 0.0])
    out = run(Z3, [X, e2])
    torch.testing.assert_close(out, torch.tensor([-0.5, -math.sqrt(3) / 2, 0.0]))
    # clamp_cos: cos → 0, t = 0 → base
    torch.testing.assert_close(run(Z3, [X, e2], clamp_cos=True), Z3)


def test_negative_cosine_three_experts_matches_mergekit_number():
    # cosines −0.9, −0.9, 0.62: mean −0.39333; t = 3c/(1 + 2c) = 5.53125; mean of experts
    # −0.26667·X → 1.475·X. mergekit 0.1.5: [1.4750, 0, 0]
    s = math.sqrt(1 - 0.81)
    experts = [X, torch.tensor([-0.9, s, 0.0]), torch.tensor([-0.9, -s, 0.0])]
    torch.testing.assert_close(run(Z3, experts), torch.tensor([1.475, 0.0, 0.0]))


def test_singular_denominator_keeps_base():
    # τ2 = −τ1, N = 2: 1 + cos = 0. mergekit 0.1.5: base
    base = torch.tensor([2.0, -1.0, 0.5])
    out = run(base, [base + X, base - X])
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, base)


def test_small_task_vectors_exact_cosine_vs_mergekit_floor():
    # τ1 = τ2 = 1e-4·X: exact cosine 1 → t = 1 → the expert.
    # mergekit divides by max(‖τ1‖‖τ2‖, 1e-6) = 1e-6: cos = 0.01, t = 0.02/1.01 → 1.9802e-6·X
    # (the number mergekit 0.1.5 prints); norm_product_floor=1e-6 reproduces it.
    e = 1e-4 * X
    torch.testing.assert_close(run(Z3, [e, e.clone()]), e)
    compat = run(Z3, [e, e.clone()], norm_product_floor=1e-6)
    torch.testing.assert_close(compat, (0.02 / 1.01) * e, rtol=1e-5, atol=0)
    assert abs(compat[0].item() - 1.9802e-6) < 1e-10


def test_floor_inactive_for_ordinary_task_vectors():
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(8, 8, generator=gen)
    experts = [base + torch.randn(8, 8, generator=gen) for _ in range(3)]
    torch.testing.assert_close(run(base, experts), run(base, experts, norm_product_floor=1e-6))


def test_tiny_task_vectors_no_nan():
    base = torch.ones(6)
    experts = [base + 1e-30 * torch.randn(6), base + 1e-30 * torch.randn(6)]
    assert torch.isfinite(run(base, experts)).all()


# ---------------------------------------------------------------- filter_wise


def test_filter_wise_rows_get_their_own_ratio():
    # row 0: τ orthogonal → base row; row 1: τ identical → expert row
    base = torch.zeros(2, 3)
    e1 = torch.stack([X, X])
    e2 = torch.stack([Y, X])
    out = run(base, [e1, e2], filter_wise=True)
    torch.testing.assert_close(out, torch.stack([Z3, X]))
    # per tensor instead: flattened cos = 1/2 → t = 2/3 everywhere
    torch.testing.assert_close(run(base, [e1, e2]), (2 / 3) * (e1 + e2) / 2)


def test_filter_wise_on_vector_equals_per_tensor():
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(10, generator=gen)
    experts = [base + torch.randn(10, generator=gen) for _ in range(3)]
    torch.testing.assert_close(run(base, experts, filter_wise=True), run(base, experts))


# ---------------------------------------------------------------- random tensors vs reference


@pytest.mark.parametrize("shape", [(11,), (4, 5), (2, 3, 4), ()])
@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_matches_reference(shape, n, filter_wise):
    gen = torch.Generator().manual_seed(hash((shape, n, filter_wise)) % 2**31)
    base = torch.randn(shape, generator=gen)
    shared = torch.randn(shape, generator=gen)  # a common direction: positive cosines
    experts = [base + shared + 0.8 * torch.randn(shape, generator=gen) for _ in range(n)]
    out = run(base, experts, filter_wise=filter_wise)
    assert out.shape == base.shape and out.dtype == base.dtype
    ref = reference_model_stock(base.numpy(), [e.numpy() for e in experts], filter_wise)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clamp_cos", [False, True])
def test_matches_reference_with_options(clamp_cos):
    gen = torch.Generator().manual_seed(11)
    base = torch.randn(6, 5, generator=gen)
    experts = [base + torch.randn(6, 5, generator=gen) for _ in range(3)]
    out = run(base, experts, filter_wise=True, clamp_cos=clamp_cos, norm_product_floor=1e-6)
    ref = reference_model_stock(base.numpy(), [e.numpy() for e in experts], True, 1e-6, clamp_cos)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5)


def test_inputs_untouched():
    base = torch.randn(3, 4)
    experts = [torch.randn(3, 4) for _ in range(2)]
    copies = [x.clone() for x in [base, *experts]]
    run(base, experts, filter_wise=True)
    assert all(torch.equal(x, y) for x, y in zip([base, *experts], copies))


# ---------------------------------------------------------------- parameters and registry


def test_defaults_and_validation():
    p = ModelStockParams()
    assert p.filter_wise is False and p.norm_product_floor == 0.0 and p.clamp_cos is False
    with pytest.raises(ValidationError):
        ModelStockParams.model_validate({"filter_wise": True, "t": 0.5})
    with pytest.raises(ValidationError):
        ModelStockParams(norm_product_floor=-1e-6)
    with pytest.raises(ValidationError):
        ModelStockParams(norm_product_floor=float("nan"))
    with pytest.raises(ValidationError):
        ModelStockParams.model_validate({"filter_wise": "sometimes"})


def test_registration_and_expert_count():
    assert MODEL_STOCK.name == "model_stock"
    assert MODEL_STOCK.base == "required"
    assert MODEL_STOCK.min_experts == 2 and MODEL_STOCK.max_experts is None
    assert "2403.19522" in MODEL_STOCK.paper
    with pytest.raises(ValueError):
        run(torch.zeros(2), [torch.ones(2)])


# ---------------------------------------------------------------- live parity with mergekit

_MK_SCRIPT = r"""
import json, sys, torch
from mergekit.merge_methods.api import merge_tensors
cases = torch.load(sys.argv[1])
out = [merge_tensors([c["base"], *c["experts"]], "model_stock",
                     parameters={"filter_wise": c["filter_wise"]}, base_index=0).tolist()
       for c in cases]
print(json.dumps(out))
"""


@pytest.mark.slow
@needs_mergekit
def test_parity_with_mergekit(tmp_path):
    gen = torch.Generator().manual_seed(3)
    cases = []
    for shape in [(12,), (4, 6), (2, 3, 4)]:
        for n in (2, 3):
            for fw in (False, True):
                base = torch.randn(shape, generator=gen)
                shared = torch.randn(shape, generator=gen)
                experts = [base + shared + torch.randn(shape, generator=gen) for _ in range(n)]
                cases.append({"base": base, "experts": experts, "filter_wise": fw, "floor": 0.0})
    # small task vectors: only the mergekit-compatible floor matches here
    base = torch.randn(16, generator=gen)
    small = [base + 1e-4 * torch.randn(16, generator=gen) for _ in range(2)]
    cases.append({"base": base, "experts": small, "filter_wise": False, "floor": 1e-6})
    expected = run_mergekit(_MK_SCRIPT, cases, tmp_path)
    for c, exp in zip(cases, expected):
        out = run(c["base"], c["experts"], filter_wise=c["filter_wise"], norm_product_floor=c["floor"])
        torch.testing.assert_close(out, torch.tensor(exp), rtol=1e-5, atol=1e-6)
    # and the default (exact cosine) departs from mergekit on the small case
    c = cases[-1]
    assert not torch.allclose(run(c["base"], c["experts"]), torch.tensor(expected[-1]), atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
def test_blockwise_products_equal_the_reference(filter_wise, monkeypatch):
    """Dot products and norms accumulated block by block (several row or column blocks, uneven
    last block) give the paper formula's result."""
    import mergelab.methods.kernels.chunks as sp

    g = torch.Generator().manual_seed(2)
    base = torch.randn(37, 53, generator=g)
    experts = [base + torch.randn(37, 53, generator=g) * s for s in (0.1, 0.2)]
    experts.append(base + 0.5 * (experts[0] - base) + torch.randn(37, 53, generator=g) * 0.01)
    monkeypatch.setattr(sp, "CHUNK", 100)
    got = run(base, experts, filter_wise=filter_wise)
    want = torch.from_numpy(reference_model_stock(base, experts, filter_wise=filter_wise)).float()
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
