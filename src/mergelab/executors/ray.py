"""The Ray executor: a graph's jobs sharded across Ray worker processes (one machine or a cluster).

The driver (the process calling :meth:`RayExecutor.run`) starts ``workers`` actors (on a local
Ray it starts, with ``num_cpus = workers`` and no dashboard, and shuts down afterwards; or on
the cluster at ``address``). Each actor reopens the graph's inputs from their reader specs
(:meth:`~mergelab.checkpoint.reader.CheckpointReader.spec`: the same files, so a cluster needs
shared storage) and runs the streaming executor's own per-pass functions on its shard of the
jobs (contiguous ranges in job order, balanced by bytes read):

* **folds**: each actor folds its shard; the driver combines the states in job order with
  ``Fold.combine`` and finishes them, then hands the statistic to every actor for the next
  pass. A fold without ``combine`` runs on the driver instead (same result, not parallel).
* **merge**: a checkpoint sink (:class:`~mergelab.checkpoint.writer.ShardedSafetensorsWriter`)
  is laid out and its files created by the driver; every actor writes its tensors in place at
  their planned offsets (:class:`~mergelab.checkpoint.writer.ShardLayout`). With at least as
  many shards as workers, each worker gets whole shards (its own shard files). Other sinks (the
  in-memory sink, the masks writer) receive the actors' results on the driver, in job order.
  The driver then finishes the sinks (index, manifest), and the caller writes the model card
  and side files and publishes the output folder with its one rename.

Tensors are bit-identical to the streaming executor: every job runs the same code on the same
inputs, random methods seed per (seed, tensor name), folds combine in job order, and actors use
the driver's torch thread count. Ray is imported only when this executor runs.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergelab.checkpoint.writer import ShardedSafetensorsWriter
from mergelab.errors import MergelabError, OptionError
from mergelab.executors.base import (
    ExecutorOptions,
    NoProgress,
    Progress,
    RunStats,
    as_graph,
    check_statistics,
    resolve_device,
    thread_limit,
)
from mergelab.executors.streaming import InputHasher, fold_jobs, input_hashes, merge_jobs
from mergelab.ir import MODEL, Graph, Job

DEFAULT_WORKERS = 2


LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_worker_niceness": "0"}
"""Set before Ray is imported (unless already set), a local Ray (no --ray-address) binds every
service to the loopback address instead of the machine's network address (Ray reads this flag
once, at import), and runs its workers at the caller's priority: Ray's default lowers them to
nice 15, so a merge or search beside any other busy process got almost no CPU (measured: a
search trial at 4 % of a core beside two single-threaded jobs on 2 cores)."""


def _import_ray(local: bool = False) -> Any:
    if local:
        for k, v in LOCAL_RAY_ENV.items():
            os.environ.setdefault(k, v)
    try:
        import ray
    except ImportError as exc:
        raise OptionError("the ray executor needs Ray: pip install 'mergelab[ray]'") from exc
    return ray


def partition(weights: Sequence[int], parts: int) -> list[range]:
    """Split indices ``0..len(weights)`` into at most ``parts`` contiguous, non-empty ranges of similar total weight."""
    n = len(weights)
    if n == 0:
        return []
    parts = max(1, min(parts, n))
    w = [max(int(x), 1) for x in weights]
    total = sum(w)
    out: list[range] = []
    start, acc = 0, 0
    for i, x in enumerate(w):
        acc += x
        opened = len(out)
        if opened < parts - 1 and acc >= total * (opened + 1) / parts and n - (i + 1) >= parts - 1 - opened:
            out.append(range(start, i + 1))
            start = i + 1
    out.append(range(start, n))
    return out


@dataclasses.dataclass
class _Payload:
    """What an actor needs to rebuild the graph: the graph without open readers, plus reader specs."""

    graph: Graph
    method: Any  # a registered method's name, or the method itself (pickled by value)
    specs: dict[str, Any]
    aux_specs: list[Any] | None


def _payload(graph: Graph) -> _Payload:
    from mergelab.methods.registry import get_method

    try:
        method: Any = graph.method.name if get_method(graph.method.name) is graph.method else graph.method
    except MergelabError:
        method = graph.method
    specs = {sid: r.spec() for sid, r in graph.sources.items()}
    aux_specs = [r.spec() for r in graph.aux] if graph.aux is not None else None
    bare = dataclasses.replace(graph, sources={}, aux=None)
    bare.method = None  # type: ignore[assignment]  # sent apart: by name when registered
    return _Payload(bare, method, specs, aux_specs)


def _rebuild(p: _Payload) -> Graph:
    from mergelab.methods.registry import get_method

    method = get_method(p.method) if isinstance(p.method, str) else p.method
    sources = {sid: spec.open() for sid, spec in p.specs.items()}
    aux = [s.open() for s in p.aux_specs] if p.aux_specs is not None else None
    return dataclasses.replace(p.graph, sources=sources, method=method, aux=aux)


class _Collect:
    """A sink that keeps what it receives, in order, to hand back to the driver."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Any]] = []

    def add(self, name: str, value: Any) -> None:
        self.items.append((name, value.cpu() if isinstance(value, torch.Tensor) else value))


class _Worker:
    """One actor: the graph reopened from specs, running passes over shards of its jobs.

    An actor outlives one run when the Ray session does (see :func:`_actors`): :meth:`load`
    opens a run's graph, :meth:`close` closes its readers.
    """

    def __init__(self) -> None:
        self.graph: Graph | None = None

    def load(self, payload: _Payload, opts: ExecutorOptions) -> None:
        self.close()
        self.graph = _rebuild(payload)
        self.opts = opts
        self.device = resolve_device(opts.device)

    def fold(self, k: int, job_index: Sequence[int], stats: Mapping[str, Any]) -> tuple[Any, int]:
        g = self.graph
        assert g is not None, "load() first"
        fold = g.folds[k]
        run = RunStats()
        jobs = [g.jobs[i] for i in job_index]
        with thread_limit(self.opts.threads), torch.no_grad():
            state = fold_jobs(g, fold, jobs, stats, self.opts, self.device, None, None, run)
        return state, run.bytes_read

    def merge(
        self, job_index: Sequence[int], stats: Mapping[str, Any], layouts: Mapping[str, Any], collect: Sequence[str]
    ) -> dict[str, Any]:
        g = self.graph
        assert g is not None, "load() first"
        sinks: dict[str, Any] = dict(layouts)
        collectors = {name: _Collect() for name in collect}
        sinks.update(collectors)
        hasher = InputHasher() if self.opts.hash_inputs else None
        run = RunStats()
        jobs = [g.jobs[i] for i in job_index]
        try:
            with thread_limit(self.opts.threads), torch.no_grad():
                merge_jobs(g, jobs, sinks, stats, self.opts, self.device, run, hasher)
            if hasher is not None:
                hasher.close()
        except BaseException:
            if hasher is not None:
                hasher.abandon()
            raise
        finally:
            for lay in layouts.values():
                lay.close()
        return {
            "run": run,
            "digests": hasher.digests if hasher is not None else {},
            "written": {name: lay.written for name, lay in layouts.items()},
            "collected": {name: c.items for name, c in collectors.items()},
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }

    def close(self) -> None:
        if self.graph is not None:
            for r in list(self.graph.sources.values()) + list(self.graph.aux or []):
                r.close()
        self.graph = None


_POOL: dict[str, Any] = {"job": None, "actors": []}
"""Actors kept for the next run while the Ray session that holds them lives (a worker process
costs seconds to start: importing torch); a Ray this executor started is shut down instead."""


def _actors(ray: Any, n: int, keep: bool) -> list[Any]:
    actor_cls = ray.remote(num_cpus=1)(_Worker)
    if not keep:
        return [actor_cls.remote() for _ in range(n)]
    job = ray.get_runtime_context().get_job_id()
    if _POOL["job"] != job:
        _POOL.update(job=job, actors=[])
    pool: list[Any] = _POOL["actors"]
    while len(pool) < n:
        pool.append(actor_cls.remote())
    return pool[:n]


def _drop_pool(ray: Any) -> None:
    for a in _POOL["actors"]:
        ray.kill(a)
    _POOL.update(job=None, actors=[])


class RayExecutor:
    """Jobs sharded across Ray actors; folds combined on the driver; shards written by the workers."""

    name = "ray"

    def run(
        self,
        graph: Any,
        sinks: Mapping[str, Any],
        options: ExecutorOptions | None = None,
        progress: Progress | None = None,
    ) -> RunStats:
        g = as_graph(graph)
        opts = options or ExecutorOptions()
        prog = progress or NoProgress()
        check_statistics(g)
        resolve_device(opts.device)  # fail on a bad device before starting anything
        ray = _import_ray(local=opts.address is None)
        n_workers = opts.workers or DEFAULT_WORKERS
        if n_workers < 1:
            raise OptionError(f"--workers must be at least 1, got {n_workers}")
        started = False
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if opts.address is None:
                # a local Ray of this run only: every service on the loopback interface
                kwargs["num_cpus"] = n_workers
            try:
                ray.init(address=opts.address, **kwargs)
            except Exception as exc:  # connection and start-up errors of several types
                where = f"the Ray cluster at {opts.address}" if opts.address else "a local Ray"
                raise OptionError(f"cannot start or reach {where} ({type(exc).__name__}: {exc})") from exc
            started = True
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < n_workers:
            if started:
                ray.shutdown()
            raise OptionError(f"--workers {n_workers}: the Ray cluster has {cpus:g} CPUs; use at most that many")
        try:
            # workers compute with the driver's thread count, so reductions split the same way
            wopts = dataclasses.replace(opts, threads=opts.threads or torch.get_num_threads())
            return _run(ray, g, sinks, wopts, prog, n_workers, keep=not started)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from None
            raise
        finally:
            if started:
                ray.shutdown()


def _run(
    ray: Any, g: Graph, sinks: Mapping[str, Any], opts: ExecutorOptions, prog: Progress, n_workers: int, keep: bool
) -> RunStats:
    t0 = time.perf_counter()
    run = RunStats()
    payload = ray.put(_payload(g))
    actors = _actors(ray, n_workers, keep)
    ok = False
    try:
        ray.get([a.load.remote(payload, opts) for a in actors])
        stats = _folds(ray, g, actors, opts, prog, run)
        _merge(ray, g, actors, sinks, stats, opts, prog, run)
        ray.get([a.close.remote() for a in actors])
        ok = True
    finally:
        if not keep:
            for a in actors:
                ray.kill(a)
        elif not ok:  # a failed run may leave an actor mid-job: start afresh next time
            _drop_pool(ray)
    run.seconds = time.perf_counter() - t0
    run.peak_rss_bytes = max(run.peak_rss_bytes, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return run


def _folds(
    ray: Any, g: Graph, actors: list[Any], opts: ExecutorOptions, prog: Progress, run: RunStats
) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    folds = g.folds
    merge_index = [i for i, j in enumerate(g.jobs) if j.kind == "merge"]
    ranges = partition([g.job_input_bytes(g.jobs[i]) for i in merge_index], len(actors))
    pass_bytes = g.input_bytes([g.jobs[i] for i in merge_index])
    device = resolve_device(opts.device)
    for k, fold in enumerate(folds):
        prog.begin(f"pass {k + 1}/{len(folds) + 1}: {fold.name}", len(merge_index), pass_bytes)
        if fold.combine is None or len(ranges) < 2:
            with thread_limit(opts.threads), torch.no_grad():
                state = fold_jobs(g, fold, [g.jobs[i] for i in merge_index], stats, opts, device, None, prog, run)
        else:
            futures = [a.fold.remote(k, [merge_index[i] for i in r], stats) for a, r in zip(actors, ranges)]
            results = ray.get(futures)  # in job order: combine left to right
            state = results[0][0]
            for other, _ in results[1:]:
                state = fold.combine(state, other)
            for (_, nbytes), r in zip(results, ranges):
                run.bytes_read += nbytes
                prog.advance(len(r), nbytes)
        stats[fold.name] = fold.finish(state, g.global_params, len(g.experts))
        prog.end()
    run.passes = len(folds) + 1
    return stats


def _merge_ranges(g: Graph, sinks: Mapping[str, Any], n: int) -> list[range]:
    """Contiguous job ranges for the merge pass, one per actor.

    When the checkpoint has at least ``n`` shards, ranges follow shard boundaries, so every
    shard file is written by one worker; otherwise jobs are split by bytes (workers then write
    disjoint tensors of the same file).
    """
    jobs = g.jobs
    weights = [g.job_input_bytes(j) for j in jobs]
    writer = sinks.get(MODEL)
    if isinstance(writer, ShardedSafetensorsWriter) and len(writer.shards) >= n:
        shard_of = {name: k for k, shard in enumerate(writer.shards) for name in shard.names}
        # consecutive jobs of one shard (the writer groups tensors in job order)
        groups: list[range] = []
        start = 0
        for i in range(1, len(jobs) + 1):
            if i == len(jobs) or shard_of.get(jobs[i].name) != shard_of.get(jobs[start].name):
                groups.append(range(start, i))
                start = i
        if len(groups) >= n:
            cut = partition([sum(weights[k] for k in grp) for grp in groups], n)
            return [range(groups[c.start].start, groups[c.stop - 1].stop) for c in cut]
    return partition(weights, n)


def _merge(
    ray: Any,
    g: Graph,
    actors: list[Any],
    sinks: Mapping[str, Any],
    stats: Mapping[str, Any],
    opts: ExecutorOptions,
    prog: Progress,
    run: RunStats,
) -> None:
    layouts: dict[str, Any] = {}
    collect: list[str] = []
    for name, sink in sinks.items():
        if isinstance(sink, ShardedSafetensorsWriter):
            sink.prepare_files()
            layouts[name] = sink.layout()
        else:
            collect.append(name)
    jobs: list[Job] = g.jobs
    ranges = _merge_ranges(g, sinks, len(actors))
    prog.begin(
        "merge" if not g.folds else f"pass {len(g.folds) + 1}/{len(g.folds) + 1}: merge", len(jobs), g.input_bytes()
    )
    futures = [a.merge.remote(list(r), stats, layouts, collect) for a, r in zip(actors, ranges)]
    pending = {f: i for i, f in enumerate(futures)}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        prog.advance(len(ranges[i]), sum(g.job_input_bytes(jobs[k]) for k in ranges[i]))
    results = ray.get(futures)
    prog.end()
    digests: dict[str, dict[str, Any]] = {}
    for res in results:  # in job order
        wr: RunStats = res["run"]
        run.bytes_read += wr.bytes_read
        run.bytes_written += wr.bytes_written
        run.tensors += wr.tensors
        run.peak_rss_bytes = max(run.peak_rss_bytes, res["peak_rss"])
        for src, entries in res["digests"].items():
            digests.setdefault(src, {}).update(entries)
        for name, written in res["written"].items():
            sinks[name].mark_written(written)
        for name, items in res["collected"].items():
            for tensor_name, value in items:
                sinks[name].add(tensor_name, value)
    if opts.hash_inputs:
        run.hashes = input_hashes(g, digests)


__all__ = ["DEFAULT_WORKERS", "RayExecutor", "partition"]
