"""Shared pieces of the SVD-based task-vector methods (TSV-M, ISO-C, ISO-CTS).

Everything here works on the tensor in hand, in float32 (bf16/fp16 SVD is not supported by
torch on every device, and the references upcast too), and never looks at other tensors.

* :func:`polar_factor` — the nearest matrix with orthonormal columns (or rows) to ``A``
  in Frobenius norm (orthogonal Procrustes): with ``A = P Σ Qᵀ`` (thin SVD) it is ``P Qᵀ``.
  TSV-M and ISO-CTS use it to decorrelate concatenated singular vectors.
* :class:`ExcludeParams` / :func:`excluded` — the ``exclude`` parameter of the SVD methods:
  tensors whose name contains one of the listed substrings are merged as 1-D tensors are
  (mean of the task vectors) instead of by SVD.
* :func:`mean_task_vector` — that fallback: (1/T) Σ_i τ_i.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pydantic import Field, field_validator

from mergelab.methods.base import MethodParams

Tensor = torch.Tensor

#: ``exclude`` entry that matches every tensor (the method then reduces to the mean of the
#: task vectors everywhere).
EXCLUDE_ALL = "*"


def work_dtype(t: Tensor) -> torch.dtype:
    """The dtype a method computes in for inputs of ``t``'s dtype: float64 stays float64 (a float64
    compute dtype is honoured); float32, bfloat16 and float16 work in float32 (SVD, norms and
    softmax are not supported or not accurate enough in half precision)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def task_vectors(
    base: Tensor, experts: Sequence[Tensor], weights: Sequence[float] | None = None, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    """τ_i = θ_i − θ0 in ``dtype`` (float32 unless given; times w_i when ``weights`` are given)."""
    b = base.to(dtype)
    out = []
    for i, e in enumerate(experts):
        t = e.to(dtype) - b
        if weights is not None and weights[i] != 1.0:
            t.mul_(float(weights[i]))
        out.append(t)
    return out


def mean_task_vector(taus: Sequence[Tensor]) -> Tensor:
    """(1/T) Σ_i τ_i: what the references do for tensors they do not decompose."""
    total = torch.zeros_like(taus[0])
    for t in taus:
        total.add_(t)
    return total.div_(len(taus))


def polar_factor(a: Tensor) -> Tensor:
    """``P Qᵀ`` for ``a = P Σ Qᵀ`` (thin SVD): the closest matrix to ``a`` with orthonormal
    columns (rows when ``a`` is wide). For an ``a`` that already has orthonormal columns it is
    ``a`` itself (up to rounding). Directions in the null space of ``a`` are those the SVD
    routine returns (arbitrary but deterministic for a given input and library)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def parse_substrings(value: Any) -> tuple[str, ...]:
    """``"a, b"`` or ``["a", "b"]`` → ``("a", "b")`` (empty entries dropped)."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = []
        for v in value:
            if not isinstance(v, str):
                raise ValueError(f"exclude entries must be strings, got {v!r}")  # noqa: TRY004 (pydantic reports ValueError only)
            items.extend(v.split(","))
    else:
        raise ValueError(f"exclude must be a comma-separated string of name substrings, got {value!r}")  # noqa: TRY004 (pydantic reports ValueError only)
    return tuple(s.strip() for s in items if s.strip())


class ExcludeParams(MethodParams):
    """The ``exclude`` parameter shared by the SVD methods."""

    exclude: tuple[str, ...] = Field(
        (),
        description="comma-separated substrings of tensor names merged as the mean of the task "
        "vectors instead of by SVD ('*' = every tensor); default none, as the reference code; "
        "for LLMs 'embed_tokens,lm_head' skips the vocabulary-sized matrices",
    )

    @field_validator("exclude", mode="before")
    @classmethod
    def _split(cls, v: Any) -> tuple[str, ...]:
        return parse_substrings(v)


def excluded(name: str, patterns: Sequence[str]) -> bool:
    """True when ``name`` contains one of ``patterns`` (``"*"`` matches every name)."""
    return any(p == EXCLUDE_ALL or p in name for p in patterns)


def decomposes(tensor: Tensor, name: str, patterns: Sequence[str]) -> bool:
    """Whether an SVD method decomposes this tensor: 2-D and not excluded by name."""
    return tensor.dim() == 2 and not excluded(name, patterns)
