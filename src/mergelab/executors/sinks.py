"""Sinks: where each artifact of a run goes, one sink class per artifact kind.

* ``hf_checkpoint``: :class:`mergelab.checkpoint.writer.ShardedSafetensorsWriter` (sharded
  safetensors laid out up front and written in place, + index);
* ``masks``: :class:`mergelab.routed.writer.PartsWriter` (the shared model's θ0 and the
  bit-packed per-task masks, + manifest);
* ``peft_adapter``: :class:`mergelab.lora.sink.PeftAdapterSink` (``output: adapter``: merged
  tensors factored per LoRA module into ``adapter_model.safetensors`` + ``adapter_config.json``);
* ``state``: :class:`MemorySink` (tensors kept in a dict: the in-memory API).

``router`` artifacts have no sink yet (the capability that emits them adds its own here). Disk
sinks write inside the run's temporary output folder
(:class:`mergelab.checkpoint.writer.AtomicOutputDir`), which publishes every artifact with one
rename.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.writer import DEFAULT_MAX_SHARD, ShardedSafetensorsWriter
from mergelab.ir import MODEL


class MemorySink:
    """Collects output tensors in a dict (the in-memory API)."""

    def __init__(self, to_cpu: bool = True) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.to_cpu = to_cpu

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor.cpu() if self.to_cpu else tensor


def _masks_sink() -> type:
    from mergelab.routed.writer import PartsWriter

    return PartsWriter


def _adapter_sink() -> type:
    from mergelab.lora.sink import PeftAdapterSink

    return PeftAdapterSink


SINKS: dict[str, Any] = {
    "hf_checkpoint": ShardedSafetensorsWriter,
    "masks": _masks_sink,  # resolved lazily: the routed package imports the checkpoint writer
    "peft_adapter": _adapter_sink,
    "state": MemorySink,
}
"""Artifact kind -> sink class (``masks``, ``peft_adapter``: a function returning it)."""


def open_disk_sinks(plan: Any, folder: Path, max_shard_size: int = DEFAULT_MAX_SHARD) -> dict[str, Any]:
    """One disk sink per artifact of ``plan``'s graph, inside ``folder`` (artifact name -> sink).

    Each sink has ``finish()`` (``finish(stats)`` for masks) and ``abort()``; call
    :func:`finish_sinks` / :func:`abort_sinks`.
    """
    graph = plan.graph
    sinks: dict[str, Any] = {}
    try:
        for name, art in graph.artifacts.items():
            if art.kind == "hf_checkpoint":
                items = [(o.name, o.dtype, o.shape) for o in graph.outputs_of(name)]
                sinks[name] = ShardedSafetensorsWriter(folder / art.folder, items, max_shard_size)
            elif art.kind == "masks":
                sinks[name] = _masks_sink()(folder, plan, max_shard_size)
            elif art.kind == "peft_adapter":
                sinks[name] = _adapter_sink()(folder, graph, name)
            else:
                raise NotImplementedError(f"artifact {name!r}: no disk sink for kind {art.kind!r} yet")
    except BaseException:
        abort_sinks(sinks)
        raise
    return sinks


def finish_sinks(graph: Any, sinks: dict[str, Any], stats: Any) -> None:
    """Complete every sink: the checkpoint first (the masks' storage report reads its size)."""
    order = sorted(sinks, key=lambda n: n != MODEL)
    for name in order:
        if graph.artifacts[name].kind == "masks":
            sinks[name].finish(stats)
        else:
            sinks[name].finish()


def abort_sinks(sinks: dict[str, Any]) -> None:
    for s in sinks.values():
        s.abort()
