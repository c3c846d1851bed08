"""Executors: run a job graph (:mod:`mergelab.ir`) into one sink per artifact.

``streaming`` (the default: one process, bounded memory), ``memory`` (a resident session for
parameter searches) and ``ray`` (jobs sharded across Ray workers) behind one protocol
(:class:`~mergelab.executors.base.Executor`); :func:`get_executor` imports them lazily.
"""

from mergelab.executors.base import (
    Executor,
    ExecutorOptions,
    NoProgress,
    Progress,
    RunStats,
    get_executor,
    resolve_device,
    thread_limit,
)
from mergelab.executors.sinks import SINKS, MemorySink

__all__ = [
    "SINKS",
    "Executor",
    "ExecutorOptions",
    "MemorySink",
    "NoProgress",
    "Progress",
    "RunStats",
    "get_executor",
    "resolve_device",
    "thread_limit",
]
