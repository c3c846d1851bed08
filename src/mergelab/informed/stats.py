"""Statistics folders: what a data phase leaves for the merge.

One folder per expert, readable by :func:`mergelab.checkpoint.reader.open_checkpoint`:
safetensors files (sharded with an index when large) whose keys are ``"<tensor name>::<kind>"``
(``model.layers.0.mlp.up_proj.weight::gram``) and a ``statistics.json`` describing how they were
made (``kind``, ``key``, examples, settings). Kinds written by mergelab:

========== ================================ =========================================
kind       shape / dtype                     written by
========== ================================ =========================================
fisher     the tensor's shape, float32       ``fisher``: mean over examples of g²
gram       (d_in, d_in), float32             ``regmean``/``regmean_plusplus``: Σ x xᵀ
rows       scalar, float64                   number of input rows summed into ``gram``
in_out     scalar, float32 (1)               the weight is stored in × out (GPT-2 Conv1D)
lambda     scalar, float32                   ``adamerging``: the learned coefficient
========== ================================ =========================================

In memory the same format is a flat dict ``{"<tensor>::<kind>": tensor}`` (``merge_state_dicts(...,
statistics=[...])``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.reader import (
    CheckpointReader,
    StateDictReader,
    open_checkpoint,
)
from mergelab.checkpoint.writer import ShardedSafetensorsWriter
from mergelab.errors import CheckpointError, OptionError

SEP = "::"
META_FILE = "statistics.json"
FORMAT = "mergelab-statistics/1"


def key(name: str, kind: str) -> str:
    return f"{name}{SEP}{kind}"


def flatten(per_tensor: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{tensor: {kind: t}}`` → ``{"tensor::kind": t}``."""
    return {key(name, kind): t for name, kinds in per_tensor.items() for kind, t in kinds.items()}


def nested(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"tensor::kind": t}`` → ``{tensor: {kind: t}}``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, t in flat.items():
        name, sep, kind = k.rpartition(SEP)
        if not sep:
            raise OptionError(f"statistics key {k!r} is not of the form '<tensor name>::<kind>'")
        out.setdefault(name, {})[kind] = t
    return out


class StatisticsWriter:
    """Writes a statistics folder whose entries are all known up front (in any order).

    ``specs`` are ``(key, dtype, shape)``; tensors are streamed to disk as they are added (the
    sharded writer lays out every file first), so a data phase holds only the statistics it is
    still accumulating.
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        meta: Mapping[str, Any],
        max_shard_size: int = 2 * 10**9,
    ):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in (
            list(self.folder.glob("*.safetensors")) + list(self.folder.glob("*.index.json")) + [self.folder / META_FILE]
        ):
            if old.exists():
                old.unlink()
        self.specs = list(specs)
        self.meta = dict(meta)
        self._writer = ShardedSafetensorsWriter(self.folder, self.specs, max_shard_size)
        self.total_bytes = self._writer.total_bytes

    def add(self, k: str, tensor: torch.Tensor) -> None:
        self._writer.add(k, tensor)

    def finish(self, **extra_meta: Any) -> Path:
        self._writer.finish()
        meta = {"format": FORMAT, **self.meta, **extra_meta}
        (self.folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return self.folder

    def abort(self) -> None:
        self._writer.abort()


def write_statistics(
    folder: str | os.PathLike[str], flat: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
) -> Path:
    """Write an in-memory statistics dict as a folder."""
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in flat.items()]
    w = StatisticsWriter(folder, specs, meta or {})
    for k, t in flat.items():
        w.add(k, t)
    return w.finish()


def read_meta(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    p = Path(folder) / META_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def open_statistics(
    ref: str | os.PathLike[str] | Mapping[str, torch.Tensor] | CheckpointReader, label: str | None = None
) -> CheckpointReader:
    """A reader over a statistics folder, an in-memory statistics dict, or an open reader."""
    if isinstance(ref, Mapping):
        return StateDictReader(dict(ref), label or "<statistics>")
    if isinstance(ref, (str, os.PathLike)):
        path = Path(ref)
        if not path.exists():
            raise CheckpointError(f"{path}: statistics folder not found")
        return open_checkpoint(path)
    return ref
