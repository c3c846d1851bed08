"""Routed outputs: a shared model plus per-expert parts, and the model that runs them.

Two layouts. TALL masks and EMR (below) write a shared checkpoint with per-task masks and
scales in ``routed/``; ``twin_merging``, ``split_merge``, ``smile`` and ``wemoe`` write a
routed-model folder (``shared/`` + ``experts/<name>/`` PEFT adapters + ``router/``,
:mod:`mergelab.routed.bundle`, built by :mod:`mergelab.routed.build`). :class:`RoutedModel`
(:mod:`mergelab.routed.model`) loads either, with its router, as one ``nn.Module``.

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

_LAZY = {
    "RoutedModel": "mergelab.routed.model",
    "build_routed": "mergelab.routed.build",
    "ROUTED_METHODS": "mergelab.routed.build",
    "RouterData": "mergelab.routed.data",
    "is_bundle": "mergelab.routed.bundle",
    "expert_state_dict": "mergelab.routed.extract",
    "read_bundle_manifest": "mergelab.routed.bundle",
}


def __getattr__(name: str) -> object:
    """The model and the builders are imported on first use (they need transformers and the API)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ROUTED_METHODS",
    "ExtractResult",
    "PartsWriter",
    "RoutedModel",
    "RouterData",
    "build_routed",
    "expert_state_dict",
    "extract",
    "format_storage",
    "is_bundle",
    "is_routed",
    "iter_task_tensors",
    "open_parts_writer",
    "pack_mask",
    "read_bundle_manifest",
    "read_manifest",
    "reconstruct",
    "task_state_dict",
    "unpack_mask",
]
