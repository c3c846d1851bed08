"""Expert groups of one MoE layer, and what every compression method shares about them.

A compression method maps the ``N`` experts of a layer to groups (:class:`LayerGroups`): each
group becomes one expert of the output. The helpers here are pure tensor functions: usage
frequencies from top-k counts, cosine similarities from a Gram matrix, and the router rows of a
layer whose experts are written distinct (``layout: distinct``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

RouterRows = Literal["weighted", "sum", "dominant"]
ROUTER_ROWS: tuple[str, ...] = ("weighted", "sum", "dominant")


@dataclass(frozen=True)
class LayerGroups:
    """The experts of one layer in groups.

    ``groups[g]``: the members of group ``g`` (ascending expert indices), ordered by their first
    member; ``cores[g]``: the member the group is built around (M-SMoE's dominant expert, the most
    used); ``dropped``: experts in no group (pruned).
    """

    num_experts: int
    groups: tuple[tuple[int, ...], ...]
    cores: tuple[int, ...]
    dropped: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        seen = [e for g in self.groups for e in g] + list(self.dropped)
        if sorted(seen) != list(range(self.num_experts)):
            raise ValueError(
                f"groups {self.groups} (dropped {self.dropped}) do not cover experts 0..{self.num_experts - 1}"
            )
        if any(c not in g for c, g in zip(self.cores, self.groups)) or len(self.cores) != len(self.groups):
            raise ValueError(f"every group needs its core among its members: {self.groups}, cores {self.cores}")

    @classmethod
    def from_labels(cls, labels: Sequence[int], cores: Sequence[int]) -> LayerGroups:
        """Groups from one label per expert (the label of a core is its group)."""
        by_core = {labels[c]: c for c in cores}
        members: dict[int, list[int]] = {}
        for e, lab in enumerate(labels):
            members.setdefault(lab, []).append(e)
        groups = sorted((tuple(m), by_core[lab]) for lab, m in members.items())
        return cls(len(labels), tuple(g for g, _ in groups), tuple(c for _, c in groups))

    @classmethod
    def identity(cls, n: int) -> LayerGroups:
        return cls(n, tuple((e,) for e in range(n)), tuple(range(n)))

    @property
    def k(self) -> int:
        return len(self.groups)

    def slot_map(self) -> list[int | None]:
        """Per original expert, its group (``None`` when dropped)."""
        out: list[int | None] = [None] * self.num_experts
        for g, members in enumerate(self.groups):
            for e in members:
                out[e] = g
        return out

    def as_dict(self) -> dict[str, object]:
        return {"groups": [list(g) for g in self.groups], "cores": list(self.cores), "dropped": list(self.dropped)}


def usage_frequencies(counts: Tensor) -> Tensor:
    """Top-k selection counts of a layer's experts -> frequencies summing to 1 (zeros stay zeros)."""
    counts = counts.double()
    total = counts.sum()
    return counts / total if float(total) > 0 else counts


def cosine_from_gram(gram: Tensor) -> Tensor:
    """Cosine similarities ``G_ij / sqrt(G_ii G_jj)`` from a Gram matrix of column vectors (0 where a norm is 0)."""
    g = gram.double()
    norms = g.diagonal().clamp(min=0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, g / denom.clamp(min=1e-300), torch.zeros_like(g))


def stable_order(freq: Tensor) -> list[int]:
    """Expert indices by usage, most used first; ties by index (the lower first)."""
    return sorted(range(freq.numel()), key=lambda e: (-float(freq[e]), e))


def group_weights(freq: Tensor, members: Sequence[int]) -> list[float]:
    """The members' usage frequencies normalised to sum to 1 (equal weights when none was used)."""
    w = [float(freq[e]) for e in members]
    total = sum(w)
    return [x / total for x in w] if total > 0 else [1.0 / len(w)] * len(w)


def router_rows(router: Tensor, groups: LayerGroups, freq: Tensor, rule: RouterRows) -> Tensor:
    """The ``[K, H]`` router of a layer whose groups are written as ``K`` distinct experts.

    ``weighted`` (default): each group's row is its members' rows averaged with the same usage
    weights as the experts, so a group's logit stays on the scale of its members' logits.
    ``sum``: the members' rows added (a group of ``m`` similar members then gets about ``m`` times
    their logit, which sharpens or suppresses it by sign). ``dominant``: the core's row.
    """
    rows = []
    for members, core in zip(groups.groups, groups.cores):
        if rule == "dominant" or len(members) == 1:
            rows.append(router[core if rule == "dominant" else members[0]].double())
        elif rule == "sum":
            rows.append(router[list(members)].double().sum(dim=0))
        else:
            w = torch.tensor(group_weights(freq, members), dtype=torch.float64)
            rows.append((w[:, None] * router[list(members)].double()).sum(dim=0))
    return torch.stack(rows)
