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
from mergelab.methods.kernels.linalg import polar_factor
from mergelab.methods.kernels.tensors import mean as mean_task_vector
from mergelab.methods.kernels.tensors import task_vectors, work_dtype

Tensor = torch.Tensor

__all__ = [
    "EXCLUDE_ALL",
    "ExcludeParams",
    "decomposes",
    "excluded",
    "mean_task_vector",
    "parse_substrings",
    "polar_factor",
    "task_vectors",
    "work_dtype",
]

#: ``exclude`` entry that matches every tensor (the method then reduces to the mean of the
#: task vectors everywhere).
EXCLUDE_ALL = "*"


def parse_substrings(value: Any) -> tuple[str, ...]:
    """``"a, b"`` or ``["a", "b"]`` → ``("a", "b")`` (empty entries dropped)."""
    if value is None:
        return ()
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)):
        items = []
        for v in value:
            if not isinstance(v, str):  # ValueError, not TypeError: pydantic reports ValueError only
                raise ValueError(f"exclude entries must be strings, got {v!r}")
            items.extend(v.split(","))
    else:  # ValueError, not TypeError: pydantic reports ValueError only
        raise ValueError(f"exclude must be a comma-separated string of name substrings, got {value!r}")
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
