"""A continual step, and the export, as job graphs that the streaming executor runs tensor by tensor.

A step reads, per float tensor of the base, the base's tensor, the running task vector R (from the
second expert on) and the new expert's tensor, calls the method's step function and hands the
new R (float32) to a sink: the state folder's writer, or a dict for an in-memory session. Integer
and bool tensors (position ids, masks) are not merged: the expert's must equal the base's
(checked as ``mergelab merge`` checks copied tensors), and the export copies the base's. Reading
ahead, NaN/Inf checks, the BLAKE3 content hashes of the inputs and the progress bar are the
engine's (:mod:`mergelab.executors.streaming`), so peak memory is set by the largest tensor, never
by the model or the number of experts: :func:`expected_peak` states it before a step starts.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mergelab.checkpoint.reader import CheckpointReader, TensorMeta, content_hash
from mergelab.checkpoint.writer import fmt_bytes
from mergelab.continual.base import ContinualMethod, Role, StepContext, StepSums, tensor_role
from mergelab.errors import CheckpointError, PlanError
from mergelab.executors.base import ExecutorOptions, NoProgress, Progress, RunStats, resolve_device, thread_limit
from mergelab.executors.streaming import InputHasher, merge_jobs
from mergelab.ir import MODEL, Artifact, Copy, Graph, Job, MethodCall, OutRef, TensorRef
from mergelab.methods.base import MergeMethod, MethodParams, NoParams, TensorContext
from mergelab.plan import layer_index, natural_order_key

Tensor = torch.Tensor

STATE_DTYPE = torch.float32
"""The dtype of the running task vector R in the state (task vectors are small next to the weights:
float32 keeps them exact enough over many steps whatever the models' dtype)."""

BASE, STATE, EXPERT = "base", "state", "expert"
HASH_LAG = 2
"""Input tensors that may wait for the hashing thread after their job is done (its queue bound)."""
CHECKS = "checks"
"""Artifact of the copied-tensor checks of a step (no sink: nothing is written)."""


# ------------------------------------------------------------------------------ the model layout


def float_tensors(reader: CheckpointReader) -> list[TensorMeta]:
    """The base's floating-point tensors (the merged ones), in module order."""
    metas = [m for m in reader.tensors().values() if m.dtype.is_floating_point]
    return sorted(metas, key=lambda m: natural_order_key(m.name))


def other_tensors(reader: CheckpointReader) -> list[TensorMeta]:
    """The base's integer and bool tensors (copied from the base, never merged), in module order."""
    metas = [m for m in reader.tensors().values() if not m.dtype.is_floating_point]
    return sorted(metas, key=lambda m: natural_order_key(m.name))


def check_expert(base: CheckpointReader, expert: CheckpointReader) -> None:
    """Refuse an expert whose tensors (names, shapes, float or not) differ from the base's (one line)."""
    theirs = expert.tensors()
    for name, m in base.tensors().items():
        other = theirs.get(name)
        if other is None:
            raise PlanError(
                f"{expert.label}: has no tensor {name!r}, which the base {base.label} has; a continual merge needs "
                "experts fine-tuned from that base (same architecture and tensors)"
            )
        if tuple(other.shape) != tuple(m.shape):
            raise PlanError(
                f"{expert.label}: tensor {name!r} has shape {list(other.shape)} where the base has {list(m.shape)} "
                "(another architecture or vocabulary size); add experts fine-tuned from this base"
            )
        if other.dtype.is_floating_point != m.dtype.is_floating_point:
            raise PlanError(
                f"{expert.label}: tensor {name!r} is {str(other.dtype).removeprefix('torch.')} where the base's is "
                f"{str(m.dtype).removeprefix('torch.')}; dequantize the expert (or the base) first"
            )
    extra = [n for n in theirs if n not in base.tensors()]
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise PlanError(
            f"{expert.label}: tensor {extra[0]!r}{more} is not in the base {base.label}; a continual merge needs "
            "experts fine-tuned from that base (same architecture and tensors)"
        )


def check_state(base: CheckpointReader, state: CheckpointReader, folder: str) -> None:
    """Refuse a running task vector that does not cover the base's float tensors (a damaged state)."""
    have = state.tensors()
    for m in float_tensors(base):
        other = have.get(m.name)
        if other is None or tuple(other.shape) != tuple(m.shape):
            why = "is missing" if other is None else f"has shape {list(other.shape)}, not {list(m.shape)}"
            raise CheckpointError(
                f"{folder}: the running task vector's tensor {m.name!r} {why}; the state does not belong to this "
                "base or is damaged: start again with `mergelab continual init`"
            )


# ---------------------------------------------------------------------------------- peak memory


@dataclass(frozen=True)
class PeakEstimate:
    """The expected peak working memory of one step (bytes), and the tensor that sets it."""

    bytes: int
    tensor: str
    shape: tuple[int, ...]
    copies: float

    def line(self) -> str:
        """``1.2 GB: tensor lm_head.weight (32000×4096), 9.5 tensor-sized float32 buffers``."""
        shape = "×".join(map(str, self.shape)) or "scalar"
        return (
            f"{fmt_bytes(self.bytes)}: tensor {self.tensor} ({shape}), {self.copies:.1f} tensor-sized float32 buffers"
        )


def expected_peak(
    metas: Sequence[TensorMeta], method: ContinualMethod, params: MethodParams, inputs: int
) -> PeakEstimate:
    """Working memory of a step from headers alone: for each tensor (in processing order), its
    ``inputs`` float32 copies (base, running task vector, expert), two more that may still wait to
    be hashed (:data:`HASH_LAG`), the method's workspace (:attr:`ContinualMethod.workspace`: τ, the
    result, SVD or optimiser buffers), plus the next tensor's inputs, read ahead meanwhile. The
    largest of these sums, 4 bytes per element; the interpreter and its libraries come on top."""
    best = PeakEstimate(0, "", (), 0.0)
    for i, m in enumerate(metas):
        shape = tuple(m.shape)
        work = (inputs + HASH_LAG) * m.numel + method.workspace(m.name, shape, tensor_role(m.name, shape), params)
        ahead = inputs * metas[i + 1].numel if i + 1 < len(metas) else 0
        total = 4 * (work + ahead)
        if total > best.bytes:
            best = PeakEstimate(total, m.name, shape, (work + ahead) / max(m.numel, 1))
    return best


# ------------------------------------------------------------------------------------ the graphs


def _method(name: str, fn: Callable[..., Tensor], params: type[MethodParams], paper: str) -> MergeMethod:
    return MergeMethod(
        name=name, fn=fn, params=params, model_params=NoParams, paper=paper, summary=name, base="required"
    )


def step_graph(
    base: CheckpointReader,
    state: CheckpointReader | None,
    expert: CheckpointReader,
    method: ContinualMethod,
    params: MethodParams,
    t: int,
    scale: float,
    stats: Mapping[str, Any],
    sums: dict[str, tuple[float, float]],
) -> Graph:
    """The graph of step ``t``: one job per base tensor; ``sums`` receives (‖τ‖², ‖R_new‖²) per tensor."""
    roles: dict[str, Role] = {m.name: tensor_role(m.name, tuple(m.shape)) for m in float_tensors(base)}
    transposed = conv1d_weights(base) if method.layout_sensitive(params) else frozenset()

    def fn(
        b: Tensor, inputs: Sequence[Tensor], p: MethodParams, mp: Sequence[MethodParams], ctx: TensorContext
    ) -> Tensor:
        raw, new = (None, inputs[0]) if len(inputs) == 1 else (inputs[0], inputs[1])
        tau = torch.sub(new, b)  # never in place: the engine hashes the expert's tensors after handing them on
        if raw is not None and raw.dtype != STATE_DTYPE:
            raw = raw.to(STATE_DTYPE)
        tau_sq = float(torch.linalg.vector_norm(tau)) ** 2
        out = method.step(raw, tau, p, StepContext(t, scale, stats, ctx.name, roles[ctx.name], ctx.name in transposed))
        sums[ctx.name] = (tau_sq, float(torch.linalg.vector_norm(out)) ** 2)
        return out

    sources: dict[str, CheckpointReader] = {BASE: base, EXPERT: expert}
    experts: tuple[str, ...] = (EXPERT,)
    if state is not None:
        sources[STATE] = state
        experts = (STATE, EXPERT)
    jobs: list[Job] = []
    for m in float_tensors(base):
        refs = (TensorRef(BASE, m.name), *(TensorRef(s, m.name) for s in experts))
        op = MethodCall(params=params, model_params=(NoParams(),) * len(experts), layer=layer_index(m.name))
        jobs.append(Job(refs, op, (OutRef(MODEL, m.name, tuple(m.shape), STATE_DTYPE),)))
    for m in other_tensors(base):
        check = Copy(layer=layer_index(m.name), verify=(TensorRef(EXPERT, m.name),))
        jobs.append(Job((TensorRef(BASE, m.name),), check, (OutRef(CHECKS, m.name, tuple(m.shape), m.dtype),)))
    return Graph(
        sources=sources,
        artifacts={MODEL: Artifact(MODEL, "hf_checkpoint"), CHECKS: Artifact(CHECKS, "state")},
        jobs=jobs,
        method=_method(f"continual {method.name}", fn, method.params, method.paper),
        global_params=params,
        base=BASE,
        experts=experts,
        reference=BASE,
    )


def conv1d_weights(base: CheckpointReader) -> frozenset[str]:
    """The base's tensors that store a linear map ``in × out`` (GPT-2 ``Conv1D`` weights), from its
    ``config.json`` (the model class on the meta device); empty without one."""
    folder = getattr(base, "folder", None)
    if folder is None or not (folder / "config.json").is_file():
        return frozenset()
    from mergelab.routed.structure import model_structure

    structure = model_structure(folder, {m.name: tuple(m.shape) for m in base.tensors().values()})
    return frozenset(
        info.params["weight"]
        for info in structure.modules.values()
        if info.kind == "conv1d" and "weight" in info.params
    )


def merged_tensor(base: Tensor, raw: Tensor | None, scale: float) -> Tensor:
    """θ0 + s·R for one tensor (float32; the base alone before the first expert)."""
    b = base.to(STATE_DTYPE)
    return b if raw is None else torch.add(b, raw.to(STATE_DTYPE), alpha=scale)


def export_graph(
    base: CheckpointReader, state: CheckpointReader | None, scale: float, out_dtype: torch.dtype | None = None
) -> Graph:
    """The merged model θ0 + s·R as a graph: float tensors in ``out_dtype`` (default: the base's), the
    base's integer and bool tensors copied."""

    def fn(
        b: Tensor, inputs: Sequence[Tensor], p: MethodParams, mp: Sequence[MethodParams], ctx: TensorContext
    ) -> Tensor:
        return merged_tensor(b, inputs[0] if inputs else None, scale)

    sources: dict[str, CheckpointReader] = {BASE: base}
    experts: tuple[str, ...] = ()
    if state is not None:
        sources[STATE] = state
        experts = (STATE,)
    jobs: list[Job] = []
    for m in float_tensors(base):
        refs = (TensorRef(BASE, m.name), *(TensorRef(s, m.name) for s in experts))
        op = MethodCall(params=NoParams(), model_params=(NoParams(),) * len(experts), layer=layer_index(m.name))
        jobs.append(Job(refs, op, (OutRef(MODEL, m.name, tuple(m.shape), out_dtype or m.dtype),)))
    for m in other_tensors(base):
        jobs.append(
            Job(
                (TensorRef(BASE, m.name),),
                Copy(layer=layer_index(m.name)),
                (OutRef(MODEL, m.name, tuple(m.shape), m.dtype),),
            )
        )
    jobs.sort(key=lambda j: natural_order_key(j.name))
    return Graph(
        sources=sources,
        artifacts={MODEL: Artifact(MODEL, "hf_checkpoint")},
        jobs=jobs,
        method=_method("continual export", fn, NoParams, "θ0 + s·R"),
        global_params=NoParams(),
        base=BASE,
        experts=experts,
        reference=BASE,
    )


# ----------------------------------------------------------------------------------- running one


@dataclass
class StepRun:
    """What one pass measured: the engine's stats, the content hashes by source id, the sums by tensor."""

    stats: RunStats
    hashes: dict[str, str]
    sums: StepSums


def run_graph(
    graph: Graph,
    sinks: Mapping[str, Any],
    *,
    device: str = "cpu",
    threads: int | None = None,
    check_finite: bool = True,
    hash_inputs: bool = True,
    progress: Progress | None = None,
    phase: str = "merge",
    sums: Mapping[str, tuple[float, float]] | None = None,
) -> StepRun:
    """Run every job of ``graph`` once into ``sinks`` (one pass over the inputs)."""
    opts = ExecutorOptions(
        device=device, compute_dtype=STATE_DTYPE, threads=threads, check_finite=check_finite, hash_inputs=hash_inputs
    )
    dev = resolve_device(device)
    prog = progress or NoProgress()
    hasher = InputHasher(max_pending=HASH_LAG, skip=(STATE,)) if hash_inputs else None  # steps update R in place
    run = RunStats()
    t0 = time.perf_counter()
    try:
        with thread_limit(threads):
            prog.begin(phase, len(graph.jobs), graph.input_bytes())
            try:
                merge_jobs(graph, graph.jobs, sinks, {}, opts, dev, run, hasher, prog)
            finally:
                prog.end()
    except BaseException:
        if hasher is not None:
            hasher.abandon()
        raise
    hashes: dict[str, str] = {}
    if hasher is not None:
        hasher.close()
        hashes = {s: content_hash(hasher.digests.get(s, {})) for s in graph.sources if s != STATE}
    run.seconds = time.perf_counter() - t0
    run.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    totals = StepSums(0.0, 0.0)
    if sums is not None:  # added in tensor order, so the result does not depend on how the pass ran
        tau_sq = math.fsum(sums[n][0] for n in sorted(sums))
        raw_sq = math.fsum(sums[n][1] for n in sorted(sums))
        totals = StepSums(tau_sq, raw_sq)
    return StepRun(run, hashes, totals)
