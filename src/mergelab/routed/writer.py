"""The parts sink of a routed merge: streams θ0 and the bit-packed masks as tensors arrive.

The engine hands :meth:`PartsWriter.add` one tensor's parts at a time (``{"base": θ0,
"mask": [bool tensor per task], "scale": [float per task]}``). Both files are laid out in
advance from the plan (every merged tensor's name and shape is known) and written in place
with the checkpoint writer, so memory stays at one tensor's parts whatever the model size.
:meth:`PartsWriter.finish` checks completeness and writes the manifest with the storage report.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.reader import weight_files
from mergelab.checkpoint.writer import DEFAULT_MAX_SHARD, ShardedSafetensorsWriter
from mergelab.errors import InternalError, OutputError
from mergelab.routed.format import (
    BASE_FOLDER,
    BIT_ORDER,
    FOLDER,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MASKS_FOLDER,
    RECONSTRUCTION,
    format_storage,
    pack_mask,
    packed_size,
    task_names,
)


def _folder_bytes(folder: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in folder.glob(pattern) if f.is_file())


def shared_checkpoint_bytes(folder: Path) -> int:
    """Bytes of the weights of the HF checkpoint in ``folder`` (safetensors files + index)."""
    return _folder_bytes(folder, "*.safetensors") + _folder_bytes(folder, "*.safetensors.index.json")


class PartsWriter:
    """Writes ``FOLDER/routed/`` for one routed merge (see :mod:`mergelab.routed.format`)."""

    def __init__(self, folder: str | Path, plan: Any, max_shard_size: int = DEFAULT_MAX_SHARD):
        self.folder = Path(folder)
        self.root = self.folder / FOLDER
        self.plan = plan
        self.jobs = {j.name: j for j in plan.merge_jobs}
        self.n_tasks = len(plan.experts)
        for sub in (BASE_FOLDER, MASKS_FOLDER):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._base = ShardedSafetensorsWriter(
            self.root / BASE_FOLDER, [(j.name, j.out_dtype, j.shape) for j in plan.merge_jobs], max_shard_size
        )
        self._masks = ShardedSafetensorsWriter(
            self.root / MASKS_FOLDER,
            [(j.name, torch.uint8, (self.n_tasks, packed_size(j.numel))) for j in plan.merge_jobs],
            max_shard_size,
        )
        self._ones = [0] * self.n_tasks
        self._params = 0
        self._scales: list[float] | None = None
        self._done: set[str] = set()

    def add(self, name: str, parts: dict[str, Any]) -> None:
        """Write one tensor's θ0 and packed masks; record the per-task scales."""
        job = self.jobs.get(name)
        if job is None:
            raise InternalError(f"internal error: parts for tensor {name!r} that the plan does not merge")
        missing = {"base", "mask"} - set(parts)
        if missing:
            raise InternalError(f"internal error: parts of tensor {name!r} lack {sorted(missing)}")
        masks: Sequence[torch.Tensor] = parts["mask"]
        if len(masks) != self.n_tasks:
            raise InternalError(f"internal error: {len(masks)} masks for {self.n_tasks} tasks in tensor {name!r}")
        scales = [float(s) for s in parts.get("scale", [1.0] * self.n_tasks)]
        if self._scales is None:
            self._scales = scales
        elif scales != self._scales:
            raise InternalError(
                f"tensor {name!r}: per-task scales {scales} differ from {self._scales}; the routed format "
                "holds one scale per task"
            )
        rows = []
        for t, m in enumerate(masks):
            if m.numel() != job.numel:
                raise InternalError(
                    f"internal error: mask of task {t} for tensor {name!r} has {m.numel()} elements, "
                    f"expected {job.numel}"
                )
            self._ones[t] += int(m.sum())
            rows.append(pack_mask(m))
        self._masks.add(name, torch.stack(rows) if rows else torch.empty(0, packed_size(job.numel), dtype=torch.uint8))
        self._base.add(name, parts["base"])
        self._params += job.numel
        self._done.add(name)

    def abort(self) -> None:
        self._base.abort()
        self._masks.abort()

    def __del__(self) -> None:  # close file descriptors if a failed merge never called finish()
        with contextlib.suppress(OSError, AttributeError):
            self.abort()

    def finish(self, run_stats: Any = None) -> dict[str, Any]:
        """Complete both files and write the manifest (with the storage report); returns it."""
        try:
            self._base.finish()
            self._masks.finish()
        finally:
            self.abort()
        missing = [n for n in self.jobs if n not in self._done]
        if missing:
            raise OutputError(f"internal error: no parts for {len(missing)} merged tensors (first: {missing[0]})")
        manifest = self._manifest(run_stats)
        (self.root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return manifest

    # ------------------------------------------------------------------------------------

    def _manifest(self, run_stats: Any) -> dict[str, Any]:
        plan = self.plan
        labels = [r.label for r in plan.experts]
        entries = plan.recipe.models if plan.recipe.slices is None else []
        given = [m.name for m in entries] if len(entries) == len(labels) else None
        names = task_names(labels, given)
        scales = self._scales or [1.0] * self.n_tasks
        tasks = []
        for t in range(self.n_tasks):
            mp = plan.global_model_params[t] if t < len(plan.global_model_params) else None
            tasks.append(
                {
                    "index": t,
                    "name": names[t],
                    "model": labels[t],
                    "scale": scales[t],
                    "parameters": mp.model_dump(by_alias=True, mode="json") if mp is not None else {},
                    "mask_ones": self._ones[t],
                    "mask_density": self._ones[t] / self._params if self._params else 0.0,
                }
            )
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": plan.method.name,
            "parameters": plan.global_params.model_dump(by_alias=True, mode="json"),
            "reconstruction": RECONSTRUCTION,
            "base_model": plan.base.label if plan.base is not None else None,
            "tasks": tasks,
            "base": {"folder": BASE_FOLDER, "dtype": "as the shared model"},
            "masks": {
                "folder": MASKS_FOLDER,
                "dtype": "uint8",
                "bit_order": BIT_ORDER,
                "layout": "one tensor per routed tensor, shape [tasks, ceil(numel / 8)]; row t is task t's "
                "mask flattened in C order, 8 elements per byte",
            },
            "routed_tensors": list(self.jobs),
            "parameters_routed": self._params,
        }
        try:
            from mergelab import __version__

            manifest["mergelab_version"] = __version__
        except ImportError:  # pragma: no cover
            pass
        manifest["storage"] = self._storage()
        if run_stats is not None and getattr(run_stats, "seconds", None) is not None:
            manifest["merge_seconds"] = round(float(run_stats.seconds), 3)
        return manifest

    def _storage(self) -> dict[str, Any]:
        shared = shared_checkpoint_bytes(self.folder)
        base = _folder_bytes(self.root / BASE_FOLDER)
        masks = _folder_bytes(self.root / MASKS_FOLDER)
        total = shared + base + masks
        separate = self.n_tasks * shared
        storage: dict[str, Any] = {
            "tasks": self.n_tasks,
            "shared_bytes": shared,
            "base_bytes": base,
            "masks_bytes": masks,
            "per_task_bytes": math.ceil(masks / self.n_tasks) if self.n_tasks else 0,
            "total_bytes": total,
            "separate_experts_bytes": separate,
            "ratio": total / separate if separate else 0.0,
            "note": "separate_experts_bytes = tasks × the shared checkpoint's size (each extracted expert has "
            "exactly its layout); the manifest itself is not counted",
        }
        try:
            inputs = sum(f.stat().st_size for r in self.plan.experts for f in weight_files(r) if f.is_file())
        except OSError:
            inputs = 0
        if inputs:
            storage["input_experts_bytes"] = inputs
        storage["summary"] = format_storage(storage)
        return storage


def open_parts_writer(folder: str | Path, plan: Any, max_shard_size: int = DEFAULT_MAX_SHARD) -> PartsWriter:
    """The parts sink ``mergelab.api.merge`` uses for methods registered with ``outputs="routed"``."""
    return PartsWriter(folder, plan, max_shard_size)
