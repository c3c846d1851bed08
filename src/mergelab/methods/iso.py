"""ISO-C and ISO-CTS: isotropic merging (flattened singular spectrum) in a common subspace, and
in common plus task-specific subspaces.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer 2025, "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces", arXiv:2502.04959.

For every 2-D tensor (m × n, r = min(m, n)) not named in ``exclude``, with τ_i = θ_i − θ0:

ISO-C (``iso_c``)
    M = Σ_i τ_i = U diag(σ) Vᵀ (thin SVD, float32); replace every singular value by their mean
    σ̄ = (1/r) Σ_j σ_j (the zeros of a rank-deficient M included): Δ = σ̄ U Vᵀ.

ISO-CTS (``iso_cts``)
    1. Common subspace: the top k directions of M, k = r − T·s with
       s = round((r − ⌊f·r⌋) / T) (f = ``common_space_fraction``, Python's round), so that the
       remaining r − k directions split evenly into T task-specific blocks of s directions.
    2. Task-specific subspaces: for each task, the top s singular directions of
       τ_i − U_k U_kᵀ τ_i (τ_i with its component in the common left subspace removed).
    3. U = [U_1,s … U_T,s, U_k] (m × r), σ = [σ_1,s … σ_T,s, σ_k], Vᵀ likewise (r × n);
       orthogonalise both by orthogonal Procrustes (U⊥ = P Qᵀ for U = P Σ Qᵀ), as TSV-M does.
    4. Flatten: Δ = mean(σ) U⊥ V⊥ᵀ.

Every other tensor (1-D, ≥ 3-D, excluded names): Δ = (1/T) Σ_i τ_i (mean, as the reference).
Then θ = θ0 + α Δ for every tensor (the reference scales the whole merged task vector).

Granularity: per tensor (each matrix's spectrum is flattened on its own; nothing model-wide),
so one streaming pass. Cost per matrix: ISO-C one SVD of m × n; ISO-CTS T + 3 SVDs.

Checked against the reference code (danielm1405/iso-merging configs; fusion_bench
``method/isotropic_merging/iso_utils.py`` and its ``iso_c.yaml``/``iso_cts.yaml``):

* α (``scaling_factor``) defaults to 1.0 as in those configs; the paper selects α on held-out
  validation data, so sweep it. ``common_space_fraction`` defaults to 0.8 (both repositories).
* The reference's s uses Python's ``round`` (half to even); kept. When rounding up would leave a
  negative common size (r − T·s < 0, only for tiny r or f near 0; the reference then slices with
  a negative index), s = ⌊r / T⌋ is used instead.
* ``exclude`` (reference: ``exclude_keys``, exact names, default none) matches name substrings.
* With ``common_space_fraction: 1`` ISO-CTS has no task-specific part (s = 0) and equals ISO-C.
* Working dtype: float32 (bf16/fp16 SVD is not supported), float64 when the compute dtype is float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, NoParams, TensorContext
from mergelab.methods.kernels.linalg import thin_svd
from mergelab.methods.registry import method
from mergelab.methods.svd_utils import (
    ExcludeParams,
    decomposes,
    mean_task_vector,
    polar_factor,
    task_vectors,
    work_dtype,
)

Tensor = torch.Tensor

PAPER = (
    "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces, arXiv:2502.04959"
)


class IsoCParams(ExcludeParams):
    alpha: float = Field(
        1.0,
        allow_inf_nan=False,
        description="scale of the merged task vector (reference configs: 1.0; the paper tunes it on validation)",
    )


class IsoCtsParams(IsoCParams):
    common_space_fraction: float = Field(
        0.8,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction of the r singular directions taken from the common subspace of the summed "
        "task matrix; the rest is split evenly among the tasks (reference: 0.8)",
    )


def iso_c_matrix(taus: Sequence[Tensor]) -> Tensor:
    """ISO-C Δ for one matrix: the sum's singular values replaced by their mean."""
    total = torch.zeros_like(taus[0])
    for t in taus:
        total.add_(t)
    u, s, vh = thin_svd(total)
    del total
    return (u @ vh).mul_(s.mean())


def cts_sizes(r: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(common size k, directions per task s) with k + T·s = r, following the reference."""
    k0 = int(r * fraction)
    s = round((r - k0) / n_tasks)
    if n_tasks * s > r:
        s = r // n_tasks
    return r - n_tasks * s, s


def iso_cts_matrix(taus: Sequence[Tensor], fraction: float) -> Tensor:
    """ISO-CTS Δ for one matrix (steps 1–4 above)."""
    m, n = taus[0].shape
    r = min(m, n)
    n_tasks = len(taus)
    k, s = cts_sizes(r, n_tasks, fraction)
    total = torch.zeros_like(taus[0])
    for t in taus:
        total.add_(t)
    u, sig, vh = thin_svd(total)
    del total
    u_c, s_c, vh_c = u[:, :k], sig[:k], vh[:k, :]
    us, ss, vhs = [], [], []
    if s > 0:
        for t in taus:
            residual = t - u_c @ (u_c.T @ t)
            ut, st, vht = thin_svd(residual)
            del residual
            us.append(ut[:, :s])
            ss.append(st[:s])
            vhs.append(vht[:s, :])
            del ut, st, vht
    u_all = torch.cat([*us, u_c], dim=1)
    s_all = torch.cat([*ss, s_c])
    vh_all = torch.cat([*vhs, vh_c], dim=0)
    del us, vhs, u, vh
    u_orth = polar_factor(u_all)
    del u_all
    vh_orth = polar_factor(vh_all)
    del vh_all
    return (u_orth @ vh_orth).mul_(s_all.mean())


def _finish(base: Tensor, delta: Tensor, alpha: float) -> Tensor:
    return (base.to(delta.dtype) + alpha * delta).to(base.dtype)


@method(
    "iso_c",
    paper=PAPER,
    params=IsoCParams,
    model_params=NoParams,
    base="required",
    card=MethodCard(
        identity=({"exclude": "*"}, {}),  # ISO flattens the spectrum: identity only off the SVD path
        typical=({"alpha": 1.3}, {}),
        grid=({"alpha": (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)}, {}),
        group="advanced",
    ),
)
def iso_c(
    base: Tensor,
    experts: Sequence[Tensor],
    params: IsoCParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> Tensor:
    """Sum the task matrices, then flatten the sum's singular spectrum to its mean (isotropic)."""
    taus = task_vectors(base, experts, dtype=work_dtype(base))  # float64 stays float64, else float32
    if decomposes(base, ctx.name, params.exclude):
        delta = iso_c_matrix(taus)
    else:
        delta = mean_task_vector(taus)
    del taus
    return _finish(base, delta, params.alpha)


@method(
    "iso_cts",
    paper=PAPER,
    params=IsoCtsParams,
    model_params=NoParams,
    base="required",
    card=MethodCard(
        identity=({"exclude": "*"}, {}),
        typical=({"alpha": 1.3, "common_space_fraction": 0.5}, {}),
        grid=({"alpha": (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)}, {}),
        group="advanced",
    ),
)
def iso_cts(
    base: Tensor,
    experts: Sequence[Tensor],
    params: IsoCtsParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> Tensor:
    """ISO-C in the common subspace plus per-task subspaces, orthogonalised, spectrum flattened."""
    taus = task_vectors(base, experts, dtype=work_dtype(base))  # float64 stays float64, else float32
    if decomposes(base, ctx.name, params.exclude):
        delta = iso_cts_matrix(taus, params.common_space_fraction)
    else:
        delta = mean_task_vector(taus)
    del taus
    return _finish(base, delta, params.alpha)
