"""DOP against a straightforward autograd implementation of the reference's per-layer loop, written here."""

from __future__ import annotations

import pytest
import torch

from mergelab.continual import ContinualMerge
from mergelab.continual.dop import DopParams, min_norm_weights, optimise_layer, projection_loss, svd_basis

F64 = torch.float64


def reference_basis(tau: torch.Tensor, eps: float):
    u, s, vh = torch.linalg.svd(tau, full_matrices=True)
    r = int(torch.searchsorted(s.cumsum(0) / s.sum(), eps))
    return u[:, :r], s[:r], vh.T[:, :r]


def reference_weight(v11: float, v12: float, v22: float) -> float:
    """γ on the first gradient: the unconstrained minimiser, with the solver's 0.999 / 0.001 at the ends."""
    denom = v11 + v22 - 2 * v12
    gamma = (v22 - v12) / denom if denom > 0 else 1.0
    return 0.999 if gamma >= 1 else 0.001 if gamma <= 0 else gamma


def reference_dop_layer(w0, w_merged, w_new, *, lr, steps, alpha, beta, eps, mgda=True, ema=True, space="uv"):
    """The reference's ``_optimize_weight`` in weight space (``out × in``), with autograd and torch's Adam."""
    members = [(w, reference_basis(w - w0, eps)) for w in (w_merged, w_new)]

    def loss_of(w, member):
        target, (u, s, v) = member
        d = w - target
        left = torch.linalg.matrix_norm(torch.diag(s) @ u.T @ d) ** 2
        right = torch.linalg.matrix_norm(d @ v @ torch.diag(s)) ** 2
        return {"uv": left + right, "u": left, "v": right}[space]

    weight = torch.nn.Parameter((w_merged + w_new) / 2)
    opt = torch.optim.Adam([weight], lr=lr)
    sol = [alpha, 1 - alpha]
    for _ in range(steps):
        if mgda:
            grads, losses = [], []
            for m in members:
                loss = loss_of(weight, m)
                opt.zero_grad()
                loss.backward()
                grads.append(weight.grad.clone() / float(loss.detach()))
                losses.append(float(loss.detach()))
            dots = [float((grads[i] * grads[j]).sum()) for i, j in ((0, 0), (0, 1), (1, 1))]
            gamma = reference_weight(*dots)
            new = [gamma, 1 - gamma]
            sol = [beta * sol[i] + (1 - beta) * new[i] for i in range(2)] if ema else new
        total = sum(sol[i] * loss_of(weight, members[i]) for i in range(2))
        opt.zero_grad()
        total.backward()
        opt.step()
    return weight.detach()


def layer(shape, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    w0 = torch.randn(shape, generator=gen, dtype=F64)
    w1 = w0 + scale * torch.randn(shape, generator=gen, dtype=F64)
    return w0, w1, w0 + scale * torch.randn(shape, generator=gen, dtype=F64)


@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (3, 8)])
@pytest.mark.parametrize("mgda,ema", [(True, True), (True, False), (False, False)])
def test_dop_layer_equals_the_reference_loop(shape, mgda, ema):
    w0, wm, wn = layer(shape, sum(shape))
    params = DopParams(lr=1e-3, num_steps=60, mgda=mgda, ema=ema, ema_beta=0.9)
    got = optimise_layer(wm - w0, wn - w0, params)
    want = reference_dop_layer(w0, wm, wn, lr=1e-3, steps=60, alpha=0.8, beta=0.9, eps=0.99999, mgda=mgda, ema=ema)
    torch.testing.assert_close(w0 + got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("shape", [(8, 8), (12, 5), (5, 12)])
def test_dop_loss_decreases_per_layer(shape):
    """With the reference defaults (MGDA, EMA from (0.8, 0.2)), each layer's weighted loss goes down."""
    w0, wm, wn = layer(shape, 7 * shape[0] + shape[1])
    trace: list[tuple[float, float]] = []
    optimise_layer((wm - w0).float(), (wn - w0).float(), DopParams(), trace)  # lr 1e-4, 200 steps
    weighted = [0.8 * a + 0.2 * b for a, b in trace]
    assert len(trace) == 201
    assert weighted[-1] < 0.7 * weighted[0]
    assert all(b < a for a, b in zip(weighted[::20], weighted[20::20]))
    assert trace[-1][0] < trace[0][0]  # the old merge's loss (weight ~0.8) goes down; the new expert's may rise


def test_projection_loss_gradient_equals_autograd():
    gen = torch.Generator().manual_seed(2)
    tau = torch.randn(7, 5, generator=gen, dtype=F64)
    d = torch.randn(7, 5, generator=gen, dtype=F64, requires_grad=True)
    for space in ("uv", "u", "v"):
        basis = svd_basis(tau, 0.99)
        u, s, v = basis
        want = (torch.diag(s) @ u.T @ d).pow(2).sum() * (space != "v") + (d @ v @ torch.diag(s)).pow(2).sum() * (
            space != "u"
        )
        (grad,) = torch.autograd.grad(want, d)
        loss, got = projection_loss(d.detach(), basis, space)  # type: ignore[arg-type]
        assert loss == pytest.approx(float(want.detach()), rel=1e-12)
        torch.testing.assert_close(got, grad)


def test_svd_basis_keeps_the_components_below_epsilon():
    tau = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64))  # cumulative ratios 0.4, 0.7, 0.9, 1.0
    assert svd_basis(tau, 0.7)[1].tolist() == [4.0]  # searchsorted (left): the first ratio ≥ ε is excluded
    assert svd_basis(tau, 0.75)[1].tolist() == [4.0, 3.0]
    assert svd_basis(tau, 0.99999)[1].numel() == 3
    assert svd_basis(torch.zeros(3, 3, dtype=F64), 0.99999)[1].numel() == 0


def test_min_norm_weights_against_a_grid_search():
    gen = torch.Generator().manual_seed(4)
    for _ in range(20):
        g1 = torch.randn(10, generator=gen, dtype=F64)
        g2 = torch.randn(10, generator=gen, dtype=F64) + 0.5 * g1
        gamma, rest = min_norm_weights(g1, g2)
        assert gamma + rest == pytest.approx(1.0)
        grid = torch.linspace(0, 1, 100001, dtype=F64)
        norms = ((grid[:, None] * g1 + (1 - grid[:, None]) * g2) ** 2).sum(1)
        best = float(grid[int(norms.argmin())])
        if 0.001 < best < 0.999:
            assert gamma == pytest.approx(best, abs=2e-5)
        else:
            assert gamma == (0.999 if best > 0.5 else 0.001)


def test_dop_averages_the_other_tensors_pairwise_so_later_experts_weigh_more():
    """After T experts the k-th has weight 2^−(T−k+1) (the first 2^−(T−1)) in non-linear tensors."""
    gen = torch.Generator().manual_seed(0)
    base = {"h.0.mlp.weight": torch.randn(4, 4, generator=gen), "h.0.mlp.bias": torch.randn(4, generator=gen)}
    taus = [torch.randn(4, generator=gen) for _ in range(4)]
    cm = ContinualMerge.init(base, method="dop", params={"num_steps": 2})
    for i, tau in enumerate(taus):
        e = {k: v + 0.01 * (i + 1) for k, v in base.items()}
        e["h.0.mlp.bias"] = base["h.0.mlp.bias"] + tau
        cm.add(e)
    want = base["h.0.mlp.bias"] + taus[0] / 8 + taus[1] / 8 + taus[2] / 4 + taus[3] / 2
    torch.testing.assert_close(cm.state_dict()["h.0.mlp.bias"], want, rtol=1e-6, atol=1e-6)


def test_dop_first_step_keeps_the_first_expert_and_second_step_optimises_linear_layers():
    gen = torch.Generator().manual_seed(1)
    base = {"h.0.q.weight": torch.randn(5, 5, generator=gen), "h.0.ln.weight": torch.randn(5, generator=gen)}
    e1 = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    e2 = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    params = {"num_steps": 30, "lr": 1e-3}
    cm = ContinualMerge.init(base, method="dop", params=params)
    cm.add(e1)
    torch.testing.assert_close(cm.state_dict()["h.0.q.weight"], e1["h.0.q.weight"])
    cm.add(e2)
    k = "h.0.q.weight"
    want = reference_dop_layer(
        base[k].double(), e1[k].double(), e2[k].double(), lr=1e-3, steps=30, alpha=0.8, beta=0.999, eps=0.99999
    )
    torch.testing.assert_close(cm.state_dict()[k], want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("space", ["u", "v", "uv"])
def test_dop_optimises_gpt2_conv1d_weights_as_out_by_in_matrices(tmp_path, space):
    """GPT-2 stores its Conv1D weights in × out; DOP's one-sided losses are defined on the out × in matrix."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=16, n_embd=4, n_layer=1, n_head=2, n_positions=8)).save_pretrained(
        str(tmp_path / "base")
    )
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    gen = torch.Generator().manual_seed(5)
    e1, e2 = (
        {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v for k, v in base.items()}
        for _ in range(2)
    )
    cm = ContinualMerge.init(
        str(tmp_path / "base"), method="dop", params={"num_steps": 30, "lr": 1e-3, "svd_proj_space": space}
    )
    cm.add(e1)
    cm.add(e2)
    merged = cm.state_dict()
    k = next(n for n in base if n.endswith("mlp.c_fc.weight"))
    assert tuple(base[k].shape) == (4, 16)  # in × out
    w0, w1, w2 = (x[k].double().T for x in (base, e1, e2))
    want = reference_dop_layer(w0, w1, w2, lr=1e-3, steps=30, alpha=0.8, beta=0.999, eps=0.99999, space=space).T
    torch.testing.assert_close(merged[k], want.float(), rtol=1e-5, atol=1e-5)
