"""Input checkpoints: a Hugging Face folder, a single file, a Hub id, or an in-memory state dict.

Every reader lists its tensors (name → shape, dtype) from headers / index files alone and
reads one tensor at a time into a fresh CPU buffer. Files are opened read-only. Safetensors
readers also hand out a tensor's reads in parts (``read_parts``: several positional reads in
flight for one tensor) and hint the kernel to read ahead (``will_need``); the engine uses both
when they are there (:mod:`mergelab.executors.streaming`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import blake3
import torch

from mergelab.checkpoint.safetensors_file import StEntry, pread_tensor, read_header, tensor_reads
from mergelab.errors import CheckpointError

SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


@dataclass(frozen=True)
class TensorMeta:
    """Name, shape and dtype of one stored tensor, and the file that holds it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class CheckpointReader(Protocol):
    """What the engine needs from an input model."""

    label: str  # how the user named it (path or hub id)
    folder: Path | None  # where side files (config, tokenizer) live, if on disk

    def tensors(self) -> Mapping[str, TensorMeta]: ...
    def read(self, name: str) -> torch.Tensor: ...
    def config(self) -> dict | None: ...
    def close(self) -> None: ...
    def spec(self) -> ReaderSpec: ...


class ReaderSpec(Protocol):
    """How to reopen a reader elsewhere (another process, a Ray worker): small, frozen, picklable."""

    @property
    def label(self) -> str: ...

    def open(self) -> CheckpointReader: ...


@dataclass(frozen=True)
class SafetensorsSpec:
    """Safetensors files (a folder's shards, or one file): reopened from the same paths (shared storage)."""

    label: str
    folder: str | None
    files: tuple[str, ...]

    def open(self) -> CheckpointReader:
        return SafetensorsReader(self.label, Path(self.folder) if self.folder else None, [Path(f) for f in self.files])


@dataclass(frozen=True)
class TorchBinSpec:
    """``pytorch_model.bin`` files (weights-only): reopened from the same paths."""

    label: str
    folder: str | None
    files: tuple[str, ...]

    def open(self) -> CheckpointReader:
        return TorchBinReader(self.label, Path(self.folder) if self.folder else None, [Path(f) for f in self.files])


@dataclass(frozen=True)
class HubSpec:
    """A Hugging Face Hub repository: reopened from the local cache (downloaded there if missing)."""

    label: str
    revision: str | None = None

    def open(self) -> CheckpointReader:
        reader = _reader_for_folder(self.label, resolve_hub(self.label, self.revision))
        reader._spec = self
        return reader


@dataclass(frozen=True)
class StateDictSpec:
    """An in-memory state dict, carried *by value*: pickling the spec copies every tensor.

    For in-process use and small models (tests, searches); pickling keeps storage shared between
    tied tensors, so the reopened reader reports the same aliases.
    """

    label: str
    tensors: Mapping[str, torch.Tensor]

    def open(self) -> CheckpointReader:
        return StateDictReader(self.tensors, self.label)


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot parse JSON ({exc}); re-download or fix this file") from exc


class SafetensorsReader:
    """A model stored as one or more safetensors files (HF folder, index file, or one file)."""

    def __init__(self, label: str, folder: Path | None, files: list[Path]):
        self.label = label
        self.folder = folder
        self._files = list(files)
        self._spec: ReaderSpec | None = None
        self._entries: dict[str, tuple[Path, StEntry]] = {}
        self._meta: dict[str, TensorMeta] = {}
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        for f in files:
            entries, _ = read_header(f)
            for name, e in entries.items():
                if name in self._entries:
                    raise CheckpointError(
                        f"{f}: tensor {name!r} also appears in {self._entries[name][0]}; the checkpoint is inconsistent"
                    )
                self._entries[name] = (f, e)
                self._meta[name] = TensorMeta(name, e.shape, e.dtype, f.name)

    def tensors(self) -> Mapping[str, TensorMeta]:
        return self._meta

    def _fd(self, path: Path) -> int:
        with self._lock:
            fd = self._fds.get(path)
            if fd is None:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as exc:
                    raise CheckpointError(
                        f"{path}: cannot open ({exc.strerror}); check the path and permissions"
                    ) from exc
                self._fds[path] = fd
            return fd

    def _entry(self, name: str) -> tuple[Path, StEntry]:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(f"{self.label}: no tensor named {name!r}") from None

    def read(self, name: str) -> torch.Tensor:
        path, entry = self._entry(name)
        return pread_tensor(self._fd(path), entry, path)

    def read_parts(self, name: str, part_bytes: int) -> tuple[torch.Tensor, list[Callable[[], None]]]:
        """``name``'s tensor in a fresh buffer not yet filled, and the reads that fill it.

        Each read is one positional read of at most ``part_bytes`` into its own range of the
        buffer; the caller may run them on several threads at once and must run all of them
        before using the tensor (:func:`~mergelab.checkpoint.safetensors_file.tensor_reads`).
        """
        path, entry = self._entry(name)
        return tensor_reads(self._fd(path), entry, path, part_bytes)

    def will_need(self, name: str) -> None:
        """Ask the kernel to start reading ``name``'s bytes into the page cache, and return at once.

        ``posix_fadvise(POSIX_FADV_WILLNEED)`` over the tensor's byte range: nothing is read into
        this process (the pages are the kernel's, reclaimable), so a later :meth:`read` of a cold
        file finds them cached or in flight. A hint only: nothing happens where the platform has
        no ``posix_fadvise`` or the file system refuses it.
        """
        if not hasattr(os, "posix_fadvise"):
            return
        path, entry = self._entry(name)
        if entry.nbytes:
            with contextlib.suppress(OSError):
                os.posix_fadvise(self._fd(path), entry.begin, entry.nbytes, os.POSIX_FADV_WILLNEED)

    def spec(self) -> ReaderSpec:
        """Reopens the same files (or the same Hub repository)."""
        if self._spec is not None:
            return self._spec
        return SafetensorsSpec(
            self.label, str(self.folder) if self.folder else None, tuple(str(f) for f in self._files)
        )

    def config(self) -> dict | None:
        if self.folder and (self.folder / "config.json").is_file():
            return _load_json(self.folder / "config.json")
        return None

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


class TorchBinReader:
    """A model stored as ``pytorch_model.bin`` (or shards of it), loaded with ``weights_only=True``.

    Shards are opened with ``mmap=True`` where the file format allows it (zip-based files), one
    shard at a time; each tensor is copied out before it is handed on.
    """

    def __init__(self, label: str, folder: Path | None, files: list[Path]):
        self.label = label
        self.folder = folder
        self._files = files
        self._meta: dict[str, TensorMeta] = {}
        self._where: dict[str, Path] = {}
        self._open_path: Path | None = None
        self._open_sd: Mapping[str, torch.Tensor] | None = None
        self._lock = threading.Lock()
        self._spec: ReaderSpec | None = None
        for f in files:
            sd = self._load(f)
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    continue
                self._meta[name] = TensorMeta(name, tuple(t.shape), t.dtype, f.name)
                self._where[name] = f
            del sd

    @staticmethod
    def _load(path: Path) -> Mapping[str, torch.Tensor]:
        try:
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for bad/unsafe pickles
            raise CheckpointError(
                f"{path}: cannot load as a weights-only PyTorch checkpoint "
                f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "mergelab never unpickles arbitrary objects: convert it to safetensors"
            ) from exc
        if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping):
            raise CheckpointError(f"{path}: expected a state dict (name → tensor), found {type(sd).__name__}")
        return sd

    def tensors(self) -> Mapping[str, TensorMeta]:
        return self._meta

    def read(self, name: str) -> torch.Tensor:
        path = self._where.get(name)
        if path is None:
            raise CheckpointError(f"{self.label}: no tensor named {name!r}")
        with self._lock:
            if self._open_path != path:
                self._open_sd = None
                self._open_sd = self._load(path)
                self._open_path = path
            assert self._open_sd is not None
            return self._open_sd[name].detach().clone()

    def spec(self) -> ReaderSpec:
        """Reopens the same files."""
        if self._spec is not None:
            return self._spec
        return TorchBinSpec(self.label, str(self.folder) if self.folder else None, tuple(str(f) for f in self._files))

    def config(self) -> dict | None:
        if self.folder and (self.folder / "config.json").is_file():
            return _load_json(self.folder / "config.json")
        return None

    def close(self) -> None:
        self._open_sd = None
        self._open_path = None


class StateDictReader:
    """An in-memory state dict (or ``nn.Module``) presented as a checkpoint."""

    folder: Path | None = None  # never on disk: no side files

    def __init__(self, state: Mapping[str, torch.Tensor] | torch.nn.Module, label: str = "<state dict>"):
        if isinstance(state, torch.nn.Module):
            state = state.state_dict()
        self.label = label
        self._sd = dict(state)
        self._meta = {
            k: TensorMeta(k, tuple(v.shape), v.dtype, "<memory>")
            for k, v in self._sd.items()
            if isinstance(v, torch.Tensor)
        }
        first: dict[tuple[int, int | torch.SymInt, tuple[int, ...], torch.dtype], str] = {}
        self._aliases: dict[str, str] = {}
        for k, v in self._sd.items():
            if not isinstance(v, torch.Tensor) or v.numel() == 0:
                continue
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
            if key in first:
                self._aliases[k] = first[key]
            else:
                first[key] = k

    def aliases(self) -> dict[str, str]:
        """Names that share storage with an earlier name (tied weights): alias → canonical name."""
        return dict(self._aliases)

    def tensors(self) -> Mapping[str, TensorMeta]:
        return self._meta

    def read(self, name: str) -> torch.Tensor:
        # a copy, so that nothing downstream can alias or modify the caller's tensors
        return self._sd[name].detach().clone()

    def spec(self) -> ReaderSpec:
        """Carries the tensors by value (see :class:`StateDictSpec`)."""
        return StateDictSpec(self.label, {k: v for k, v in self._sd.items() if isinstance(v, torch.Tensor)})

    def config(self) -> dict | None:
        return None

    def close(self) -> None:
        pass


_SHARD_RE = re.compile(r".*-\d{5}-of-\d{5}\.(safetensors|bin)$")


def _files_from_index(index: Path) -> list[Path]:
    data = _load_json(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: index file has no weight_map; re-download or fix it")
    names = sorted(set(weight_map.values()))
    files = [index.parent / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(
            f"{index}: shard file(s) {', '.join(missing)} listed in the index are missing; re-download the model"
        )
    return files


_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_FULL_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _adapter_error(folder: Path) -> CheckpointError:
    """The one-line refusal of a PEFT adapter folder opened without a base to apply it to."""
    base = None
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
        kind = cfg.get("peft_type", "LoRA") if isinstance(cfg, dict) else "LoRA"
    except (OSError, ValueError):
        kind = "LoRA"
    on = f" on {base}" if base else ""
    return CheckpointError(
        f"{folder}: this is a {kind}/PEFT adapter{on} (adapter_config.json + adapter weights), not a full model; "
        "an adapter is read over its base: list it under `models:` of a recipe whose base_model is that base, "
        "or write base+adapter"
    )


def _is_adapter_folder(folder: Path) -> bool:
    """A PEFT adapter folder: adapter_config.json and adapter weights, no full-model weights beside them."""
    from mergelab.lora.reader import is_adapter_folder

    return is_adapter_folder(folder)


def _open_adapter(
    label: str,
    folder: Path,
    base: CheckpointReader | Callable[[], CheckpointReader] | None,
    allow_base_mismatch: bool,
    hub_id: str | None = None,
) -> CheckpointReader:
    """An adapter folder read over ``base`` (a reader, or a function opening it); refused without one."""
    if base is None:
        raise _adapter_error(folder)
    from mergelab.lora.reader import open_adapter

    reader = base() if callable(base) else base
    return open_adapter(label, folder, reader, allow_base_mismatch=allow_base_mismatch, hub_id=hub_id)


def _open_base_plus_adapter(label: str, base_ref: str, adapter_ref: str, allow_base_mismatch: bool) -> CheckpointReader:
    """mergekit's ``base+adapter`` form: the adapter (folder, weights file or Hub id) over that base."""
    from mergelab.lora.reader import open_adapter

    path = Path(adapter_ref).expanduser()
    hub_id = None
    if path.is_file() and path.name.startswith("adapter_model"):
        path = path.parent
    if not path.exists():
        if not (_HUB_ID.match(adapter_ref) and ".." not in adapter_ref):
            raise CheckpointError(
                f"{label}: adapter {adapter_ref} not found (no such folder, not a Hub id); check the path"
            )
        path, hub_id = resolve_hub(adapter_ref), adapter_ref
    if not _is_adapter_folder(path):
        _missing_adapter_weights(path)
        raise CheckpointError(
            f"{label}: {adapter_ref} is not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors); "
            "the base+adapter form needs an adapter after the +"
        )
    base = open_checkpoint(base_ref)
    return open_adapter(label, path, base, allow_base_mismatch=allow_base_mismatch, owns_base=True, hub_id=hub_id)


def _missing_adapter_weights(folder: Path) -> None:
    """Refuse a folder with adapter_config.json but neither adapter nor model weights (one line)."""
    if (
        (folder / "adapter_config.json").is_file()
        and not any((folder / n).is_file() for n in _FULL_WEIGHTS)
        and not any((folder / n).is_file() for n in _ADAPTER_WEIGHTS)
    ):
        raise CheckpointError(
            f"{folder}: adapter_config.json but no adapter_model.safetensors (or adapter_model.bin): "
            "the adapter's weights are missing; copy or re-download them"
        )


def _reader_for_folder(label: str, folder: Path) -> SafetensorsReader | TorchBinReader:
    if _is_adapter_folder(folder):
        raise _adapter_error(folder)
    _missing_adapter_weights(folder)
    st_index = folder / "model.safetensors.index.json"
    if st_index.is_file():
        return SafetensorsReader(label, folder, _files_from_index(st_index))
    if (folder / "model.safetensors").is_file():
        return SafetensorsReader(label, folder, [folder / "model.safetensors"])
    other_index = sorted(folder.glob("*.safetensors.index.json"))
    if len(other_index) == 1:
        return SafetensorsReader(label, folder, _files_from_index(other_index[0]))
    st_files = sorted(folder.glob("*.safetensors"))
    if st_files:
        return SafetensorsReader(label, folder, st_files)
    bin_index = folder / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        return TorchBinReader(label, folder, _files_from_index(bin_index))
    if (folder / "pytorch_model.bin").is_file():
        return TorchBinReader(label, folder, [folder / "pytorch_model.bin"])
    raise CheckpointError(
        f"{folder}: no model weights found (expected model.safetensors, sharded safetensors with an index, "
        "or pytorch_model.bin)"
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
"""A Hub repository id: ``owner/name`` or a single name (``gpt2``, the Hub's canonical models)."""


def resolve_hub(repo_id: str, revision: str | None = None) -> Path:
    """Download (or find in the local cache) the weight, config and tokenizer files of a Hub repo."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=[
                "*.safetensors",
                "*.safetensors.index.json",
                "*.json",
                "*.model",
                "*.txt",
                "*.jinja",
                "adapter_model.bin",
            ],
        )
    except Exception as exc:  # network, auth or missing-repo errors of several types
        from huggingface_hub import constants

        why = type(exc).__name__
        if getattr(constants, "HF_HUB_OFFLINE", False):
            why += ": offline mode (HF_HUB_OFFLINE) and not in the local Hub cache"
        raise CheckpointError(
            f"{repo_id}: no such local file or folder, and tried as a Hugging Face Hub id it could not be fetched "
            f"({why}); give a local folder, or check the id, your network and Hub access"
        ) from exc
    return Path(path)


def open_checkpoint(
    ref: str | os.PathLike[str] | Mapping[str, torch.Tensor] | torch.nn.Module,
    *,
    base: CheckpointReader | Callable[[], CheckpointReader] | None = None,
    allow_base_mismatch: bool = False,
) -> CheckpointReader:
    """Open a model given as a local folder, a weights file, a Hub id, or an in-memory state dict.

    A PEFT LoRA adapter (its folder, its ``adapter_model.*`` file, a Hub adapter id) is read over
    ``base`` (a reader, or a function that opens it: the recipe's base) as the model
    ``merge_and_unload`` would give (:class:`mergelab.lora.reader.AdapterReader`); mergekit's
    ``base+adapter`` form names its own base. The adapter's recorded base is checked against it
    unless ``allow_base_mismatch``.
    """
    if isinstance(ref, (Mapping, torch.nn.Module)):
        return StateDictReader(ref)
    label = str(ref)
    path = Path(label).expanduser()
    if path.is_dir():
        if _is_adapter_folder(path):
            return _open_adapter(label, path, base, allow_base_mismatch)
        return _reader_for_folder(label, path)
    if path.is_file():
        if path.name.endswith(".index.json"):
            files = _files_from_index(path)
            cls = SafetensorsReader if files[0].suffix == ".safetensors" else TorchBinReader
            return cls(label, path.parent, files)
        if path.name in _ADAPTER_WEIGHTS and _is_adapter_folder(path.parent):
            return _open_adapter(label, path.parent, base, allow_base_mismatch)
        if path.suffix == ".safetensors":
            return SafetensorsReader(label, path.parent, [path])
        if path.suffix in (".bin", ".pt", ".pth"):
            return TorchBinReader(label, path.parent, [path])
        raise CheckpointError(f"{path}: unsupported file type; give a model folder, .safetensors or .bin file")
    from mergelab.lora.reader import split_base_plus_adapter

    parts = split_base_plus_adapter(label)
    if parts is not None:
        return _open_base_plus_adapter(label, parts[0], parts[1], allow_base_mismatch)
    if _HUB_ID.match(label) and ".." not in label and path.suffix != ".safetensors":
        # neither a local file nor folder: try it as a Hub id (owner/name or name)
        folder = resolve_hub(label)
        if _is_adapter_folder(folder):
            return _open_adapter(label, folder, base, allow_base_mismatch, hub_id=label)
        reader = _reader_for_folder(label, folder)
        reader._spec = HubSpec(label)
        return reader
    raise CheckpointError(f"{label}: no such file or folder (and not a Hugging Face Hub id); check the path")


def tie_word_embeddings(config: Mapping[str, Any] | None) -> bool | None:
    """Whether a model's input embedding and output head are one matrix, as transformers decides it.

    ``tie_word_embeddings`` from config.json (or its ``text_config``) when set; otherwise the
    default of transformers' config class for the config's ``model_type`` (Llama, Mistral, Qwen2:
    untied; Gemma, GPT-2, BERT, T5: tied), since transformers writes only values that differ from
    its defaults. ``None`` when unknown (no config, no or an unknown ``model_type``, no transformers).
    """
    if not config:
        return None
    for cfg in (config, config.get("text_config")):
        if isinstance(cfg, Mapping) and isinstance(cfg.get("tie_word_embeddings"), bool):
            return bool(cfg["tie_word_embeddings"])
    model_type = config.get("model_type")
    return _class_default_tie(model_type) if isinstance(model_type, str) else None


@functools.lru_cache(maxsize=64)
def _class_default_tie(model_type: str) -> bool | None:
    """``tie_word_embeddings`` of transformers' default config for ``model_type`` (None: unknown)."""
    try:
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            return None
        default = CONFIG_MAPPING[model_type]()
    except Exception:  # transformers missing or a config class that cannot be built without arguments
        return None
    value = getattr(default, "tie_word_embeddings", None)
    if not isinstance(value, bool):
        text = getattr(default, "text_config", None)
        value = getattr(text, "tie_word_embeddings", None)
    return value if isinstance(value, bool) else None


def weight_files(reader: CheckpointReader) -> Iterable[Path]:
    """The files holding the reader's weights (for provenance)."""
    paths = getattr(reader, "weight_paths", None)
    if callable(paths):  # an adapter over its base: both sets of files
        return list(paths())
    if reader.folder is None:
        return []
    return sorted({reader.folder / m.file for m in reader.tensors().values()})


def tensor_digest(t: torch.Tensor) -> bytes:
    """BLAKE3 of a tensor's raw bytes (about 2.5x faster than SHA-256 here: 4.7 vs 1.8 GB/s)."""
    data = t.reshape(-1).contiguous().view(torch.uint8).numpy() if t.numel() else b""
    return blake3.blake3(data, max_threads=1).digest()  # type: ignore[arg-type]  # numpy stubs: ndarray.__buffer__ only on Python >= 3.12


def content_hash(digests: Mapping[str, tuple[str, tuple[int, ...], bytes]]) -> str:
    """A model's content hash from its tensors' (dtype, shape, :func:`tensor_digest`) by name: the BLAKE3
    over the sorted (name, dtype, shape, digest), so it does not depend on sharding or file order."""
    h = blake3.blake3()
    for name in sorted(digests):
        dtype, shape, digest = digests[name]
        h.update(f"{name}\x00{dtype}\x00{shape}\x00".encode())
        h.update(digest)
    return h.hexdigest()
