"""Safety rules for output folders: what a merge may write over, and how it publishes.

* **Inputs are never an output.** The destination's real path (symlinks, ``..`` and relative
  parts resolved) may not be an input of the recipe, contain one, or lie inside one
  (:func:`check_not_input`), with or without ``--force``.
* **``--force`` replaces only a previous mergelab output**: a folder holding the manifest
  :data:`MANIFEST` that every output gets at commit (the list of files mergelab wrote), and no
  other file (:func:`mergelab_output_problem`). Outputs of mergelab versions without the manifest are
  recognised by their model card (``tags`` with ``mergelab`` in the front matter). Any other
  folder needs ``--force-any``.
* **Publishing never replaces what appeared meanwhile.** The temporary folder is renamed onto the
  destination with :func:`rename_noreplace` (Linux ``renameat2(RENAME_NOREPLACE)``, macOS
  ``renamex_np(RENAME_EXCL)``; elsewhere an existence check under a lock on the parent folder).
* **Temporary folders name their owner** (``.<out>.mergelab-tmp-<pid>@<host>-XXXXXXXX``), so that a
  later run into the same destination removes those of dead processes (:func:`clean_stale`).
* **SIGTERM is an interrupt** while the CLI runs (:func:`sigterm_as_interrupt`), so the temporary
  folder is removed as on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import platform
import re
import shutil
import signal
import socket
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from mergelab.errors import OutputError

MANIFEST = "mergelab_output.json"
"""Written into every output folder at commit: the files mergelab wrote there."""

TMP_TAG = "mergelab-tmp"
OLD_TAG = "mergelab-old"
WORK_TAG = "mergelab-work"
_OWNED = re.compile(r"^(?P<tag>mergelab-(?:tmp|old|work))-(?P<pid>\d+)@(?P<host>[^/]+)-[^-@/]+$")
"""``<tag>-<pid>@<host>-<random>``: the part of a working folder's name after ``.<out>.``."""


# ------------------------------------------------------------------------------- owners


class OutputNote(UserWarning):
    """What a run did or saw beside its destination (a stale temporary folder removed or left)."""


def host_tag() -> str:
    """This machine's name as it appears in temporary folder names (safe characters only)."""
    name = socket.gethostname() or "localhost"
    return re.sub(r"[^A-Za-z0-9.]", "_", name)[:64] or "localhost"


def owner_prefix(dest: Path, tag: str) -> str:
    """``.<name>.<tag>-<pid>@<host>-``: the prefix of a working folder beside ``dest``."""
    return f".{dest.name}.{tag}-{os.getpid()}@{host_tag()}-"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a process of another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def clean_stale(dest: Path) -> list[str]:
    """Remove the working folders beside ``dest`` left by dead processes of this machine.

    Temporary folders (``mergelab-tmp``) and scratch folders (``mergelab-work``) of a process that
    no longer runs are deleted. A previous output moved aside by a ``--force`` run that died
    before finishing (``mergelab-old``) is put back at ``dest`` when ``dest`` is missing, and deleted
    when ``dest`` holds the new output. Folders of live processes, of other machines and without a
    recorded owner are left alone. Returns one line per folder removed, restored or kept.
    """
    notes: list[str] = []
    parent = dest.parent
    prefix = f".{dest.name}."
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return notes
    me = host_tag()
    for entry in entries:
        if not entry.startswith(prefix) or "mergelab-" not in entry:
            continue
        rest = entry[len(prefix) :]
        path = parent / entry
        m = _OWNED.match(rest)
        if m is None:
            if rest.startswith((TMP_TAG + "-", OLD_TAG + "-")) and path.is_dir():
                notes.append(
                    f"left {path}: a temporary folder with no recorded owner; remove it if no merge is running"
                )
            continue
        pid, host, tag = int(m["pid"]), m["host"], m["tag"]
        if host != me:
            notes.append(f"left {path}: it belongs to process {pid} on {host}; remove it if that run is gone")
            continue
        if pid == os.getpid() or pid_alive(pid):
            continue
        if tag == OLD_TAG:
            old = path / "old"
            if old.is_dir() and not os.path.lexists(dest):
                try:
                    rename_noreplace(old, dest)
                except OSError:
                    notes.append(f"left {path}: the previous output of dead process {pid} is kept in {old}")
                    continue
                shutil.rmtree(path, ignore_errors=True)
                notes.append(f"restored {dest} from {path}, moved aside by process {pid} that died while replacing it")
                continue
        shutil.rmtree(path, ignore_errors=True)
        notes.append(f"removed {path}, the stale temporary folder of process {pid} (no longer running)")
    return notes


# ------------------------------------------------------------------------------- paths


def resolve_dest(out: str | os.PathLike[str]) -> Path:
    """Absolute destination path with its parent's symlinks and ``..`` resolved; the last part is kept
    as given (so a symlink at the destination itself is seen as one)."""
    p = os.path.expanduser(os.fspath(out))
    name = os.path.basename(p.rstrip(os.sep)) if p.rstrip(os.sep) else ""
    if name in ("", ".", ".."):
        return Path(os.path.realpath(p))
    return Path(os.path.realpath(os.path.dirname(p.rstrip(os.sep)) or ".")) / name


_PATH_KEYS = {
    "base_model": "base_model",
    "model": "model",
    "path": "calibration data",
    "head": "calibration head",
    "statistics": "statistics",
    "statistics_dir": "statistics_dir",
    "tokenizer_source": "tokenizer_source",
    "source": "tokenizer source",  # the `tokenizer:` block and its tokens' sources
}


def recipe_inputs(recipe: Any) -> list[tuple[str, str]]:
    """(role, path) of every local file or folder a recipe reads (models, tokenizer, data, statistics).

    Walks the recipe's fields by name, so new recipe forms (slices, stages) are covered as long as
    they use the same keys. References that are not local paths (Hub ids) are skipped.
    """
    data = recipe.model_dump() if hasattr(recipe, "model_dump") else recipe
    found: list[tuple[str, str]] = []

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key in _PATH_KEYS and isinstance(value, str):
                    ref = value.removeprefix("model:") if key in ("tokenizer_source", "source") else value
                    if os.path.lexists(os.path.expanduser(ref)):
                        found.append((_PATH_KEYS[key], ref))
                else:
                    walk(value)
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)

    walk(data)
    return found


def plan_inputs(plan: Any) -> list[tuple[str, str]]:
    """(role, path) of the folders and files the plan's readers read."""
    found: list[tuple[str, str]] = []
    graph = getattr(plan, "graph", None)
    for reader in list(getattr(graph, "sources", {}).values()) + list(getattr(graph, "aux", None) or []):
        folder = getattr(reader, "folder", None)
        if folder is not None:
            found.append(("input", str(folder)))
        for f in getattr(reader, "_files", ()):
            found.append(("input", str(f)))
    return found


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(dest: Path, inputs: Iterable[tuple[str, str | os.PathLike[str]]]) -> None:
    """Refuse a destination that is an input, contains one, or lies inside one (real paths compared,
    and the files themselves where they exist, so symlinks and bind mounts do not hide a match)."""
    d = Path(os.path.realpath(dest))
    for role, ref in inputs:
        raw = Path(os.path.expanduser(os.fspath(ref)))
        if not os.path.lexists(raw):
            continue
        r = Path(os.path.realpath(raw))
        if d == r or _same(d, r):
            raise OutputError(f"{dest}: is the {role} {raw}; write the output to a new folder outside the inputs")
        if d in r.parents or any(_same(d, a) for a in r.parents):
            raise OutputError(f"{dest}: contains the {role} {raw}; write the output to a new folder outside the inputs")
        if r in d.parents or any(_same(a, r) for a in d.parents if os.path.exists(a)):
            raise OutputError(
                f"{dest}: is inside the {role} {raw}; write the output to a new folder outside the inputs"
            )


def check_cache_outside_inputs(
    cache: str | os.PathLike[str], inputs: Iterable[tuple[str, str | os.PathLike[str]]], what: str
) -> None:
    """Refuse a folder mergelab writes into (a statistics cache) that is an input or lies inside one;
    one that contains inputs is fine (it only gets subfolders of its own)."""
    c = Path(os.path.realpath(os.path.expanduser(os.fspath(cache))))
    for role, ref in inputs:
        if role == what:
            continue
        raw = Path(os.path.expanduser(os.fspath(ref)))
        r = Path(os.path.realpath(raw))
        if os.path.isdir(r) and (c == r or r in c.parents):
            raise OutputError(f"{cache}: the {what} is inside the {role} {raw}; choose a folder outside the inputs")


# ------------------------------------------------------------------------------- the manifest


def folder_files(folder: Path) -> list[str]:
    """Every file (and symlink) under ``folder``, relative, sorted; the manifest itself excluded."""
    names: list[str] = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for d in list(dirs):
            if os.path.islink(Path(root) / d):
                names.append(str(rel / d))
                dirs.remove(d)
        names += [str(rel / f) for f in files]
    return sorted(n for n in (os.path.normpath(n) for n in names) if n != MANIFEST)


def write_manifest(folder: Path, kind: str, version: str) -> None:
    """Record in ``folder`` that mergelab wrote it, and which files (call last, before publishing)."""
    data = {"mergelab_output": 1, "kind": kind, "version": version, "files": folder_files(folder)}
    (folder / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")


def _card_says_mergelab(card: Path) -> bool:
    try:
        text = card.read_text(errors="replace")
    except OSError:
        return False
    if not text.startswith("---"):
        return False
    end = text.find("\n---", 3)
    try:
        front = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return False
    tags = front.get("tags") if isinstance(front, dict) else None
    return isinstance(tags, list) and "mergelab" in tags


def mergelab_output_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a previous mergelab output that ``--force`` may replace (None if it is)."""
    manifest = folder / MANIFEST
    if manifest.is_file():
        try:
            listed = set(json.loads(manifest.read_text()).get("files", []))
        except (OSError, ValueError, AttributeError):
            return f"its {MANIFEST} is unreadable"
        extra = [f for f in folder_files(folder) if f not in listed]
        if extra:
            more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
            return f"it holds files mergelab did not write ({extra[0]}{more})"
        return None
    if _card_says_mergelab(folder / "README.md"):
        return None  # written by a mergelab version without the manifest
    return "it is not a mergelab output (no " + MANIFEST + ")"


def check_replaceable(dest: Path, force: bool, force_any: bool) -> None:
    """The one-line refusal for an existing ``dest`` that the flags do not allow to replace."""
    if force_any:
        return
    if not force:
        raise OutputError(
            f"{dest}: destination exists; choose another folder, or pass --force to replace a previous mergelab output"
        )
    problem = mergelab_output_problem(dest)
    if problem is not None:
        raise OutputError(
            f"{dest}: --force only replaces a previous mergelab output and {problem}; "
            "choose another folder, or pass --force-any to replace it anyway"
        )


# ------------------------------------------------------------------------------- publishing

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCL = 0x4  # macOS renamex_np
_SYSCALL_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276, "i686": 353, "i386": 353}


def _load_noreplace() -> Any:
    """A ``fn(src: bytes, dst: bytes) -> int`` renaming without replacing, or None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux"):
        fn = getattr(libc, "renameat2", None)
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            return lambda s, d: fn(_AT_FDCWD, s, _AT_FDCWD, d, _RENAME_NOREPLACE)
        nr = _SYSCALL_RENAMEAT2.get(platform.machine().lower())
        if nr is not None and hasattr(libc, "syscall"):
            sc = libc.syscall
            sc.restype = ctypes.c_long
            return lambda s, d: sc(
                ctypes.c_long(nr),
                ctypes.c_int(_AT_FDCWD),
                ctypes.c_char_p(s),
                ctypes.c_int(_AT_FDCWD),
                ctypes.c_char_p(d),
                ctypes.c_uint(_RENAME_NOREPLACE),
            )
    if sys.platform == "darwin":
        fn = getattr(libc, "renamex_np", None)
        if fn is not None:
            fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
            fn.restype = ctypes.c_int
            return lambda s, d: fn(s, d, _RENAME_EXCL)
    return None


_noreplace = _load_noreplace()


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst``, failing with ``FileExistsError`` if ``dst`` exists (never replacing it).

    Atomic where the kernel offers it; otherwise (no such call, or a file system that refuses the
    flag) an existence check followed by ``os.rename``: callers hold :func:`parent_lock` so that
    concurrent mergelab runs cannot interleave there.
    """
    s, d = os.fsencode(src), os.fsencode(dst)
    if _noreplace is not None:
        if _noreplace(s, d) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), os.fsdecode(src), None, os.fsdecode(dst))
    if os.path.lexists(d):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(dst))
    os.rename(src, dst)


@contextlib.contextmanager
def parent_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder`` (the destination's parent) for the publishing steps; a no-op
    where folders cannot be locked (the no-replace rename still protects the destination there)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


# ------------------------------------------------------------------------------- modes


def current_umask() -> int:
    """The process umask (read from /proc where possible, so the umask is never changed meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: Path) -> None:
    """Give a folder made by ``mkdtemp`` (0700) the mode a plain ``mkdir`` would have."""
    os.chmod(folder, 0o777 & ~current_umask())


# ------------------------------------------------------------------------------- signals


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM under :func:`sigterm_as_interrupt`.

    A ``KeyboardInterrupt``, so every cleanup written for Ctrl-C runs for it too.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(f"received signal {signum}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` in the main thread (once: a second
    SIGTERM during the cleanup is ignored); the previous handler is restored afterwards.

    The CLI runs every command inside it. The Python API does not install handlers; a program that
    wants the same cleanup on SIGTERM wraps its calls in this context manager.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
