"""WEMoE's test-time adaptation: the gates learn by minimising the entropy of the predictions.

Each step takes one batch of unlabeled inputs per task, runs the routed model (the gates decide
each input's coefficients, :mod:`mergelab.routed.layers`), and adds up each task's mean
prediction entropy (:func:`mergelab.routed.wemoe.entropy`): the task head's logits for encoders
(the calibration source's ``head:``, ``zoo`` for the zoo's heads) or the next-token distribution
of a causal LM (over real tokens). Only the gates are trained (Adam).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import RecipeError
from mergelab.recipe import Recipe
from mergelab.routed.wemoe import WemoeParams, entropy


def _task_data(
    root: Path, rec: Recipe, p: WemoeParams, kind: str, calibration: Sequence[Any] | None, seed: int = 0
) -> list[tuple[list[dict[str, Any]], Any]]:
    from mergelab.data.sources import load_examples, load_tokenizer, take_examples, tokenize_batches, zoo_head_path
    from mergelab.informed.modeling import LinearHead, default_logits_fn
    from mergelab.routed.bundle import SHARED

    tok = None
    out = []
    for i, m in enumerate(rec.models):
        cal = calibration[i] if calibration is not None else None
        fn = getattr(cal, "logits_fn", None)
        batches_in = getattr(cal, "batches", None)
        head = None
        src = m.calibration
        if src is not None and src.head is not None:
            path = zoo_head_path(src.zoo_task, src.zoo) if src.head == "zoo" and src.zoo_task else Path(src.head)
            head = LinearHead.load(path, p.pooling)
        if fn is None:
            fn = default_logits_fn(kind, head)  # type: ignore[arg-type]
        if batches_in is not None:
            batches = list(take_examples(batches_in, p.examples))
        else:
            if src is None:
                raise RecipeError(f"model {m.model}: wemoe needs unlabeled inputs (a calibration source)")
            ex = load_examples(src, p.examples)
            if tok is None:
                tok = load_tokenizer(root / SHARED)
            order = torch.randperm(len(ex.texts), generator=torch.Generator().manual_seed(seed + i)).tolist()
            texts = [ex.texts[j] for j in order]  # shuffled once, as the reference's data loader draws rows
            batches = tokenize_batches(tok, texts, batch_size=p.batch_size, max_length=p.max_length)
        batches = [{k: v for k, v in b.items() if k != "labels"} for b in batches]  # never labels
        if not batches:
            raise RecipeError(f"model {m.model}: no inputs for wemoe's gates")
        out.append((batches, fn))
    return out


def train_wemoe(
    root: Path, rec: Recipe, p: WemoeParams, device: torch.device, seed: int, calibration: Sequence[Any] | None
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Learn the gates of the routed model being built in ``root``; (gate tensors, mean entropy per step)."""
    from mergelab.routed.model import RoutedModel, _key

    model = RoutedModel.from_pretrained(root, device=device)
    tasks = _task_data(root, rec, p, model.kind, calibration, seed)
    assert model.gates is not None
    model.requires_grad_(False)
    model.gates.requires_grad_(True)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.gates.parameters(), lr=p.lr)
    iters = [itertools.cycle(b) for b, _ in tasks]
    history: list[float] = []
    for _ in range(p.steps):
        loss = torch.zeros((), device=device)
        for it, (_, fn) in zip(iters, tasks):
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in next(it).items()}
            logits = fn(model, batch)
            mask = batch.get("attention_mask") if logits.dim() == 3 else None
            loss = loss + entropy(logits, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss) / len(tasks))
    learned: dict[str, torch.Tensor] = {}
    blocks = model.router_config.get("blocks") or {}
    for block in blocks:
        for k, v in model.gates[_key(block)].state_dict().items():
            learned[f"gate.{block}.{k}"] = v.detach().cpu()
    return learned, history
