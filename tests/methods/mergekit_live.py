"""Shared by the method tests: reading a merged checkpoint back, and running a script under live mergekit.

The live check needs ``MERGEKIT_PYTHON`` (a python with mergekit 0.1.5); without it the tests marked
:data:`needs_mergekit` skip with a reason. Each test writes its cases with ``torch.save``; its script
loads them from ``sys.argv[1]`` and prints one JSON line, the expected outputs.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

MERGEKIT_PY = Path(os.environ["MERGEKIT_PYTHON"]) if os.environ.get("MERGEKIT_PYTHON") else None

needs_mergekit = pytest.mark.skipif(
    MERGEKIT_PY is None or not MERGEKIT_PY.exists(),
    reason="set MERGEKIT_PYTHON to a python with mergekit 0.1.5 to run the live mergekit check",
)


def run_mergekit(script: str, cases: Any, tmp_path: Path, *, timeout: float = 120) -> Any:
    """Run ``script`` under ``MERGEKIT_PYTHON`` on ``cases`` (saved with ``torch.save``); its last stdout
    line, parsed as JSON. Fails with the script's stderr when it exits non-zero."""
    assert MERGEKIT_PY is not None, "mark the test with needs_mergekit"
    path = tmp_path / "cases.pt"
    torch.save(cases, path)
    proc = subprocess.run([str(MERGEKIT_PY), "-c", script, str(path)], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
