"""AdaMerging: entropy goes down, coefficients stay in [0, 1], one per (task, tensor) layer-wise,
the model is reparametrised functionally (never modified), and the merge applies the λ."""

from __future__ import annotations

import torch
from torch import nn

import mergelab
from mergelab.informed import AdaTask, entropy, learn_coefficients


class _Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, inputs_embeds):
        return self.fc2(torch.relu(self.fc1(inputs_embeds)))


def _toy(seed=0):
    torch.manual_seed(seed)
    base = _Enc()
    theta0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    tvs, tasks = [], []
    for t in range(2):
        g = torch.Generator().manual_seed(100 + t)
        tvs.append({n: 0.5 * torch.randn(v.shape, generator=g) for n, v in theta0.items()})
        head = nn.Linear(8, 4)
        with torch.no_grad():
            head.weight.copy_(torch.randn(4, 8, generator=g) * 2)
        head.requires_grad_(False)
        xs = [{"inputs_embeds": torch.randn(8, 6, generator=g)} for _ in range(3)]
        tasks.append(AdaTask(xs, lambda m, b, h=head: h(m(b["inputs_embeds"])), f"t{t}"))
    return base, theta0, tvs, tasks


def test_entropy_decreases_and_coefficients_stay_in_range():
    base, theta0, tvs, tasks = _toy()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    res = learn_coefficients(base, theta0, tvs, tasks, granularity="layer", steps=20, lr=0.1)
    assert res.final_entropy < res.initial_entropy - 1e-3
    assert res.history[-1] < res.history[0]
    assert res.lambdas.shape == (4, 2)  # one per (tensor, task): fc1.weight, fc1.bias, fc2.weight, fc2.bias
    assert res.names == list(theta0)
    assert bool(((res.lambdas >= 0) & (res.lambdas <= 1)).all())
    for n, p in base.named_parameters():  # functional_call: the module itself is never written
        assert torch.equal(p, before[n])
        assert p.requires_grad


def test_clamp_holds_under_a_large_learning_rate_and_task_wise_has_one_per_task():
    base, theta0, tvs, tasks = _toy(seed=1)
    res = learn_coefficients(base, theta0, tvs, tasks, granularity="task", steps=15, lr=5.0, init=0.3)
    assert res.lambdas.shape == (2,)
    assert bool(((res.lambdas >= 0) & (res.lambdas <= 1)).all())
    assert bool(((res.lambdas == 0) | (res.lambdas == 1)).any())  # pushed to a bound and held there


def test_zero_steps_keep_the_initial_coefficient():
    base, theta0, tvs, tasks = _toy(seed=2)
    res = learn_coefficients(base, theta0, tvs, tasks, granularity="task", steps=0, init=0.3)
    assert torch.allclose(res.lambdas, torch.full((2,), 0.3))
    assert res.initial_entropy == res.final_entropy


def test_entropy_of_token_logits_uses_real_positions_only():
    logits = torch.zeros(1, 3, 5)
    logits[0, 2] = torch.tensor([50.0, 0, 0, 0, 0])  # a confident (zero-entropy) padding position
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(entropy(logits, mask), torch.log(torch.tensor(5.0)))
    assert entropy(logits) < torch.log(torch.tensor(5.0))


def test_the_merge_applies_the_learned_coefficients_per_tensor():
    b = {"w": torch.zeros(3), "v": torch.ones(2)}
    e1 = {"w": torch.tensor([1.0, 2.0, 3.0]), "v": torch.tensor([2.0, 2.0])}
    e2 = {"w": torch.tensor([-1.0, 0.0, 1.0]), "v": torch.tensor([0.0, 1.0])}
    lam = [
        {"w::lambda": torch.tensor(0.5), "v::lambda": torch.tensor(1.0)},
        {"w::lambda": torch.tensor(0.25), "v::lambda": torch.tensor(0.0)},
    ]
    out = mergelab.merge_state_dicts("adamerging", [e1, e2], b, statistics=lam)
    assert torch.allclose(out["w"], 0.5 * e1["w"] + 0.25 * e2["w"])
    assert torch.allclose(out["v"], e1["v"])
