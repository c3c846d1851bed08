"""Evict benchmark inputs from the page cache, and measure how much of them is still cached.

``evict(paths, method)`` empties the page cache of every file under ``paths`` before a cold run:

* ``drop_caches``: ``sync``, then ``3`` written to ``/proc/sys/vm/drop_caches`` (root only; drops
  every clean page of the machine: the interpreter's and libraries' files too, and other
  processes' caches);
* ``fadvise``: per file, ``fsync`` then ``posix_fadvise(POSIX_FADV_DONTNEED)`` over the whole
  file (any user; only these files, so start-up files stay cached; pages another process has
  mapped or still dirty stay);
* ``auto`` (the default): ``drop_caches`` when it can be written, else ``fadvise``; when the drop
  leaves more than 5 % of the bytes cached (some sandboxes accept the write and ignore it),
  ``fadvise`` runs after it.

What stays cached is measured with ``mincore(2)`` over a read-only ``mmap`` of each file (through
ctypes; the mapping itself reads nothing). Linux reports a file's page-cache residency to its
owner, to root and to whoever may write it; for other files, and where mincore is missing, the
fraction is ``None`` (not verified).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DROP_CACHES = Path("/proc/sys/vm/drop_caches")
METHODS = ("auto", "drop_caches", "fadvise")
LEFT_OVER = 0.05  # resident fraction above which a drop_caches is followed by fadvise


@dataclass
class Eviction:
    """What one eviction did: the method used, its cost, and the cached fraction before and after."""

    method: str
    seconds: float
    files: int
    bytes: int
    resident_before: float | None
    resident_after: float | None
    note: str = ""

    def line(self) -> str:
        def pct(x: float | None) -> str:
            return "not verified" if x is None else f"{100 * x:.1f} %"

        return (
            f"evicted {self.files} file(s), {self.bytes / 1e9:.2f} GB, by {self.method} in {self.seconds:.2f} s; "
            f"cached before {pct(self.resident_before)}, after {pct(self.resident_after)} (mincore)"
            + (f"; {self.note}" if self.note else "")
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def files_under(paths: Iterable[Path]) -> list[Path]:
    """Every regular file under ``paths`` (a path may also be a file), sorted, each once."""
    out: set[Path] = set()
    for p in map(Path, paths):
        if p.is_file():
            out.add(p)
        elif p.is_dir():
            out.update(f for f in p.rglob("*") if f.is_file() and not f.is_symlink())
    return sorted(out)


# ---------------------------------------------------------------------------------------------
# measuring residency


def _libc() -> Any:
    name = ctypes.util.find_library("c") or "libc.so.6"
    lib = ctypes.CDLL(name, use_errno=True)
    lib.mmap.restype = ctypes.c_void_p
    lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return lib


_LIBC: Any = None


def resident_bytes(path: Path) -> int | None:
    """Bytes of ``path`` in the page cache (``mincore`` of a read-only mapping); None if unknown."""
    global _LIBC
    size = os.path.getsize(path)
    if size == 0:
        return 0
    if not os.access(path, os.W_OK) and os.geteuid() != 0 and os.stat(path).st_uid != os.geteuid():
        return None  # Linux hides the page cache of files the caller could not write
    try:
        if _LIBC is None:
            _LIBC = _libc()
        lib = _LIBC
    except (OSError, AttributeError):
        return None
    import numpy as np

    fd = os.open(path, os.O_RDONLY)
    try:
        addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
            vec = (ctypes.c_ubyte * pages)()
            if lib.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                return None
            cached = int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
        finally:
            lib.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)
    return min(cached * mmap.PAGESIZE, size)


def resident_fraction(files: list[Path]) -> float | None:
    """Cached share of the bytes of ``files``; None when any file's residency is unknown."""
    total = cached = 0
    for f in files:
        r = resident_bytes(f)
        if r is None:
            return None
        total += os.path.getsize(f)
        cached += r
    return cached / total if total else 0.0


# ---------------------------------------------------------------------------------------------
# evicting


def drop_caches() -> None:
    """``sync`` and drop every clean page-cache page of the machine; OSError when not permitted."""
    os.sync()
    with open(DROP_CACHES, "w") as fh:
        fh.write("3\n")


def fadvise_dontneed(files: list[Path]) -> None:
    """Write back and drop the cached pages of each file (``fsync`` + ``POSIX_FADV_DONTNEED``)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):  # some file systems refuse fsync on a read-only descriptor
                os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def evict(paths: Iterable[Path], method: str = "auto") -> Eviction:
    """Evict every file under ``paths`` from the page cache by ``method`` (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"unknown eviction method {method!r}; choose from {', '.join(METHODS)}")
    files = files_under(paths)
    nbytes = sum(os.path.getsize(f) for f in files)
    before = resident_fraction(files)
    t0 = time.perf_counter()
    used, note = "", ""
    if method in ("auto", "drop_caches"):
        try:
            drop_caches()
            used = "drop_caches"
        except OSError as exc:
            if method == "drop_caches":
                raise
            note = f"{DROP_CACHES} not writable ({exc.strerror or exc}), fell back to fadvise"
    after = resident_fraction(files) if used else None
    if not used or (method == "auto" and after is not None and after > LEFT_OVER):
        if used:
            note = f"drop_caches left {100 * (after or 0):.1f} % cached, fadvise after it"
        fadvise_dontneed(files)
        used = f"{used}+fadvise" if used else "fadvise"
        after = resident_fraction(files)
    return Eviction(used, time.perf_counter() - t0, len(files), nbytes, before, after, note)
