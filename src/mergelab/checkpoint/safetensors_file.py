"""Reading and laying out safetensors files without memory maps.

`safetensors.safe_open(...).get_tensor` returns a view of a memory map, and mapped pages count
in a process's RSS once touched: a merge that reads through it holds whole shards resident.
mergelab instead parses the (tiny, JSON) header itself and reads each tensor's byte range with
``pread`` into a fresh buffer, so resident memory is bounded by the tensors in flight.
The header is validated against the file size, so a truncated or corrupt file is reported by
name before any merge work starts.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data; offsets are relative to byte 8 + N.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.errors import CheckpointError

ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        ST_TO_TORCH[_name] = getattr(torch, _attr)
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024


def dtype_size(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class StEntry:
    """Where one tensor lies in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: Path) -> tuple[dict[str, StEntry], dict[str, str]]:
    """Parse and validate the header of ``path``; returns (entries, metadata).

    Raises CheckpointError naming the file when it is truncated, corrupt or uses a dtype
    torch cannot represent.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes); re-download or re-save it")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors header (declares {n} header bytes, file has {size}); "
                    "re-download or re-save this file"
                )
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc}); check the path and permissions") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc}); re-download or re-save this file") from exc
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    entries: dict[str, StEntry] = {}
    for name, info in header.items():
        try:
            st_dtype = info["dtype"]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{path}: corrupt header entry for tensor {name!r}; re-download or re-save this file"
            ) from exc
        if st_dtype not in ST_TO_TORCH:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {st_dtype} that torch {torch.__version__} cannot hold"
            )
        dtype = ST_TO_TORCH[st_dtype]
        expected = math.prod(shape) * dtype_size(dtype)
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} declares {end - begin} bytes "
                f"but shape {list(shape)} {st_dtype} needs {expected}; "
                "the file is corrupt"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end} "
                f"but the file has {size} bytes; "
                "re-download or re-save it"
            )
        entries[name] = StEntry(name, dtype, shape, data_start + begin, data_start + end)
    return entries, {str(k): str(v) for k, v in metadata.items()}


def pread_into(fd: int, view: memoryview, offset: int, path: Path, name: str) -> None:
    """Fill ``view`` with the file's bytes from ``offset`` on, by positional reads (no memory map).

    Raises CheckpointError naming the file and the tensor ``name`` when the file ends first (it
    was cut short after its header was checked).
    """
    done, size = 0, len(view)
    while done < size:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise CheckpointError(
                f"{path}: unexpected end of file while reading tensor {name!r}; the file is truncated"
            )
        done += got


def tensor_reads(fd: int, entry: StEntry, path: Path, part_bytes: int) -> tuple[torch.Tensor, list[Callable[[], None]]]:
    """A fresh, not yet filled buffer for one tensor and the positional reads that fill it.

    Each read covers at most ``part_bytes`` of the tensor, a disjoint range of the buffer, so the
    reads may run on several threads at once (``preadv`` releases the GIL); the tensor holds its
    data once every read has returned. A tensor of no bytes needs no read.
    """
    if part_bytes < 1:
        raise ValueError(f"part_bytes must be at least 1, got {part_bytes}")
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    reads: list[Callable[[], None]] = []
    if entry.nbytes:
        view = memoryview(buf.numpy())  # type: ignore[arg-type]  # numpy stubs: ndarray.__buffer__ only on Python >= 3.12
        for start in range(0, entry.nbytes, part_bytes):
            part = view[start : min(start + part_bytes, entry.nbytes)]
            reads.append(functools.partial(pread_into, fd, part, entry.begin + start, path, entry.name))
    if entry.dtype == torch.uint8:
        return buf.reshape(entry.shape), reads
    return buf.view(entry.dtype).reshape(entry.shape), reads


def pread_tensor(fd: int, entry: StEntry, path: Path) -> torch.Tensor:
    """Read one tensor's bytes into a fresh buffer (no memory map), in one positional read."""
    t, reads = tensor_reads(fd, entry, path, max(entry.nbytes, 1))
    for read in reads:
        read()
    return t


def layout_header(
    items: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None = None
) -> tuple[bytes, dict[str, int]]:
    """Header bytes (length prefix included, padded to 8) and each tensor's absolute offset.

    Used by the streaming writer: the whole layout of a shard is known from the plan, so
    tensors can be written in place as they are produced.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    rel: dict[str, int] = {}
    for name, dtype, shape in items:
        nbytes = math.prod(shape) * dtype_size(dtype)
        header[name] = {"dtype": TORCH_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        rel[name] = offset
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((8 - len(raw) % 8) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, {name: len(prefix) + off for name, off in rel.items()}
