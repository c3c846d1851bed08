"""Fisher merging: the weighted mean, the global-norm option, and the per-example Fisher itself
(hand-computed on logistic regression; different from the square of a batch gradient)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mergelab
from mergelab.informed import fisher_diagonal


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_constructed_fishers_give_the_fisher_weighted_mean():
    w1, w2 = _rand(3, 4, seed=1), _rand(3, 4, seed=2)
    f1, f2 = torch.rand(3, 4) + 0.1, torch.rand(3, 4) + 0.1
    out = mergelab.merge_tensors(
        "fisher",
        [w1, w2],
        parameters={"normalize": False},
        model_parameters=[{"weight": 1.0}, {"weight": 3.0}],
        statistics=[{"fisher": f1}, {"fisher": f2}],
    )
    assert torch.allclose(out, (f1 * w1 + 3 * f2 * w2) / (f1 + 3 * f2), atol=1e-6)


def test_equal_fishers_give_the_plain_average_and_the_floor_covers_zeros():
    w1, w2 = _rand(5, seed=1), _rand(5, seed=2)
    f = torch.rand(5) + 0.5
    same = mergelab.merge_tensors("fisher", [w1, w2], statistics=[{"fisher": f}, {"fisher": f}])
    assert torch.allclose(same, (w1 + w2) / 2, atol=1e-6)
    zero = torch.zeros(5)
    floored = mergelab.merge_tensors(
        "fisher", [w1, w2], parameters={"normalize": False}, statistics=[{"fisher": zero}, {"fisher": zero}]
    )
    assert torch.allclose(floored, (w1 + w2) / 2, atol=1e-6)
    # the floor is applied elementwise to each expert's Fisher: expert 1 has F=0 → weight ε
    one = mergelab.merge_tensors(
        "fisher",
        [w1, w2],
        parameters={"normalize": False, "floor": 1e-3},
        statistics=[{"fisher": zero}, {"fisher": torch.ones(5)}],
    )
    assert torch.allclose(one, (1e-3 * w1 + w2) / (1 + 1e-3), atol=1e-6)


def test_normalisation_uses_each_experts_norm_over_every_merged_tensor():
    a = {"x": _rand(4, seed=1), "y": _rand(2, 2, seed=2)}
    b = {"x": _rand(4, seed=3), "y": _rand(2, 2, seed=4)}
    fa = {"x::fisher": torch.full((4,), 1.0), "y::fisher": torch.full((2, 2), 3.0)}
    fb = {"x::fisher": torch.full((4,), 2.0), "y::fisher": torch.full((2, 2), 1.0)}
    out = mergelab.merge_state_dicts("fisher", [a, b], statistics=[fa, fb])
    na = torch.cat([v.flatten() for v in fa.values()]).norm()
    nb = torch.cat([v.flatten() for v in fb.values()]).norm()
    for k, ta in a.items():
        ca, cb = fa[f"{k}::fisher"] / na, fb[f"{k}::fisher"] / nb
        assert torch.allclose(out[k], (ca * ta + cb * b[k]) / (ca + cb), atol=1e-6)
    plain = mergelab.merge_state_dicts("fisher", [a, b], parameters={"normalize": False}, statistics=[fa, fb])
    assert not torch.allclose(plain["x"], out["x"], atol=1e-4)


def _logreg(seed=0, d=3, c=3):
    torch.manual_seed(seed)
    model = nn.Linear(d, c)
    x = _rand(6, d, seed=seed + 1)
    return model, x


def _logits(model, batch):
    return model(batch["x"])


@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_expected_fisher_matches_the_closed_form_of_logistic_regression(per_example):
    # softmax regression z = Wx + b: ∂ log p_y / ∂W_k = (1[y=k] − p_k) x, so
    # E_y[(∂ log p_y/∂W_kj)²] = p_k (1 − p_k) x_j² and for the bias p_k (1 − p_k)
    model, x = _logreg()
    res = fisher_diagonal(
        model,
        [{"x": x[:4]}, {"x": x[4:]}],
        logits_fn=_logits,
        label="expected",
        per_example=per_example,
        num_examples=None,
    )
    assert res.per_example == per_example and res.examples == 6 and res.label == "expected"
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    v = p * (1 - p)  # [n, C]
    expect_w = (v[:, :, None] * x[:, None, :] ** 2).mean(0)
    assert torch.allclose(res.fisher["weight"], expect_w, atol=1e-6)
    assert torch.allclose(res.fisher["bias"], v.mean(0), atol=1e-6)


def test_per_example_fisher_is_not_the_square_of_a_batch_gradient():
    model, x = _logreg(seed=3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    res = fisher_diagonal(model, [{"x": x, "labels": y}], logits_fn=_logits, label="empirical", num_examples=None)
    # by hand, per example
    per = torch.zeros_like(model.weight)
    for i in range(6):
        model.zero_grad()
        torch.log_softmax(model(x[i : i + 1]), -1)[0, y[i]].backward()
        per += model.weight.grad**2
    assert torch.allclose(res.fisher["weight"], per / 6, atol=1e-6)
    # the pitfall: one gradient of the batch's summed log-likelihood, squared
    model.zero_grad()
    torch.log_softmax(model(x), -1).gather(1, y[:, None]).sum().backward()
    batch_sq = model.weight.grad**2 / 6
    assert (res.fisher["weight"] - batch_sq).abs().max() > 0.05


def test_vmap_and_loop_agree_and_sampling_is_seeded():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    batches = [{"x": _rand(5, 4, seed=7)}]
    fn = lambda m, b: m(b["x"])
    a = fisher_diagonal(model, batches, logits_fn=fn, label="sampled", per_example="vmap", seed=3)
    b = fisher_diagonal(model, batches, logits_fn=fn, label="sampled", per_example="loop", seed=3)
    c = fisher_diagonal(model, batches, logits_fn=fn, label="sampled", per_example="loop", seed=4)
    for k in a.fisher:
        assert torch.allclose(a.fisher[k], b.fisher[k], atol=1e-6), k
    assert any(not torch.allclose(b.fisher[k], c.fisher[k]) for k in b.fisher)


def test_causal_lm_fisher_sums_real_positions_of_each_sequence():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=20,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.tensor([[3, 5, 7, 9, 0, 0], [4, 6, 8, 10, 12, 14]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    res = fisher_diagonal(
        model,
        [{"input_ids": ids, "attention_mask": mask}],
        label="empirical",
        num_examples=None,
        names=["lm_head.weight"],
    )
    assert res.per_example == "loop" and res.kind == "causal_lm"  # HF models cannot be vmapped: auto falls back
    expect = torch.zeros_like(model.lm_head.weight)
    for row, length in ((0, 4), (1, 6)):
        model.zero_grad()
        logp = torch.log_softmax(model(input_ids=ids[row : row + 1, :length]).logits[0], -1)
        logp[:-1].gather(1, ids[row, 1:length, None]).sum().backward()
        expect += model.lm_head.weight.grad**2
    assert torch.allclose(res.fisher["lm_head.weight"], expect / 2, atol=1e-6)
    sampled = fisher_diagonal(model, [{"input_ids": ids, "attention_mask": mask}], names=["lm_head.weight"], seed=0)
    assert sampled.label == "sampled" and bool((sampled.fisher["lm_head.weight"] >= 0).all())
    with pytest.raises(mergelab.MergelabError, match="expected"):
        fisher_diagonal(model, [{"input_ids": ids}], label="expected", names=["lm_head.weight"])
