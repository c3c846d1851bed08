"""OPCM: continual merging by orthogonal projection and adaptive rescaling.

Tang, Yang, Shen, Luo, Hu, Du, Tao 2025, "Merging Models on the Fly Without Retraining: A
Sequential Approach to Scalable Continual Model Merging", NeurIPS 2025, arXiv:2501.09522.
Reference code: FusionBench ``fusion_bench/method/opcm/opcm_general.py`` (``OPCM``,
``merge_linear_weights``, ``merge_other_parameters``) and ``opcm/utils.py``.

As the reference code runs it, for expert t ≥ 2 with Δ = θ_{t−1} − θ0 the current (rescaled) merged
task vector, λ_{t−1} the previous step's λ and n̄_t the mean of ‖τ_1‖ … ‖τ_t‖ (L2 norms over the
whole model):

* linear-layer weights: full SVD Δ = U S Vᵀ (U m×m, V n×n); split = the first index i with
  cumsum(S)_i / ΣS > α (singular values, not their squares; 0 when there is none); P = Uᵀ τ_t V;
  zero P's diagonal (all min(m, n) entries) and its block P[:split, :split]; τ'_t = U P Vᵀ;
  New = θ0 + λ_{t−1}·Δ + τ'_t;
* every other tensor (biases, norms, embeddings, which are not ``nn.Linear``): New = θ0 +
  λ_{t−1}·Δ + τ_t;
* λ_t = ‖New − θ0‖ / n̄_t and θ_t = θ0 + (New − θ0) · n̄_t / ‖New − θ0‖ (the merged task vector
  keeps the mean task-vector norm); the first expert is taken as is (λ_1 = 1).

Zeroing the diagonal makes τ'_t orthogonal to Δ in the Frobenius inner product (⟨U P Vᵀ, U S Vᵀ⟩ =
Σ_i P_ii S_i), zeroing the block removes τ_t's components in the dominant subspace of Δ.

How it is computed here (same numbers, different bookkeeping):

* **No full SVD.** Every zeroed entry of P lies in its top-left k×k block, k = min(m, n), so only the
  first k singular vectors matter: with the thin SVD Δ = U_k S V_kᵀ, P_k = U_kᵀ τ V_k and M the k×k
  mask (diagonal and top-left block), U P' Vᵀ = U_k (P_k ∘ (1 − M)) V_kᵀ + (τ − U_k P_k V_kᵀ), the
  second term being τ's component outside span(U_k) ⊗ span(V_k) (the orthogonal complement the
  full U, V would carry). Both terms together are τ − U_k (P_k ∘ M) V_kᵀ, which is what
  :func:`project` computes: memory O(m·n), never the m×m matrix of a vocabulary-sized head.
  The result depends only on the singular subspaces, not on the signs LAPACK picks.
* **One pass per expert.** λ_{t−1}·Δ_{t−1} is exactly the unscaled sum of the previous step
  (λ_{t−1} = ‖New_{t−1} − θ0‖ / n̄_{t−1} undoes the rescale by n̄_{t−1} / ‖New_{t−1} − θ0‖), so the
  state keeps that unscaled sum R_t = R_{t−1} + τ'_t (the SVD of R equals that of Δ up to a
  positive scale, which changes neither U, V nor the split) and the scale s_t = n̄_t / ‖R_t‖ = 1/λ_t;
  the merged model θ0 + s_t·R_t is exactly the reference's θ_t. ‖τ_t‖ and ‖R_t‖ are summed during
  the same pass, so no first pass over the tensors is needed for the norms.

Departures and choices:

* Order: the reference shuffles the experts (``shuffle_order`` true by default); here experts are
  merged in the order they are added (a benchmark shuffles by adding them in another order).
* Which tensors are projected: :func:`mergelab.continual.base.tensor_role` (2-D ``*.weight`` that is
  not an embedding table; the reference's ``nn.Linear`` test, from names alone). ``exclude`` (not in
  the reference; default none) merges matching tensors as the non-linear ones, e.g.
  ``lm_head`` to skip the most expensive SVD of an LLM.
* ``diagonal: all`` (default, the code) zeroes all k diagonal entries of P. Where Δ is rank-deficient
  (a layer the experts so far did not change, low-rank LoRA fine-tunes), the singular vectors past
  its rank are an arbitrary basis of the null spaces, so the code removes components of τ_t that
  depend on that arbitrary choice; ``diagonal: support`` zeroes only the entries of non-zero
  singular values (S_i > k · eps · S_max), which is all the orthogonality to Δ needs. For a
  full-rank Δ the two are the same.
* ‖New − θ0‖ = 0 (every expert so far equal to the base): the reference divides by zero; here the
  scale stays 1 and λ_t is recorded as 1.
* Norms are over the float tensors stored in the checkpoints (the reference takes them over the
  module's ``state_dict``, where tied weights appear twice).

The paper's method section was not available when this was written; the defaults follow the code
as it runs (α = 0.5, ``config/method/opcm/opcm.yaml``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field

from mergelab.continual.base import ContinualMethod, Role, StepContext, StepSums
from mergelab.methods.kernels.linalg import thin_svd
from mergelab.methods.svd_utils import ExcludeParams, excluded

Tensor = torch.Tensor

PAPER = (
    "Tang et al. 2025, Merging Models on the Fly Without Retraining: A Sequential Approach to Scalable "
    "Continual Model Merging, NeurIPS 2025, arXiv:2501.09522"
)


class OpcmParams(ExcludeParams):
    alpha: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction of Δ's cumulative singular-value sum whose subspace the new task vector is "
        "projected out of (the split: first i with cumsum(S)_i/ΣS > α; reference: 0.5)",
    )
    diagonal: Literal["all", "support"] = Field(
        "all",
        description="which diagonal entries of Uᵀ τ V are zeroed: all min(m, n) (the reference code) or "
        "only those of non-zero singular values of Δ (basis-independent when Δ is rank-deficient)",
    )


def split_index(s: Tensor, alpha: float) -> int:
    """The first index i with cumsum(s)_i / Σs > α, or 0 when there is none (also when Σs = 0): the
    reference's ``argmax`` over the boolean test."""
    total = s.sum()
    if not bool(total > 0):
        return 0
    return int((s.cumsum(0) / total > alpha).to(s.dtype).argmax())


def removal_mask(s: Tensor, split: int, diagonal: Literal["all", "support"] = "all", size: int | None = None) -> Tensor:
    """The k×k boolean mask M of the entries of Uᵀ τ V that OPCM removes: the block [:split, :split]
    and the diagonal (every entry, or with ``diagonal="support"`` only where ``s`` exceeds
    ``size`` · eps · max(s), ``size`` being the matrix's larger dimension, default k)."""
    k = s.numel()
    mask = torch.zeros((k, k), dtype=torch.bool, device=s.device)
    mask[:split, :split] = True
    idx = torch.arange(k, device=s.device)
    if diagonal == "support":
        tol = (size or k) * torch.finfo(s.dtype).eps * (float(s.max()) if k else 0.0)
        idx = idx[s > tol]
    mask[idx, idx] = True
    return mask


def project(delta: Tensor, tau: Tensor, alpha: float, diagonal: Literal["all", "support"] = "all") -> Tensor:
    """τ' = U P' Vᵀ of the reference for one m×n matrix, from the thin SVD of ``delta``.

    Computed as τ − U_k (P_k ∘ M) V_kᵀ with P_k = U_kᵀ τ V_k (see the module docstring): equal to the
    full-SVD formula, in O(m·n + (m + n)·k) memory. ``delta`` and ``tau`` are float32 (or float64).
    """
    u, s, vh = thin_svd(delta)
    split = split_index(s, alpha)
    p = (u.T @ tau) @ vh.T
    p.mul_(removal_mask(s, split, diagonal, max(delta.shape)))
    return tau - (u @ p) @ vh


def projects(name: str, role: Role, params: OpcmParams) -> bool:
    """Whether OPCM projects this tensor (a linear-layer weight not excluded by name)."""
    return role == "matrix" and not excluded(name, params.exclude)


def opcm_step(raw: Tensor | None, tau: Tensor, params: OpcmParams, ctx: StepContext) -> Tensor:
    """R_t = R_{t−1} + τ'_t (τ'_t = τ_t outside linear layers); R_1 = τ_1."""
    if raw is None:
        return tau
    if projects(ctx.name, ctx.role, params):
        tau = project(raw, tau, params.alpha, params.diagonal)
    return raw.add_(tau)


def opcm_finish(stats: Mapping[str, Any], params: OpcmParams, t: int, sums: StepSums) -> tuple[dict[str, Any], float]:
    """Append ‖τ_t‖ to the norms; λ_t = ‖R_t‖ / mean norm; scale = 1 / λ_t."""
    norms = [*stats.get("norms", []), math.sqrt(sums.tau_sq)]
    mean = sum(norms) / len(norms)
    raw_norm = math.sqrt(sums.raw_sq)
    if raw_norm == 0.0 or mean == 0.0:
        return {"norms": norms, "lambda": 1.0}, 1.0
    lam = raw_norm / mean
    return {"norms": norms, "lambda": lam}, mean / raw_norm


def opcm_workspace(name: str, shape: tuple[int, ...], role: Role, params: OpcmParams) -> int:
    """τ, the result and the projection's buffers: the SVD (copies of Δ, U m×k, Vᵀ k×n, LAPACK's
    workspace: up to ~6k² for a square matrix), Uᵀτ (k×n), P (k×k), U·P (m×k) and the removed part.
    Measured peaks (torch 2.13, CPU): 5.2 m·n for 4096×128, 6.2 for 1024², 7.3 for 128×4096."""
    n = math.prod(shape)
    if not projects(name, role, params):
        return 3 * n
    rows, cols = shape
    k = min(rows, cols)
    return 6 * n + 2 * rows * k + 2 * cols * k + 6 * k * k


OPCM = ContinualMethod(
    name="opcm",
    paper=PAPER,
    summary="project each new task vector out of the dominant singular subspace of the running merge, "
    "rescale to the mean task-vector norm",
    params=OpcmParams,
    step=opcm_step,
    finish=opcm_finish,
    workspace=opcm_workspace,
    history=("lambda",),
)
