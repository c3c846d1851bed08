"""Evaluation: score merges on the zoo's tasks, reference ensembles, the leaderboard.

``evaluate_model(model, "quick")`` scores one encoder (merged checkpoint, state dict, module)
on every task with each task's head; ``run_bench(zoo)`` tunes and scores every method and
``write_leaderboard`` writes markdown, JSON and a bar chart.
"""

from mergelab_bench.eval.data_informed import BenchCalibration
from mergelab_bench.eval.ensembles import majority_vote, probability_average
from mergelab_bench.eval.grids import (
    ADVANCED_METHODS,
    DATA_INFORMED_METHODS,
    GRIDS,
    LEADERBOARD_METHODS,
    GridPoint,
    grid_for,
)
from mergelab_bench.eval.harness import Evaluator, evaluate_model, report_table
from mergelab_bench.eval.leaderboard import Leaderboard, run_bench, write_leaderboard
from mergelab_bench.eval.metrics import EvalReport, TaskScore, accuracy, normalized_score

__all__ = [
    "ADVANCED_METHODS",
    "DATA_INFORMED_METHODS",
    "GRIDS",
    "LEADERBOARD_METHODS",
    "BenchCalibration",
    "EvalReport",
    "Evaluator",
    "GridPoint",
    "Leaderboard",
    "TaskScore",
    "accuracy",
    "evaluate_model",
    "grid_for",
    "majority_vote",
    "normalized_score",
    "probability_average",
    "report_table",
    "run_bench",
    "write_leaderboard",
]
