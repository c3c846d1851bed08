"""Data-informed merging: statistics from calibration data for Fisher, RegMean(++) and AdaMerging.

The methods themselves (``mergelab.methods.fisher``, ``regmean``, ``adamerging``) are pure
per-tensor functions like every other method; what they need from data is computed here, before
the merge, and handed to them by the engine as ``ctx.statistics`` (see :mod:`mergelab.informed.phase`).

Building blocks usable on any ``nn.Module``:

* :func:`fisher_diagonal` — per-example diagonal Fisher (``torch.func`` vmap or a loop);
* :func:`gram_matrices` — Σ XᵀX of every linear layer's inputs (forward hooks);
* :func:`regmean_plusplus` — the block-by-block RegMean++ procedure;
* :func:`learn_coefficients` — AdaMerging's entropy minimisation with ``functional_call``;
* :func:`write_statistics` / :func:`open_statistics` — the on-disk format the engine reads.
"""

from mergelab.informed.adamerging import (
    AdaMergingResult,
    AdaTask,
    entropy,
    learn_coefficients,
)
from mergelab.informed.fisher import FisherResult, fisher_diagonal
from mergelab.informed.gram import GramCollector, gram_matrices
from mergelab.informed.modeling import (
    LinearHead,
    checkpoint_names,
    find_blocks,
    linear_modules,
    pool,
)
from mergelab.informed.phase import (
    Calibration,
    DataPhaseResult,
    check_calibration,
    run_data_phase,
)
from mergelab.informed.regmean_pp import regmean_plusplus
from mergelab.informed.stats import flatten, nested, open_statistics, write_statistics

__all__ = [
    "AdaMergingResult",
    "AdaTask",
    "Calibration",
    "DataPhaseResult",
    "FisherResult",
    "GramCollector",
    "LinearHead",
    "check_calibration",
    "checkpoint_names",
    "entropy",
    "find_blocks",
    "fisher_diagonal",
    "flatten",
    "gram_matrices",
    "learn_coefficients",
    "linear_modules",
    "nested",
    "open_statistics",
    "pool",
    "regmean_plusplus",
    "run_data_phase",
    "write_statistics",
]
