"""Shared model + per-task parts: the output format of TALL masks and EMR, and ``extract``.

A method registered with ``outputs="routed"`` returns, per tensor, the shared tensor (the
checkpoint the engine writes) and per-task parts. :func:`open_parts_writer` is the sink
``mergelab.api.merge`` hands those parts to; it writes ``OUT/routed/`` (θ0, bit-packed masks,
a JSON manifest with the per-task scales and a storage report). :func:`extract` rebuilds one
task's model as a plain Hugging Face checkpoint. The layout is documented in
:mod:`mergelab.routed.format`.
"""

from mergelab.routed.extract import (
    ExtractResult,
    extract,
    iter_task_tensors,
    reconstruct,
    task_state_dict,
)
from mergelab.routed.format import (
    FORMAT,
    FORMAT_VERSION,
    format_storage,
    is_routed,
    pack_mask,
    read_manifest,
    unpack_mask,
)
from mergelab.routed.writer import PartsWriter, open_parts_writer

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ExtractResult",
    "PartsWriter",
    "extract",
    "format_storage",
    "is_routed",
    "iter_task_tensors",
    "open_parts_writer",
    "pack_mask",
    "read_manifest",
    "reconstruct",
    "task_state_dict",
    "unpack_mask",
]
