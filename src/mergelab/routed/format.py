"""The on-disk format of a routed output: constants, mask bit packing, the manifest.

A routed output folder (``mergelab merge`` with ``tall_masks`` or ``emr``)::

    OUT/
      config.json, tokenizer files, README.md, mergelab_recipe.yaml
      model.safetensors | model-0000k-of-0000n.safetensors + index     the shared model
      routed/
        manifest.json                                                   what follows, as JSON
        base/model.safetensors (or shards + index)                     θ0, output dtype
        masks/model.safetensors (or shards + index)                    bit-packed masks, uint8

Reconstruction of task t, for every tensor listed in the manifest (``routed_tensors``)::

    θ̂_t = θ0 + s_t · m_t ⊙ (shared − θ0)

with s_t the task's ``scale`` (1 for TALL masks, EMR's rescaler λ_t); when s_t = 1 it is the
exact selection ``where(m_t, shared, θ0)``. Every other tensor of the shared checkpoint
(non-float buffers) is copied unchanged.

Masks: for a tensor of n elements, the masks file holds a ``uint8`` tensor of the same name
with shape ``[T, ceil(n / 8)]``; row t is task t's boolean mask flattened in C order and packed
8 per byte, **little-endian bit order** (element 8·j + b is bit b of byte j, i.e.
``numpy.packbits(mask, bitorder="little")``); padding bits are 0.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from mergelab.checkpoint.writer import fmt_bytes
from mergelab.errors import CheckpointError, OptionError

FORMAT = "mergelab-routed"
FORMAT_VERSION = 1
FOLDER = "routed"
MANIFEST = "manifest.json"
BASE_FOLDER = "base"
MASKS_FOLDER = "masks"
BIT_ORDER: Final = "little"
RECONSTRUCTION = "theta_t = base + scale_t * mask_t * (shared - base)"


def packed_size(numel: int) -> int:
    """Bytes of one packed mask of ``numel`` elements."""
    return (numel + 7) // 8


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as flat ``uint8`` bytes, 8 elements per byte, little-endian bit order."""
    flat = mask.detach().to(device="cpu", dtype=torch.bool).reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat, bitorder=BIT_ORDER))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a boolean tensor of ``shape``."""
    numel = math.prod(shape)
    raw = packed.detach().to("cpu").reshape(-1).numpy()
    if raw.size != packed_size(numel):
        raise CheckpointError(
            f"packed mask has {raw.size} bytes, expected {packed_size(numel)} for shape {list(shape)}"
        )
    bits = np.unpackbits(raw, count=numel, bitorder=BIT_ORDER)
    return torch.from_numpy(bits.astype(np.bool_)).reshape(tuple(shape))


def task_names(labels: list[str], given: list[str | None] | None = None) -> list[str]:
    """Short unique names for the tasks: ``given[i]`` when set (a recipe model's ``name``), else the
    last path component of each model reference."""
    names = []
    for i, label in enumerate(labels):
        if given is not None and i < len(given) and given[i]:
            label = str(given[i])
        stem = Path(label.rstrip("/\\")).name or label
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_") or "task"
        names.append(stem)
    out = []
    for i, n in enumerate(names):
        out.append(n if names.count(n) == 1 else f"{n}-{i}")
    return out


def routed_dir(folder: str | Path) -> Path:
    return Path(folder).expanduser() / FOLDER


def is_routed(folder: str | Path) -> bool:
    """True when ``folder`` holds a routed output (a manifest in ``routed/``)."""
    return (routed_dir(folder) / MANIFEST).is_file()


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a routed output folder, validated (format and version)."""
    path = routed_dir(folder) / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: not a routed merge output (no {FOLDER}/{MANIFEST}); extract works on the output of "
            "a method with per-task parts (tall_masks, emr)"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot parse the manifest ({exc}); the output is corrupt") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} manifest")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format version {version} is not supported by this mergelab (reads version {FORMAT_VERSION}); "
            "upgrade mergelab"
        )
    for key in ("tasks", "routed_tensors"):
        if not isinstance(data.get(key), list):
            raise CheckpointError(f"{path}: manifest has no {key!r} list; the output is corrupt")
    return data


def resolve_entry(entries: list[dict[str, Any]], ref: str | int, noun: str, holder: str) -> dict[str, Any]:
    """The entry of ``ref`` in a manifest's list (``tasks``, ``experts``): its index, or its name or the model
    reference it came from when exactly one entry has it; else a one-line error listing the entries."""
    if isinstance(ref, int) or (isinstance(ref, str) and ref.strip().lstrip("-").isdigit()):
        idx = int(ref)
        if 0 <= idx < len(entries):
            return entries[idx]
    else:
        for key in ("name", "model"):
            hits = [e for e in entries if e.get(key) == ref]
            if len(hits) == 1:
                return hits[0]
    listing = ", ".join(f"{e['index']}={e['name']}" for e in entries)
    raise OptionError(f"unknown {noun} {ref!r}; {holder} has: {listing}")


def resolve_task(manifest: dict[str, Any], task: str | int) -> dict[str, Any]:
    """The manifest entry of ``task``: its name, its index, or the model reference it came from."""
    return resolve_entry(manifest["tasks"], task, "task", "this output")


def format_storage(storage: dict[str, Any]) -> str:
    """One line: shared + parts versus N separate experts."""
    t = storage["tasks"]
    return (
        f"storage: shared model {fmt_bytes(storage['shared_bytes'])} + base {fmt_bytes(storage['base_bytes'])} "
        f"+ masks {fmt_bytes(storage['masks_bytes'])} ({fmt_bytes(storage['per_task_bytes'])} per task) "
        f"= {fmt_bytes(storage['total_bytes'])} vs {t} separate experts {fmt_bytes(storage['separate_experts_bytes'])} "
        f"({100 * storage['ratio']:.1f} %)"
    )
