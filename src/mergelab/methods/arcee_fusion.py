"""Arcee Fusion: take the other model's change only where it is an outlier of importance.

Arcee AI 2025, "Meet MergeKit v0.1: Arcee Fusion, expanded model support, multi-GPU acceleration"
(the method's announcement; its reference code is mergekit's ``arcee_fusion``, first released in
mergekit 0.1.0), whose recipes run here.

For one tensor with base θ0 and the other model θ1 (δ = θ1 − θ0):

1. **importance**: s = |δ| · KL(p ‖ q) with p = softmax(θ1) + 10⁻⁸ and q = softmax(θ0) + 10⁻⁸
   taken along the last dimension, KL = Σ p log(p / q) per row (one value for a 1-D tensor), so
   an entry's score is its change times how much its row's softmax distribution moved;
2. **dynamic threshold**: τ = Q2 + k · (Q3 − Q1) over the tensor's scores (Tukey's upper fence,
   k = ``fence``, Arcee's 1.5), the quartiles Q_q the order statistics s_(⌊q (n − 1)⌋) of the n
   sorted scores (mergekit's quantile rule);
3. **fuse**: θ = θ0 + 1[s ≥ τ] · δ.

Departure from mergekit, none in the rule; one in how it is computed: for tensors of more than
10⁶ entries mergekit estimates the quartiles from 10⁶ entries drawn at random (with replacement,
from torch's global generator), so its output varies with the draw; here the quartiles are exact
for every size (``quantile_sample``, default 0, takes mergekit's estimate from that many entries
drawn from the tensor's seeded generator instead, reproducible but not mergekit's draw). The
fence multiplier is mergekit's constant 1.5, exposed as ``fence``; ``normalize``, ``int8_mask``
and ``rescale``, which mergekit accepts here and ignores, are accepted and have no effect. Computed in float32 (float64
for float64 inputs), returned in the base's dtype. Granularity: per tensor (threshold), per row
(KL), one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, NoParams, TensorContext
from mergelab.methods.kernels.tensors import work_dtype
from mergelab.methods.registry import method

SOFTMAX_EPS = 1e-8
"""Added to both softmax distributions before the logarithm, as mergekit."""


class ArceeFusionParams(MethodParams):
    fence: float = Field(
        1.5,
        allow_inf_nan=False,
        description="k of the threshold median + k·IQR of the importance scores (Arcee's 1.5)",
    )
    quantile_sample: int = Field(
        0,
        ge=0,
        description="estimate the quartiles from this many random entries when the tensor has more (0: exact)",
    )

    # mergekit-yaml accepts these general keys for arcee_fusion and ignores them; recipes in use
    # set them (e.g. normalize: true, int8_mask: true, rescale: false), so they run here unchanged
    normalize: bool = Field(True, description="accepted for mergekit compatibility; no effect")
    int8_mask: bool = Field(False, description="accepted for mergekit compatibility; no effect")
    rescale: bool = Field(False, description="accepted for mergekit compatibility; no effect")


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """|θ1 − θ0| times the KL divergence of their row softmaxes (last dimension), in the work dtype."""
    dtype = work_dtype(base)
    b = base.to(dtype)
    o = other.to(dtype)
    if b.dim() == 0:
        b, o = b.reshape(1), o.reshape(1)
    p = F.softmax(o, dim=-1) + SOFTMAX_EPS
    q = F.softmax(b, dim=-1) + SOFTMAX_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return ((o - b).abs() * kl).reshape(base.shape)


def order_quantiles(
    scores: torch.Tensor, qs: Sequence[float], sample: int = 0, generator: torch.Generator | None = None
) -> list[float]:
    """s_(⌊q (n − 1)⌋) of the sorted scores for each q (from ``sample`` random entries when the
    tensor has more and ``sample`` > 0)."""
    flat = scores.reshape(-1)
    if sample > 0 and flat.numel() > sample:
        flat = flat[torch.randint(flat.numel(), (sample,), generator=generator, device=flat.device)]
    n = flat.numel()
    ordered = torch.sort(flat).values
    return [float(ordered[int(q * (n - 1))]) for q in qs]


def fusion_mask(scores: torch.Tensor, fence: float = 1.5, sample: int = 0, generator=None) -> torch.Tensor:
    """1[s ≥ Q2 + fence·(Q3 − Q1)] (boolean, the scores' shape)."""
    q1, q2, q3 = order_quantiles(scores, (0.25, 0.5, 0.75), sample, generator)
    return scores >= q2 + fence * (q3 - q1)


@method(
    "arcee_fusion",
    paper="Arcee AI 2025, Arcee Fusion (MergeKit v0.1 release); as mergekit's arcee_fusion",
    params=ArceeFusionParams,
    model_params=NoParams,
    base="required",
    min_experts=1,
    max_experts=1,
    card=MethodCard(
        # a fence far below the median keeps every change: the other model
        identity=({"fence": -1.0e12}, {}),
        typical=({}, {}),  # two-model method (as slerp): not benchmarked on its own
    ),
)
def arcee_fusion(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    params: ArceeFusionParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """Add the other model's change where its importance (abs(δ) × row-softmax KL) is above Tukey's fence."""
    if len(experts) != 1:
        raise ValueError(f"arcee_fusion merges exactly one model into the base, got {len(experts)}")
    dtype = work_dtype(base)
    b = base.to(dtype)
    o = experts[0].to(dtype)
    if b.numel() == 0:
        return base.clone()
    gen = ctx.generator() if params.quantile_sample > 0 and b.numel() > params.quantile_sample else None
    mask = fusion_mask(fusion_importance(b, o), params.fence, params.quantile_sample, gen)
    return (b + mask.to(dtype) * (o - b)).to(base.dtype)
