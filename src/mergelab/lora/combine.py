"""Combine LoRA adapters into one LoRA adapter: the rules a recipe names with ``combine:``.

Each rule maps, per LoRA module, one :class:`~mergelab.lora.factors.LoraFactors` per input adapter
(``None`` where an adapter does not adapt the module) to one merged :class:`LoraFactors`, never
forming an out × in product where it need not. Product-space rules merge the updates
ΔWᵢ = sᵢBᵢAᵢ; the factor-space ``*_legacy`` rules (PEFT's) merge A's and B's separately and are
approximations.

========================  ==========================================================  ===========
rule                      source                                                      exact?
========================  ==========================================================  ===========
``cat``                   Hu et al. 2021 (LoRA); PEFT ``add_weighted_adapter("cat")`` yes: Σ wᵢsᵢBᵢAᵢ
``knots_ties``            Stoica et al., ICLR 2025 (KnOTS), :mod:`.knots`             a merge
``knots_dare_ties``       the same with DARE (Yu et al., ICML 2024) on sV             a merge
``core_space``            Panariello et al., NeurIPS 2025, :mod:`.core_space`         bases exact
``linear_legacy``         PEFT ``combination_type="linear"``, :mod:`.peft_legacy`     approximation
``ties_legacy``           PEFT ``combination_type="ties"``, :mod:`.peft_legacy`       approximation
========================  ==========================================================  ===========

(``svd``, any merge method on the products then a truncated SVD, is the adapter writer's rule.)

``cat``: A = [w₁s₁A₁; …; w_Ts_TA_T], B = [B₁ … B_T], scaling 1, so B·A = Σ wᵢsᵢBᵢAᵢ exactly
with rank Σ rᵢ (PEFT's ``cat``; LoRA-Soups' CAT with fixed weights is the same adapter).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.errors import RecipeError
from mergelab.lora.combine_base import (
    AdapterModules,
    CombineParams,
    check_modules,
    check_weights,
    present,
    validate_params,
    work_dtype,
)
from mergelab.lora.core_space import CoreSpaceParams, core_space
from mergelab.lora.factors import LoraFactors
from mergelab.lora.knots import KnotsDareTiesParams, KnotsTiesParams, knots_dare_ties, knots_ties
from mergelab.lora.peft_legacy import LinearLegacyParams, TiesLegacyParams, linear_legacy, ties_legacy


class CatParams(CombineParams):
    """``cat`` has no parameters besides the per-adapter weights."""


def cat(modules: AdapterModules, weights: Sequence[float], params: CatParams | None = None) -> dict[str, LoraFactors]:
    """Exact concatenation: ΔW = Σ wᵢsᵢBᵢAᵢ at rank Σ rᵢ, weights and scalings folded into A."""
    out: dict[str, LoraFactors] = {}
    for name, entries in modules.items():
        have = present(entries)
        if not have:
            continue
        dtype = work_dtype(*(t for _, f in have for t in (f.A, f.B)))
        a = torch.cat([f.A.to(dtype) * (weights[i] * f.scaling) for i, f in have], dim=0)
        b = torch.cat([f.B.to(dtype) for _, f in have], dim=1)
        out[name] = LoraFactors(A=a, B=b, scaling=1.0, transposed=have[0][1].transposed)
    return out


RuleFn = Callable[[AdapterModules, Sequence[float], Any, int], dict[str, LoraFactors]]


@dataclass(frozen=True)
class CombineRule:
    """A named combination rule: its parameter model, function, source and whether it is exact."""

    name: str
    params: type[CombineParams]
    run: RuleFn
    paper: str
    exact: bool
    min_adapters: int = 1


RULES: dict[str, CombineRule] = {
    "cat": CombineRule(
        "cat",
        CatParams,
        lambda m, w, p, s: cat(m, w, p),
        "Hu et al. 2021, LoRA, arXiv:2106.09685; PEFT add_weighted_adapter cat",
        exact=True,
    ),
    "knots_ties": CombineRule(
        "knots_ties",
        KnotsTiesParams,
        knots_ties,
        "Stoica et al. 2025, Model merging with SVD to tie the KnOTS, ICLR, arXiv:2410.19735",
        exact=False,
    ),
    "knots_dare_ties": CombineRule(
        "knots_dare_ties",
        KnotsDareTiesParams,
        knots_dare_ties,
        "Stoica et al. 2025 (KnOTS) with DARE, Yu et al. 2024, arXiv:2311.03099",
        exact=False,
    ),
    "core_space": CombineRule(
        "core_space",
        CoreSpaceParams,
        core_space,
        "Panariello et al. 2025, Accurate and Efficient Low-Rank Model Merging in Core Space, NeurIPS, "
        "arXiv:2509.17786",
        exact=False,
    ),
    "linear_legacy": CombineRule(
        "linear_legacy",
        LinearLegacyParams,
        lambda m, w, p, s: linear_legacy(m, w, p),
        "PEFT add_weighted_adapter combination_type=linear (factor space; an approximation)",
        exact=False,
    ),
    "ties_legacy": CombineRule(
        "ties_legacy",
        TiesLegacyParams,
        lambda m, w, p, s: ties_legacy(m, w, p),
        "PEFT add_weighted_adapter combination_type=ties (factor space; an approximation)",
        exact=False,
    ),
}


def get_rule(name: str) -> CombineRule:
    """The rule named ``name``, or a one-line RecipeError listing the rules."""
    if not isinstance(name, str) or name not in RULES:
        known = ", ".join(sorted(RULES))
        raise RecipeError(f"unknown combine rule {name!r}: use one of {known} (or svd)")
    return RULES[name]


def combine_adapters(
    rule: str,
    modules: AdapterModules,
    *,
    weights: Sequence[float] | None = None,
    parameters: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, LoraFactors]:
    """Combine adapters module by module with the named rule (see the table in this module's docstring).

    ``modules`` maps each LoRA module name to one entry per adapter in recipe order (``None``: not
    adapted there); ``weights`` gives one weight per adapter (default 1); ``parameters`` the rule's
    parameters. Returns the merged adapter's factors per module, each with scaling 1, in float32 (or
    float64 when the inputs or the rule's ``svd_dtype`` are float64); the writer casts them.
    """
    spec = get_rule(rule)
    n = check_modules(modules, spec.name, min_adapters=spec.min_adapters)
    w = check_weights(weights, n, spec.name)
    params = validate_params(spec.params, parameters, f"combine {spec.name}")
    return spec.run(modules, w, params, seed)
