"""Deterministic split assignment shared by every suite (classification tasks, LM domains).

Rows are assigned to test / validation / train by ``hash(salt, group)``, each split is ordered by
``hash(salt, "order", key)`` and an over-full set keeps the rows with the smallest
``hash(salt, "cap", key)``. Everything here is a pure function of the rows, so a task's data does
not depend on the order in which its files were read; suites only say how rows are cleaned,
deduplicated and what a record holds (:mod:`mergelab_bench.zoo.tasks`, :mod:`mergelab_bench.zoo.lm.tasks`).
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

SPLITS: tuple[str, ...] = ("train", "validation", "test")

T = TypeVar("T")


@dataclass(frozen=True)
class SplitConfig:
    """Split fractions and text limits shared by every task of a suite."""

    validation: float = 0.1
    test: float = 0.2
    max_chars: int = 1000
    min_chars: int = 3

    def __post_init__(self) -> None:
        if not (self.test > 0 and self.validation >= 0 and self.test + self.validation < 1):
            raise ValueError("split fractions must satisfy 0 < test, 0 <= validation, test + validation < 1")


@dataclass
class Finalized:
    """The rows of each split, in order, and how many rows were dropped and why."""

    splits: dict[str, list[dict[str, str]]]
    dropped: dict[str, int] = field(default_factory=dict)


def unit_hash(*parts: str) -> float:
    """A number in [0, 1) from sha256 of the parts: uniform, stable across runs and machines."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def normalize_text(text: str) -> str:
    """The duplicate key of a text: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def split_of(salt: str, group: str, cfg: SplitConfig) -> str:
    u = unit_hash(salt, "split", group)
    if u < cfg.test:
        return "test"
    if u < cfg.test + cfg.validation:
        return "validation"
    return "train"


def hash_sample(salt: str, items: Iterable[T], cap: int, key: Callable[[T], str]) -> tuple[list[T], int]:
    """The ``cap`` items with the smallest ``hash(salt, "cap", key)`` (a deterministic sample) and
    the number of items left out."""
    ordered = sorted(items, key=lambda it: (unit_hash(salt, "cap", key(it)), key(it)))
    return ordered[:cap], max(0, len(ordered) - cap)


def assign_splits(
    salt: str, items: Iterable[tuple[str, str | None, dict[str, str]]], cfg: SplitConfig
) -> dict[str, list[dict[str, str]]]:
    """Records by split, each split in hash order.

    ``items`` are ``(normalized text, group, record)``: a record goes to the split of its group
    (``None``: the normalized text is the group) and every record has a ``"key"``.
    """
    splits: dict[str, list[tuple[float, dict[str, str]]]] = {s: [] for s in SPLITS}
    for norm, group, record in items:
        split = split_of(salt, group if group is not None else norm, cfg)
        splits[split].append((unit_hash(salt, "order", record["key"]), record))
    return {s: [r for _, r in sorted(v, key=lambda x: (x[0], x[1]["key"]))] for s, v in splits.items()}


def finalized_splits(
    salt: str, items: Iterable[tuple[str, str | None, dict[str, str]]], cfg: SplitConfig, dropped: Mapping[str, int]
) -> Finalized:
    """The splits of ``items`` (:func:`assign_splits`) and the non-zero drop counts, sorted by reason."""
    return Finalized(assign_splits(salt, items, cfg), {k: v for k, v in sorted(dropped.items()) if v})


def jsonl_bytes(rows: Sequence[dict[str, str]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()


def content_hash(splits: Mapping[str, Sequence[dict[str, str]]]) -> str:
    """sha256 over the three split files, in split order."""
    digest = hashlib.sha256()
    for split in SPLITS:
        digest.update(split.encode() + b"\0")
        digest.update(jsonl_bytes(splits[split]))
    return digest.hexdigest()
