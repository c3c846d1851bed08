"""Output checkpoints: sharded safetensors written in place, atomically.

The plan knows every output tensor's name, shape and dtype before any data is read, so the
writer lays out all shards up front (header first, then each tensor at a fixed offset) and
writes each tensor with ``pwrite`` as soon as it is merged. Nothing is buffered: output memory
is one tensor, whatever the shard size. Shards follow the Hugging Face naming
(``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``; a single shard is
``model.safetensors``) and carry ``{"format": "pt"}`` metadata so transformers loads them.

Everything is written into a temporary folder beside the destination, which is renamed into
place only when complete; a failure removes it, so no half-written model is ever left behind.
The rules on what a destination may be and how it is published live in
:mod:`mergelab.checkpoint.output_guard`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Collection, Iterable
from pathlib import Path

import torch

from mergelab.checkpoint import output_guard as guard
from mergelab.checkpoint.reader import SIDE_FILES
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


def fmt_bytes(n: float) -> str:
    """``512 B``, ``1.5 MB``, ``12.3 GB``: decimal units (as :func:`parse_size` reads them), up to TB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def copy_side_files_of(folder: Path | None, dest: Path, *, skip: Collection[str] = ()) -> None:
    """Copy the model side files (:data:`~mergelab.checkpoint.reader.SIDE_FILES`: config, generation
    config, tokenizer, chat template files) that ``folder`` holds into ``dest``, except those named in
    ``skip``; nothing when ``folder`` is None (an input that is not a folder)."""
    if folder is None:
        return
    for name in SIDE_FILES:
        src = folder / name
        if name not in skip and src.is_file():
            shutil.copyfile(src, dest / name)


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
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask decides
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
    """A temporary folder beside ``dest`` that becomes ``dest`` only on :meth:`commit`.

    Before anything is created it checks the destination (:mod:`mergelab.checkpoint.output_guard`):
    not a symlink or a file, not an input of the run (``inputs``: (role, path) pairs), and, when it
    exists, replaceable under the flags (``force``: a previous mergelab output; ``force_any``: any
    folder). Stale working folders of dead runs into the same destination are removed first;
    ``notes`` says what was removed. The temporary folder follows the umask and names its owner
    (pid and host). :meth:`commit` writes the manifest and publishes with a rename that never
    replaces: a destination that appeared meanwhile is left untouched and the commit fails; under
    ``force`` the previous output is moved aside first and put back if publishing fails.
    """

    def __init__(
        self,
        dest: str | os.PathLike[str],
        force: bool = False,
        *,
        force_any: bool = False,
        inputs: Iterable[tuple[str, str | os.PathLike[str]]] = (),
        kind: str = "merge",
    ):
        self.dest = check_destination(dest, inputs, force=force, force_any=force_any)
        self.force = force or force_any
        self.force_any = force_any
        self.kind = kind
        self._work: Path | None = None
        self.notes = guard.clean_stale(self.dest)
        for note in self.notes:
            warnings.warn(note, guard.OutputNote, stacklevel=2)
        if os.path.lexists(self.dest):  # a stale --force run's previous output may have been restored
            guard.check_replaceable(self.dest, force, force_any)
        parent = self.dest.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=guard.owner_prefix(self.dest, guard.TMP_TAG), dir=parent))
            guard.follow_umask(self.tmp)
        except OSError as exc:
            raise OutputError(f"{parent}: cannot create the output folder ({exc.strerror}); check permissions") from exc

    def workdir(self) -> Path:
        """A scratch folder beside the destination (owner recorded), removed by :meth:`close_workdir`."""
        if self._work is None:
            self._work = Path(
                tempfile.mkdtemp(prefix=guard.owner_prefix(self.dest, guard.WORK_TAG), dir=self.dest.parent)
            )
        return self._work

    def close_workdir(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None

    def commit(self) -> Path:
        """Publish the temporary folder as the destination (see the class docstring)."""
        from mergelab import __version__

        guard.write_manifest(self.tmp, self.kind, __version__)
        trash: Path | None = None
        with guard.parent_lock(self.dest.parent):
            try:
                if os.path.lexists(self.dest):
                    if not self.force:
                        raise FileExistsError(errno.EEXIST, "exists", str(self.dest))
                    trash = Path(
                        tempfile.mkdtemp(prefix=guard.owner_prefix(self.dest, guard.OLD_TAG), dir=self.dest.parent)
                    )
                    os.rename(self.dest, trash / "old")
                    old = trash / "old"
                    problem = "is a symbolic link" if old.is_symlink() else None
                    if problem is None and not self.force_any:
                        problem = guard.mergelab_output_problem(old)
                    if problem is not None:
                        raise OutputError(
                            f"{self.dest}: changed while the merge ran and {problem}; "
                            "it was left untouched and this run's output discarded"
                        )
                guard.rename_noreplace(self.tmp, self.dest)
            except BaseException as exc:
                if trash is not None:  # put the previous output back before reporting the failure
                    self._restore(trash)
                if isinstance(exc, FileExistsError):
                    raise OutputError(
                        f"{self.dest}: appeared while the merge ran (another merge or program created it); "
                        "it was left untouched and this run's output discarded; choose another folder"
                    ) from None
                if isinstance(exc, OSError):
                    kept = "the previous output is unchanged" if trash is not None else "nothing was written"
                    raise OutputError(f"{self.dest}: cannot publish the output ({exc.strerror}); {kept}") from exc
                raise
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        return self.dest

    def _restore(self, trash: Path) -> None:
        """Put the previous output moved into ``trash`` back at the destination (never delete it)."""
        old = trash / "old"
        if os.path.lexists(old):
            try:
                guard.rename_noreplace(old, self.dest)
            except OSError:
                raise OutputError(
                    f"{self.dest}: could not be put back after a failed replacement; the previous output is kept "
                    f"in {old}"
                ) from None
        shutil.rmtree(trash, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.close_workdir()

    def fail(self, exc: BaseException) -> None:
        """Abort after ``exc`` ended the run: remove the temporary folder; an error writing this output
        (:meth:`is_write_error`) is raised as a one-line :class:`OutputError`, anything else is left to the
        caller to re-raise (``except BaseException as exc: dest.fail(exc); raise``)."""
        self.abort()
        if isinstance(exc, OSError) and self.is_write_error(exc):
            raise OutputError(f"{self.dest}: cannot write the output ({exc.strerror}); nothing was written") from exc

    def is_write_error(self, exc: OSError) -> bool:
        """Whether ``exc`` came from writing this output (a file in the temporary folder, or a full disk)."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        name = exc.filename if isinstance(exc.filename, str) else None
        return name is not None and Path(name).absolute().is_relative_to(self.tmp)


def check_destination(
    dest: str | os.PathLike[str],
    inputs: Iterable[tuple[str, str | os.PathLike[str]]] = (),
    *,
    force: bool = False,
    force_any: bool = False,
) -> Path:
    """The resolved destination, after the checks that need no folder to be created: not a symlink,
    not a file, not an input (nor containing or inside one), and replaceable under the flags when it
    exists. Raises a one-line :class:`OutputError`."""
    path = guard.resolve_dest(dest)
    guard.check_not_input(path, inputs)  # first, so that the message names the input
    if path.is_symlink():
        raise OutputError(
            f"{path}: is a symbolic link (to {os.readlink(path)}); give the folder itself, or remove the link"
        )
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder; choose a folder path for the output")
    if path.exists():
        guard.check_replaceable(path, force, force_any)
    return path
