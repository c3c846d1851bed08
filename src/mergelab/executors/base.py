"""The executor protocol: run a job graph into one sink per artifact.

An executor takes a :class:`mergelab.ir.Graph` (or a :class:`mergelab.plan.Plan`, whose graph it
runs), a mapping artifact name -> sink, :class:`ExecutorOptions` and a progress receiver, runs
the graph's folds (model-wide statistics) and then every job, and returns :class:`RunStats`.
Executors differ in *where* jobs run (``streaming``: one process, tensor by tensor; ``memory``: a
resident session for parameter searches; ``ray``: shards of jobs on Ray workers); for the same
graph and seed they give bit-identical tensors (random methods seed per (seed, tensor name)).

Nothing here changes process-wide state beyond a run: :func:`thread_limit` sets torch's thread
count for the run and restores it afterwards.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch

from mergelab.errors import OptionError, OutputError, PlanError, RecipeError

if TYPE_CHECKING:
    from mergelab.ir import Copy, Graph, Job, TensorRef
    from mergelab.plan import Plan


class TensorSink(Protocol):
    """Receives the output tensors of one artifact (``hf_checkpoint``, ``state``, ...)."""

    def add(self, name: str, tensor: torch.Tensor) -> None: ...


class PartsSink(Protocol):
    """Receives the per-task parts of methods that return MethodOutput (kind ``masks``)."""

    def add(self, name: str, parts: dict[str, Any]) -> None: ...


class Progress(Protocol):
    """Receives progress events; the CLI renders them as a progress bar."""

    def begin(self, phase: str, total_items: int, total_bytes: int) -> None: ...
    def advance(self, items: int, nbytes: int) -> None: ...
    def end(self) -> None: ...


class NoProgress:
    """A progress receiver that ignores every event."""

    def begin(self, phase: str, total_items: int, total_bytes: int) -> None:
        pass

    def advance(self, items: int, nbytes: int) -> None:
        pass

    def end(self) -> None:
        pass


@dataclass
class ExecutorOptions:
    """How to run a graph: where, in which precision, with which checks, on how many workers.

    ``threads``: torch's CPU threads during the run (restored afterwards; also bounds the
    experts' side-by-side selections in :func:`mergelab.methods.sparsify.parallel_map`, which size
    themselves from torch's thread count). ``workers`` and ``address`` are for distributed
    executors (``ray``: worker processes; the cluster address, ``None`` for a local Ray).
    ``prefetch``: read the next job while the current one computes. ``read_workers``: positional
    reads in flight while a job's inputs are read (safetensors inputs; a large tensor is read as
    several ranges) and read-ahead hints to the kernel for the job after it; 1 reads one tensor
    at a time, without hints.
    """

    device: str = "cpu"
    compute_dtype: torch.dtype = torch.float32
    threads: int | None = None
    seed: int = 0
    check_finite: bool = True
    hash_inputs: bool = True
    prefetch: bool = True
    read_workers: int = 4
    workers: int | None = None
    address: str | None = None


@dataclass
class RunStats:
    """What a run did: time, bytes, tensors, peak memory, input content hashes."""

    seconds: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    tensors: int = 0
    passes: int = 1
    peak_rss_bytes: int = 0
    hashes: dict[str, str] = field(default_factory=dict)


class Executor(Protocol):
    """Runs a graph: folds first, then every job into the sink of its output's artifact.

    ``sinks`` maps artifact name -> sink; outputs of an artifact without a sink are dropped
    (e.g. the per-task parts of an in-memory merge).
    """

    name: str

    def run(
        self,
        graph: Graph | Plan,
        sinks: Mapping[str, Any],
        options: ExecutorOptions | None = None,
        progress: Progress | None = None,
    ) -> RunStats: ...


EXECUTORS: dict[str, str] = {
    "streaming": "mergelab.executors.streaming:StreamingExecutor",
    "memory": "mergelab.executors.memory:MemoryExecutor",
    "ray": "mergelab.executors.ray:RayExecutor",
}
"""Executor name -> ``module:class`` (imported on first use: the core never needs Ray)."""


def get_executor(name: str) -> Executor:
    """A fresh executor by name (``streaming``, ``memory``, ``ray``)."""
    target = EXECUTORS.get(name)
    if target is None:
        raise OptionError(f"unknown executor {name!r} (known: {', '.join(EXECUTORS)})")
    module, cls = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        hint = " (pip install 'mergelab[ray]')" if name == "ray" else ""
        raise OptionError(f"executor {name!r} is not available: {exc}{hint}") from exc
    return getattr(mod, cls)()


def as_graph(graph_or_plan: Graph | Plan) -> Graph:
    """The graph of a plan (or the graph itself)."""
    return cast("Graph", getattr(graph_or_plan, "graph", graph_or_plan))


@contextlib.contextmanager
def thread_limit(threads: int | None) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` for the block, then restored (``None``: unchanged)."""
    if not threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a clear error."""
    if isinstance(device, torch.device):
        device = str(device)
    if not isinstance(device, str):
        raise OptionError(f"device: expected a string such as 'cpu', 'cuda' or 'auto', got {type(device).__name__}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise OptionError(f"--device {device}: unknown device; use cpu, cuda, cuda:N, mps or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OptionError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
        )
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise OptionError(
            "--device mps was requested but MPS (Apple GPU) is not available in this torch build or machine; "
            "use --device cpu or auto"
        )
    return dev


def check_threads(threads: int | None) -> None:
    """``--threads`` is None (torch's default) or a whole number ≥ 1."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise OptionError(f"threads: expected a whole number ≥ 1 or None, got {type(threads).__name__}")
    if threads < 1:
        raise OptionError(f"--threads {threads}: give at least 1 (or leave it out for torch's default)")


def check_read_workers(read_workers: int) -> None:
    """``--read-workers`` is a whole number ≥ 1 (1: one read at a time)."""
    if isinstance(read_workers, bool) or not isinstance(read_workers, int):
        raise OptionError(f"read_workers: expected a whole number ≥ 1, got {type(read_workers).__name__}")
    if read_workers < 1:
        raise OptionError(f"--read-workers {read_workers}: give at least 1 (1 reads one tensor at a time)")


def check_statistics(graph: Graph) -> None:
    """Data-informed methods need their statistics attached before any executor runs."""
    if graph.method.statistics is not None and graph.aux is None:
        raise RecipeError(
            f"merge_method {graph.method.name} needs per-expert statistics from a data phase: add a `calibration:` "
            "block to the recipe (or pass statistics=...); mergelab.merge runs the data phase before the merge"
        )


def cast_output(t: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``t`` cast to its output ``dtype``, refusing values beyond that dtype's range.

    A cast to a narrower float type (float16: |x| ≤ 65504) turns larger values into ``inf``, a
    silently broken checkpoint; this raises :class:`~mergelab.errors.OutputError` naming the
    tensor, the largest magnitude and the fix instead. Costs one min/max pass over the cast
    result, only for casts that narrow the range.
    """
    out = t.to(dtype)
    if not (dtype.is_floating_point and t.is_floating_point()) or t.numel() == 0:
        return out
    limit = torch.finfo(dtype).max
    if limit >= torch.finfo(t.dtype).max:
        return out
    lo, hi = torch.aminmax(out)
    if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
        return out
    peak = float(t.abs().amax())
    if peak != peak or peak == float("inf"):
        return out  # NaN/Inf before the cast (finite checks turned off): not the cast's doing
    kind = str(dtype).removeprefix("torch.")
    raise OutputError(
        f"tensor {name!r}: merged values reach |x| = {peak:.6g}, beyond {kind}'s range (max {limit:.6g}), and would "
        f"be written as inf; use out_dtype bfloat16 or float32 (--out-dtype, or `out_dtype:` in the recipe)"
    )


def check_copy(graph: Graph, job: Job, op: Copy, copied: torch.Tensor, read: Mapping[TensorRef, torch.Tensor]) -> None:
    """Refuse a copied (integer or bool) tensor that another merged input holds with other values.

    ``read`` holds the tensors of ``op.verify`` (the same tensor in the other merged inputs).
    Copying one model's position ids is right; copying the base's quantized weights while the
    experts hold others would silently drop the experts.
    """
    for ref in op.verify:
        other = read[ref]
        if not torch.equal(other, copied):
            differ = int((other != copied).sum())
            ours = graph.sources[job.inputs[0].source].label
            raise PlanError(
                f"{graph.sources[ref.source].label}: tensor {job.name!r} ({str(copied.dtype).removeprefix('torch.')}) "
                f"differs from {ours}'s in {differ} of {copied.numel()} entries; integer and bool tensors are copied, "
                "not merged, which is only right when every model holds the same values: merge models that agree "
                "on it (dequantize quantized models first)"
            )
