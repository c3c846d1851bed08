"""Task vectors and weighted sums: the one place every method takes them from."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Tensor = torch.Tensor


def work_dtype(t: Tensor) -> torch.dtype:
    """The dtype a method computes in for inputs of ``t``'s dtype: float64 stays float64 (a float64
    compute dtype is honoured); float32, bfloat16 and float16 work in float32 (SVD, norms and
    softmax are not supported or not accurate enough in half precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def task_vectors(
    base: Tensor,
    experts: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    flat: bool = False,
    dtype: torch.dtype | None = None,
) -> list[Tensor]:
    """τ_i = θ_i − θ0 in ``dtype`` (default :func:`work_dtype` of the base: float64 for float64, else
    float32; times w_i where ``weights`` gives one other than 1).

    ``flat``: flattened to 1-D. Inputs already in ``dtype`` are not copied before the subtraction.
    """
    b = base.to(work_dtype(base) if dtype is None else dtype)
    if flat:
        b = b.reshape(-1)
    out = []
    for i, e in enumerate(experts):
        ef = e.to(b.dtype)
        t = (ef.reshape(-1) if flat else ef) - b
        if weights is not None and weights[i] != 1.0:
            t.mul_(float(weights[i]))
        out.append(t)
    return out


def weighted_sum(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    out: Tensor | None = None,
    from_zero: bool = False,
) -> Tensor:
    """Σ_i w_i t_i (w_i = 1 when ``weights`` is None), accumulated in one buffer (``out``).

    The first term is written as w_0·t_0; with ``from_zero`` it is added to zeros instead
    (the same values, except that a −0 entry becomes +0, as 0 + (−0) = +0).
    """
    if not tensors:
        raise ValueError("need at least one tensor")
    total = torch.empty_like(tensors[0]) if out is None else out
    if from_zero:
        total.zero_()
    for i, t in enumerate(tensors):
        w = 1.0 if weights is None else float(weights[i])
        if i == 0 and not from_zero:
            torch.mul(t, w, out=total)
        else:
            total.add_(t, alpha=w)
    return total


def mean(tensors: Sequence[Tensor]) -> Tensor:
    """(1/T) Σ_i t_i, summed onto zeros (:func:`weighted_sum` with ``from_zero``)."""
    return weighted_sum(tensors, from_zero=True).div_(len(tensors))


def scale_add(base: Tensor, delta: Tensor, scale: float) -> Tensor:
    """``torch.add(base, delta, alpha=scale)`` (one rounding) in the base's dtype: the last step of
    every scaled form (``fn == base + λ · delta``). ``delta`` is consumed: the sum is written into it
    when it can hold the result, so no tensor-sized buffer is allocated."""
    if delta.dtype == torch.promote_types(base.dtype, delta.dtype) and delta.device == base.device:
        return torch.add(base, delta, alpha=scale, out=delta).to(base.dtype)
    return torch.add(base, delta, alpha=scale).to(base.dtype)
