"""What a continual merging method is: pure tensor functions over (running merge, new task vector).

Experts arrive one at a time and the earlier ones are gone. Every method here keeps, per float
tensor of the base, one *raw* running task vector ``R`` (float32) and, for the whole model, one
scale ``s`` and a few running statistics (JSON: norms, λ); the merged model is always

    θ = θ0 + s · R.

Adding expert t (task vector τ_t = θ_t − θ0) is one pass over the tensors: per tensor the
method's :attr:`ContinualMethod.step` maps (R, τ_t) to the new R (R is ``None`` for the first
expert), and after the pass :attr:`ContinualMethod.finish` turns the model-wide sums of that pass
(‖τ_t‖², ‖R_new‖²) into the new statistics and scale. Keeping the scale apart is what lets a
method rescale the *whole* model (OPCM's rescale to the mean task-vector norm) without a second
pass over the tensors: the rescale is a number in the state, applied on export.

A step function never sees files, devices or other tensors (as :mod:`mergelab.methods`); it gets a
:class:`StepContext`: the step index, the running scale and statistics, the tensor's name and its
:data:`Role`. Parameters are a pydantic model (:class:`mergelab.methods.base.MethodParams`:
unknown keys rejected, paper or reference defaults).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mergelab.lora import peft_format
from mergelab.methods.base import MethodParams

Tensor = torch.Tensor

Role = Literal["matrix", "other"]
"""``matrix``: the weight of a linear layer (2-D, ``*.weight``, not an embedding table), which the
SVD-based methods (OPCM, DOP) project; ``other``: everything else (embeddings, biases, norms,
convolutions), merged elementwise."""

#: Module names (the last part before ``.weight``) of embedding tables: 2-D but not linear layers
#: (the usual ones, and T5's relative position table).
EMBEDDING_MODULES = peft_format.EMBEDDING_MODULES | {"relative_attention_bias"}


def tensor_role(name: str, shape: tuple[int, ...]) -> Role:
    """The role of one stored tensor, from its name and shape (headers only).

    A linear layer's weight is 2-D and named ``<module>.weight``, where the module is not an
    embedding table (:data:`EMBEDDING_MODULES`, or a module name containing ``embed``). The
    reference code (FusionBench) tests ``isinstance(module, nn.Linear)``: the same tensors for
    Llama, BERT or CLIP, including an output head such as ``lm_head`` (projected) and excluding
    ``nn.Embedding`` tables (not projected). GPT-2's ``Conv1D`` layers are linear maps stored
    transposed (in × out); they count as matrices here (the reference would merge them
    elementwise). OPCM's projection and DOP's default ``uv`` losses commute with a transpose, so the
    layout does not matter to them; DOP's one-sided ``svd_proj_space: u | v`` does not, so a
    method that declares it (:attr:`ContinualMethod.layout_sensitive`) is told which tensors are
    stored transposed (:attr:`StepContext.transposed`, found from the base's ``config.json``) and
    works on the ``out × in`` matrix.
    """
    if len(shape) != 2 or not name.endswith(".weight"):
        return "other"
    module = name[: -len(".weight")].rsplit(".", 1)[-1]
    if module in EMBEDDING_MODULES or "embed" in module:
        return "other"
    return "matrix"


@dataclass(frozen=True)
class StepContext:
    """What a step function may know when it merges expert ``t`` into one tensor.

    ``t`` is 1-based (``t == 1``: the first expert, ``raw`` is ``None``); ``scale`` and ``stats``
    are the running scale and statistics *before* this step; ``name`` / ``role`` describe the tensor;
    ``transposed``: the tensor stores a linear map as ``in × out`` (GPT-2 ``Conv1D``), set only for
    methods that declare :attr:`ContinualMethod.layout_sensitive` (and only for bases with a
    ``config.json``: an in-memory state dict says nothing about its modules).
    """

    t: int
    scale: float
    stats: Mapping[str, Any]
    name: str
    role: Role
    transposed: bool = False


@dataclass(frozen=True)
class StepSums:
    """Model-wide sums of one step's pass: ‖τ_t‖² and ‖R_new‖² over every float tensor (float64)."""

    tau_sq: float
    raw_sq: float


StepFn = Callable[[Tensor | None, Tensor, Any, StepContext], Tensor]
"""``step(raw, tau, params, ctx) -> new raw`` for one tensor: ``raw`` is the running R (float32,
``None`` for the first expert), ``tau`` the new expert's task vector (float32). May modify
``raw`` and ``tau`` in place (they are the engine's buffers)."""

FinishFn = Callable[[Mapping[str, Any], Any, int, StepSums], tuple[dict[str, Any], float]]
"""``finish(stats, params, t, sums) -> (new stats, new scale)`` after the pass over every tensor."""

WorkspaceFn = Callable[[str, tuple[int, ...], Role, Any], int]
"""``workspace(name, shape, role, params)``: float32 elements a step holds beyond its inputs (the
expected-peak figure printed before an add)."""


def elementwise_workspace(name: str, shape: tuple[int, ...], role: Role, params: Any) -> int:
    """τ, the result and one temporary: three tensor-sized buffers."""
    n = math.prod(shape)
    return 3 * n


@dataclass(frozen=True)
class ContinualMethod:
    """A continual merging method: its step and finish functions, parameters and documentation.

    ``history`` names the statistics that ``status`` shows per step (e.g. ``lambda``), recorded
    with each added expert.
    """

    name: str
    paper: str
    summary: str
    params: type[MethodParams]
    step: StepFn
    finish: FinishFn
    workspace: WorkspaceFn = elementwise_workspace
    history: tuple[str, ...] = ()
    notes: str = ""
    layout_sensitive: Callable[[Any], bool] = lambda params: False
    """Whether, with these parameters, a step depends on a matrix's stored orientation (then
    :attr:`StepContext.transposed` is filled in)."""
