"""Small real Hugging Face checkpoints made locally: for the demo, the tests and the benchmarks.

``make_base`` saves a random-init ``LlamaForCausalLM`` with ``save_pretrained`` (so the folder is
exactly what transformers writes, shards and index included) plus a tiny tokenizer.
``make_expert`` writes a "fine-tune" of it: the base plus a seeded, structured delta, shard by
shard, so memory stays bounded even for large bases. Deltas come in kinds that exercise merging:
``dense`` (every weight moves a little), ``sparse`` (a few weights move a lot), ``conflict``
(the negative of another expert's dense delta plus noise, so signs disagree).
``write_base_streamed`` writes a random-init Llama of any size tensor by tensor (no model in
memory: peak memory is one chunk of one tensor), for the multi-billion-parameter benchmark sets.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import BinaryIO, Literal

import torch
from safetensors.torch import load_file, save_file

from mergelab.checkpoint.writer import parse_size

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


_ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def _llama_specs(cfg: object) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every saved tensor of ``LlamaForCausalLM(cfg)``, in its state-dict order,
    from a model built on the meta device (no memory); a tied ``lm_head.weight`` is left out, as
    ``save_pretrained`` does."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)  # type: ignore[arg-type]
    specs = [(n, tuple(t.shape)) for n, t in model.state_dict().items()]
    if getattr(cfg, "tie_word_embeddings", False):
        specs = [s for s in specs if s[0] != "lm_head.weight"]
    return specs


def _shard_groups(specs: list[tuple[str, tuple[int, ...]]], itemsize: int, limit: int) -> list[list[int]]:
    """Indices of ``specs`` split greedily, in order, into shards of at most ``limit`` bytes (a tensor
    larger than ``limit`` gets a shard of its own)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, (_, shape) in enumerate(specs):
        nbytes = math.prod(shape) * itemsize
        if groups[-1] and used + nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += nbytes
    return groups


def _write_init_tensor(
    fh: BinaryIO, name: str, shape: tuple[int, ...], std: float, dtype: torch.dtype, seed: int, chunk: int
) -> None:
    """Stream one tensor's bytes to ``fh``: ones for norm weights, else N(0, std) drawn in float32
    (as transformers' ``_init_weights``) and cast to ``dtype``, ``chunk`` elements at a time from
    a generator seeded by (seed, name)."""
    gen = torch.Generator().manual_seed(_seed("base", seed, name))
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    rows = shape[0] if shape else 1
    step = max(1, chunk // max(row, 1))
    for start in range(0, rows, step):
        n = min(step, rows - start) * row
        if "norm" in name:
            part = torch.ones(n, dtype=dtype)
        else:
            part = torch.empty(n, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)
        fh.write(part.view(torch.uint8).numpy().data)


def write_base_streamed(
    path: str | Path,
    *,
    hidden: int,
    layers: int,
    intermediate: int,
    vocab: int,
    heads: int,
    kv_heads: int | None = None,
    tie_embeddings: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str = "1GB",
    max_position_embeddings: int = 256,
    seed: int = 0,
    chunk_elements: int = 1 << 24,
) -> Path:
    """Write a random-init ``LlamaForCausalLM`` checkpoint without building the model.

    The folder is what ``save_pretrained`` writes (``config.json``, ``generation_config.json``,
    ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` shards of at most
    ``max_shard_size`` plus ``model.safetensors.index.json``) and the tiny tokenizer of
    :func:`make_tokenizer`. Tensors carry transformers' names and the init scale of its
    ``_init_weights``: N(0, ``initializer_range``) for linear layers and embeddings, ones for the
    RMSNorm weights, each drawn from its own seeded generator. Each shard's safetensors header is
    written first and the tensors streamed after it, ``chunk_elements`` at a time, so memory stays
    at one chunk (64 MB of float32 by default) whatever the model's size. The values differ from
    :func:`make_base`'s (another random stream), not their distribution.
    """
    from transformers import GenerationConfig, LlamaConfig

    if dtype not in _ST_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; use one of {sorted(map(str, _ST_DTYPES))}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        vocab_size=vocab,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_embeddings,
    )
    specs = _llama_specs(cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups = _shard_groups(specs, itemsize, parse_size(max_shard_size))
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups, 1):
        fn = "model.safetensors" if len(groups) == 1 else f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for i in group:
            name, shape = specs[i]
            nbytes = math.prod(shape) * itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fn
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / fn, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little"))
            fh.write(raw)
            for i in group:
                name, shape = specs[i]
                _write_init_tensor(fh, name, shape, cfg.initializer_range, dtype, seed, chunk_elements)
        total += offset
    if len(groups) > 1:
        index = {
            "metadata": {"total_parameters": sum(math.prod(s) for _, s in specs), "total_size": total},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    cfg.architectures = ["LlamaForCausalLM"]
    # what save_pretrained records for a model in this dtype (``torch_dtype`` before transformers 4.56)
    setattr(cfg, "dtype" if "dtype" in cfg.to_dict() else "torch_dtype", dtype)
    cfg.save_pretrained(str(path))
    GenerationConfig.from_model_config(cfg).save_pretrained(str(path))
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
