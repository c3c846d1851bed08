"""WIDEN: weight each expert's update per column by how much it changed that column's magnitude
and direction, relative to its other columns (weight disentanglement).

Yu, Yu, Yu, Huang, Li 2024, "Extend Model Merging from Fine-Tuned to Pre-Trained Large Language
Models via Weight Disentanglement", arXiv:2408.03092. Designed to merge fine-tuned experts with
models further pre-trained from the same base, whose updates differ greatly in size.

For a 2-D weight W (out × in; input embeddings are transposed first so that a column is one
token) and each model, column magnitudes m[j] = ‖W[:, j]‖₂ and directions D[:, j] = W[:, j]/m[j].
For each expert i (base: index 0):

1. Δm_i[j] = |m_i[j] − m_0[j]|, Δd_i[j] = 1 − cos(W_i[:, j], W_0[:, j]);
2. rank within the expert: r_i[j] = (0-based ascending rank of Δ_i[j] among the n columns) / n,
   ties broken by column index (stable sort);
3. score over experts: S_i[j] = softmax_i(r_i[j]); where r_i[j] > t · mean_j r_i[j], S_i[j] = c
   (t = ``above_average_value_ratio``, c = ``score_calibration_value``);
4. w_i[j] = ½ (S_mag,i[j] + S_dir,i[j]); θ[:, j] = θ0[:, j] + Σ_i w_i[j] τ_i[:, j].

1-D tensors (norms, biases) and scalars: the score recipe of step 3 applied elementwise to the raw
|τ_i| (no ranking, no magnitude/direction split), θ = θ0 + Σ_i S_i ⊙ τ_i. No global scale λ.

Granularity: per column of each matrix (per element for 1-D), statistics within the tensor only,
so one streaming pass.

Checked against the reference code (yule-BUAA/MergeLLM ``model_merging_methods/merging_methods.py``
``widen_merging``; defaults t = c = 1.0 from its ``merge_llms.py``):

* Input embeddings: the reference transposes only ``model.embed_tokens.weight``; here any tensor
  whose name ends in ``embed_tokens.weight``, ``wte.weight``, ``word_embeddings.weight``,
  ``embed_in.weight``, ``tok_embeddings.weight`` or ``shared.weight`` (``transpose_embeddings``
  turns this off). ``lm_head`` is an ordinary (vocab × hidden) linear weight, as in the reference.
* Tensors with 3 or more dimensions (the reference asserts they do not occur) are treated as
  matrices (shape[0], rest).
* A column that is zero in the base or an expert has an undefined direction (the reference divides
  by its zero norm and produces NaN); here its cosine is taken as 0 (Δd = 1).
* With c = 1 (default) a column that is above average for an expert gets weight up to 1 for that
  expert regardless of T, so T identical experts give up to T·τ there; that is the method.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, NoParams, TensorContext
from mergelab.methods.registry import method
from mergelab.methods.svd_utils import work_dtype

Tensor = torch.Tensor

#: Name endings of input-embedding tables (rows = tokens); transposed so that a column is a token.
EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "shared.weight",
)

COS_EPS = 1e-12


class WidenParams(MethodParams):
    above_average_value_ratio: float = Field(
        1.0,
        ge=0.0,
        allow_inf_nan=False,
        description="t: a column whose rank exceeds t times the expert's mean rank gets the calibration "
        "score (reference default 1.0)",
    )
    score_calibration_value: float = Field(
        1.0,
        allow_inf_nan=False,
        description="c: the score given to those above-average columns (reference default 1.0)",
    )
    transpose_embeddings: bool = Field(
        True,
        description="transpose input-embedding tables so that magnitudes are per token, as the reference",
    )


def within_model_rank(diff: Tensor) -> Tensor:
    """Per row of ``diff`` (experts × columns): ascending stable rank / n_columns, in ``diff``'s dtype."""
    n_models, n_cols = diff.shape
    order = torch.argsort(diff, dim=1, stable=True)
    levels = (torch.arange(n_cols, device=diff.device, dtype=diff.dtype) / n_cols).expand(n_models, -1)
    ranks = torch.empty((n_models, n_cols), dtype=diff.dtype, device=diff.device)
    ranks.scatter_(1, order, levels)
    return ranks


def importance_scores(significance: Tensor, ratio: float, calibration: float) -> Tensor:
    """Softmax over experts (dim 0); entries above ``ratio`` × their row mean get ``calibration``."""
    scores = torch.softmax(significance, dim=0)
    above = significance > significance.mean(dim=1, keepdim=True) * ratio
    return scores.masked_fill_(above, calibration)


def _is_embedding(name: str) -> bool:
    return name.endswith(EMBEDDING_SUFFIXES)


def widen_matrix(base: Tensor, experts: Sequence[Tensor], ratio: float, calibration: float) -> Tensor:
    """Merged matrix for (out × in) float32 (or float64) inputs (columns = dim 1)."""
    base_norm = base.norm(dim=0)
    mag_diff, dir_diff, taus = [], [], []
    for e in experts:
        norm = e.norm(dim=0)
        mag_diff.append((norm - base_norm).abs_())
        cos = (e * base).sum(dim=0) / (norm * base_norm).clamp_min(COS_EPS)
        dir_diff.append(1.0 - cos)
        taus.append(e - base)
    w_mag = importance_scores(within_model_rank(torch.stack(mag_diff)), ratio, calibration)
    w_dir = importance_scores(within_model_rank(torch.stack(dir_diff)), ratio, calibration)
    weights = 0.5 * (w_mag + w_dir)
    merged = base.clone()
    for i, t in enumerate(taus):
        merged.add_(t * weights[i])
    return merged


def widen_elementwise(base: Tensor, experts: Sequence[Tensor], ratio: float, calibration: float) -> Tensor:
    """Merged 1-D (or scalar) tensor: scores from the raw |τ_i| elementwise."""
    flat_base = base.reshape(-1)
    taus = torch.stack([e.reshape(-1) - flat_base for e in experts])
    scores = importance_scores(taus.abs(), ratio, calibration)
    return (flat_base + (taus * scores).sum(dim=0)).reshape(base.shape)


@method(
    "widen",
    paper="Yu et al. 2024, Extend Model Merging from Fine-Tuned to Pre-Trained Large Language Models via "
    "Weight Disentanglement, arXiv:2408.03092",
    params=WidenParams,
    model_params=NoParams,
    base="required",
    card=MethodCard(
        identity=({"score_calibration_value": 0.5}, {}),  # c = 1/T: every score is 1/T
        typical=({}, {}),
        grid=({"above_average_value_ratio": (1.0, 1.5, 2.0), "score_calibration_value": (0.5, 1.0)}, {}),
        group="advanced",
    ),
)
def widen(
    base: Tensor,
    experts: Sequence[Tensor],
    params: WidenParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> Tensor:
    """Weight each expert's update per column by its ranked magnitude and direction change."""
    t, c = params.above_average_value_ratio, params.score_calibration_value
    w = work_dtype(base)  # float64 compute stays float64; everything else works in float32
    b = base.to(w)
    ex = [e.to(w) for e in experts]
    if b.dim() < 2:
        return widen_elementwise(b, ex, t, c).to(base.dtype)
    transpose = b.dim() == 2 and params.transpose_embeddings and _is_embedding(ctx.name)
    if transpose:
        merged = widen_matrix(b.T, [e.T for e in ex], t, c).T
    else:
        shape = b.shape
        merged = widen_matrix(b.reshape(shape[0], -1), [e.reshape(shape[0], -1) for e in ex], t, c).reshape(shape)
    return merged.contiguous().to(base.dtype)
