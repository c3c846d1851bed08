"""The zoo cache's atomic folders: nothing half-built survives, not even a killed build's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mergelab_bench.zoo.cache import atomic_dir


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_dir_renames_on_success_and_removes_on_error(tmp_path: Path) -> None:
    final = tmp_path / "thing"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("boom")
    assert (final / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]


def test_a_killed_builds_partial_folder_is_swept_a_live_ones_is_kept(tmp_path: Path) -> None:
    final = tmp_path / "expert-x"
    dead = tmp_path / f".expert-x.{_dead_pid()}-0badc0de.partial"
    live = tmp_path / f".expert-x.{os.getpid()}-feedbeef.partial"
    old_scheme = tmp_path / ".expert-x.4d9e6a40.partial"
    other = tmp_path / ".expert-y.1-00000000.partial"
    for p in (dead, live, old_scheme, other):
        p.mkdir()
    with atomic_dir(final) as tmp:
        assert tmp.name.startswith(f".expert-x.{os.getpid()}-")
    assert final.is_dir() and live.is_dir() and other.is_dir()
    assert not dead.exists() and not old_scheme.exists()
