"""Chunks of flattened tensors, reusable scratch buffers and the per-expert thread pool.

The chunked task-vector loop (:mod:`mergelab.methods.stages.pipeline`) walks a tensor in
:data:`CHUNK`-entry slices, keeping every temporary in one :class:`Scratch`; selections and
random draws run one expert per thread through :func:`parallel_map`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

Tensor = torch.Tensor
T = TypeVar("T")
R = TypeVar("R")

CHUNK = 1 << 19
"""Elements per chunk for chunked per-tensor methods (2 MB in float32): small temporaries that
the allocator reuses instead of page-faulting tensor-sized ones in afresh, and a peak memory
of the inputs plus one output tensor. A TIES chunk's dozen live buffers then stay in the last-
level cache: measured 2**19 ≈ 100 ms, 2**20 ≈ 113 ms, 2**21 ≈ 140 ms per 11 M-entry tensor
with 3 experts on 2 cores."""


def flat_chunks(n: int, chunk: int | None = None) -> list[slice]:
    """Slices of ``range(n)`` of ``chunk`` elements (default :data:`CHUNK`), a multiple of 4 so
    that random draws (four 16-bit lanes per 64-bit word) stay aligned across chunks."""
    c = chunk or CHUNK
    c = max(4, c - c % 4)
    return [slice(i, min(n, i + c)) for i in range(0, n, c)]


def row_chunks(shape: torch.Size | tuple[int, ...], chunk: int | None = None) -> list[slice]:
    """Slices over the flattened tensor that cover whole rows (rows as in :func:`as_rows`),
    each (but the last) a multiple of 4 elements, like :func:`flat_chunks`."""
    n = math.prod(shape)
    if len(shape) < 2 or n == 0:
        return [slice(0, n)]
    cols = n // shape[0]
    align = 4 // math.gcd(cols, 4)
    rows_per = max(align, ((chunk or CHUNK) // max(cols, 1)) // align * align)
    return [slice(r * cols, min(shape[0], r + rows_per) * cols) for r in range(0, shape[0], rows_per)]


def as_rows(t: Tensor) -> Tensor:
    """2-D view for per-row operations: 0-D/1-D → one row; k-D (k ≥ 3) → (shape[0], rest)."""
    if t.dim() == 2:
        return t
    if t.dim() < 2:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


class Scratch:
    """Reusable buffers for chunk-by-chunk merges.

    ``take(name, m)`` returns the first ``m`` entries of a named float buffer, allocated on
    first use and grown when needed, so a loop over chunks allocates (and page-faults) its
    temporaries once instead of once per chunk.
    """

    def __init__(self, like: Tensor) -> None:
        self.device, self.dtype = like.device, like.dtype
        self._bufs: dict[str, Tensor] = {}

    def take(self, name: str, m: int) -> Tensor:
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < m:
            buf = self._bufs[name] = torch.empty(m, device=self.device, dtype=self.dtype)
        return buf[:m]


def scratch_view(scratch: Scratch | None, name: str, like: Tensor) -> Tensor:
    """A buffer shaped like ``like``: from ``scratch`` when given, else freshly allocated."""
    if scratch is None or like.dtype != scratch.dtype or like.device != scratch.device:
        return torch.empty_like(like)
    return scratch.take(name, like.numel()).view(like.shape)


_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    """One process-wide pool for :func:`parallel_map` (creating threads per chunk costs more
    than the work of a small chunk)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mergelab-select")
    return _EXECUTOR


#: Below this many entries per call :func:`parallel_map` runs sequentially (threads cost more).
PARALLEL_MIN_NUMEL = 1 << 17


def parallel_map(fn: Callable[[T], R], items: Sequence[T], *, numel: int) -> list[R]:
    """``[fn(x) for x in items]``, on up to ``torch.get_num_threads()`` threads when each call
    scans a large CPU tensor (``numel`` entries).

    The selections spend most of their time in NumPy comparisons, and DARE's masks in the
    random number generator, both of which run on one core and release the GIL: running the
    experts side by side uses the other cores. Results are identical to the sequential loop
    (each call is independent and every expert has its own generator).
    """
    workers = min(len(items), torch.get_num_threads(), 8)
    if workers <= 1 or numel < PARALLEL_MIN_NUMEL:
        return [fn(x) for x in items]
    return list(_executor().map(fn, items))
