"""Every optional extra of pyproject.toml installs what its feature imports.

``FEATURE_IMPORTS`` lists, per extra, the modules the feature it serves imports (read from the code
that serves it). The first test keeps that list and pyproject.toml in step. The second runs in
``.ci/run``'s extras step: each extra is installed alone into a fresh copy of a core-only
environment, then ``MERGELAB_EXTRA=<extra> pytest tests/test_extras.py`` must import every module
of that extra (no skip there). In the default suite it checks whichever extras happen to be
installed and skips the others.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

FEATURE_IMPORTS: dict[str, tuple[str, ...]] = {
    # mergelab merge --executor ray (mergelab.executors.ray imports ray on use)
    "ray": ("ray", "mergelab.executors.ray"),
    # the LM suite's base: transformers reads the GGUF file with gguf; accelerate for its loading path
    "lm": ("gguf", "accelerate", "mergelab_bench.zoo.lm.base"),
    # mergelab eval --lm-eval-tasks: lm-eval, whose Hugging Face backend (HFLM) imports accelerate
    "lmeval": ("lm_eval", "lm_eval.tasks", "accelerate", "lm_eval.models.huggingface"),
    # scripts/lint.sh
    "lint": ("ruff", "mypy"),
    # mergelab search: Ray Tune (trials), Optuna + cmaes (samplers), pymoo (MAP's NSGA-III), scipy (MAP's fit)
    "search": (
        "ray.tune",
        "ray.tune.search.optuna",
        "optuna",
        "cmaes",
        "pymoo.algorithms.moo.nsga3",
        "scipy.optimize",
        "mergelab.search.runner",
        "mergelab.search.backends",
        "mergelab.search.lazy_grid",
    ),
    # mergelab bench: needs nothing beyond the core (peak memory is read without psutil)
    "bench": ("mergelab_bench.cli", "mergelab_bench.eval.leaderboard"),
    # the README's test command (ray and lm-eval tests run rather than skip)
    "test": (
        "pytest",
        "pytest_timeout",
        "importlinter",
        "ray",
        "ray.tune",
        "lm_eval",
        "accelerate",
        "lm_eval.models.huggingface",
        "optuna",
        "cmaes",
        "pymoo",
        "scipy",
    ),
}


def _extras() -> dict[str, list[str]]:
    return tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]


def test_every_extra_has_its_feature_imports_listed():
    assert set(_extras()) == set(FEATURE_IMPORTS), "add the new extra's feature modules to FEATURE_IMPORTS"


def test_lmeval_extra_pulls_accelerate():
    """lm-eval's HF backend imports accelerate, which lm-eval itself only declares in its own `hf` extra."""
    reqs = [r.replace(" ", "").lower() for r in _extras()["lmeval"]]
    assert any(r.startswith("accelerate") for r in reqs), reqs


def _check_imports(extra: str) -> None:
    for module in FEATURE_IMPORTS[extra]:
        if module == "lm_eval.models.huggingface":
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        importlib.import_module(module)
    if extra == "lm":
        from transformers.utils.import_utils import is_gguf_available

        assert is_gguf_available(), "transformers does not accept the installed gguf"


@pytest.mark.parametrize("extra", sorted(FEATURE_IMPORTS))
def test_extra_feature_imports(extra):
    wanted = os.environ.get("MERGELAB_EXTRA")
    if wanted == extra:
        _check_imports(extra)  # the CI extras step: a missing module fails
        return
    if wanted:
        pytest.skip(f"MERGELAB_EXTRA={wanted}: only that extra is checked")
    try:
        _check_imports(extra)
    except ImportError as exc:
        pytest.skip(f"extra {extra!r} not installed here ({exc})")
