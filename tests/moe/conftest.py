"""Fixtures of the MoE tests: a Llama base with fine-tunes, a tiny Mixtral, calibration text; one torch thread."""

from __future__ import annotations

from pathlib import Path

import pytest
from moe_helpers import dense_base, tiny_moe
from tiny_models import one_torch_thread  # noqa: F401 - autouse: one torch thread in these tests

from mergelab.synthetic import make_expert


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A Llama base and three fine-tunes (dense deltas of different seeds)."""
    root = tmp_path_factory.mktemp("moe-llama")
    base = dense_base(root / "base", "llama")
    return base, [make_expert(base, root / f"expert_{i}", seed=i + 1, scale=0.05) for i in range(3)]


@pytest.fixture(scope="session")
def mixtral(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_moe(tmp_path_factory.mktemp("moe-mixtral") / "moe", "mixtral")


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sentences of the tiny tokenizer's words, of different lengths (so batches are padded)."""
    words = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as", "was", "at", "by"]
    lines = [" ".join(words[(i * 3) % 16 : (i * 3) % 16 + 2 + i % 5]) for i in range(24)]
    path = tmp_path_factory.mktemp("moe-cal") / "cal.txt"
    path.write_text("\n".join(lines) + "\n")
    return path
