"""The data phase of MoE compression: routing statistics of an MoE on calibration data.

The MoE runs (transformers, on ``--device``) on calibration batches from the same sources as the
data-informed merges (:mod:`mergelab.data`: a JSONL/text file or a registered named split). A
forward pre-hook on each layer's sparse MoE block sees the tokens entering it; for the real tokens
(attention mask) it computes the router logits ``x Rᵀ`` with the layer's router weight from the
checkpoint and accumulates, per layer:

* ``counts[e]``: how many tokens have expert ``e`` among their top-k logits (the experts the model
  routes them to; softmax keeps the order) — M-SMoE's usage frequency;
* ``logit_gram = Σ_t l_t l_tᵀ``: the Gram matrix of the router-logit columns, whose cosines are
  M-SMoE's expert similarity (``"router-logits"``), accumulated without keeping the logits;
* for Sub-MoE, ``output_tokens`` real tokens of each layer, on which every expert is applied
  afterwards (``output_gram``: the Gram matrix of the experts' output vectors): evenly spaced over
  all the calibration batches' real tokens (:func:`spread_picks`; the same positions in every
  layer, no randomness), so they come from every part of the calibration data, not from its first
  example.

A block must receive one row per position of its batch (``[batch, seq, d]``, as Mixtral and
Qwen-MoE blocks do): the attention mask tells the real tokens from the pads. A block that receives
another number of rows (a model that packs or drops tokens first) is refused in one line rather than
counted over pads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from mergelab.checkpoint.reader import CheckpointReader
from mergelab.errors import PlanError
from mergelab.moe.architectures import DENSE_PROJECTIONS, MoeArchitecture
from mergelab.moe.grouping import cosine_from_gram, usage_frequencies


@dataclass
class RoutingStats:
    """Per MoE layer (by layer index): top-k counts ``[N]``, router-logit Gram ``[N, N]`` and, when
    collected, expert-output Gram ``[N, N]``; ``tokens``: the real tokens seen."""

    num_experts: int
    top_k: int
    tokens: int
    counts: dict[int, Tensor]
    logit_gram: dict[int, Tensor]
    output_gram: dict[int, Tensor] = field(default_factory=dict)

    def frequencies(self, layer: int) -> Tensor:
        return usage_frequencies(self.counts[layer])

    def logit_similarity(self, layer: int) -> Tensor:
        return cosine_from_gram(self.logit_gram[layer])

    def output_similarity(self, layer: int) -> Tensor:
        if layer not in self.output_gram:
            raise PlanError(f"layer {layer}: no expert-output statistics (Sub-MoE collects them in its data phase)")
        return cosine_from_gram(self.output_gram[layer])

    def summary(self) -> dict[str, Any]:
        """JSON-safe: per layer, the usage frequencies."""
        return {
            "tokens": self.tokens,
            "top_k": self.top_k,
            "frequencies": {str(k): [round(float(x), 6) for x in self.frequencies(k)] for k in sorted(self.counts)},
        }


def moe_blocks(model: nn.Module, arch: MoeArchitecture, layers: Iterable[int]) -> dict[int, nn.Module]:
    """Each MoE layer's sparse block module (the first of ``arch.modules`` the model has)."""
    out = {}
    for layer in layers:
        for path in arch.modules:
            try:
                out[layer] = model.get_submodule(path.format(layer=layer))
                break
            except AttributeError:
                continue
        else:
            raise PlanError(f"layer {layer}: no MoE block module ({', '.join(arch.modules)}) in the loaded model")
    return out


@torch.no_grad()
def collect_routing(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    arch: MoeArchitecture,
    routers: Mapping[int, Tensor],
    top_k: int,
    device: torch.device,
    output_tokens: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> tuple[RoutingStats, dict[int, Tensor]]:
    """Run ``model`` on ``batches`` and return the routing statistics and, per layer, up to
    ``output_tokens`` of the real tokens entering the MoE block (float32, for expert outputs),
    evenly spaced over every batch's real tokens (:func:`spread_picks`)."""
    batches = list(batches)
    total = sum(_real_tokens(b) for b in batches)
    picks = spread_picks(total, output_tokens)
    n = next(iter(routers.values())).shape[0]
    counts = {layer: torch.zeros(n, dtype=torch.float64) for layer in routers}
    grams = {layer: torch.zeros(n, n, dtype=torch.float64) for layer in routers}
    kept: dict[int, list[Tensor]] = {layer: [] for layer in routers}
    weights = {layer: r.to(device=device, dtype=torch.float32) for layer, r in routers.items()}
    state: dict[str, Any] = {}

    def hook_for(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            x = x.reshape(-1, x.shape[-1]).float()
            mask = state["mask"]
            if mask.numel() != x.shape[0]:
                raise PlanError(
                    f"layer {layer}: the MoE block received {x.shape[0]} token rows for a batch of {mask.numel()} "
                    "positions; the real tokens cannot be told from the pads (a model that packs or drops tokens "
                    "before its MoE blocks is not supported)"
                )
            x = x[mask]
            logits = x @ weights[layer].T
            top = torch.topk(logits, top_k, dim=-1).indices.reshape(-1)
            counts[layer] += torch.bincount(top, minlength=n).double().cpu()
            grams[layer] += (logits.double().T @ logits.double()).cpu()
            start = state["offset"]
            here = picks[(picks >= start) & (picks < start + x.shape[0])] - start
            if here.numel():
                kept[layer].append(x[here.to(x.device)].cpu())

        return hook

    blocks = moe_blocks(model, arch, routers)
    handles = [blocks[layer].register_forward_pre_hook(hook_for(layer), with_kwargs=True) for layer in routers]
    tokens = 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch.get("attention_mask")
            mask = torch.ones_like(ids) if mask is None else mask.to(device)
            state["mask"] = mask.reshape(-1).bool()
            state["offset"] = tokens
            model(input_ids=ids, attention_mask=mask)
            tokens += int(mask.sum())
            if on_batch is not None:
                on_batch(int(ids.shape[0]))
    finally:
        for h in handles:
            h.remove()
    stats = RoutingStats(n, top_k, tokens, counts, grams)
    return stats, {layer: torch.cat(v) if v else torch.zeros(0) for layer, v in kept.items()}


def _real_tokens(batch: Mapping[str, Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def spread_picks(total: int, k: int) -> Tensor:
    """Indices of ``min(k, total)`` of ``total`` tokens, evenly spaced (the middle of each of k equal
    stretches: ⌊(i + ½)·total / k⌋), increasing; all of them when ``total ≤ k``."""
    if k <= 0 or total <= 0:
        return torch.zeros(0, dtype=torch.long)
    if total <= k:
        return torch.arange(total)
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * (total / k)).floor().long()


def expert_output_grams(
    reader: CheckpointReader,
    arch: MoeArchitecture,
    tokens: Mapping[int, Tensor],
    num_experts: int,
    activation: str = "silu",
) -> dict[int, Tensor]:
    """Per layer, the Gram matrix of the experts' output vectors on the same tokens:
    ``G_ij = <E_i(X), E_j(X)>`` with ``E(x) = down(act(gate x) ⊙ up x)`` (weights from ``reader``)."""
    from transformers.activations import ACT2FN

    act = ACT2FN[activation]
    out: dict[int, Tensor] = {}
    for layer, x in tokens.items():
        outputs = []
        for e in range(num_experts):
            gate, up, down = (reader.read(arch.expert_name(layer, e, p)).float() for p in DENSE_PROJECTIONS)
            outputs.append(((act(x @ gate.T) * (x @ up.T)) @ down.T).reshape(-1).double())
        flat = torch.stack(outputs)
        out[layer] = flat @ flat.T
    return out
