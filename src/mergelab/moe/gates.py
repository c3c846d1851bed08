"""Router (gate) initialisation for upcycled MoEs, as mergekit-moe's gate modes compute it.

mergekit-moe (``mergekit/moe/router.py``, ``get_gate_params``) sets the router row of expert ``e``
in layer ``ℓ`` to a direction in the residual stream that the expert's prompts produce:

* ``hidden`` (default): the **base model** runs on ``bos + prompt`` for each positive prompt; the
  hidden state *entering* layer ``ℓ`` (``output_hidden_states[ℓ]``, the residual stream, not the
  normalised router input) at the **last real token** is averaged over the prompts. mergekit-moe pads
  on the left, so its last position is the last real token; mergelab pads on the right and takes the
  last position the attention mask marks, which is the same token.
* ``hidden_avg``: the same with the **mean over the prompt's real tokens** (masked). mergekit-moe
  averages over the padded length, left pads included, so there a prompt's gate depends on the
  lengths of the other prompts in its batch; mergelab does not reproduce that.
* ``cheap_embed``: the sum of the prompts' token embeddings (pads masked), normalised, the same
  vector for every layer.
* ``random``: N(0, 1) entries; ``uniform_random``: U(−1/√d, 1/√d) (``nn.Linear``'s initialisation).

For the prompt modes, the mean over the expert's negative prompts is subtracted from the mean over
its positive prompts (``cheap_embed`` subtracts the normalised vectors), and each layer's vector is
L2-normalised. The functions below are pure tensor functions; :func:`prompt_gates` runs the base.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from mergelab.data.sources import pad_right
from mergelab.errors import RecipeError

EPS = 1e-8
"""The norm floor of mergekit-moe's normalisations."""

DEGENERATE_COND = 5.0
"""mergekit-moe's ``warn_degenerate_gates`` threshold on a layer's gate-matrix condition number."""


def last_real_token(hidden: Tensor, mask: Tensor) -> Tensor:
    """``[B, T, H]`` -> ``[B, H]``: each row's state at the last position its attention mask marks
    (right or left padding alike)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).amax(dim=1)
    if bool((last < 0).any()):
        raise RecipeError("a prompt has no tokens after tokenization; remove empty prompts")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def masked_mean(hidden: Tensor, mask: Tensor) -> Tensor:
    """``[B, T, H]`` -> ``[B, H]``: the mean over each row's real tokens."""
    m = mask.to(hidden.dtype).unsqueeze(-1)
    count = m.sum(dim=1)
    if bool((count == 0).any()):
        raise RecipeError("a prompt has no tokens after tokenization; remove empty prompts")
    return (hidden * m).sum(dim=1) / count


def layer_inputs(hidden_states: Sequence[Tensor], mask: Tensor, pooling: str) -> Tensor:
    """Per prompt and layer, the pooled state entering each decoder layer: ``[B, L, H]``.

    ``hidden_states`` is transformers' ``output_hidden_states`` tuple (``L + 1`` entries: the
    embeddings, then each layer's output); entry ``ℓ`` is the input of layer ``ℓ``, so the last
    entry (after the final layer) is dropped, as mergekit-moe does (``hidden_states[:-1]``).
    """
    pool = last_real_token if pooling == "last" else masked_mean
    return torch.stack([pool(h.float(), mask) for h in hidden_states[:-1]], dim=1)


def normalize(v: Tensor) -> Tensor:
    """L2-normalise along the last dimension (norms floored at 1e-8)."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=EPS)


def gate_vectors(positive: Tensor, negative: Tensor | None = None) -> Tensor:
    """``[P, L, H]`` per-prompt vectors (and ``[Q, L, H]`` negatives) -> ``[L, H]``: mean over the
    positive prompts minus the mean over the negative ones, normalised per layer."""
    v = positive.mean(dim=0)
    if negative is not None and negative.shape[0]:
        v = v - negative.mean(dim=0)
    return normalize(v)


def embedding_sum(embed: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """``[H]``: the sum of the token embeddings of every real token of a batch (``cheap_embed``)."""
    return (embed.float()[input_ids] * mask.unsqueeze(-1).float()).sum(dim=(0, 1))


def cheap_embed_vector(positive: Tensor, negative: Tensor | None = None) -> Tensor:
    """``cheap_embed``'s gate from the embedding sums of the positive (and negative) prompts:
    normalise each side's total, subtract, normalise again."""
    v = normalize(positive.sum(dim=0))
    if negative is not None and negative.shape[0]:
        v = v - normalize(negative.sum(dim=0))
    return normalize(v)


def random_gate(shape: tuple[int, ...], generator: torch.Generator, *, uniform: bool) -> Tensor:
    """``random``: N(0, 1) entries; ``uniform_random``: U(−1/√d, 1/√d) with ``d = shape[-1]``."""
    if not uniform:
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    scale = math.sqrt(1.0 / shape[-1])
    return torch.rand(shape, generator=generator, dtype=torch.float32) * (2 * scale) - scale


def degenerate_layers(gates: Tensor, threshold: float = DEGENERATE_COND) -> list[int]:
    """Layers whose gate matrix ``gates[ℓ]`` (``[N, H]``) has condition number above ``threshold``:
    its experts' rows are close to dependent, so some experts will rarely be chosen."""
    out = []
    for layer in range(gates.shape[0]):
        c = torch.linalg.cond(gates[layer].double())
        if not bool(torch.isfinite(c)) or float(c) > threshold:
            out.append(layer)
    return out


def degenerate_warning(layers: Sequence[int], num_layers: int) -> str | None:
    """mergekit-moe's degenerate-gate warning as one line (``None`` when no layer is degenerate)."""
    if not layers:
        return None
    if len(layers) >= num_layers:
        where = "every layer has"
    elif len(layers) == 1:
        where = f"layer {layers[0]} has"
    else:
        where = f"layers {', '.join(map(str, layers))} have"
    return (
        f"{where} degenerate gates (condition number of the gate matrix > {DEGENERATE_COND:g}): "
        "the prompts of different experts give nearly dependent directions, so some experts will be "
        "under-used; use more distinct prompts (or negative prompts)"
    )


# --------------------------------------------------------------------------- running the base


@dataclass(frozen=True)
class PromptSet:
    """One gate's prompts: the routed or shared expert it belongs to."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()


def tokenize_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of ``bos + prompt`` (no other special tokens), as mergekit-moe tokenizes them;
    nothing is prepended when the tokenizer has no BOS token."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    out = []
    for p in prompts:
        ids = bos + list(tokenizer(p, add_special_tokens=False)["input_ids"])
        if not ids:
            raise RecipeError(f"prompt {p!r} has no tokens after tokenization; remove it")
        out.append(ids)
    return out


def _batches(items: Sequence[list[int]], size: int) -> Iterable[Sequence[list[int]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prompt_gates(
    sets: Sequence[PromptSet],
    tokenizer,
    *,
    mode: str,
    model: torch.nn.Module | None = None,
    embed: Tensor | None = None,
    num_layers: int,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """``[L, S, H]``: the normalised gate vector of each prompt set, per layer.

    ``hidden`` / ``hidden_avg`` run ``model`` (the base, a causal LM) once per batch of
    ``batch_size`` prompts, over the distinct prompts of every set together; ``cheap_embed`` reads
    ``embed`` (the base's input embedding) only.
    """
    prompts = list(dict.fromkeys(p for s in sets for p in (*s.positive, *s.negative)))
    ids = tokenize_prompts(tokenizer, prompts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    per_prompt: dict[str, Tensor] = {}
    if mode == "cheap_embed":
        if embed is None:
            raise RecipeError("gate_mode cheap_embed needs the base's model.embed_tokens.weight")
        for p, row in zip(prompts, ids):
            t, m = pad_right([row], pad_id)
            per_prompt[p] = embedding_sum(embed, t, m)
        out = []
        for s in sets:
            neg = torch.stack([per_prompt[p] for p in s.negative]) if s.negative else None
            v = cheap_embed_vector(torch.stack([per_prompt[p] for p in s.positive]), neg)
            out.append(v.expand(num_layers, -1))
        return torch.stack(out, dim=1)
    if model is None:
        raise RecipeError(f"gate_mode {mode}: the base model is needed to compute hidden states")
    pooling = "last" if mode == "hidden" else "mean"
    dev = torch.device(device)
    done = 0
    with torch.no_grad():
        for chunk in _batches(ids, batch_size):
            t, m = pad_right(chunk, pad_id)
            hs = model(input_ids=t.to(dev), attention_mask=m.to(dev), output_hidden_states=True).hidden_states
            if len(hs) != num_layers + 1:
                raise RecipeError(
                    f"the base returned {len(hs)} hidden states for {num_layers} layers; "
                    "it is not a decoder of the expected depth"
                )
            vecs = layer_inputs(hs, m.to(dev), pooling).cpu()
            for j in range(len(chunk)):
                per_prompt[prompts[done + j]] = vecs[j]
            done += len(chunk)
            if on_batch is not None:
                on_batch(len(chunk))
    gates = []
    for s in sets:
        pos = torch.stack([per_prompt[p] for p in s.positive])
        neg = torch.stack([per_prompt[p] for p in s.negative]) if s.negative else None
        gates.append(gate_vectors(pos, neg))
    return torch.stack(gates, dim=1)
