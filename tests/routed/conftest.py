"""Fixtures of the routed-model tests: tiny BERT families (all tensors moved, or only the linear
layers), a tiny two-task zoo for the router's data, and a helper that builds a routed model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, dst / f)


def linear_only_copy(src: Path, dst: Path, *, scale: float, seed: int) -> Path:
    """``src`` with noise on the weights and biases of its linear layers only."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(src), local_files_only=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                for p in mod.parameters(recurse=False):
                    p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(dst, safe_serialization=True)
    _copy_tokenizer(src, dst)
    return dst


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny BERT encoder (hidden 16, 2 layers) and 3 experts that move every tensor (embeddings included)."""
    from mergelab_bench.zoo.testing import perturbed_copy, write_tiny_backbone

    root = tmp_path_factory.mktemp("bert")
    base = write_tiny_backbone(root / "base", hidden=16)
    experts = []
    for i in range(3):
        e = perturbed_copy(base, root / f"expert_{i}", scale=0.05, seed=10 + i, skip=())
        _copy_tokenizer(base, e)
        experts.append(e)
    return base, experts


@pytest.fixture(scope="session")
def linear_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny BERT and 2 experts that change only linear layers (SMILE routes exactly those)."""
    from mergelab_bench.zoo.testing import write_tiny_backbone

    root = tmp_path_factory.mktemp("bertlin")
    base = write_tiny_backbone(root / "base", hidden=16)
    return base, [linear_only_copy(base, root / f"expert_{i}", scale=0.05, seed=20 + i) for i in range(2)]


@pytest.fixture(scope="session")
def zoo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mergelab_bench.zoo.testing import write_tiny_zoo

    return write_tiny_zoo(tmp_path_factory.mktemp("routedzoo"))
