"""RegMean: the closed form is the least-squares fit of every expert's outputs; Grams from hooks;
RegMean++'s block-by-block procedure against a hand computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mergelab
from mergelab.informed import gram_matrices, regmean_plusplus
from mergelab.methods.regmean import regmean_solve

EXACT = {"reduce_non_diagonal_ratio": 1.0, "gram": "sum"}


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def _gram(rows: int, d: int, seed: int) -> torch.Tensor:
    x = _rand(rows, d, seed=seed)
    return x.T @ x


def test_single_linear_layer_equals_least_squares_fit_of_all_experts_outputs():
    w1, w2, w3 = _rand(5, 6, seed=1), _rand(5, 6, seed=2), _rand(5, 6, seed=3)
    xs = [_rand(40, 6, seed=4), _rand(25, 6, seed=5), _rand(60, 6, seed=6)]
    out = mergelab.merge_tensors("regmean", [w1, w2, w3], parameters=EXACT, statistics=[{"gram": x.T @ x} for x in xs])
    # min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²: one stacked least-squares problem
    X = torch.cat(xs).double()
    Y = torch.cat([x @ w.T for x, w in zip(xs, (w1, w2, w3))]).double()
    ls = torch.linalg.lstsq(X, Y).solution.T.float()
    assert torch.allclose(out, ls, atol=1e-5)
    # and it is not the plain average
    assert not torch.allclose(out, (w1 + w2 + w3) / 3, atol=1e-2)


def test_gram_mean_weights_experts_per_row_and_equals_sum_when_rows_agree():
    w1, w2 = _rand(4, 3, seed=1), _rand(4, 3, seed=2)
    x1, x2 = _rand(10, 3, seed=3), _rand(30, 3, seed=4)
    stats = [
        {"gram": x1.T @ x1, "rows": torch.tensor(10.0, dtype=torch.float64)},
        {"gram": x2.T @ x2, "rows": torch.tensor(30.0, dtype=torch.float64)},
    ]
    mean = mergelab.merge_tensors("regmean", [w1, w2], parameters={"reduce_non_diagonal_ratio": 1.0}, statistics=stats)
    total = mergelab.merge_tensors("regmean", [w1, w2], parameters=EXACT, statistics=stats)
    expect = regmean_solve([w1, w2], [x1.T @ x1 / 10, x2.T @ x2 / 30])
    assert torch.allclose(mean, expect, atol=1e-6)
    assert not torch.allclose(mean, total, atol=1e-3)
    same = [{"gram": s["gram"], "rows": torch.tensor(7.0, dtype=torch.float64)} for s in stats]
    assert torch.allclose(
        mergelab.merge_tensors("regmean", [w1, w2], parameters={"reduce_non_diagonal_ratio": 1.0}, statistics=same),
        total,
        atol=1e-6,
    )


def test_identity_grams_give_the_average_and_a_zero_gram_gives_the_other_expert():
    w1, w2 = _rand(3, 4, seed=1), _rand(3, 4, seed=2)
    eye = torch.eye(4)
    avg = mergelab.merge_tensors("regmean", [w1, w2], parameters=EXACT, statistics=[{"gram": eye}, {"gram": eye}])
    assert torch.allclose(avg, (w1 + w2) / 2, atol=1e-6)
    g1 = _gram(20, 4, seed=3)
    only1 = mergelab.merge_tensors(
        "regmean", [w1, w2], parameters=EXACT, statistics=[{"gram": g1}, {"gram": torch.zeros(4, 4)}]
    )
    assert torch.allclose(only1, w1, atol=1e-5)


def test_off_diagonal_shrink_and_model_weights():
    w1, w2 = _rand(3, 4, seed=1), _rand(3, 4, seed=2)
    g1, g2 = _gram(9, 4, seed=3), _gram(9, 4, seed=4)
    a = 0.3

    def shrink(g):
        return a * g + (1 - a) * torch.diag(torch.diagonal(g))

    out = mergelab.merge_tensors(
        "regmean",
        [w1, w2],
        parameters={"reduce_non_diagonal_ratio": a, "gram": "sum"},
        model_parameters=[{"weight": 2.0}, {"weight": 1.0}],
        statistics=[{"gram": g1}, {"gram": g2}],
    )
    s1, s2 = 2.0 * shrink(g1).double(), shrink(g2).double()
    expect = torch.linalg.solve(s1 + s2, s1 @ w1.double().T + s2 @ w2.double().T).T.float()
    assert torch.allclose(out, expect, atol=1e-5)


def test_conv1d_in_out_layout():
    w1, w2 = _rand(3, 5, seed=1), _rand(3, 5, seed=2)  # Linear: out × in
    g1, g2 = _gram(12, 5, seed=3), _gram(12, 5, seed=4)
    lin = mergelab.merge_tensors("regmean", [w1, w2], parameters=EXACT, statistics=[{"gram": g1}, {"gram": g2}])
    one = torch.ones(())
    conv = mergelab.merge_tensors(
        "regmean",
        [w1.T.contiguous(), w2.T.contiguous()],
        parameters=EXACT,
        statistics=[{"gram": g1, "in_out": one}, {"gram": g2, "in_out": one}],
    )
    assert torch.allclose(conv, lin.T, atol=1e-6)


def test_tensors_without_grams_are_averaged_or_task_arithmetic():
    b = _rand(6, seed=0)
    e1, e2 = b + _rand(6, seed=1), b + _rand(6, seed=2)
    none: list[dict] = [{}, {}]  # a 1-D tensor has no Gram
    avg = mergelab.merge_tensors("regmean", [e1, e2], base=b, statistics=none)
    assert torch.allclose(avg, (e1 + e2) / 2, atol=1e-6)
    ta = mergelab.merge_tensors(
        "regmean", [e1, e2], base=b, parameters={"nonlinear": "task_arithmetic", "lambda": 0.3}, statistics=none
    )
    assert torch.allclose(ta, b + 0.3 * ((e1 - b) + (e2 - b)), atol=1e-6)


def test_singular_sum_keeps_the_average_in_unseen_directions():
    w1, w2 = _rand(2, 3, seed=1), _rand(2, 3, seed=2)
    g = torch.zeros(3, 3)
    g[0, 0] = 4.0  # only input feature 0 is ever non-zero
    out = mergelab.merge_tensors("regmean", [w1, w2], parameters=EXACT, statistics=[{"gram": g}, {"gram": g}])
    assert torch.allclose(out, (w1 + w2) / 2, atol=1e-4)
    never = mergelab.merge_tensors(
        "regmean", [w1, w2], parameters=EXACT, statistics=[{"gram": torch.zeros(3, 3)}, {"gram": torch.zeros(3, 3)}]
    )
    assert torch.allclose(never, (w1 + w2) / 2)


def test_missing_gram_for_one_expert_is_an_error():
    w = _rand(2, 3, seed=1)
    with pytest.raises(mergelab.MergelabError, match="Gram statistics missing"):
        mergelab.merge_tensors("regmean", [w, w], parameters=EXACT, statistics=[{"gram": torch.eye(3)}, {}])


class _Toy(nn.Module):
    def __init__(self, d: int, seed: int, blocks: int = 1):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(blocks)])

    def forward(self, inputs_embeds, attention_mask=None):
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h)
        return h


def test_gram_hooks_sum_real_rows_only():
    model = _Toy(4, seed=0)
    x = _rand(2, 5, 4, seed=1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    res, n = gram_matrices(model, [{"inputs_embeds": x, "attention_mask": mask}], modules={"layers.0": model.layers[0]})
    rows = x[mask.bool()]
    g, count = res["layers.0"]
    assert n == 2 and count == 8
    assert torch.allclose(g, rows.T @ rows, atol=1e-5)


def test_regmean_plusplus_takes_block_inputs_from_the_merged_previous_block():
    d = 4
    experts = [_Toy(d, seed=s, blocks=2) for s in (1, 2)]
    merged = _Toy(d, seed=3, blocks=2)
    xs = [_rand(2, 6, d, seed=10), _rand(2, 6, d, seed=11)]
    batches = [[{"inputs_embeds": x}] for x in xs]

    def merge_tensor(name, aux):
        ws = [dict(e.named_parameters())[name].detach() for e in experts]
        if not aux[0]:
            return sum(ws) / len(ws)
        return regmean_solve(ws, [a["gram"] for a in aux])

    grams = regmean_plusplus(experts, merged, batches, merge_tensor)
    # by hand: block 0 is RegMean on the raw inputs; block 1's inputs are the merged block 0's outputs
    X = [x.reshape(-1, d) for x in xs]
    w0 = [e.layers[0].weight.detach() for e in experts]
    w1 = [e.layers[1].weight.detach() for e in experts]
    m0 = regmean_solve(w0, [x.T @ x for x in X])
    H = [x @ m0.T for x in X]
    m1 = regmean_solve(w1, [h.T @ h for h in H])
    assert torch.allclose(merged.layers[0].weight, m0, atol=1e-5)
    assert torch.allclose(merged.layers[1].weight, m1, atol=1e-5)
    assert torch.allclose(grams[1]["layers.1"][0], H[1].T @ H[1], atol=1e-4)
    # plain RegMean would use expert i's own block-0 outputs instead
    own = [x @ w.T for x, w in zip(X, w0)]
    assert not torch.allclose(regmean_solve(w1, [h.T @ h for h in own]), m1, atol=1e-3)
