"""Turning texts into token sequences, and the two LM metrics: perplexity and exact match.

Every text is encoded the same way for training and for scoring: the *document token*
(``<|endoftext|>``, SmolLM2's document separator, else the tokenizer's EOS or BOS) followed by
the text's tokens (no other special tokens, no chat template), cut to ``max_len`` tokens in
all. Every text token is then predicted from a context that starts at the document token.

* **Perplexity** of a model on a set of texts is ``exp`` of the token-weighted mean negative
  log-likelihood: ``exp(sum of NLL over every predicted token / number of predicted tokens)``,
  so long and short texts weigh by their token counts (the usual corpus perplexity).
* **Exact match** on ``(prompt, answer)`` rows: greedy decoding from the prompt (left-padded
  batches, KV cache) for up to ``max_new_tokens`` tokens or the first newline; the prediction
  is the generated text up to the first newline, stripped, and it must equal the answer.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergelab.data.sources import pad_right

DOC_TOKEN = "<|endoftext|>"


def doc_token_id(tokenizer, preferred: str | None = DOC_TOKEN) -> int | None:
    """The id of the token every sequence starts with (``None``: no such token, start at the text)."""
    if preferred is not None:
        vocab = tokenizer.get_vocab()
        if preferred in vocab:
            return int(vocab[preferred])
    for tid in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return int(tid)
    return None


def pad_token_id(tokenizer) -> int:
    """The id written in padded positions (never attended to, never scored)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_texts(tokenizer, texts: Sequence[str], *, max_len: int, doc_id: int | None) -> list[list[int]]:
    """``[doc_id] + tokens(text)``, cut to ``max_len`` ids, for each text."""
    if not texts:
        return []
    prefix = [] if doc_id is None else [doc_id]
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [(prefix + list(ids))[:max_len] for ids in enc]


def encode_answers(
    tokenizer, prompts: Sequence[str], continuations: Sequence[str], *, max_len: int, doc_id: int | None
) -> list[tuple[list[int], int]]:
    """Teacher-forcing sequences of exact-match rows: each prompt encoded as :func:`greedy_generate`
    encodes it, followed by its continuation's tokens (the text greedy decoding should produce), cut
    to ``max_len`` ids in all; with the number of prompt ids (the continuation's ids start there)."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts for {len(continuations)} continuations")
    if not prompts:
        return []
    heads = encode_texts(tokenizer, prompts, max_len=max_len, doc_id=doc_id)
    tails = tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    return [((head + list(tail))[:max_len], len(head)) for head, tail in zip(heads, tails, strict=True)]


@dataclass
class LMBatch:
    """Right-padded sequences: ``labels`` are the input ids with ``-100`` on padding."""

    index: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    @property
    def labels(self) -> torch.Tensor:
        return self.input_ids.masked_fill(self.attention_mask == 0, -100)

    def to(self, device: str | torch.device) -> LMBatch:
        return LMBatch(self.index, self.input_ids.to(device), self.attention_mask.to(device))


def collate(seqs: Sequence[Sequence[int]], pad_id: int, index: Sequence[int] | None = None) -> LMBatch:
    """Right-pad ``seqs`` to the longest one."""
    ids, mask = pad_right(seqs, pad_id)
    return LMBatch(torch.tensor(list(index) if index is not None else range(len(seqs))), ids, mask)


def make_lm_batches(seqs: Sequence[Sequence[int]], *, batch_size: int, pad_id: int) -> list[LMBatch]:
    """Length-sorted batches (less padding; results do not depend on batch-mates)."""
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    return [
        collate([seqs[i] for i in order[s : s + batch_size]], pad_id, order[s : s + batch_size])
        for s in range(0, len(order), batch_size)
    ]


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position NLL [batch, seq-1] of ``labels[:, 1:]`` under ``logits[:, :-1]``; 0 where ignored."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    )
    return nll.view(shift_labels.shape)


def lm_loss(model: nn.Module, batch: LMBatch) -> tuple[torch.Tensor, int]:
    """Token-weighted mean NLL of a batch (what training minimises) and its predicted-token count."""
    labels = batch.labels
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    nll = token_nll(logits, labels)
    count = int((labels[:, 1:] != -100).sum())
    return nll.sum() / max(1, count), count


@dataclass(frozen=True)
class Perplexity:
    """Summed NLL (nats) over ``tokens`` predicted tokens of ``n`` texts.

    ``row_nll`` / ``row_tokens``: each text's summed NLL and predicted-token count, in the order the
    texts were given (what a bootstrap over texts resamples); empty when not recorded.
    """

    nll_sum: float
    tokens: int
    n: int
    row_nll: tuple[float, ...] = ()
    row_tokens: tuple[int, ...] = ()

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.tokens if self.tokens else math.nan

    @property
    def value(self) -> float:
        """``exp(mean NLL)``; ``nan`` for no tokens, ``inf`` on overflow."""
        if not self.tokens:
            return math.nan
        try:
            return math.exp(self.mean_nll)
        except OverflowError:
            return math.inf


@torch.no_grad()
def perplexity(
    model: nn.Module,
    batches: Sequence[LMBatch],
    *,
    device: str | torch.device = "cpu",
    on_batch: Callable[[], None] | None = None,
) -> Perplexity:
    """Corpus perplexity of ``model`` over pre-made batches (token-weighted, see the module docstring)."""
    was_training = model.training
    model.eval()
    total, tokens, n = 0.0, 0, 0
    per_row: dict[int, tuple[float, int]] = {}
    for b in batches:
        b = b.to(device)
        labels = b.labels
        nll = token_nll(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, labels)
        total += float(nll.double().sum())
        tokens += int((labels[:, 1:] != -100).sum())
        n += len(b.index)
        row_sums = nll.double().sum(-1).tolist()
        row_counts = (labels[:, 1:] != -100).sum(-1).tolist()
        for i, s, c in zip(b.index.tolist(), row_sums, row_counts, strict=True):
            per_row[int(i)] = (float(s), int(c))
        if on_batch:
            on_batch()
    model.train(was_training)
    order = sorted(per_row)
    return Perplexity(total, tokens, n, tuple(per_row[i][0] for i in order), tuple(per_row[i][1] for i in order))


# --------------------------------------------------------------------------------------------
# Greedy decoding and exact match


def answer_from_generation(text: str) -> str:
    """The generated text up to the first newline, stripped."""
    return text.split("\n", 1)[0].strip()


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Fraction of predictions equal to their answer after :func:`answer_from_generation`; ``nan`` for none."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return math.nan
    return sum(answer_from_generation(p) == a.strip() for p, a in zip(predictions, answers, strict=True)) / len(answers)


def cache_keyword(model: nn.Module) -> str:
    """The keyword a causal LM's forward takes its KV cache under: ``cache`` (transformers ≥ 5.25, which
    deprecates ``past_key_values``) or ``past_key_values``; a wrapper with ``**kwargs`` (``RoutedModel``)
    answers for the model it wraps."""
    seen: set[int] = set()
    m: object = model
    while m is not None and id(m) not in seen:
        seen.add(id(m))
        params = inspect.signature(m.forward).parameters  # type: ignore[attr-defined]
        if "cache" in params:
            return "cache"
        if "past_key_values" in params:
            return "past_key_values"
        m = getattr(m, "model", None)
    return "past_key_values"


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    doc_id: int | None,
    max_new_tokens: int = 8,
    batch_size: int = 32,
    max_len: int = 64,
    device: str | torch.device = "cpu",
    on_batch: Callable[[], None] | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens skipped), stopping at a newline.

    Prompts are encoded like training texts (:func:`encode_texts`), left-padded per batch, and
    decoded with the model's KV cache; positions are counted from each row's first real token,
    so a row's continuation does not depend on its batch-mates.
    """
    was_training = model.training
    model.eval()
    seqs = encode_texts(tokenizer, prompts, max_len=max_len, doc_id=doc_id)
    pad = pad_token_id(tokenizer)
    eos = tokenizer.eos_token_id
    key = cache_keyword(model)
    out: list[str] = [""] * len(prompts)
    order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
    for s in range(0, len(order), batch_size):
        rows = order[s : s + batch_size]
        width = max(len(seqs[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(seqs[i]) :] = torch.tensor(seqs[i])
            mask[r, width - len(seqs[i]) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        generated: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        past = None
        step_ids, step_pos = ids, positions
        for _ in range(max_new_tokens):
            res = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **{key: past})
            past = getattr(res, "cache", None) if key == "cache" else res.past_key_values
            nxt = res.logits[:, -1].argmax(-1)
            for r, tok in enumerate(nxt.tolist()):
                if done[r]:
                    continue
                if eos is not None and tok == eos:
                    done[r] = True
                    continue
                generated[r].append(tok)
                if "\n" in tokenizer.decode(generated[r], skip_special_tokens=True):
                    done[r] = True
            if all(done):
                break
            step_ids = nxt[:, None]
            step_pos = step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        for r, i in enumerate(rows):
            out[i] = tokenizer.decode(generated[r], skip_special_tokens=True)
        if on_batch:
            on_batch()
    model.train(was_training)
    return out
