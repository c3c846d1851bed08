"""Output checkpoints: sharded safetensors written in place, atomically.

The plan knows every output tensor's name, shape and dtype before any data is read, so the
writer lays out all shards up front (header first, then each tensor at a fixed offset) and
writes each tensor with ``pwrite`` as soon as it is merged. Nothing is buffered: output memory
is one tensor, whatever the shard size. Shards follow the Hugging Face naming
(``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``; a single shard is
``model.safetensors``) and carry ``{"format": "pt"}`` metadata so transformers loads them.

Everything is written into a temporary folder beside the destination, which is renamed into
place only when complete; a failure removes it, so no half-written model is ever left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from mergelab.checkpoint.safetensors_file import layout_header
from mergelab.errors import OutputError

DEFAULT_MAX_SHARD = 2 * 1000**3


def parse_size(value: str | int) -> int:
    """Bytes from ``"2GB"``, ``"500MB"``, ``"1.5GiB"`` or an int."""
    if isinstance(value, int):
        return value
    s = value.strip().upper().replace(" ", "")
    units = {
        "KIB": 1024,
        "MIB": 1024**2,
        "GIB": 1024**3,
        "TIB": 1024**4,
        "KB": 1000,
        "MB": 1000**2,
        "GB": 1000**3,
        "TB": 1000**4,
        "K": 1000,
        "M": 1000**2,
        "G": 1000**3,
        "B": 1,
    }
    for unit, mult in units.items():
        if s.endswith(unit):
            try:
                n = float(s[: -len(unit)])
            except ValueError:
                break
            if n <= 0:
                break
            return int(n * mult)
    try:
        n = int(s)
        if n > 0:
            return n
    except ValueError:
        pass
    raise OutputError(f"invalid size {value!r}: use e.g. 2GB, 500MB or a number of bytes")


class _Shard:
    def __init__(self, path: Path, items: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path = path
        self.names = [n for n, _, _ in items]
        header, self.offsets = layout_header(items, {"format": "pt"})
        self.size = len(header) + sum(
            int(torch.Size(shape).numel()) * torch.empty((), dtype=dt).element_size() for _, dt, shape in items
        )
        self.pending = set(self.names)
        self.header = header
        self.fd: int | None = None

    def open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, self.header, 0)
        os.ftruncate(self.fd, self.size)

    def write(self, name: str, data: memoryview) -> None:
        if self.fd is None:
            self.open()
        assert self.fd is not None
        off = self.offsets[name]
        done = 0
        while done < len(data):
            done += os.pwrite(self.fd, data[done:], off + done)
        self.pending.discard(name)
        if not self.pending:
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ShardedSafetensorsWriter:
    """Streams planned tensors into sharded safetensors files inside ``folder``."""

    def __init__(
        self,
        folder: Path,
        items: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_size: int = DEFAULT_MAX_SHARD,
    ):
        self.folder = folder
        groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
        size = 0
        for item in items:
            nbytes = int(torch.Size(item[2]).numel()) * torch.empty((), dtype=item[1]).element_size()
            if groups[-1] and size + nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += nbytes
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shards = [_Shard(folder / fname, g) for fname, g in zip(names, groups)]
        self._where = {name: shard for shard in self.shards for name in shard.names}
        self._dtypes = {name: dt for g in groups for name, dt, _ in g}
        self.total_bytes = sum(s.size for s in self.shards)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor (any device; cast to its planned dtype if needed)."""
        shard = self._where[name]
        t = tensor.detach()
        if t.dtype != self._dtypes[name]:
            t = t.to(self._dtypes[name])
        t = t.to("cpu").contiguous()
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")  # type: ignore[arg-type]  # numpy stubs: ndarray.__buffer__ only on Python >= 3.12
        shard.write(name, data)

    def finish(self) -> None:
        """Check every planned tensor was written and write the index."""
        missing = [n for s in self.shards for n in s.pending]
        for s in self.shards:
            if s.fd is None and s.pending:
                s.open()  # zero-size shards of empty tensors
            s.close()
        if missing:
            raise OutputError(f"internal error: {len(missing)} planned tensors were not written (first: {missing[0]})")
        if len(self.shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.size - len(s.header) for s in self.shards)},
                "weight_map": {name: s.path.name for s in self.shards for name in s.names},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for s in self.shards:
            s.close()

    # --- writing from other processes (distributed executors) ------------------------------

    def layout(self) -> ShardLayout:
        """Where every planned tensor goes: hand it to workers that write in place (picklable)."""
        return ShardLayout(
            {
                name: (str(shard.path), shard.offsets[name], self._dtypes[name])
                for shard in self.shards
                for name in shard.names
            }
        )

    def prepare_files(self) -> None:
        """Create every shard file with its header and full size, so that workers only ``pwrite`` tensors."""
        for s in self.shards:
            if s.fd is None:
                s.open()
            s.close()

    def mark_written(self, names: Iterable[str]) -> None:
        """Record tensors that workers wrote through :meth:`layout` (after :meth:`prepare_files`)."""
        for name in names:
            self._where[name].pending.discard(name)


class ShardLayout:
    """A sink that writes planned tensors in place into shard files laid out by the driver.

    Each tensor goes to its fixed offset with ``pwrite``; files are opened without truncation,
    so several processes can write disjoint tensors of the same shard.
    """

    def __init__(self, where: dict[str, tuple[str, int, torch.dtype]]):
        self.where = where
        self._fds: dict[str, int] = {}
        self.written: list[str] = []

    def __getstate__(self) -> dict:
        return {"where": self.where}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["where"])  # type: ignore[misc]

    def add(self, name: str, tensor: torch.Tensor) -> None:
        path, off, dtype = self.where[name]
        t = tensor.detach()
        if t.dtype != dtype:
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")  # type: ignore[arg-type]  # numpy stubs: ndarray.__buffer__ only on Python >= 3.12
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_WRONLY)
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], off + done)
        self.written.append(name)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class AtomicOutputDir:
    """A temporary folder beside ``dest`` that becomes ``dest`` only on :meth:`commit`."""

    def __init__(self, dest: Path, force: bool = False):
        self.dest = Path(dest).expanduser().absolute()
        self.force = force
        if self.dest.exists() and not force:
            raise OutputError(f"{self.dest}: destination exists; choose another folder or pass --force to replace it")
        if self.dest.exists() and not self.dest.is_dir():
            raise OutputError(f"{self.dest}: destination exists and is not a folder")
        parent = self.dest.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.mergelab-tmp-", dir=parent))
        except OSError as exc:
            raise OutputError(f"{parent}: cannot create the output folder ({exc.strerror}); check permissions") from exc

    def commit(self) -> Path:
        trash: Path | None = None
        if self.dest.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.mergelab-old-", dir=self.dest.parent))
            os.rename(self.dest, trash / "old")
        try:
            os.rename(self.tmp, self.dest)
        except BaseException:
            if trash is not None:  # put the previous output back before reporting the failure
                os.rename(trash / "old", self.dest)
                shutil.rmtree(trash, ignore_errors=True)
            raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.dest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
