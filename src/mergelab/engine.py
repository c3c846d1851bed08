"""The engine: runs a Plan tensor by tensor with bounded memory.

For each job it reads the tensor from every input (the next job's reads overlap the current
job's compute, on a reader thread), casts to the compute dtype on the compute device, checks
for NaN/Inf, calls the method, casts the result to the output dtype and hands it to a sink,
then drops every reference. Peak memory is a function of the largest job, never of model size.
Methods with gather passes get one extra read over the model per pass, before the merge.
Data-informed methods also get, per merged tensor, each expert's statistics from the plan's
``aux`` readers (read on the same reader thread, moved to the compute device, dtype unchanged)
as ``ctx.aux``; the data phase that writes them runs before (``mergelab.informed``).
"""

from __future__ import annotations

import resource
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import blake3
import torch

from mergelab.checkpoint.reader import CheckpointReader, tensor_digest
from mergelab.errors import InputDataError, MergelabError
from mergelab.methods.base import MethodOutput, TensorContext
from mergelab.plan import Plan, TensorJob


class TensorSink(Protocol):
    def add(self, name: str, tensor: torch.Tensor) -> None: ...


class PartsSink(Protocol):
    """Receives the per-task parts of methods that return MethodOutput (see mergelab.modulators)."""

    def add(self, name: str, parts: dict[str, Any]) -> None: ...


class Progress(Protocol):
    """Receives progress events; the CLI renders them as a progress bar."""

    def begin(self, phase: str, total_items: int, total_bytes: int) -> None: ...
    def advance(self, items: int, nbytes: int) -> None: ...
    def end(self) -> None: ...


class _NoProgress:
    def begin(self, phase: str, total_items: int, total_bytes: int) -> None:
        pass

    def advance(self, items: int, nbytes: int) -> None:
        pass

    def end(self) -> None:
        pass


@dataclass
class EngineOptions:
    """How to run a plan: where, in which precision, with which checks."""

    device: str = "cpu"
    compute_dtype: torch.dtype = torch.float32
    threads: int | None = None
    seed: int = 0
    check_finite: bool = True
    hash_inputs: bool = True
    prefetch: bool = True


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


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; ``cuda`` without a GPU is a clear error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergelabError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    return dev


class _Hasher:
    """Content hashes of every input, computed on a thread of their own as tensors are read.

    Hashing (BLAKE3, which releases the GIL) overlaps both reading and merging; at most
    ``max_pending`` tensors wait to be hashed, so it cannot hold more than that in memory.
    """

    def __init__(self, max_pending: int = 8) -> None:
        self.digests: dict[int, dict[str, tuple[str, tuple[int, ...], bytes]]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-hash")
        self._pending: deque[Future[None]] = deque()
        self._max_pending = max_pending
        self._seen: set[tuple[int, str]] = set()

    def _digest(self, reader: CheckpointReader, name: str, t: torch.Tensor) -> None:
        self.digests.setdefault(id(reader), {})[name] = (str(t.dtype), tuple(t.shape), tensor_digest(t))

    def add(self, reader: CheckpointReader, name: str, t: torch.Tensor) -> None:
        """Queue one input tensor (a tensor already hashed in an earlier pass is skipped)."""
        if (id(reader), name) in self._seen:
            return
        self._seen.add((id(reader), name))
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._digest, reader, name, t))

    def close(self) -> None:
        """Wait for the queued digests (re-raising a failure) and stop the thread."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abandon(self) -> None:
        """Stop without waiting for queued digests (the run failed)."""
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def result(self, readers: Sequence[CheckpointReader]) -> dict[str, str]:
        self.close()
        out = {}
        for r in readers:
            entries = self.digests.get(id(r), {})
            h = blake3.blake3()
            for name in sorted(entries):
                dtype, shape, digest = entries[name]
                h.update(f"{name}\x00{dtype}\x00{shape}\x00".encode())
                h.update(digest)
            out[r.label] = h.hexdigest()
        return out


class _BufferPool:
    """Reuses the compute-dtype buffers that inputs are converted into, job after job.

    A fresh tensor-sized buffer costs a page fault per 4 KiB on first write, which made the
    bf16 → float32 conversion of the inputs several times slower than the copy itself; layers
    repeat the same shapes, so a buffer released by one job is taken by the next. Only buffers
    up to :data:`READ_AHEAD_CONVERT_LIMIT` entries are kept, at most ``per_size`` per size, and
    the pool is emptied before a larger tensor is read, so it never adds to the peak set by the
    largest tensors. A buffer is only given back when the job's result does not share its
    memory (checked by the caller).
    """

    def __init__(self, per_size: int) -> None:
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._lent: dict[int, torch.Tensor] = {}
        self._per_size = per_size
        self._lock = threading.Lock()

    def convert(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``t`` cast to ``dtype`` in a pooled buffer (a plain ``.to`` when no cast is needed)."""
        if t.dtype == dtype or t.device.type != "cpu":
            return t.to(dtype=dtype)
        key = (t.numel(), dtype)
        with self._lock:
            free = self._free.get(key)
            buf = free.pop() if free else None
        if buf is None:
            buf = torch.empty(t.numel(), dtype=dtype)
        out = buf.view(t.shape).copy_(t)
        with self._lock:
            self._lent[buf.data_ptr()] = buf
        return out

    def give_back(self, tensors: Sequence[torch.Tensor | None], result: torch.Tensor | None) -> None:
        """Return the pooled buffers among ``tensors`` unless ``result`` shares their memory."""
        taken = result.untyped_storage().data_ptr() if result is not None else None
        with self._lock:
            for t in tensors:
                if t is None:
                    continue
                buf = self._lent.pop(t.data_ptr(), None)  # forget it either way: the pool never frees lent buffers
                if buf is None or t.data_ptr() == taken:
                    continue  # not ours, or the result lives in it: leave it to the result
                free = self._free.setdefault((buf.numel(), buf.dtype), [])
                if len(free) < self._per_size:
                    free.append(buf)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


READ_AHEAD_CONVERT_LIMIT = 16 * 2**20
"""Tensors with more elements than this are converted to the compute dtype on the compute thread."""


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN or Inf (one fused min/max pass: far cheaper than isfinite().all())."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


_Aux = list[dict[str, torch.Tensor]] | None


def _read_aux(plan: Plan, job: TensorJob) -> _Aux:
    """Each expert's statistics of ``job`` by kind (None without statistics).

    With vocabulary truncation, statistics shaped like the tensor are cut to the same rows.
    """
    if plan.aux is None or job.kind != "merge":
        return None
    out: list[dict[str, torch.Tensor]] = []
    for r, kinds in zip(plan.aux, plan.aux_keys(job)):
        entry = {}
        for kind, key in kinds.items():
            t = r.read(key)
            if job.rows is not None and t.dim() == len(job.shape) and t.shape[1:] == job.shape[1:] and t.shape[0] > job.rows:
                t = t[: job.rows]
            entry[kind] = t
        out.append(entry)
    return out


def _read_job(
    plan: Plan, job: TensorJob, hasher: _Hasher | None, opts: EngineOptions, convert: bool,
    buffers: _BufferPool | None = None,
) -> tuple[dict[int, torch.Tensor], _Aux]:
    """Read the job's tensor from each distinct input reader; runs on the reader thread.

    Checks each float input for NaN/Inf, and (``convert``) casts merged inputs to the compute
    dtype here, so that this work overlaps the previous job's compute. Large tensors stay in
    their stored dtype until the compute thread takes them, so that the read-ahead never holds
    a second large tensor in the (wider) compute dtype.
    """
    convert = convert and job.numel <= READ_AHEAD_CONVERT_LIMIT
    if buffers is not None and job.numel > READ_AHEAD_CONVERT_LIMIT:
        buffers.clear()  # the largest tensors set the peak: hold nothing else while they are in memory
    out: dict[int, torch.Tensor] = {}
    readers = plan.inputs if (job.kind == "copy" and hasher is not None) else plan.readers_for(job)
    for r in readers:
        if id(r) in out or job.name not in r.tensors():
            continue
        t = r.read(job.name)
        if hasher is not None:
            hasher.add(r, job.name, t)
        if job.kind == "merge":
            if job.rows is not None:
                t = t[: job.rows]
            if opts.check_finite and not all_finite(t):
                raise InputDataError(
                    f"{r.label}: tensor {job.name!r} (file {r.tensors()[job.name].file}) contains NaN or Inf values; "
                    "this checkpoint is broken: re-download or re-train it"
                )
            if convert:
                t = buffers.convert(t, opts.compute_dtype) if buffers is not None else t.to(dtype=opts.compute_dtype)
        out[id(r)] = t
    return out, _read_aux(plan, job)


def _stream(
    plan: Plan,
    jobs: Sequence[TensorJob],
    hasher: _Hasher | None,
    opts: EngineOptions,
    device: torch.device,
    buffers: _BufferPool | None = None,
) -> Iterator[tuple[TensorJob, dict[int, torch.Tensor], _Aux]]:
    """Yield (job, input tensors by reader id, statistics), reading the next job while the caller computes."""
    convert = device.type == "cpu"
    if not opts.prefetch or len(jobs) < 2:
        for job in jobs:
            yield (job, *_read_job(plan, job, hasher, opts, convert, buffers))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-read") as pool:
        future: Future[tuple[dict[int, torch.Tensor], _Aux]] = pool.submit(
            _read_job, plan, jobs[0], hasher, opts, convert, buffers
        )
        for i, job in enumerate(jobs):
            raw, aux = future.result()
            if i + 1 < len(jobs):
                future = pool.submit(_read_job, plan, jobs[i + 1], hasher, opts, convert, buffers)
            yield job, raw, aux
            del raw, aux


class _Prepared:
    """A job's inputs in the compute dtype on the compute device (base, then experts)."""

    def __init__(self, plan: Plan, raw: dict[int, torch.Tensor], opts: EngineOptions, device: torch.device,
                 aux: _Aux = None):
        def convert(r: CheckpointReader) -> torch.Tensor:
            return raw[id(r)].to(device=device, dtype=opts.compute_dtype)

        self.base = convert(plan.base) if plan.base is not None else None
        cache: dict[int, torch.Tensor] = {}
        if plan.base is not None and self.base is not None:
            cache[id(plan.base)] = self.base
        self.experts = []
        for r in plan.experts:
            if id(r) not in cache:
                cache[id(r)] = convert(r)
            self.experts.append(cache[id(r)])
        self.aux = [{k: t.to(device) for k, t in entry.items()} for entry in aux] if aux is not None else []


def _context(plan: Plan, job: TensorJob, opts: EngineOptions, device: torch.device, stats: dict[str, Any],
             prep: _Prepared) -> TensorContext:
    return TensorContext(
        name=job.name, seed=opts.seed, layer=job.layer, num_layers=plan.num_layers, stats=stats, device=device,
        aux=prep.aux,
    )


def _call_method(plan: Plan, job: TensorJob, prep: _Prepared, ctx: TensorContext, parts: PartsSink | None) -> torch.Tensor:
    try:
        with torch.no_grad():
            out = plan.method(prep.base, prep.experts, job.params, job.model_params, ctx)
    except MergelabError:
        raise
    except Exception as exc:
        raise MergelabError(f"{plan.method.name} failed on tensor {job.name!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(out, MethodOutput):
        if parts is not None:
            parts.add(job.name, out.parts)
        out = out.merged
    want = job.shape if job.rows is None else (job.rows, *job.shape[1:])
    if tuple(out.shape) != tuple(want):
        raise MergelabError(
            f"{plan.method.name} returned shape {list(out.shape)} for tensor {job.name!r}, expected {list(want)} "
            "(a method bug: please report it)"
        )
    return out


def execute(
    plan: Plan,
    sink: TensorSink,
    options: EngineOptions | None = None,
    progress: Progress | None = None,
    parts: PartsSink | None = None,
) -> RunStats:
    """Run every gather pass, then merge every job into ``sink`` (per-task parts into ``parts``)."""
    opts = options or EngineOptions()
    prog = progress or _NoProgress()
    device = resolve_device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if plan.method.statistics is not None and plan.aux is None:
        raise MergelabError(
            f"merge_method {plan.method.name} needs per-expert statistics from a data phase: add a `calibration:` "
            "block to the recipe (or pass statistics=...); mergelab.merge runs the data phase before the merge"
        )
    hasher = _Hasher() if opts.hash_inputs else None
    try:
        return _execute(plan, sink, opts, prog, parts, device, hasher)
    except BaseException:
        if hasher is not None:
            hasher.abandon()
        raise


def _execute(
    plan: Plan,
    sink: TensorSink,
    opts: EngineOptions,
    prog: Progress,
    parts: PartsSink | None,
    device: torch.device,
    hasher: _Hasher | None,
) -> RunStats:
    t0 = time.perf_counter()
    run = RunStats()
    stats: dict[str, Any] = {}
    passes = plan.method.passes(plan.global_params)
    merge_jobs = plan.merge_jobs
    n_exp = len(plan.experts)
    pass_bytes = plan.input_bytes(merge_jobs)

    for k, gp in enumerate(passes):
        prog.begin(f"pass {k + 1}/{len(passes) + 1}: {gp.name}", len(merge_jobs), pass_bytes)
        state = gp.init(plan.global_params, n_exp)
        for job, raw, aux in _stream(plan, merge_jobs, hasher if k == 0 else None, opts, device):
            prep = _Prepared(plan, raw, opts, device, aux)
            nbytes = plan.job_input_bytes(job)
            del raw, aux
            with torch.no_grad():
                gp.update(state, prep.base, prep.experts, job.params, job.model_params,
                          _context(plan, job, opts, device, stats, prep))
            run.bytes_read += nbytes
            prog.advance(1, nbytes)
        stats[gp.name] = gp.finish(state, plan.global_params, n_exp)
        prog.end()
    run.passes = len(passes) + 1

    total_in = plan.input_bytes()
    prog.begin("merge" if not passes else f"pass {len(passes) + 1}/{len(passes) + 1}: merge", len(plan.jobs), total_in)
    # Pooled conversion buffers are reused only when nothing but the engine can hold them: not
    # with a parts sink (per-task parts could alias an input).
    buffers = _BufferPool(per_size=len(plan.inputs)) if parts is None else None
    for job, raw, aux in _stream(plan, plan.jobs, hasher, opts, device, buffers):
        nbytes = plan.job_input_bytes(job)
        if job.kind == "copy":
            out = raw[id(plan.reference)]
        else:
            prep = _Prepared(plan, raw, opts, device, aux)
            del raw, aux
            out = _call_method(plan, job, prep, _context(plan, job, opts, device, stats, prep), parts)
            if buffers is not None:
                buffers.give_back([prep.base, *prep.experts], out)
            del prep
            if opts.check_finite and not all_finite(out):
                raise MergelabError(
                    f"{plan.method.name} produced NaN/Inf in tensor {job.name!r}; check the parameters "
                    "(e.g. weights summing to zero with normalize)"
                )
            out = out.to(job.out_dtype)
        sink.add(job.name, out)
        run.bytes_read += nbytes
        run.bytes_written += out.numel() * out.element_size()
        run.tensors += 1
        del out
        prog.advance(1, nbytes)
    prog.end()
    if hasher is not None:
        run.hashes = hasher.result(plan.inputs)
    run.seconds = time.perf_counter() - t0
    run.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return run


class MemorySink:
    """Collects merged tensors in a dict (the in-memory API)."""

    def __init__(self, to_cpu: bool = True) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.to_cpu = to_cpu

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.cpu() if self.to_cpu else tensor

