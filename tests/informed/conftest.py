"""Fixtures for data-informed merging: tiny calibration files and a tiny BERT family with heads."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from tiny_models import one_torch_thread, save_tiny  # noqa: F401 - one_torch_thread: autouse

from mergelab.synthetic import make_expert, make_tokenizer

WORDS = ["the", "a", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as", "was", "at", "by"]


def write_jsonl(path: Path, n: int, seed: int, labels: list[str] | None = None) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for _ in range(n):
            row = {"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10)))}
            if labels:
                row["label"] = rng.choice(labels)
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def cal_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("cal")
    return [write_jsonl(root / f"task{i}.jsonl", 24, seed=i, labels=["neg", "pos", "mid"]) for i in range(3)]


@pytest.fixture(scope="session")
def bert_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    """A tiny random BertModel base, two experts, and one zoo-format linear head per expert."""
    from safetensors.torch import save_file
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    save_tiny(BertModel, BertConfig, root / "base", num_hidden_layers=2, pad_token_id=2)
    make_tokenizer(root / "base")
    experts = [make_expert(root / "base", root / f"expert_{i}", seed=i + 1, scale=0.05) for i in range(2)]
    heads = []
    for i in range(2):
        g = torch.Generator().manual_seed(10 + i)
        path = root / f"head_{i}.safetensors"
        save_file(
            {"weight": torch.randn(3, 32, generator=g), "bias": torch.zeros(3)},
            str(path),
            metadata={"labels": json.dumps(["neg", "pos", "mid"])},
        )
        heads.append(path)
    return root / "base", experts, heads
