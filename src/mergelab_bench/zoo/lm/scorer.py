"""Scoring causal LMs on built domains, and the on-disk cache of the zoo's own models' scores.

:class:`DomainScorer` holds the evaluation settings of one LM zoo (tokenizer, sequence length,
document token, decoding length, device) and the tokenized batches of each (domain, split,
limit), so scoring many models only pays for their forward passes. Scores of the zoo's own
models (base, experts) are cached as JSON next to the model (``<model dir>/scores/``), keyed by
the domain's content hash, the split, the row limit and the settings, like the classification
zoo's features: the denominators of normalized scores cost nothing after the first time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from mergelab_bench.zoo.cache import config_key, read_json, write_json
from mergelab_bench.zoo.lm.scoring import (
    LMBatch,
    answer_from_generation,
    doc_token_id,
    encode_answers,
    encode_texts,
    exact_match,
    greedy_generate,
    make_lm_batches,
    pad_token_id,
    perplexity,
)
from mergelab_bench.zoo.lm.tasks import LMTaskData

SCORES_FORMAT = 1
Scores = dict[str, dict[str, Any]]
"""``{metric: {"value": float, "n": int, ...}}`` (perplexity adds ``tokens`` and ``mean_nll``)."""


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x


class DomainScorer:
    """Perplexity and exact match of causal LMs on built domains, with fixed settings."""

    def __init__(
        self,
        tokenizer,
        *,
        max_len: int,
        doc_token: str | None,
        max_new_tokens: int,
        batch_size: int = 16,
        device: str = "cpu",
    ) -> None:
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.doc_token = doc_token
        self.doc_id = doc_token_id(tokenizer, doc_token)
        self.pad_id = pad_token_id(tokenizer)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = device
        self._batches: dict[tuple[str, str, str, int | None], list[LMBatch]] = {}

    @property
    def settings(self) -> dict[str, Any]:
        """What the scores depend on besides the model and the rows (part of the cache key)."""
        return {"max_len": self.max_len, "doc_token": self.doc_token, "max_new_tokens": self.max_new_tokens}

    def sequences(self, data: LMTaskData, split: str, limit: int | None) -> list[list[int]]:
        """The token ids perplexity scores: the first ``limit`` texts of a split encoded (texts of
        fewer than 2 ids, which predict nothing, left out)."""
        seqs = encode_texts(self.tokenizer, data.texts(split, limit), max_len=self.max_len, doc_id=self.doc_id)
        return [s for s in seqs if len(s) >= 2]

    def answer_sequences(self, data: LMTaskData, split: str, limit: int | None) -> list[tuple[list[int], int]]:
        """The first ``limit`` exact-match rows of a split as (prompt + answer ids, prompt length):
        the prompt as greedy decoding reads it, then the rest of the row's text (`` <answer>`` and
        the newline that ends it; see :func:`encode_answers`)."""
        rows = data.rows(split, limit)
        for r in rows:
            if not r["text"].startswith(r["prompt"]):
                raise ValueError(f"{data.name}: row {r['key']!r}: its text does not start with its prompt")
        return encode_answers(
            self.tokenizer,
            [r["prompt"] for r in rows],
            [r["text"][len(r["prompt"]) :] for r in rows],
            max_len=self.max_len,
            doc_id=self.doc_id,
        )

    def batches(self, data: LMTaskData, split: str, limit: int | None) -> list[LMBatch]:
        """The batches perplexity scores (:meth:`sequences`, length-sorted), made once per (domain, split, limit)."""
        key = (data.name, data.meta["content_sha256"], split, limit)
        if key not in self._batches:
            seqs = self.sequences(data, split, limit)
            self._batches[key] = make_lm_batches(seqs, batch_size=self.batch_size, pad_id=self.pad_id)
        return self._batches[key]

    def score(
        self,
        model: nn.Module,
        data: LMTaskData,
        split: str,
        limit: int | None,
        *,
        metrics: list[str] | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> Scores:
        """Every metric of the domain (or ``metrics``) for ``model`` on the first ``limit`` rows of a split."""
        out: Scores = {}
        for metric in metrics or data.metrics:
            if metric == "perplexity":
                ppl = perplexity(model, self.batches(data, split, limit), device=self.device, on_batch=on_step)
                out[metric] = {
                    "value": _finite(ppl.value),
                    "n": ppl.n,
                    "tokens": ppl.tokens,
                    "mean_nll": _finite(ppl.mean_nll),
                    "rows": {"nll": list(ppl.row_nll), "tokens": list(ppl.row_tokens)},
                }
            elif metric == "exact_match":
                rows = data.rows(split, limit)
                preds = greedy_generate(
                    model, self.tokenizer, [r["prompt"] for r in rows], doc_id=self.doc_id,
                    max_new_tokens=self.max_new_tokens, batch_size=max(self.batch_size, 32),
                    max_len=self.max_len, device=self.device, on_batch=on_step,
                )  # fmt: skip
                answers = [r["answer"] for r in rows]
                value = exact_match(preds, answers)
                correct = "".join(
                    "1" if answer_from_generation(p) == r["answer"].strip() else "0"
                    for p, r in zip(preds, rows, strict=True)
                )
                out[metric] = {
                    "value": _finite(value),
                    "n": len(rows),
                    "examples": _examples(rows, preds),
                    "rows": {"correct": correct},
                }
            else:
                raise ValueError(f"unknown LM metric {metric!r}")
        return out

    # -- disk cache for the zoo's own models
    def cache_file(self, owner: Path, data: LMTaskData, split: str, limit: int | None) -> Path:
        key = config_key(
            {
                "format": SCORES_FORMAT,
                "content": data.meta["content_sha256"],
                "metrics": data.metrics,
                "split": split,
                "limit": limit,
                **self.settings,
            }
        )
        return owner / "scores" / f"{data.name}-{split}-{limit or 'all'}-{key}.json"

    def cached_score(
        self,
        owner: Path,
        load: Callable[[], nn.Module],
        data: LMTaskData,
        split: str,
        limit: int | None,
        on_step: Callable[[], None] | None = None,
    ) -> Scores:
        """Scores of the model stored in ``owner`` (``load()`` gives it), from ``owner/scores`` when there."""
        path = self.cache_file(owner, data, split, limit)
        if path.is_file():
            cached = read_json(path)["scores"]
            if all("rows" in v for v in cached.values()):  # older caches lack per-row results: rescore
                return cached
        scores = self.score(load(), data, split, limit, on_step=on_step)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"task": data.name, "split": split, "limit": limit, **self.settings, "scores": scores})
        return scores


def _examples(rows: list[dict[str, str]], preds: list[str], k: int = 5) -> list[dict[str, str]]:
    """The first ``k`` (prompt, answer, generated) triples, for a human glance at the record."""
    return [
        {"prompt": r["prompt"], "answer": r["answer"], "generated": p} for r, p in zip(rows[:k], preds[:k], strict=True)
    ]
