"""Rebuild one task's model from a routed output: a plain Hugging Face checkpoint.

Streams tensor by tensor: reads the shared tensor, θ0 and the task's row of the packed mask
(only that row's bytes), computes θ̂_t = θ0 + s_t·m_t ⊙ (shared − θ0) in float32 (the exact
selection ``where(m_t, shared, θ0)`` when s_t = 1), casts to the shared tensor's dtype and
writes it in place. The output goes to a temporary folder renamed into place when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.reader import open_checkpoint
from mergelab.checkpoint.safetensors_file import StEntry, pread_tensor, read_header
from mergelab.checkpoint.writer import (
    DEFAULT_MAX_SHARD,
    AtomicOutputDir,
    ShardedSafetensorsWriter,
    copy_side_files_of,
    parse_size,
)
from mergelab.errors import CheckpointError
from mergelab.routed.format import (
    BASE_FOLDER,
    MASKS_FOLDER,
    packed_size,
    read_manifest,
    resolve_task,
    routed_dir,
    unpack_mask,
)


class _StFolder:
    """The tensors of one safetensors folder (index + shards, or model.safetensors), read by ``pread``."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(f"{index}: corrupt index ({exc}); the output is corrupt") from exc
            paths = [folder / f for f in files]
        else:
            paths = [folder / "model.safetensors"]
        self.entries: dict[str, tuple[Path, StEntry]] = {}
        for p in paths:
            if not p.is_file():
                raise CheckpointError(f"{p}: missing; the routed output is incomplete")
            entries, _ = read_header(p)
            for name, e in entries.items():
                self.entries[name] = (p, e)
        self._fds: dict[Path, int] = {}

    def _fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def entry(self, name: str) -> tuple[Path, StEntry]:
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.folder}: no tensor {name!r}; the routed output is corrupt") from None

    def read(self, name: str) -> torch.Tensor:
        path, e = self.entry(name)
        return pread_tensor(self._fd(path), e, path)

    def read_row(self, name: str, row: int) -> torch.Tensor:
        """Row ``row`` of a 2-D tensor, reading only its bytes."""
        path, e = self.entry(name)
        width = e.shape[1] * e.dtype.itemsize
        sub = StEntry(name, e.dtype, (e.shape[1],), e.begin + row * width, e.begin + (row + 1) * width)
        return pread_tensor(self._fd(path), sub, path)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


@dataclass
class ExtractResult:
    """Where the task's model went and what it holds."""

    path: Path
    task: dict[str, Any]
    tensors: int
    bytes_written: int
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)


def reconstruct(shared: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """θ̂ = θ0 + s·m ⊙ (shared − θ0), in the shared tensor's dtype (a pure selection when s = 1)."""
    if scale == 1.0:
        return torch.where(mask, shared, base.to(shared.dtype))
    b = base.float()
    out = torch.where(mask, b + scale * (shared.float() - b), b)
    return out.to(shared.dtype)


def iter_task_tensors(folder: str | Path, task: str | int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of task ``task``'s model, one at a time, in the shared checkpoint's order."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    entry = resolve_task(manifest, task)
    t, scale = int(entry["index"]), float(entry["scale"])
    n_tasks = len(manifest["tasks"])
    routed = set(manifest["routed_tensors"])
    shared = open_checkpoint(folder)
    root = routed_dir(folder)
    base = _StFolder(root / BASE_FOLDER)
    masks = _StFolder(root / MASKS_FOLDER)
    try:
        metas = shared.tensors()
        absent = [n for n in routed if n not in metas]
        if absent:
            raise CheckpointError(f"{folder}: the manifest lists tensor {absent[0]!r} that the shared model lacks")
        for name, meta in metas.items():
            value = shared.read(name)
            if name in routed:
                _, me = masks.entry(name)
                if me.shape != (n_tasks, packed_size(meta.numel)) or me.dtype != torch.uint8:
                    raise CheckpointError(
                        f"{folder}: packed masks of {name!r} have shape {list(me.shape)}; the output is corrupt"
                    )
                b = base.read(name)
                if tuple(b.shape) != tuple(meta.shape):
                    raise CheckpointError(
                        f"{folder}: base tensor {name!r} has shape {list(b.shape)}, shared has {list(meta.shape)}"
                    )
                m = unpack_mask(masks.read_row(name, t), meta.shape)
                value = reconstruct(value, b, m, scale)
            yield name, value
    finally:
        shared.close()
        base.close()
        masks.close()


def task_state_dict(folder: str | Path, task: str | int) -> dict[str, torch.Tensor]:
    """Task ``task``'s model as an in-memory state dict (for evaluation without writing it)."""
    return dict(iter_task_tensors(folder, task))


def _card(manifest: dict[str, Any], task: dict[str, Any], source: Path) -> str:
    return "\n".join(
        [
            "---",
            "library_name: transformers",
            "tags: [merge, mergelab, " + str(manifest.get("method")) + "]",
            "---",
            "",
            f"# {task['name']} (extracted)",
            "",
            (
                f"Task {task['index']} (`{task['model']}`) rebuilt with `mergelab extract` from the "
                f"{manifest.get('method')} output `{source}`:"
            ),
            "",
            f"    {manifest.get('reconstruction')}",
            "",
            (
                f"with scale {task['scale']:.6g} and a mask keeping {100 * task.get('mask_density', 0):.2f} % of the "
                "routed weights."
            ),
            "",
        ]
    )


def extract(
    folder: str | os.PathLike[str],
    task: str | int,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    force_any: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
) -> ExtractResult:
    """Write task ``task`` (name, index or model reference) of the routed output ``folder`` (a
    TALL-masks / EMR output, or a routed-model folder: :func:`extract_expert`)
    as a plain Hugging Face checkpoint in ``out`` (atomic; ``out`` must not exist unless
    ``force``, which replaces a previous mergelab output, or ``force_any``; never ``folder`` itself,
    a folder holding it or one inside it). Config and tokenizer files are copied from ``folder``."""
    src = Path(folder).expanduser()
    from mergelab.routed.bundle import is_bundle

    if is_bundle(src):
        return extract_expert(src, task, out, force=force, force_any=force_any, max_shard_size=max_shard_size)
    manifest = read_manifest(src)
    entry = resolve_task(manifest, task)
    path, n, nbytes = _write_checkpoint(
        out,
        src,
        iter_task_tensors(src, int(entry["index"])),
        lambda: _card(manifest, entry, src),
        role="routed output",
        inputs_root=src,
        force=force,
        force_any=force_any,
        max_shard_size=max_shard_size,
    )
    return ExtractResult(path=path, task=entry, tensors=n, bytes_written=nbytes, manifest=manifest)


def _write_checkpoint(
    out: str | os.PathLike[str],
    layout: Path,
    tensors: Iterator[tuple[str, torch.Tensor]],
    card: Callable[[], str],
    *,
    role: str,
    inputs_root: Path,
    force: bool,
    force_any: bool,
    max_shard_size: str | int,
) -> tuple[Path, int, int]:
    """Write ``tensors`` as a plain checkpoint in ``out`` (atomic), laid out as the checkpoint ``layout``
    (names, dtypes, shapes), with ``layout``'s config and tokenizer files and the model card ``card()``;
    ``inputs_root`` (the ``role`` of the run) may not be the destination. (path, tensors, bytes written)."""
    shard_bytes = parse_size(max_shard_size)
    dest = AtomicOutputDir(out, force=force, force_any=force_any, inputs=[(role, inputs_root)], kind="extract")
    try:
        reader = open_checkpoint(layout)
        try:
            items = [(m.name, m.dtype, m.shape) for m in reader.tensors().values()]
        finally:
            reader.close()
        writer = ShardedSafetensorsWriter(dest.tmp, items, shard_bytes)
        n = 0
        try:
            for name, value in tensors:
                writer.add(name, value)
                n += 1
            writer.finish()
        finally:
            writer.abort()
        copy_side_files_of(layout, dest.tmp)
        (dest.tmp / "README.md").write_text(card())
        path = dest.commit()
    except BaseException as exc:
        dest.fail(exc)
        raise
    return path, n, writer.total_bytes


# --------------------------------------------------------------------------------------------
# routed-model folders (twin_merging, split_merge, smile, wemoe)


def iter_expert_tensors(folder: str | Path, expert: str | int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of route ``expert``'s model: ``shared/`` with the expert's adapter applied as
    PEFT's ``merge_and_unload`` would (:class:`mergelab.lora.reader.AdapterReader`), tensor by tensor."""
    from mergelab.routed.bundle import SHARED, read_bundle_manifest, resolve_expert

    folder = Path(folder).expanduser()
    manifest = read_bundle_manifest(folder)
    entry = resolve_expert(manifest, expert)
    shared = open_checkpoint(folder / SHARED)
    adapted = open_checkpoint(folder / entry["adapter"], base=shared)
    try:
        for name, meta in shared.tensors().items():
            yield name, adapted.read(name).to(meta.dtype)
    finally:
        adapted.close()
        shared.close()


def expert_state_dict(folder: str | Path, expert: str | int) -> dict[str, torch.Tensor]:
    """Route ``expert``'s model of a routed-model folder as an in-memory state dict."""
    return dict(iter_expert_tensors(folder, expert))


def extract_expert(
    folder: str | os.PathLike[str],
    expert: str | int,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    force_any: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
) -> ExtractResult:
    """Write route ``expert`` of the routed-model folder ``folder`` as a plain checkpoint in ``out``
    (atomic, as :func:`extract`): ``shared/`` + that expert's adapter, merged."""
    from mergelab.routed.bundle import SHARED, read_bundle_manifest, resolve_expert

    src = Path(folder).expanduser()
    manifest = read_bundle_manifest(src)
    entry = resolve_expert(manifest, expert)

    def card() -> str:
        return "\n".join(
            [
                "---",
                "library_name: transformers",
                f"tags: [merge, mergelab, {manifest.get('method')}]",
                "---",
                "",
                f"# {entry['name']} (extracted)",
                "",
                f"Route {entry['index']} (`{entry['model']}`) of the {manifest.get('method')} routed model "
                f"`{src}`: `shared/` with `{entry['adapter']}/` applied (PEFT's merge_and_unload), rebuilt by "
                "`mergelab extract`.",
                "",
            ]
        )

    path, n, nbytes = _write_checkpoint(
        out,
        src / SHARED,
        iter_expert_tensors(src, int(entry["index"])),
        card,
        role="routed model",
        inputs_root=src,
        force=force,
        force_any=force_any,
        max_shard_size=max_shard_size,
    )
    return ExtractResult(path=path, task=entry, tensors=n, bytes_written=nbytes, manifest=manifest)
