"""Combiners: how the sparsified task vectors of one chunk become one merged task vector.

* :class:`DisjointMerge`: TIES sign election, then the disjoint mean (``normalize``) or sum
  of the agreeing entries (:func:`mergelab.methods.stages.sign_consensus.consensus_merge`);
* :class:`WeightedSum`: Σ_i w_i τ̃_i, divided by Σ_i w_i when ``normalize`` (task arithmetic
  on the sparsified vectors, :func:`linear_merge`).

A combiner's ``whole`` says whether it needs the whole tensor at once (the tensor's majority
sign, for ``sign_tie: majority`` without a model-wide majority).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from mergelab.methods.kernels.chunks import Scratch
from mergelab.methods.kernels.tensors import weighted_sum
from mergelab.methods.stages.sign_consensus import OnZero, consensus_merge

Tensor = torch.Tensor


def linear_merge(deltas: Sequence[Tensor], weights: Sequence[float], *, normalize: bool) -> Tensor:
    """Σ_i w_i τ_i, divided by Σ_i w_i when ``normalize`` (task arithmetic on the deltas)."""
    total = weighted_sum(deltas, weights)
    if normalize:
        denom = float(sum(weights))
        if abs(denom) < 1e-12:
            raise ValueError("normalize=true needs weights that do not sum to zero")
        total.div_(denom)
    return total


class Combiner(Protocol):
    @property
    def whole(self) -> bool: ...

    def __call__(self, deltas: Sequence[Tensor], weights: Sequence[float], scratch: Scratch) -> Tensor: ...


@dataclass(frozen=True)
class DisjointMerge:
    """Elect a sign per coordinate, then the disjoint mean (``normalize``) or sum.

    ``on_zero`` resolves exact ties (``majority``: ``majority`` when given, e.g. the
    model-wide sign of TIES ``scope: global``, else the tensor's own majority sign).
    """

    normalize: bool = True
    on_zero: OnZero = "positive"
    majority: float | None = None

    @property
    def whole(self) -> bool:
        return self.on_zero == "majority" and self.majority is None

    def __call__(self, deltas: Sequence[Tensor], weights: Sequence[float], scratch: Scratch) -> Tensor:
        return consensus_merge(
            deltas, weights, normalize=self.normalize, on_zero=self.on_zero, majority=self.majority, scratch=scratch
        )


@dataclass(frozen=True)
class WeightedSum:
    """Σ_i w_i τ̃_i (÷ Σ_i w_i with ``normalize``)."""

    normalize: bool = False
    whole: bool = False

    def __call__(self, deltas: Sequence[Tensor], weights: Sequence[float], scratch: Scratch) -> Tensor:
        return linear_merge(deltas, weights, normalize=self.normalize)
