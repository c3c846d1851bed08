"""Extract a LoRA adapter from a full fine-tune: ``mergelab extract-lora EXPERT --base BASE OUT``.

The task vector ``τ = θ_expert − θ_base`` of every linear module (and, with ``embeddings``, every
embedding matrix) is factored by a truncated SVD (Eckart & Young 1936) at rank ``r`` or by
retained energy, and written as a PEFT LoRA adapter of the base. This is the ``svd`` adapter rule
(:mod:`mergelab.lora.sink`) on a one-expert ``task_arithmetic`` merge with λ = 1 and weight 1, so it
runs through the same plan, streaming executor (one tensor at a time: peak memory is a few
tensors and one SVD), sink, atomic output folder and model card as ``mergelab merge``. mergekit's
``extract-lora`` does the same job (its own ranks and module rules; not used here).

Non-matrix updates (norms, biases) are dropped and listed in the report unless ``keep_non_lora``
(then: ``modules_to_save`` tensors and ``lora_bias`` updates).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.errors import OptionError
from mergelab.lora.svd import check_rank_energy


@dataclass
class ExtractResult:
    """Where the adapter went, the report (per-module rank and error, sizes) and the run's stats."""

    path: Path
    report: dict[str, Any]
    stats: Any
    expert_bytes: int

    @property
    def size_ratio(self) -> float:
        """Adapter tensor bytes over the dense expert's tensor bytes."""
        return self.report.get("adapter_bytes", 0) / self.expert_bytes if self.expert_bytes else 0.0


def extraction_recipe(
    expert: str,
    base: str,
    *,
    rank: int | None = None,
    energy: float | None = None,
    embeddings: bool = False,
    keep_non_lora: bool = False,
    svd_dtype: str = "float32",
    dtype: str | None = None,
    target_modules: list[str] | None = None,
) -> dict[str, Any]:
    """The recipe ``extract_lora`` runs: task_arithmetic (λ = 1, weight 1) of EXPERT over BASE, as an adapter."""
    adapter: dict[str, Any] = {
        "combine": "svd",
        "rank": rank,
        "energy": energy,
        "svd_dtype": svd_dtype,
        "embeddings": embeddings,
        "non_lora": "modules_to_save" if keep_non_lora else "drop",
    }
    if dtype is not None:
        adapter["dtype"] = dtype
    if target_modules is not None:
        adapter["target_modules"] = list(target_modules)
    return {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": [{"model": expert, "parameters": {"weight": 1.0}}],
        "parameters": {"lambda": 1.0, "normalize": False},
        "defaults": "paper",
        "output": "adapter",
        "adapter": adapter,
    }


def extract_lora(
    expert: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    embeddings: bool = False,
    keep_non_lora: bool = False,
    svd_dtype: str = "float32",
    dtype: str | None = None,
    target_modules: list[str] | None = None,
    force: bool = False,
    force_any: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    progress: Any = None,
    hash_inputs: bool = True,
) -> ExtractResult:
    """Write the PEFT LoRA adapter of ``base`` that best approximates the fine-tune ``expert`` at ``out``.

    Give exactly one of ``rank`` (≥ 1, capped per module at ``min(out, in)``) and ``energy`` (in
    (0, 1]: per module, the smallest rank keeping that fraction of ‖τ‖²_F). ``svd_dtype``
    ``float64`` for a float64 SVD; ``dtype`` the factors' stored dtype (default: the expert's).
    ``out`` must not exist (``force``: replace a previous mergelab output). Nothing is written on
    any error. Returns the per-module ranks and relative Frobenius errors and the sizes.
    """
    from mergelab.api import merge

    check_rank_energy(rank, energy, "extract-lora")
    if svd_dtype not in ("float32", "float64"):
        raise OptionError(f"svd_dtype {svd_dtype!r}: use float32 or float64")
    for what, value in (("expert", expert), ("base", base)):
        if not isinstance(value, (str, os.PathLike)):
            raise OptionError(f"{what}: expected a model folder or Hub id, got {type(value).__name__}")
    recipe = extraction_recipe(
        os.fspath(expert),
        os.fspath(base),
        rank=rank,
        energy=energy,
        embeddings=embeddings,
        keep_non_lora=keep_non_lora,
        svd_dtype=svd_dtype,
        dtype=dtype,
        target_modules=target_modules,
    )
    result = merge(
        recipe,
        out,
        force=force,
        force_any=force_any,
        device=device,
        threads=threads,
        progress=progress,
        hash_inputs=hash_inputs,
    )
    report = result.plan_summary.get("adapter", {})
    return ExtractResult(result.path, report, result.stats, int(report.get("dense_bytes", 0)))
