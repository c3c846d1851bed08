"""Helpers shared by the tests: tiny random transformers checkpoints (one set of sizes, saved where asked),
reading a checkpoint folder back, a folder digest, a benchmark script as a module, and the one-torch-thread
fixture."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

#: The sizes of every tiny model here (a test overrides what it needs: layers, heads, vocabulary).
TINY_SIZES: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 64,
}


def save_tiny(model_cls: Any, config_cls: Any, path: Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Save a randomly initialised ``model_cls(config_cls(**TINY_SIZES, **overrides))`` (torch seeded with
    ``seed`` first) to ``path``; returns ``path``."""
    torch.manual_seed(seed)
    model_cls(config_cls(**{**TINY_SIZES, **overrides})).save_pretrained(str(path))
    return path


def load_dir(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files directly in ``folder`` (one model's shards), by name."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file under ``path``, by relative name (to check that a folder was left untouched)."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file()
    }


def load_benchmark(name: str) -> ModuleType:
    """A fresh module of the script ``benchmarks/<name>.py`` (its ``main(argv)`` runs the benchmark)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread while a test runs (the count restored after): tiny models run as fast on one,
    and OpenMP spin-waits do not slow them down on a shared 2-core machine. A folder's ``conftest.py``
    turns it on for its tests with ``from tiny_models import one_torch_thread``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
