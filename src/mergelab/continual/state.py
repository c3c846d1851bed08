"""The state of a continual merge: what it holds, its folder layout, and how a step publishes it.

A state folder holds, and never more (the earlier experts are not kept):

* ``continual.json`` (:class:`StateRecord`): the method and its parameters, the base reference
  (how it was named, its resolved path, its tensor layout and BLAKE3 content hash), one record
  per added expert (label, path, content hash, task-vector norm, the merged norm and λ after its
  step, time), the running scale ``s`` and the method's running statistics (OPCM: the task-vector
  norms and λ);
* ``merged_task_vector/``: the running task vector R (float32 safetensors, sharded like a model,
  one tensor per float tensor of the base), so that the merged model is θ0 + s·R; absent before
  the first expert;
* ``mergelab_output.json``: the manifest every mergelab output gets.

**Atomic steps.** Each step writes a complete new state into a temporary folder beside the state
and publishes it with :class:`mergelab.checkpoint.writer.AtomicOutputDir` (the same machinery as a
merge output replaced with ``--force``): the previous state is moved aside, the new one renamed
into place, the previous one deleted. A step that fails or is interrupted before that leaves the
previous state untouched; a process killed between the two renames leaves the previous state
beside the destination (``.<state>.mergelab-old-<pid>@<host>-*``), and the next command on the state
puts it back (:func:`recover`). Steps on one state are serialised by a lock on the state folder.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mergelab.checkpoint import output_guard as guard
from mergelab.checkpoint.reader import CheckpointReader, SafetensorsReader, TensorMeta, open_checkpoint, weight_files
from mergelab.errors import CheckpointError, OutputError

FORMAT: Literal["mergelab-continual"] = "mergelab-continual"
FORMAT_VERSION = 1
RECORD_FILE = "continual.json"
DELTA_DIR = "merged_task_vector"
KIND = "continual-state"
"""The ``kind`` in the state folder's ``mergelab_output.json``."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BaseRecord(_Record):
    """How the base was named, where it was, and what it held (layout digest, content hash)."""

    label: str
    path: str | None = None
    layout: str
    tensors: int
    parameters: int
    content_hash: str | None = None  # set by the first step (a step reads the whole base)


class ExpertRecord(_Record):
    """One added expert: its provenance and what its step did to the merge."""

    index: int
    label: str
    path: str | None = None
    content_hash: str
    files: list[tuple[str, int, int]] | None = None  # (real path, size, mtime ns) of its weight files
    task_vector_norm: float
    merged_norm: float
    scale: float
    history: dict[str, float] = Field(default_factory=dict)
    seconds: float
    added: str


class StateRecord(_Record):
    """``continual.json``: everything a state holds besides the running task vector itself."""

    format: Literal["mergelab-continual"] = FORMAT
    format_version: int = FORMAT_VERSION
    method: str
    params: dict[str, Any]
    base: BaseRecord
    state_dtype: Literal["float32"] = "float32"
    scale: float = 1.0
    stats: dict[str, Any] = Field(default_factory=dict)
    experts: list[ExpertRecord] = Field(default_factory=list)
    created: str
    mergelab_version: str

    @property
    def steps(self) -> int:
        return len(self.experts)


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def layout_digest(metas: Mapping[str, TensorMeta]) -> str:
    """A digest of a model's tensor names, shapes and dtypes (headers only): a changed base is caught
    before any tensor is read."""
    import blake3

    h = blake3.blake3()
    for name in sorted(metas):
        m = metas[name]
        h.update(f"{name}\x00{str(m.dtype).removeprefix('torch.')}\x00{tuple(m.shape)}\n".encode())
    return h.hexdigest()


def file_signature(reader: CheckpointReader) -> list[tuple[str, int, int]] | None:
    """(real path, size, mtime in ns) of the reader's weight files, sorted; None for in-memory models."""
    out = []
    for f in weight_files(reader):
        try:
            st = os.stat(f)
        except OSError:
            return None
        out.append((os.path.realpath(f), st.st_size, st.st_mtime_ns))
    return sorted(out) or None


def local_path(ref: Any) -> str | None:
    """The absolute path of a model named by a local path (None for a Hub id or an in-memory model)."""
    if not isinstance(ref, (str, os.PathLike)):
        return None
    p = os.path.expanduser(os.fspath(ref))
    return os.path.abspath(p) if os.path.lexists(p) else None


# --------------------------------------------------------------------------------- the folder


def is_state_folder(folder: Path) -> bool:
    return (folder / RECORD_FILE).is_file()


def recover(folder: Path) -> list[str]:
    """Put back a state that a killed step had moved aside, and remove the temporary folders of dead
    steps (:func:`mergelab.checkpoint.output_guard.clean_stale`); one line per action."""
    notes = guard.clean_stale(guard.resolve_dest(folder))
    for note in notes:
        warnings.warn(note, guard.OutputNote, stacklevel=3)
    return notes


def read_record(folder: Path) -> StateRecord:
    """The state's ``continual.json`` (a one-line CheckpointError when the folder is not a state)."""
    path = folder / RECORD_FILE
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: no such continual state folder; create one with `mergelab continual init BASE {folder}`"
        )
    if not path.is_file():
        raise CheckpointError(
            f"{folder}: not a continual state folder (no {RECORD_FILE}); create one with "
            f"`mergelab continual init BASE FOLDER`"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot parse ({exc}); the state is damaged") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a mergelab continual state (format is not {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: state format version {data.get('format_version')!r}, this mergelab reads {FORMAT_VERSION}; "
            "use the mergelab version that wrote it"
        )
    try:
        return StateRecord.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise CheckpointError(f"{path}: {where}: {first['msg']}; the state is damaged") from None


def write_record(folder: Path, record: StateRecord) -> None:
    (folder / RECORD_FILE).write_text(json.dumps(record.model_dump(mode="json"), indent=1) + "\n")


def open_delta(folder: Path) -> CheckpointReader:
    """The running task vector R of a state folder (read-only)."""
    sub = folder / DELTA_DIR
    if not sub.is_dir():
        raise CheckpointError(
            f"{folder}: the state records experts but has no {DELTA_DIR}/; the state is damaged: start again "
            "with `mergelab continual init`"
        )
    reader = open_checkpoint(sub)
    if not isinstance(reader, SafetensorsReader):
        raise CheckpointError(f"{sub}: expected safetensors files; the state is damaged")
    return reader


def check_replaceable(folder: Path) -> None:
    """Refuse to step a state folder holding files mergelab did not write (they would be lost)."""
    problem = guard.mergelab_output_problem(folder)
    if problem is not None:
        raise OutputError(
            f"{folder}: a step replaces the whole state folder, and {problem}; move those files out of the state"
        )


def folder_bytes(folder: Path) -> int:
    """Bytes of every file under ``folder``."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


PUBLISH_WAIT = 10.0
"""Seconds a step waits for a state that another step is publishing (moved aside, not yet renamed in)."""


def _publishing(folder: Path) -> bool:
    """Whether a previous state of ``folder`` sits moved aside beside it (a step publishing, or killed doing so)."""
    prefix = f".{folder.name}.{guard.OLD_TAG}-"
    try:
        return any(name.startswith(prefix) for name in os.listdir(folder.parent))
    except OSError:
        return False


@contextlib.contextmanager
def state_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on the state folder for one step (waits for a step in progress).

    A step replaces the folder, so after taking the lock the folder is checked to still be the one
    at that path (else the lock is retaken on the new one): a waiting step then starts from the state
    the previous step published, and two steps can never both start from the same state.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: steps are not serialised
        yield
        return
    deadline = time.monotonic() + PUBLISH_WAIT
    while True:
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError as exc:
            if exc.errno == errno.ENOENT and _publishing(folder) and time.monotonic() < deadline:
                time.sleep(0.05)  # another step is between its two renames
                continue
            if exc.errno == errno.ENOENT:
                raise CheckpointError(
                    f"{folder}: no such continual state folder; create one with `mergelab continual init BASE {folder}`"
                ) from None
            raise CheckpointError(f"{folder}: cannot open the state folder ({exc.strerror})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(folder))
            except OSError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        os.close(fd)


def describe_inputs(*refs: tuple[str, Any]) -> Sequence[tuple[str, str]]:
    """(role, path) of the local inputs of a step, for the destination checks."""
    return [(role, p) for role, ref in refs if (p := local_path(ref)) is not None]
