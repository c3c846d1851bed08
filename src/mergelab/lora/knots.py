"""KnOTS: align the LoRA updates in one shared basis by an SVD, then TIES-merge in that basis.

Stoica, Ramesh, Ecsedi, Choshen, Hoffman 2025, "Model merging with SVD to tie the KnOTS", ICLR,
arXiv:2410.19735; reference code gstoica27/KnOTS (``task_merger.py`` ``SVDMerger``,
``masking_ops.py``).

Per LoRA module with updates ΔWₜ (out × in), t = 1..T:

1. SVD of the concatenation [ΔW₁ … ΔW_T] = U·diag(s)·[V₁ … V_T] (float64); keep s > 1e-5.
2. U is shared; task t is represented by the block sVₜ = diag(s)·Vₜ (k × in).
3. TIES on the per-task sV, flattened over **all modules** (one vector per task): keep each
   task's top-K magnitudes model-wide, elect the sign per entry as the sign of the sum (an exact
   zero takes the model-wide majority sign), keep the agreeing entries, and take the **mean over
   the kept entries** ("disjoint mean"). ``knots_dare_ties`` first drops sV entries at random
   (DARE, keep probability ``dare_density``, survivors ÷ ``dare_density``) and trims nothing
   by default (the reference config's ``topK: 100``).
4. One scaling coefficient λ for all tasks (the reference code uses only ``weights[0]``):
   ΔW = λ·U·merged_sV, returned as the factors B = U, A = λ·merged_sV (rank k ≤ Σ rₜ), scaling 1.

The model-wide selection is built in steps a streamed executor can run module by module:
:func:`knots_module` (the per-module decomposition and sV blocks), :func:`knots_selection` (the
registered ``ties`` method with ``scope: global``, whose folds find each task's exact model-wide
threshold and majority sign from histograms, then merge each module with them) and
:func:`knots_factors` (back to LoRA factors); :func:`mergelab.lora.combine_base.merge_groups`
runs the folds and the merge over an adapter's modules in memory.

Choices and departures, each against the reference code:

* Scaling: the code builds ΔWₜ = Bₜ·Aₜ **without** LoRA's α/r (harmless for its α = r adapters).
  Here ΔWₜ = sₜ·Bₜ·Aₜ with each adapter's true scaling by default; ``lora_scaling: ignore``
  gives the code's behaviour.
* The SVD of the m × Tn concatenation is computed without forming it: with the QR factors of
  [B₁ … B_T] and of each Aₜᵀ, [ΔW₁ … ΔW_T] = Q_B·C·blockdiag(Q_Aₜᵀ) and the SVD of the small core
  C ((Σrₜ) × (Σrₜ)) gives the same U, s and sVₜ (singular vectors up to sign; KnOTS's result does
  not depend on those signs). ``svd_dtype`` (float64 by default, as the code) is the precision
  of that step; the masking and merge then run in float32, as the code casts U, s, V to float32.
* Trim count: the paper's top-K% keeps k = max(1, ⌊K·N⌋) per task (``trim_count: floor``); the
  code's k-th-smallest threshold keeps ⌊K·N⌋ + 1 (``trim_count: original``). Entries tied with
  the threshold are kept, as in the code.
* DARE draws come from mergelab's per-(seed, module, task) streams, so masks never match the
  code's global ``torch.manual_seed`` stream bit for bit.
* Per-adapter weights are not part of the method (one λ for all): weights other than 1 are refused.
* Adapters that do not adapt a module contribute a zero update there.
* Defaults are the reference configs' (``vitB_r16_knots_ties.py``: topK 20, scaling 0.6;
  ``vitB_r16_knots_dare_ties.py``: topK 100, DARE p = 0.1, scaling 0.7).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

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
from mergelab.methods.base import TensorContext
from mergelab.methods.kernels.linalg import thin_svd
from mergelab.methods.stages.sparsify import dare_drop

Tensor = torch.Tensor


class KnotsTiesParams(CombineParams):
    scale: float = Field(
        0.6, allow_inf_nan=False, description="one scaling coefficient λ for every task (reference config: 0.6)"
    )
    density: float = Field(
        0.2,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction K of each task's sV entries kept, over all modules (reference topK 20 → 0.2)",
    )
    trim_count: Literal["floor", "original"] = Field(
        "floor",
        description="floor: keep max(1, ⌊K·N⌋) per task (paper); original: ⌊K·N⌋ + 1 (the code's threshold)",
    )
    lora_scaling: LoraScaling = Field(
        "apply", description="apply: ΔWₜ = sₜBₜAₜ (true α/r); ignore: ΔWₜ = BₜAₜ, as the reference code"
    )
    svd_dtype: SvdDtype = Field("float64", description="precision of the per-module SVD (reference: float64)")
    rank_tol: float = Field(
        1e-5, ge=0.0, allow_inf_nan=False, description="singular values ≤ this are dropped (reference: 1e-5)"
    )


class KnotsDareTiesParams(KnotsTiesParams):
    scale: float = Field(0.7, allow_inf_nan=False, description="one scaling coefficient λ (reference config: 0.7)")
    density: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="fraction of each task's sV entries kept after DARE, over all modules (reference topK 100 → 1)",
    )
    dare_density: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        allow_inf_nan=False,
        description="DARE keep probability on sV, survivors ÷ it (reference: dare_pruning_coeffs 0.1 → 0.9)",
    )


@dataclass(frozen=True)
class KnotsModule:
    """One module in the shared basis: ``[ΔW₁ … ΔW_T] = U · [sV₁ … sV_T]``.

    ``U`` is out × k (orthonormal columns), ``sv[t]`` is k × in (``None`` never: a task that
    does not adapt the module has a zero block), ``transposed`` the module's stored layout.
    """

    U: Tensor
    sv: tuple[Tensor, ...]
    transposed: bool


def knots_decompose(
    entries: Sequence[LoraFactors | None],
    *,
    lora_scaling: LoraScaling = "apply",
    dtype: torch.dtype = torch.float64,
    rank_tol: float = 1e-5,
) -> KnotsModule:
    """Step 1 for one module: the thin SVD of [ΔW₁ … ΔW_T] from the factors, without m × n products.

    With Q_B R_B = [s₁B₁ … s_TB_T] and Q_t R_t = Aₜᵀ (reduced QRs), [ΔW₁ … ΔW_T] =
    Q_B · [R_B,t R_tᵀ]_t · blockdiag(Q_tᵀ); the SVD u s vh of the small middle matrix gives
    U = Q_B u and sVₜ = diag(s) vh_t Q_tᵀ. Cost O((out + T·in)·R² + R³), R = Σ rₜ.
    """
    _, in_dim, transposed = module_shape(entries)
    bs, qts, rts, cols = [], [], [], []
    for f in entries:
        if f is None:
            cols.append(0)
            continue
        scale = f.scaling if lora_scaling == "apply" else 1.0
        bs.append(f.B.to(dtype) * scale)
        q, r = torch.linalg.qr(f.A.to(dtype).T, mode="reduced")  # Aᵀ = Q R: Q in × r', R r' × r
        qts.append(q)
        rts.append(r)
        cols.append(int(f.A.shape[0]))
    q_b, r_b = torch.linalg.qr(torch.cat(bs, dim=1), mode="reduced")  # out × R', R' × R
    blocks = []
    start = 0
    for r_t in rts:
        width = r_t.shape[1]
        blocks.append(r_b[:, start : start + width] @ r_t.T)  # R' × r'_t
        start += width
    core = torch.cat(blocks, dim=1)
    u, s, vh = thin_svd(core)
    keep = s > rank_tol
    u, s, vh = u[:, keep], s[keep], vh[keep]
    big_u = q_b @ u
    sv: list[Tensor] = []
    pos = 0
    it = iter(qts)
    for width in cols:
        if width == 0:
            sv.append(torch.zeros(s.shape[0], in_dim, dtype=dtype))
            continue
        q_t = next(it)
        w = q_t.shape[1]
        sv.append((s[:, None] * vh[:, pos : pos + w]) @ q_t.T)
        pos += w
    return KnotsModule(U=big_u, sv=tuple(sv), transposed=transposed)


def _check_unit_weights(weights: Sequence[float], rule: str) -> None:
    if any(w != 1.0 for w in weights):
        raise ParameterError(
            f"combine {rule}: KnOTS uses one scaling for every adapter (scale:), not per-adapter weights "
            f"(got {list(weights)}); remove the weights or use core_space / cat"
        )


def _dare(groups: Mapping[str, Sequence[Tensor]], density: float, seed: int) -> dict[str, list[Tensor]]:
    """DARE on every task's sV block: task t of module ``name`` draws from stream (seed, name, t + 1)."""
    out = {}
    for name, blocks in groups.items():
        ctx = TensorContext(name=name, seed=seed)
        out[name] = [dare_drop(v, density, ctx.generator(t + 1)) for t, v in enumerate(blocks)]
    return out


def knots_module(
    name: str, entries: Sequence[LoraFactors | None], params: KnotsTiesParams, seed: int = 0
) -> tuple[KnotsModule, list[Tensor]]:
    """Step 1 for one module, as a streamed executor calls it in each pass: the decomposition and the
    per-task sV blocks the TIES step sees (float32, DARE'd for ``knots_dare_ties``; seeded per
    (seed, module, task), so every pass draws the same drops)."""
    mod = knots_decompose(
        entries, lora_scaling=params.lora_scaling, dtype=torch_dtype(params.svd_dtype), rank_tol=params.rank_tol
    )
    # the masking and merge run in float32, as the reference code (and the radix thresholds) do
    blocks = [v.float() for v in mod.sv]
    if isinstance(params, KnotsDareTiesParams):
        blocks = _dare({name: blocks}, params.dare_density, seed)[name]
    return mod, blocks


def knots_selection(params: KnotsTiesParams, n_adapters: int) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    """Step 2, the model-wide selection: the registered method and parameters run on the sV blocks.

    TIES with ``scope: global`` (per-task thresholds over every module's blocks, exact, from two
    histogram folds; exact-zero sign sums take the model-wide majority sign, a third fold), the
    disjoint mean, λ = ``scale``, unit weights. A streamed executor runs this method's folds
    (``get_method(name).passes(...)``) over the blocks of :func:`knots_module` module by module,
    then the method per module; :func:`mergelab.lora.combine_base.merge_groups` does it in memory.
    """
    parameters = {
        "lambda": params.scale,
        "normalize": True,
        "scope": "global",
        "trim_count": params.trim_count,
        "sign_tie": "majority",
    }
    return "ties", parameters, [{"weight": 1.0, "density": params.density} for _ in range(n_adapters)]


def knots_factors(mod: KnotsModule, merged_sv: Tensor) -> LoraFactors:
    """Step 3: ΔW = U · merged_sV as factors (B = U, A = merged_sV with λ inside), scaling 1."""
    return LoraFactors(A=merged_sv.to(mod.U.dtype), B=mod.U, scaling=1.0, transposed=mod.transposed)


def _knots(
    modules: AdapterModules, weights: Sequence[float], params: KnotsTiesParams, seed: int, rule: str
) -> dict[str, LoraFactors]:
    _check_unit_weights(weights, rule)
    steps = {
        name: knots_module(name, entries, params, seed)
        for name, entries in modules.items()
        if any(e is not None for e in entries)
    }
    n = len(next(iter(modules.values())))
    method, parameters, model_parameters = knots_selection(params, n)
    merged = merge_groups(
        method,
        {name: blocks for name, (_, blocks) in steps.items()},
        parameters,
        model_parameters,
        seed=seed,
        where=f"combine {rule}",
    )
    return {name: knots_factors(mod, merged[name]) for name, (mod, _) in steps.items()}


def knots_ties(
    modules: AdapterModules, weights: Sequence[float], params: KnotsTiesParams, seed: int = 0
) -> dict[str, LoraFactors]:
    """KnOTS-TIES: shared-basis SVD per module, model-wide TIES on the per-task sV, one λ."""
    return _knots(modules, weights, params, seed, "knots_ties")


def knots_dare_ties(
    modules: AdapterModules, weights: Sequence[float], params: KnotsDareTiesParams, seed: int = 0
) -> dict[str, LoraFactors]:
    """KnOTS-DARE-TIES: as KnOTS-TIES with DARE drops on the per-task sV before the TIES step."""
    return _knots(modules, weights, params, seed, "knots_dare_ties")
