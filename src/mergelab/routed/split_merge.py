"""Split-Merge (**experimental**): common dimensions averaged, complementary ones compressed per expert.

Gorantla et al. 2025, "Split, Merge, and Route" (Split-Merge), EMNLP 2025 main, pp. 30135–30154
(ACL Anthology 2025.emnlp-main.1533). No code is public; the abstract fixes: relative task
vectors (expert − base), parameters dissected into *common* dimensions (averaged across experts)
and *complementary* dimensions unique to each expert, the complementary parts compressed to
principal components and a scalar multiplier per expert, and a router that selects the most
relevant domain (top-1), with no training of the merged model.

What the abstract leaves open is chosen here (``../shared/algorithms-next.md`` §2's proposal;
unverified against the paper's PDF, so the method is marked experimental):

1. τₜ = θₜ − θ0; per tensor, Mₜ = the ``topk`` fraction of entries of largest |τₜ|;
2. common set C = entries selected by at least two experts whose signs all agree there;
   complementary set of expert t = Mₜ \\ C;
3. shared θc = θ0 + (1/T) Σₜ τₜ ⊙ 1_C;
4. per expert and matrix: the rank-r truncated SVD P of τₜ ⊙ 1_{Mₜ \\ C} (r = ⌊``rank_fraction`` ·
   min(m, n)⌋) and one scalar αₜ by least squares: ``scalar_fit: residual`` (default) fits
   θc + αP to θₜ, i.e. α = ⟨θₜ − θc, P⟩ / ‖P‖²; ``task_vector`` fits αP to τₜ (the proposal's
   wording); 1-D tensors keep their complementary part dense (α = 1);
5. a top-1 router (Twin-Merging's MLP on the mean-pooled hidden state of θc);
6. the model of route t: θc + αₜ Pₜ.

Invariants (tested): one expert with ``topk`` 1 and full rank reconstructs it exactly (C is
empty, P = τ, α = 1); identical experts leave no complementary part (C = M).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergelab.lora.factors import LoraFactors
from mergelab.methods.kernels.linalg import thin_svd


class SplitMergeParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    topk: float = Field(0.2, gt=0.0, le=1.0, description="fraction of each task vector's entries selected per tensor")
    rank_fraction: float = Field(
        0.1, gt=0.0, le=1.0, description="rank of each complementary matrix = ⌊rank_fraction · min(m, n)⌋ (at least 1)"
    )
    scalar_fit: Literal["residual", "task_vector"] = Field(
        "residual", description="α by least squares of θc + αP against θₜ (residual) or of αP against τₜ"
    )
    svd_dtype: Literal["float32", "float64"] = Field("float32")


def topk_mask(t: torch.Tensor, fraction: float) -> torch.Tensor:
    """The ⌈fraction · n⌉ entries of largest magnitude (ties: the first in flattened order), as a bool mask."""
    n = t.numel()
    k = min(n, max(0, int(torch.ceil(torch.tensor(fraction * n)).item())))
    mask = torch.zeros(n, dtype=torch.bool)
    if k:
        idx = torch.sort(t.abs().reshape(-1), descending=True, stable=True).indices[:k]
        mask[idx] = True
    return mask.reshape(t.shape)


def split(
    base: torch.Tensor, experts: Sequence[torch.Tensor], topk: float
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(common update θc − θ0, task vectors τₜ, complementary parts τₜ ⊙ 1_{Mₜ \\ C}) of one tensor."""
    wd = torch.promote_types(base.dtype, torch.float32)
    taus = [e.to(wd) - base.to(wd) for e in experts]
    masks = [topk_mask(t, topk) for t in taus]
    count = torch.stack(masks).sum(0)
    pos = torch.stack([m & (t > 0) for m, t in zip(masks, taus)]).sum(0)
    neg = torch.stack([m & (t < 0) for m, t in zip(masks, taus)]).sum(0)
    common = (count >= 2) & ((pos == count) | (neg == count))
    shared = torch.stack([t * common for t in taus]).mean(0)
    comps = [t * (m & ~common) for t, m in zip(taus, masks)]
    return shared, taus, comps


def compress_complement(
    comp: torch.Tensor, target: torch.Tensor, rank: int, svd_dtype: torch.dtype = torch.float32
) -> tuple[LoraFactors | None, float]:
    """P = rank-``rank`` SVD of ``comp`` (``out × in``) and α = ⟨target, P⟩ / ‖P‖²; the factors carry α."""
    if rank <= 0 or not bool(comp.any()):
        return None, 0.0
    u, s, vh = thin_svd(comp.to(svd_dtype))
    r = min(rank, s.numel())
    b = u[:, :r] * s[:r]
    a = vh[:r]
    p = b @ a
    denom = float((p * p).sum())
    alpha = float((target.to(p.dtype) * p).sum()) / denom if denom > 0 else 0.0
    return LoraFactors(a.contiguous(), (b * alpha).contiguous(), 1.0), alpha
