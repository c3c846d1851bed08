"""Sparsification of task vectors: the masks and rescale rules shared by TIES, DARE,
Model Breadcrumbs and DELLA, plus the parameter models those methods have in common.

Everything here works on one task vector ``delta`` (τ = θ_i − θ_0) of one tensor and returns a
boolean mask, keep probabilities or a rescaled tensor; the method modules compose them.

Design rules (see docs in each function):

* Magnitude thresholds come from a **selection** (:func:`kth_largest`, a two-level radix select
  on the float32 bit patterns), never from sorting the whole tensor: O(n) instead of
  O(n log n), and no int64 index buffer of n entries.
  Entries tied with the threshold are all kept (so the kept count can exceed k when
  magnitudes repeat), which is what the original TIES code does; mergekit keeps exactly k
  with an arbitrary tie break.
* Random drops draw from the ``torch.Generator`` handed in (``ctx.generator()``, seeded per
  (seed, tensor name)); the global RNG is never touched. The sampling scheme is pinned:
  ``keep = torch.rand(delta.shape, generator=g) < p``, one draw of ``delta.numel()`` uniforms
  per expert, experts in recipe order. Changing it changes every seeded merge.
* DELLA ranks are computed once per row (one stable argsort per row, ranks held as int32 and
  normalised in float32, float64 for rows longer than 2**24), never in bf16.
* Exact k-th largest over a whole model, in bounded memory, by two 16-bit radix histograms of
  the float32 bit patterns of |τ| (see :func:`high_histogram`, :func:`low_histogram`,
  :func:`locate_in_histogram`), used by TIES with ``scope: global``.
"""

from __future__ import annotations

import math
import sys
from concurrent.futures import ThreadPoolExecutor

from collections.abc import Callable, Sequence
from typing import Literal, TypeVar

import numpy as np
import torch
from pydantic import Field

from mergelab.methods.base import MethodParams

Tensor = torch.Tensor
T = TypeVar("T")
R = TypeVar("R")

RescaleMode = Literal["inverse", "l1"]

#: Below this L1 norm (before or after masking) the ``l1`` rescale leaves the tensor as masked,
#: the same guard mergekit applies, so that ``rescale_mode: l1`` reproduces it.
L1_EPS = 1e-7


# --------------------------------------------------------------------------------------------
# Parameter models shared by the sparsifying task-vector methods
# --------------------------------------------------------------------------------------------


class SparseMergeParams(MethodParams):
    """Global parameters of the sparsify-then-merge family (mergekit's names and meanings).

    Method modules subclass this and re-declare fields whose default differs.
    """

    lambda_: float = Field(
        1.0,
        alias="lambda",
        allow_inf_nan=False,
        description="scale applied to the merged task vector before adding it to the base",
    )
    normalize: bool = Field(
        False,
        description="divide the weighted sum by the sum of the weights (of the agreeing models "
        "when signs are elected)",
    )
    rescale: bool = Field(
        False, description="rescale the kept entries of each task vector after sparsification"
    )
    rescale_mode: RescaleMode = Field(
        "l1",
        description="inverse: divide kept entries by their keep probability (DARE/DELLA papers); "
        "l1: scale the sparsified tensor so its L1 norm matches the original (mergekit)",
    )
    int8_mask: bool = Field(
        False,
        description="accepted for mergekit compatibility; no effect (masks are boolean here)",
    )


class SparseModelParams(MethodParams):
    """Per-model parameters of the sparsify-then-merge family."""

    weight: float = Field(
        1.0, allow_inf_nan=False, description="weight of this task vector (negative: negation)"
    )
    density: float = Field(
        1.0, ge=0.0, le=1.0, allow_inf_nan=False, description="fraction of entries kept"
    )


# --------------------------------------------------------------------------------------------
# Counting and selection
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
    b, r = locate_in_histogram(torch.bincount(high, minlength=HIGH_BINS), k)
    inside = bits[high == b]
    del high
    low_bits, _ = locate_in_histogram(torch.bincount(inside & 0xFFFF, minlength=LOW_BINS), r)
    return bits_to_float(b, low_bits)


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
    size = min(n, CHUNK)
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
        band, over = self.band_t[:m], self.over_t[:m]
        torch.ge(d, lo, out=band) if lo > 0.0 else torch.gt(d, 0.0, out=band)
        above = 0
        if finite_hi:
            torch.gt(d, hi, out=over)
            above = int(torch.count_nonzero(over))
            band.logical_xor_(over)
        return above, d[band]


_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    """One process-wide pool for :func:`parallel_map` (creating threads per chunk costs more
    than the work of a small chunk)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=8, thread_name_prefix="mergelab-select")
    return _EXECUTOR


def parallel_map(fn: Callable[[T], R], items: Sequence[T], *, numel: int) -> list[R]:
    """``[fn(x) for x in items]``, on up to ``torch.get_num_threads()`` threads when each call
    scans a large CPU tensor (``numel`` entries).

    The selections above spend most of their time in NumPy comparisons, and DARE's masks in
    the random number generator, both of which run on one core and release the GIL: running
    the experts side by side uses the other cores. Results are identical to the sequential
    loop (each call is independent and every expert has its own generator).
    """
    workers = min(len(items), torch.get_num_threads(), 8)
    if workers <= 1 or numel < (1 << 17):
        return [fn(x) for x in items]
    return list(_executor().map(fn, items))


def _kth_largest_chunked(xf: Tensor, mf: Tensor | None, k: int) -> float:
    """Exact fallback of :func:`kth_largest_magnitude`: the two radix histograms, chunk by chunk."""
    chunks = flat_chunks(xf.numel())

    def mag(sl: slice) -> Tensor:
        return (xf[sl].float() - mf[sl].float()) if mf is not None else xf[sl].float()

    high = torch.zeros(HIGH_BINS, dtype=torch.int64)
    for sl in chunks:
        high += high_histogram(mag(sl))
    hb, rank = locate_in_histogram(high, k)
    low = torch.zeros(LOW_BINS, dtype=torch.int64)
    for sl in chunks:
        low += low_histogram(mag(sl), hb)
    lb, _ = locate_in_histogram(low, rank)
    return bits_to_float(hb, lb)


def kth_smallest(mag: Tensor, k: int) -> float:
    """The k-th smallest (1-based) entry of a non-negative tensor (see :func:`kth_largest`)."""
    return kth_largest(mag, mag.numel() - k + 1)


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Keep the ``k = max(1, ⌊density·n⌋)`` largest |τ| (TIES "trim"), by a k-th value threshold.

    Entries tied with the k-th largest magnitude are kept too. ``density`` 0 keeps nothing,
    1 keeps everything.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    k = keep_count(n, density, at_least_one=True)
    if k == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    return delta.abs() >= kth_largest_magnitude(delta, k)


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs mask: drop the top ``gamma`` fraction and enough of the bottom that
    ``density`` remains.

    Counting follows mergekit: ``n_top = ⌊γ n⌋``, ``target = ⌊density n⌋``,
    ``n_bottom = max(0, n − target − n_top)``; the kept entries are ascending magnitude
    positions ``n_bottom … n_bottom + target − 1`` (so when ``density + γ > 1`` fewer than
    ``n_top`` outliers are removed). Implemented with two selections (lower and upper
    magnitude bounds); entries tied with a bound are kept.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    target = keep_count(n, density)
    if target == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    n_top = min(n, int(gamma * n))
    n_bottom = max(0, n - target - n_top)
    lower = kth_largest_magnitude(delta, n - n_bottom) if n_bottom > 0 else None  # (n_bottom+1)-th smallest
    upper = kth_largest_magnitude(delta, n - n_bottom - target + 1) if n_bottom + target < n else None
    mag = delta.abs()
    mask = torch.ones_like(delta, dtype=torch.bool)
    if lower is not None:
        mask &= mag >= lower
    if upper is not None:
        mask &= mag <= upper
    return mask


# --------------------------------------------------------------------------------------------
# Random drops
# --------------------------------------------------------------------------------------------


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
    """Slices over the flattened tensor that cover whole rows (rows as in :func:`_as_rows`),
    each (but the last) a multiple of 4 elements, like :func:`flat_chunks`."""
    n = math.prod(shape)
    if len(shape) < 2 or n == 0:
        return [slice(0, n)]
    cols = n // shape[0]
    align = 4 // math.gcd(cols, 4)
    rows_per = max(align, ((chunk or CHUNK) // max(cols, 1)) // align * align)
    return [slice(r * cols, min(shape[0], r + rows_per) * cols) for r in range(0, shape[0], rows_per)]


PROB_BITS = 16
"""Keep decisions use 16 random bits each: P(keep) is realised to a resolution of 2**-16."""


def realised_keep_prob(keep_prob: float | Tensor) -> float | Tensor:
    """The probability :func:`bernoulli_mask` actually keeps with: round(p·2¹⁶)/2¹⁶.

    Rescaling survivors by this (not the nominal p) keeps DARE/DELLA exactly unbiased; for
    p = 0.5 (or any multiple of 2⁻¹⁶) the two are equal, otherwise they differ by < 8e-6.
    """
    scale = float(1 << PROB_BITS)
    if isinstance(keep_prob, Tensor):
        return (keep_prob.float() * scale).round_().div_(scale)
    return round(keep_prob * scale) / scale


def uniform16(shape: torch.Size | tuple[int, ...], generator: torch.Generator, device: torch.device) -> Tensor:
    """Uniform integers in [−2¹⁵, 2¹⁵) as int16, four per 64-bit draw of ``generator``.

    3–4× faster than ``torch.rand`` on CPU, which spends one 32-bit draw and a float
    conversion per element.
    """
    n = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=generator, device=device)
    return words.view(torch.int16)[:n].reshape(shape)


def bernoulli_mask(delta: Tensor, keep_prob: float | Tensor, generator: torch.Generator) -> Tensor:
    """Independent keep decisions, P(keep) = :func:`realised_keep_prob` of ``keep_prob``.

    ``keep_prob`` is a scalar (DARE) or a tensor of ``delta``'s shape (DELLA). With u uniform
    in [0, 2¹⁶) from :func:`uniform16`, an entry is kept iff u < round(p·2¹⁶).
    """
    shift = 1 << (PROB_BITS - 1)
    if isinstance(keep_prob, Tensor):
        threshold = realised_keep_prob(keep_prob).mul_(float(1 << PROB_BITS)).sub_(shift)
        return uniform16(delta.shape, generator, delta.device) < threshold
    t = round(keep_prob * (1 << PROB_BITS))
    if t <= 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    if t >= 1 << PROB_BITS:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    return uniform16(delta.shape, generator, delta.device) < (t - shift)


def keep_indicator(
    delta: Tensor, keep_prob: float | Tensor, generator: torch.Generator, *, out: Tensor | None = None
) -> Tensor:
    """:func:`bernoulli_mask` as 0/1 values in ``delta``'s dtype (the same random draws).

    Multiplying by a float mask is 3-4x faster on CPU than ``torch.where`` or a bool mask
    (torch 2.13), which is what the chunked DARE/DELLA loops do. ``out``: optional buffer.
    """
    if out is None:
        out = torch.empty_like(delta)
    shift = 1 << (PROB_BITS - 1)
    if isinstance(keep_prob, Tensor):
        threshold = realised_keep_prob(keep_prob).mul_(float(1 << PROB_BITS)).sub_(shift)
        return torch.lt(uniform16(delta.shape, generator, delta.device), threshold, out=out)
    t = round(keep_prob * (1 << PROB_BITS))
    if t <= 0:
        return out.zero_()
    if t >= 1 << PROB_BITS:
        return out.fill_(1.0)
    return torch.lt(uniform16(delta.shape, generator, delta.device), t - shift, out=out)


def _as_rows(t: Tensor) -> Tensor:
    """2-D view for per-row operations: 0-D/1-D → one row; k-D (k ≥ 3) → (shape[0], rest)."""
    if t.dim() == 2:
        return t
    if t.dim() < 2:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def row_ranks(delta: Tensor) -> Tensor:
    """Normalised ascending magnitude rank per row, in [0, 1] (float32, delta's shape).

    Smallest |τ| of a row gets 0, largest gets 1; equal magnitudes get distinct ranks in
    index order (the order of a stable sort). A row of length 1 gets 0.5. Ranks are integers
    until the final division, done in float32 (float64 for rows over 2**24).
    """
    rows = _as_rows(delta)
    n_rows, n_cols = rows.shape
    if n_cols <= 1:
        return torch.full(delta.shape, 0.5, dtype=torch.float32, device=delta.device)
    order = _stable_row_order(rows.abs())
    positions = torch.arange(n_cols, device=delta.device, dtype=torch.int32).expand(n_rows, -1)
    ranks = torch.empty(rows.shape, dtype=torch.int32, device=delta.device)
    ranks.scatter_(1, order, positions)
    del order
    work = torch.float32 if n_cols <= (1 << 24) else torch.float64
    r = ranks.to(work).div_(n_cols - 1)
    return r.to(torch.float32).reshape(delta.shape)


def _stable_row_order(mag: Tensor) -> Tensor:
    """Per-row indices that sort the non-negative ``mag`` ascending, ties in index order (int64).

    On the CPU each entry becomes one int64 key ``float32 bits of |τ| << 32 | column``: the
    keys are distinct and ordered exactly as a stable argsort orders the entries, so NumPy's
    SIMD sort of plain integers gives the stable order at a fraction of the cost of
    ``torch.argsort(stable=True)`` (≈2x faster single-threaded here; rows are split over the
    torch thread count, NumPy releasing the GIL while it sorts).
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
            list(pool.map(lambda ab: keys_np[ab[0] : ab[1]].sort(axis=1), zip(bounds, bounds[1:])))
    return keys.bitwise_and_(0xFFFFFFFF)


def rank_keep_probs(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MagPrune keep probabilities per row: ``(density − ε) + 2ε · r``, r = row rank in
    [0, 1] (see :func:`row_ranks`). Mean keep probability per row is ``density``."""
    r = row_ranks(delta)
    return r.mul_(2.0 * epsilon).add_(density - epsilon)


# --------------------------------------------------------------------------------------------
# Rescale rules
# --------------------------------------------------------------------------------------------


def l1_rescale(masked: Tensor, original: Tensor, eps: float = L1_EPS) -> Tensor:
    """Scale ``masked`` (in place) so its L1 norm equals ``original``'s (mergekit's rule).

    Left unchanged when either norm is below ``eps``.
    """
    before = original.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked.mul_(before / after)


def apply_mask(
    delta: Tensor,
    mask: Tensor,
    *,
    rescale: bool = False,
    mode: RescaleMode = "inverse",
    keep_prob: float | Tensor | None = None,
) -> Tensor:
    """Zero the dropped entries of ``delta`` and optionally rescale the survivors.

    ``mode="inverse"`` divides each kept entry by its keep probability ``keep_prob`` (a scalar
    for DARE, the per-entry tensor for DELLA), so the result is unbiased: E[out] = delta.
    ``mode="l1"`` rescales the whole tensor to the original L1 norm. Returns a new tensor.
    """
    out = delta * mask  # mask: bool or 0/1 floats (a product is far faster than torch.where on CPU)
    if not rescale:
        return out
    if mode == "l1":
        return l1_rescale(out, delta)
    if mode != "inverse":
        raise ValueError(f"unknown rescale mode {mode!r}")
    if keep_prob is None:
        raise ValueError("rescale_mode 'inverse' needs the keep probability")
    if isinstance(keep_prob, Tensor):
        # A kept entry has a realised probability ≥ 2⁻¹⁶; dropped entries are 0 and may have
        # probability 0, so the clamp only guards 0/0.
        return out.div_(keep_prob.clamp(min=2.0**-PROB_BITS))
    if keep_prob <= 0:
        return out.zero_()
    return out.div_(keep_prob)


# --------------------------------------------------------------------------------------------
# Exact model-wide k-th largest magnitude in bounded memory (two radix passes)
# --------------------------------------------------------------------------------------------

#: |τ| is non-negative, so its float32 bit pattern read as int32 is in [0, 2**31) and ordered
#: like the values; the high 16 bits therefore take 2**15 values, the low 16 bits 2**16.
HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16


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


def high_histogram(delta: Tensor) -> Tensor:
    """Counts of |delta| per value of its bit pattern's high 16 bits (int64, ``HIGH_BINS``)."""
    bits = magnitude_bits(delta)
    return torch.bincount(_high_half(bits), minlength=HIGH_BINS).cpu()


def low_histogram(delta: Tensor, high: int) -> Tensor:
    """Counts of the low 16 bits of |delta|'s bit pattern among entries whose high 16 bits
    equal ``high`` (int64, ``LOW_BINS``)."""
    bits = magnitude_bits(delta)
    inside = bits[_high_half(bits) == high]
    return torch.bincount(inside & 0xFFFF, minlength=LOW_BINS).cpu()


def locate_in_histogram(hist: Tensor, k: int) -> tuple[int, int]:
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


def bits_to_float(high: int, low: int) -> float:
    """The float32 value whose bit pattern is ``high << 16 | low``."""
    pattern = torch.tensor([(high << 16) | low], dtype=torch.int32)
    return float(pattern.view(torch.float32)[0])
