"""mergelab's offline benchmark: the evaluation zoo (classification and language-model suites),
the harness that scores merges on it, and the leaderboard.

The core package :mod:`mergelab` never imports this one (an import-linter contract in
``pyproject.toml`` checks it). The benchmark plugs into the core in three places:

* the ``zoo``, ``eval``, ``bench`` and ``demo`` commands, registered on ``mergelab``'s command line
  through the ``mergelab.commands`` entry point (:func:`mergelab_bench.cli.register`);
* the ``zoo:<task>`` calibration sources of recipes, registered when this package is imported and
  through the ``mergelab.data_sources`` entry point (:mod:`mergelab_bench.zoo.calibration`);
* the ``zoo:``, ``lm:`` and ``lm-eval:`` objectives of ``mergelab search``, registered when this
  package is imported and through the ``mergelab.objectives`` entry point
  (:mod:`mergelab_bench.eval.objectives`).
"""

from mergelab_bench.eval.objectives import register as _register_objectives
from mergelab_bench.zoo.calibration import register as _register_calibration

_register_calibration()
_register_objectives()
