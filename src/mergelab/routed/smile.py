"""SMILE: sparse mixture of low-rank experts, routed per token by each expert's singular directions.

Tang, Shen, Du, Tao et al. 2024, "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction
From Pre-Trained Foundation Models", arXiv:2408.10174 (reference code tanganke/fusion_bench
``fusion_bench/models/smile_moe/linear_from_module.py``, ``method/smile_upscaling``).

For every linear layer with weights W0 (base) and Wₜ (experts), ΔWₜ = Wₜ − W0 = Uₜ Sₜ Vₜᵀ:

* expert t is the rank-k part ``Uₜ[:, :k] · (Sₜ[:k] Vₜ[:, :k]ᵀ)`` plus the bias update bₜ − b0;
* the gate's logit for expert t is ``‖Vₜ[:, :gate_k]ᵀ x‖₂`` (right singular vectors only, no
  singular values; with ``routing_use_diff: false`` the SVD of Wₜ instead of ΔWₜ);
* routing is per token: softmax over the experts' logits, keep the ``top_k`` largest, renormalise;
* output: ``W0 x + b0 + Σ_selected wₜ (Uₜ Sₜ Vₜᵀ x + bₜ − b0)``.

Layers that no expert changed are left as they are (the reference skips them too). Other modules
(embeddings, norms) are not experts: the shared model keeps the base's (``average_experts: true``:
the experts' mean, the reference's option). No training. Defaults are the reference's CLIP
configuration (k 128, gate_k 1, top_k 1); its LLM configuration uses k 64, gate_k 8, top_k 1. A
rank larger than a matrix allows is cut to ``min(m, n)``.

Stored as: shared/ = the base (or the non-linear average), experts/<t>/ = LoRA of the rank-k parts
(``B = U S``, ``A = Vᵀ``) and biases b0 + (bₜ − b0), router/ = the gate matrices ``gate.<layer>``
``[experts, gate_k, in]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergelab.lora.factors import LoraFactors
from mergelab.methods.kernels.linalg import thin_svd


class SmileParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(128, ge=1, description="rank of each expert's low-rank part (cut to min(m, n))")
    gate_k: int = Field(1, ge=1, description="right singular vectors per expert in the gate")
    top_k: int = Field(1, ge=1, description="experts per token")
    routing_use_diff: bool = Field(True, description="gate from the SVD of ΔWₜ (true) or of Wₜ (false)")
    average_experts: bool = Field(
        False, description="non-linear modules of the shared model: the experts' mean (true) or the base's (false)"
    )
    svd_dtype: Literal["float32", "float64"] = Field("float32")


def smile_layer(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    k: int,
    gate_k: int,
    routing_use_diff: bool = True,
    svd_dtype: torch.dtype = torch.float32,
) -> tuple[list[LoraFactors | None], torch.Tensor] | None:
    """One linear layer's experts and gate (weights ``out × in``): (LoRA factors per expert, gate
    ``[T, gate_k, in]``), or None when no expert changed the layer."""
    diffs = [e.float() - base.float() for e in experts]
    if not any(bool(d.any()) for d in diffs):
        return None
    factors: list[LoraFactors | None] = []
    gates = []
    for d, e in zip(diffs, experts):
        u, s, vh = thin_svd(d.to(svd_dtype))
        r = min(k, s.numel())
        factors.append(
            LoraFactors(vh[:r].float().contiguous(), (u[:, :r] * s[:r]).float().contiguous(), 1.0)
            if bool(d.any())
            else None
        )
        if routing_use_diff:
            gvh = vh
        else:
            gvh = thin_svd(e.float().to(svd_dtype))[2]
        gates.append(gvh[: min(gate_k, gvh.shape[0])].float())
    return factors, torch.stack(gates).contiguous()
