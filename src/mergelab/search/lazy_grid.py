"""A grid sampler for grids too large to list (Optuna's ``GridSampler`` lists every point).

A per-layer space has one coordinate per expert, parameter and layer group: TIES over 5 experts
in 3 groups has 33 coordinates, so 2 points per coordinate make 2^33 grid points, which
``GridSampler`` turns into a Python list before the first trial. :class:`LazyGridSampler` draws
distinct grid points uniformly instead: the distribution of ``GridSampler``'s shuffled order
(every point once, in a random order), not its sequence.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import optuna


class LazyGridSampler(optuna.samplers.BaseSampler):
    """Distinct grid points in a seeded uniform order.

    ``values`` maps each coordinate to its grid values and ``distributions`` to the distribution
    its trials suggest. Each trial gets the first draw that no trial of the study (any state) holds,
    so a resumed study continues the sequence an uninterrupted one would have drawn.
    """

    def __init__(
        self, values: Mapping[str, Sequence[float]], distributions: Mapping[str, Any], seed: int | None = None
    ) -> None:
        self._values = {k: [float(x) for x in v] for k, v in values.items()}
        self._space = {k: distributions[k] for k in self._values}
        self.size = math.prod(len(v) for v in self._values.values())
        self._seed = seed
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    def point(self, index: int) -> dict[str, float]:
        """The grid point at flat ``index`` (mixed radix; the last coordinate varies fastest)."""
        if not 0 <= index < self.size:
            raise IndexError(f"grid index {index} outside [0, {self.size})")
        digits: dict[str, float] = {}
        for name in reversed(list(self._values)):
            vals = self._values[name]
            index, i = divmod(index, len(vals))
            digits[name] = vals[i]
        return {k: digits[k] for k in self._values}

    def draws(self) -> Iterator[dict[str, float]]:
        """The seeded sequence of grid points (with repeats; the sampler skips visited ones)."""
        rng = random.Random(self._seed)
        while True:
            yield self.point(rng.randrange(self.size))

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        return dict(self._space)

    def sample_relative(self, study: Any, trial: Any, search_space: dict[str, Any]) -> dict[str, Any]:
        visited = {
            tuple(t.params.get(k) for k in self._values)
            for t in study.get_trials(deepcopy=False)
            if t.number != trial.number and t.params
        }
        if len(visited) >= self.size:
            raise RuntimeError(f"every point of the {self.size}-point grid has been visited")
        for p in self.draws():
            if tuple(p.values()) not in visited:
                return {k: v for k, v in p.items() if k in search_space}
        raise AssertionError("unreachable")  # pragma: no cover

    def sample_independent(self, study: Any, trial: Any, param_name: str, param_distribution: Any) -> Any:
        """Only for a coordinate outside the grid (none in a search); uniform."""
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)
