"""RegMean++: Gram matrices from the merged model's previous blocks, merged block by block.

Nguyen et al. 2025, arXiv:2508.03121 (reference: tanganke/fusion_bench
``method/regmean_plusplus``). RegMean takes the inputs of every linear layer from expert i's own
forward pass; RegMean++ takes the inputs of block ℓ from the *merged* blocks 0..ℓ−1, so the data
phase and the merge interleave:

1. every tensor starts at RegMean's rule for tensors without a Gram (the weighted average, or
   task arithmetic), so embeddings and norms before the blocks are merged first;
2. one forward of this model per batch of task i records the inputs of block 0 (hidden states)
   and the other arguments of every block (attention masks, rotary embeddings: they do not
   depend on block weights);
3. for ℓ = 0..L−1: expert i's block ℓ runs on the merged hidden states of task i's data while
   hooks accumulate the Grams of its linear layers; block ℓ is merged with RegMean from those
   Grams; the merged block ℓ maps the hidden states to block ℓ+1's inputs;
4. linear layers outside the blocks (pooler, untied LM head) get their Grams from a forward of
   the fully merged model.

The blocks are the model's largest ``nn.ModuleList`` and must run one after another on the hidden
states (decoder-only LMs, BERT-style encoders; checked on the first batch). Memory: the T experts
and the merged model ((T + 1) × the model), each task's hidden states at the current depth
(Σ_i N_i × tokens × d × 4 bytes), the Grams of one block per expert.

Each tensor is merged by the method's own per-tensor function through ``merge_tensor``, and the
Grams it used are returned, so the streamed merge that follows reproduces these weights exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from mergelab.errors import PlanError
from mergelab.informed.gram import GramCollector
from mergelab.informed.modeling import (
    find_blocks,
    linear_modules,
    model_inputs,
    to_device,
)

# (module parameter name, per-expert aux dicts) -> merged tensor
MergeTensorFn = Callable[[str, list[dict[str, torch.Tensor]]], torch.Tensor]


@dataclass
class _Call:
    args: tuple
    kwargs: dict


def _forward_no_cache(model: nn.Module, batch: Mapping[str, Any]) -> Any:
    inputs = model_inputs(batch)
    try:
        return model(**inputs, use_cache=False)
    except TypeError:
        return model(**inputs)


def _hidden_of(call: _Call) -> torch.Tensor:
    return call.args[0] if call.args else call.kwargs["hidden_states"]


def _run_block(block: nn.Module, call: _Call, hidden: torch.Tensor) -> torch.Tensor:
    if call.args:
        out = block(hidden, *call.args[1:], **call.kwargs)
    else:
        out = block(**{**call.kwargs, "hidden_states": hidden})
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif not isinstance(out, torch.Tensor) and hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out


def _capture(model: nn.Module, blocks: nn.ModuleList, batch: Mapping[str, Any], check: bool) -> list[_Call]:
    calls: list[_Call | None] = [None] * len(blocks)
    outs: list[torch.Tensor | None] = [None] * len(blocks)
    handles = []

    def pre(idx: int):
        def hook(module, args, kwargs):
            if calls[idx] is not None:
                raise PlanError("RegMean++: a block ran twice in one forward (shared blocks are not supported)")
            calls[idx] = _Call(tuple(args), dict(kwargs))

        return hook

    def post(idx: int):
        def hook(module, args, kwargs, output):
            o = output[0] if isinstance(output, (tuple, list)) else output
            outs[idx] = o

        return hook

    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(pre(i), with_kwargs=True))
        if check:
            handles.append(b.register_forward_hook(post(i), with_kwargs=True))
    try:
        _forward_no_cache(model, batch)
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in calls):
        raise PlanError("RegMean++: not every block ran in the model's forward pass")
    if check:
        for i in range(len(blocks) - 1):
            nxt = _hidden_of(calls[i + 1])  # type: ignore[arg-type]
            out_i = outs[i]
            if out_i is None or nxt.shape != out_i.shape or not torch.equal(nxt, out_i):
                raise PlanError(
                    f"RegMean++: block {i + 1}'s input is not block {i}'s output; the blocks of this architecture "
                    "are not applied in sequence (use regmean)"
                )
    return calls  # type: ignore[return-value]


def regmean_plusplus(
    experts: Sequence[nn.Module],
    merged: nn.Module,
    task_batches: Sequence[Sequence[Mapping[str, Any]]],
    merge_tensor: MergeTensorFn,
    *,
    mergeable: Callable[[str], bool] = lambda name: True,
    device: str | torch.device | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[dict[str, tuple[torch.Tensor, int, bool]]]:
    """Merge ``merged`` in place block by block; per expert, module name → (Gram, rows, in_out)
    for every linear layer whose weight is ``mergeable`` (a name the checkpoint merges)."""
    dev = torch.device(device) if device is not None else next(merged.parameters()).device
    n = len(experts)
    for m in (*experts, merged):
        m.eval()
    merged_params = dict(merged.named_parameters())
    expert_params = [dict(e.named_parameters()) for e in experts]
    bname, blocks = find_blocks(merged)
    # the same ModuleList as ``blocks`` in each expert (the experts share the merged model's architecture)
    expert_blocks = [cast(nn.ModuleList, e.get_submodule(bname)) for e in experts]
    prefix = f"{bname}." if bname else ""
    lin = {k: v for k, v in linear_modules(merged).items() if mergeable(f"{k}.weight")}
    in_block = {k for k in lin if k.startswith(prefix) and k[len(prefix) :].split(".")[0].isdigit()}
    grams: list[dict[str, tuple[torch.Tensor, int, bool]]] = [{} for _ in range(n)]

    def set_param(name: str, aux: list[dict[str, torch.Tensor]]) -> None:
        if name in merged_params and mergeable(name):
            with torch.no_grad():
                merged_params[name].copy_(merge_tensor(name, aux).to(merged_params[name].dtype))

    with torch.no_grad():
        # 1. every tensor at the rule for tensors without a Gram
        for name in merged_params:
            set_param(name, [{} for _ in range(n)])
        # 2. block inputs of every batch of every task under the merged embeddings
        calls: list[list[list[_Call]]] = []
        hidden: list[list[torch.Tensor]] = []
        masks: list[list[torch.Tensor | None]] = []
        for i in range(n):
            ci: list[list[_Call]] = []
            hi: list[torch.Tensor] = []
            mi: list[torch.Tensor | None] = []
            for j, batch in enumerate(task_batches[i]):
                batch = to_device(batch, dev)
                c = _capture(merged, blocks, batch, check=(i == 0 and j == 0))
                ci.append(c)
                hi.append(_hidden_of(c[0]))
                am = batch.get("attention_mask")
                mi.append(am if isinstance(am, torch.Tensor) and am.dim() == 2 else None)
            calls.append(ci)
            hidden.append(hi)
            masks.append(mi)
        # 3. block by block
        for layer, block in enumerate(blocks):

            def full(rel: str, layer: int = layer) -> str:
                return f"{prefix}{layer}" + (f".{rel}" if rel else "")

            block_lin = {k: v for k, v in linear_modules(expert_blocks[0][layer]).items() if full(k) in lin}
            for i in range(n):
                eb = expert_blocks[i][layer]
                mods = {k: eb.get_submodule(k) for k in block_lin}
                col = GramCollector(mods)
                with col.attached():
                    for j in range(len(task_batches[i])):
                        col.mask = masks[i][j]
                        _run_block(eb, calls[i][j][layer], hidden[i][j])
                for k, (g, rows) in col.result().items():
                    grams[i][full(k)] = (g, rows, block_lin[k][1])
            for pname, _ in block.named_parameters():
                name = full(pname)
                mod = name.rsplit(".", 1)[0]
                aux = [
                    _aux(grams[i].get(mod)) if name.endswith(".weight") and mod in in_block else {} for i in range(n)
                ]
                set_param(name, aux)
            for i in range(n):
                for j in range(len(task_batches[i])):
                    hidden[i][j] = _run_block(block, calls[i][j][layer], hidden[i][j])
            if advance is not None:
                advance(1)
        del hidden, calls
        # 4. linear layers outside the blocks, on the fully merged model
        outside = {k: merged.get_submodule(k) for k in lin if k not in in_block}
        if outside:
            for i in range(n):
                col = GramCollector(outside)
                with col.attached():
                    for j, batch in enumerate(task_batches[i]):
                        batch = to_device(batch, dev)
                        col.mask = masks[i][j]
                        _forward_no_cache(merged, batch)
                for k, (g, rows) in col.result().items():
                    grams[i][k] = (g, rows, lin[k][1])
            for k in outside:
                set_param(f"{k}.weight", [_aux(grams[i][k]) for i in range(n)])
            if advance is not None:
                advance(1)
    del expert_params
    return grams


def _aux(entry: tuple[torch.Tensor, int, bool] | None) -> dict[str, torch.Tensor]:
    if entry is None:
        return {}
    g, rows, in_out = entry
    out = {"gram": g, "rows": torch.tensor(float(rows), dtype=torch.float64, device=g.device)}
    if in_out:
        out["in_out"] = torch.ones((), dtype=torch.float32, device=g.device)
    return out
