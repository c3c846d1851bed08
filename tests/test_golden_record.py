"""Recording the golden fingerprints: ``--write`` only adds missing cases, ``--rerecord M`` replaces M's.

The fingerprints themselves are never computed here (``compute`` is replaced by a stub), so these
tests are fast and leave the real record alone.
"""

from __future__ import annotations

import json

import golden.method_outputs as mo
import pytest


def _record(cases: dict[str, dict[str, str]]) -> dict:
    return {"environment": mo.environment(), "cases": cases}


OLD = {
    "linear/default/float32": {"w": "old-linear"},
    "ties/default/float32": {"w": "old-ties"},
    "ties/typical/float32": {"w": "old-ties-typical"},
}
CURRENT = {
    "linear/default/float32": {"w": "NEW-linear"},  # differs: must not overwrite the record
    "ties/default/float32": {"w": "NEW-ties"},
    "widen/default/float32": {"w": "new-widen"},  # missing: added
}


def test_write_adds_missing_cases_and_keeps_recorded_ones():
    new, written = mo.updated_record(_record(dict(OLD)), CURRENT)
    assert written == ["widen/default/float32"]
    assert new["cases"] == {**OLD, "widen/default/float32": {"w": "new-widen"}}


def test_rerecord_replaces_only_the_named_method():
    new, written = mo.updated_record(_record(dict(OLD)), CURRENT, rerecord=["ties"])
    assert written == ["ties/default/float32", "widen/default/float32"]
    assert new["cases"] == {
        "linear/default/float32": {"w": "old-linear"},
        "ties/default/float32": {"w": "NEW-ties"},  # ties/typical is no longer computed: dropped
        "widen/default/float32": {"w": "new-widen"},
    }


def test_a_record_from_another_environment_is_refused():
    other = {"environment": {"torch": "0.0", "cpu_capability": "none"}, "cases": dict(OLD)}
    with pytest.raises(SystemExit, match="recorded on"):
        mo.updated_record(other, CURRENT)


def test_main_write_and_rerecord(tmp_path, monkeypatch, capsys):
    record = tmp_path / "hashes.json"
    record.write_text(json.dumps(_record(dict(OLD))))
    asked = []

    def fake_compute(methods=None):
        asked.append(None if methods is None else sorted(methods))
        return {k: v for k, v in CURRENT.items() if methods is None or k.split("/")[0] in methods}

    monkeypatch.setattr(mo, "RECORD", record)
    monkeypatch.setattr(mo, "compute", fake_compute)
    mo.main(["--write"])
    assert json.loads(record.read_text())["cases"] == {**OLD, "widen/default/float32": {"w": "new-widen"}}
    assert "wrote 1 cases" in capsys.readouterr().out

    mo.main(["--rerecord", "linear"])
    assert asked[-1] == ["linear"]  # only the named method is computed
    cases = json.loads(record.read_text())["cases"]
    assert cases["linear/default/float32"] == {"w": "NEW-linear"}
    assert cases["ties/default/float32"] == {"w": "old-ties"}

    with pytest.raises(SystemExit, match="no registered method nope"):
        mo.main(["--rerecord", "nope"])
