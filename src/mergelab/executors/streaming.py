"""The streaming executor: runs a graph job by job in one process, with bounded memory.

For each job it reads the job's input tensors (the next job's reads overlap the current job's
compute, on a reader thread; each job's reads keep several positional reads in flight, and the
job after it is hinted to the kernel: :class:`_TensorReads`), casts to the compute dtype on the
compute device, checks for NaN/Inf, calls the method, casts the result to the output dtype and
hands it to the sink of the output's artifact, then drops every reference. Peak memory is a
function of the largest job, never of model size: the job in compute and the job being read
(:func:`_stream` states the bound). Each fold (model-wide statistic) costs one extra read over the
merged tensors, before the merge. Data-informed methods also get, per merged tensor, each
expert's statistics from the graph's ``aux`` readers (read on the same reader thread, moved to
the compute device, dtype unchanged) as ``ctx.statistics``; the data phase that writes them runs
before (``mergelab.informed``).

:func:`fold_jobs` and :func:`merge_jobs` run one pass over any subset of the jobs; the Ray
executor's workers run the same functions on their shards.
"""

from __future__ import annotations

import functools
import resource
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from mergelab.checkpoint.reader import CheckpointReader, content_hash, tensor_digest
from mergelab.errors import InputDataError, InternalError, MergelabError, ParameterError
from mergelab.executors.base import (
    ExecutorOptions,
    NoProgress,
    PartsSink,
    Progress,
    RunStats,
    as_graph,
    cast_output,
    check_copy,
    check_read_workers,
    check_statistics,
    resolve_device,
    thread_limit,
)
from mergelab.ir import Copy, Graph, Init, Job, MethodCall, TensorRef
from mergelab.methods.base import Fold, MethodOutput, TensorContext, tensor_seed

Digests = dict[str, dict[str, tuple[str, tuple[int, ...], bytes]]]  # source id -> tensor -> (dtype, shape, digest)


class InputHasher:
    """Content hashes of every input, computed on a thread of their own as tensors are read.

    Hashing (BLAKE3, which releases the GIL) overlaps both reading and merging; at most
    ``max_pending`` tensors wait to be hashed, so it cannot hold more than that in memory. A tensor
    is hashed after it is handed on, so methods never modify their inputs in place; tensors of the
    sources in ``skip`` are not hashed (a caller that owns them may).
    """

    def __init__(self, max_pending: int = 8, skip: tuple[str, ...] = ()) -> None:
        self.digests: Digests = {}
        self._skip = frozenset(skip)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-hash")
        self._pending: deque[Future[None]] = deque()
        self._max_pending = max_pending
        self._seen: set[tuple[str, str]] = set()

    def _digest(self, source: str, name: str, t: torch.Tensor) -> None:
        self.digests.setdefault(source, {})[name] = (str(t.dtype), tuple(t.shape), tensor_digest(t))

    def add(self, source: str, name: str, t: torch.Tensor) -> None:
        """Queue one input tensor (a tensor already hashed in an earlier pass is skipped)."""
        if (source, name) in self._seen or source in self._skip:
            return
        self._seen.add((source, name))
        while len(self._pending) >= self._max_pending:
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._digest, source, name, t))

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

    def result(self, graph: Graph) -> dict[str, str]:
        self.close()
        return input_hashes(graph, self.digests)


def input_hashes(graph: Graph, digests: Digests) -> dict[str, str]:
    """One BLAKE3 per merged input (by label) from its tensors' digests, in name order."""
    return {graph.sources[s].label: content_hash(digests.get(s, {})) for s in graph.input_sources}


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
_Raw = dict[TensorRef, torch.Tensor]


def _read_aux(graph: Graph, job: Job) -> _Aux:
    """Each expert's statistics of ``job`` by kind (None without statistics).

    With vocabulary truncation, statistics shaped like the tensor are cut to the same rows.
    """
    if graph.aux is None or job.kind != "merge":
        return None
    out: list[dict[str, torch.Tensor]] = []
    for r, kinds in zip(graph.aux, graph.aux_keys(job)):
        entry = {}
        for kind, key in kinds.items():
            t = r.read(key)
            if (
                job.rows is not None
                and t.dim() == len(job.shape)
                and t.shape[1:] == job.shape[1:]
                and t.shape[0] > job.rows
            ):
                t = t[: job.rows]
            entry[kind] = t
        out.append(entry)
    return out


def _job_refs(graph: Graph, job: Job, hashing: bool) -> list[TensorRef]:
    """The distinct input tensors ``job`` reads, in order (references to tensors a source lacks left out).

    A copied tensor is also read from each tensor it is checked against, and (``hashing``) from
    every merged input that has it, so that the content hashes cover the whole input.
    """
    refs: Sequence[TensorRef] = job.inputs
    if isinstance(job.op, Copy):
        refs = (*job.inputs, *job.op.verify)
        if hashing:
            refs = (*refs, *(graph.names.ref(s, job.name) for s in graph.input_sources))
    sources = graph.sources
    return [ref for ref in dict.fromkeys(refs) if ref.name in sources[ref.source].tensors()]


READ_PART_BYTES = 16 * 2**20
"""Largest single positional read when reads are pipelined: a larger tensor is read as several
ranges at once, so that one large tensor (an embedding) alone keeps several requests in flight."""


class _TensorReads:
    """Reads input tensors with up to ``workers`` positional reads in flight.

    :meth:`start` queues every read of one tensor on a pool of ``workers`` threads (a tensor of a
    reader with ``read_parts``, i.e. safetensors files, as ranges of at most
    :data:`READ_PART_BYTES`) and returns a function that waits for them and gives the tensor.
    ``preadv`` releases the GIL, so the reads overlap each other, the checks and conversions of
    the tensors already read, and compute. Tensors of other readers (``.bin`` files, adapters,
    state dicts) are read by the waiting thread when waited for, as they always were.
    :meth:`will_need` queues read-ahead hints to the kernel (``posix_fadvise`` WILLNEED, run on
    the pool because the kernel may block while it queues the I/O): they fill the page cache,
    never this process's memory.

    ``workers`` = 1: no pool and no hints; every tensor is read in one positional read by the
    thread that waits for it (one read in flight: the engine before read pipelining).
    """

    def __init__(self, workers: int) -> None:
        check_read_workers(workers)
        self._pool = (
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergelab-pread") if workers > 1 else None
        )

    def start(self, reader: CheckpointReader, name: str) -> Callable[[], torch.Tensor]:
        """Queue the reads of ``reader``'s tensor ``name``; the function returned waits and gives the tensor."""
        pool = self._pool
        read_parts = getattr(reader, "read_parts", None)
        if pool is None or read_parts is None:
            return functools.partial(reader.read, name)
        tensor, parts = read_parts(name, READ_PART_BYTES)
        pending = [pool.submit(part) for part in parts]

        def wait() -> torch.Tensor:
            for future in pending:
                future.result()  # re-raises a read's error (a truncated file, named)
            return tensor

        return wait

    def will_need(self, graph: Graph, job: Job, hashing: bool) -> None:
        """Hint the kernel to read ``job``'s input tensors into the page cache (pipelined reads only)."""
        if self._pool is None:
            return
        for ref in _job_refs(graph, job, hashing):
            hint = getattr(graph.sources[ref.source], "will_need", None)
            if hint is not None:
                self._pool.submit(hint, ref.name)

    def close(self) -> None:
        """Cancel the reads not started, wait for those running (their buffers are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _read_job(
    graph: Graph,
    job: Job,
    hasher: InputHasher | None,
    opts: ExecutorOptions,
    convert: bool,
    reads: _TensorReads,
    buffers: _BufferPool | None = None,
    after: Job | None = None,
) -> tuple[_Raw, _Aux]:
    """Read the job's input tensors (each distinct one once); runs on the reader thread.

    Every read of the job is queued on ``reads`` at once (then the read-ahead hints of ``after``,
    the job read next); the tensors are then taken in order, each as soon as its reads are done:
    handed to the hasher, checked for NaN/Inf when merged, and (``convert``) cast to the compute
    dtype here, so that this work overlaps the remaining reads and the previous job's compute.
    Large tensors stay in their stored dtype until the compute thread takes them, so that the
    read-ahead never holds a second large tensor in the (wider) compute dtype. A copied tensor is
    also read (and hashed) from every merged input that has it (:func:`_job_refs`).
    """
    convert = convert and job.numel <= READ_AHEAD_CONVERT_LIMIT
    if buffers is not None and job.numel > READ_AHEAD_CONVERT_LIMIT:
        buffers.clear()  # the largest tensors set the peak: hold nothing else while they are in memory
    sources = graph.sources
    queued = [(ref, reads.start(sources[ref.source], ref.name)) for ref in _job_refs(graph, job, hasher is not None)]
    if after is not None:
        reads.will_need(graph, after, hasher is not None)
    merge = isinstance(job.op, MethodCall)
    out: _Raw = {}
    for ref, wait in queued:
        r = sources[ref.source]
        t = wait()
        if hasher is not None:
            hasher.add(ref.source, ref.name, t)
        if merge:
            if job.rows is not None:
                t = t[: job.rows]
            if opts.check_finite and not all_finite(t):
                raise InputDataError(
                    f"{r.label}: tensor {ref.name!r} (file {r.tensors()[ref.name].file}) contains NaN or Inf values; "
                    "this checkpoint is broken: re-download or re-train it"
                )
            if convert:
                t = buffers.convert(t, opts.compute_dtype) if buffers is not None else t.to(dtype=opts.compute_dtype)
        out[ref] = t
    return out, _read_aux(graph, job)


def _stream(
    graph: Graph,
    jobs: Sequence[Job],
    hasher: InputHasher | None,
    opts: ExecutorOptions,
    device: torch.device,
    buffers: _BufferPool | None = None,
) -> Iterator[tuple[Job, _Raw, _Aux]]:
    """Yield (job, input tensors by reference, statistics), reading the next job while the caller computes.

    Reads are pipelined (``opts.read_workers`` > 1, see :class:`_TensorReads`): a job's tensors
    are read with several positional reads in flight, and the job after it is hinted to the
    kernel meanwhile. Memory stays bounded by the tensors in flight: the job the caller holds,
    the job being read (each of its tensors in the stored dtype and, up to
    :data:`READ_AHEAD_CONVERT_LIMIT` entries, in the compute dtype too: every read of a job is
    queued at once, so its stored-dtype buffers all exist before the first is converted), and
    the hasher's at most ``max_pending`` tensors; the hinted job is in the page cache, not in
    this process.
    """
    convert = device.type == "cpu"
    reads = _TensorReads(opts.read_workers)

    def read(k: int) -> tuple[_Raw, _Aux]:
        after = jobs[k + 1] if k + 1 < len(jobs) else None
        return _read_job(graph, jobs[k], hasher, opts, convert, reads, buffers, after)

    try:
        if not opts.prefetch or len(jobs) < 2:
            for k, job in enumerate(jobs):
                yield (job, *read(k))
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-read") as pool:
            future: Future[tuple[_Raw, _Aux]] = pool.submit(read, 0)
            for i, job in enumerate(jobs):
                raw, aux = future.result()
                if i + 1 < len(jobs):
                    future = pool.submit(read, i + 1)
                yield job, raw, aux
                del raw, aux
    finally:
        reads.close()


class _Prepared:
    """A job's inputs in the compute dtype on the compute device (base, then experts)."""

    def __init__(self, job: Job, raw: _Raw, opts: ExecutorOptions, device: torch.device, aux: _Aux = None):
        cache: dict[TensorRef, torch.Tensor] = {}

        def convert(ref: TensorRef) -> torch.Tensor:
            t = cache.get(ref)
            if t is None:
                t = cache[ref] = raw[ref].to(device=device, dtype=opts.compute_dtype)
            return t

        refs = job.inputs
        has_base = isinstance(job.op, MethodCall) and job.op.base
        self.base = convert(refs[0]) if has_base else None
        self.experts = [convert(r) for r in (refs[1:] if has_base else refs)]
        vocab = job.vocab
        if vocab is not None:  # tokenizer_source: every input's rows in the output vocabulary's order
            aligned = vocab.apply(([self.base] if self.base is not None else []) + self.experts)
            self.base = aligned[0] if self.base is not None else None
            self.experts = aligned[1:] if self.base is not None else aligned
        self.aux = [{k: t.to(device) for k, t in entry.items()} for entry in aux] if aux is not None else []


def _context(
    graph: Graph, job: Job, opts: ExecutorOptions, device: torch.device, stats: Mapping[str, Any], prep: _Prepared
) -> TensorContext:
    return TensorContext(
        name=job.name,
        seed=opts.seed,
        layer=job.layer,
        num_layers=graph.num_layers,
        folds=stats,
        device=device,
        statistics=prep.aux,
    )


def _call_method(graph: Graph, job: Job, prep: _Prepared, ctx: TensorContext, parts: PartsSink | None) -> torch.Tensor:
    method = graph.method
    params = job.params
    assert params is not None  # only MethodCall jobs reach here (Copy and Init are handled before)
    try:
        with torch.no_grad():
            out = method(prep.base, prep.experts, params, job.model_params, ctx)
    except MergelabError:
        raise
    except Exception as exc:
        raise InternalError(f"{method.name} failed on tensor {job.name!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(out, MethodOutput):
        if parts is not None:
            parts.add(job.name, out.parts)
        out = out.merged
    want = job.shape if job.rows is None else (job.rows, *job.shape[1:])
    if tuple(out.shape) != tuple(want):
        raise InternalError(
            f"{method.name} returned shape {list(out.shape)} for tensor {job.name!r}, expected {list(want)} "
            "(a method bug: please report it)"
        )
    return out


def _init_tensor(job: Job, opts: ExecutorOptions, device: torch.device) -> torch.Tensor:
    """The tensor of an :class:`~mergelab.ir.Init` job (seeded per (seed, output name))."""
    op = job.op
    assert isinstance(op, Init)
    if op.fill == "zeros":
        return torch.zeros(job.shape, dtype=job.out_dtype)
    if op.fill == "given":
        if op.value is None or tuple(op.value.shape) != tuple(job.shape):
            raise InternalError(f"internal error: Init job {job.name!r} has no value of shape {list(job.shape)}")
        return op.value.to(job.out_dtype)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(tensor_seed(opts.seed, job.name))
    return (torch.randn(job.shape, generator=gen, dtype=torch.float32) * op.std).to(job.out_dtype)


def fold_jobs(
    graph: Graph,
    fold: Fold,
    jobs: Sequence[Job],
    stats: Mapping[str, Any],
    opts: ExecutorOptions,
    device: torch.device,
    hasher: InputHasher | None = None,
    progress: Progress | None = None,
    run: RunStats | None = None,
) -> Any:
    """Fold ``jobs`` (merged tensors) into a fresh state of ``fold``; returns the state (not finished)."""
    state = fold.init(graph.global_params, len(graph.experts))
    for job, raw, aux in _stream(graph, jobs, hasher, opts, device):
        prep = _Prepared(job, raw, opts, device, aux)
        nbytes = graph.job_input_bytes(job)
        del raw, aux
        with torch.no_grad():
            fold.update(
                state,
                prep.base,
                prep.experts,
                job.params,
                job.model_params,
                _context(graph, job, opts, device, stats, prep),
            )
        if run is not None:
            run.bytes_read += nbytes
        if progress is not None:
            progress.advance(1, nbytes)
    return state


def merge_jobs(
    graph: Graph,
    jobs: Sequence[Job],
    sinks: Mapping[str, Any],
    stats: Mapping[str, Any],
    opts: ExecutorOptions,
    device: torch.device,
    run: RunStats,
    hasher: InputHasher | None = None,
    progress: Progress | None = None,
) -> None:
    """Run ``jobs`` (the merge pass) into ``sinks``: artifact name -> sink; updates ``run``."""
    prog = progress or NoProgress()
    parts_artifacts = {o.artifact for j in jobs for o in j.outputs[1:]}
    # Pooled conversion buffers are reused only when nothing but the executor can hold them: not
    # with a parts sink (per-task parts could alias an input).
    buffers = _BufferPool(per_size=len(graph.input_sources)) if not parts_artifacts & set(sinks) else None
    method_name = graph.method.name
    for job, raw, aux in _stream(graph, jobs, hasher, opts, device, buffers):
        nbytes = graph.job_input_bytes(job)
        op = job.op
        if isinstance(op, Copy):
            out = raw[job.inputs[0]]
            check_copy(graph, job, op, out, raw)
        elif isinstance(op, Init):
            out = _init_tensor(job, opts, device)
        else:
            prep = _Prepared(job, raw, opts, device, aux)
            del raw, aux
            parts = sinks.get(job.outputs[1].artifact) if len(job.outputs) > 1 else None
            out = _call_method(graph, job, prep, _context(graph, job, opts, device, stats, prep), parts)
            if buffers is not None:
                buffers.give_back([prep.base, *prep.experts], out)
            del prep
            if opts.check_finite and not all_finite(out):
                raise ParameterError(
                    f"{method_name} produced NaN/Inf in tensor {job.name!r}; check the parameters "
                    "(e.g. weights summing to zero with normalize)"
                )
            out = cast_output(out, job.out_dtype, job.name)
        sink = sinks.get(job.outputs[0].artifact)
        if sink is not None:
            sink.add(job.name, out)
        run.bytes_read += nbytes
        run.bytes_written += out.numel() * out.element_size()
        run.tensors += 1
        del out
        prog.advance(1, nbytes)


class StreamingExecutor:
    """Today's engine: one process, one tensor at a time, reads overlapped with compute."""

    name = "streaming"

    def run(
        self,
        graph: Any,
        sinks: Mapping[str, Any],
        options: ExecutorOptions | None = None,
        progress: Progress | None = None,
    ) -> RunStats:
        """Run every fold, then merge every job into the sink of its artifact."""
        g = as_graph(graph)
        opts = options or ExecutorOptions()
        prog = progress or NoProgress()
        device = resolve_device(opts.device)
        check_statistics(g)
        hasher = InputHasher() if opts.hash_inputs else None
        try:
            with thread_limit(opts.threads):
                return _execute(g, sinks, opts, prog, device, hasher)
        except BaseException:
            if hasher is not None:
                hasher.abandon()
            raise


def _execute(
    graph: Graph,
    sinks: Mapping[str, Any],
    opts: ExecutorOptions,
    prog: Progress,
    device: torch.device,
    hasher: InputHasher | None,
) -> RunStats:
    t0 = time.perf_counter()
    run = RunStats()
    stats: dict[str, Any] = {}
    folds = graph.folds
    to_fold = graph.merge_jobs
    n_exp = len(graph.experts)
    pass_bytes = graph.input_bytes(to_fold)

    for k, fold in enumerate(folds):
        prog.begin(f"pass {k + 1}/{len(folds) + 1}: {fold.name}", len(to_fold), pass_bytes)
        state = fold_jobs(graph, fold, to_fold, stats, opts, device, hasher if k == 0 else None, prog, run)
        stats[fold.name] = fold.finish(state, graph.global_params, n_exp)
        prog.end()
    run.passes = len(folds) + 1

    total_in = graph.input_bytes()
    prog.begin("merge" if not folds else f"pass {len(folds) + 1}/{len(folds) + 1}: merge", len(graph.jobs), total_in)
    merge_jobs(graph, graph.jobs, sinks, stats, opts, device, run, hasher, prog)
    prog.end()
    if hasher is not None:
        run.hashes = hasher.result(graph)
    run.seconds = time.perf_counter() - t0
    run.peak_rss_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return run
