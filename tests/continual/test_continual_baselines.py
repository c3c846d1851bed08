"""The sequential baselines: equal to the static merges where the maths says so, TIES against a hand reference."""

from __future__ import annotations

import pytest
import torch

from mergelab.api import merge_state_dicts
from mergelab.continual import ContinualMerge


def family(n: int = 4, seed: int = 0) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    base = {
        "layers.0.attn.q.weight": torch.randn(5, 4, generator=gen),
        "layers.0.attn.q.bias": torch.randn(5, generator=gen),
        "embed_tokens.weight": torch.randn(6, 4, generator=gen),
        "position_ids": torch.arange(6),
    }
    experts = []
    for _ in range(n):
        noisy = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in base.items() if v.is_floating_point()}
        experts.append({**base, **noisy})
    return base, experts


def sequential(method: str, base, experts, params=None) -> dict[str, torch.Tensor]:
    cm = ContinualMerge.init(base, method=method, params=params)
    for i, e in enumerate(experts):
        cm.add(e, name=f"expert {i}")
    return cm.state_dict()


def assert_same(got, want, tol=1e-6):
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=k)


def test_running_average_equals_the_static_average():
    base, experts = family()
    assert_same(sequential("average", base, experts), merge_state_dicts("linear", experts))


@pytest.mark.parametrize("lam", [0.3, 1.0])
def test_sequential_task_arithmetic_equals_the_static_one(lam):
    base, experts = family()
    want = merge_state_dicts("task_arithmetic", experts, base, parameters={"lambda": lam})
    assert_same(sequential("task_arithmetic", base, experts, {"lambda": lam}), want)


def test_sequential_magmax_equals_the_static_one_ties_included():
    base, experts = family(3)
    # an exact magnitude tie: the later expert wins in both
    experts[1]["layers.0.attn.q.bias"][0] = base["layers.0.attn.q.bias"][0] + 0.5
    experts[2]["layers.0.attn.q.bias"][0] = base["layers.0.attn.q.bias"][0] - 0.5
    want = merge_state_dicts("magmax", experts, base)
    got = sequential("magmax", base, experts)
    assert_same(got, want)
    assert float(got["layers.0.attn.q.bias"][0] - base["layers.0.attn.q.bias"][0]) == pytest.approx(-0.25)


def reference_ties_pair(a: torch.Tensor, b: torch.Tensor, density: float, merge: str) -> torch.Tensor:
    """The original TIES code on the pair, per tensor: keep ⌊K·n⌋ + 1 magnitudes (the (n − ⌊K·n⌋)-th smallest
    and above), sign of the sum (exact zeros: the majority sign), sum (or mean) of the agreeing entries."""
    rows = torch.stack([a.reshape(-1), b.reshape(-1)])
    n = rows.shape[1]
    k = n - int(n * density)
    kth = rows.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = rows * (rows.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign > 0, trimmed > 0, trimmed < 0)
    total = (trimmed * agree).sum(0)
    if merge == "mean":
        total = total / agree.sum(0).clamp(min=1)
    return total.reshape(a.shape)


@pytest.mark.parametrize("merge", ["sum", "mean"])
def test_sequential_ties_follows_the_reference_update(merge):
    base, experts = family(3, seed=5)
    lam, density = 0.5, 0.3
    floats = [k for k, v in base.items() if v.is_floating_point()]
    merged = {k: lam * (experts[0][k] - base[k]) for k in floats}
    for e in experts[1:]:
        for k in floats:
            merged[k] = merged[k] + lam * reference_ties_pair(merged[k], e[k] - base[k], density, merge)
    got = sequential("ties", base, experts, {"lambda": lam, "density": density, "merge": merge})
    for k in floats:
        torch.testing.assert_close(got[k], base[k] + merged[k], rtol=1e-6, atol=1e-6, msg=k)
    assert torch.equal(got["position_ids"], base["position_ids"])


def test_unknown_parameters_and_methods_are_refused_in_one_line():
    from mergelab.errors import ParameterError, RecipeError

    base, _ = family(1)
    with pytest.raises(ParameterError, match=r"continual opcm: alhpa: .*parameters: exclude, alpha, diagonal"):
        ContinualMerge.init(base, method="opcm", params={"alhpa": 0.5})
    with pytest.raises(ParameterError, match="alpha"):
        ContinualMerge.init(base, method="opcm", params={"alpha": 2.0})
    with pytest.raises(RecipeError, match="did you mean opcm"):
        ContinualMerge.init(base, method="opcmm")
