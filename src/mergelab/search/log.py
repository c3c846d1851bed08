"""The trial log: an append-only JSON-lines file that a killed search resumes from.

``OUT/trials.jsonl`` starts with a header line (``{"kind": "header", "fingerprint": ...,
"search": {...}}``: the recipe, space, objective, algorithm, its options and the seed) and gets one
line per finished trial (``{"kind": "trial", ...}``), written and flushed to disk (``fsync``) as
the trial finishes. A search started again into the same folder with the same fingerprint reads
the log and goes on from there (the budget may be raised); a different search is refused. A line
cut short by a kill is dropped when the log is reopened.

Algorithms name each trial with a ``key`` (``map/0/3``, ``evolver/2/1``, ``fw/4``) so that a
resumed run can take a logged trial's result instead of evaluating it again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mergelab.errors import OutputError

LOG_NAME = "trials.jsonl"
VERSION = 1


def fingerprint(search: Mapping[str, Any]) -> str:
    """A stable hash of what defines a search (the budget is not part of it)."""
    text = json.dumps(search, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats as strings (JSON has no NaN/Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class TrialLog:
    """``OUT/trials.jsonl`` (see the module docstring). While open it holds an exclusive lock on
    ``OUT/.search.lock``, so a second search into the same folder is refused instead of interleaving
    its trials; :meth:`close` releases it."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        search: Mapping[str, Any],
        *,
        force: bool = False,
        reset: Callable[[Path], None] | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOG_NAME
        self.search = dict(search)
        self.fingerprint = fingerprint(self.search)
        self.records: list[dict[str, Any]] = []
        self.resumed = False
        self._lock_fh: Any = None
        if self.folder.exists() and not self.folder.is_dir():
            raise OutputError(f"{self.folder}: exists and is not a folder; give --out a folder path")
        if self.folder.exists() and not self.path.exists() and any(self.folder.iterdir()):
            raise OutputError(
                f"{self.folder}: exists and holds no search ({LOG_NAME} missing); use an empty or new --out folder"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock()
        try:
            if self.path.exists() and not force:
                self._read()
                self.resumed = True
                return
            if force and reset is not None:
                reset(self.folder)
            header = {"kind": "header", "version": VERSION, "fingerprint": self.fingerprint, "search": self.search}
            self._write_lines([header], "w")
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        import fcntl

        fh = open(self.folder / ".search.lock", "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            raise OutputError(
                f"{self.folder}: another search is running into this folder; wait for it or use another --out"
            ) from None
        self._lock_fh = fh

    def close(self) -> None:
        """Release the folder's lock."""
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def _read(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        complete = raw.endswith(b"\n")
        good: list[bytes] = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1 or (i == len(lines) - 2 and not lines[-1]):
                    break  # the last line, cut short by a kill
                raise OutputError(f"{self.path}:{i + 1}: not a JSON line; the trial log is damaged") from None
            good.append(line)
            if len(good) == 1 and entry.get("kind") != "header":
                raise OutputError(f"{self.path}: does not start with a search header; the trial log is damaged")
            if entry.get("kind") == "header":
                if entry.get("fingerprint") != self.fingerprint:
                    raise OutputError(
                        f"{self.folder}: holds a different search (its recipe, space, objective, algorithm, options "
                        "or seed differ); use another --out, or --force to start afresh there"
                    )
            elif entry.get("kind") == "trial":
                self.records.append(entry)
        if not good:
            raise OutputError(f"{self.path}: empty trial log; remove it or use --force")
        if not complete or len(good) != len([x for x in lines if x.strip()]):
            # drop a partial last line so that appends start on a fresh line
            self.path.write_bytes(b"\n".join(good) + b"\n")

    def _write_lines(self, entries: list[Mapping[str, Any]], mode: str = "a") -> None:
        with open(self.path, mode, encoding="utf-8") as fh:
            for e in entries:
                fh.write(json.dumps(_clean(e), sort_keys=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Log one finished trial (numbered in log order); returns the logged record."""
        entry = {"kind": "trial", "trial": len(self.records), **{k: v for k, v in record.items() if k != "kind"}}
        self._write_lines([entry])
        self.records.append(entry)
        return entry

    @property
    def trials(self) -> list[dict[str, Any]]:
        """Logged trials that produced a score (failed ones are kept in the log but not here)."""
        return [r for r in self.records if "error" not in r]

    def by_key(self) -> dict[str, dict[str, Any]]:
        return {r["key"]: r for r in self.trials if r.get("key") is not None}
