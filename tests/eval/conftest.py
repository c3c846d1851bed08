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


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models: one thread is as fast and does not suffer from a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
