"""WEMoE: feed-forward blocks whose task vectors are mixed by input-dependent gates.

Tang, Shen, Chen, Tao, Zhou et al. 2024, "Merging Multi-Task Models via Weight-Ensembling Mixture
of Experts", ICML, arXiv:2402.00433 (reference code tanganke/fusion_bench ``models/we_moe.py``,
``method/we_moe/clip_we_moe.py``).

* Every tensor outside the feed-forward blocks is merged by task arithmetic with λ =
  ``init_lambda`` (0.3): that is the shared model (a plain static merge).
* Each block's feed-forward weights become θ0_block + Σₜ λₜ(x) τₜ_block, with τₜ = θₜ − θ0 of
  that block, and λ(x) a gate on the block's input: Linear(d, d) → ReLU → Linear(d, T)
  (``depth`` 2; 1: one Linear; 0: a learned vector), weights N(0, 0.01), the last bias
  ``init_lambda``, **no softmax**: the coefficients are the raw outputs, averaged over the
  sequence's tokens (one λ per input). ``batch_reduce: true`` averages them over the batch too:
  the reference's CLIP configuration sets it, and since its evaluation batches hold one task each,
  one λ per batch then carries the batch's task (a task id by the back door); mergelab defaults to
  one λ per input (the reference class's own default) and offers ``batch_reduce`` as an option.
* The gates are trained by test-time adaptation: Adam (lr 1e-4, ``steps`` 1000, batch 16 per
  task), each step one batch of unlabeled inputs from every task, minimising the mean entropy of
  the task's predictions (its head's logits for encoders with task heads, the next-token
  distribution for causal LMs). The paper and the reference use each task's **test** inputs
  (unlabeled): the benchmark does the same and says so; the recipe's calibration sources decide.

Stored as: shared/ = the task-arithmetic merge, experts/<t>/ = each block's matrices θₜ whole
(PEFT ``modules_to_save``: weight and bias), except the expert's first changed matrix, which is
stored as exact LoRA factors (an identity on the smaller side: ``B = I, A = Δ`` or ``B = Δ, A = I``
with Δ = θₜ − θ*) because a PEFT adapter needs one LoRA module; full-rank factors cost min(m, n)²
more than the dense matrix (+25 % for a 4×-wide MLP matrix), so that is paid once per expert, not
per matrix. router/ = the gates (``gate.<block>.*``) and the base block tensors
(``base.<tensor>``). A one-hot route is θ* outside the blocks and θₜ inside (PEFT rebuilds θₜ's
blocks exactly).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergelab.lora.factors import LoraFactors


class WemoeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    init_lambda: float = Field(0.3, description="task-arithmetic λ of the shared model and the gates' initial output")
    depth: int = Field(2, ge=0, le=2, description="gate depth: 2 (reference), 1 or 0")
    steps: int = Field(1000, ge=0, description="test-time adaptation steps (0: keep the initial gates)")
    lr: float = Field(1e-4, gt=0.0, description="Adam learning rate of the gates")
    batch_size: int = Field(16, ge=1, description="inputs per task per step")
    examples: int | None = Field(None, ge=1, description="unlabeled inputs read per task (default: all of the source)")
    max_length: int = Field(128, ge=2, description="tokens per input")
    batch_reduce: bool = Field(False, description="one λ per batch (the reference's option) instead of per input")
    pooling: Literal["mean", "cls", "last"] = Field("mean", description="encoders with a task head: token pooling")


def identity_factors(delta: torch.Tensor) -> LoraFactors:
    """Exact LoRA factors of a dense ``out × in`` update: an identity on the smaller side."""
    out_f, in_f = delta.shape
    d = delta.float().contiguous()
    if out_f <= in_f:
        return LoraFactors(d, torch.eye(out_f), 1.0)
    return LoraFactors(torch.eye(in_f), d, 1.0)


def entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax of ``logits`` over its last axis (masked positions only)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    if mask is not None and mask.shape == h.shape:
        m = mask.to(h.dtype)
        return (h * m).sum() / m.sum().clamp_min(1.0)
    return h.mean()
