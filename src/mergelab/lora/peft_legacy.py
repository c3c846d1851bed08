"""PEFT's factor-space combination modes, kept only as named legacy options (approximations).

PEFT's ``LoraModel.add_weighted_adapter`` (peft 0.21.2, ``combination_type="linear"`` or ``"ties"``)
merges the A factors and the B factors **separately**: adapter i enters A with the factor
sign(wᵢsᵢ)·√|wᵢsᵢ| and B with √|wᵢsᵢ| (sᵢ its scaling), so Σ Bᵢ' · Σ Aᵢ' contains the cross terms
Bᵢ'Aⱼ' (i ≠ j) that no adapter has. That is not a merge of the updates ΔWᵢ; PEFT's own docstring
calls ``linear`` "a very rough approximation". ``linear_legacy`` and ``ties_legacy`` reproduce those
semantics so that recipes and results made with PEFT can be repeated; prefer ``cat`` (exact),
``svd``, ``knots_*`` or ``core_space``.

PEFT semantics reproduced here:

* all adapters that adapt a module must have one rank r (the new adapter's rank); PEFT refuses
  unequal ranks, so do these rules;
* ``linear``: A = Σᵢ sign(wᵢsᵢ)√|wᵢsᵢ| Aᵢ, B = Σᵢ √|wᵢsᵢ| Bᵢ;
* ``ties`` (``peft.utils.merge_utils.ties``, on A's and on B's, each with its own weights):
  per tensor keep the k = ⌊density·numel⌋ largest magnitudes (density ≥ 1: no trim); elect the
  sign per entry from the **unweighted** trimmed tensors (``total``: sign of the sum;
  ``frequency``: sign of the sum of signs; a zero goes to +); keep the trimmed entries of that
  sign; the result is the sum of the weighted kept entries divided by the **count** of kept
  entries (at least 1);
* adapters that do not adapt a module are skipped for it; the new adapter has r = lora_alpha, so
  its scaling is 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from pydantic import Field

from mergelab.errors import PlanError
from mergelab.lora.combine_base import AdapterModules, CombineParams, present, work_dtype
from mergelab.lora.factors import LoraFactors

Tensor = torch.Tensor


class LinearLegacyParams(CombineParams):
    """``linear_legacy`` has no parameters besides the per-adapter weights."""


class TiesLegacyParams(CombineParams):
    density: float = Field(
        ...,
        ge=0.0,
        allow_inf_nan=False,
        description="fraction of each A and each B kept by magnitude (PEFT's density; ≥ 1: no trim); required",
    )
    majority_sign_method: Literal["total", "frequency"] = Field(
        "total", description="total: sign of the sum of the trimmed factors; frequency: sign of the sum of their signs"
    )


def _split_weights(weights: Sequence[float], scalings: Sequence[float]) -> tuple[list[float], list[float]]:
    """PEFT's per-adapter factors for A (signed) and B (unsigned): ±√|w·s| and √|w·s|."""
    wa, wb = [], []
    for w, s in zip(weights, scalings):
        ws = w * s
        root = math.sqrt(abs(ws))
        wa.append(root if ws >= 0 else -root)
        wb.append(root)
    return wa, wb


def _equal_rank(name: str, rule: str, factors: Sequence[tuple[int, LoraFactors]]) -> None:
    ranks = {f.rank for _, f in factors}
    if len(ranks) > 1:
        listed = ", ".join(f"adapter {i}: r={f.rank}" for i, f in factors)
        raise PlanError(
            f"combine {rule}: module {name!r} has adapters of different ranks ({listed}); PEFT's factor-space "
            "modes need one rank: use cat, svd, knots_ties or core_space"
        )


def _weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    out = torch.zeros_like(tensors[0])
    for t, w in zip(tensors, weights):
        out += t * w
    return out


def _ties(tensors: Sequence[Tensor], weights: Sequence[float], density: float, sign_method: str) -> Tensor:
    """PEFT's TIES on same-shaped tensors (see the module docstring)."""
    trimmed = []
    for t in tensors:
        if density >= 1:
            trimmed.append(t)
            continue
        k = int(density * t.numel())
        keep = torch.zeros(t.numel(), dtype=t.dtype)
        if k > 0:
            keep[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
        trimmed.append(t * keep.reshape(t.shape))
    stacked = torch.stack(trimmed)
    signs = stacked.sign()
    votes = stacked.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (signs == elected).to(stacked.dtype)
    w = torch.tensor(list(weights), dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    total = (stacked * w * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1.0)


def _legacy(
    modules: AdapterModules,
    weights: Sequence[float],
    rule: str,
    combine: Callable[[Sequence[Tensor], Sequence[float]], Tensor],
) -> dict[str, LoraFactors]:
    out: dict[str, LoraFactors] = {}
    for name, entries in modules.items():
        have = present(entries)
        if not have:
            continue
        _equal_rank(name, rule, have)
        dtype = work_dtype(*(t for _, f in have for t in (f.A, f.B)))
        wa, wb = _split_weights([weights[i] for i, _ in have], [f.scaling for _, f in have])
        a_list = [f.A.to(dtype) for _, f in have]
        b_list = [f.B.to(dtype) for _, f in have]
        a = combine(a_list, wa)
        b = combine(b_list, wb)
        out[name] = LoraFactors(A=a, B=b, scaling=1.0, transposed=have[0][1].transposed)
    return out


def linear_legacy(
    modules: AdapterModules, weights: Sequence[float], params: LinearLegacyParams
) -> dict[str, LoraFactors]:
    """PEFT ``combination_type="linear"``: A's and B's averaged separately (an approximation)."""
    return _legacy(modules, weights, "linear_legacy", _weighted_sum)


def ties_legacy(modules: AdapterModules, weights: Sequence[float], params: TiesLegacyParams) -> dict[str, LoraFactors]:
    """PEFT ``combination_type="ties"``: TIES on the A's and on the B's separately (an approximation)."""

    def combine(tensors: Sequence[Tensor], w: Sequence[float]) -> Tensor:
        return _ties(tensors, w, params.density, params.majority_sign_method)

    return _legacy(modules, weights, "ties_legacy", combine)
