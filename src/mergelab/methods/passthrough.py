"""Passthrough: one model's tensor, unchanged or multiplied by a constant.

Not a merge of several models but the building block of layer stacking ("frankenmerges"):
a ``slices:`` recipe takes each range of layers from one model, and passthrough copies them
into consecutive layers of the output (:mod:`mergelab.plan`). Goddard et al. 2024, "Arcee's
MergeKit: A Toolkit for Merging Large Language Models", arXiv:2403.13257, section on
passthrough/frankenmerging; mergekit 0.1.5's ``passthrough`` (one input per tensor, optional
per-input ``scale``), whose recipes run unchanged.

For one tensor x of the single model: the output is x, or ``scale`` · x when the model sets a
``scale`` (e.g. ``scale: 0`` with a filter zeroes the output projections of duplicated layers,
a common depth up-scaling trick). The base is ignored (as in mergekit); list the model under
``models`` or in a slice's ``sources``. The product is computed in the compute dtype (float32
by default; mergekit multiplies in the recipe dtype) and cast to the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field

from mergelab.methods.base import MethodCard, MethodParams, NoParams, TensorContext
from mergelab.methods.registry import method


class PassthroughModelParams(MethodParams):
    scale: float | None = Field(
        None, allow_inf_nan=False, description="multiply the model's tensor by this (none: copy it unchanged)"
    )


@method(
    "passthrough",
    paper="Goddard et al. 2024, Arcee's MergeKit, arXiv:2403.13257 (passthrough / layer stacking)",
    params=NoParams,
    model_params=PassthroughModelParams,
    base="ignored",
    min_experts=1,
    max_experts=1,
    card=MethodCard(
        identity=({}, {}),  # no scale: the model's tensor itself
        typical=({}, {"scale": 0.5}),
        group=None,  # one model at a time: nothing to benchmark as a merge
    ),
)
def passthrough(
    base: torch.Tensor | None,
    experts: Sequence[torch.Tensor],
    params: NoParams,
    model_params: Sequence[PassthroughModelParams],
    ctx: TensorContext,
) -> torch.Tensor:
    """One model's tensor, optionally scaled by its ``scale`` (layer stacking, frankenmerges)."""
    if len(experts) != 1:
        raise ValueError(f"passthrough takes exactly one model per tensor, got {len(experts)}")
    (x,) = experts
    scale = model_params[0].scale if model_params else None
    return x.clone() if scale is None else x * scale
