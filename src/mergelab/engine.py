"""Former home of the merge loop; kept as a thin re-export for code written against it.

The loop is :mod:`mergelab.executors.streaming`; the protocol, options and statistics are in
:mod:`mergelab.executors.base`; sinks in :mod:`mergelab.executors.sinks`.
"""

from __future__ import annotations

from typing import Any

from mergelab.executors.base import ExecutorOptions, PartsSink, Progress, RunStats, TensorSink, resolve_device
from mergelab.executors.sinks import MemorySink
from mergelab.executors.streaming import READ_AHEAD_CONVERT_LIMIT, StreamingExecutor, _BufferPool, all_finite
from mergelab.ir import MASKS, MODEL

EngineOptions = ExecutorOptions

__all__ = [
    "READ_AHEAD_CONVERT_LIMIT",
    "EngineOptions",
    "MemorySink",
    "PartsSink",
    "Progress",
    "RunStats",
    "TensorSink",
    "_BufferPool",
    "all_finite",
    "execute",
    "resolve_device",
]


def execute(
    plan: Any,
    sink: TensorSink,
    options: ExecutorOptions | None = None,
    progress: Progress | None = None,
    parts: PartsSink | None = None,
) -> RunStats:
    """Run ``plan`` with the streaming executor: tensors into ``sink``, per-task parts into ``parts``."""
    sinks: dict[str, Any] = {MODEL: sink}
    if parts is not None:
        sinks[MASKS] = parts
    return StreamingExecutor().run(plan, sinks, options, progress)
