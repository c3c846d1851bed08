"""What a merging method is: a pure function of tensors plus typed parameters.

A method never sees files, devices of its own choosing, dtypes other than the compute dtype,
or other tensors of the model. The engine hands it, for one tensor name at a time:

* ``base``: the base model's tensor (``None`` when the method ignores the base),
* ``experts``: one tensor per expert (non-base model), in recipe order,
* ``params``: the method's global parameter model, resolved for this tensor,
* ``model_params``: one per-model parameter model per expert, resolved for this tensor,
* ``ctx``: a :class:`TensorContext` (name, layer position, seeded RNG, pass-1 statistics).

and takes back one tensor of the base's shape. Methods that need model-wide statistics
(e.g. TIES with the paper's global top-k) declare :class:`Fold` objects; the engine runs
each as a read over every tensor before the merge and puts the result in ``ctx.folds``.

Data-informed methods (Fisher, RegMean, AdaMerging) declare ``statistics``: the name of a data
phase (:mod:`mergelab.informed`) that runs forward/backward passes on calibration data before the
merge and stores per-expert statistics on disk, keyed ``"<tensor name>::<kind>"``. The engine
reads the entries of the tensor in hand and passes them as ``ctx.statistics[i][kind]`` (expert ``i``,
e.g. ``ctx.statistics[0]["fisher"]``); the method itself stays a pure function of tensors.
"""

from __future__ import annotations

import hashlib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

Tensor = torch.Tensor


class MethodParams(BaseModel):
    """Base of every parameter model: unknown keys are rejected, values are validated.

    Subclasses declare fields with the paper's defaults and pydantic constraints
    (``Field(0.2, ge=0, le=1)``); ``description=`` texts are shown by ``mergelab methods``.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Refuse ``true``/``false`` where a number is expected (pydantic would read them as 1 and 0).

        ``density: true`` is a recipe mistake, never a density of 1.0. Numeric strings (``"0.5"``,
        YAML's ``1e-3``, which YAML 1.1 reads as a string) keep pydantic's conversion: they name
        their number exactly.
        """
        name = info.field_name
        if name is None or not _has_bool(value):
            return value
        annotation = cls.model_fields[name].annotation
        if is_numeric_annotation(annotation) and not _accepts_bool(annotation):
            raise ValueError(f"got the boolean {value!r} where a number is expected; give a number (e.g. 1.0)")
        return value


def _has_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(isinstance(v, bool) for v in value)


def is_numeric_annotation(annotation: Any) -> bool:
    """Whether a field annotation admits an int or a float (directly, in a union, or as items)."""
    if annotation in (int, float):
        return True
    return any(is_numeric_annotation(a) for a in typing.get_args(annotation) if a is not Ellipsis)


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field annotation admits a boolean value (``bool``, ``Any``, a Literal of one, or a union with one)."""
    if annotation is None:
        return False
    if annotation is bool or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return any(isinstance(a, bool) for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _accepts_bool(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType, list, tuple, set, frozenset, dict):
        return any(_accepts_bool(a) for a in typing.get_args(annotation) if a is not Ellipsis)
    return False


class NoParams(MethodParams):
    """For methods without parameters of that scope."""


def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit seed derived from (seed, tensor name), independent of processing order."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class TensorContext:
    """What a method may legitimately know about the tensor in hand.

    ``layer`` is the transformer block index parsed from the name (``None`` outside blocks),
    ``num_layers`` the architecture's depth. ``folds`` holds the results of the method's
    folds keyed by pass name (empty for one-pass methods). ``statistics`` holds, per expert, the
    data-phase statistics of this tensor keyed by kind (``{"fisher": F}``, ``{"gram": G, "rows":
    n}``); on the compute device in their stored dtype; empty for data-free methods.
    """

    name: str
    seed: int = 0
    layer: int | None = None
    num_layers: int | None = None
    folds: Mapping[str, Any] = field(default_factory=dict)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    statistics: Sequence[Mapping[str, Tensor]] = ()

    @property
    def depth(self) -> float | None:
        """Block position in [0, 1] (0 = first block, 1 = last), ``None`` outside blocks."""
        if self.layer is None or not self.num_layers:
            return None
        return 0.0 if self.num_layers <= 1 else self.layer / (self.num_layers - 1)

    def generator(self, stream: int = 0) -> torch.Generator:
        """A generator seeded from (seed, name[, stream]) on the compute device.

        Reproducible per tensor whatever the processing order; ``stream`` gives independent
        streams within one tensor (e.g. one per expert, so masks do not depend on how a tensor
        is split into chunks).
        """
        gen = torch.Generator(device=self.device)
        key = self.name if stream == 0 else f"{self.name}\x00{stream}"
        gen.manual_seed(tensor_seed(self.seed, key))
        return gen


@dataclass
class MethodOutput:
    """What a method with per-task parts returns for one tensor (TALL masks, EMR).

    ``merged`` is the shared tensor written to the output checkpoint; ``parts`` holds the
    per-task pieces (e.g. ``{"mask": [bool tensor per task]}``) that the engine hands to the
    run's parts sink (see ``mergelab.routed``).
    """

    merged: Tensor
    parts: dict[str, Any] = field(default_factory=dict)


MergeFn = Callable[..., "Tensor | MethodOutput"]
# The unscaled merged task vector of a method's scaled form (``MergeMethod.delta``): fn's signature.
DeltaFn = Callable[..., Tensor]
# The gather passes of a method: called with an instance of the method's own ``params`` model
# (a MethodParams subclass, so the argument is typed Any, as MergeFn's are).
PassesFn = Callable[[Any], Sequence["Fold"]]


@dataclass(frozen=True)
class Fold:
    """One read over every merged tensor before the merge, for model-wide statistics.

    ``init(params, n_experts)`` makes a state; ``update(state, base, experts, params,
    model_params, ctx)`` folds one tensor in (keep the state small: scalars, histograms);
    ``combine(a, b)`` merges two states folded over disjoint sets of tensors (so that workers
    can fold shards of the model and a driver can combine them; ``None``: the fold cannot be
    sharded); ``finish(state, params, n_experts)`` returns the statistic stored as
    ``ctx.folds[name]``. Folds run in order; a later fold sees the earlier folds' results in
    ``ctx.folds``. ``params`` here are the recipe's global parameters (not per-tensor resolved).
    """

    name: str
    init: Callable[..., Any]
    update: Callable[..., None]
    finish: Callable[..., Any]
    combine: Callable[[Any, Any], Any] | None = None


Scoped = tuple[Mapping[str, Any], Mapping[str, Any]]  # (global parameters, per-model parameters)


@dataclass(frozen=True)
class MethodCard:
    """What the tests, the docs and the benchmark need to know about a method, declared with it.

    ``identity``: (global, per-model) parameters under which merging copies of one expert
    returns that expert (the registry-wide contract tests); ``typical``: (global, per-model)
    parameters that exercise the method's non-trivial path (sparsity, randomness); ``grid``:
    the benchmark's search grid as (global axes, per-model axes), each axis a parameter name ->
    values, searched as their product; ``group``: the benchmark group (``classic``,
    ``advanced``, ``informed``) or ``None`` when the method is not benchmarked on its own;
    ``variants``: benchmark rows that are this method with fixed global parameters (row name ->
    parameters), benchmarked instead of the plain method (a variant named after the method itself,
    with no fixed parameters, keeps the plain row beside the others); ``random``: the output depends on the
    merge seed (random drops, sampling), so the benchmark scores it with several seeds.
    """

    identity: Scoped | None = None
    typical: Scoped | None = None
    grid: tuple[Mapping[str, Sequence[Any]], Mapping[str, Sequence[Any]]] | None = None
    group: str | None = None
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    random: bool = False


BaseUse = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method: its function, parameter models and how it uses its inputs."""

    name: str
    fn: MergeFn
    params: type[MethodParams]
    model_params: type[MethodParams]
    paper: str
    summary: str
    base: BaseUse = "required"
    min_experts: int = 1
    max_experts: int | None = None
    passes_fn: PassesFn | None = None
    aliases: tuple[str, ...] = ()
    outputs: Literal["model", "routed"] = "model"  # "routed": fn returns MethodOutput
    statistics: str | None = None  # data phase producing ctx.statistics (mergelab.informed); None: data-free
    card: MethodCard = field(default_factory=MethodCard)
    # Scaled form, for executors that sweep the scale without recomputing the rest (the memory
    # session): ``fn(...)`` equals ``torch.add(base, delta(...), alpha=params.<scale>)`` bit for bit,
    # where ``delta`` has fn's signature and returns the unscaled merged task vector.
    scale: str | None = None
    delta: DeltaFn | None = None

    def passes(self, params: MethodParams) -> Sequence[Fold]:
        """The gather passes needed with these global parameters (often none)."""
        return tuple(self.passes_fn(params)) if self.passes_fn else ()

    def __call__(
        self,
        base: Tensor | None,
        experts: Sequence[Tensor],
        params: MethodParams,
        model_params: Sequence[MethodParams],
        ctx: TensorContext,
    ) -> Tensor | MethodOutput:
        return self.fn(base, experts, params, model_params, ctx)
