"""MagMax: per weight, keep the task-vector entry of largest magnitude across the experts.

Marczak, Twardowski, Trzciński, Cygert 2024, "MagMax: Leveraging Model Merging for Seamless
Continual Learning", ECCV 2024, arXiv:2407.06322.

τ_MagMax[p] = τ_{i*}[p] with i* = argmax_i |τ_i[p]|, and θ = θ0 + λ τ_MagMax. In the paper the
experts come from sequential fine-tuning (each task starts from the previous task's weights),
but the merge itself only needs the task vectors τ_i = θ_i − θ0 against the common base.

Defaults and details (reference: danielm1405/magmax, ``merge_max_abs`` in
``src/merging/task_vectors.py`` and the ``merge_*.py`` scripts):

* λ = 0.5: the coefficient the paper and its merge scripts use for MagMax (not 1.0).
* Ties in magnitude go to the later expert in recipe order (the reference folds the experts in
  order and replaces on ``|τ_j| ≥ |current|``), so for τ_1 = +a, τ_2 = −a the result is −a.
* Every tensor, whatever its shape, is merged elementwise (the reference does the same).

Granularity: elementwise within each tensor; nothing model-wide, one streaming pass.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, NoParams, TensorContext
from mergelab.methods.kernels.tensors import scale_add, task_vectors
from mergelab.methods.registry import method
from mergelab.methods.svd_utils import work_dtype

Tensor = torch.Tensor


class MagMaxParams(MethodParams):
    lambda_: float = Field(
        0.5,
        alias="lambda",
        allow_inf_nan=False,
        description="scale of the selected task vector (paper and reference scripts: 0.5)",
    )


def max_magnitude(taus: Iterable[Tensor]) -> Tensor:
    """Elementwise entry of largest |τ_i| (ties: the later τ_i); folds the task vectors one at a
    time, so a generator keeps only two of them alive."""
    best: Tensor | None = None
    for t in taus:
        best = t.clone() if best is None else torch.where(t.abs() >= best.abs(), t, best)
    if best is None:
        raise ValueError("magmax needs at least one expert")
    return best


def magmax_delta(
    base: Tensor,
    experts: Sequence[Tensor],
    params: MagMaxParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> Tensor:
    """τ_MagMax (float32, float64 under a float64 compute dtype): ``magmax == base + λ · magmax_delta``
    (cast to the base's dtype)."""
    w = work_dtype(base)
    b = base.to(w)
    return max_magnitude(task_vectors(b, [e], dtype=w)[0] for e in experts)


@method(
    "magmax",
    paper="Marczak et al. 2024, MagMax: Leveraging Model Merging for Seamless Continual Learning, "
    "ECCV, arXiv:2407.06322",
    params=MagMaxParams,
    model_params=NoParams,
    base="required",
    scale="lambda",
    delta=magmax_delta,
    card=MethodCard(
        identity=({"lambda": 1.0}, {}),
        typical=({}, {}),
        grid=({"lambda": (0.3, 0.5, 0.7, 1.0, 1.3)}, {}),
        group="advanced",
    ),
)
def magmax(
    base: Tensor,
    experts: Sequence[Tensor],
    params: MagMaxParams,
    model_params: Sequence[NoParams],
    ctx: TensorContext,
) -> Tensor:
    """Keep, per weight, the task-vector entry of largest magnitude; add λ times it to the base."""
    best = magmax_delta(base, experts, params, model_params, ctx)
    return scale_add(base.to(best.dtype), best, params.lambda_).to(base.dtype)
