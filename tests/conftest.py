"""Shared fixtures: tiny real transformers checkpoints built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mergelab.synthetic import make_base, make_expert, make_family

torch.set_num_threads(2)
# Ray started by the tests binds to the loopback address only (read by Ray at import)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """Untied Llama base (4 shards) + dense, sparse and conflicting experts."""
    root = tmp_path_factory.mktemp("family")
    return make_family(root, n_experts=3, max_shard_size="100KB")


@pytest.fixture(scope="session")
def tied_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A Llama base with tied input/output embeddings + 2 experts, one shard each."""
    root = tmp_path_factory.mktemp("tied")
    return make_family(root, n_experts=2, tie_embeddings=True)


@pytest.fixture(scope="session")
def bin_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The same architecture saved as pytorch_model.bin (pickle, loaded weights-only)."""
    root = tmp_path_factory.mktemp("bin")
    base = make_base(root / "base", safe_serialization=False)
    return base, [
        make_expert(base, root / "expert_0", seed=1),
        make_expert(base, root / "expert_1", kind="sparse", seed=2),
    ]
