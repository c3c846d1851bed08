"""Fixtures of the LoRA tests: tiny Llama / GPT-2 bases (session-wide) and one-thread torch."""

from __future__ import annotations

from pathlib import Path

import pytest
from lora_helpers import gpt2_base, llama_base
from tiny_models import one_torch_thread  # noqa: F401 - autouse: one torch thread in these tests


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("peft")
    return llama_base(tmp_path_factory.mktemp("lora-llama") / "base", attention_bias=True)


@pytest.fixture(scope="session")
def gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("peft")
    return gpt2_base(tmp_path_factory.mktemp("lora-gpt2") / "base")
