"""The state folder: round trips through disk and the CLI, refusals, and steps that fail or are killed.

Uses the session's tiny Llama family (a base in 4 shards and 3 experts, ``tests/conftest.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny_models import digest, load_dir
from typer.testing import CliRunner

from mergelab.checkpoint import output_guard
from mergelab.checkpoint.writer import ShardedSafetensorsWriter
from mergelab.cli import app
from mergelab.continual import ContinualMerge
from mergelab.errors import CheckpointError, OutputError, PlanError

runner = CliRunner()


def beside(folder: Path) -> list[Path]:
    """Working folders of mergelab beside ``folder`` (temporary, moved-aside)."""
    return sorted(p for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.mergelab-"))


@pytest.fixture
def two_step_state(family, tmp_path):
    base, experts = family
    state = tmp_path / "state"
    cm = ContinualMerge.init(base, state, method="opcm")
    cm.add(experts[0])
    cm.add(experts[1])
    return state, base, experts


def test_folder_round_trip_equals_the_in_memory_merge_and_loads_with_transformers(family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, experts = family
    state = tmp_path / "state"
    ContinualMerge.init(base, state, method="opcm", params={"alpha": 0.4})
    for e in experts:
        ContinualMerge.open(state).add(e)  # a new session per step, as separate CLI calls would be
    out = ContinualMerge.open(state).export(tmp_path / "merged")
    memory = ContinualMerge.init(base, method="opcm", params={"alpha": 0.4})
    for e in experts:
        memory.add(e)
    want = memory.state_dict()
    got = load_dir(out)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    model = AutoModelForCausalLM.from_pretrained(str(out))
    for k, v in model.state_dict().items():
        if k in got:
            assert torch.equal(v, got[k]), k
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    card = (out / "README.md").read_text()
    assert "opcm" in card and all(e.content_hash in card for e in memory.experts)
    # the content hashes are the engine's: the same as `mergelab merge` records for these models
    assert [e.content_hash for e in ContinualMerge.open(state).experts] == [e.content_hash for e in memory.experts]


def test_the_state_holds_the_running_task_vector_and_never_the_experts(two_step_state):
    state, _, _ = two_step_state
    files = set(digest(state))
    assert files == {"continual.json", "mergelab_output.json", "merged_task_vector/model.safetensors"}
    record = json.loads((state / "continual.json").read_text())
    assert [e["index"] for e in record["experts"]] == [1, 2]
    assert len(record["stats"]["norms"]) == 2 and record["scale"] == pytest.approx(1 / record["stats"]["lambda"])
    status = ContinualMerge.open(state).status()
    assert len(status.experts) == 2 and status.history == ["lambda"]
    assert status.task_vector_bytes == (state / "merged_task_vector" / "model.safetensors").stat().st_size
    assert status.expected_peak["bytes"] > 0


def test_adding_one_expert_to_the_base_exports_that_expert(family, tmp_path):
    base, experts = family
    state = tmp_path / "state"
    cm = ContinualMerge.init(base, state, method="opcm")
    cm.add(experts[0])
    got = load_dir(cm.export(tmp_path / "out"))
    want = load_dir(experts[0])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)


def test_the_same_expert_twice_is_refused_and_changes_nothing(two_step_state, tmp_path):
    state, base, experts = two_step_state
    before = digest(state)
    with pytest.raises(PlanError, match=r"already added as expert #2 .*same files"):
        ContinualMerge.open(state).add(experts[1])
    copy = tmp_path / "copy-of-expert-1"
    shutil.copytree(experts[1], copy)
    with pytest.raises(PlanError, match=r"already added as expert #2 .*same content hash"):
        ContinualMerge.open(state).add(copy)
    with pytest.raises(PlanError, match="is the base itself"):
        ContinualMerge.open(state).add(base)
    assert digest(state) == before
    assert beside(state) == []


def test_an_expert_of_another_architecture_is_refused_before_reading(two_step_state, tied_family):
    state, _, _ = two_step_state
    other, _ = tied_family
    with pytest.raises(PlanError, match=r"has no tensor 'lm_head.weight'|is not in the base|shape"):
        ContinualMerge.open(state).add(other)


def test_a_changed_base_is_refused(two_step_state):
    state, _, experts = two_step_state
    before = digest(state)
    # same tensors, other values: caught by the content hash at the end of the pass, before publishing
    with pytest.raises(PlanError, match="base's content changed"):
        ContinualMerge.open(state, base=experts[0]).add(experts[2])
    assert digest(state) == before and beside(state) == []


def test_a_failure_during_an_add_leaves_the_previous_state_byte_identical(two_step_state, monkeypatch):
    state, _, experts = two_step_state
    before = digest(state)
    real_add = ShardedSafetensorsWriter.add
    count = {"n": 0}

    def failing_add(self, name, tensor):
        count["n"] += 1
        if count["n"] == 5:
            raise OSError(28, "No space left on device")
        return real_add(self, name, tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "add", failing_add)
    with pytest.raises(OSError):
        ContinualMerge.open(state).add(experts[2])
    monkeypatch.undo()
    assert count["n"] == 5
    assert digest(state) == before and beside(state) == []
    ContinualMerge.open(state).add(experts[2])  # and the state still works
    assert len(ContinualMerge.open(state).experts) == 3


def test_a_failure_while_publishing_puts_the_previous_state_back(two_step_state, monkeypatch):
    state, _, experts = two_step_state
    before = digest(state)
    real = output_guard.rename_noreplace

    def failing(src, dst):
        if ".mergelab-tmp-" in os.fspath(src):
            raise OSError(5, "Input/output error", os.fspath(src))
        return real(src, dst)

    monkeypatch.setattr(output_guard, "rename_noreplace", failing)
    with pytest.raises(OutputError, match="the previous output is unchanged"):
        ContinualMerge.open(state).add(experts[2])
    monkeypatch.undo()
    assert digest(state) == before and beside(state) == []


KILL_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from mergelab.checkpoint.writer import ShardedSafetensorsWriter
    from mergelab.continual import ContinualMerge

    state, expert = sys.argv[1], sys.argv[2]
    real_add, count = ShardedSafetensorsWriter.add, [0]

    def add(self, name, tensor):
        count[0] += 1
        if count[0] == 6:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup handler can run
        return real_add(self, name, tensor)

    ShardedSafetensorsWriter.add = add
    ContinualMerge.open(state).add(expert)
    print("NOT KILLED")
    """
)


def test_a_step_killed_mid_write_leaves_the_previous_state_and_the_next_step_cleans_up(two_step_state):
    state, _, experts = two_step_state
    before = digest(state)
    proc = subprocess.run(
        [sys.executable, "-c", KILL_CHILD, str(state), str(experts[2])],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert digest(state) == before
    stale = beside(state)
    assert stale and all(".mergelab-tmp-" in p.name for p in stale)
    with pytest.warns(output_guard.OutputNote, match="stale temporary folder"):
        ContinualMerge.open(state).add(experts[2])
    assert beside(state) == [] and len(ContinualMerge.open(state).experts) == 3


def test_a_step_killed_between_its_two_renames_is_rolled_back(two_step_state):
    """Killed after moving the previous state aside and before renaming the new one in: the state path is
    missing; the next command puts the previous state back (the interrupted step is not applied)."""
    state, _, _ = two_step_state
    before = digest(state)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = output_guard.host_tag()
    aside = state.parent / f".{state.name}.mergelab-old-{dead.pid}@{host}-abc123"
    aside.mkdir()
    os.rename(state, aside / "old")
    half = state.parent / f".{state.name}.mergelab-tmp-{dead.pid}@{host}-def456"
    half.mkdir()
    (half / "continual.json").write_text("{}")
    assert not state.exists()
    with pytest.warns(output_guard.OutputNote) as notes:
        cm = ContinualMerge.open(state)
    said = [str(n.message) for n in notes]
    assert any(m.startswith(f"restored {state}") for m in said) and any("stale temporary" in m for m in said)
    assert digest(state) == before and beside(state) == []
    assert len(cm.experts) == 2


def test_two_adds_at_once_are_serialised(family, tmp_path):
    """Two processes add different experts to one state at the same time: both steps land, one after the other."""
    base, experts = family
    state = tmp_path / "state"
    ContinualMerge.init(base, state, method="average").add(experts[0])
    script = textwrap.dedent(
        """
        import sys, time
        from mergelab.checkpoint.writer import ShardedSafetensorsWriter
        from mergelab.continual import ContinualMerge

        real = ShardedSafetensorsWriter.finish

        def slow_finish(self):  # hold the state's lock long enough for the other process to wait on it
            time.sleep(1.5)
            real(self)

        ShardedSafetensorsWriter.finish = slow_finish
        ContinualMerge.open(sys.argv[1]).add(sys.argv[2])
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(state), str(e)], stderr=subprocess.PIPE, text=True, env=env)
        for e in experts[1:]
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    cm = ContinualMerge.open(state)
    assert [e.index for e in cm.experts] == [1, 2, 3]
    assert {e.path for e in cm.experts} == {str(e) for e in experts}
    want = ContinualMerge.init(base, method="average")
    for e in experts:
        want.add(e)
    got, ref = cm.state_dict(), want.state_dict()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6)


def test_a_folder_that_is_not_a_state_is_refused(tmp_path, family):
    base, _ = family
    with pytest.raises(CheckpointError, match="no such continual state folder"):
        ContinualMerge.open(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not a continual state folder"):
        ContinualMerge.open(tmp_path / "plain")
    with pytest.raises(OutputError, match="is the base"):
        ContinualMerge.init(base, base)


def test_files_added_to_a_state_folder_are_never_deleted_by_a_step(two_step_state):
    state, _, experts = two_step_state
    (state / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="holds files mergelab did not write"):
        ContinualMerge.open(state).add(experts[2])
    assert (state / "notes.txt").read_text() == "mine"


def test_cli_init_add_status_export(family, tmp_path):
    base, experts = family
    state, out = tmp_path / "state", tmp_path / "merged"
    res = runner.invoke(app, ["continual", "init", str(base), str(state), "--method", "opcm", "--param", "alpha=0.5"])
    assert res.exit_code == 0, res.output
    assert "expected peak working memory per add" in res.output
    for e in experts[:2]:
        res = runner.invoke(app, ["continual", "add", str(state), str(e), "-q"])
        assert res.exit_code == 0, res.output
        assert "expected peak working memory" in res.output and "added expert" in res.output
    res = runner.invoke(app, ["continual", "add", str(state), str(experts[1]), "-q"])
    assert res.exit_code == 4 and "already added as expert #2" in res.output
    res = runner.invoke(app, ["continual", "status", str(state), "--json"])
    assert res.exit_code == 0, res.output
    status = json.loads(res.output)
    assert [e["index"] for e in status["experts"]] == [1, 2] and status["method"] == "opcm"
    res = runner.invoke(app, ["continual", "status", str(state)])
    assert res.exit_code == 0 and "lambda" in res.output
    res = runner.invoke(app, ["continual", "export", str(state), str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and (out / "mergelab_output.json").is_file()
    res = runner.invoke(app, ["continual", "init", str(base), str(tmp_path / "s2"), "--param", "alpha"])
    assert res.exit_code == 2 and "KEY=VALUE" in res.output
    res = runner.invoke(app, ["continual", "methods"])
    assert res.exit_code == 0 and "dop" in res.output and "magmax" in res.output
