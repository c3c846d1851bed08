"""Exact order statistics by selection, never by sorting: magnitudes and signed values.

Two families, one set of names:

* **Magnitudes** (non-negative data, |τ|): the float32 bit pattern of a non-negative float read
  as int32 is monotone in the value, so a radix select over its high 16 bits
  (:data:`MAGNITUDE_HIGH_BINS` = 2**15 bins: the sign bit is 0) then its low 16 bits
  (:data:`MAGNITUDE_LOW_BINS` = 2**16) finds the k-th **largest** exactly:
  :func:`kth_largest` (in memory), :func:`kth_largest_magnitude` (of ``|x − minus|`` without
  materialising it, Floyd–Rivest bracket + exact fallback), and the model-wide pieces
  :func:`magnitude_high_histogram`, :func:`magnitude_low_histogram`,
  :func:`locate_from_top` and :func:`magnitude_bits_to_float` (TIES ``scope: global``).
* **Signed values** (PCB's scores): each finite float32 maps to a monotone 32-bit key (for
  x ≥ 0 the bit pattern with the sign bit set; for x < 0 every bit flipped), split into two
  16-bit halves of :data:`SIGNED_BINS` = 2**16 bins; the k-th **smallest** comes from
  :func:`kth_smallest` / :func:`sorted_at`, model-wide from :func:`signed_high_histogram`,
  :func:`signed_low_histogram`, :func:`locate_from_bottom` and :func:`signed_key_to_float`.
  -0.0 sorts just below +0.0; both compare equal as values, so thresholds are unaffected.

Entries tied with a threshold are all kept by the masks built on these thresholds (so the kept
count can exceed k when values repeat), as the original TIES code does.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from mergelab.methods.kernels import chunks as _chunks
from mergelab.methods.kernels.chunks import flat_chunks

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# Magnitudes: k-th largest of non-negative data
# --------------------------------------------------------------------------------------------


def keep_count(n: int, density: float, *, at_least_one: bool = False) -> int:
    """``⌊density · n⌋`` clipped to [0, n]; with ``at_least_one`` a positive density keeps ≥ 1."""
    if n <= 0 or density <= 0:
        return 0
    if density >= 1:
        return n
    k = min(n, int(density * n))
    if at_least_one:
        k = max(k, 1)
    return k


def kth_largest(mag: Tensor, k: int) -> float:
    """The k-th largest (1-based) entry of a non-negative tensor, exactly, by selection.

    A two-level radix select on the float32 bit patterns (monotone for non-negative floats):
    a histogram of the high 16 bits finds the bin holding the k-th largest, a histogram of the
    low 16 bits inside that bin finds the value. O(n), temporaries of about 1.25 × the input
    (``torch.kthvalue`` needs about 2 × and is ~2.5 × slower on CPU). The model-wide TIES
    passes use the same two histograms, accumulated over tensors.
    """
    bits = _bits(mag)
    high = _high_half(bits)
    b, r = locate_from_top(torch.bincount(high, minlength=MAGNITUDE_HIGH_BINS), k)
    inside = bits[high == b]
    del high
    low_bits, _ = locate_from_top(torch.bincount(inside & 0xFFFF, minlength=MAGNITUDE_LOW_BINS), r)
    return magnitude_bits_to_float(b, low_bits)


SAMPLE = 1 << 15
"""Entries sampled by :func:`kth_largest_magnitude` to bracket the k-th largest magnitude."""

SAMPLE_SIGMAS = 5.0
"""Half-width of the bracket in binomial standard deviations of the sampled rank; the exact
fallback runs when the k-th largest falls outside (probability below 1e-6 per call)."""


def kth_largest_magnitude(x: Tensor, k: int, minus: Tensor | None = None) -> float:
    """The k-th largest (1-based) of ``|x − minus|`` (or ``|x|``), exactly, in one pass.

    Floyd–Rivest style selection: the sorted magnitudes of :data:`SAMPLE` random entries give a
    bracket ``[lo, hi]`` that holds the k-th largest with overwhelming probability; one chunked
    pass counts the entries above ``hi`` and keeps those inside the bracket (a few % of n); the
    answer is then selected among those. If the bracket misses, the exact two-histogram radix
    select (:func:`kth_largest`, chunked) runs instead, so the result is exact either way and
    only the speed depends on the sample (drawn from a fixed seed). Compared with two radix
    passes this halves the work and never builds a tensor-sized temporary; ``minus`` lets TIES
    select on the task vector ``expert − base`` without materialising it.
    """
    xf = x.reshape(-1)
    mf = minus.reshape(-1) if minus is not None else None
    n = xf.numel()
    if not 1 <= k <= n:
        raise ValueError(f"rank {k} outside 1..{n}")
    dtype = torch.promote_types(xf.dtype, mf.dtype) if mf is not None else xf.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        # float64 (or other) compute: select in that dtype, as the caller compares in it
        mag = (xf - mf).abs() if mf is not None else xf.abs()
        return float(torch.kthvalue(mag.cpu(), n - k + 1).values)
    if n <= 4 * SAMPLE:
        # |x − minus| rounded as the caller computes it (in x's dtype), then widened exactly
        mag = (xf - mf).float().abs_() if mf is not None else xf.float().abs()
        return kth_largest(mag, k)
    lo, hi = _bracket(xf, mf, k)
    above = 0
    parts: list[Tensor] = []
    size = min(n, _chunks.CHUNK)
    buf = torch.empty(size, dtype=torch.float32, device=xf.device)
    masks = _BandMasks(size, xf.device)
    for sl in flat_chunks(n):
        d = buf[: sl.stop - sl.start]
        if mf is not None:
            if dtype == torch.float32:
                torch.sub(xf[sl], mf[sl], out=d)
            else:  # bf16/fp16: round the difference as the caller does, then widen (exact)
                d.copy_(xf[sl] - mf[sl])
        else:
            d.copy_(xf[sl])
        d.abs_()
        count, values = masks.split(d, lo, hi)
        above += count
        parts.append(values)
    inside = torch.cat(parts) if len(parts) > 1 else parts[0]
    need = k - above
    if 1 <= need <= inside.numel():
        return kth_largest(inside, need)
    if lo <= 0.0 and need > inside.numel():
        return 0.0  # every entry left is exactly 0
    return _kth_largest_chunked(xf, mf, k)


def _bracket(xf: Tensor, mf: Tensor | None, k: int) -> tuple[float, float]:
    """``(lo, hi)`` around the k-th largest of ``|xf − mf|`` from a stratified sample of
    :data:`SAMPLE` entries (one uniform pick per stride, fixed seed): ±:data:`SAMPLE_SIGMAS`
    binomial standard deviations of the sampled rank. ``hi`` is ``inf`` and ``lo`` is 0 where
    the bracket reaches past the largest or smallest sampled value."""
    n = xf.numel()
    stride = n // SAMPLE
    gen = torch.Generator(device=xf.device).manual_seed(0x5EED)
    idx = torch.arange(SAMPLE, device=xf.device) * stride
    idx += torch.randint(0, stride, (SAMPLE,), generator=gen, device=xf.device)
    sample = xf[idx].float()
    if mf is not None:
        sample.sub_(mf[idx].float())
    sample.abs_()
    q = k / n
    slack = max(0.0, SAMPLE_SIGMAS * math.sqrt(SAMPLE * q * (1.0 - q)) + 8.0)
    r_hi = math.floor(q * SAMPLE - slack)  # ranks from the top (1-based) of the bracket's ends
    r_lo = math.ceil(q * SAMPLE + slack)
    wanted = [SAMPLE - r for r in (r_hi, r_lo) if 1 <= r <= SAMPLE]  # 0-based ascending positions
    values: dict[int, float] = {}
    if wanted:
        if sample.device.type == "cpu":
            part = torch.from_numpy(np.partition(sample.numpy(), wanted))
            values = {p: float(part[p]) for p in wanted}
        else:
            values = {p: float(torch.kthvalue(sample, p + 1).values) for p in wanted}
    hi = values[SAMPLE - r_hi] if 1 <= r_hi <= SAMPLE else math.inf
    lo = values[SAMPLE - r_lo] if 1 <= r_lo <= SAMPLE else 0.0
    return lo, hi


class _BandMasks:
    """Scratch masks that split a chunk of magnitudes at a bracket ``[lo, hi]``.

    On the CPU the comparisons run through NumPy on views of the same memory: torch's
    bool-output comparisons are about 4x slower there (measured on torch 2.13).
    """

    def __init__(self, size: int, device: torch.device) -> None:
        self.cpu = device.type == "cpu"
        if self.cpu:
            self.band = np.empty(size, dtype=np.bool_)
            self.over = np.empty(size, dtype=np.bool_)
        else:
            self.band_t = torch.empty(size, dtype=torch.bool, device=device)
            self.over_t = torch.empty(size, dtype=torch.bool, device=device)

    def split(self, d: Tensor, lo: float, hi: float) -> tuple[int, Tensor]:
        """(number of entries > hi, the entries in [lo, hi] — or in (0, hi] when lo is 0)."""
        m = d.numel()
        finite_hi = not math.isinf(hi)
        if self.cpu:
            dn, band, over = d.numpy(), self.band[:m], self.over[:m]
            if lo > 0.0:
                np.greater_equal(dn, lo, out=band)
            else:  # zeros are left out and counted by elimination
                np.greater(dn, 0.0, out=band)
            above = 0
            if finite_hi:
                np.greater(dn, hi, out=over)
                above = int(np.count_nonzero(over))
                np.logical_xor(band, over, out=band)
            return above, torch.from_numpy(dn[band])
        band_t, over_t = self.band_t[:m], self.over_t[:m]
        torch.ge(d, lo, out=band_t) if lo > 0.0 else torch.gt(d, 0.0, out=band_t)
        above = 0
        if finite_hi:
            torch.gt(d, hi, out=over_t)
            above = int(torch.count_nonzero(over_t))
            band_t.logical_xor_(over_t)
        return above, d[band_t]


def _kth_largest_chunked(xf: Tensor, mf: Tensor | None, k: int) -> float:
    """Exact fallback of :func:`kth_largest_magnitude`: the two radix histograms, chunk by chunk."""
    chunks = flat_chunks(xf.numel())

    def mag(sl: slice) -> Tensor:
        return (xf[sl].float() - mf[sl].float()) if mf is not None else xf[sl].float()

    high = torch.zeros(MAGNITUDE_HIGH_BINS, dtype=torch.int64)
    for sl in chunks:
        high += magnitude_high_histogram(mag(sl))
    hb, rank = locate_from_top(high, k)
    low = torch.zeros(MAGNITUDE_LOW_BINS, dtype=torch.int64)
    for sl in chunks:
        low += magnitude_low_histogram(mag(sl), hb)
    lb, _ = locate_from_top(low, rank)
    return magnitude_bits_to_float(hb, lb)


#: |τ| is non-negative, so its float32 bit pattern read as int32 is in [0, 2**31) and ordered
#: like the values; the high 16 bits therefore take 2**15 values, the low 16 bits 2**16.
MAGNITUDE_HIGH_BINS = 1 << 15
MAGNITUDE_LOW_BINS = 1 << 16


def _bits(mag: Tensor) -> Tensor:
    """Float32 bit patterns of a non-negative tensor as flat int32 (no copy for float32)."""
    if mag.dtype != torch.float32:
        mag = mag.float()
    return mag.detach().contiguous().view(torch.int32).reshape(-1)


def _high_half(bits: Tensor) -> Tensor:
    """``bits >> 16`` for non-negative int32 patterns, as a strided int16 view where the byte
    order allows it (no arithmetic pass, no allocation); values lie in [0, 2**15)."""
    if sys.byteorder == "little":
        return bits.view(torch.int16)[1::2]
    return bits >> 16


def magnitude_bits(delta: Tensor) -> Tensor:
    """The float32 bit patterns of |delta| as int32 (monotone in the magnitude)."""
    return _bits(delta.abs())


def magnitude_high_histogram(delta: Tensor) -> Tensor:
    """Counts of |delta| per value of its bit pattern's high 16 bits (int64, ``MAGNITUDE_HIGH_BINS``)."""
    bits = magnitude_bits(delta)
    return torch.bincount(_high_half(bits), minlength=MAGNITUDE_HIGH_BINS).cpu()


def magnitude_low_histogram(delta: Tensor, high: int) -> Tensor:
    """Counts of the low 16 bits of |delta|'s bit pattern among entries whose high 16 bits
    equal ``high`` (int64, ``MAGNITUDE_LOW_BINS``)."""
    bits = magnitude_bits(delta)
    inside = bits[_high_half(bits) == high]
    return torch.bincount(inside & 0xFFFF, minlength=MAGNITUDE_LOW_BINS).cpu()


def locate_from_top(hist: Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest (1-based) item of a histogram, and its 1-based rank counted
    from the largest inside that bin. Requires ``1 ≤ k ≤ hist.sum()``."""
    total = int(hist.sum())
    if not 1 <= k <= total:
        raise ValueError(f"rank {k} outside 1..{total}")
    from_top = torch.flip(hist, dims=[0]).cumsum(0)
    target = torch.tensor([k], dtype=from_top.dtype, device=from_top.device)
    idx = int(torch.searchsorted(from_top, target)[0])
    b = hist.numel() - 1 - idx
    above = int(from_top[idx]) - int(hist[b])
    return b, k - above


def magnitude_bits_to_float(high: int, low: int) -> float:
    """The float32 value whose bit pattern is ``high << 16 | low``."""
    pattern = torch.tensor([(high << 16) | low], dtype=torch.int32)
    return float(pattern.view(torch.float32)[0])


# --------------------------------------------------------------------------------------------
# Signed values: k-th smallest of finite float data of either sign
# --------------------------------------------------------------------------------------------

SIGNED_BINS = 1 << 16


def signed_keys(x: Tensor) -> tuple[Tensor, Tensor]:
    """(high, low) 16-bit halves of the monotone keys of ``x`` (flattened), as int32 tensors."""
    bits = x.detach().to(torch.float32).contiguous().view(torch.int32).reshape(-1)
    neg = bits < 0
    mag = bits & 0x7FFFFFFF
    high = torch.where(neg, 32767 - (mag >> 16), (bits >> 16) + 32768)
    low = torch.where(neg, 65535 - (mag & 0xFFFF), bits & 0xFFFF)
    return high, low


def signed_key_to_float(high: int, low: int) -> float:
    """The float32 value whose monotone key is ``high << 16 | low``."""
    if high >= 32768:
        pattern = ((high - 32768) << 16) | low
    else:
        pattern = 0x80000000 | ((32767 - high) << 16) | (65535 - low)
        pattern -= 1 << 32
    return float(torch.tensor([pattern], dtype=torch.int32).view(torch.float32)[0])


def signed_high_histogram(x: Tensor) -> Tensor:
    """Counts of ``x`` per high key half (int64, ``SIGNED_BINS`` entries, on the CPU)."""
    high, _ = signed_keys(x)
    return torch.bincount(high, minlength=SIGNED_BINS).cpu()


def signed_low_histogram(x: Tensor, high_bin: int) -> Tensor:
    """Counts of the low key halves of the entries of ``x`` whose high half is ``high_bin``."""
    high, low = signed_keys(x)
    return torch.bincount(low[high == high_bin], minlength=SIGNED_BINS).cpu()


def locate_from_bottom(hist: Tensor, k: int) -> tuple[int, int]:
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
    high, low = signed_keys(x)
    b, r = locate_from_bottom(torch.bincount(high, minlength=SIGNED_BINS), k)
    inside = low[high == b]
    del high, low
    lo, _ = locate_from_bottom(torch.bincount(inside, minlength=SIGNED_BINS), r)
    return signed_key_to_float(b, lo)


def sorted_at(x: Tensor, index: int) -> float:
    """``sorted(x)[index]`` (0-based, ascending; negative indices count from the end)."""
    n = x.numel()
    if index < 0:
        index += n
    return kth_smallest(x, index + 1)
