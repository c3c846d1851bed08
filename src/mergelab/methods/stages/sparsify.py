"""Sparsifiers of task vectors: the masks and rescale rules of TIES, DARE, DELLA and Model
Breadcrumbs, the parameter models those methods share, and the sparsifier stages the chunked
loop (:mod:`mergelab.methods.stages.pipeline`) runs.

Everything works on one task vector ``delta`` (τ = θ_i − θ0) of one tensor, or on a chunk of
it. Design rules:

* Magnitude thresholds come from a **selection** (:mod:`mergelab.methods.kernels.select`),
  never from sorting the whole tensor: O(n), no int64 index buffer of n entries. Entries tied
  with a threshold are all kept (so the kept count can exceed k when magnitudes repeat), as the
  original TIES code does; mergekit keeps exactly k with an arbitrary tie break.
* Random drops draw from the generators handed in (``ctx.generator(i + 1)`` for expert i,
  seeded per (seed, tensor name)) with the pinned 16-bit scheme of
  :mod:`mergelab.methods.kernels.random`; the global RNG is never touched.
* DELLA ranks are exact per-row ranks (:func:`mergelab.methods.kernels.ranks.row_ranks`:
  packed int64 keys sorted by NumPy on the CPU, a stable argsort elsewhere), never in bf16.

A sparsifier stage has ``whole`` (it needs the whole task vector at once: the L1 rescale),
``rows`` (its chunks must hold whole rows: DELLA's per-row ranks) and ``parallel`` (run the
experts on threads), and ``prepare(base, experts, whole)`` returning ``apply(i, d, scratch)``
that sparsifies expert i's task-vector chunk ``d`` (flat, in the working dtype; overwritten
where possible) and returns the result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from pydantic import Field

from mergelab.methods.base import MethodParams
from mergelab.methods.kernels.chunks import Scratch, parallel_map, scratch_view
from mergelab.methods.kernels.random import PROB_BITS, keep_indicator, realised_keep_prob
from mergelab.methods.kernels.ranks import row_ranks
from mergelab.methods.kernels.select import keep_count, kth_largest_magnitude

Tensor = torch.Tensor

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
        description="divide the weighted sum by the sum of the weights (of the agreeing models when signs are elected)",
    )
    rescale: bool = Field(False, description="rescale the kept entries of each task vector after sparsification")
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

    weight: float = Field(1.0, allow_inf_nan=False, description="weight of this task vector (negative: negation)")
    density: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False, description="fraction of entries kept")


def per_tensor_sign_tie() -> Any:
    """The ``sign_tie`` field of the per-tensor ``*_ties`` methods and DELLA (default +1)."""
    return Field(
        "positive",
        description="sign where the weighted sum is exactly 0: positive (mergekit; the "
        "default for per-tensor methods, which lets them run chunk by chunk) or majority "
        "(the tensor's majority elected sign, after the original TIES code)",
    )


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


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


def topk_threshold(base: Tensor, expert: Tensor, density: float, *, plus_one: bool = False) -> float | None:
    """The k-th largest |expert − base| with k = max(1, ⌊density·n⌋), exactly, chunk by chunk
    (the threshold of :func:`magnitude_mask` without materialising the task vector).
    ``plus_one``: k = ⌊density·n⌋ + 1 (the original TIES code's count).

    ``None`` keeps everything (density ≥ 1); ``inf`` keeps nothing (density 0).
    """
    n = base.numel()
    if density >= 1:
        return None
    k = keep_count(n, density) + 1 if plus_one else keep_count(n, density, at_least_one=True)
    if plus_one and k >= n:
        return None
    if k == 0:
        return math.inf
    return kth_largest_magnitude(expert, k, minus=base)


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs mask: drop the top ``gamma`` fraction and enough of the bottom that
    ``density`` remains.

    Counting follows mergekit: ``n_top = ⌊γ n⌋``, ``target = ⌊density n⌋``,
    ``n_bottom = max(0, n − target − n_top)``; the kept entries are ascending magnitude
    positions ``n_bottom … n_bottom + target − 1`` (so when ``density + γ > 1`` fewer than
    ``n_top`` outliers are removed). Implemented with two selections (lower and upper
    magnitude bounds, :func:`outlier_bounds`); entries tied with a bound are kept.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    bounds = outlier_bounds(None, delta, density, gamma)
    if bounds is None:
        return torch.zeros_like(delta, dtype=torch.bool)
    lower, upper = bounds
    mag = delta.abs()
    mask = torch.ones_like(delta, dtype=torch.bool)
    if lower is not None:
        mask &= mag >= lower
    if upper is not None:
        mask &= mag <= upper
    return mask


def outlier_mask_sorted(delta: Tensor, density: float, gamma: float) -> Tensor:
    """The Model Breadcrumbs mask with exact counts (``bound_ties: sort``): the ascending
    magnitude positions ``n_bottom … n_bottom + target − 1`` of ``torch.sort`` (float32, not
    stable), so exactly ``target`` entries are kept and exactly ``n − target − n_bottom``
    outliers removed whatever the ties; tied magnitudes are ordered as ``torch.sort`` orders
    them, which is how mergekit 0.1.5 counts (the authors' code also keeps exact counts, per row,
    with ``torch.topk``). Needs a full sort of the tensor."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    target = keep_count(n, density)
    n_top = min(n, int(gamma * n))
    n_bottom = max(0, n - target - n_top)
    order = torch.sort(delta.abs().reshape(-1).float(), descending=False).indices
    mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
    mask[order[n_bottom : n_bottom + target]] = True
    return mask.reshape(delta.shape)


def outlier_mask_rows(delta: Tensor, density: float, gamma: float) -> Tensor:
    """The Model Breadcrumbs mask per row, as the authors' code builds it (``scope: row``): along
    the last dimension (the whole vector for 1-D tensors; a 0-d tensor is kept), remove the
    ⌊γ c⌋ largest magnitudes of each row of length c, then keep the ⌊density · c⌋ largest of
    what remains (all of it when fewer remain). Exact counts (``torch.topk``; ties arbitrary)."""
    if delta.dim() == 0:
        return torch.ones_like(delta, dtype=torch.bool)
    c = delta.shape[-1]
    mag = delta.abs().reshape(-1, c).float()
    n_out = min(c, int(gamma * c))
    n_keep = min(c - n_out, int(density * c)) if density < 1 else c - n_out
    mask = torch.zeros_like(mag, dtype=torch.bool)
    if n_out:
        mag.scatter_(1, mag.topk(n_out, dim=1).indices, -1.0)  # outliers never selected below
    if n_keep:
        mask.scatter_(1, mag.topk(n_keep, dim=1).indices, True)
    return mask.reshape(delta.shape)


Bounds = tuple[float | None, float | None] | None
"""Magnitude bounds (lower, upper) of the kept entries (None: unbounded); None: keep nothing."""


def outlier_bounds(base: Tensor | None, expert: Tensor, density: float, gamma: float) -> Bounds:
    """The bounds :func:`outlier_mask` keeps between, from two exact selections on
    |expert − base| (|expert| without ``base``; no tensor-sized temporary)."""
    n = expert.numel()
    if density >= 1:
        return (None, None)
    target = keep_count(n, density)
    if target == 0:
        return None
    n_top = min(n, int(gamma * n))
    n_bottom = max(0, n - target - n_top)
    # the (n_bottom + 1)-th and (n_bottom + target)-th smallest magnitudes
    lower = kth_largest_magnitude(expert, n - n_bottom, minus=base) if n_bottom > 0 else None
    upper = kth_largest_magnitude(expert, n - n_bottom - target + 1, minus=base) if n_bottom + target < n else None
    return (lower, upper)


def rank_keep_probs(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MagPrune keep probabilities per row: ``(density − ε) + 2ε · r``, r = row rank in
    [0, 1] (see :func:`mergelab.methods.kernels.ranks.row_ranks`). Mean keep probability per
    row is ``density``."""
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


def _divide_inplace(d: Tensor, density: float) -> Tensor:
    """The ``inverse`` rescale by a scalar keep probability (0 where nothing can be kept)."""
    return d.div_(density) if density > 0 else d.zero_()


# --------------------------------------------------------------------------------------------
# Random drops (DARE) and MagPrune (DELLA) on one task vector
# --------------------------------------------------------------------------------------------


def dare_drop(
    delta: Tensor,
    density: float,
    generator: torch.Generator,
    *,
    rescale: bool = True,
    mode: RescaleMode = "inverse",
    inplace: bool = False,
    keep_out: Tensor | None = None,
) -> Tensor:
    """τ̃ = m ⊙ τ (÷ realised density, or L1-matched), m ~ Bernoulli(density) elementwise.

    ``inplace`` overwrites ``delta``; ``keep_out`` is an optional buffer for the mask. The
    draws are those of :func:`mergelab.methods.kernels.random.keep_indicator`.
    """
    if density >= 1:
        return delta
    keep = keep_indicator(delta, density, generator, out=keep_out)
    if rescale and mode == "l1":
        return apply_mask(delta, keep, rescale=True, mode="l1")
    out = delta.mul_(keep) if inplace else delta * keep
    if rescale:
        p = realised_keep_prob(density)
        return out.zero_() if p <= 0 else out.div_(p)
    return out


def magprune(
    delta: Tensor,
    density: float,
    epsilon: float,
    generator: torch.Generator,
    *,
    rescale: bool = True,
    mode: RescaleMode = "inverse",
    inplace: bool = False,
    scratch: Scratch | None = None,
) -> Tensor:
    """DELLA's MagPrune on one task vector (rows as given): rank-based Bernoulli drop per row,
    then each survivor divided by its own realised keep probability (or the L1 rule).

    ``inplace`` overwrites ``delta``; ``scratch`` holds the mask buffer. The draws are those
    of :func:`mergelab.methods.kernels.random.keep_indicator` with the rank-based probabilities.
    """
    if density >= 1:
        return delta
    probs = realised_keep_prob(rank_keep_probs(delta, density, epsilon))
    keep = keep_indicator(delta, probs, generator, out=scratch_view(scratch, "keep", delta))
    if rescale and mode == "l1":
        return apply_mask(delta, keep, rescale=True, mode="l1")
    out = delta.mul_(keep) if inplace else delta * keep
    if rescale:
        out.div_(probs.clamp_(min=2.0**-PROB_BITS))  # kept entries have p ≥ 2⁻¹⁶; guards 0/0
    return out


# --------------------------------------------------------------------------------------------
# Sparsifier stages
# --------------------------------------------------------------------------------------------

Apply = Callable[[int, Tensor, Scratch], Tensor]


class Sparsifier(Protocol):
    """A sparsifier stage for one tensor (see the module docstring)."""

    @property
    def whole(self) -> bool: ...
    @property
    def rows(self) -> bool: ...
    @property
    def parallel(self) -> bool: ...

    def prepare(self, base: Tensor, experts: Sequence[Tensor], whole: bool) -> Apply: ...


@dataclass(frozen=True)
class KeepAll:
    """No sparsification: every task-vector entry is kept."""

    whole: bool = False
    rows: bool = False
    parallel: bool = False

    def prepare(self, base: Tensor, experts: Sequence[Tensor], whole: bool) -> Apply:
        return lambda i, d, scratch: d


@dataclass(frozen=True)
class MagnitudeTopK:
    """TIES trim: keep each task vector's top-``density`` magnitudes (per tensor), or the
    magnitudes ≥ a model-wide ``thresholds[i]`` (``scope: global``; inf keeps nothing), then the
    optional rescale (``inverse``: ÷ density; ``l1``: match the L1 norm, whole tensors)."""

    densities: tuple[float, ...]
    rescale: bool = False
    mode: RescaleMode = "l1"
    thresholds: tuple[float, ...] | None = None
    rows: bool = False
    parallel: bool = False
    plus_one: bool = False  # keep ⌊density·n⌋ + 1 per tensor (TIES trim_count: original)

    @property
    def whole(self) -> bool:
        return self.rescale and self.mode == "l1"

    def prepare(self, base: Tensor, experts: Sequence[Tensor], whole: bool) -> Apply:
        if self.thresholds is not None:
            cuts: list[float | None] = list(self.thresholds)
        else:
            cuts = parallel_map(
                lambda ed: topk_threshold(base, ed[0], ed[1], plus_one=self.plus_one),
                list(zip(experts, self.densities)),
                numel=base.numel(),
            )

        # model-wide thresholds are float32 values (the gather passes rank float32 bit patterns of
        # |τ|): wider data is compared as float32, so the kept set is the one the passes counted
        narrow = self.thresholds is not None and base.dtype == torch.float64

        def apply(i: int, d: Tensor, scratch: Scratch) -> Tensor:
            t = cuts[i]
            if narrow and t is not None:
                keep = torch.ge(d.abs().float(), t).to(d.dtype)
                if self.rescale and self.mode == "l1":
                    return apply_mask(d, keep, rescale=True, mode="l1")
                d.mul_(keep)
            elif self.rescale and self.mode == "l1":
                keep = torch.ones_like(d) if t is None else torch.ge(d.abs(), t).to(d.dtype)
                return apply_mask(d, keep, rescale=True, mode="l1")
            elif t is not None:
                keep = torch.abs(d, out=scratch.take("keep", d.numel()))
                d.mul_(torch.ge(keep, t, out=keep))  # float-valued mask: fast on CPU
            if self.rescale:
                _divide_inplace(d, self.densities[i])
            return d

        return apply


@dataclass(frozen=True)
class OutlierBands:
    """Model Breadcrumbs: drop the top ``gamma`` and the smallest magnitudes so that
    ``density`` remains (:func:`outlier_mask`), then the optional rescale."""

    densities: tuple[float, ...]
    gammas: tuple[float, ...]
    rescale: bool = False
    mode: RescaleMode = "l1"
    rows: bool = False
    parallel: bool = False
    exact: bool = False  # bound_ties: sort (exact counts, whole tensors)
    per_row: bool = False  # scope: row (the authors' code; whole tensors)

    @property
    def whole(self) -> bool:
        return (self.rescale and self.mode == "l1") or self.exact or self.per_row

    def prepare(self, base: Tensor, experts: Sequence[Tensor], whole: bool) -> Apply:
        if self.per_row:
            shape = tuple(base.shape)

            def apply_rows(i: int, d: Tensor, scratch: Scratch) -> Tensor:
                mask = outlier_mask_rows(d.reshape(shape), self.densities[i], self.gammas[i]).reshape(-1)
                return apply_mask(d, mask, rescale=self.rescale, mode=self.mode, keep_prob=self.densities[i])

            return apply_rows
        if whole:  # masks on the whole task vector (as mergekit builds them)
            mask_fn = outlier_mask_sorted if self.exact else outlier_mask

            def apply_whole(i: int, d: Tensor, scratch: Scratch) -> Tensor:
                mask = mask_fn(d, self.densities[i], self.gammas[i])
                return apply_mask(d, mask, rescale=self.rescale, mode=self.mode, keep_prob=self.densities[i])

            return apply_whole
        bounds = parallel_map(
            lambda i: outlier_bounds(base, experts[i], self.densities[i], self.gammas[i]),
            list(range(len(experts))),
            numel=base.numel(),
        )

        def apply(i: int, d: Tensor, scratch: Scratch) -> Tensor:
            bounds_i = bounds[i]
            if bounds_i is None:
                d.zero_()
            else:
                lower, upper = bounds_i
                if lower is not None or upper is not None:
                    mag = torch.abs(d, out=scratch.take("mag", d.numel()))
                    keep = scratch.take("keep", d.numel())
                    if lower is not None:
                        d.mul_(torch.ge(mag, lower, out=keep))  # float-valued masks: fast on CPU
                    if upper is not None:
                        d.mul_(torch.le(mag, upper, out=keep))
            if self.rescale:  # inverse (l1 runs on whole tensors)
                _divide_inplace(d, self.densities[i])
            return d

        return apply


@dataclass(frozen=True)
class RandomDrop:
    """DARE: drop each entry with probability 1 − density from expert i's own generator, then
    divide the survivors by the realised density (``inverse``) or match the L1 norm."""

    densities: tuple[float, ...]
    generators: tuple[torch.Generator, ...]
    rescale: bool = True
    mode: RescaleMode = "inverse"
    rows: bool = False
    parallel: bool = True  # one thread per expert: each has its own generator and mask buffer

    @property
    def whole(self) -> bool:
        return self.rescale and self.mode == "l1"

    def prepare(self, base: Tensor, experts: Sequence[Tensor], whole: bool) -> Apply:
        def apply(i: int, d: Tensor, scratch: Scratch) -> Tensor:
            keep = scratch_view(scratch, f"keep{i}", d)
            return dare_drop(
                d,
                self.densities[i],
                self.generators[i],
                rescale=self.rescale,
                mode=self.mode,
                inplace=True,
                keep_out=keep,
            )

        return apply


@dataclass(frozen=True)
class MagPrune:
    """DELLA: per row, keep probabilities ``(density − ε) + 2ε·rank``, drops from expert i's
    own generator, survivors divided by their own probability (``inverse``) or the L1 rule."""

    densities: tuple[float, ...]
    epsilons: tuple[float, ...]
    generators: tuple[torch.Generator, ...]
    rescale: bool = True
    mode: RescaleMode = "inverse"
    rows: bool = True
    parallel: bool = False

    @property
    def whole(self) -> bool:
        return self.rescale and self.mode == "l1"

    def prepare(self, base: Tensor, experts: Sequence[Tensor], whole: bool) -> Apply:
        cols = base.numel() // base.shape[0] if base.dim() >= 2 and base.numel() else max(base.numel(), 1)
        rows = (-1, cols) if base.dim() >= 2 else (-1,)

        def apply(i: int, d: Tensor, scratch: Scratch) -> Tensor:
            return magprune(
                d.view(rows),
                self.densities[i],
                self.epsilons[i],
                self.generators[i],
                rescale=self.rescale,
                mode=self.mode,
                inplace=True,
                scratch=scratch,
            ).reshape(-1)

        return apply


@dataclass(frozen=True)
class DropThenTrim:
    """DARE, then the TIES trim of each dropped-and-rescaled task vector to its top ``density``
    magnitudes (per tensor), as the DARE authors combine DARE with TIES-Merging. Whole tensors
    (the trim's threshold needs the dropped tensor)."""

    drop: RandomDrop
    density: float
    rows: bool = False
    parallel: bool = False
    whole: bool = True

    def prepare(self, base: Tensor, experts: Sequence[Tensor], whole: bool) -> Apply:
        dropped = self.drop.prepare(base, experts, whole)

        def apply(i: int, d: Tensor, scratch: Scratch) -> Tensor:
            d = dropped(i, d, scratch)
            return d.mul_(magnitude_mask(d, self.density))

        return apply
