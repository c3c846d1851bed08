"""Sign consensus (TIES "elect") and the disjoint merge, shared by TIES, every ``*_ties``
method, DELLA and the TALL multi-task vector.

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

from collections.abc import Sequence
from typing import Literal

import torch

from mergelab.methods.kernels.chunks import Scratch, scratch_view
from mergelab.methods.kernels.tensors import weighted_sum

Tensor = torch.Tensor

OnZero = Literal["majority", "positive", "zero"]

#: The user-facing choice (``sign_tie`` parameter of the ``*ties`` methods and ``della``).
SignTie = Literal["majority", "positive"]


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
    if on_zero != "majority":
        raise ValueError(f"unknown on_zero rule {on_zero!r}")
    fill = float(majority_sign(sign) if majority is None else majority)
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
    sign = elect_sign(deltas, weights, on_zero=on_zero, majority=majority, out=scratch_view(scratch, "sign", deltas[0]))
    return disjoint_merge(deltas, weights, sign, normalize=normalize, scratch=scratch)
