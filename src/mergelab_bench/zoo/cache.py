"""Where built zoo artifacts live, and how they are keyed.

Everything the zoo builds (task data, trained experts, evaluation features) goes under one
cache root: ``$MERGELAB_CACHE`` if set, else ``~/.cache/mergelab``. Each artifact lives in a
directory named by the hash of the configuration that produced it (:func:`config_key`), so a
changed config or a changed source gives a new directory and an unchanged one is reused.
Directories are written under a temporary name and renamed into place when complete
(:func:`atomic_dir`), so an interrupted build never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CACHE_ENV = "MERGELAB_CACHE"
KEY_CHARS = 16


def cache_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``override``, else ``$MERGELAB_CACHE``, else ``~/.cache/mergelab``."""
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "mergelab"


def zoo_root(override: str | os.PathLike[str] | None = None) -> Path:
    """The zoo's part of the cache (``<root>/zoo``)."""
    return cache_root(override) / "zoo"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the byte form that keys are hashed from."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def config_key(obj: Any) -> str:
    """A short content address (hex sha256 prefix) of a JSON-serialisable config."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:KEY_CHARS]


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys sorted) atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(final: Path) -> None:
    """Remove ``final``'s leftover temporary folders whose builder process has exited."""
    prefix = f".{final.name}."
    for p in final.parent.glob(f"{glob.escape(prefix)}*.partial"):
        tag = p.name[len(prefix) : -len(".partial")]
        pid_text = tag.split("-", 1)[0]
        if pid_text.isdigit() and "-" in tag and _pid_alive(int(pid_text)):
            continue  # a live build (this name scheme) owns it
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``final`` when the block succeeds.

    An existing ``final`` is replaced. On an exception the temporary directory is removed
    and ``final`` is left as it was. The temporary name carries the builder's process id, so
    the partial folders of a build that was killed (no exception to clean up after) are
    removed by the next build of the same ``final``; those of a live process are left alone.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
