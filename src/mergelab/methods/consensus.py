"""Sign consensus (TIES "elect") and the disjoint merge, shared by every ``*_ties`` method
and by DELLA.

Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models", NeurIPS,
arXiv:2306.01708, steps 2 and 3:

* elect: γ = sgn(Σ_i w_i τ̂_i) per coordinate ("mass" election; with all w_i = 1 it is the
  paper's sgn(Σ_i τ̂_i), with weights it is mergekit's weighted variant);
* disjoint merge: average (``normalize``) or sum only the entries whose sign agrees with γ:
  τ_m = Σ_{i∈A} w_i τ̂_i / Σ_{i∈A} w_i, A = {i : sgn(w_i τ̂_i) = γ ≠ 0}; a coordinate where no
  entry agrees gets 0 (its divisor is taken as 1, as in the original and mergekit).

Where Σ_i w_i τ̂_i is exactly 0 the sign is a tie. ``on_zero`` decides:

* ``"majority"`` (default, the original code's ``resolve_zero_signs``): the majority sign
  sgn(Σ_p γ_p) of the scope (the tensor, or the whole model when a precomputed ``majority`` is
  passed, as global-scope TIES does);
* ``"positive"``: +1 (mergekit's ``>= 0`` rule);
* ``"zero"``: leave 0, so nothing is merged there.

Ties only matter where non-zero entries cancel exactly: where every τ̂_i is 0 nothing agrees
whatever the sign.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

Tensor = torch.Tensor

OnZero = Literal["majority", "positive", "zero"]

#: The user-facing choice (``sign_tie`` parameter of the ``*ties`` methods and ``della``).
SignTie = Literal["majority", "positive"]


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


def weighted_sum(
    deltas: Sequence[Tensor], weights: Sequence[float] | None = None, *, out: Tensor | None = None
) -> Tensor:
    """Σ_i w_i τ_i (w_i = 1 when ``weights`` is None), accumulated in one buffer (``out``)."""
    if not deltas:
        raise ValueError("need at least one task vector")
    total = torch.empty_like(deltas[0]) if out is None else out
    for i, d in enumerate(deltas):
        w = 1.0 if weights is None else float(weights[i])
        if i == 0:
            torch.mul(d, w, out=total)
        else:
            total.add_(d, alpha=w)
    return total


def elect_sign(
    deltas: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    on_zero: OnZero = "majority",
    majority: float | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """Elected sign per coordinate: sgn(Σ_i w_i τ_i), with ties resolved by ``on_zero``.

    Returns a float tensor of −1, 0, +1 (0 only where a tie is left unresolved). ``majority``
    overrides the tie-breaking sign used by ``on_zero="majority"`` (pass the model-wide value
    for global scope); by default it is sgn(Σ_p γ_p) over this tensor.
    """
    sign = weighted_sum(deltas, weights, out=out).sign_()
    if on_zero == "zero":
        return sign
    if on_zero == "positive":  # 0 → +1 in two in-place passes: sgn(sgn(s) + ½)
        return sign.add_(0.5).sign_()
    n_zero = sign.numel() - int(torch.count_nonzero(sign))
    if n_zero == 0:  # the common case: no tie to resolve, skip the extra passes
        return sign
    if on_zero == "positive":
        fill = 1.0
    elif on_zero == "majority":
        fill = float(majority_sign(sign) if majority is None else majority)
    else:
        raise ValueError(f"unknown on_zero rule {on_zero!r}")
    if fill != 0.0:
        sign.masked_fill_(sign == 0, fill)
    return sign


def majority_sign(sign: Tensor) -> int:
    """sgn(Σ_p γ_p): the scope's majority elected sign (−1, 0 or +1), from exact int64 counts."""
    balance = sign_balance(sign)
    return (balance > 0) - (balance < 0)


def sign_balance(sign: Tensor) -> int:
    """Σ_p γ_p as an exact integer (#(γ > 0) − #(γ < 0)): a float64 sum of ±1/0 is exact."""
    return int(sign.sum(dtype=torch.float64))


def disjoint_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    sign: Tensor,
    *,
    normalize: bool = True,
    scratch: Scratch | None = None,
) -> Tensor:
    """Σ over agreeing i of w_i τ_i, divided by Σ over agreeing i of w_i when ``normalize``.

    Agreement: w_i τ_i has the elected sign (strictly: w_i τ_i · γ > 0), so zeros never count.
    A coordinate where no entry agrees gives 0 (divisor taken as 1); where the agreeing weights
    sum to exactly 0 (possible only with negative weights) the divisor is also taken as 1,
    i.e. the disjoint sum is returned there, as in mergekit.
    """
    total = scratch_view(scratch, "total", sign).zero_()
    divisor = scratch_view(scratch, "divisor", sign).zero_() if normalize else None
    agree = scratch_view(scratch, "agree", sign)
    for d, w in zip(deltas, weights):
        w = float(w)
        if w == 0.0:
            continue  # w·τ is 0 everywhere: it never agrees
        # sgn(w·τ) = γ  ⇔  τ·γ > 0 for w > 0, τ·γ < 0 for w < 0
        torch.mul(d, sign, out=agree)
        agree.gt_(0.0) if w > 0 else agree.lt_(0.0)  # 1.0 where agreeing, else 0.0
        if divisor is not None:
            divisor.add_(agree, alpha=w)
        total.add_(agree.mul_(d), alpha=w)
    if divisor is not None:
        divisor.add_(torch.eq(divisor, 0.0, out=agree))  # 0 → 1 (float-valued compare: fast on CPU)
        total.div_(divisor)
    return total


def consensus_merge(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    on_zero: OnZero = "majority",
    majority: float | None = None,
    scratch: Scratch | None = None,
) -> Tensor:
    """Elect on the weighted deltas, then disjoint mean (``normalize``) or sum.

    With ``scratch`` the result (and every temporary) lives in its buffers: consume it before
    the next call with the same scratch.
    """
    sign = elect_sign(
        deltas, weights, on_zero=on_zero, majority=majority, out=scratch_view(scratch, "sign", deltas[0])
    )
    return disjoint_merge(deltas, weights, sign, normalize=normalize, scratch=scratch)


def linear_merge(deltas: Sequence[Tensor], weights: Sequence[float], *, normalize: bool) -> Tensor:
    """Σ_i w_i τ_i, divided by Σ_i w_i when ``normalize`` (task arithmetic on the deltas)."""
    total = weighted_sum(deltas, weights)
    if normalize:
        denom = float(sum(weights))
        if abs(denom) < 1e-12:
            raise ValueError("normalize=true needs weights that do not sum to zero")
        total.div_(denom)
    return total


def merge_chunks(
    base: Tensor,
    experts: Sequence[Tensor],
    sparsify: Callable[[int, Tensor, Scratch], None],
    weights: Sequence[float],
    *,
    lambda_: float,
    normalize: bool,
    elect: bool,
) -> Tensor:
    """θ0 + λ · merge_i(sparsify_i(θ_i − θ0)), chunk by chunk of the flattened tensors.

    ``sparsify(i, delta, scratch)`` edits expert i's task-vector chunk in place (its masks must
    be set per tensor beforehand, e.g. magnitude thresholds); the merge is the TIES elect +
    disjoint merge with mergekit's +1 sign-tie rule (``elect``) or the weighted sum. Every
    temporary lives in one :class:`Scratch`, so a chunk's buffers are allocated once per tensor.
    """
    from mergelab.methods.sparsify import flat_chunks

    b_flat = base.reshape(-1)
    e_flat = [e.reshape(-1) for e in experts]
    out = torch.empty_like(b_flat)
    scratch = Scratch(out)
    for sl in flat_chunks(b_flat.numel()):
        b = b_flat[sl]
        deltas = []
        for i, e in enumerate(e_flat):
            d = torch.sub(e[sl], b, out=scratch.take(f"delta{i}", b.numel()))
            sparsify(i, d, scratch)
            deltas.append(d)
        if elect:
            merged = consensus_merge(deltas, weights, normalize=normalize, on_zero="positive", scratch=scratch)
        else:
            merged = linear_merge(deltas, weights, normalize=normalize)
        torch.add(b, merged, alpha=lambda_, out=out[sl])
    return out.reshape(base.shape).to(base.dtype)
