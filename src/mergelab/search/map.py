"""MAP: Model merging with Amortized Pareto fronts (Li et al.; official code luli-git/MAP).

The merge is task arithmetic over the experts' task vectors with one coefficient c_t per expert
(here: the per-model ``weight`` of the recipe's method, its global parameters kept). MAP evaluates a
few coefficient vectors, fits one cheap surrogate per task, and reads the whole Pareto front of the
tasks' metrics off the surrogates instead of evaluating it:

1. **Samples** (``Sampling.generate_combined_points``): the T one-hot vectors (each task vector
   alone at coefficient 1), plus points of a regular grid of [0, 1]^T with ⌈(2n)^(1/T)⌉ values per
   axis, one-hot, sum-to-one and isotropic grid points removed, n of them drawn without replacement;
   optionally isotropic points (c, …, c) and isotropic points perturbed by N(0, 0.1²) clipped to
   [0, 1]. At least (T+1)(T+2)/2 points are evaluated (the surrogate's parameter count), or MAP
   refuses.
2. **Surrogates** (``MAP.quadratic_model``): per task, M̃(c) = g(Σ a_i c_i² + Σ_{i<j} b_ij c_i c_j +
   Σ d_i c_i + e), fitted by least squares (``scipy.optimize.curve_fit`` from all-ones, as the
   official code). The link g is the **sigmoid** for accuracies and the **softplus** for losses
   (``choose_activation``): not a plain quadratic.
3. **Front**: NSGA-III over the surrogates with coefficients in [−3, 3]^T (far outside the sampled
   [0, 1]^T, as in the official code), population 100 for 25 generations, simulated binary
   crossover (η 20, probability 0.7) and polynomial mutation (η 20, per-variable 1/T, probability
   0.3), reference points of Das–Dennis with 2 partitions plus 1 partition scaled by 0.5 (the
   official ``create_reference_points``). It runs on pymoo; the official code runs DEAP's
   ``eaMuPlusLambda`` (each child made by crossover *or* mutation; pymoo applies crossover then
   mutation) and keeps a hall of fame of every generation, as the front here keeps every evaluated
   individual's non-dominated set.
4. **Choice** (``get_scaling_from_pf``): the preference vector is L2-normalised and the front point
   maximising preference · predicted metrics is taken (losses enter with their sign turned, so
   lower is better for them). A choice outside the convex hull of the evaluated points is an
   extrapolation of the surrogates: MAP warns (and records it) rather than clamp (``domain: [0, 1]``
   keeps the search inside the sampled box instead). The chosen point is then evaluated.

**Nested mode** (``run_MAP_nested``) for many tasks: the two groups whose accuracies are closest
(each task alone: its own expert's score on it, measured on the anchors) are merged by a two-task
MAP (20 samples, 20 % isotropic), the merged pair becomes one group (its coefficient vector the
chosen combination of the two; its accuracy the chosen merge's mean metric over its tasks; its
preference the sum of its tasks'), until one group is left. Pairing is by closeness of accuracy,
not by similarity of task vectors. MAP's Bayesian adaptive sampling is not implemented.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mergelab.errors import OptionError, RecipeError
from mergelab.search._extras import require

Link = Callable[[np.ndarray], np.ndarray]


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -500, 500)))


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


LINKS: dict[str, Link] = {"accuracy": sigmoid, "loss": softplus}


def n_params(t: int) -> int:
    """(T+1)(T+2)/2: quadratic, cross, linear and constant terms."""
    return (t + 1) * (t + 2) // 2


def features(x: np.ndarray) -> np.ndarray:
    """Rows [c_i² (i), c_i c_j (i<j), c_i (i), 1] in the official code's parameter order."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    t = x.shape[1]
    cols = [x[:, i] ** 2 for i in range(t)]
    cols += [x[:, i] * x[:, j] for i in range(t) for j in range(i + 1, t)]
    cols += [x[:, i] for i in range(t)]
    cols.append(np.ones(len(x)))
    return np.stack(cols, axis=1)


def surrogate(params: Sequence[float] | np.ndarray, x: np.ndarray, kind: str) -> np.ndarray:
    """The fitted metric at coefficient vectors ``x`` (rows)."""
    return LINKS[kind](features(x) @ np.asarray(params, dtype=float))


def fit_surrogate(x: np.ndarray, y: np.ndarray, kind: str) -> np.ndarray:
    """Least-squares fit of the quadratic-in-link model from all-ones (``curve_fit``, Levenberg–Marquardt)."""
    curve_fit = require("scipy.optimize").curve_fit
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    p = n_params(x.shape[1])
    if len(x) < p:
        raise RecipeError(f"MAP: {len(x)} evaluated points for a surrogate of {p} parameters; evaluate at least {p}")
    phi = features(x)
    link = LINKS[kind]

    def model(_: Any, *params: float) -> np.ndarray:
        return link(phi @ np.asarray(params))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        params, _ = curve_fit(model, np.zeros(len(x)), y, p0=np.ones(p), maxfev=20000)
    return np.asarray(params)


# --------------------------------------------------------------------------- sampling


def _is_onehot(p: np.ndarray) -> bool:
    return bool(np.sum(p == 1) == 1 and np.sum(p == 0) == len(p) - 1)


def grid_points(t: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``generate_adjusted_nd_points``: a [0, 1]^T grid without one-hot, sum-to-one or isotropic points,
    ``n`` of them drawn without replacement (all when fewer)."""
    if n <= 0:
        return np.zeros((0, t))
    size = math.ceil((n / 0.5) ** (1.0 / t))
    size = max(size, 2)
    pts = np.array(list(itertools.product(range(size), repeat=t)), dtype=float) / (size - 1)
    keep = np.array(
        [not _is_onehot(p) and not math.isclose(float(p.sum()), 1.0) and not np.all(p == p[0]) for p in pts], dtype=bool
    )
    pts = pts[keep]
    if len(pts) > n:
        pts = pts[np.sort(rng.choice(len(pts), n, replace=False))]
    return pts


def sample_points(t: int, total: int, prop_isotropic: float, rng: np.random.Generator) -> np.ndarray:
    """``generate_combined_points`` with the one-hot anchors: T anchors, then isotropic points (half
    plain, half perturbed by N(0, 0.1²) and clipped to [0, 1]), then grid points, ``total`` in all.
    As in the official code, an odd isotropic count loses one point (count // 2 of each kind), and the
    grid gives fewer points when the filtered grid is smaller than asked."""
    rest = total - t
    if rest <= 0:
        raise RecipeError(f"MAP: {total} samples leave none besides the {t} one-hot anchors; ask for more")
    iso = int(prop_isotropic * rest)
    plain = rng.uniform(0, 1, iso // 2)
    plain_pts = np.repeat(plain[:, None], t, axis=1)
    if iso // 2 and len(plain_pts):
        chosen = plain_pts[rng.choice(len(plain_pts), iso // 2)]
        perturbed = np.clip(chosen + rng.normal(0, 0.1, (iso // 2, t)), 0, 1)
    else:
        perturbed = np.zeros((0, t))
    grid = grid_points(t, rest - iso, rng)
    return np.vstack([np.eye(t), plain_pts, perturbed, grid])


# --------------------------------------------------------------------------- the front


def reference_directions(m: int) -> np.ndarray:
    """Das–Dennis points with 2 partitions plus with 1 partition scaled by 0.5 toward the centroid
    (DEAP's ``uniform_reference_points(m, p, s)``: r·s + (1 − s)/m), duplicates removed."""
    get_reference_directions = require("pymoo.util.ref_dirs").get_reference_directions
    sets = []
    for p, s in ((2, 1.0), (1, 0.5)):
        r = get_reference_directions("das-dennis", m, n_partitions=p)
        sets.append(r * s + (1 - s) / m)
    return np.unique(np.round(np.vstack(sets), 12), axis=0)


def non_dominated(f: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``f`` (minimised) no other row dominates; duplicates kept once."""
    keep = []
    for i in range(len(f)):
        dominated = np.any(np.all(f <= f[i], axis=1) & np.any(f < f[i], axis=1))
        if not dominated:
            keep.append(i)
    idx = np.array(keep, dtype=int)
    _, first = np.unique(np.round(f[idx], 12), axis=0, return_index=True)
    return idx[np.sort(first)]


@dataclass
class Front:
    """The predicted Pareto front: coefficient vectors and their predicted metrics (raw, per task)."""

    x: np.ndarray
    metrics: np.ndarray


def pareto_front(
    params: Sequence[Sequence[float] | np.ndarray],
    kinds: Sequence[str],
    t: int,
    *,
    domain: tuple[float, float] = (-3.0, 3.0),
    population: int = 100,
    generations: int = 25,
    seed: int = 0,
) -> Front:
    """NSGA-III over the surrogates (see the module docstring)."""
    require("pymoo")
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.core.callback import Callback
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.optimize import minimize

    signs = np.array([-1.0 if k == "accuracy" else 1.0 for k in kinds])  # pymoo minimises

    class _Surrogates(Problem):
        def __init__(self) -> None:
            super().__init__(n_var=t, n_obj=len(params), xl=domain[0], xu=domain[1])

        def _evaluate(self, x: np.ndarray, out: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            out["F"] = np.stack([surrogate(p, x, k) for p, k in zip(params, kinds)], axis=1) * signs

    seen_x: list[np.ndarray] = []
    seen_f: list[np.ndarray] = []

    class _Every(Callback):
        def notify(self, algorithm: Any) -> None:
            for pop in (algorithm.pop, algorithm.off):
                if pop is not None and len(pop):
                    seen_x.append(pop.get("X"))
                    seen_f.append(pop.get("F"))

    algorithm = NSGA3(
        ref_dirs=reference_directions(len(params)),
        pop_size=population,
        n_offsprings=population,
        crossover=SBX(prob=0.7, prob_var=0.5, eta=20),
        mutation=PM(prob=0.3, prob_var=1.0 / t, eta=20),
    )
    minimize(_Surrogates(), algorithm, ("n_gen", generations), seed=seed, callback=_Every(), verbose=False)
    x = np.vstack(seen_x)
    f = np.vstack(seen_f)
    idx = non_dominated(f)
    return Front(x[idx], f[idx] * signs)


def choose(front: Front, preference: Sequence[float], kinds: Sequence[str]) -> int:
    """The front point maximising normalised preference · metrics (losses with their sign turned)."""
    p = np.asarray(preference, dtype=float)
    if p.shape != (front.metrics.shape[1],) or np.any(p < 0) or not np.any(p > 0):
        raise OptionError(
            f"MAP preference {list(preference)}: give one non-negative weight per task "
            f"({front.metrics.shape[1]}), not all zero"
        )
    p = p / np.linalg.norm(p)
    signs = np.array([1.0 if k == "accuracy" else -1.0 for k in kinds])
    return int(np.argmax((front.metrics * signs) @ p))


def in_hull(points: np.ndarray, x: np.ndarray, tol: float = 1e-9) -> bool:
    """Whether ``x`` is a convex combination of the rows of ``points`` (a linear program)."""
    linprog = require("scipy.optimize").linprog
    n = len(points)
    a_eq = np.vstack([points.T, np.ones((1, n))])
    b_eq = np.concatenate([x, [1.0]])
    res = linprog(np.zeros(n), A_eq=a_eq, b_eq=b_eq, bounds=[(0, None)] * n, method="highs")
    if res.status != 0:
        return False
    return bool(np.allclose(a_eq @ res.x, b_eq, atol=1e-6 + tol))


def closest_pair(accuracy: Mapping[str, float], groups: Sequence[str]) -> tuple[str, str]:
    """``find_closest_datasets``: the two groups whose accuracies differ least (first such pair)."""
    best: tuple[str, str] | None = None
    diff = math.inf
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)):
            d = abs(accuracy[groups[i]] - accuracy[groups[j]])
            if d < diff:
                diff, best = d, (groups[i], groups[j])
    assert best is not None
    return best
