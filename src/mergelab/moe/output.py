"""Streamed, atomic writing of an MoE checkpoint: the units of work the upcycler and the compressor plan.

A plan is a list of :class:`Unit`: the output tensors it produces (name, shape, dtype, known before
any data is read, so the shards are laid out up front) and a function that reads its inputs and
returns them. :func:`write_units` runs the units one after the other into a
:class:`~mergelab.checkpoint.writer.ShardedSafetensorsWriter` inside the run's
:class:`~mergelab.checkpoint.writer.AtomicOutputDir`: memory is one unit's tensors, and nothing is
published unless every tensor was written.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.checkpoint.reader import CheckpointReader
from mergelab.checkpoint.writer import ShardedSafetensorsWriter
from mergelab.errors import InputDataError, InternalError
from mergelab.executors.base import NoProgress, Progress


@dataclass(frozen=True)
class OutSpec:
    """One planned output tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = math.prod(self.shape)
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class Unit:
    """Outputs computed together (one copied tensor, one expert group's projection...)."""

    outputs: tuple[OutSpec, ...]
    compute: Callable[[], Mapping[str, torch.Tensor]]


def read_checked(reader: CheckpointReader, name: str) -> torch.Tensor:
    """One input tensor; NaN or Inf in a floating tensor is an :class:`InputDataError` naming it."""
    t = reader.read(name)
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise InputDataError(f"{reader.label}: tensor {name!r} holds NaN or Inf values; the input is corrupt")
    return t


@dataclass
class WriteStats:
    tensors: int
    bytes_written: int
    seconds: float


def write_units(
    folder: Path,
    units: Sequence[Unit],
    *,
    max_shard_size: int,
    progress: Progress | None = None,
    phase: str = "writing",
) -> WriteStats:
    """Run every unit and write its tensors into sharded safetensors in ``folder``."""
    specs = [o for u in units for o in u.outputs]
    names = [o.name for o in specs]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise InternalError(f"internal error: output tensor {dup!r} is planned twice")
    writer = ShardedSafetensorsWriter(folder, [(o.name, o.dtype, o.shape) for o in specs], max_shard_size)
    progress = progress or NoProgress()
    start = time.perf_counter()
    progress.begin(phase, len(specs), sum(o.nbytes for o in specs))
    try:
        for unit in units:
            values = unit.compute()
            for o in unit.outputs:
                t = values.get(o.name)
                if t is None or tuple(t.shape) != o.shape:
                    got = "nothing" if t is None else f"shape {list(t.shape)}"
                    raise InternalError(f"internal error: {o.name!r} produced {got}, planned {list(o.shape)}")
                writer.add(o.name, t)
                progress.advance(1, o.nbytes)
            del values
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        progress.end()
    return WriteStats(len(specs), writer.total_bytes, time.perf_counter() - start)


def model_card(title: str, lines: Sequence[str], recipe_yaml: str | None, version: str) -> str:
    """A short model card (front matter tags ``mergelab`` and ``moe``)."""
    body = "\n".join(f"- {line}" for line in lines)
    recipe = f"\n## Recipe\n\n```yaml\n{recipe_yaml.rstrip()}\n```\n" if recipe_yaml else ""
    return (
        "---\nlibrary_name: transformers\ntags:\n- mergelab\n- moe\n---\n\n"
        f"# {title}\n\nMade with mergelab {version}.\n\n{body}\n{recipe}"
    )
