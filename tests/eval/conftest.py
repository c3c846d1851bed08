"""A tiny two-task zoo (random-init BERT, perturbed experts), written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergelab.zoo.build import Zoo
from mergelab.zoo.testing import write_tiny_zoo


@pytest.fixture(scope="session")
def tiny_zoo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_zoo(tmp_path_factory.mktemp("tinyzoo"))


@pytest.fixture()
def tiny_zoo(tiny_zoo_manifest: Path) -> Zoo:
    """A fresh Zoo object (its in-memory caches are per test; feature files persist)."""
    return Zoo(tiny_zoo_manifest)
