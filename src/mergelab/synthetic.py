"""Small real Hugging Face checkpoints made locally: for the demo, the tests and the benchmarks.

``make_base`` saves a random-init ``LlamaForCausalLM`` with ``save_pretrained`` (so the folder is
exactly what transformers writes, shards and index included) plus a tiny tokenizer.
``make_expert`` writes a "fine-tune" of it: the base plus a seeded, structured delta, shard by
shard, so memory stays bounded even for large bases. Deltas come in kinds that exercise merging:
``dense`` (every weight moves a little), ``sparse`` (a few weights move a lot), ``conflict``
(the negative of another expert's dense delta plus noise, so signs disagree).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

DeltaKind = Literal["dense", "sparse", "conflict"]


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("\x00".join(map(str, parts)).encode()).digest()[:8], "little") & (
        (1 << 63) - 1
    )


def make_tokenizer(path: Path, vocab_size: int = 64) -> None:
    """A word-level tokenizer with ``vocab_size`` entries saved in transformers' format."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [
        "<unk>",
        "<s>",
        "</s>",
        "the",
        "a",
        "of",
        "and",
        "to",
        "in",
        "is",
        "it",
        "that",
        "for",
        "on",
        "with",
        "as",
        "was",
        "at",
        "by",
    ]
    vocab = {w: i for i, w in enumerate(words[: min(len(words), vocab_size)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))


def make_base(
    path: str | Path,
    *,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 128,
    vocab: int = 128,
    heads: int = 4,
    tie_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    safe_serialization: bool = True,
    seed: int = 0,
) -> Path:
    """Save a random-init Llama causal LM (real transformers checkpoint) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=tie_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)  # type: ignore[arg-type]  # transformers types .to() as a decorated wrapper
    if safe_serialization:
        kwargs: dict = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(str(path), **kwargs)
    else:  # the legacy pickle format (transformers 5 no longer writes it itself)
        path.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(str(path))
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    make_tokenizer(path)
    return path


def _delta(kind: DeltaKind, name: str, like: torch.Tensor, seed: int, scale: float, partner_seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_seed(kind, seed, name))
    shape = like.shape
    if kind == "dense":
        return torch.randn(shape, generator=gen) * scale
    if kind == "sparse":
        mask = torch.rand(shape, generator=gen) < 0.1
        return torch.randn(shape, generator=gen) * (3 * scale) * mask
    if kind == "conflict":
        partner = (
            torch.randn(shape, generator=torch.Generator().manual_seed(_seed("dense", partner_seed, name))) * scale
        )
        return -0.7 * partner + torch.randn(shape, generator=gen) * (0.2 * scale)
    raise ValueError(f"unknown delta kind {kind!r}")


def make_expert(
    base: str | Path,
    path: str | Path,
    *,
    kind: DeltaKind = "dense",
    seed: int = 1,
    scale: float = 0.02,
    partner_seed: int = 1,
) -> Path:
    """Write base + a seeded delta to ``path``, shard by shard, keeping the base's layout."""
    base, path = Path(base), Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(str(f))
            out = {}
            for name, t in tensors.items():
                if t.is_floating_point():
                    d = _delta(kind, name, t, seed, scale, partner_seed)
                    out[name] = (t.float() + d).to(t.dtype)
                else:
                    out[name] = t
            save_file(out, str(path / f.name), metadata={"format": "pt"})
            del tensors, out
        elif f.suffix == ".bin":
            sd = torch.load(f, map_location="cpu", weights_only=True)
            out = {
                n: (
                    (t.float() + _delta(kind, n, t, seed, scale, partner_seed)).to(t.dtype)
                    if t.is_floating_point()
                    else t
                )
                for n, t in sd.items()
            }
            torch.save(out, path / f.name)
        elif f.is_file():
            shutil.copyfile(f, path / f.name)
    return path


def make_family(
    root: str | Path,
    n_experts: int = 3,
    kinds: tuple[DeltaKind, ...] = ("dense", "sparse", "conflict"),
    **base_kwargs: object,
) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` experts under ``root`` (``base/``, ``expert_0/`` …)."""
    root = Path(root)
    base = make_base(root / "base", **base_kwargs)  # type: ignore[arg-type]
    experts = [
        make_expert(base, root / f"expert_{i}", kind=kinds[i % len(kinds)], seed=i + 1, partner_seed=1)
        for i in range(n_experts)
    ]
    return base, experts


def read_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())
