"""The zoo as a calibration source of the core: recipes name ``zoo:<task>[:<split>]`` (or
``{zoo_task: ..., split: ..., head: zoo}``) and the core reads them through the kind registered
here (:func:`mergelab.data.sources.register_source_kind`), never by importing the zoo.

:func:`register` runs when :mod:`mergelab_bench` is imported and, for the command line, through
the ``mergelab.data_sources`` entry point.
"""

from __future__ import annotations

from pathlib import Path

from mergelab.data.config import CalibrationSource
from mergelab.data.sources import Examples, register_source_kind


def zoo_split_examples(source: CalibrationSource, limit: int | None) -> Examples:
    """The first ``limit`` rows of a zoo task's split: texts, label names and the task's labels."""
    from mergelab_bench.zoo.build import load_zoo

    assert source.zoo_task is not None
    data = load_zoo(source.zoo).data(source.zoo_task)
    rows = data.rows(source.split, limit)
    return Examples(
        [r["text"] for r in rows], [r["label"] for r in rows], list(data.labels), ids=[str(r["key"]) for r in rows]
    )


def zoo_task_head(source: CalibrationSource) -> Path:
    """The expert head file of a zoo task (``head.safetensors`` beside the expert checkpoint)."""
    from mergelab_bench.zoo.build import load_zoo

    assert source.zoo_task is not None
    return load_zoo(source.zoo).expert_dir(source.zoo_task) / "head.safetensors"


def register() -> None:
    """Register the ``zoo`` calibration-source kind with the core."""
    register_source_kind("zoo", zoo_split_examples, head=zoo_task_head)
