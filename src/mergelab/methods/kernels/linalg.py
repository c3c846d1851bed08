"""Linear-algebra helpers of the SVD methods (TSV-M, ISO-C, ISO-CTS)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def polar_factor(a: Tensor) -> Tensor:
    """``P Qᵀ`` for ``a = P Σ Qᵀ`` (thin SVD): the closest matrix to ``a`` with orthonormal
    columns (rows when ``a`` is wide). For an ``a`` that already has orthonormal columns it is
    ``a`` itself (up to rounding). Directions in the null space of ``a`` are those the SVD
    routine returns (arbitrary but deterministic for a given input and library)."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh
