"""Calibration examples: read a JSONL/text file or a registered named split (a zoo task's), tokenize
into batches.

Examples are taken in file order (the first ``limit``), so a data pass is deterministic and a
larger ``num_examples`` extends a smaller one. Batches are dicts of tensors (``input_ids``,
``attention_mask`` and, when the source has labels, ``labels``), padded on the right to their
own longest row.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab.data.config import CalibrationSource
from mergelab.errors import RecipeError
from mergelab.plugins import load_entry_points

Batch = Mapping[str, torch.Tensor]


@dataclass
class Examples:
    """Texts and (optional) labels as found in the source (label names or ids)."""

    texts: list[str]
    labels: list[Any] | None = None
    label_names: list[str] | None = None  # the source's label vocabulary, when it has one (zoo tasks)
    ids: list[str] | None = None  # each row's id in its source (a zoo row's key, ``file:line``), when known

    def __len__(self) -> int:
        return len(self.texts)


def read_text_file(
    path: str | os.PathLike[str],
    *,
    text_field: str = "text",
    label_field: str | None = "label",
    limit: int | None = None,
) -> Examples:
    """The first ``limit`` examples of a ``.jsonl`` file (one JSON object a line) or a text file
    (one example a non-empty line)."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: calibration file not found")
    texts: list[str] = []
    labels: list[Any] = []
    ids: list[str] = []
    jsonl = p.suffix.lower() in (".jsonl", ".ndjson") or p.name.endswith(".jsonl.txt")
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(texts) >= limit:
                break
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if not jsonl:
                texts.append(line)
                ids.append(f"{p.name}:{lineno}")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecipeError(f"{p}:{lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                raise RecipeError(f"{p}:{lineno}: expected an object with a string field {text_field!r}")
            texts.append(row[text_field])
            labels.append(row.get(label_field) if label_field else None)
            key = row.get("key", row.get("id"))
            ids.append(str(key) if key is not None else f"{p.name}:{lineno}")
    if not texts:
        raise RecipeError(f"{p}: no calibration examples in the file")
    has_labels = jsonl and label_field is not None and all(x is not None for x in labels)
    return Examples(texts, labels if has_labels else None, ids=ids)


# --- calibration-source kinds -------------------------------------------------------------------
# A recipe's source is a file (read here) or a named split of a dataset that another package
# provides: ``zoo:<task>[:<split>]`` is the benchmark's zoo (``mergelab_bench``). The core reads
# such sources only through this registry, so it never imports the package that fills it.
# Packages register their kinds when imported, or through the ``mergelab.data_sources`` entry-point
# group (each entry a callable taking no arguments that calls register_source_kind), which is
# loaded the first time a kind is asked for and not yet registered.

ExamplesLoader = Callable[["CalibrationSource", "int | None"], Examples]
HeadLoader = Callable[["CalibrationSource"], Path]

ENTRY_POINT_GROUP = "mergelab.data_sources"


@dataclass(frozen=True)
class SourceKind:
    """How to read one kind of named calibration source (``prefix`` as in ``zoo:<task>``)."""

    prefix: str
    examples: ExamplesLoader
    head: HeadLoader | None = None  # the task head of ``head: <prefix>`` (encoders without a head)


_KINDS: dict[str, SourceKind] = {}
_entry_points_loaded = False


def register_source_kind(prefix: str, loader: ExamplesLoader, *, head: HeadLoader | None = None) -> None:
    """Register (or replace) the reader of the calibration sources named ``<prefix>:...``."""
    _KINDS[prefix] = SourceKind(prefix, loader, head)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    load_entry_points(ENTRY_POINT_GROUP, "calibration source")


def source_kind(prefix: str) -> SourceKind:
    """The registered kind ``prefix``; the entry points are loaded on the first miss."""
    if prefix not in _KINDS:
        _load_entry_points()
    if prefix not in _KINDS:
        raise RecipeError(
            f"calibration sources {prefix}:... need a package that provides them "
            f"(none registered {prefix!r}; the zoo comes with mergelab_bench, part of `pip install -e .`)"
        )
    return _KINDS[prefix]


def zoo_examples(task: str, split: str, zoo: str = "quick", limit: int | None = None) -> Examples:
    """A zoo task's split (texts and label names), read by the registered ``zoo`` kind."""
    return source_kind("zoo").examples(CalibrationSource(zoo_task=task, split=split, zoo=zoo), limit)


def zoo_head_path(task: str, zoo: str = "quick") -> Path:
    """The expert head file of a zoo task (``head: zoo``), from the registered ``zoo`` kind."""
    kind = source_kind("zoo")
    if kind.head is None:
        raise RecipeError("the registered zoo calibration sources have no task heads")
    return kind.head(CalibrationSource(zoo_task=task, zoo=zoo))


def load_examples(source: CalibrationSource, limit: int | None) -> Examples:
    """The first ``limit`` examples of ``source``."""
    if source.path is not None:
        return read_text_file(source.path, text_field=source.text_field, label_field=source.label_field, limit=limit)
    assert source.zoo_task is not None
    return source_kind("zoo").examples(source, limit)


def check_source(source: CalibrationSource) -> None:
    """Cheap checks before any model is loaded (the file exists)."""
    if source.path is not None and not Path(source.path).is_file():
        raise RecipeError(f"{source.path}: calibration file not found")
    if source.head not in (None, "zoo") and not Path(source.head).is_file():
        raise RecipeError(f"{source.head}: head file not found")


def load_tokenizer(folder: str | os.PathLike[str]):
    """The tokenizer saved in a model folder (offline), with a pad token for batching."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types here
        raise RecipeError(
            f"{folder}: no tokenizer could be loaded from the model folder ({type(exc).__name__}); "
            "save the tokenizer next to the weights, or pass tokenized batches from Python"
        ) from None
    if tok.pad_token is None:
        for cand in (tok.eos_token, tok.unk_token, tok.bos_token):
            if cand is not None:
                tok.pad_token = cand
                break
    if tok.pad_token is None:
        raise RecipeError(f"{folder}: the tokenizer has no pad, eos or unk token to pad batches with")
    tok.padding_side = "right"
    return tok


def label_ids(labels: Sequence[Any], names: Sequence[str] | None) -> list[int]:
    """Label ids from ids or names (``names``: the head's or the source's label vocabulary)."""
    index = {str(n): i for i, n in enumerate(names)} if names else {}
    out = []
    for lab in labels:
        if isinstance(lab, bool):
            out.append(int(lab))
        elif isinstance(lab, int):
            out.append(lab)
        elif str(lab) in index:
            out.append(index[str(lab)])
        elif isinstance(lab, str) and lab.lstrip("-").isdigit():
            out.append(int(lab))
        else:
            raise RecipeError(f"label {lab!r} is not an id and not one of the label names {list(index)[:10]}")
    return out


def tokenize_batches(
    tokenizer, texts: Sequence[str], *, batch_size: int, max_length: int, labels: Sequence[int] | None = None
) -> list[dict[str, torch.Tensor]]:
    """Tokenize and cut into batches (file order), each padded to its longest row."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if labels is not None:
            batch["labels"] = torch.tensor(list(labels[start : start + batch_size]), dtype=torch.long)
        out.append(batch)
    return out


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of token id ``rows`` padded on the right to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def batch_rows(batch: Batch) -> int:
    for v in batch.values():
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    raise RecipeError("a calibration batch holds no tensor with a batch dimension")


def take_examples(batches: Iterable[Batch], limit: int | None) -> Iterator[dict[str, Any]]:
    """The batches of ``batches`` up to ``limit`` rows in all (the last one cut)."""
    seen = 0
    for batch in batches:
        if limit is not None and seen >= limit:
            return
        n = batch_rows(batch)
        if limit is not None and seen + n > limit:
            keep = limit - seen
            batch = {
                k: (v[:keep] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
                for k, v in batch.items()
            }
            n = keep
        seen += n
        yield dict(batch)
