"""Fault injection on output publishing: the destination is only ever replaced whole, by one rename.

The guarantees (``mergelab.merge`` and ``mergelab merge``):

* a failed merge, with or without ``--force``, leaves the destination exactly as it was (absent, or the
  previous output byte for byte) and removes its temporary folder;
* a complete merge is published with a single ``os.rename``/``os.replace`` of the temporary folder onto
  the destination; nothing is copied or moved into the destination file by file;
* a process killed between two shards leaves no destination (and, under ``--force``, the old one intact);
* the destination is never an input, an ancestor of one or inside one (real paths compared);
* ``--force`` replaces only a previous mergelab output (its manifest), ``--force-any`` any other folder;
* publishing never replaces a folder that appeared during the merge (no-replace rename), so of two
  concurrent merges into one destination exactly one succeeds;
* SIGTERM cleans up like Ctrl-C; the temporary folder of a killed process is removed by the next run;
* output folders and files follow the umask.

These tests use the public API and patch ``os``/``shutil``/``io`` functions globally (plus the one
publishing primitive, ``output_guard.rename_noreplace``, which calls the kernel through ctypes), so they
do not depend on how the writer or the engine are organised inside.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file
from tiny_models import digest
from typer.testing import CliRunner

import mergelab
from mergelab.checkpoint import output_guard
from mergelab.cli import app
from mergelab.errors import OutputError

runner = CliRunner()

SHARD = "100KB"  # the tiny family's merged output is about 1 MB, so this gives several shards


def leftovers(out: Path) -> list[Path]:
    """Temporary or trash folders the writer left beside ``out``."""
    return sorted(p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.") and "mergelab" in p.name)


def recipe(base: Path, experts: list[Path], method: str = "task_arithmetic") -> dict:
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts],
    }


def poisoned_copy(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose last stored tensor holds a NaN (found while merging, not while planning)."""
    shutil.copytree(src, dst)
    last = sorted(dst.glob("*.safetensors"))[-1]
    sd = load_file(str(last))
    name = sorted(k for k, v in sd.items() if v.is_floating_point() and v.ndim == 2)[-1]
    t = sd[name].clone()
    t[0, 0] = float("nan")
    sd[name] = t
    save_file(sd, str(last), metadata={"format": "pt"})
    return dst


@pytest.fixture
def previous(family, tmp_path) -> Path:
    """A real earlier merge output at ``tmp_path/out`` (several shards, index, card, side files)."""
    base, experts = family
    out = tmp_path / "out"
    mergelab.merge(recipe(base, experts[:2]), out, max_shard_size=SHARD, hash_inputs=False)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    return out


# ---------------------------------------------------------------- (a) a failed --force keeps the old output


def test_failed_forced_merge_keeps_previous_output(family, previous, tmp_path):
    base, experts = family
    before = digest(previous)
    bad = poisoned_copy(experts[0], tmp_path / "bad")
    with pytest.raises(mergelab.errors.MergelabError, match="NaN or Inf"):
        mergelab.merge(recipe(base, [bad, experts[1]]), previous, force=True, max_shard_size=SHARD, hash_inputs=False)
    assert digest(previous) == before, "a failed --force merge changed or removed the previous output"
    assert leftovers(previous) == [], "temporary folder left behind"


def test_forced_merge_failing_inside_commit_keeps_previous_output(family, previous, monkeypatch):
    """The last step (putting the new folder in place) fails: the old output must still be there."""
    base, experts = family
    before = digest(previous)
    real_rename, real_replace = os.rename, os.replace

    def failing(real):
        def fn(src, dst, *a, **k):
            if Path(dst) == previous and ".mergelab-tmp-" in Path(src).name:
                raise OSError(errno.EIO, "injected failure publishing the output")
            return real(src, dst, *a, **k)

        return fn

    monkeypatch.setattr(os, "rename", failing(real_rename))
    monkeypatch.setattr(os, "replace", failing(real_replace))
    monkeypatch.setattr(output_guard, "rename_noreplace", failing(output_guard.rename_noreplace))
    with pytest.raises(mergelab.errors.OutputError, match="injected"):
        mergelab.merge(recipe(base, experts[1:]), previous, force=True, max_shard_size=SHARD, hash_inputs=False)
    monkeypatch.undo()
    assert digest(previous) == before, "a commit that failed lost the previous output"
    assert leftovers(previous) == [], "temporary or trash folder left behind"


# ---------------------------------------------------------------- (b) the commit is one rename


class Recorder:
    """Records every rename/replace/copy/move; checks the temp folder is complete when it is renamed."""

    def __init__(self, monkeypatch, dest: Path):
        self.dest = dest
        self.calls: list[tuple[str, Path, Path]] = []
        self.dest_at_publish: bool | None = None
        self.tmp_contents: set[str] = set()
        for mod, name in (
            (output_guard, "rename_noreplace"),
            (os, "rename"),
            (os, "replace"),
            (shutil, "copytree"),
            (shutil, "move"),
            (shutil, "copy"),
            (shutil, "copy2"),
            (shutil, "copyfile"),
        ):
            monkeypatch.setattr(mod, name, self._wrap(name, getattr(mod, name)))

    def _wrap(self, name, real):
        def fn(src, dst, *a, **k):
            src_p, dst_p = Path(src).absolute(), Path(dst).absolute()
            self.calls.append((name, src_p, dst_p))
            if name in ("rename", "replace", "rename_noreplace") and dst_p == self.dest:
                self.dest_at_publish = dst_p.exists()
                self.tmp_contents = {p.name for p in src_p.iterdir()} if src_p.is_dir() else set()
            return real(src, dst, *a, **k)

        return fn

    def into_dest(self) -> list[tuple[str, Path, Path]]:
        """Calls whose target is the destination or anything inside it."""
        return [c for c in self.calls if c[2] == self.dest or self.dest in c[2].parents]


@pytest.mark.parametrize("force", [False, True])
def test_commit_is_one_rename_of_the_temp_folder(family, tmp_path, monkeypatch, force):
    base, experts = family
    out = tmp_path / "out"
    if force:
        mergelab.merge(recipe(base, experts[:2]), out, max_shard_size=SHARD, hash_inputs=False)
    rec = Recorder(monkeypatch, out.absolute())
    mergelab.merge(recipe(base, experts[1:]), out, force=force, max_shard_size=SHARD, hash_inputs=False)
    monkeypatch.undo()
    into = rec.into_dest()
    assert len(into) == 1, f"the destination was written by {len(into)} calls, not one rename: {into}"
    kind, src, _dst = into[0]
    assert kind == "rename_noreplace", f"published with {kind}, not the rename that cannot replace"
    assert src.parent == out.absolute().parent and ".mergelab-tmp-" in src.name, src
    assert not src.exists()
    # At the moment of the rename the temporary folder held the whole model.
    assert {"config.json", "model.safetensors.index.json", "README.md"} <= rec.tmp_contents
    assert len([n for n in rec.tmp_contents if n.startswith("model-")]) > 1
    assert rec.dest_at_publish is False, "the destination still existed when the new folder was renamed onto it"
    assert not [
        c for c in rec.calls if c[0] not in ("rename", "replace", "rename_noreplace") and c[2].name.startswith(".out.")
    ]
    assert leftovers(out) == []
    assert digest(out).keys() >= {"config.json", "model.safetensors.index.json"}


# ---------------------------------------------------------------- (c) a crash between shards

SECOND_SHARD = "model-00002-of-"


def test_failure_writing_second_shard_leaves_nothing(family, tmp_path, monkeypatch):
    """Opening the second output shard fails (disk full): no destination, no temporary folder."""
    base, experts = family
    out = tmp_path / "out"
    fired = []
    real_os_open, real_io_open = os.open, io.open

    def check(path):
        if SECOND_SHARD in os.fspath(path) and ".mergelab-tmp-" in os.fspath(path):
            fired.append(path)
            raise OSError(errno.ENOSPC, "injected: no space left on device", os.fspath(path))

    def os_open(path, *a, **k):
        check(path)
        return real_os_open(path, *a, **k)

    def io_open(file, *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)):
            check(file)
        return real_io_open(file, *a, **k)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(io, "open", io_open)
    monkeypatch.setattr("builtins.open", io_open)
    with pytest.raises(mergelab.errors.OutputError, match="no space left") as info:
        mergelab.merge(recipe(base, experts), out, max_shard_size=SHARD, hash_inputs=False)
    monkeypatch.undo()
    assert fired, "the injected failure never fired: the writer no longer opens shard files by path"
    assert "\n" not in str(info.value)
    assert not out.exists(), "a failed merge left a destination"
    assert leftovers(out) == [], "temporary folder left behind"


KILL_CHILD = textwrap.dedent(
    """
    import io, os, signal, sys, builtins
    import mergelab

    recipe, out, force = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    real_os_open, real_io_open = os.open, io.open

    def check(path):
        p = os.fspath(path)
        if "model-00002-of-" in str(p) and ".mergelab-tmp-" in str(p):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup handler can run

    def os_open(path, *a, **k):
        check(path)
        return real_os_open(path, *a, **k)

    def io_open(file, *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)):
            check(file)
        return real_io_open(file, *a, **k)

    os.open, io.open, builtins.open = os_open, io_open, io_open
    mergelab.merge(recipe, out, force=force, max_shard_size="100KB", hash_inputs=False)
    print("NOT KILLED")
    """
)


@pytest.mark.parametrize("force", [False, True])
def test_process_killed_between_shards(family, tmp_path, force):
    base, experts = family
    out = tmp_path / "out"
    before = None
    if force:
        mergelab.merge(recipe(base, experts[:2]), out, max_shard_size=SHARD, hash_inputs=False)
        before = digest(out)
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump(recipe(base, experts)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_CHILD, str(r), str(out), "1" if force else "0"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    if force:
        assert digest(out) == before, "a merge killed mid-write changed the previous output"
    else:
        assert not out.exists(), "a merge killed mid-write left a destination"
    # A killed process cannot clean up: its temporary folder may remain, but only beside the destination
    # under the hidden temporary prefix, never as the destination itself.
    assert all(".mergelab-tmp-" in p.name for p in leftovers(out))


def test_next_run_removes_the_killed_runs_temporary_folder(family, tmp_path):
    """After SIGKILL the temporary folder remains; the next run into the same OUT removes it and says so."""
    base, experts = family
    out = tmp_path / "out"
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump(recipe(base, experts)))
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_CHILD, str(r), str(out), "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    stale = leftovers(out)
    assert stale and all(f"-{proc.pid}@" in p.name for p in stale), stale  # the owner's pid is in the name
    res = runner.invoke(app, ["merge", str(r), str(out), "-q", "--no-hash-inputs"])
    assert res.exit_code == 0, res.output
    said = [line for line in res.output.splitlines() if "stale temporary folder" in line]
    assert len(said) == len(stale) and str(proc.pid) in said[0], res.output
    assert leftovers(out) == [] and (out / "config.json").is_file()


# ---------------------------------------------------------------- (d) the destination is never an input


@pytest.fixture
def inputs(tmp_path) -> tuple[Path, list[Path]]:
    """A private copy of a tiny family under ``tmp_path/models`` (the tests try to destroy it)."""
    from mergelab.synthetic import make_family

    return make_family(tmp_path / "models", n_experts=2)


def one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, text
    return lines[0]


def _where(kind: str, root: Path, base: Path, experts: list[Path]) -> tuple[Path, str]:
    """OUT for each way of pointing at an input, and the input the message must name."""
    models = base.parent
    link = root / "link-to-base"
    if kind.startswith("link") and not link.exists():
        link.symlink_to(base)
    return {
        "base": (base, str(base)),
        "expert": (experts[1], str(experts[1])),
        "dotdot": (experts[0] / ".." / "base", str(base)),
        "ancestor": (models, str(base)),
        "inside": (base / "merged", str(base)),
        "link": (link, str(base)),
        "link-inside": (link / "sub", str(base)),
    }[kind]


KINDS = ["base", "expert", "dotdot", "ancestor", "inside", "link", "link-inside"]


@pytest.mark.parametrize("flag", ["", "--force", "--force-any"])
@pytest.mark.parametrize("kind", KINDS)
def test_cli_refuses_an_output_that_is_an_input(inputs, tmp_path, kind, flag):
    base, experts = inputs
    out, named = _where(kind, tmp_path, base, experts)
    before = digest(base.parent)
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe(base, experts)))
    res = runner.invoke(app, ["merge", str(r), str(out), "-q", *([flag] if flag else [])])
    assert res.exit_code == 6, res.output
    line = " ".join(one_line(res.output).split())
    assert str(out.name) in line and named in line, line
    assert digest(base.parent) == before, "an input was changed"
    assert not (base / "merged").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_api_refuses_an_output_that_is_an_input_before_reading_anything(inputs, tmp_path, kind, monkeypatch):
    base, experts = inputs
    out, named = _where(kind, tmp_path, base, experts)
    before = digest(base.parent)

    def no_reading(*a, **k):
        raise AssertionError("an input was opened before the destination was checked")

    monkeypatch.setattr("mergelab.plan.open_checkpoint", no_reading, raising=False)
    monkeypatch.setattr("mergelab.checkpoint.reader.open_checkpoint", no_reading)
    with pytest.raises(OutputError) as info:
        mergelab.merge(recipe(base, experts), out, force_any=True)
    assert named in str(info.value) and "\n" not in str(info.value)
    monkeypatch.undo()
    assert digest(base.parent) == before


def test_dot_inside_the_inputs_folder_is_refused(inputs, tmp_path, monkeypatch):
    base, _experts = inputs
    monkeypatch.chdir(base.parent)
    before = digest(base.parent)
    data = {"merge_method": "task_arithmetic", "base_model": "base", "models": [{"model": "expert_0"}]}
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(data))
    for out in (".", "./", "expert_0/.."):
        res = runner.invoke(app, ["merge", str(r), out, "-q", "--force-any"])
        assert res.exit_code == 6 and "contains the base_model" in one_line(res.output), res.output
    with pytest.raises(OutputError, match="contains the base_model"):
        mergelab.merge(data, ".", force_any=True)
    assert digest(base.parent) == before


def test_tokenizer_source_calibration_data_and_recipe_are_inputs(inputs, tmp_path):
    base, experts = inputs
    tok = tmp_path / "tok"
    shutil.copytree(base, tok)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "cal.jsonl").write_text('{"text": "a b c"}\n')
    fisher = {
        "merge_method": "fisher",
        "models": [{"model": str(e), "calibration": str(data_dir / "cal.jsonl")} for e in experts],
    }
    with pytest.raises(OutputError, match="contains the calibration data"):
        mergelab.merge(fisher, data_dir, force_any=True)
    with pytest.raises(OutputError, match="is the calibration data"):
        mergelab.merge(fisher, data_dir / "cal.jsonl", force_any=True)
    assert (data_dir / "cal.jsonl").read_text() == '{"text": "a b c"}\n'
    with_tok = {**recipe(base, experts), "tokenizer_source": str(tok)}
    with pytest.raises(OutputError, match="is the tokenizer_source"):
        mergelab.merge(with_tok, tok, force_any=True)
    r = tmp_path / "recipes" / "r.yaml"
    r.parent.mkdir()
    r.write_text(yaml.safe_dump(recipe(base, experts)))
    res = runner.invoke(app, ["merge", str(r), str(r.parent), "-q", "--force-any"])
    assert res.exit_code == 6 and "contains the recipe" in one_line(res.output), res.output
    assert r.is_file() and (tok / "config.json").is_file()


# ---------------------------------------------------------------- (e) --force replaces only mergelab outputs


def test_force_refuses_a_folder_that_is_not_a_mergelab_output(family, tmp_path):
    base, experts = family
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe(base, experts[:1])))
    res = runner.invoke(app, ["merge", str(r), str(out), "-q", "--force"])
    assert res.exit_code == 6, res.output
    line = " ".join(one_line(res.output).split())
    assert "not a mergelab output" in line and "--force-any" in line, line
    with pytest.raises(OutputError, match="not a mergelab output"):
        mergelab.merge(recipe(base, experts[:1]), out, force=True)
    assert (out / "thesis.tex").read_text() == "precious" and leftovers(out) == []
    res = runner.invoke(app, ["merge", str(r), str(out), "-q", "--force-any", "--no-hash-inputs"])
    assert res.exit_code == 0, res.output
    assert not (out / "thesis.tex").exists() and (out / output_guard.MANIFEST).is_file()


def test_force_refuses_a_mergelab_output_holding_other_files(previous, family):
    base, experts = family
    (previous / "notes.txt").write_text("mine")
    before = digest(previous)
    with pytest.raises(OutputError, match=r"files mergelab did not write \(notes.txt\).*--force-any"):
        mergelab.merge(recipe(base, experts[1:]), previous, force=True, hash_inputs=False)
    assert digest(previous) == before and leftovers(previous) == []


def test_force_replaces_an_older_mergelab_output_recognised_by_its_card(previous, family):
    base, experts = family
    (previous / output_guard.MANIFEST).unlink()  # written by a mergelab version without the manifest
    mergelab.merge(recipe(base, experts[1:]), previous, force=True, hash_inputs=False)
    assert (previous / output_guard.MANIFEST).is_file()


def test_manifest_lists_the_files_and_the_output_loads_with_transformers(previous):
    from transformers import AutoModelForCausalLM

    listed = json.loads((previous / output_guard.MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted(p for p in digest(previous) if p != output_guard.MANIFEST)
    assert "config.json" in listed and "model.safetensors.index.json" in listed
    model = AutoModelForCausalLM.from_pretrained(str(previous))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_extract_force_only_replaces_mergelab_outputs(family, tmp_path):
    from mergelab.routed import extract

    base, experts = family
    routed = tmp_path / "routed"
    mergelab.merge(
        {"merge_method": "tall_masks", "base_model": str(base), "models": [{"model": str(e)} for e in experts[:2]]},
        routed,
        hash_inputs=False,
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep").write_text("x")
    with pytest.raises(OutputError, match="not a mergelab output"):
        extract(routed, 0, mine, force=True)
    with pytest.raises(OutputError, match="is inside the routed output"):
        extract(routed, 0, routed / "task0", force_any=True)
    assert (mine / "keep").read_text() == "x"
    extract(routed, 0, mine, force_any=True)
    extract(routed, 1, mine, force=True)  # now a mergelab output
    assert not (mine / "keep").exists()


@pytest.mark.parametrize("case", ["file", "dangling-link", "under-a-file", "read-only"])
def test_unusable_destinations_are_one_line_errors(family, tmp_path, monkeypatch, case):
    base, experts = family
    target = tmp_path / "target"
    if case == "file":
        out = tmp_path / "a-file"
        out.write_text("keep")
    elif case == "dangling-link":
        out = tmp_path / "link"
        out.symlink_to(tmp_path / "nowhere")
    elif case == "under-a-file":
        (tmp_path / "f").write_text("keep")
        out = tmp_path / "f" / "out"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        out = ro / "out"

        def mkdtemp(*a, **k):  # root ignores folder permissions, so the refusal is injected
            raise OSError(errno.EROFS, "Read-only file system")

        monkeypatch.setattr("tempfile.mkdtemp", mkdtemp)
    before = digest(tmp_path) if case != "dangling-link" else None
    for force in (False, True):
        with pytest.raises(OutputError) as info:
            mergelab.merge(recipe(base, experts[:1]), out, force=force, hash_inputs=False)
        assert "\n" not in str(info.value) and str(out.name) in str(info.value)
    if case == "dangling-link":
        assert out.is_symlink() and not (tmp_path / "nowhere").exists()
    else:
        assert digest(tmp_path) == before
    assert not target.exists()


# ---------------------------------------------------------------- (f) publishing never replaces


@pytest.fixture(params=["kernel", "fallback"])
def publish_mode(request, monkeypatch):
    """Publish with renameat2/renamex_np, or with the portable lock + existence check."""
    if request.param == "fallback":
        monkeypatch.setattr(output_guard, "_noreplace", None)
    elif output_guard._noreplace is None:
        pytest.skip("no no-replace rename on this platform")
    return request.param


def test_rename_noreplace_never_replaces(tmp_path, publish_mode):
    src, empty, full = tmp_path / "src", tmp_path / "empty", tmp_path / "full"
    for d in (src, empty, full):
        d.mkdir()
    (src / "a").write_text("new")
    (full / "b").write_text("old")
    for dst in (empty, full):  # os.rename would silently replace the empty folder
        with pytest.raises(FileExistsError):
            output_guard.rename_noreplace(src, dst)
    assert (full / "b").read_text() == "old" and empty.is_dir() and not list(empty.iterdir())
    output_guard.rename_noreplace(src, tmp_path / "dst")
    assert (tmp_path / "dst" / "a").read_text() == "new" and not src.exists()


class CreateDestMidway:
    """A progress receiver that creates ``dest`` (with a user file) while the merge runs."""

    def __init__(self, dest: Path, as_mergelab: Path | None = None):
        self.dest, self.as_mergelab, self.done = dest, as_mergelab, False

    def begin(self, phase, total_items, total_bytes):
        pass

    def advance(self, items, nbytes):
        if not self.done:
            self.done = True
            if self.as_mergelab is not None:
                shutil.copytree(self.as_mergelab, self.dest)
            else:
                self.dest.mkdir()
                (self.dest / "user.txt").write_text("mine")

    def end(self):
        pass


@pytest.mark.parametrize("force", [False, True])
def test_folder_created_during_the_merge_is_kept(family, tmp_path, publish_mode, force):
    base, experts = family
    out = tmp_path / "out"
    hook = CreateDestMidway(out)
    with pytest.raises(OutputError) as info:
        mergelab.merge(recipe(base, experts), out, force=force, progress=hook, max_shard_size=SHARD, hash_inputs=False)
    assert hook.done and "\n" not in str(info.value)
    assert "left untouched" in str(info.value)
    assert digest(out) == {"user.txt": hashlib.sha256(b"mine").hexdigest()}, "the folder created meanwhile was changed"
    assert leftovers(out) == [], "temporary or trash folder left behind"


def test_empty_folder_created_during_the_merge_is_kept(family, tmp_path, publish_mode):
    """os.rename would replace an empty folder; the publish must not."""
    base, experts = family
    out = tmp_path / "out"

    class Hook(CreateDestMidway):
        def advance(self, items, nbytes):
            if not self.done:
                self.done = True
                self.dest.mkdir()

    with pytest.raises(OutputError, match="appeared while the merge ran"):
        mergelab.merge(recipe(base, experts), out, progress=Hook(out), hash_inputs=False)
    assert out.is_dir() and not list(out.iterdir()) and leftovers(out) == []


def test_forced_merge_replaces_a_mergelab_output_that_appeared_meanwhile(family, previous, tmp_path):
    """--force at commit: a mergelab output found at OUT then is replaced (it is what --force allows)."""
    base, experts = family
    out = tmp_path / "late"
    mergelab.merge(recipe(base, experts), out, force=True, progress=CreateDestMidway(out, previous), hash_inputs=False)
    assert leftovers(out) == [] and (out / output_guard.MANIFEST).is_file()


RACE_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from mergelab.checkpoint.writer import AtomicOutputDir
    from mergelab.cli import app

    recipe, out, barrier = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    real_commit = AtomicOutputDir.commit

    def commit(self):  # both runs reach the commit before either publishes
        (barrier / str(os.getpid())).touch()
        deadline = time.time() + 120
        while len(list(barrier.iterdir())) < 2 and time.time() < deadline:
            time.sleep(0.01)
        return real_commit(self)

    AtomicOutputDir.commit = commit
    app(["merge", recipe, out, "-q", "--no-hash-inputs", "--max-shard-size", "100KB"])
    """
)


def test_two_concurrent_merges_into_one_output(family, tmp_path):
    base, experts = family
    out = tmp_path / "out"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    recipes, refs = [], []
    for i, weight in enumerate((0.3, 0.7)):  # different recipes, so the winner can be told apart
        data = {
            **recipe(base, experts),
            "models": [{"model": str(e), "parameters": {"weight": weight}} for e in experts],
        }
        r = tmp_path / f"r{i}.yaml"
        r.write_text(yaml.safe_dump(data))
        recipes.append(r)
        ref = tmp_path / f"ref{i}"
        mergelab.merge(data, ref, max_shard_size=SHARD, hash_inputs=False)
        refs.append(ref)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACE_CHILD, str(r), str(out), str(barrier)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in recipes
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 6], results
    winner = next(i for i, (c, _) in enumerate(results) if c == 0)
    loser_err = results[1 - winner][1]
    assert "appeared while the merge ran" in " ".join(loser_err.split()), loser_err
    assert leftovers(out) == [], "the loser left its temporary folder"
    got, want = digest(out), digest(refs[winner])
    shards = {k for k in want if k.endswith(".safetensors")}
    assert len(shards) > 1 and {k: got[k] for k in shards} == {k: want[k] for k in shards}, "winner incomplete"
    assert (out / "model.safetensors.index.json").is_file()


def test_two_concurrent_merges_in_threads_with_the_portable_publish(family, tmp_path, monkeypatch):
    """The same race in one process, without the kernel's no-replace rename (lock + check)."""
    import threading

    from mergelab.checkpoint.writer import AtomicOutputDir

    monkeypatch.setattr(output_guard, "_noreplace", None)
    base, experts = family
    out = tmp_path / "out"
    barrier = threading.Barrier(2, timeout=120)
    real_commit = AtomicOutputDir.commit

    def commit(self):
        barrier.wait()
        return real_commit(self)

    monkeypatch.setattr(AtomicOutputDir, "commit", commit)
    outcomes: list[object] = []

    def run(i):
        try:
            mergelab.merge(recipe(base, experts[i : i + 2]), out, hash_inputs=False, threads=1)
            outcomes.append("ok")
        except BaseException as exc:  # collected for the assertion
            outcomes.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert outcomes.count("ok") == 1, outcomes
    (err,) = [o for o in outcomes if o != "ok"]
    assert isinstance(err, OutputError) and "appeared while the merge ran" in str(err)
    assert leftovers(out) == [] and (out / output_guard.MANIFEST).is_file()


# ---------------------------------------------------------------- (g) signals and stale temporary folders

TERM_CHILD = textwrap.dedent(
    """
    import sys, time
    from mergelab.checkpoint.writer import ShardedSafetensorsWriter
    from mergelab.cli import app

    recipe, out = sys.argv[1], sys.argv[2]
    real_add = ShardedSafetensorsWriter.add

    def slow_add(self, name, tensor):  # a long merge: about 0.3 s per tensor
        real_add(self, name, tensor)
        time.sleep(0.3)

    ShardedSafetensorsWriter.add = slow_add
    app(["merge", recipe, out, "-q", "--no-hash-inputs", "--max-shard-size", "100KB"])
    """
)


def start_slow_merge(family, tmp_path) -> tuple[subprocess.Popen, Path]:
    """A CLI merge in a child process, returned once its temporary folder holds a partial shard."""
    import time

    base, experts = family
    out = tmp_path / "out"
    r = tmp_path / "recipe.yaml"
    r.write_text(yaml.safe_dump(recipe(base, experts)))
    proc = subprocess.Popen(
        [sys.executable, "-c", TERM_CHILD, str(r), str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        tmps = [p for p in leftovers(out) if ".mergelab-tmp-" in p.name]
        if tmps and list(tmps[0].glob("model-*.safetensors")):
            return proc, out
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the merge never started writing")


def test_sigterm_removes_the_temporary_folder(family, tmp_path):
    proc, out = start_slow_merge(family, tmp_path)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
    assert "terminated" in one_line(err) and "nothing was written" in one_line(err)
    assert not out.exists() and leftovers(out) == [], "SIGTERM left a destination or a temporary folder"


def test_sigkill_leaves_the_folder_for_the_next_run(family, tmp_path):
    proc, out = start_slow_merge(family, tmp_path)
    proc.kill()
    proc.communicate(timeout=120)
    (stale,) = leftovers(out)
    assert f"-{proc.pid}@{output_guard.host_tag()}-" in stale.name
    base, experts = family
    with pytest.warns(output_guard.OutputNote, match=f"stale temporary folder of process {proc.pid}"):
        mergelab.merge(recipe(base, experts[:1]), out, hash_inputs=False)
    assert leftovers(out) == [] and (out / "config.json").is_file()


def test_temporary_folders_of_live_processes_and_other_hosts_are_kept(family, tmp_path):
    base, experts = family
    out = tmp_path / "out"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = tmp_path / f".out.mergelab-tmp-{live.pid}@{output_guard.host_tag()}-abcd1234"
        other = tmp_path / ".out.mergelab-tmp-1@some-other-host-abcd1234"
        for d in (mine, other):
            d.mkdir()
            (d / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        r = tmp_path / "r.yaml"
        r.write_text(yaml.safe_dump(recipe(base, experts[:1])))
        res = runner.invoke(app, ["merge", str(r), str(out), "-q", "--no-hash-inputs"])
        assert res.exit_code == 0, res.output
        assert mine.is_dir() and other.is_dir()
        notes = [ln for ln in res.output.splitlines() if "some-other-host" in ln]
        assert len(notes) == 1 and "remove it if that run is gone" in " ".join(res.output.split())
    finally:
        live.kill()
        live.wait()


def test_killed_force_run_between_move_aside_and_publish_is_repaired(previous, family):
    """A --force run died after moving the old output aside: the next run puts it back first."""
    base, experts = family
    before = digest(previous)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    trash = previous.parent / f".out.mergelab-old-{dead.pid}@{output_guard.host_tag()}-abcd1234"
    trash.mkdir()
    os.rename(previous, trash / "old")
    with (
        pytest.raises(OutputError, match="destination exists"),
        pytest.warns(output_guard.OutputNote, match="restored"),
    ):
        mergelab.merge(recipe(base, experts), previous, hash_inputs=False)
    assert digest(previous) == before and leftovers(previous) == []


def test_signal_handlers_are_restored(family, tmp_path):
    base, experts = family
    before = signal.getsignal(signal.SIGTERM)
    mergelab.merge(recipe(base, experts[:1]), tmp_path / "api", hash_inputs=False)
    assert signal.getsignal(signal.SIGTERM) is before, "the Python API changed the SIGTERM handler"
    r = tmp_path / "r.yaml"
    r.write_text(yaml.safe_dump(recipe(base, experts[:1])))
    assert runner.invoke(app, ["merge", str(r), str(tmp_path / "cli"), "-q"]).exit_code == 0
    assert signal.getsignal(signal.SIGTERM) is before, "the CLI left its SIGTERM handler installed"


# ---------------------------------------------------------------- (h) modes follow the umask


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077, 0o027])
def test_output_modes_follow_the_umask(family, tmp_path, umask):
    base, experts = family
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        mergelab.merge(recipe(base, experts[:2]), out, max_shard_size=SHARD, hash_inputs=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask, oct(out.stat().st_mode)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 4
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, (f.name, oct(f.stat().st_mode))


def test_statistics_dir_inside_an_input_is_refused(inputs, tmp_path):
    base, experts = inputs
    (tmp_path / "cal.jsonl").write_text('{"text": "a b c"}\n')
    before = digest(base.parent)
    for stats_dir in (experts[0], experts[0] / "stats"):
        fisher = {
            "merge_method": "fisher",
            "models": [{"model": str(e), "calibration": str(tmp_path / "cal.jsonl")} for e in experts],
            "calibration": {"statistics_dir": str(stats_dir)},
        }
        with pytest.raises(OutputError, match="statistics_dir is inside the model"):
            mergelab.merge(fisher, tmp_path / "out")
    assert digest(base.parent) == before and not (tmp_path / "out").exists()
