"""Truncated SVD of a dense update into LoRA factors: the pure numerical core of adapter outputs.

``ΔW ≈ B @ A`` with ``B = U_r · diag(S_r)`` (``out × r``) and ``A = Vh_r`` (``r × in``), the
Eckart–Young best rank-r approximation in the Frobenius norm (Eckart & Young 1936). The rank is
fixed (``rank``) or the smallest one retaining a fraction ``energy`` of ``‖ΔW‖²_F = Σ sᵢ²``.
The relative Frobenius error of the rank-r factors is ``sqrt(Σ_{i≥r} sᵢ²) / sqrt(Σ sᵢ²)``; the
reported one is measured on the factors as written (after the cast to the adapter's dtype).

This is the conversion that PEFT's ``add_weighted_adapter`` runs in its ``svd`` modes (B gets
``U·diag(S)``, A gets ``Vh``); see :mod:`mergelab.lora.sink` for the correspondence of modes.
No file, device or model knowledge here: tensors in, tensors out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergelab.errors import OptionError
from mergelab.lora.factors import LoraFactors
from mergelab.methods.kernels.linalg import thin_svd


def check_rank_energy(rank: int | None, energy: float | None, where: str = "adapter") -> None:
    """Exactly one of ``rank`` (a whole number ≥ 1) and ``energy`` (in (0, 1]); a one-line OptionError otherwise."""
    if (rank is None) == (energy is None):
        raise OptionError(f"{where}: give exactly one of rank (e.g. 16) and energy (e.g. 0.9)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise OptionError(f"{where}: rank {rank!r} must be a whole number ≥ 1 (e.g. 16)")
    bad_energy = isinstance(energy, bool) or not isinstance(energy, (int, float)) or not (0.0 < float(energy) <= 1.0)
    if energy is not None and bad_energy:
        raise OptionError(f"{where}: energy {energy!r} must lie in (0, 1] (e.g. 0.9: keep 90% of ‖ΔW‖²)")


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest ``r`` with ``Σ_{i<r} sᵢ² ≥ energy · Σ sᵢ²`` (``s`` descending; 0 when ``s`` is all zero).

    Accumulated in float64, so ``energy = 1`` keeps every nonzero singular value and no more.
    """
    sq = s.detach().to(torch.float64) ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    if energy >= 1.0:
        return int((sq > 0).sum())
    cum = torch.cumsum(sq, 0)
    r = int(torch.searchsorted(cum, torch.tensor(energy * total, dtype=torch.float64)).item()) + 1
    return min(r, int(s.numel()))


@dataclass(frozen=True)
class SvdFactors:
    """One module's truncated SVD: the factors (``scaling`` 1), the rank kept, the error and the spectrum size.

    ``rel_error`` is ``‖ΔW − B A‖_F / ‖ΔW‖_F`` measured on the factors (0 for a zero update);
    ``tail_error`` is the same from the dropped singular values, ``sqrt(Σ_{i≥r} sᵢ²) / ‖ΔW‖_F``.
    ``full_rank`` is ``min(out, in)``.
    """

    factors: LoraFactors | None
    rank: int
    rel_error: float
    tail_error: float
    full_rank: int
    norm: float


def truncated_svd(
    delta: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    svd_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    transposed: bool = False,
) -> SvdFactors:
    """Factor ``delta`` (``out × in``, PEFT orientation) at a fixed ``rank`` or by retained ``energy``.

    The SVD runs in ``svd_dtype`` (float32, or float64 where asked) on ``delta``'s device; a rank
    above ``min(out, in)`` is capped there. The factors are cast to ``out_dtype`` (default:
    ``delta``'s dtype) and ``rel_error`` is measured after that cast. A zero update gives rank 0
    and ``factors=None`` (nothing to write). ``transposed`` is passed to the factors (GPT-2
    ``Conv1D`` / embeddings: the stored tensor is ``ΔWᵀ``).
    """
    check_rank_energy(rank, energy, "truncated_svd")
    if delta.dim() != 2:
        raise ValueError(f"truncated_svd takes a matrix, got shape {list(delta.shape)}")
    out_dtype = out_dtype or delta.dtype
    d = delta.detach().to(svd_dtype)
    full = min(d.shape)
    norm = float(torch.linalg.matrix_norm(d.to(torch.float64)))
    if norm == 0.0:
        return SvdFactors(None, 0, 0.0, 0.0, full, 0.0)
    u, s, vh = thin_svd(d)
    r = min(rank, full) if rank is not None else energy_rank(s, float(energy))  # type: ignore[arg-type]
    r = max(r, 1)
    tail = float(torch.sqrt((s[r:].to(torch.float64) ** 2).sum())) / norm
    b = (u[:, :r] * s[:r]).to(out_dtype).contiguous()
    a = vh[:r].to(out_dtype).contiguous()
    approx = b.to(torch.float64) @ a.to(torch.float64)
    err = float(torch.linalg.matrix_norm(delta.detach().to(torch.float64) - approx)) / norm
    return SvdFactors(LoraFactors(a, b, 1.0, transposed), r, err, tail, full, norm)


def relative_error(delta: torch.Tensor, factors: LoraFactors) -> float:
    """``‖ΔW − s·B A‖_F / ‖ΔW‖_F`` in float64 (0 when both are zero, inf when only ΔW is)."""
    d = delta.detach().to(torch.float64)
    n = float(torch.linalg.matrix_norm(d))
    e = float(torch.linalg.matrix_norm(d - factors.delta(torch.float64)))
    if n == 0.0:
        return 0.0 if e == 0.0 else math.inf
    return e / n
