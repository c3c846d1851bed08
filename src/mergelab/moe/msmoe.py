"""M-SMoE: routing-guided expert merging (Li et al., "Merge, Then Compress: Demystify Efficient SMoE
with Hints from Its Routing Policy", ICLR 2024, arXiv:2310.01334; code UNITES-Lab/MC-SMoE).

1. **Usage frequency**: how often the router puts each expert in a token's top-k over the
   calibration tokens, normalised per layer.
2. **Dominant experts and groups**: the ``K`` most used experts of a layer are the cores; every
   other expert joins the core whose router-logit column is the most similar (cosine over all
   calibration tokens). ``global`` grouping instead spreads ``K × layers`` groups over the layers
   with one frequency threshold (each layer's most used expert counts as frequency 1, so every
   layer keeps at least one group), as the official Mixtral script does.
3. **Frequency-weighted merge** of each group, per weight matrix: ``W = Σ f_i W_i / Σ f_i``.
   Optionally each member is first aligned to the group's core by weight matching (a permutation
   of its hidden units that leaves its function unchanged).
4. The **router is kept**: every member's slot is bound to the merged expert, so tokens routed to
   any member reach it (``layout: shared``).

Where mergelab departs from the official code (named in the README): the frequency-weighted mean
divides by ``Σ f_i`` exactly (the code adds 1e-6, so an unused group becomes a zero expert; here a
group no calibration token used is averaged with equal weights); counts skip padding tokens (the
Mixtral script's 512-token blocks have none); the per-layer grouping gives each core its own label
(the T5 code indexes cores by loop position, which can leave experts unassigned; its Mixtral
grouper does it right); ``--align`` matches each member to its group's core (the official
``permute-model`` script aligns every expert of a layer to expert 0 before grouping; a permutation
changes only the basis the merged expert is written in, and the core is the member the group is
built around); the knowledge-distillation recovery of the paper's T5 results is not run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mergelab.errors import OptionError
from mergelab.moe.grouping import LayerGroups, group_weights, stable_order


def dominant_groups(freq: Tensor, similarity: Tensor, k: int) -> LayerGroups:
    """M-SMoE's routing-guided grouping of one layer: the ``k`` most used experts are the cores (ties
    by lower index), each other expert joins its most similar core (ties: the more used core)."""
    n = freq.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} with {n} experts")
    order = stable_order(freq)
    cores = order[:k]
    labels = [-1] * n
    for g, c in enumerate(cores):
        labels[c] = g
    for e in order[k:]:
        sims = [float(similarity[e, c]) for c in cores]
        best = max(range(k), key=lambda g: (sims[g], -g))
        labels[e] = best
    return LayerGroups.from_labels(labels, cores)


def global_group_counts(freqs: Mapping[int, Tensor], k_average: int) -> dict[int, int]:
    """Groups per layer for ``k_average × layers`` groups in all (MC-SMoE's global grouping).

    Each layer's most used expert counts as frequency 1; the threshold is the
    ``(k_average × layers)``-th largest of all frequencies (0-based index, one less when every
    expert would be kept); a layer keeps its experts above the threshold. Ties at the threshold
    make the total smaller than asked.
    """
    values = []
    forced: dict[int, Tensor] = {}
    for layer, f in freqs.items():
        f = f.double().clone()
        f[int(torch.argmax(f))] = 1.0
        forced[layer] = f
        values.append(f)
    n = next(iter(freqs.values())).numel()
    total = k_average * len(freqs)
    if k_average == n:
        total -= 1
    ranked = torch.cat(values).sort(descending=True).values
    threshold = float(ranked[total])
    if threshold >= 1.0:
        raise OptionError(
            f"--to {k_average}: too many groups for global grouping (the frequency threshold reaches every "
            "layer's most used expert); ask for fewer experts"
        )
    return {layer: int((f > threshold).sum()) for layer, f in forced.items()}


def frequency_weighted_merge(tensors: Sequence[Tensor], freq: Sequence[float]) -> Tensor:
    """``Σ f_i W_i / Σ f_i`` (float32; equal weights when every ``f_i`` is 0; one tensor unchanged)."""
    if len(tensors) == 1:
        return tensors[0]
    w = group_weights(torch.tensor(list(freq), dtype=torch.float64), range(len(tensors)))
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for wi, t in zip(w, tensors):
        out.add_(t.float(), alpha=wi)
    return out


# ------------------------------------------------------------------------- permutation alignment


def matching_permutation(reference: Sequence[Tensor], other: Sequence[Tensor]) -> Tensor:
    """The permutation of ``other``'s hidden units that best matches ``reference`` (weight matching).

    Each expert is ``(gate [I, H], up [I, H], down [H, I])``. ``permute_expert(other, perm)`` puts
    unit ``perm[i]`` of ``other`` at position ``i``; ``perm`` maximises ``Σ_i <ref unit i, other unit
    perm[i]>``, a unit being its gate row, up row and down column together (a linear assignment, as
    MC-SMoE's weight matching with the second layer included).
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # pragma: no cover - scipy is present wherever the tests run
        raise OptionError("--align needs scipy for the linear assignment: pip install scipy") from None
    g_r, u_r, d_r = (t.double() for t in reference)
    g_o, u_o, d_o = (t.double() for t in other)
    cost = g_r @ g_o.T + u_r @ u_o.T + d_r.T @ d_o
    _, perm = linear_sum_assignment(cost.numpy(), maximize=True)
    return torch.as_tensor(perm, dtype=torch.long)


def permute_expert(expert: Sequence[Tensor], perm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(gate[perm], up[perm], down[:, perm])``: the same function with its hidden units reordered."""
    gate, up, down = expert
    return gate[perm], up[perm], down[:, perm]
