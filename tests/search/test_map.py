"""MAP: the sampling plan, the quadratic-in-link surrogate (recovered from its own values), the
NSGA-III front of a toy problem whose Pareto set is known, the preference choice and the hull test."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("pymoo")
pytest.importorskip("scipy")

from mergelab.errors import OptionError, RecipeError
from mergelab.search import map as m


def test_features_follow_the_official_parameter_order() -> None:
    x = np.array([[2.0, 3.0, 5.0]])
    # squares, cross terms i<j, linear terms, constant
    assert m.features(x).tolist() == [[4, 9, 25, 6, 10, 15, 2, 3, 5, 1]]
    assert m.n_params(2) == 6 and m.n_params(3) == 10


def test_links_are_sigmoid_for_accuracies_and_softplus_for_losses() -> None:
    z = np.array([-2.0, 0.0, 3.0])
    assert m.surrogate([0, 0, 0, 1, 0, 0], np.array([[v, 0.0] for v in z]), "accuracy") == pytest.approx(
        1 / (1 + np.exp(-z))
    )
    assert m.surrogate([0, 0, 0, 1, 0, 0], np.array([[v, 0.0] for v in z]), "loss") == pytest.approx(
        np.log1p(np.exp(z))
    )


def test_sampling_plan_two_tasks_by_hand() -> None:
    # 6 samples for T = 2: the 2 one-hot anchors + 4 grid points of {0, .5, 1}^2 without one-hot,
    # sum-to-one and isotropic points: exactly (0, .5), (.5, 0), (.5, 1), (1, .5)
    pts = m.sample_points(2, 6, 0.0, np.random.default_rng(0))
    assert pts[:2].tolist() == [[1, 0], [0, 1]]
    assert sorted(map(tuple, pts[2:].tolist())) == [(0, 0.5), (0.5, 0), (0.5, 1), (1, 0.5)]
    pts3 = m.sample_points(3, 13, 0.2, np.random.default_rng(1))
    assert len(pts3) == 13 and pts3[:3].tolist() == np.eye(3).tolist()
    assert np.all((pts3 >= 0) & (pts3 <= 1))
    iso = pts3[3:5]  # int(0.2 * 10) = 2 isotropic points: 1 plain + 1 perturbed
    assert np.all(iso[0] == iso[0][0])


def test_the_surrogate_recovers_a_known_quadratic_sigmoid() -> None:
    rng = np.random.default_rng(3)
    true = np.array([-1.2, -0.8, 0.6, 1.1, 0.9, 0.3])  # a11, a22, b12, d1, d2, e
    x = m.sample_points(2, 12, 0.0, rng)
    y = m.surrogate(true, x, "accuracy")
    fitted = m.fit_surrogate(x, y, "accuracy")
    assert fitted == pytest.approx(true, abs=1e-4)
    probe = rng.uniform(-3, 3, (50, 2))  # and the function, far outside the samples
    assert m.surrogate(fitted, probe, "accuracy") == pytest.approx(m.surrogate(true, probe, "accuracy"), abs=1e-4)
    loss_true = np.array([0.5, 0.4, -0.2, -1.0, -0.6, 1.2])
    fitted_loss = m.fit_surrogate(x, m.surrogate(loss_true, x, "loss"), "loss")
    assert fitted_loss == pytest.approx(loss_true, abs=1e-4)


def test_too_few_points_are_refused() -> None:
    x = np.eye(3)
    with pytest.raises(RecipeError, match="3 evaluated points for a surrogate of 10 parameters"):
        m.fit_surrogate(x, np.ones(3), "accuracy")


def _toy_params(center: tuple[float, float]) -> list[float]:
    # q(c) = 2 - |c - center|^2 = -c1^2 - c2^2 + 0*c1c2 + 2a c1 + 2b c2 + (2 - a^2 - b^2)
    a, b = center
    return [-1.0, -1.0, 0.0, 2 * a, 2 * b, 2 - a * a - b * b]


def test_nsga3_front_of_a_toy_problem_lies_on_the_known_pareto_set() -> None:
    """Two isotropic quadratics inside sigmoids: the Pareto set is the segment between their centres."""
    p, q = (0.2, 0.9), (1.0, 0.1)
    params = [_toy_params(p), _toy_params(q)]
    front = m.pareto_front(params, ["accuracy", "accuracy"], 2, population=60, generations=40, seed=0)
    assert len(front.x) >= 10
    seg = np.array(q) - np.array(p)
    dist = []
    for x in front.x:
        t = np.clip(np.dot(x - p, seg) / np.dot(seg, seg), 0, 1)
        dist.append(np.linalg.norm(x - (np.array(p) + t * seg)))
    # the archive of every evaluated individual's non-dominated set: close to the segment, a few
    # stragglers that no archived point happens to dominate
    assert np.median(dist) < 0.03 and np.quantile(dist, 0.9) < 0.08 and max(dist) < 0.2
    # the front spans the segment (both ends reached)
    ends = [np.min(np.linalg.norm(front.x - np.array(e), axis=1)) for e in (p, q)]
    assert max(ends) < 0.15
    # predicted metrics are the surrogates at the front's coefficients, and no front point dominates another
    pred = np.stack([m.surrogate(pp, front.x, "accuracy") for pp in params], axis=1)
    assert front.metrics == pytest.approx(pred)
    assert len(m.non_dominated(-front.metrics)) == len(front.metrics)


def test_preference_picks_the_weighted_best_front_point() -> None:
    front = m.Front(x=np.array([[0, 1], [0.5, 0.5], [1, 0]]), metrics=np.array([[0.9, 0.2], [0.7, 0.7], [0.2, 0.9]]))
    kinds = ["accuracy", "accuracy"]
    assert m.choose(front, [1, 1], kinds) == 1
    assert m.choose(front, [3, 1], kinds) == 0
    assert m.choose(front, [0, 1], kinds) == 2
    # a loss enters with its sign turned: lower is better
    assert m.choose(front, [0, 1], ["accuracy", "loss"]) == 0
    with pytest.raises(OptionError, match="one non-negative weight per task"):
        m.choose(front, [1, 1, 1], kinds)


def test_reference_points_are_deap_s_two_layers() -> None:
    r = m.reference_directions(2)
    want = {(0.0, 1.0), (0.5, 0.5), (1.0, 0.0), (0.25, 0.75), (0.75, 0.25)}
    assert {tuple(np.round(v, 6)) for v in r} == want


def test_hull_and_nested_pairing() -> None:
    pts = np.array([[1, 0], [0, 1], [0, 0.5], [0.5, 0], [0.5, 1], [1, 0.5]], dtype=float)
    assert m.in_hull(pts, np.array([0.5, 0.5]))
    assert not m.in_hull(pts, np.array([1.2, 1.2]))
    assert not m.in_hull(pts, np.array([-3.0, -3.0]))
    acc = {"a": 0.90, "b": 0.60, "c": 0.88, "d": 0.61}
    assert m.closest_pair(acc, ["a", "b", "c", "d"]) == ("b", "d")
    assert math.isclose(m.softplus(np.array([0.0]))[0], math.log(2))
