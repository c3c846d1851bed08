"""PEFT's LoRA adapter format: key names, ``adapter_config.json`` and a streaming adapter writer.

What PEFT (0.21) writes and ``PeftModel.from_pretrained(base, folder)`` loads:

* ``adapter_model.safetensors`` with, per LoRA module ``M`` (its name in the base model's
  ``named_modules()``, i.e. the checkpoint tensor name without ``.weight``):
  ``base_model.model.M.lora_A.weight`` (``r × in``) and ``base_model.model.M.lora_B.weight``
  (``out × r``); embedding LoRA: ``base_model.model.M.lora_embedding_A`` (``r × num_embeddings``)
  and ``base_model.model.M.lora_embedding_B`` (``dim × r``), no ``.weight``; with
  ``lora_bias: true`` also ``base_model.model.M.lora_B.bias``; ``modules_to_save`` modules as
  their full tensors, ``base_model.model.<tensor name>``.
* ``adapter_config.json``: ``peft_type: LORA``, ``r`` / ``lora_alpha`` (+ ``rank_pattern`` /
  ``alpha_pattern``, keys matched by PEFT as ``(.*\\.)?(key)$``), ``target_modules`` (PEFT matches a
  module when its name equals an entry or ends with ``.entry``: this writer lists full module
  names, so exactly the written modules are adapted), ``modules_to_save``, ``fan_in_fan_out``
  (GPT-2 ``Conv1D``), ``task_type``, ``base_model_name_or_path``.

:class:`PeftAdapterWriter` writes one adapter: factors as they come (spooled to disk, so memory
stays at one tensor), then the safetensors file and the config in :meth:`~PeftAdapterWriter.finish`.
Every written module has ``lora_alpha = r`` (scaling exactly 1): a factor's own scaling is folded
into ``B`` before the cast, so PEFT's ``lora_alpha / r`` is 1.0 with no rounding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.safetensors_file import TORCH_TO_ST, layout_header
from mergelab.errors import OutputError
from mergelab.lora.factors import LoraFactors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
"""Prefix of every key in PEFT's saved adapter state dict (the adapter name is not in the keys)."""

CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
"""``config.json`` ``model_type`` values whose linear layers are transformers ``Conv1D`` (weight ``in × out``)."""

EMBEDDING_MODULES = frozenset(
    {
        "embed_tokens",
        "wte",
        "wpe",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "embed_positions",
        "embed_in",
        "tok_embeddings",
        "shared",
    }
)
"""Module names (the last part before ``.weight``) of the usual embedding tables (``nn.Embedding``: 2-D but
not linear layers); a module whose name contains ``embed`` is one too."""

_TASK_SUFFIXES: tuple[tuple[str, str], ...] = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)
_SEQ2SEQ_TYPES = frozenset({"t5", "mt5", "bart", "mbart", "pegasus", "marian", "m2m_100", "led", "umt5", "longt5"})


def module_name(tensor_name: str) -> str:
    """The module a tensor belongs to: ``model.layers.0.mlp.up_proj.weight`` -> ``model.layers.0.mlp.up_proj``."""
    return tensor_name.rsplit(".", 1)[0] if "." in tensor_name else tensor_name


def lora_keys(module: str, embedding: bool = False) -> tuple[str, str]:
    """PEFT's saved keys of module ``module``'s A and B factors (embedding LoRA: ``lora_embedding_A/B``)."""
    if embedding:
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"


def lora_bias_key(module: str) -> str:
    """PEFT's saved key of a LoRA module's bias update (``lora_bias: true``)."""
    return f"{PREFIX}{module}.lora_B.bias"


def saved_tensor_key(tensor_name: str) -> str:
    """PEFT's saved key of a full tensor of a ``modules_to_save`` module."""
    return f"{PREFIX}{tensor_name}"


def uses_conv1d(config: Mapping[str, Any] | None) -> bool:
    """Whether a model of this ``config.json`` stores its linear layers as ``Conv1D`` (``in × out``)."""
    return bool(config) and str(config.get("model_type", "")) in CONV1D_MODEL_TYPES  # type: ignore[union-attr]


def task_type(config: Mapping[str, Any] | None) -> str | None:
    """PEFT's ``task_type`` for a base of this ``config.json`` (from ``architectures``), None when unknown."""
    if not config:
        return None
    archs = config.get("architectures") or []
    for arch in archs if isinstance(archs, list) else []:
        for suffix, task in _TASK_SUFFIXES:
            if str(arch).endswith(suffix):
                if task == "SEQ_2_SEQ_LM" and config.get("model_type") not in _SEQ2SEQ_TYPES:
                    continue  # e.g. vision-language *ForConditionalGeneration: no PEFT task class fits
                return task
    return None


def adapter_config(
    *,
    ranks: Mapping[str, int],
    modules_to_save: list[str] | None = None,
    base_model_name_or_path: str | None = None,
    task: str | None = None,
    fan_in_fan_out: bool = False,
    lora_bias: bool = False,
) -> dict[str, Any]:
    """The ``adapter_config.json`` of a plain LoRA adapter with scaling 1 in every module.

    ``ranks`` maps each written module to its rank: ``r`` is the most common rank and every
    other module gets ``rank_pattern`` / ``alpha_pattern`` entries with ``lora_alpha = r`` there
    too, so PEFT's ``lora_alpha / r`` is exactly 1 everywhere. ``target_modules`` lists exactly
    the modules of ``ranks``.
    """
    if not ranks:
        raise OutputError("the adapter has no LoRA module (every targeted update is zero); nothing to write")
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(sorted(counts), key=lambda r: counts[r])
    pattern = {m: r for m, r in sorted(ranks.items()) if r != r0}
    return {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r0,
        "lora_alpha": r0,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "lora_bias": lora_bias,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


@dataclass
class _Spooled:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass
class ModuleRecord:
    """What the writer wrote for one LoRA module (for the report)."""

    rank: int
    embedding: bool
    transposed: bool
    shape: tuple[int, int]


@dataclass
class PeftAdapterWriter:
    """Writes one PEFT LoRA adapter into ``folder`` (normally the run's temporary output folder).

    Call :meth:`add_lora` per LoRA module (any order), :meth:`add_saved` per full tensor of a
    ``modules_to_save`` module, :meth:`add_lora_bias` per LoRA module's bias update, then
    :meth:`finish` (writes ``adapter_model.safetensors`` and ``adapter_config.json``) or
    :meth:`abort`. Tensors are spooled to a scratch file in ``folder`` as they come, so the writer
    holds no tensor in memory. ``dtype``: the factors' stored dtype (None: each factor's own).
    ``base_config``: the base's ``config.json`` (task type, Conv1D).
    """

    folder: Path
    base_model_name_or_path: str | None = None
    base_config: Mapping[str, Any] | None = None
    dtype: torch.dtype | None = None
    modules: dict[str, ModuleRecord] = field(default_factory=dict)
    saved_modules: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self._spool_path = self.folder / ".adapter_model.spool"
        self._fd: int | None = None
        self._entries: dict[str, _Spooled] = {}
        self._size = 0
        self._bias_modules: set[str] = set()

    # --- tensors ----------------------------------------------------------------------------

    def _put(self, key: str, t: torch.Tensor) -> None:
        if key in self._entries:
            raise OutputError(f"adapter key {key!r} written twice (an internal error: please report it)")
        if t.dtype not in TORCH_TO_ST:
            raise OutputError(f"adapter tensor {key!r}: dtype {t.dtype} cannot be stored in safetensors")
        if self._fd is None:
            self._fd = os.open(self._spool_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        data = t.detach().cpu().contiguous()
        flat = data.reshape(-1).view(torch.uint8).numpy()
        raw = memoryview(flat) if data.numel() else memoryview(b"")  # type: ignore[arg-type]  # numpy stubs < 3.12
        done = 0
        while done < len(raw):
            done += os.pwrite(self._fd, raw[done:], self._size + done)
        self._entries[key] = _Spooled(data.dtype, tuple(data.shape), self._size, len(raw))
        self._size += len(raw)

    def add_lora(self, module: str, factors: LoraFactors, *, embedding: bool = False) -> None:
        """One LoRA module's factors (PEFT orientation; ``factors.scaling`` is folded into B).

        ``embedding``: the module is an ``nn.Embedding`` (PEFT's ``lora_embedding_A/B``); otherwise
        a linear layer, ``factors.transposed`` marking a GPT-2 ``Conv1D`` (``fan_in_fan_out``).
        """
        if module in self.modules:
            raise OutputError(f"LoRA module {module!r} written twice (an internal error: please report it)")
        if factors.A.dim() != 2 or factors.B.dim() != 2 or factors.B.shape[1] != factors.A.shape[0]:
            raise OutputError(
                f"LoRA module {module!r}: factors of shapes A {list(factors.A.shape)} and B {list(factors.B.shape)} "
                "do not form B @ A"
            )
        dtype = self.dtype or factors.A.dtype
        a = factors.A.to(dtype)
        b = factors.B if factors.scaling == 1.0 else factors.B.to(torch.float32) * factors.scaling
        b = b.to(dtype)
        ka, kb = lora_keys(module, embedding)
        self._put(ka, a)
        self._put(kb, b)
        self.modules[module] = ModuleRecord(
            factors.rank, embedding, factors.transposed, (int(b.shape[0]), int(a.shape[1]))
        )

    def add_lora_bias(self, module: str, bias: torch.Tensor) -> None:
        """The bias update of LoRA module ``module`` (written as ``lora_B.bias``; sets ``lora_bias: true``).

        PEFT adds ``lora_B.bias · scaling`` to the base bias; scaling is 1 here. Every LoRA module
        of the adapter then needs a bias entry (PEFT gives each one a ``lora_B`` bias): modules
        without one get zeros in :meth:`finish`, so their base layers must have a bias.
        """
        self._put(lora_bias_key(module), bias.to(self.dtype or bias.dtype))
        self._bias_modules.add(module)

    def add_saved(self, tensor_name: str, tensor: torch.Tensor) -> None:
        """A full tensor of a ``modules_to_save`` module (give every tensor of that module)."""
        self._put(saved_tensor_key(tensor_name), tensor)
        self.saved_modules.add(module_name(tensor_name))

    # --- completion -------------------------------------------------------------------------

    @property
    def fan_in_fan_out(self) -> bool:
        return any(r.transposed and not r.embedding for r in self.modules.values())

    def config(self) -> dict[str, Any]:
        """The ``adapter_config.json`` for what was added so far."""
        return adapter_config(
            ranks={m: r.rank for m, r in self.modules.items()},
            modules_to_save=sorted(self.saved_modules) or None,
            base_model_name_or_path=self.base_model_name_or_path,
            task=task_type(self.base_config),
            fan_in_fan_out=self.fan_in_fan_out,
            lora_bias=bool(self._bias_modules),
        )

    def finish(self) -> dict[str, Any]:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json``; return the config."""
        if self._bias_modules:
            for m, rec in self.modules.items():
                if m not in self._bias_modules and not rec.embedding:
                    dt = self.dtype or torch.float32
                    self._put(lora_bias_key(m), torch.zeros(rec.shape[0], dtype=dt))
        cfg = self.config()
        names = sorted(self._entries)
        items = [(n, self._entries[n].dtype, self._entries[n].shape) for n in names]
        header, offsets = layout_header(items, {"format": "pt"})
        out = self.folder / ADAPTER_WEIGHTS
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        try:
            os.pwrite(fd, header, 0)
            for n in names:
                e = self._entries[n]
                _copy_range(self._fd, e.offset, fd, offsets[n], e.nbytes)
        finally:
            os.close(fd)
        self._close_spool()
        (self.folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        return cfg

    def _close_spool(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._spool_path.exists():
            self._spool_path.unlink()

    def abort(self) -> None:
        """Drop the scratch file (the run's temporary folder is removed by its owner)."""
        self._close_spool()

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data added so far."""
        return self._size


def _copy_range(src: int | None, src_off: int, dst: int, dst_off: int, n: int, chunk: int = 16 * 2**20) -> None:
    done = 0
    while done < n:
        assert src is not None
        buf = os.pread(src, min(chunk, n - done), src_off + done)
        if not buf:
            raise OutputError("the adapter's scratch file ended early (disk full or removed?)")
        w = 0
        while w < len(buf):
            w += os.pwrite(dst, buf[w:], dst_off + done + w)
        done += len(buf)


def adapter_size(folder: Path) -> int:
    """Bytes of ``adapter_model.safetensors`` in ``folder``."""
    return (Path(folder) / ADAPTER_WEIGHTS).stat().st_size
