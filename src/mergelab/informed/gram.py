"""Gram matrices of linear layers' inputs for RegMean (Jin et al. 2023, arXiv:2212.09849).

For every linear layer (``nn.Linear``, GPT-2 ``Conv1D``) a forward hook adds XᵀX of the rows it
sees (tokens × batch flattened; rows of padding tokens are left out when the layer's input lines
up with the batch's attention mask) to a float32 accumulator and counts the rows. The references
(bloomberg/dataless-model-merging, fusion_bench) keep the running mean over rows and include
padding rows; mergelab keeps the sum and the count (``gram``, ``rows``) so that the merge can use
either the mean (default, as the references) or the sum.

Memory: one d_in × d_in float32 matrix per linear layer (Σ d_in² × 4 bytes per expert). When that
exceeds the budget the phase collects the layers in groups, one pass over the data per group, and
writes each group to disk before the next (see :mod:`mergelab.informed.phase`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mergelab.data.sources import batch_rows, take_examples
from mergelab.informed.modeling import default_forward_fn, module_weight, to_device


class GramCollector:
    """Forward hooks that accumulate XᵀX (float32) and the row count per module."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.modules = dict(modules)
        self.grams: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = dict.fromkeys(self.modules, 0)
        self.mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if not inputs or not isinstance(inputs[0], torch.Tensor):
                return
            x = inputs[0].detach()
            d = x.shape[-1]
            mask = self.mask
            if mask is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                rows = x[mask.to(device=x.device).bool()]
            else:
                rows = x.reshape(-1, d)
            rows = rows.reshape(-1, d).float()
            g = self.grams.get(name)
            if g is None:
                g = self.grams[name] = torch.zeros(d, d, dtype=torch.float32, device=x.device)
            g.addmm_(rows.T, rows)
            self.rows[name] += rows.shape[0]

        return hook

    @contextmanager
    def attached(self):
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles = []

    def result(self) -> dict[str, tuple[torch.Tensor, int]]:
        out = {}
        for name, mod in self.modules.items():
            g = self.grams.get(name)
            if g is None:  # the layer never ran on this data: a zero Gram (it then gets the average)
                w = module_weight(mod)
                d = w.shape[0] if _in_out(mod) else w.shape[1]
                g = torch.zeros(d, d, dtype=torch.float32, device=w.device)
            out[name] = (g, self.rows[name])
        return out


def _in_out(mod: nn.Module) -> bool:
    return not isinstance(mod, nn.Linear)


def gram_matrices(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    modules: Mapping[str, nn.Module],
    num_examples: int | None = 256,
    forward_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], Any] | None = None,
    device: str | torch.device | None = None,
    advance: Callable[[int], None] | None = None,
) -> tuple[dict[str, tuple[torch.Tensor, int]], int]:
    """(module name → (Σ XᵀX float32, rows), examples) for ``modules`` of ``model`` on ``batches``."""
    fwd = forward_fn or default_forward_fn
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    col = GramCollector(modules)
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad(), col.attached():
            for batch in take_examples(batches, num_examples):
                batch = to_device(batch, dev)
                mask = batch.get("attention_mask")
                col.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
                fwd(model, batch)
                n = batch_rows(batch)
                seen += n
                if advance is not None:
                    advance(n)
    finally:
        model.train(was_training)
    return col.result(), seen
