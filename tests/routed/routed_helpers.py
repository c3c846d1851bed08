"""Helpers of the routed-model tests: router texts and a one-call build."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import mergelab
from mergelab.routed import RouterData

WORDS = (
    "red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "sings", "big", "small",
    "the", "a", "very", "not", "happy", "sad", "fast", "slow", "old", "new",
)  # fmt: skip
LLAMA_WORDS = ("the", "a", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as", "was", "at", "by")


def router_texts(n_experts: int, n: int = 30, words: tuple[str, ...] = WORDS) -> list[RouterData]:
    """Per expert, ``n`` texts drawn from its own slice of ``words`` (separable by a router)."""
    per = len(words) // n_experts
    out = []
    for i in range(n_experts):
        rng = random.Random(i)
        vocab = words[i * per : (i + 1) * per]
        out.append(RouterData(train=[" ".join(rng.choice(vocab) for _ in range(5)) for _ in range(n)]))
    return out


def recipe(method: str, base: Path, experts: list[Path], params: dict[str, Any] | None = None, **extra: Any) -> dict:
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(e)} for e in experts],
        "parameters": params or {},
        **extra,
    }


ROUTER = {"epochs": 3, "batch_size": 64}


def build(
    method: str,
    base: Path,
    experts: list[Path],
    out: Path,
    params: dict[str, Any] | None = None,
    words: tuple[str, ...] = WORDS,
    **extra: Any,
) -> Path:
    """Build ``method`` into ``out`` with router texts from Python (sequence routers only)."""
    sequence = method in ("twin_merging", "split_merge") or "router" in extra
    if method in ("twin_merging", "split_merge"):
        extra.setdefault("router", ROUTER)
    rd = router_texts(len(experts), words=words) if sequence else None
    res = mergelab.merge(recipe(method, base, experts, params, **extra), out, router_data=rd, hash_inputs=False)
    return res.path
