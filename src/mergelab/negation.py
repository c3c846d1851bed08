"""Task-vector negation (forgetting) with a control bound.

Ilharco et al. 2023, "Editing Models with Task Arithmetic", arXiv:2212.04089, section 3:
subtracting a task vector, θ(λ) = θ0 − λ τ_forget with τ_forget = θ_forget − θ0, lowers the
model's skill on the forget task. λ is chosen on held-out data as the largest value whose
score on a *control* task stays at or above 95 % of the pretrained model's (the paper's rule;
its grid is λ ∈ {0, 0.05, …, 1.0}).

:func:`negation_search` evaluates every λ of the grid (the control curve need not be monotone,
so it does not stop at the first failure), keeps the largest one within the bound, and
returns the negated state dict with the whole curve. The edit itself goes through the
registered ``task_arithmetic`` method with weight −1 (:func:`mergelab.merge_state_dicts`), the
same code path as a recipe with ``weight: -1.0``.

A score is any callable ``state dict -> float`` (a zoo evaluation, a perplexity, a benchmark);
``higher_is_better=False`` treats it as a loss (perplexity): the bound is then
``base_score / score ≥ threshold``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mergelab.errors import RecipeError

StateDict = Mapping[str, torch.Tensor]
Score = Callable[[dict[str, torch.Tensor]], float]

PAPER_LAMBDAS: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(21))
"""λ ∈ {0, 0.05, …, 1.0}: the grid of the task-arithmetic paper."""


@dataclass
class NegationPoint:
    lambda_: float
    control: float
    control_ratio: float
    """control score relative to the base (≥ ``threshold`` passes; 1.0 = the base's score)."""
    forget: float | None = None
    within_bound: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["lambda"] = d.pop("lambda_")
        return d


@dataclass
class NegationResult:
    """The chosen λ, its negated model and every evaluated point (in grid order)."""

    lambda_: float
    state_dict: dict[str, torch.Tensor]
    base_control: float
    threshold: float
    points: list[NegationPoint] = field(default_factory=list)
    base_forget: float | None = None

    @property
    def chosen(self) -> NegationPoint:
        return next(p for p in self.points if p.lambda_ == self.lambda_)

    def to_dict(self) -> dict[str, Any]:
        return {
            "lambda": self.lambda_,
            "threshold": self.threshold,
            "base_control": self.base_control,
            "base_forget": self.base_forget,
            "points": [p.to_dict() for p in self.points],
        }


def negate(base: StateDict, forget_expert: StateDict, lambda_: float) -> dict[str, torch.Tensor]:
    """θ0 − λ (θ_forget − θ0), through the registered task-arithmetic method (weight −1)."""
    from mergelab.api import merge_state_dicts

    return merge_state_dicts(
        "task_arithmetic", [forget_expert], base, parameters={"lambda": lambda_}, model_parameters=[{"weight": -1.0}]
    )


def _ratio(score: float, base: float, higher_is_better: bool) -> float:
    if higher_is_better:
        return score / base if base != 0 else (1.0 if score >= 0 else 0.0)
    return base / score if score > 0 else 0.0


def negation_search(
    base: StateDict,
    forget_expert: StateDict,
    control: Score,
    *,
    forget: Score | None = None,
    lambdas: Sequence[float] = PAPER_LAMBDAS,
    threshold: float = 0.95,
    higher_is_better: bool = True,
    on_point: Callable[[NegationPoint], None] | None = None,
) -> NegationResult:
    """The largest λ of ``lambdas`` whose control score stays ≥ ``threshold`` x the base's.

    ``control`` (and the optional ``forget``, recorded for the report, never used for the
    choice) score a state dict. λ = 0 is the base itself and always passes; when no positive λ
    passes, the result is the base (λ = 0).
    """
    if not 0 < threshold <= 1:
        raise RecipeError(f"threshold must be in (0, 1]; got {threshold}")
    grid = sorted({float(x) for x in lambdas} | {0.0})
    if any(x < 0 for x in grid):
        raise RecipeError("negation lambdas must be ≥ 0 (λ scales the subtracted task vector)")
    differ = sorted(set(base) ^ set(forget_expert))
    if differ:
        raise RecipeError(f"base and forget expert differ in tensors: {', '.join(differ[:5])}")
    base_state = dict(base)
    base_control = float(control(base_state))
    base_forget = float(forget(base_state)) if forget is not None else None
    points: list[NegationPoint] = []
    best, best_state = 0.0, base_state
    for lam in grid:
        state = base_state if lam == 0.0 else negate(base, forget_expert, lam)
        c = base_control if lam == 0.0 else float(control(state))
        f = None if forget is None else (base_forget if lam == 0.0 else float(forget(state)))
        ratio = _ratio(c, base_control, higher_is_better)
        point = NegationPoint(lam, c, ratio, f, within_bound=ratio >= threshold)
        points.append(point)
        if point.within_bound:  # the grid ascends: the last passing λ is the largest
            best, best_state = lam, state
        if on_point is not None:
            on_point(point)
    return NegationResult(best, dict(best_state), base_control, threshold, points, base_forget)
