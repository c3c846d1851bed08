"""Core Space merging: merge LoRA updates as small core matrices in lossless shared bases.

Panariello, Marczak, Magistri, Porrello, Twardowski, Bagdanov, Calderara, van de Weijer 2025,
"Accurate and Efficient Low-Rank Model Merging in Core Space", NeurIPS, arXiv:2509.17786;
reference code apanariello4/core-space-merging (``task_merger.py`` ``get_core_matrices``, ``merge``).

Per LoRA module with factors (Aₜ: rₜ × in, Bₜ: out × rₜ, scaling sₜ), t = 1..T, R = Σ rₜ:

1. Stack A_all = [A₁; …; A_T] (R × in) and B_all = [s₁B₁ … s_TB_T] (out × R); the scaling is
   folded into B (the reference code uses the raw factors: ``lora_scaling: ignore``).
2. Reference bases from thin SVDs (float64): Vh_ref, the right singular vectors of A_all
   (min(R, in) × in), and U_ref, the left singular vectors of B_all (out × min(out, R)).
3. Core matrices Mₜ = U_refᵀ (sₜBₜ)(Aₜ) Vh_refᵀ, computed as (U_refᵀ sₜBₜ)·(Aₜ Vh_refᵀ), so no
   out × in product is formed. This is lossless: sₜBₜAₜ = U_ref Mₜ Vh_ref, because the rows of Aₜ
   lie in the row space Vh_ref spans and the columns of Bₜ in the column space U_ref spans.
4. Merge {Mₜ} with any registered merge method (``method``, its ``parameters``; each adapter's
   weight goes to the method's per-model ``weight``) as if the cores were one model's tensors
   with a zero base; the method's model-wide folds (e.g. TIES ``scope: global``) span all modules.
5. ΔW = U_ref·M·Vh_ref, returned as the factors B = U_ref·M, A = Vh_ref, scaling 1 (rank ≤ R).

Heterogeneous ranks are allowed (R = Σ rₜ). The cost per module is the two thin SVDs,
O((out + in)·R²), and the cores, O(T·R³); nothing scales with out × in. With a linear method
(``task_arithmetic`` with λ = 1, weights wₜ) the result is exactly Σₜ wₜsₜBₜAₜ.

The reference code's default configuration (``vitB_r16_core_tsv.py``) merges the cores with TSV,
which is the default here (``tsv_m``); its optional isotropisation is not included. Adapters that
do not adapt a module contribute a zero core there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from mergelab.errors import ParameterError
from mergelab.lora.combine_base import (
    AdapterModules,
    CombineParams,
    LoraScaling,
    SvdDtype,
    merge_groups,
    module_shape,
    torch_dtype,
)
from mergelab.lora.factors import LoraFactors
from mergelab.methods.kernels.linalg import thin_svd
from mergelab.methods.registry import get_method

Tensor = torch.Tensor


class CoreSpaceParams(CombineParams):
    method: str = Field("tsv_m", description="registered merge method applied to the core matrices (reference: TSV)")
    parameters: dict[str, Any] = Field(
        default_factory=dict, description="the method's global parameters (e.g. {lambda: 0.5})"
    )
    model_parameters: list[dict[str, Any]] | None = Field(
        None,
        description="the method's per-adapter parameters, one mapping per adapter (the adapter weights fill "
        "`weight` where given)",
    )
    lora_scaling: LoraScaling = Field(
        "apply", description="apply: fold sₜ into Bₜ (true α/r); ignore: raw factors, as the reference code"
    )
    svd_dtype: SvdDtype = Field(
        "float64", description="precision of the reference bases and cores (reference: float64)"
    )


@dataclass(frozen=True)
class CoreSpaceModule:
    """One module in core space: ``sₜBₜAₜ = U_ref · cores[t] · Vh_ref`` for every task t."""

    U_ref: Tensor
    Vh_ref: Tensor
    cores: tuple[Tensor, ...]
    transposed: bool


def core_space_decompose(
    entries: Sequence[LoraFactors | None],
    *,
    lora_scaling: LoraScaling = "apply",
    dtype: torch.dtype = torch.float64,
) -> CoreSpaceModule:
    """Steps 1–3 for one module: the reference bases and the core matrix of every task."""
    _, in_dim, transposed = module_shape(entries)
    present = [f for f in entries if f is not None]
    a_all = torch.cat([f.A.to(dtype) for f in present], dim=0)
    scales = [f.scaling if lora_scaling == "apply" else 1.0 for f in present]
    b_all = torch.cat([f.B.to(dtype) * s for f, s in zip(present, scales)], dim=1)
    vh_ref = thin_svd(a_all)[2]
    u_ref = thin_svd(b_all)[0]
    cores: list[Tensor] = []
    for f in entries:
        if f is None:
            cores.append(torch.zeros(u_ref.shape[1], vh_ref.shape[0], dtype=dtype))
            continue
        s = f.scaling if lora_scaling == "apply" else 1.0
        left = u_ref.T @ (f.B.to(dtype) * s)  # k_u × rₜ
        right = f.A.to(dtype) @ vh_ref.T  # rₜ × k_v
        cores.append(left @ right)
    assert vh_ref.shape[1] == in_dim
    return CoreSpaceModule(U_ref=u_ref, Vh_ref=vh_ref, cores=tuple(cores), transposed=transposed)


def _model_parameters(params: CoreSpaceParams, weights: Sequence[float]) -> list[dict[str, Any]]:
    spec = get_method(params.method)
    n = len(weights)
    given = params.model_parameters
    if given is not None and len(given) != n:
        raise ParameterError(
            f"combine core_space: {len(given)} model_parameters for {n} adapters; give one mapping per adapter"
        )
    out = [dict(m) for m in given] if given is not None else [{} for _ in range(n)]
    takes_weight = "weight" in spec.model_params.model_fields
    for i, w in enumerate(weights):
        if takes_weight:
            out[i].setdefault("weight", w)  # an explicit model_parameters weight wins
        elif w != 1.0:
            raise ParameterError(
                f"combine core_space: method {spec.name!r} takes no per-model weight, but adapter {i} has weight {w}; "
                "remove the weight or pick a weighted method"
            )
    return out


def core_space(
    modules: AdapterModules, weights: Sequence[float], params: CoreSpaceParams, seed: int = 0
) -> dict[str, LoraFactors]:
    """Core Space merging: cores in lossless reference bases, merged with any registered method."""
    dtype = torch_dtype(params.svd_dtype)
    decomposed: Mapping[str, CoreSpaceModule] = {
        name: core_space_decompose(entries, lora_scaling=params.lora_scaling, dtype=dtype)
        for name, entries in modules.items()
        if any(e is not None for e in entries)
    }
    merged = merge_groups(
        params.method,
        {name: list(mod.cores) for name, mod in decomposed.items()},
        params.parameters,
        _model_parameters(params, weights),
        seed=seed,
        where="combine core_space",
    )
    return {
        name: LoraFactors(A=mod.Vh_ref, B=mod.U_ref @ merged[name].to(dtype), scaling=1.0, transposed=mod.transposed)
        for name, mod in decomposed.items()
    }
