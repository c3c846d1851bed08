"""Sub-MoE (experimental): subspace expert merging (Li, Zhu et al., "Sub-MoE: Efficient Mixture-of-Expert
LLMs Compression via Subspace Expert Merging", AAAI 2026, arXiv:2506.23266).

Its code (lliai/MoERazor) could not be read, so this follows the paper's description, and the
choices the abstract leaves open are mergelab's (marked [I]):

1. **Adaptive expert clustering**: K-means of the experts on the cosine similarity of their outputs
   on calibration tokens. [I] Spherical K-means on the experts' output vectors over a sample of each
   layer's calibration tokens (every expert applied to the same tokens), run on their cosine matrix
   alone, initialised with the ``K`` most used experts, ties to the more used centre.
2. **Experts union decomposition**: per group and weight matrix, the SVD of the members' matrices
   side by side, ``[W_1 … W_m] = U S [V_1 … V_m]ᵀ``, gives a basis ``U`` of the output space shared
   by the members ([I] concatenated along the input dimension, for every projection).
3. **Frequency-based merging** of the member-specific parts: ``V̄ = Σ f_i V_i / Σ f_i``.
4. **Reconstruction** ``W = U S V̄ᵀ``, optionally truncated to rank ``r`` (intra-expert compression).

Invariants (tested): at full rank the result is exactly the frequency-weighted mean ``Σ f_i W_i /
Σ f_i`` (because ``U S V_iᵀ = W_i``), so without truncation Sub-MoE differs from M-SMoE only in its
clustering; at rank ``r`` it is the projection ``U_r U_rᵀ`` of that mean onto the members' top-``r``
shared output subspace. The router is handled as in M-SMoE (kept, with shared slots).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mergelab.methods.kernels.linalg import thin_svd
from mergelab.moe.grouping import LayerGroups, group_weights, stable_order


def cluster_experts(similarity: Tensor, freq: Tensor, k: int, *, iterations: int = 50) -> LayerGroups:
    """Spherical K-means of ``N`` experts from their cosine matrix ``similarity`` (``[N, N]``).

    The cosine of expert ``i`` to the mean direction of cluster ``C`` is
    ``Σ_{j∈C} S_ij / sqrt(Σ_{j,l∈C} S_jl)``, so no output vectors are needed. Centres start at the
    ``k`` most used experts; an emptied cluster is re-seeded with the expert farthest from its centre.
    The core of a cluster is its most used member.
    """
    n = freq.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} with {n} experts")
    if k == n:
        return LayerGroups.identity(n)
    s = similarity.double()
    order = stable_order(freq)
    rank = {e: i for i, e in enumerate(order)}
    labels = [-1] * n
    for g, c in enumerate(order[:k]):
        labels[c] = g
    clusters: list[list[int]] = [[c] for c in order[:k]]

    def closeness(e: int, members: Sequence[int]) -> float:
        num = float(s[e, list(members)].sum())
        den = float(s[list(members)][:, list(members)].sum())
        return num / den**0.5 if den > 0 else 0.0

    for _ in range(iterations):
        new = [_nearest(e, clusters, closeness) for e in range(n)]
        groups: list[list[int]] = [[e for e in range(n) if new[e] == g] for g in range(k)]
        for g in range(k):
            if not groups[g]:  # re-seed with the expert farthest from its own centre
                far = min(
                    (e for e in range(n) if len(groups[new[e]]) > 1),
                    key=lambda e: (closeness(e, clusters[new[e]]), -rank[e]),
                )
                groups[new[far]].remove(far)
                new[far] = g
                groups[g] = [far]
        if new == labels:
            break
        labels, clusters = new, groups
    cores = [min(members, key=lambda e: rank[e]) for members in clusters]
    return LayerGroups.from_labels(labels, cores)


def _nearest(e: int, clusters: Sequence[Sequence[int]], closeness: Callable[[int, Sequence[int]], float]) -> int:
    """The cluster closest to expert ``e`` (ties: the lower cluster, whose centre was the more used)."""
    scores = [closeness(e, members) for members in clusters]
    return max(range(len(clusters)), key=lambda g: (scores[g], -g))


def union_merge(tensors: Sequence[Tensor], freq: Sequence[float], rank: int | None = None) -> Tensor:
    """One group's weight matrix by experts union decomposition.

    ``[W_1 … W_m] = U S [V_1 … V_m]ᵀ`` (each ``W_i`` is ``[out, in]``), ``V̄ = Σ f_i V_i / Σ f_i``,
    result ``U_r S_r V̄_rᵀ`` (``rank`` None: full rank). A group of one is returned unchanged unless
    truncated.
    """
    if len(tensors) == 1 and rank is None:
        return tensors[0]
    w = group_weights(torch.tensor(list(freq), dtype=torch.float64), range(len(tensors)))
    cols = tensors[0].shape[1]
    stacked = torch.cat([t.double() for t in tensors], dim=1)  # [out, m·in]
    u, sv, vh = thin_svd(stacked)
    r = sv.numel() if rank is None else max(1, min(rank, sv.numel()))
    v_bar = sum(wi * vh[:r, i * cols : (i + 1) * cols] for i, wi in enumerate(w))
    assert isinstance(v_bar, Tensor)
    return ((u[:, :r] * sv[:r]) @ v_bar).float()
