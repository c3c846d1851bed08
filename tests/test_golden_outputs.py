"""Every registered method gives bit-identical tensors to the recorded fingerprints
(tests/golden/method_outputs.py; recorded before the core restructuring of issue 12)."""

from __future__ import annotations

import json

import pytest
from golden.method_outputs import RECORD, compute, environment

RECORDED = json.loads(RECORD.read_text())


@pytest.fixture(scope="module")
def current() -> dict[str, dict[str, str]]:
    if RECORDED["environment"] != environment():
        pytest.skip(f"fingerprints recorded on {RECORDED['environment']}, this is {environment()}")
    return compute()


def test_every_recorded_case_is_bit_identical(current):
    changed = [
        f"{case}: {k}"
        for case, tensors in RECORDED["cases"].items()
        for k, h in tensors.items()
        if current.get(case, {}).get(k) != h
    ]
    assert not changed, f"{len(changed)} tensors differ from the recorded fingerprints, e.g. {changed[:5]}"


def test_every_method_is_recorded(current):
    """A new method adds its cases with `python tests/golden/method_outputs.py --write`."""
    new = sorted(set(current) - set(RECORDED["cases"]))
    assert not new, f"cases without a recorded fingerprint: {new}; record them with --write"
