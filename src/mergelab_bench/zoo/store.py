"""The on-disk pieces every suite shares: built split folders (:class:`SplitFiles`), cached
artifacts built once into an atomic directory (:func:`ensure_dir`), a built zoo's key and
``<name>.latest`` pointer (:func:`zoo_key`, :func:`point_latest`, :func:`find_manifest`) and the
manifest reader both suites' zoo classes extend (:class:`BuiltZoo`).

Keys are :func:`mergelab_bench.zoo.cache.config_key` hashes of what a suite passes in; nothing here
adds to them, so the artifacts of either suite are found under the same names as before.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mergelab.errors import MergelabError
from mergelab_bench.zoo.cache import atomic_dir, config_key, read_json, write_json
from mergelab_bench.zoo.splits import SPLITS, Finalized, SplitConfig, content_hash, jsonl_bytes


class ZooError(MergelabError):
    """A zoo is missing or unreadable."""

    exit_code = 7


@dataclass
class SplitFiles:
    """A built task folder: ``meta.json`` and one JSONL file per split (classification tasks in
    :mod:`mergelab_bench.zoo.tasks`, language-model domains in :mod:`mergelab_bench.zoo.lm.tasks`)."""

    name: str
    path: Path
    meta: dict

    @classmethod
    def load(cls, path: str | Path):  # returns the subclass it is called on
        path = Path(path)
        meta = read_json(path / "meta.json")
        return cls(meta["task"], path, meta)

    def rows(self, split: str, limit: int | None = None) -> list[dict[str, str]]:
        """The first ``limit`` rows of a split (a deterministic random sample)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        out: list[dict[str, str]] = []
        with open(self.path / f"{split}.jsonl", encoding="utf-8") as fh:
            for line in fh:
                if limit is not None and len(out) >= limit:
                    break
                out.append(json.loads(line))
        return out


def write_split_files(out: Path, splits: Mapping[str, list[dict[str, str]]]) -> None:
    """``<split>.jsonl`` for every split into ``out`` (created)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        (out / f"{split}.jsonl").write_bytes(jsonl_bytes(rows))


def write_task_folder(
    out: Path, spec: Any, reader: Any, cfg: SplitConfig, result: Finalized, *, builder_version: int, **fields: Any
) -> dict:
    """Write a finalized task into ``out``: the split files and ``meta.json`` (what every suite
    records: name, description, builder version, split config and salt, sizes, drops, sources with
    versions, content hash, the apt release when the task reads the apt index; plus the suite's
    ``fields``). ``spec`` is a task spec of either suite, ``reader`` the source reader it was
    collected from. Returns the metadata."""
    write_split_files(out, result.splits)
    meta = {
        "task": spec.name,
        "description": spec.description,
        "builder_version": builder_version,
        "split_config": asdict(cfg),
        "split_salt": spec.salt,
        "sizes": {s: len(rows) for s, rows in result.splits.items()},
        "dropped": result.dropped,
        "sources": spec.sources(reader),
        "content_sha256": content_hash(result.splits),
        **fields,
    }
    if spec.apt:
        meta["apt_release"] = reader.apt_index().provenance
    write_json(out / "meta.json", meta)
    return meta


def ensure_dir(final: Path, build: Callable[[Path], Any], *, done: str, force: bool = False) -> Path:
    """``final``, built first by ``build(tmp)`` into a temporary directory renamed into place when
    ``final/done`` is missing (or ``force``)."""
    if force or not (final / done).is_file():
        with atomic_dir(final) as tmp:
            build(tmp)
    return final


def zoo_key(config: Mapping[str, Any], experts: Mapping[str, Path]) -> str:
    """A built zoo's key: its config (``model_dump(mode="json")``) and its experts' folder names."""
    return config_key({"config": dict(config), "experts": {t: p.name for t, p in experts.items()}})


def point_latest(root: Path, name: str) -> None:
    """Make ``<name>.latest`` beside ``root`` name it (the zoo ``load_zoo(name)`` opens)."""
    (root.parent / f"{name}.latest").write_text(root.name + "\n")


def build_stamp() -> dict[str, Any]:
    """Fields every expert record ends with: torch version, threads, build time (UTC)."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "built_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def find_manifest(spec: str | os.PathLike[str], zoos_dir: Path) -> Path | None:
    """The manifest ``spec`` names: a zoo directory, a manifest file, or a preset name whose
    ``zoos_dir/<name>.latest`` points at a built zoo; ``None`` when there is none."""
    path = Path(spec)
    if path.is_dir() and (path / "manifest.json").is_file():
        return path / "manifest.json"
    if path.is_file():
        return path
    pointer = zoos_dir / f"{spec}.latest"
    if pointer.is_file():
        manifest = zoos_dir / pointer.read_text().strip() / "manifest.json"
        if manifest.is_file():
            return manifest
    return None


class BuiltZoo:
    """A built zoo's manifest: name, key, tasks, the base and each task's expert and data folders
    (paths in the manifest are relative to its folder). Suites set the manifest ``FORMAT``, the
    ``DATA`` class of their task folders and the ``NOUN`` used in errors."""

    FORMAT: ClassVar[str]
    DATA: ClassVar[type[SplitFiles]] = SplitFiles
    NOUN: ClassVar[str] = "zoo"
    FORMAT_HINT: ClassVar[str] = ""

    def __init__(self, manifest_path: str | os.PathLike[str]) -> None:
        self.manifest_path = Path(manifest_path)
        self.root = self.manifest_path.parent
        self.manifest = read_json(self.manifest_path)
        if self.manifest.get("format") != self.FORMAT:
            raise ZooError(f"{self.manifest_path}: not a {self.FORMAT} manifest{self.FORMAT_HINT}")
        self._data: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.manifest.get("name", "custom")

    @property
    def key(self) -> str:
        return self.manifest.get("key", "")

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest.get("task_order") or self.manifest["tasks"])

    def _path(self, rel: str) -> Path:
        return (self.root / rel).resolve()

    @property
    def base_dir(self) -> Path:
        """The pretrained model as an HF checkpoint directory (the merge base)."""
        return self._path(self.manifest["base"]["path"])

    def _task(self, task: str) -> dict:
        try:
            return self.manifest["tasks"][task]
        except KeyError:
            raise ZooError(f"task {task!r} is not in {self.NOUN} {self.name} ({', '.join(self.tasks)})") from None

    def expert_dir(self, task: str) -> Path:
        """The directory of a task's expert (``model/``, ``record.json``, ...)."""
        return self._path(self._task(task)["expert"])

    def expert_model_dir(self, task: str) -> Path:
        """The expert as an HF checkpoint directory (what gets merged)."""
        return self.expert_dir(task) / "model"

    def record(self, task: str) -> dict:
        return read_json(self.expert_dir(task) / "record.json")

    def data(self, task: str) -> Any:  # the suite's DATA class
        """The task's built data (:attr:`DATA`), loaded once."""
        if task not in self._data:
            self._data[task] = self.DATA.load(self._path(self._task(task)["data"]))
        return self._data[task]
