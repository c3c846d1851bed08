"""The on-disk pieces every suite shares: built split folders (:class:`SplitFiles`), cached
artifacts built once into an atomic directory (:func:`ensure_dir`), and a built zoo's key and
``<name>.latest`` pointer (:func:`zoo_key`, :func:`point_latest`).

Keys are :func:`mergelab_bench.zoo.cache.config_key` hashes of what a suite passes in; nothing here
adds to them, so the artifacts of either suite are found under the same names as before.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab_bench.zoo.cache import atomic_dir, config_key, read_json
from mergelab_bench.zoo.splits import SPLITS, jsonl_bytes


@dataclass
class SplitFiles:
    """A built task folder: ``meta.json`` and one JSONL file per split (classification tasks in
    :mod:`mergelab_bench.zoo.tasks`, language-model domains in :mod:`mergelab_bench.zoo.lm.tasks`)."""

    name: str
    path: Path
    meta: dict

    @classmethod
    def load(cls, path: str | Path):  # noqa: ANN206 - returns the subclass it is called on
        path = Path(path)
        meta = read_json(path / "meta.json")
        return cls(meta["task"], path, meta)

    def rows(self, split: str, limit: int | None = None) -> list[dict[str, str]]:
        """The first ``limit`` rows of a split (a deterministic random sample)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        out = []
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
