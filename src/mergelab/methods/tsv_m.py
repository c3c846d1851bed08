"""TSV-M: merge the top singular directions of every task, decorrelated across tasks.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà 2025, "Task Singular Vectors:
Reducing Task Interference in Model Merging", CVPR 2025, arXiv:2412.00081.

For every 2-D tensor (a weight matrix W of shape m × n, r = min(m, n)) not named in ``exclude``:

1. τ_i = U_i diag(s_i) V_iᵀ (thin SVD, float32), i = 1..T, optionally τ_i ← w_i τ_i first;
2. keep k = ⌊r / T⌋ directions per task: U = [U_1[:, :k] … U_T[:, :k]] (m × kT),
   s = [s_1[:k] … s_T[:k]], Vᵀ = rows [V_1ᵀ[:k] … V_Tᵀ[:k]] (kT × n);
3. orthogonalise (whitening by orthogonal Procrustes): U⊥ = P_U Q_Uᵀ for U = P_U Σ_U Q_Uᵀ,
   V⊥ᵀ = P_V Q_Vᵀ for Vᵀ = P_V Σ_V Q_Vᵀ;
4. Δ = U⊥ diag(s) V⊥ᵀ.

Every other tensor (1-D norms and biases, ≥ 3-D, excluded names): Δ = (1/T) Σ_i τ_i (the mean,
not the sum, as the reference). Then θ = θ0 + α Δ, α = 1 by default (the paper needs no tuning).

Granularity: per tensor (each weight matrix is decomposed on its own; no model-wide statistic),
so one streaming pass. Cost per m × n matrix: T thin SVDs plus two of size m × kT and kT × n.

Checked against the reference code (fusion_bench ``method/task_singular_vector``,
``compute_and_sum_svd_mem_reduction``; defaults from its ``TaskSingularVectorMerging.yaml``):

* The reference writes each task's k directions into a zero-padded m × r buffer; the padding
  (r − kT zero columns/rows, when T does not divide r) carries zero singular values and does
  not change the polar factor of the filled part, so the compact m × kT matrix is used here.
* k: the reference computes ``int(r * (1 / T))`` in floating point, which is one less than
  ⌊r/T⌋ in rare cases (e.g. r = T = 49); the paper's ⌊r/T⌋ is used here.
* When T > r, k = 0 and the matrix gets Δ = 0, as in the reference.
* ``exclude`` (reference: ``exclude_keys``, exact key names, default none) matches substrings
  here; the default excludes nothing, as the reference. Vocabulary-sized matrices
  (``embed_tokens``, ``lm_head``) are then decomposed too; ``exclude: "embed_tokens,lm_head"``
  merges them by the mean instead (cheaper, and SVD of an embedding table is of doubtful use).
* Per-model ``weight`` scales τ_i before the SVD (the reference's ``alpha`` given as a list).
* With one task, k = r and both polar factors are the identity map: Δ = τ_1 exactly.
* Singular vectors of a rank-deficient τ_i for zero singular values are whatever the SVD routine
  returns; they carry zero weight in Δ but take part in the orthogonalisation, as in the reference.
* Working dtype: float32 (bf16/fp16 SVD is not supported), float64 when the compute dtype is float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, TensorContext
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


class TsvmParams(ExcludeParams):
    alpha: float = Field(
        1.0, allow_inf_nan=False, description="scale of the merged task matrix (paper and reference: 1.0)"
    )


class TsvmModelParams(MethodParams):
    weight: float = Field(
        1.0, allow_inf_nan=False, description="scales this task vector before its SVD (reference: alpha list)"
    )


def tsv_merge_matrix(taus: Sequence[Tensor]) -> Tensor:
    """Δ for one m × n matrix from its T task matrices (float32 or float64), steps 1–4 above."""
    m, n = taus[0].shape
    r = min(m, n)
    k = r // len(taus)
    if k == 0:
        return torch.zeros_like(taus[0])
    us, ss, vhs = [], [], []
    for t in taus:
        u, s, vh = thin_svd(t)
        us.append(u[:, :k])
        ss.append(s[:k])
        vhs.append(vh[:k, :])
        del u, s, vh
    u_cat = torch.cat(us, dim=1)
    s_cat = torch.cat(ss)
    vh_cat = torch.cat(vhs, dim=0)
    del us, vhs
    u_orth = polar_factor(u_cat)
    del u_cat
    vh_orth = polar_factor(vh_cat)
    del vh_cat
    return (u_orth * s_cat) @ vh_orth


@method(
    "tsv_m",
    paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging, "
    "CVPR, arXiv:2412.00081",
    params=TsvmParams,
    model_params=TsvmModelParams,
    base="required",
    aliases=("tsvm",),
    card=MethodCard(
        # no parameter makes identical experts an identity on the SVD path (r/T directions kept
        # per copy); excluding every tensor reduces TSV-M to the mean of the task vectors
        identity=({"exclude": "*"}, {"weight": 1.0}),
        typical=({"alpha": 1.0}, {"weight": 1.0}),
        grid=({"alpha": (0.8, 1.0, 1.2, 1.5)}, {}),
        group="advanced",
    ),
)
def tsv_m(
    base: Tensor,
    experts: Sequence[Tensor],
    params: TsvmParams,
    model_params: Sequence[TsvmModelParams],
    ctx: TensorContext,
) -> Tensor:
    """Per weight matrix: top-(r/T) singular directions of each task, orthogonalised, summed."""
    w = work_dtype(base)  # float64 compute stays float64; everything else works in float32
    taus = task_vectors(base, experts, [m.weight for m in model_params], dtype=w)
    if decomposes(base, ctx.name, params.exclude):
        delta = tsv_merge_matrix(taus)
    else:
        delta = mean_task_vector(taus)
    del taus
    return (base.to(w) + params.alpha * delta).to(base.dtype)
