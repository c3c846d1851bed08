"""Peak memory of a continual step stays within the figure printed before it starts.

Each measured step runs in a fresh process (Linux: the peak RSS is reset with ``/proc/self/clear_refs``
after the imports, and glibc is told to return large blocks at once, so RSS follows the live tensors).
The model is 24 matrices of 16384×64 float32 (4 MB each, 100 MB in all): the expected peak is set
by one tensor, not by the model, and must not grow with the number of experts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergelab.continual import ContinualMerge

N, ROWS, COLS = 24, 16384, 64
MODEL_BYTES = N * ROWS * COLS * 4
SLACK = 12 * 10**6  # the interpreter, thread stacks and BLAS buffers the figure leaves out

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")

STEP = textwrap.dedent(
    """
    import json, sys
    import torch
    from mergelab.continual import ContinualMerge

    def rss(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    cm = ContinualMerge.open(sys.argv[1])
    estimate = cm.expected_peak().bytes
    torch.linalg.svd(torch.randn(64, 32), full_matrices=False)  # load LAPACK before measuring
    before = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    rep = cm.add(sys.argv[2])
    print(json.dumps({"estimate": estimate, "reported": rep.expected_peak_bytes, "extra": rss("VmHWM") - before}))
    """
)


def write_model(path: Path, seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(N):
        w, b = f"model.layers.{i}.mlp.up_proj.weight", f"model.layers.{i}.mlp.up_proj.bias"
        if base is None:
            sd[w], sd[b] = torch.randn(ROWS, COLS, generator=gen), torch.randn(ROWS, generator=gen)
        else:
            sd[w] = base[w] + 0.02 * torch.randn(ROWS, COLS, generator=gen)
            sd[b] = base[b] + 0.02 * torch.randn(ROWS, generator=gen)
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return sd


def measured_step(state: Path, expert: Path) -> dict[str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run(
        [sys.executable, "-c", STEP, str(state), str(expert)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "method,params",
    [
        ("opcm", None),
        pytest.param("dop", {"num_steps": 2}, marks=pytest.mark.slow),
        pytest.param("ties", None, marks=pytest.mark.slow),
        pytest.param("average", None, marks=pytest.mark.slow),
    ],
)
def test_a_step_stays_within_its_expected_peak(tmp_path, method, params):
    base = write_model(tmp_path / "base", 0)
    experts = [tmp_path / f"expert{i}" for i in range(3)]
    for i, e in enumerate(experts):
        write_model(e, i + 1, base)
    del base
    state = tmp_path / "state"
    cm = ContinualMerge.init(tmp_path / "base", state, method=method, params=params)
    cm.add(experts[0])
    second = measured_step(state, experts[1])
    third = measured_step(state, experts[2])
    assert second["estimate"] == third["estimate"] == second["reported"], "the figure grew with the experts"
    largest = ROWS * COLS * 4
    assert second["estimate"] < 25 * largest  # a few tensor-sized buffers, whatever the model's size
    for run in (second, third):
        assert run["extra"] <= run["estimate"] + SLACK, (run, method)
        assert run["extra"] < MODEL_BYTES, (run, method)  # never the whole model
