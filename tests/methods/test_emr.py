"""EMR-merging: a hand-worked case (elect, masks, rescalers, both sign rules), one task gives
the expert back, the rescaler gather pass against a naive implementation (both rescaler rules)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mergelab.methods.base import MethodOutput, TensorContext
from mergelab.methods.emr import PASS_RESCALE, elect
from mergelab.methods.registry import get_method
from mergelab.routed import reconstruct

EMR = get_method("emr")
T = torch.tensor

# τ1 = [ 1, -2, 0,    3,  1]     Σ = [2, -4, 0.5, 3, 0] -> γ = [+, -, +, +, -] (0 -> −1)
# τ2 = [ 2,  1, 0,   -1, -1]     M1 = [1, 1, 0, 1, 0]   M2 = [1, 0, 0, 0, 1]   M3 = [0, 1, 1, 1, 0]
# τ3 = [-1, -3, 0.5,  1,  0]     τ_uni = [2, -3, 0.5, 3, -1]
# rescalers (one tensor of 5): λ1 = (7/5)/(8/5) = 7/8, λ2 = (5/5)/(3/5) = 5/3, λ3 = (5.5/5)/(6.5/5) = 11/13
# sign_zero: zero -> γ4 = 0, τ_uni4 = 0, no mask at 4: M2 = [1, 0, 0, 0, 0], λ2 = 1/(2/5) = 5/2
TAU = [T([1.0, -2.0, 0.0, 3.0, 1.0]), T([2.0, 1.0, 0.0, -1.0, -1.0]), T([-1.0, -3.0, 0.5, 1.0, 0.0])]
BASE = T([0.5, 0.25, -0.5, 1.0, 2.0])
EXPERTS = [BASE + t for t in TAU]


def gather(tensors: list[tuple[torch.Tensor, list[torch.Tensor]]], **glob) -> list[float]:
    """Run the rescaler pass as the engine does: init, update per tensor, finish."""
    params = EMR.params.model_validate(glob)
    (gp,) = EMR.passes(params)
    state = gp.init(params, len(tensors[0][1]))
    for i, (b, ex) in enumerate(tensors):
        gp.update(state, b, ex, params, [EMR.model_params()] * len(ex), TensorContext(name=f"t{i}"))
    return gp.finish(state, params, len(tensors[0][1]))


def run(base, experts, **glob) -> MethodOutput:
    params = EMR.params.model_validate(glob)
    scales = gather([(base, experts)], **glob)
    ctx = TensorContext(name="w", folds={PASS_RESCALE: scales})
    return EMR(base, experts, params, [EMR.model_params()] * len(experts), ctx)


def test_hand_worked_case():
    out = run(BASE, EXPERTS)
    assert torch.allclose(out.merged, BASE + T([2.0, -3.0, 0.5, 3.0, -1.0]))
    masks = [[1, 1, 0, 1, 0], [1, 0, 0, 0, 1], [0, 1, 1, 1, 0]]
    assert [m.tolist() for m in out.parts["mask"]] == [[bool(x) for x in m] for m in masks]
    assert out.parts["scale"] == pytest.approx([7 / 8, 5 / 3, 11 / 13])
    # the task models: θ0 + λ_t M_t ⊙ τ_uni
    t1 = reconstruct(out.merged, BASE, out.parts["mask"][0], out.parts["scale"][0])
    assert torch.allclose(t1, BASE + 7 / 8 * T([2.0, -3.0, 0.0, 3.0, 0.0]))


def test_sign_zero_rule():
    out = run(BASE, EXPERTS, sign_zero="zero")
    assert torch.allclose(out.merged, BASE + T([2.0, -3.0, 0.5, 3.0, 0.0]))
    assert out.parts["mask"][1].tolist() == [True, False, False, False, False]
    assert out.parts["scale"] == pytest.approx([7 / 8, 5 / 2, 11 / 13])


def test_one_task_reconstructs_the_expert_exactly():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(7, 9, generator=g)
    tau = torch.randn(7, 9, generator=g).masked_fill_(torch.rand(7, 9, generator=g) < 0.3, 0.0)
    out = run(base, [base + tau])
    (mask,) = out.parts["mask"]
    assert torch.equal(mask, tau != 0)
    assert out.parts["scale"] == [1.0]
    rebuilt = reconstruct(out.merged, base, mask, 1.0)
    assert torch.allclose(rebuilt, base + tau, atol=1e-6)


def naive_emr(tensors, rescaler):
    """Straight from the formulas, per element, for several tensors of task vectors."""
    n_tasks = len(tensors[0])
    num, den = [0.0] * n_tasks, [0.0] * n_tasks
    unified, masks = [], []
    for taus in tensors:
        size = len(taus[0])
        tu, ms = [], [[] for _ in range(n_tasks)]
        for p in range(size):
            s = sum(t[p] for t in taus)
            gamma = 1.0 if s > 0 else -1.0
            agree = [t[p] * gamma > 0 for t in taus]
            mag = max([abs(t[p]) for t, a in zip(taus, agree) if a], default=0.0)
            tu.append(gamma * mag)
            for i in range(n_tasks):
                ms[i].append(agree[i])
        unified.append(tu)
        masks.append(ms)
        div = size if rescaler == "tensor_mean" else 1
        for i in range(n_tasks):
            num[i] += sum(abs(x) for x in taus[i]) / div
            den[i] += sum(abs(u) for u, m in zip(tu, ms[i]) if m) / div
    return unified, masks, [a / b for a, b in zip(num, den)]


@pytest.mark.parametrize("rescaler", ["tensor_mean", "l1"])
def test_rescalers_match_naive_over_several_tensors(rescaler):
    g = torch.Generator().manual_seed(6)
    sizes = (5, 40, 3)
    tensors = []
    for n in sizes:
        b = torch.randn(n, generator=g)
        taus = [torch.randn(n, generator=g) * s for s in (0.2, 1.0, 3.0)]
        tensors.append((b, [b + t for t in taus], taus))
    scales = gather([(b, ex) for b, ex, _ in tensors], rescaler=rescaler)
    unified, masks, want = naive_emr([[t.tolist() for t in taus] for _, _, taus in tensors], rescaler)
    assert scales == pytest.approx(want, rel=1e-6)
    tau_uni, ms = elect(list(tensors[1][2]))
    assert torch.allclose(tau_uni, T(unified[1]), atol=1e-6)
    assert [m.tolist() for m in ms] == masks[1]


def test_rescalers_differ_between_rules_when_tensor_sizes_differ():
    g = torch.Generator().manual_seed(7)
    tensors = []
    for n in (4, 64):
        b = torch.zeros(n)
        tensors.append((b, [torch.randn(n, generator=g) * s for s in (1.0, 2.0)]))
    assert gather(tensors, rescaler="l1") != pytest.approx(gather(tensors, rescaler="tensor_mean"))


def test_nothing_survives_gives_scale_one():
    b = torch.zeros(4)
    assert gather([(b, [b.clone(), b.clone()])]) == [1.0, 1.0]


def test_parameters():
    with pytest.raises(ValidationError):
        EMR.params.model_validate({"rescaler": "mean"})
    p = EMR.params()
    assert (p.sign_zero, p.rescaler) == ("negative", "tensor_mean")
    assert EMR.outputs == "routed"
    assert get_method("emr_merging") is EMR
