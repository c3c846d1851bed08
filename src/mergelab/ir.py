"""The job graph: what a merge computes, as data, before any tensor is read.

A :class:`Graph` is what the planner (:mod:`mergelab.plan`) builds from a recipe and the inputs'
headers, and what every executor (:mod:`mergelab.executors`) runs:

* **sources**: the opened inputs, by source id (``"base"``, ``"expert0"``, ...);
* **artifacts**: the outputs of the run (:class:`Artifact`), each of one kind; each kind has one
  sink class (:data:`mergelab.executors.sinks.SINKS`);
* **jobs**: one per output tensor. A :class:`Job` names its input tensors
  (:class:`TensorRef`: source id + the tensor's name *in that source*), an operation
  (:class:`MethodCall`, :class:`Copy` or :class:`Init`) and its outputs (:class:`OutRef`:
  artifact + name + shape + dtype);
* the method, its global parameters and folds (model-wide statistics), the depth, tied names,
  warnings and, for data-informed methods, the per-expert statistics readers.

Name mappings between an output and the inputs are data (:class:`NameMap`), so renaming
schemes add a map, not a code path: layer stacking (``slices:`` recipes) maps each output layer
to a layer of each source (``model.layers.5.*`` <- ``model.layers.2.*`` of one model). Every
job's inputs are already resolved :class:`TensorRef` objects, so executors read ``job.inputs`` and
never rename. (MoE upcycling and compression, :mod:`mergelab.moe`, write other models' tensors
under new names and compute routers, so they plan :class:`mergelab.moe.output.Unit` lists instead.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from mergelab.checkpoint.reader import CheckpointReader
    from mergelab.methods.base import Fold, MergeMethod, MethodParams

ArtifactKind = Literal["hf_checkpoint", "peft_adapter", "masks", "state", "router"]
ARTIFACT_KINDS: tuple[str, ...] = ("hf_checkpoint", "peft_adapter", "masks", "state", "router")

MODEL = "model"
"""Name of the merged checkpoint artifact (kind ``hf_checkpoint``) in graphs the planner builds."""
MASKS = "masks"
"""Name of the per-task parts artifact (kind ``masks``) of methods registered ``outputs="routed"``."""
ADAPTER = "adapter"
"""Name of the PEFT adapter artifact (kind ``peft_adapter``) of ``output: adapter`` plans
(:func:`mergelab.lora.sink.adapter_graph`)."""


@dataclass(frozen=True)
class TensorRef:
    """One input tensor: the tensor ``name`` as stored in source ``source``."""

    source: str
    name: str


@dataclass(frozen=True)
class OutRef:
    """One output tensor: ``name`` in artifact ``artifact``, with its planned shape and dtype."""

    artifact: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Artifact:
    """One output of a run: a name, a kind (which picks the sink class) and its folder.

    ``folder`` is relative to the run's output folder (``""``: the output folder itself).
    ``settings``: what the kind's sink needs that the jobs do not say (``peft_adapter``: the
    :class:`mergelab.lora.sink.AdapterPlan`: LoRA targets, rank or energy, non-LoRA handling).
    """

    name: str
    kind: ArtifactKind
    folder: str = ""
    settings: Any = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ARTIFACT_KINDS:
            raise ValueError(f"unknown artifact kind {self.kind!r} (known: {', '.join(ARTIFACT_KINDS)})")


@dataclass(frozen=True, eq=False)
class VocabAlign:
    """Gather each input's vocabulary rows into the output tokenizer's order (``tokenizer_source``).

    An input transform of a vocabulary tensor (input embedding, output head): after it every input
    has ``rows`` rows in the output vocabulary's order, so the method sees aligned tensors. Per job
    input (in ``Job.inputs`` order), ``index[i][r]`` is the input's row for output row ``r < vocab``,
    or -1 where that input lacks the token (or a recipe forces it): the row then takes the token's
    *default embedding*. The defaults are defined for the output rows ``fill_rows``: the mean of
    the rows ``fill_src[i]`` (-1: input ``i`` does not contribute) of the inputs that contribute, or
    zeros when none does; a row with -1 and no default stays zero. Rows ``vocab..rows`` (padding to
    a multiple) are the mean of the input's first ``vocab`` aligned rows.
    """

    rows: int
    vocab: int
    index: tuple[torch.Tensor, ...]
    fill_rows: torch.Tensor
    fill_src: tuple[torch.Tensor, ...]

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The inputs (one per job input, vocabulary on dim 0) aligned to the output vocabulary."""
        if len(tensors) != len(self.index):
            raise ValueError(f"VocabAlign has {len(self.index)} inputs, got {len(tensors)} tensors")
        first = tensors[0]
        rest = tuple(first.shape[1:])
        n_fill = int(self.fill_rows.numel())
        default = torch.zeros((n_fill, *rest), dtype=first.dtype, device=first.device)
        count = torch.zeros(n_fill, dtype=first.dtype, device=first.device)
        for t, src in zip(tensors, self.fill_src):
            src = src.to(t.device)
            have = (src >= 0).nonzero().squeeze(1)
            if have.numel():
                default[have] = default[have] + t[src[have]]
                count[have] += 1
        default = default / count.clamp(min=1).reshape((n_fill,) + (1,) * len(rest))
        fill_rows = self.fill_rows.to(first.device)
        out: list[torch.Tensor] = []
        for t, idx in zip(tensors, self.index):
            idx = idx.to(t.device)
            new = torch.zeros((self.rows, *rest), dtype=t.dtype, device=t.device)
            have = (idx >= 0).nonzero().squeeze(1)
            new[have] = t[idx[have]]
            use = (idx[fill_rows] < 0).nonzero().squeeze(1)
            new[fill_rows[use]] = default[use]
            if self.rows > self.vocab:
                new[self.vocab :] = new[: self.vocab].mean(dim=0)
            out.append(new)
        return out


@dataclass(frozen=True)
class MethodCall:
    """Call the graph's method on the job's inputs (the base first when ``base``, then the experts).

    ``params`` / ``model_params`` are resolved for this tensor (filters, gradients); ``layer`` is
    the block index; ``rows`` truncates every input to its first rows (vocabulary mismatch);
    ``vocab`` gathers every input's rows into the output tokenizer's order first.
    """

    params: MethodParams
    model_params: tuple[MethodParams, ...]
    layer: int | None = None
    rows: int | None = None
    base: bool = True
    vocab: VocabAlign | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Copy:
    """Copy the job's one input unchanged (non-float tensors: position ids, masks).

    ``verify``: the same tensor in the other merged inputs, which must hold the same values (a
    copy of integer or bool tensors is only right when the models agree; executors raise
    :class:`~mergelab.errors.PlanError` on a difference).
    """

    layer: int | None = None
    verify: tuple[TensorRef, ...] = ()


@dataclass(frozen=True)
class Init:
    """A tensor no input has (a router, a new head): zeros, seeded normal noise, or a given value.

    ``random`` draws ``std * N(0, 1)`` from the generator seeded by (run seed, output name), so it
    is the same in every executor and tensor order; ``given`` writes ``value``.
    """

    fill: Literal["zeros", "random", "given"] = "zeros"
    std: float = 0.02
    value: torch.Tensor | None = field(default=None, compare=False)
    layer: int | None = None


Operation = MethodCall | Copy | Init


@dataclass(frozen=True)
class Job:
    """One unit of work: read ``inputs``, apply ``op``, write ``outputs``.

    ``outputs[0]`` is the job's tensor; a method with per-task parts has a second output in the
    parts artifact. The properties below are the planner's per-tensor view used throughout the
    package (``name``, ``kind``, ``shape``, ``out_dtype``, ``params``, ...).
    """

    inputs: tuple[TensorRef, ...]
    op: Operation
    outputs: tuple[OutRef, ...]

    @property
    def name(self) -> str:
        return self.outputs[0].name

    @property
    def shape(self) -> tuple[int, ...]:
        return self.outputs[0].shape

    @property
    def out_dtype(self) -> torch.dtype:
        return self.outputs[0].dtype

    @property
    def kind(self) -> Literal["merge", "copy", "init"]:
        op = self.op
        return "merge" if isinstance(op, MethodCall) else "copy" if isinstance(op, Copy) else "init"

    @property
    def layer(self) -> int | None:
        return self.op.layer

    @property
    def params(self) -> MethodParams | None:
        return self.op.params if isinstance(self.op, MethodCall) else None

    @property
    def model_params(self) -> tuple[MethodParams, ...]:
        return self.op.model_params if isinstance(self.op, MethodCall) else ()

    @property
    def rows(self) -> int | None:
        return self.op.rows if isinstance(self.op, MethodCall) else None

    @property
    def vocab(self) -> VocabAlign | None:
        return self.op.vocab if isinstance(self.op, MethodCall) else None

    @property
    def numel(self) -> int:
        return self.outputs[0].numel

    @property
    def out_nbytes(self) -> int:
        return self.numel * self.out_dtype.itemsize


@dataclass(frozen=True)
class NameMap:
    """Output tensor name -> the name it has in each source (identity where not listed).

    ``maps[source][output name] = input name``. Plans of ``models:`` recipes use the identity;
    plans of ``slices:`` recipes map each output layer's tensors to the source layers they are
    merged from (:func:`mergelab.plan.build_plan`).
    """

    maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def input_name(self, source: str, out_name: str) -> str:
        m = self.maps.get(source)
        return m.get(out_name, out_name) if m else out_name

    def ref(self, source: str, out_name: str) -> TensorRef:
        return TensorRef(source, self.input_name(source, out_name))


IDENTITY = NameMap()


@dataclass
class Graph:
    """A validated merge as data: sources, artifacts, jobs, the method and its folds.

    ``base`` / ``experts`` / ``reference`` are source ids (the reference supplies copied
    tensors and side files). ``aux`` (per expert, a statistics reader with keys
    ``"<tensor>::<kind>"``) is attached after a data phase; ``aux_index`` maps expert -> tensor ->
    kind -> key.
    """

    sources: dict[str, CheckpointReader]
    artifacts: dict[str, Artifact]
    jobs: list[Job]
    method: MergeMethod
    global_params: MethodParams
    base: str | None
    experts: tuple[str, ...]
    reference: str
    num_layers: int | None = None
    tied: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    names: NameMap = IDENTITY
    config_updates: dict[str, Any] = field(default_factory=dict)
    """Keys to set in the output's config.json (dotted for nested: ``text_config.num_hidden_layers``),
    e.g. the depth of a layer-stacked model."""
    aux: list[CheckpointReader] | None = None
    aux_index: list[dict[str, dict[str, str]]] = field(default_factory=list)

    # --- what the executors ask -------------------------------------------------------------

    @property
    def folds(self) -> Sequence[Fold]:
        """The method's folds (gather passes) with the global parameters, in order."""
        return self.method.passes(self.global_params)

    @property
    def input_sources(self) -> list[str]:
        """Distinct source ids of the merged inputs (base, then experts): the hashed inputs."""
        ids = ([self.base] if self.base is not None else []) + list(self.experts)
        return list(dict.fromkeys(ids))

    @property
    def merge_jobs(self) -> list[Job]:
        return [j for j in self.jobs if isinstance(j.op, MethodCall)]

    def reader(self, ref: TensorRef) -> CheckpointReader:
        return self.sources[ref.source]

    def meta(self, ref: TensorRef) -> Any:
        return self.sources[ref.source].tensors()[ref.name]

    def job_input_bytes(self, job: Job) -> int:
        """Bytes read from the inputs for one job (each distinct input tensor once)."""
        total = 0
        for ref in dict.fromkeys(job.inputs):
            m = self.meta(ref)
            total += m.numel * m.dtype.itemsize
        return total

    def input_bytes(self, jobs: Sequence[Job] | None = None) -> int:
        return sum(self.job_input_bytes(j) for j in (self.jobs if jobs is None else jobs))

    def output_bytes(self, artifact: str | None = MODEL) -> int:
        return sum(
            o.numel * o.dtype.itemsize
            for j in self.jobs
            for o in j.outputs
            if artifact is None or o.artifact == artifact
        )

    def outputs_of(self, artifact: str) -> list[OutRef]:
        """Every planned output of one artifact, in job order (a sink's layout)."""
        return [o for j in self.jobs for o in j.outputs if o.artifact == artifact]

    def aux_keys(self, job: Job) -> list[dict[str, str]]:
        """Per expert, the statistics keys of ``job`` by kind (empty without statistics)."""
        if self.aux is None:
            return []
        return [idx.get(job.name, {}) for idx in self.aux_index]

    def job_aux_bytes(self, job: Job) -> int:
        if self.aux is None:
            return 0
        total = 0
        for r, kinds in zip(self.aux, self.aux_keys(job)):
            for key in kinds.values():
                m = r.tensors()[key]
                total += m.numel * m.dtype.itemsize
        return total
