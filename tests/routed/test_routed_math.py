"""Routed layers and the methods' tensor functions against independent references (no files).

Activation-space mixing (``y = W* x + Σₜ wₜ Bₜ(Aₜ x)``) must equal running the layer with the
merged weight ``W* + Σₜ wₜ ΔWₜ``, row by row (and token by token), for every layer kind; SMILE's
gate, WEMoE's gate initialisation, Twin-Merging's rank rule and Split-Merge's split are checked
against formulas written here with numpy or plain loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from mergelab.lora.factors import LoraFactors
from mergelab.routed.adapters import ExpertDelta
from mergelab.routed.layers import RoutedAffine, RoutedEmbedding, RoutedLinear, RouteState, SmileGate, WemoeGate
from mergelab.routed.router import mixing_weights
from mergelab.routed.split_merge import compress_complement, split, topk_mask
from mergelab.routed.twin import compress, twin_rank
from mergelab.routed.wemoe import entropy, identity_factors

D = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _deltas(out_f: int, in_f: int, ranks: list[int | None], seed: int, bias: bool = True) -> list[ExpertDelta | None]:
    g = _gen(seed)
    out: list[ExpertDelta | None] = []
    for r in ranks:
        if r is None:
            out.append(None)
            continue
        d = ExpertDelta()
        if r > 0:
            d.lora = LoraFactors(
                torch.randn(r, in_f, generator=g, dtype=D), torch.randn(out_f, r, generator=g, dtype=D), 1.0
            )
        else:
            d.dense["weight"] = torch.randn(out_f, in_f, generator=g, dtype=D)
        if bias:
            d.dense["bias"] = torch.randn(out_f, generator=g, dtype=D)
        out.append(d)
    return out


def _delta_w(d: ExpertDelta | None, out_f: int, in_f: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.zeros(out_f, in_f, dtype=D)
    b = torch.zeros(out_f, dtype=D)
    if d is None:
        return w, b
    if d.lora is not None:
        w = w + d.lora.B @ d.lora.A
    if "weight" in d.dense:
        w = w + d.dense["weight"]
    if "bias" in d.dense:
        b = b + d.dense["bias"]
    return w, b


@pytest.mark.parametrize("per_token", [False, True])
def test_routed_linear_equals_the_weight_space_merge_row_by_row(per_token):
    torch.manual_seed(0)
    base = nn.Linear(6, 5).to(D)
    deltas = _deltas(5, 6, [2, 0, None, 3], seed=1)  # LoRA, dense, nothing, LoRA
    state = RouteState()
    layer = RoutedLinear(base, deltas, state)
    x = torch.randn(3, 4, 6, generator=_gen(2), dtype=D)
    w = torch.rand(3, 4, 4, generator=_gen(3), dtype=D) if per_token else torch.rand(3, 4, generator=_gen(3), dtype=D)
    state.weights = w
    got = layer(x)
    for i in range(3):
        for s in range(4):
            wi = w[i, s] if per_token else w[i]
            merged_w, merged_b = base.weight.detach().clone(), base.bias.detach().clone()
            for t, d in enumerate(deltas):
                dw, db = _delta_w(d, 5, 6)
                merged_w += wi[t] * dw
                merged_b += wi[t] * db
            want = F.linear(x[i, s], merged_w, merged_b)
            assert torch.allclose(got[i, s], want, atol=1e-12, rtol=0)
    state.active = False  # the router's own pass: the shared layer alone
    assert torch.equal(layer(x), base(x))


def test_routed_conv1d_uses_the_transposed_layout():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(5, 6).to(D)  # weight [in=6, out=5]
    deltas = _deltas(5, 6, [2, 0], seed=4)
    state = RouteState(weights=torch.tensor([[0.3, 0.7], [1.0, 0.0]], dtype=D))
    layer = RoutedLinear(base, [ExpertDelta(d.lora, {"weight": d.dense["weight"].T} if "weight" in d.dense else {})
                                if d else None for d in deltas], state, transposed=True)  # fmt: skip
    x = torch.randn(2, 3, 6, generator=_gen(5), dtype=D)
    got = layer(x)
    for i in range(2):
        merged = base.weight.detach().T.clone()  # out × in
        for t, d in enumerate(deltas):
            merged += (
                state.weights[i, t]
                * _delta_w(ExpertDelta(d.lora, {k: v for k, v in d.dense.items() if k == "weight"}), 5, 6)[0]
            )
        want = x[i] @ merged.T + base.bias.detach()
        assert torch.allclose(got[i], want, atol=1e-12, rtol=0)


def test_routed_embedding_equals_the_merged_table():
    torch.manual_seed(0)
    base = nn.Embedding(11, 4).to(D)
    g = _gen(6)
    d0 = ExpertDelta(
        LoraFactors(torch.randn(2, 11, generator=g, dtype=D), torch.randn(4, 2, generator=g, dtype=D), 1.0, True)
    )
    d1 = ExpertDelta(dense={"weight": torch.randn(11, 4, generator=g, dtype=D)})
    state = RouteState(weights=torch.tensor([[0.25, 0.5], [0.0, 1.0]], dtype=D))
    layer = RoutedEmbedding(base, [d0, d1], state)
    ids = torch.tensor([[1, 5, 10], [0, 3, 3]])
    got = layer(ids)
    for i in range(2):
        assert d0.lora is not None
        table = (
            base.weight.detach()
            + state.weights[i, 0] * (d0.lora.B @ d0.lora.A).T
            + state.weights[i, 1] * d1.dense["weight"]
        )
        assert torch.allclose(got[i], table[ids[i]], atol=1e-12, rtol=0)


def test_routed_layernorm_equals_the_merged_parameters():
    torch.manual_seed(0)
    base = nn.LayerNorm(5).to(D)
    g = _gen(7)
    w0, b0, w1 = (torch.randn(5, generator=g, dtype=D) for _ in range(3))
    deltas = [ExpertDelta(dense={"weight": w0, "bias": b0}), ExpertDelta(dense={"weight": w1})]
    state = RouteState(weights=torch.tensor([[0.2, 0.9], [1.0, 0.0]], dtype=D))
    layer = RoutedAffine(base, deltas, state)
    x = torch.randn(2, 3, 5, generator=_gen(8), dtype=D)
    got = layer(x)
    for i in range(2):
        w = base.weight.detach() + sum(state.weights[i, t] * d.dense["weight"] for t, d in enumerate(deltas))
        b = base.bias.detach() + state.weights[i, 0] * deltas[0].dense["bias"]
        assert torch.allclose(got[i], F.layer_norm(x[i], (5,), w, b, base.eps), atol=1e-12, rtol=0)


def test_smile_gate_against_a_loop_per_token():
    g = _gen(9)
    gates = torch.randn(3, 2, 6, generator=g, dtype=D)
    x = torch.randn(2, 4, 6, generator=g, dtype=D)
    for top_k in (1, 2, 3):
        got = SmileGate(gates, top_k)(x)
        for i in range(2):
            for s in range(4):
                xv = x[i, s].numpy()
                logits = np.array([np.linalg.norm(gates[t].numpy() @ xv) for t in range(3)])
                p = np.exp(logits - logits.max())
                p /= p.sum()
                keep = np.argsort(-p, kind="stable")[:top_k]
                want = np.zeros(3)
                want[keep] = p[keep] / p[keep].sum()
                assert np.allclose(got[i, s].numpy(), want, atol=1e-12)
    assert torch.equal(SmileGate(gates[:1], 1)(x), torch.ones(2, 4, 1, dtype=D))


def test_wemoe_gate_starts_at_init_lambda_and_averages_real_tokens():
    gate = WemoeGate(8, 3, depth=2, init_lambda=0.3)
    gate.init_weights(_gen(1))
    assert torch.equal(gate.fc2.bias.detach(), torch.full((3,), 0.3))
    assert torch.equal(gate.fc1.bias.detach(), torch.zeros(8))
    x = torch.randn(2, 5, 8, generator=_gen(2))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = gate(x, mask)
    per_token = gate.fc2(F.relu(gate.fc1(x)))
    assert torch.allclose(out[0], per_token[0, :3].mean(0), atol=1e-6)
    assert torch.allclose(out[1], per_token[1].mean(0), atol=1e-6)
    assert torch.allclose(out, torch.full_like(out, 0.3), atol=0.05)  # weights N(0, 0.01): close to λ0


def test_mixing_weights():
    z = torch.tensor([[1.0, 2.0, 0.0]])
    assert torch.allclose(mixing_weights(z, "softmax"), torch.softmax(z, -1))
    assert torch.equal(mixing_weights(z, "top1"), torch.tensor([[0.0, 1.0, 0.0]]))
    top2 = mixing_weights(z, "topk", top_k=2)
    p = torch.softmax(z, -1)[0]
    assert torch.allclose(top2, torch.tensor([[p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0.0]]))
    assert torch.allclose(mixing_weights(z, "softmax", temperature=2.0), torch.softmax(z / 2, -1))
    with pytest.raises(ValueError, match="top_k"):
        mixing_weights(z, "topk")  # was softmax, silently
    with pytest.raises(ValueError, match="unknown mixing"):
        mixing_weights(z, "top-1")


def test_router_settings_refuse_topk_without_top_k_in_one_line():
    from mergelab.errors import RecipeError
    from mergelab.recipe import load_recipe
    from mergelab.routed.settings import RouterSettings

    rec = {"merge_method": "twin_merging", "base_model": "b", "models": [{"model": "a"}]}
    with pytest.raises(RecipeError, match="mixing: topk needs top_k") as err:
        load_recipe({**rec, "router": {"mixing": "topk"}})
    assert "\n" not in str(err.value)
    with pytest.raises(RecipeError, match="top_k is read only with mixing: topk"):
        load_recipe({**rec, "router": {"top_k": 2}})
    assert RouterSettings(mixing="topk", top_k=2).top_k == 2


def test_twin_rank_and_truncated_svd_against_numpy():
    assert twin_rank((30, 20), 0.1) == 2 and twin_rank((9, 40), 0.1) == 0 and twin_rank((16, 16), 1.0) == 16
    v = torch.randn(12, 9, generator=_gen(10), dtype=torch.float64)
    f = compress(v, 3, torch.float64)
    assert f is not None and f.rank == 3
    u, s, vh = np.linalg.svd(v.numpy(), full_matrices=False)
    want = (u[:, :3] * s[:3]) @ vh[:3]
    assert np.allclose((f.B.double() @ f.A.double()).numpy(), want, atol=1e-6)
    assert compress(v, 0) is None and compress(torch.zeros(4, 4), 2) is None
    full = compress(v, 9, torch.float64)
    assert full is not None and torch.allclose(full.B.double() @ full.A.double(), v, atol=1e-6)


def test_identity_factors_are_exact():
    for shape in ((3, 7), (7, 3)):
        d = torch.randn(*shape, generator=_gen(11))
        f = identity_factors(d)
        assert torch.equal(f.B @ f.A, d)


def test_entropy_masked_mean():
    logits = torch.tensor([[[0.0, 0.0], [5.0, -5.0]]])
    h = entropy(logits, torch.tensor([[1, 0]]))
    assert torch.allclose(h, torch.tensor(np.log(2.0), dtype=torch.float32))


# ------------------------------------------------------------------------------ Split-Merge


def _split_reference(base: np.ndarray, experts: list[np.ndarray], topk: float):
    taus = [e - base for e in experts]
    k = int(np.ceil(topk * base.size))
    masks = []
    for t in taus:
        order = np.argsort(-np.abs(t).reshape(-1), kind="stable")
        m = np.zeros(base.size, bool)
        m[order[:k]] = True
        masks.append(m.reshape(base.shape))
    common = np.zeros(base.shape, bool)
    for idx in np.ndindex(base.shape):
        sel = [t[idx] for t, m in zip(taus, masks) if m[idx]]
        common[idx] = len(sel) >= 2 and (all(v > 0 for v in sel) or all(v < 0 for v in sel))
    shared = sum(t * common for t in taus) / len(taus)
    comps = [t * (m & ~common) for t, m in zip(taus, masks)]
    return shared, comps


def test_split_against_a_numpy_reference():
    g = _gen(12)
    base = torch.randn(6, 5, generator=g, dtype=D)
    experts = [base + torch.randn(6, 5, generator=g, dtype=D) for _ in range(3)]
    shared, _, comps = split(base, experts, 0.4)
    want_shared, want_comps = _split_reference(base.numpy(), [e.numpy() for e in experts], 0.4)
    assert np.allclose(shared.numpy(), want_shared)
    for c, w in zip(comps, want_comps):
        assert np.allclose(c.numpy(), w)
    assert int(topk_mask(torch.arange(10.0), 0.25).sum()) == 3


def test_split_identical_experts_leave_no_complement():
    g = _gen(13)
    base = torch.randn(5, 4, generator=g, dtype=D)
    e = base + torch.randn(5, 4, generator=g, dtype=D)
    shared, taus, comps = split(base, [e, e.clone(), e.clone()], 0.3)
    assert all(not bool(c.any()) for c in comps)
    mask = topk_mask(taus[0], 0.3)
    assert torch.allclose(shared, taus[0] * mask)


def test_split_one_expert_full_rank_reconstructs_it():
    g = _gen(14)
    base = torch.randn(6, 4, generator=g, dtype=D)
    e = base + torch.randn(6, 4, generator=g, dtype=D)
    shared, _, comps = split(base, [e], 1.0)
    assert not bool(shared.any())  # nothing is common with one expert
    f, alpha = compress_complement(comps[0], e - (base + shared), 4, torch.float64)
    assert f is not None and abs(alpha - 1.0) < 1e-10
    assert torch.allclose(base + shared + f.B.double() @ f.A.double(), e, atol=1e-10)


def test_router_rows_default_to_the_reference_cap_after_a_hold_out():
    """The reference: up to 5,500 train rows per task after holding out 10 %; selection on 1,000 rows."""
    from mergelab.routed.data import RouterData, expert_rows
    from mergelab.routed.settings import RouterSettings

    s = RouterSettings()
    assert (s.train_examples, s.validation_examples, s.batch_size, s.epochs) == (5500, 1000, 1024, 50)
    texts = [f"row {i}" for i in range(7000)]
    (rows,) = expert_rows(["a"], ["a"], [None], [None], s, [RouterData(train=texts)])
    # ⌈5500 / 0.9⌉ = 6112 rows read: the first 5500 train, the other 612 (≥ 10 %) validate
    assert rows.train.texts == texts[:5500] and rows.validation.texts == texts[5500:6112]
    (rows,) = expert_rows(["a"], ["a"], [None], [None], RouterSettings(train_examples=45), [RouterData(train=texts)])
    assert rows.train.texts == texts[:45] and rows.validation.texts == texts[45:50]
    (rows,) = expert_rows(["a"], ["a"], [None], [None], s, [RouterData(train=texts[:30])])  # a small source
    assert rows.train.texts == texts[:27] and rows.validation.texts == texts[27:30]
    given = RouterData(train=texts, validation=[f"v{i}" for i in range(2000)])
    (rows,) = expert_rows(["a"], ["a"], [None], [None], s, [given])
    assert len(rows.train) == 5500 and len(rows.validation) == 1000


def test_router_training_counts_its_adam_steps():
    from mergelab.routed.router import train_router

    g = _gen(5)
    x, y = torch.randn(81, 4, generator=g), torch.arange(81) % 3
    res = train_router(x, y, x[:9], y[:9], 3, epochs=3, batch_size=64, seed=0)
    assert (res.steps_per_epoch, res.steps) == (2, 6)  # 64 + 17 rows
    res = train_router(x, y, x[:9], y[:9], 3, epochs=3, batch_size=1024, seed=0)
    assert (res.steps_per_epoch, res.steps) == (1, 3)
    res = train_router(x[:65], y[:65], x[:9], y[:9], 3, epochs=2, batch_size=64, seed=0)
    assert (res.steps_per_epoch, res.steps) == (1, 2)  # a last batch of one row is skipped (BatchNorm)


@pytest.mark.parametrize("per_token", [False, True])
def test_routed_linear_sparse_route_skips_the_unrouted_products(per_token: bool) -> None:
    """Top-1, partly zero and all-zero routes give the merged weight's output and cost only the routed
    pairs' dense products (a top-1 route over 4 dense experts: a quarter of the all-experts FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    base = nn.Linear(6, 5).to(D)
    deltas = _deltas(5, 6, [0, 0, 0, 0], seed=7, bias=False)  # four dense experts
    state = RouteState()
    layer = RoutedLinear(base, deltas, state)
    x = torch.randn(4, 3, 6, generator=_gen(8), dtype=D)
    if per_token:
        idx = torch.tensor([[0, 1, 2], [3, 3, 0], [1, 1, 1], [2, 0, 3]])
        w = F.one_hot(idx, 4).to(D)
        w[2, 1] = torch.tensor([0.25, 0.0, 0.75, 0.0], dtype=D)  # two experts for one token
        w[3, 2] = 0.0  # a token routed to none
    else:
        w = F.one_hot(torch.tensor([2, 0, 3, 1]), 4).to(D)
        w[1] = torch.tensor([0.5, 0.0, 0.0, 0.5], dtype=D)
    state.weights = w
    got = layer(x)
    for i in range(4):
        for s in range(3):
            wi = w[i, s] if per_token else w[i]
            merged = base.weight.detach().clone()
            for t, d in enumerate(deltas):
                merged += wi[t] * _delta_w(d, 5, 6)[0]
            assert torch.allclose(got[i, s], F.linear(x[i, s], merged, base.bias.detach()), atol=1e-12, rtol=0)

    def dense_flops(route: torch.Tensor) -> int:
        state.weights = route
        with FlopCounterMode(display=False) as fc:
            layer(x)
        return int(fc.get_total_flops()) - 2 * 4 * 3 * 6 * 5  # minus the shared layer's product

    top1 = F.one_hot(torch.tensor([2, 0, 3, 1]), 4).to(D)
    everywhere = torch.full((4, 4), 0.25, dtype=D)
    assert dense_flops(everywhere) == 4 * dense_flops(top1) == 4 * (2 * 4 * 3 * 6 * 5)
    assert dense_flops(torch.zeros(4, 4, dtype=D)) == 0


def test_routed_linear_gradient_reaches_a_zero_weight() -> None:
    """A route that requires a gradient (WEMoE's gates) keeps every product: a zero weight gets ∂y/∂w."""
    base = nn.Linear(6, 5).to(D)
    deltas = _deltas(5, 6, [0, 0], seed=9, bias=False)
    state = RouteState()
    layer = RoutedLinear(base, deltas, state)
    x = torch.randn(2, 6, generator=_gen(10), dtype=D)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=D, requires_grad=True)
    state.weights = w
    layer(x).sum().backward()
    assert w.grad is not None
    for t, d in enumerate(deltas):
        want = (x @ _delta_w(d, 5, 6)[0].T).sum(dim=-1)  # ∂ Σ y / ∂ w[:, t]
        assert torch.allclose(w.grad[:, t], want, atol=1e-12, rtol=0)
