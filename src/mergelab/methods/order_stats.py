"""Exact order statistics of float32 data of either sign, in memory or streamed in two passes.

Used by PCB-merging (``pcb``), whose clip and drop thresholds are order statistics of signed
scores, per tensor or over the whole model. (``sparsify``'s helpers cover magnitudes only.)

Each finite float32 value x is mapped to a 32-bit key that is monotone in x (for x ≥ 0 the bit
pattern with the sign bit set; for x < 0 the bit pattern with every bit flipped), split into a
high and a low 16-bit half. The k-th smallest value is found from a histogram of the high halves
(which bin holds it, and its rank inside the bin), then a histogram of the low halves of the
entries in that bin. Memory: two int32 keys per entry while one tensor is processed, and
2 × 65536 int64 counts per streamed statistic; no sort, no int64 index buffer.

-0.0 sorts just below +0.0; both compare equal as values, so thresholds are unaffected.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

BINS = 1 << 16


def split_keys(x: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 16-bit halves of the monotone keys of ``x`` (flattened), as int32 tensors."""
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32).reshape(-1)
    neg = bits < 0
    mag = bits & 0x7FFFFFFF
    high = torch.where(neg, 32767 - (mag >> 16), (bits >> 16) + 32768)
    low = torch.where(neg, 65535 - (mag & 0xFFFF), bits & 0xFFFF)
    return high, low


def key_to_float(high: int, low: int) -> float:
    """The float32 value whose monotone key is ``high << 16 | low``."""
    if high >= 32768:
        pattern = ((high - 32768) << 16) | low
    else:
        pattern = 0x80000000 | ((32767 - high) << 16) | (65535 - low)
        pattern -= 1 << 32
    return float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32)[0])


def high_histogram(x: Tensor) -> Tensor:
    """Counts of ``x`` per high key half (int64, ``BINS`` entries, on the CPU)."""
    high, _ = split_keys(x)
    return torch.bincount(high, minlength=BINS).cpu()


def low_histogram(x: Tensor, high_bin: int) -> Tensor:
    """Counts of the low key halves of the entries of ``x`` whose high half is ``high_bin``."""
    high, low = split_keys(x)
    return torch.bincount(low[high == high_bin], minlength=BINS).cpu()


def locate(hist: Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th smallest (1-based) item of a histogram, and its 1-based rank inside
    that bin. Requires ``1 ≤ k ≤ hist.sum()``."""
    total = int(hist.sum())
    if not 1 <= k <= total:
        raise ValueError(f"rank {k} outside 1..{total}")
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor([k], dtype=cum.dtype))[0])
    below = int(cum[b]) - int(hist[b])
    return b, k - below


#: Below this many entries a plain ``torch.kthvalue`` is cheaper than two 65536-bin histograms.
SMALL = 1 << 16


def kth_smallest(x: Tensor, k: int) -> float:
    """The k-th smallest (1-based) entry of a finite float tensor, exactly."""
    if not 1 <= k <= x.numel():
        raise ValueError(f"rank {k} outside 1..{x.numel()}")
    if x.numel() <= SMALL:
        return float(torch.kthvalue(x.detach().reshape(-1).float().cpu(), k).values)
    high, low = split_keys(x)
    b, r = locate(torch.bincount(high, minlength=BINS), k)
    inside = low[high == b]
    del high, low
    lo, _ = locate(torch.bincount(inside, minlength=BINS), r)
    return key_to_float(b, lo)


def sorted_at(x: Tensor, index: int) -> float:
    """``sorted(x)[index]`` (0-based, ascending; negative indices count from the end)."""
    n = x.numel()
    if index < 0:
        index += n
    return kth_smallest(x, index + 1)
