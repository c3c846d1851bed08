"""Linear-algebra helpers of the SVD methods (TSV-M, ISO-C, ISO-CTS, and every other SVD in the package)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def thin_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.linalg.svd(a, full_matrices=False)``, retried in float64 when it fails to converge.

    On CPU torch calls LAPACK's divide-and-conquer ``gesdd``, which can fail on a well-defined
    float32 input with many close singular values (measured: ISO-CTS's 576 × 576 stack of
    singular vectors for SmolLM2's ``model.layers.10.mlp.up_proj.weight``; the same matrix
    decomposes in float64). The retry returns the factors in ``a``'s dtype; an input already in
    float64 re-raises. The reference implementations run on CUDA, whose drivers do not hit this.
    """
    try:
        return torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        if a.dtype == torch.float64:
            raise
        u, s, vh = torch.linalg.svd(a.to(torch.float64), full_matrices=False)
        return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def polar_factor(a: Tensor) -> Tensor:
    """``P Qᵀ`` for ``a = P Σ Qᵀ`` (thin SVD): the closest matrix to ``a`` with orthonormal
    columns (rows when ``a`` is wide). For an ``a`` that already has orthonormal columns it is
    ``a`` itself (up to rounding). Directions in the null space of ``a`` are those the SVD
    routine returns (arbitrary but deterministic for a given input and library)."""
    p, _, qh = thin_svd(a)
    return p @ qh
