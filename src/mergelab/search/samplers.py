"""cma, tpe, random and grid: Optuna samplers over the genome's coordinates.

* **cma**: ``optuna.samplers.CmaEsSampler`` (the ``cmaes`` package) started at the genome's x0
  with σ0 = the space's ``sigma0`` (mergekit-evolve: 1/6, with x0 at 1/N for weights and 1 for
  densities). Optuna runs CMA-ES in coordinates scaled to [0, 1] per dimension, so σ0 is passed
  as ``sigma0 / width``; when the coordinates' widths differ, the narrowest one gets exactly
  σ0 and wider ones proportionally more (one σ for all). Unlike mergekit's unbounded
  ``cma.fmin2``, the search stays inside the bounds (the decoding then matters only for bounds
  that cross 0). With ``start_at_x0`` the first trial is x0 itself.
* **tpe**: ``TPESampler`` (multi-objective too).
* **random**: ``RandomSampler``.
* **grid**: ``GridSampler`` over ``grid_points`` values per coordinate (log-spaced on log
  scales) or each bound's ``grid`` list. ``GridSampler`` lists the whole product up front, which
  cannot hold a per-layer space (TIES with 5 experts in 3 layer groups: 33 coordinates, 2^33
  points); above ``GRID_LIST_LIMIT`` points :mod:`mergelab.search.lazy_grid` draws distinct grid points
  uniformly without listing them — the same distribution as ``GridSampler``'s shuffled order, not
  the same sequence.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from mergelab.errors import OptionError
from mergelab.search.backends import import_optuna
from mergelab.search.genome import Genome
from mergelab.search.options import CmaOptions, TpeOptions


def distributions(genome: Genome) -> dict[str, Any]:
    optuna = import_optuna()
    return {
        d.name: optuna.distributions.FloatDistribution(d.bound.low, d.bound.high, log=d.bound.log) for d in genome.dims
    }


def grid_values(genome: Genome) -> dict[str, list[float]]:
    return {d.name: d.bound.grid_values(genome.space.grid_points) for d in genome.dims}


def grid_size(genome: Genome) -> int:
    return math.prod(len(v) for v in grid_values(genome).values())


GRID_LIST_LIMIT = 1 << 20
"""Grids up to this many points go to Optuna's ``GridSampler`` (which lists every point)."""


def cma_sigma(genome: Genome) -> tuple[float, str | None]:
    """CMA-ES's σ0 in Optuna's [0, 1]-scaled coordinates, and a note when widths differ."""
    widths = [
        (math.log(d.bound.high) - math.log(d.bound.low)) if d.bound.log else (d.bound.high - d.bound.low)
        for d in genome.dims
    ]
    narrow = min(widths)
    note = None
    if max(widths) - narrow > 1e-12 * max(1.0, narrow):
        note = (
            f"coordinates of different widths: sigma0 {genome.space.sigma0:g} holds on the narrowest "
            f"({narrow:g}), wider coordinates get a proportionally larger step"
        )
    return genome.space.sigma0 / narrow, note


def make_sampler(algorithm: str, genome: Genome, options: Any, seed: int, n_objectives: int) -> Any:
    """The Optuna sampler of ``algorithm`` for ``genome``."""
    optuna = import_optuna()
    if algorithm == "cma":
        if n_objectives > 1:
            raise OptionError("--algorithm cma optimises one objective; use tpe, random or grid with --multi-objective")
        assert isinstance(options, CmaOptions)
        sigma, _ = cma_sigma(genome)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # x0 and sigma0 are deprecated in Optuna >= 4.9 (still honoured)
            return optuna.samplers.CmaEsSampler(
                x0=dict(zip(genome.names, genome.x0())),
                sigma0=sigma,
                seed=seed,
                n_startup_trials=1 if options.start_at_x0 else 0,
                popsize=options.popsize,
                restart_strategy=options.restart_strategy,
                warn_independent_sampling=False,
                independent_sampler=optuna.samplers.RandomSampler(seed=seed),
            )
    if algorithm == "tpe":
        assert isinstance(options, TpeOptions)
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=options.n_startup_trials, multivariate=options.multivariate
        )
    if algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if algorithm == "grid":
        values = grid_values(genome)
        if math.prod(len(v) for v in values.values()) > GRID_LIST_LIMIT:
            from mergelab.search.lazy_grid import LazyGridSampler

            return LazyGridSampler(values, distributions(genome), seed)
        return optuna.samplers.GridSampler(values, seed=seed)
    raise OptionError(f"--algorithm {algorithm!r} is not an Optuna sampler")
