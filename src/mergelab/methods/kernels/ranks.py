"""Per-row magnitude ranks (DELLA's MagPrune), exact and stable, never in bf16."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise

import torch

from mergelab.methods.kernels.chunks import as_rows

Tensor = torch.Tensor


def row_ranks(delta: Tensor) -> Tensor:
    """Normalised ascending magnitude rank per row, in [0, 1] (float32, delta's shape).

    Rows as :func:`mergelab.methods.kernels.chunks.as_rows`. Smallest |τ| of a row gets 0,
    largest gets 1; equal magnitudes get distinct ranks in index order (the order of a stable
    sort, see :func:`stable_row_order`). A row of length 1 gets 0.5. Ranks are integers until
    the final division, done in float32 (float64 for rows over 2**24).
    """
    rows = as_rows(delta)
    n_rows, n_cols = rows.shape
    if n_cols <= 1:
        return torch.full(delta.shape, 0.5, dtype=torch.float32, device=delta.device)
    order = stable_row_order(rows.abs())
    positions = torch.arange(n_cols, device=delta.device, dtype=torch.int32).expand(n_rows, -1)
    ranks = torch.empty(rows.shape, dtype=torch.int32, device=delta.device)
    ranks.scatter_(1, order, positions)
    del order
    work = torch.float32 if n_cols <= (1 << 24) else torch.float64
    r = ranks.to(work).div_(n_cols - 1)
    return r.to(torch.float32).reshape(delta.shape)


def stable_row_order(mag: Tensor) -> Tensor:
    """Per-row indices that sort the non-negative ``mag`` ascending, ties in index order (int64).

    On the CPU each entry becomes one int64 key ``float32 bits of |τ| << 32 | column``: the
    keys are distinct and ordered exactly as a stable argsort orders the entries, so NumPy's
    SIMD sort of plain integers gives the stable order at a fraction of the cost of
    ``torch.argsort(stable=True)`` (≈2x faster single-threaded here; rows are split over the
    torch thread count, NumPy releasing the GIL while it sorts). Elsewhere (and for rows of
    2**32 entries or more) a stable ``torch.argsort`` per row.
    """
    n_rows, n_cols = mag.shape
    if mag.device.type != "cpu" or n_cols >= (1 << 32):
        return torch.argsort(mag, dim=1, stable=True)
    keys = mag.float().contiguous().view(torch.int32).to(torch.int64)
    keys.bitwise_left_shift_(32).bitwise_or_(torch.arange(n_cols, dtype=torch.int64))
    keys_np = keys.numpy()
    workers = max(1, min(torch.get_num_threads(), n_rows, 8))
    if workers == 1 or keys.numel() < (1 << 18):
        keys_np.sort(axis=1)
    else:
        bounds = [n_rows * i // workers for i in range(workers + 1)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda ab: keys_np[ab[0] : ab[1]].sort(axis=1), pairwise(bounds)))
    return keys.bitwise_and_(0xFFFFFFFF)
