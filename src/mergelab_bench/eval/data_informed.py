"""Data-informed methods on the leaderboard: calibration from the zoo, statistics cached per method.

Fisher, RegMean, RegMean++ and AdaMerging need statistics computed from data before they merge
(:mod:`mergelab.informed`). For the bench, every expert's calibration comes from the zoo itself:

* Fisher, RegMean, RegMean++: the first ``examples`` rows (``fisher_examples`` for Fisher) of the
  expert's own task's **train** split; Fisher and AdaMerging score with the zoo's expert head on
  mean-pooled encoder states, as the zoo's classifiers do;
* AdaMerging minimises the entropy of its predictions on **unlabeled** inputs. As in its paper
  (test-time adaptation), these are by default the inputs it is scored on: the first
  ``adamerging_examples`` texts of each task's **test** split, labels dropped
  (``mergelab.informed.modeling.model_inputs``); ``adamerging_split="train"`` uses train texts
  instead. Never the validation split, which selects the grid point.

On the LM zoo (``mergelab bench --suite lm``) the experts are causal LMs and the calibration
texts are the first rows of each domain's train split file (``text`` field, no labels): RegMean's
Grams see every real position, Fisher's labels are sampled from the model per position (the
exact expectation over the vocabulary is out of reach), AdaMerging's entropy is that of the
next-token distributions.

Texts are tokenized at the zoo's own ``max_len`` (64 for the presets), batches of
``batch_size`` (32, the zoo's training batch) for the Gram and Fisher passes; AdaMerging keeps
its module's batch size (16) and steps (500).

Cost and caching. Each call goes through :func:`mergelab.informed.run_data_phase` with
``calibration.statistics_dir`` = ``<statistics root>/<method>``: the phase's own reuse keys
(model files, data, settings, and the method parameters that change a statistic) decide what
is recomputed. Fisher's and RegMean's statistics do not depend on the merge parameters, so
they are computed once per method and every grid point (and a rerun of the bench) reuses
them; RegMean++ (block-by-block, its Grams depend on α) and AdaMerging (the statistics *are*
the learned coefficients) compute one set per grid point, cached the same way. Per-example
Fisher with the exact expectation over labels costs one backward pass per example and class:
the defaults of ``mergelab merge`` (256 examples at length 128) took 2154 s on the quick zoo
(4 experts, 20 classes in all) on 2 CPU threads, so the bench uses 64 examples at the zoo's
length (64): about an eighth of that.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mergelab_bench.eval.grids import GridPoint
from mergelab_bench.zoo.build import Zoo
from mergelab_bench.zoo.lm.build import LMZoo

#: collectors whose statistics depend on the grid point (one data phase per point)
PER_POINT_COLLECTORS = ("gram_plusplus", "adamerging")


@dataclass(frozen=True)
class BenchCalibration:
    """How much data the data phases of the bench see (recorded in the leaderboard's config)."""

    examples: int = 256
    """RegMean / RegMean++: rows of each task's train split per expert."""
    fisher_examples: int = 64
    """Fisher: rows of each task's train split per expert (per-example gradients × classes)."""
    adamerging_examples: int = 1000
    """AdaMerging: unlabeled texts per task (the first rows of ``adamerging_split``; labels never read)."""
    adamerging_split: str = "test"
    """AdaMerging's unlabeled inputs: ``test`` (the paper's protocol: the inputs it is scored on,
    without their labels) or ``train``."""
    batch_size: int = 32
    """batch size of the Gram and Fisher passes (AdaMerging: its module's default, 16)."""
    max_length: int | None = None
    """tokens per example; None: the zoo's ``max_len``."""
    device: str = "cpu"
    """torch device of the data phases (the merges themselves run on the CPU)."""

    def __post_init__(self) -> None:
        from mergelab.errors import RecipeError

        for name in ("examples", "fisher_examples", "adamerging_examples", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(f"calibration {name.replace('_', ' ')} must be at least 1")
        if self.max_length is not None and self.max_length < 2:
            raise RecipeError("calibration max_length must be at least 2")
        if self.adamerging_split not in ("test", "train"):
            raise RecipeError(f"AdaMerging split must be test or train, not {self.adamerging_split!r}")

    def num_examples(self, collector: str) -> int:
        if collector == "fisher":
            return self.fisher_examples
        if collector == "adamerging":
            return self.adamerging_examples
        return self.examples

    @staticmethod
    def fields_for(collector: str) -> tuple[str, ...]:
        """The settings that a collector's statistics depend on (``mergelab bench --update`` compares them)."""
        own = {
            "fisher": ("fisher_examples", "batch_size"),
            "gram": ("examples", "batch_size"),
            "gram_plusplus": ("examples", "batch_size"),
            "adamerging": ("adamerging_examples", "adamerging_split"),
        }
        return (*own.get(collector, ()), "max_length", "device")

    def split(self, collector: str) -> str:
        # validation is never fitted on: it chooses the grid point
        return self.adamerging_split if collector == "adamerging" else "train"

    def describe(self, zoo: Zoo | LMZoo | None = None) -> dict[str, Any]:
        """The config entry of the leaderboard."""
        d: dict[str, Any] = asdict(self)
        if zoo is not None and self.max_length is None:
            d["max_length"] = zoo_max_length(zoo)
        if isinstance(zoo, LMZoo):
            d["sources"] = {
                "fisher": f"first {self.fisher_examples} texts of each expert's domain, train split; log-likelihood of "
                "the next tokens, one label sampled from the model per position (fisher_label auto = sampled)",
                "regmean": f"first {self.examples} texts of each expert's domain, train split",
                "regmean_plusplus": f"first {self.examples} texts of each expert's domain, train split",
                "adamerging": f"first {self.adamerging_examples} texts of each domain's {self.adamerging_split} split "
                "(entropy of the next-token distributions); batch 16, 500 steps (module defaults)",
            }
            return d
        d["sources"] = {
            "fisher": f"first {self.fisher_examples} rows of each expert's task, train split, with the zoo's "
            "expert head (exact expectation over labels)",
            "regmean": f"first {self.examples} rows of each expert's task, train split",
            "regmean_plusplus": f"first {self.examples} rows of each expert's task, train split",
            "adamerging": f"first {self.adamerging_examples} texts of each task's {self.adamerging_split} split, "
            "without labels (entropy on unlabeled inputs"
            + (", the paper's test-time protocol" if self.adamerging_split == "test" else "")
            + "); batch 16, 500 steps (module defaults)",
        }
        return d


@dataclass
class Statistics:
    """The statistics of one grid point: one reader per expert, and what computing them cost."""

    readers: list[Any]
    seconds: float
    summary: dict[str, str]
    side_files: dict[str, str]
    peak_bytes: int = 0
    """peak memory of the data phase: CUDA max allocated, or on CPU the process's peak RSS so far"""
    compute_seconds: float = 0.0
    """what computing the statistics took, also when this call reused them"""
    _phase: Any = None
    _plan: Any = None

    def close(self) -> None:
        if self._phase is not None:
            self._phase.close()
        if self._plan is not None:
            self._plan.close()


def zoo_max_length(zoo: Zoo | LMZoo) -> int:
    """Tokens per example the zoo's own models were trained and scored with."""
    return int(zoo.eval_settings["max_len"]) if isinstance(zoo, LMZoo) else int(zoo.max_len)


def _expert_source(zoo: Zoo | LMZoo, task: str, split: str) -> dict[str, Any]:
    """The calibration source of one expert: its task's split, with the zoo's head for classification."""
    if isinstance(zoo, LMZoo):  # a domain's split file (JSONL, `text` field); causal LMs need no labels
        return {"path": str(zoo.data(task).path / f"{split}.jsonl"), "text_field": "text", "label_field": None}
    return {"zoo_task": task, "zoo": str(zoo.root), "split": split, "head": "zoo"}


def calibration_recipe(
    method: str,
    zoo: Zoo | LMZoo,
    point: GridPoint,
    calibration: BenchCalibration,
    statistics_dir: str | os.PathLike[str],
    seed: int,
) -> dict[str, Any]:
    """The recipe of one grid point whose data phase the bench runs (zoo folders as models).

    Classification zoo: encoders with the zoo's expert heads on mean-pooled states; LM zoo: causal LMs.
    """
    from mergelab.methods import get_method

    spec = get_method(method)
    collector = spec.statistics
    if collector is None:
        raise ValueError(f"{method} is data-free")
    split = calibration.split(collector)
    models = [
        {
            "model": str(zoo.expert_model_dir(t)),
            "parameters": dict(point.model_parameters),
            "calibration": _expert_source(zoo, t, split),
        }
        for t in zoo.tasks
    ]
    return {
        "merge_method": method,
        "base_model": str(zoo.base_dir),
        "models": models,
        "parameters": dict(point.parameters),
        "calibration": {
            "num_examples": calibration.num_examples(collector),
            "batch_size": None if collector == "adamerging" else calibration.batch_size,
            "max_length": calibration.max_length or zoo_max_length(zoo),
            **(
                {"model_type": "causal_lm"} if isinstance(zoo, LMZoo) else {"model_type": "encoder", "pooling": "mean"}
            ),  # the zoo's classifiers: head(mean_pool(encoder(text)))
            "statistics_dir": str(Path(statistics_dir) / spec.name),
        },
        "seed": seed,
    }


def compute_statistics(
    method: str,
    zoo: Zoo | LMZoo,
    point: GridPoint,
    calibration: BenchCalibration,
    statistics_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    progress: Any = None,
) -> Statistics:
    """Run (or reuse from ``statistics_dir``) the data phase of ``method`` at ``point``.

    The caller merges with ``Statistics.readers`` (``merge_state_dicts(..., statistics=...)``)
    and then calls ``close()``.
    """
    from mergelab.api import plan_merge
    from mergelab.informed.phase import run_data_phase

    recipe = calibration_recipe(method, zoo, point, calibration, statistics_dir, seed)
    plan = plan_merge(recipe)
    t0 = time.perf_counter()
    try:
        phase = run_data_phase(
            plan, device=calibration.device, progress=progress, seed=seed, workdir=Path(statistics_dir)
        )
    except BaseException:
        plan.close()
        raise
    return Statistics(
        list(phase.readers),
        time.perf_counter() - t0,
        {_portable(label): line for label, line in phase.summary.items()},
        dict(phase.side_files),
        phase.peak_bytes,
        phase.compute_seconds,
        phase,
        plan,
    )


def _portable(label: str) -> str:
    """An expert's label for the committed leaderboard: a path under the home folder written with ``~``."""
    home = str(Path.home())
    return "~" + label[len(home) :] if label == home or label.startswith(home + os.sep) else label
