"""OPCM against a straightforward full-SVD implementation of the reference code, written here."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.continual import ContinualMerge
from mergelab.continual.opcm import project, split_index

F64 = torch.float64


def full_projection(delta: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """The reference's ``merge_linear_weights`` projection, literally: full SVD, zero the whole
    diagonal and the top-left split × split block of Uᵀ τ V, map back."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=True)
    v = vh.T
    split = int((s.cumsum(0) / s.sum() > alpha).float().argmax())
    p = u.T @ tau @ v
    p.diagonal().fill_(0)
    p[:split, :split] = 0
    return u @ p @ v.T


def is_linear(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and "embed" not in name


def reference_opcm(
    base: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]], alpha: float
) -> list[dict[str, torch.Tensor]]:
    """The reference's ``OPCM.run`` on state dicts, step by step (merged model after each expert)."""
    base = {k: v.to(F64) for k, v in base.items()}
    experts = [{k: v.to(F64) for k, v in e.items()} for e in experts]
    floats = [k for k, v in base.items() if v.is_floating_point()]

    def tv_norm(model):
        return math.sqrt(sum(float(((model[k] - base[k]) ** 2).sum()) for k in floats))

    merged = {k: v.clone() for k, v in experts[0].items()}
    norms = [tv_norm(merged)]
    lam_prev = 1.0
    out = [{k: v.clone() for k, v in merged.items()}]
    for expert in experts[1:]:
        norms.append(tv_norm(expert))
        mean = sum(norms) / len(norms)
        new = {}
        for k in floats:
            delta = merged[k] - base[k]
            tau = expert[k] - base[k]
            if is_linear(k, base[k]):
                tau = full_projection(delta, tau, alpha)
            new[k] = base[k] + (lam_prev * delta + tau) / 1.0  # λ_t = 1 while merging, as the code
        norm = tv_norm(new)
        lam = norm / mean
        merged = {k: base[k] + (new[k] - base[k]) * (mean / norm) for k in floats}
        lam_prev = lam
        out.append({k: v.clone() for k, v in merged.items()})
    return out


def model(seed: int, like: dict[str, torch.Tensor] | None = None, scale: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if like is None:
        return {
            "layers.0.q.weight": torch.randn(6, 9, generator=gen),
            "layers.0.q.bias": torch.randn(6, generator=gen),
            "layers.0.up.weight": torch.randn(11, 5, generator=gen),
            "layers.0.norm.weight": torch.randn(5, generator=gen),
            "embed_tokens.weight": torch.randn(7, 5, generator=gen),
            "lm_head.weight": torch.randn(7, 5, generator=gen),
        }
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in like.items()}


@pytest.mark.parametrize("shape", [(7, 7), (9, 4), (4, 9)])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 0.9, 1.0])
def test_thin_svd_projection_equals_full_svd_projection(shape, alpha):
    gen = torch.Generator().manual_seed(shape[0] * 10 + shape[1])
    delta = torch.randn(shape, generator=gen, dtype=F64)
    tau = torch.randn(shape, generator=gen, dtype=F64)
    got = project(delta, tau, alpha)
    want = full_projection(delta, tau, alpha)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_thin_svd_projection_of_a_tall_vocabulary_like_matrix():
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(300, 12, generator=gen, dtype=F64)
    tau = torch.randn(300, 12, generator=gen, dtype=F64)
    torch.testing.assert_close(project(delta, tau, 0.5), full_projection(delta, tau, 0.5), rtol=1e-9, atol=1e-9)


def test_projection_is_orthogonal_to_the_running_merge():
    """⟨τ', Δ⟩_F = Σ_i P_ii S_i = 0 once the diagonal is gone."""
    gen = torch.Generator().manual_seed(5)
    delta = torch.randn(8, 6, generator=gen, dtype=F64)
    tau = torch.randn(8, 6, generator=gen, dtype=F64)
    assert abs(float((project(delta, tau, 0.5) * delta).sum())) < 1e-10


def test_split_is_the_first_cumulative_singular_value_ratio_above_alpha():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64)  # cumulative ratios 0.4, 0.7, 0.9, 1.0 (of values, not squares)
    assert split_index(s, 0.3) == 0
    assert split_index(s, 0.4) == 1  # strictly above α
    assert split_index(s, 0.5) == 1
    assert split_index(s, 0.95) == 3
    assert split_index(s, 1.0) == 0  # nothing above: argmax of an all-false mask
    assert split_index(torch.zeros(3), 0.5) == 0


def test_opcm_steps_equal_the_reference_code_with_full_svd():
    base = model(0)
    experts = [model(s, base) for s in (1, 2, 3, 4)]
    want = reference_opcm(base, experts, 0.5)
    cm = ContinualMerge.init(base, method="opcm", params={"alpha": 0.5})
    for i, e in enumerate(experts):
        cm.add(e, name=f"e{i}")
        got = cm.state_dict()
        for k in base:
            torch.testing.assert_close(got[k], want[i][k].float(), rtol=1e-5, atol=1e-6, msg=f"step {i + 1}, {k}")
    lams = [e.history["lambda"] for e in cm.experts]
    assert lams[0] == 1.0 and all(1.0 < lam < 2.5 for lam in lams[1:])  # grows roughly like √t


def test_adding_one_expert_to_the_base_gives_that_expert():
    base = model(0)
    expert = model(1, base)
    for method in ("opcm", "dop", "average"):
        cm = ContinualMerge.init(base, method=method)
        cm.add(expert)
        got = cm.state_dict()
        for k in base:
            torch.testing.assert_close(got[k], expert[k], rtol=0, atol=1e-7)


def test_orthogonal_task_vectors_give_task_arithmetic_up_to_the_rescale():
    """τ_2 = U P Vᵀ with P zero on the diagonal and on the top-left block (U, V: the full SVD of τ_1)
    is left unchanged by the projection: OPCM = θ0 + (τ_1 + τ_2) · mean(‖τ_1‖, ‖τ_2‖)/‖τ_1 + τ_2‖."""
    gen = torch.Generator().manual_seed(9)
    base = {"blocks.0.w.weight": torch.randn(6, 5, generator=gen), "blocks.0.b": torch.randn(6, generator=gen)}
    tau1 = {"blocks.0.w.weight": torch.randn(6, 5, generator=gen), "blocks.0.b": torch.randn(6, generator=gen)}
    u, s, vh = torch.linalg.svd(tau1["blocks.0.w.weight"], full_matrices=True)
    split = split_index(s, 0.5)
    p = torch.randn(6, 5, generator=gen)
    p.diagonal().fill_(0)
    p[:split, :split] = 0
    tau2 = {"blocks.0.w.weight": u @ p @ vh, "blocks.0.b": torch.randn(6, generator=gen)}
    cm = ContinualMerge.init(base, method="opcm")
    for tau in (tau1, tau2):
        cm.add({k: base[k] + tau[k] for k in base})
    total = {k: tau1[k] + tau2[k] for k in base}
    norm = lambda d: math.sqrt(sum(float((v**2).sum()) for v in d.values()))
    rescale = (norm(tau1) + norm(tau2)) / 2 / norm(total)
    got = cm.state_dict()
    for k in base:
        torch.testing.assert_close(got[k], base[k] + rescale * total[k], rtol=1e-5, atol=1e-5)


def test_disjoint_task_vectors_need_the_support_diagonal_to_stay_untouched():
    """τ_1 and τ_2 on disjoint rows and columns (τ_1 rank-deficient): with ``diagonal: support`` OPCM is
    task arithmetic up to the rescale; the reference's ``all`` also removes τ_2's diagonal entries in the
    arbitrary basis of τ_1's null space."""
    w1 = torch.zeros(6, 6)
    w1[:3, :3] = torch.randn(3, 3, generator=torch.Generator().manual_seed(1))
    w2 = torch.zeros(6, 6)
    w2[3:, 3:] = torch.randn(3, 3, generator=torch.Generator().manual_seed(2))
    base = {"h.0.w.weight": torch.randn(6, 6, generator=torch.Generator().manual_seed(3))}
    want_dir = w1 + w2
    rescale = (float(w1.norm()) + float(w2.norm())) / 2 / float(want_dir.norm())
    cm = ContinualMerge.init(base, method="opcm", params={"diagonal": "support"})
    for w in (w1, w2):
        cm.add({"h.0.w.weight": base["h.0.w.weight"] + w})
    torch.testing.assert_close(cm.state_dict()["h.0.w.weight"], base["h.0.w.weight"] + rescale * want_dir)
    got_all = project(w1, w2, 0.5, "all")
    assert not torch.allclose(got_all, w2)  # the code's diagonal reaches into τ_1's null space
    torch.testing.assert_close(project(w1, w2, 0.5, "support"), w2)


def test_embeddings_are_not_projected_and_the_output_head_is():
    base = model(0)
    experts = [model(s, base) for s in (1, 2)]
    cm = ContinualMerge.init(base, method="opcm")
    for e in experts:
        cm.add(e)
    got = cm.state_dict()
    lam = cm.experts[-1].history["lambda"]
    # non-linear tensors: (τ_1 + τ_2) / λ_2
    for k in ("embed_tokens.weight", "layers.0.q.bias", "layers.0.norm.weight"):
        want = base[k] + ((experts[0][k] - base[k]) + (experts[1][k] - base[k])) / lam
        torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-6)
    k = "lm_head.weight"
    tau1, tau2 = experts[0][k] - base[k], experts[1][k] - base[k]
    torch.testing.assert_close(got[k], base[k] + (tau1 + full_projection(tau1, tau2, 0.5)) / lam, rtol=1e-5, atol=1e-6)
