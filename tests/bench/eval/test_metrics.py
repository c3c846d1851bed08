"""Normalized-score arithmetic, averages, reports, and the ensembles' known answers."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab_bench.eval.ensembles import majority_vote, probability_average
from mergelab_bench.eval.metrics import EvalReport, TaskScore, accuracy, fmt_pct, mean, normalized_score


def test_accuracy_is_exact() -> None:
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == 0.5
    assert accuracy(torch.tensor([3] * 7), torch.tensor([3, 3, 3, 0, 0, 0, 0])) == 3 / 7
    assert math.isnan(accuracy([], []))
    with pytest.raises(ValueError, match="predictions"):
        accuracy([1, 2], [1])


def test_normalized_score() -> None:
    assert normalized_score(0.45, 0.9) == pytest.approx(0.5)
    assert normalized_score(0.95, 0.9) == pytest.approx(0.95 / 0.9)  # a merge may beat the expert
    assert normalized_score(0.5, 0.0) is None
    assert normalized_score(0.5, None) is None
    assert normalized_score(None, 0.9) is None


def test_mean_skips_undefined_values() -> None:
    assert mean([0.5, None, 1.0, float("nan")]) == 0.75
    assert mean([None]) is None


def test_report_averages_are_task_means_of_ratios() -> None:
    r = EvalReport(
        "m",
        "test",
        [
            TaskScore("a", 0.8, 100, expert=1.0),
            TaskScore("b", 0.3, 50, expert=0.6),
            TaskScore("c", 0.5, 10, expert=0.0),
        ],
    )
    assert r.average == pytest.approx((0.8 + 0.3 + 0.5) / 3)
    # mean of per-task ratios (c has none), not the ratio of means
    assert r.average_normalized == pytest.approx((0.8 + 0.5) / 2)
    d = r.to_dict()
    assert d["tasks"]["b"]["normalized"] == pytest.approx(0.5)
    back = EvalReport.from_dict(d)
    assert back.scores == r.scores and back.average_normalized == r.average_normalized


def test_fmt_pct() -> None:
    assert fmt_pct(0.87349) == "87.3" and fmt_pct(None) == "–" and fmt_pct(1.0, 2) == "100.00"


def test_probability_average() -> None:
    a = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [0.0, 3.0]])
    got = probability_average([a, b])
    want = (a.softmax(-1) + b.softmax(-1)) / 2
    assert torch.allclose(got, want)
    assert got.argmax(-1).tolist() == [0, 1]


def test_majority_vote_with_ties_broken_by_probability() -> None:
    # three members, three classes
    m1 = torch.tensor([[5.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 9.0]])
    m2 = torch.tensor([[0.0, 5.0, 0.0], [0.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    m3 = torch.tensor([[4.0, 0.0, 0.0], [1.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    # row 0: votes 0,1,0 -> 0; row 1: votes 1,1,0 -> 1; row 2: votes 2,1,0 (three-way tie) ->
    # the class with the largest summed probability among the tied: class 2 (m1 is confident)
    assert majority_vote([m1, m2, m3]).tolist() == [0, 1, 2]


def test_majority_vote_exact_tie_goes_to_the_smaller_class() -> None:
    a = torch.tensor([[1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0]])
    assert majority_vote([a, b]).tolist() == [0]


def test_ensemble_members_must_agree_on_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        probability_average([torch.zeros(2, 3), torch.zeros(2, 4)])
    with pytest.raises(ValueError, match="at least one"):
        majority_vote([])
