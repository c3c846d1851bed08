"""Task-vector negation with a control bound (Ilharco et al. 2023's forgetting rule)."""

from __future__ import annotations

import pytest
import torch

from mergelab.errors import RecipeError
from mergelab.negation import PAPER_LAMBDAS, negate, negation_search

BASE = {"w": torch.zeros(4), "b": torch.full((2,), 0.5)}
FORGET = {"w": torch.ones(4), "b": torch.full((2,), 0.5)}  # τ = 1 on w, 0 on b


def lam_of(state) -> float:
    """λ read back from θ0 − λ τ (τ_w = 1)."""
    return round(-float(state["w"][0]), 6)


def test_paper_grid() -> None:
    assert PAPER_LAMBDAS[0] == 0.0 and PAPER_LAMBDAS[-1] == 1.0 and len(PAPER_LAMBDAS) == 21


def test_negate_is_base_minus_lambda_tau() -> None:
    out = negate(BASE, FORGET, 0.25)
    assert torch.equal(out["w"], torch.full((4,), -0.25)) and torch.equal(out["b"], BASE["b"])


def test_largest_lambda_within_the_bound_hand_computed() -> None:
    # control(λ) = 1 − λ, base = 1: the 95 % rule keeps λ ≤ 0.05; a 72 % bound keeps λ ≤ 0.28
    control = lambda s: 1.0 - lam_of(s)
    r = negation_search(BASE, FORGET, control)
    assert r.lambda_ == 0.05 and r.base_control == 1.0
    assert [p.within_bound for p in r.points] == [True, True] + [False] * 19
    r = negation_search(BASE, FORGET, control, threshold=0.72)
    assert r.lambda_ == 0.25 and torch.equal(r.state_dict["w"], torch.full((4,), -0.25))
    assert r.chosen.control == pytest.approx(0.75) and r.chosen.control_ratio == pytest.approx(0.75)


def test_a_non_monotone_control_curve_still_gets_its_largest_passing_lambda() -> None:
    control = lambda s: 1.0 if lam_of(s) in (0.0, 0.1, 0.6) else 0.5
    r = negation_search(BASE, FORGET, control)
    assert r.lambda_ == 0.6
    assert [p.lambda_ for p in r.points if p.within_bound] == [0.0, 0.1, 0.6]


def test_forget_scores_are_recorded_not_used_for_the_choice() -> None:
    r = negation_search(BASE, FORGET, lambda s: 1.0, forget=lambda s: 1.0 - lam_of(s), lambdas=(0.5, 1.0))
    assert r.lambda_ == 1.0 and r.base_forget == 1.0
    assert [p.forget for p in r.points] == [1.0, 0.5, 0.0]


def test_lower_is_better_scores_use_base_over_score() -> None:
    # perplexity 10 + 10 λ: 10 / (10 + 10 λ) ≥ 0.95 ⇔ λ ≤ 0.0526
    r = negation_search(BASE, FORGET, lambda s: 10.0 + 10.0 * lam_of(s), higher_is_better=False)
    assert r.lambda_ == 0.05
    assert r.points[2].control_ratio == pytest.approx(10 / 11)


def test_nothing_passes_returns_the_base() -> None:
    r = negation_search(BASE, FORGET, lambda s: 1.0 if lam_of(s) == 0 else 0.0)
    assert r.lambda_ == 0.0 and all(torch.equal(r.state_dict[k], BASE[k]) for k in BASE)


def test_bad_inputs() -> None:
    with pytest.raises(RecipeError, match="threshold"):
        negation_search(BASE, FORGET, lambda s: 1.0, threshold=1.5)
    with pytest.raises(RecipeError, match="≥ 0"):
        negation_search(BASE, FORGET, lambda s: 1.0, lambdas=(-0.1,))
    with pytest.raises(RecipeError, match="differ in tensors: extra"):
        negation_search(BASE, {**FORGET, "extra": torch.ones(1)}, lambda s: 1.0)


def test_on_a_zoo_checkpoint(tmp_path) -> None:
    """Forget task alpha's expert on the tiny zoo with task beta as the control."""
    from mergelab_bench.eval.harness import Evaluator, load_state_dict_path
    from mergelab_bench.zoo.build import Zoo
    from mergelab_bench.zoo.testing import write_tiny_zoo

    zoo = Zoo(write_tiny_zoo(tmp_path))
    base = load_state_dict_path(zoo.base_dir / "model.safetensors")
    forget_expert = load_state_dict_path(zoo.expert_model_dir("alpha") / "model.safetensors")
    control_ev = Evaluator(zoo, tasks=["beta"], split="validation", limit=None)
    forget_ev = Evaluator(zoo, tasks=["alpha"], split="validation", limit=None)
    seen = []
    r = negation_search(
        base, forget_expert, lambda s: control_ev.evaluate(s).average,
        forget=lambda s: forget_ev.evaluate(s).average, lambdas=(0.5, 1.0, 2.0), on_point=seen.append,
    )  # fmt: skip
    assert [p.lambda_ for p in seen] == [0.0, 0.5, 1.0, 2.0]
    assert r.chosen.control >= 0.95 * r.base_control
    assert all(not p.within_bound for p in r.points if p.lambda_ > r.lambda_)
    expected = negate(base, forget_expert, r.lambda_) if r.lambda_ else base
    assert all(torch.equal(r.state_dict[k], expected[k]) for k in expected)
