"""Zero-shot task heads: the fixed classifier of each task in the ``zeroshot`` zoo variant.

Following the task-arithmetic protocol (Ilharco et al. 2023, "Editing Models with Task
Arithmetic", arXiv:2212.04089, after CLIP's zero-shot classifiers, Radford et al. 2021,
arXiv:2103.00020), a task's classifier is never trained: class *k*'s weight is the normalized
embedding, by the **pretrained** encoder (mean pooling, as everywhere in the zoo), of one plain
sentence that puts the label's name in the task's template (:meth:`TaskSpec.prompts`), and the
logits are the cosine similarities between the normalized pooled features and those weights,
times a fixed temperature::

    logits = T * normalize(mean_pool(encoder(text))) @ normalize(E).T,   E[k] = mean_pool(base(prompt_k))

The head belongs to the task, not to an expert: every expert is fine-tuned against it (frozen)
and every merged encoder is scored with it. The templates are written once in
:mod:`mergelab_bench.zoo.tasks` and never tuned to move a score.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open
from torch import nn

from mergelab_bench.zoo.backbone import Head, embed

TEMPERATURE = 100.0
"""Fixed logit scale of every zero-shot head: CLIP's (its learned scale is clipped at 100), not tuned."""

COSINE_KIND = "cosine"


@dataclass
class CosineHead(Head):
    """``linear(normalize(features))`` with no bias: the weight rows are ``T * normalize(E[k])``."""

    temperature: float = TEMPERATURE
    prompts: tuple[str, ...] = ()

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Differentiable logits (with respect to ``features``; the head's own tensors are frozen)."""
        return self.linear(nn.functional.normalize(features, dim=-1))

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.logits(features)

    def save(self, path: str | os.PathLike[str], extra: dict[str, str] | None = None) -> None:
        meta = {
            "head_kind": COSINE_KIND,
            "feature_norm": "l2",
            "temperature": repr(self.temperature),
            "prompts": json.dumps(list(self.prompts)),
            **(extra or {}),
        }
        super().save(path, meta)


def cosine_head(
    label_embeddings: torch.Tensor,
    labels: Sequence[str],
    task: str,
    *,
    temperature: float = TEMPERATURE,
    prompts: Sequence[str] = (),
) -> CosineHead:
    """A frozen cosine head from one embedding per label ([C, d])."""
    weight = temperature * nn.functional.normalize(label_embeddings.float(), dim=-1)
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.zero_()
    linear.requires_grad_(False)
    return CosineHead(linear.eval(), list(labels), task, temperature=float(temperature), prompts=tuple(prompts))


def zero_shot_head(
    encoder: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    labels: Sequence[str],
    task: str,
    *,
    max_len: int = 64,
    temperature: float = TEMPERATURE,
) -> CosineHead:
    """The zero-shot head of a task: the (pretrained) ``encoder``'s pooled embeddings of ``prompts``."""
    if len(prompts) != len(labels):
        raise ValueError(f"task {task}: {len(prompts)} prompts for {len(labels)} labels")
    emb = embed(encoder, tokenizer, list(prompts), max_len=max_len)
    return cosine_head(emb, labels, task, temperature=temperature, prompts=prompts)


def load_head(path: str | os.PathLike[str]) -> Head:
    """A stored head: a :class:`CosineHead` when its metadata says so, else a plain linear :class:`Head`."""
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    head = Head.load(path)
    if meta.get("head_kind") != COSINE_KIND:
        return head
    head.linear.requires_grad_(False)
    return CosineHead(
        head.linear,
        head.labels,
        head.task,
        temperature=float(meta.get("temperature", TEMPERATURE)),
        prompts=tuple(json.loads(meta.get("prompts", "[]"))),
    )
