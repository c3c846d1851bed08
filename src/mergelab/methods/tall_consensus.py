"""Consensus merging: keep only the weights that at least k tasks find important.

Wang, Dimitriadis, Ortiz-Jiménez, Fleuret, Frossard 2024, "Localizing Task Information for
Improved Model Merging and Compression", ICML, arXiv:2405.07813 (reference code:
nik-dim/tall_masks, ``construct_consensus_mask`` in ``src/utils/tallmask_utils.py``).

With τ_MTL and the TALL masks m_t = 1[|τ_t| > λ_t·|τ_MTL − τ_t|] of :mod:`tall_masks`
(same parameters: ``multitask: sum|ties``, ``tall_lambda``, ``density``, ``scope``):

    c = Σ_t m_t,  m_cons = 1[c ≥ k],  θ = θ0 + λ · (m_cons ⊙ τ_MTL).

k = 2 (default, the reference's ``prun_thre_k``) removes "catastrophic" weights (c = 0, useful
to no task) and "selfish" ones (c = 1, useful to one task only); k = 1 removes only the
catastrophic ones; k = 0 keeps everything, i.e. plain task arithmetic (``multitask: sum``) or
TIES dis-sum (``multitask: ties``) with scale λ; k > number of tasks gives the base back.

λ (``lambda``, the paper's α) defaults to 1.0 as mergelab's task arithmetic; the reference
selects it on validation data from {0.1, 0.2, …, 1.0} (values around 0.3–0.5 are typical for
8 tasks with ``multitask: sum``). The reference always uses the disjoint *sum* for TIES.

Granularity: elementwise; one pass per tensor with ``multitask: sum`` (S1), TIES global trim
passes first with ``multitask: ties`` and ``scope: global`` (S2). The reference computes the
masks from the TALL masks chosen per task on validation data (λ_t from 0.2…0.6); here λ_t is
the per-model ``tall_lambda`` (default 0.6), so the masks are recomputed in the same pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, TensorContext
from mergelab.methods.kernels.tensors import scale_add, task_vectors
from mergelab.methods.registry import method
from mergelab.methods.tall_masks import (
    MultiTaskParams,
    TallModelParams,
    multitask_passes,
    multitask_vector,
    tall_mask,
)

Tensor = torch.Tensor


class ConsensusParams(MultiTaskParams):
    lambda_: float = Field(
        1.0,
        alias="lambda",
        allow_inf_nan=False,
        description="scale α of the masked multi-task vector (reference: chosen on validation data from 0.1…1.0)",
    )
    k: int = Field(
        2,
        ge=0,
        description="keep weights that at least k TALL masks select (2: drop selfish and "
        "catastrophic weights; 0: task arithmetic / TIES)",
    )


class ConsensusModelParams(TallModelParams):
    pass


def consensus_mask(masks: Sequence[Tensor], k: int) -> Tensor:
    """1[Σ_t m_t ≥ k] (bool)."""
    if k <= 0:
        return torch.ones_like(masks[0], dtype=torch.bool)
    count = torch.zeros(masks[0].shape, dtype=torch.int32, device=masks[0].device)
    for m in masks:
        count.add_(m.to(torch.int32))
    return count >= k


def consensus_delta(
    base: Tensor,
    experts: Sequence[Tensor],
    params: ConsensusParams,
    model_params: Sequence[ConsensusModelParams],
    ctx: TensorContext,
) -> Tensor:
    """m_cons ⊙ τ_MTL (float32; float64 under a float64 compute dtype): ``consensus == base + λ ·
    consensus_delta`` (cast to the base's dtype)."""
    deltas = task_vectors(base, experts)
    tau = multitask_vector(deltas, params, model_params, ctx)
    if params.k > 0:
        masks = [tall_mask(d, tau, m.tall_lambda) for d, m in zip(deltas, model_params)]
        del deltas
        tau.masked_fill_(~consensus_mask(masks, params.k), 0.0)
    return tau


@method(
    "consensus",
    paper="Wang et al. 2024, Localizing Task Information for Improved Model Merging and Compression, arXiv:2405.07813",
    params=ConsensusParams,
    model_params=ConsensusModelParams,
    base="required",
    passes=multitask_passes,
    aliases=("tall_consensus", "consensus_merging"),
    scale="lambda",
    delta=consensus_delta,
    card=MethodCard(
        identity=({"normalize": True}, {}),
        typical=({"lambda": 0.5}, {"tall_lambda": 0.3}),
        grid=({"multitask": ("sum", "ties"), "lambda": (0.4, 0.7, 1.0), "k": (2,)}, {}),
        group="advanced",
    ),
)
def consensus(
    base: Tensor,
    experts: Sequence[Tensor],
    params: ConsensusParams,
    model_params: Sequence[ConsensusModelParams],
    ctx: TensorContext,
) -> Tensor:
    """θ0 + λ·(m_cons ⊙ τ_MTL): drop weights fewer than k tasks' TALL masks select."""
    tau = consensus_delta(base, experts, params, model_params, ctx)
    return scale_add(base.to(tau.dtype), tau, params.lambda_).to(base.dtype)
