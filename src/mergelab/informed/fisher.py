"""Diagonal Fisher information from per-example gradients (Matena & Raffel 2022, arXiv:2111.09832).

F = (1/N) Σ_x E_y[(∇θ log p_θ(y|x))²], the square taken per example: the square of a gradient
summed over a batch has cross-example terms and is not the Fisher (a known pitfall of batched
implementations; see ``tests/informed/test_fisher.py``). Labels ``y`` (``label``):

* ``expected`` (classification; the original code): the exact expectation over the model's own
  predictive distribution, Σ_y p(y|x) (∇ log p(y|x))², one backward pass per class;
* ``sampled``: one y ~ p(·|x) per example (per position for causal LMs): an unbiased estimate of
  the true Fisher, one backward pass;
* ``empirical``: the data's label (the next token for causal LMs): the "empirical Fisher";
* ``auto``: ``expected`` for classification logits [b, C], ``sampled`` for causal LMs [b, t, V].

For a causal LM an example is a sequence: its log-likelihood is the sum over positions whose next
token is real (attention mask), with the label of each position sampled or observed; the
per-sequence gradient is squared.

Per-example gradients: ``torch.func`` (``functional_call`` + ``vmap(grad)``) in chunks, or a loop
over examples (batch of one, padding trimmed). ``auto`` tries vmap and falls back to the loop when
the model cannot be vmapped (HF models build attention masks with data-dependent control flow).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from mergelab.data.sources import batch_rows, take_examples
from mergelab.errors import MergelabError, PlanError, RecipeError
from mergelab.informed.modeling import LogitsFn, model_inputs, to_device

Label = Literal["auto", "expected", "sampled", "empirical"]
PerExample = Literal["auto", "vmap", "loop"]
TaskKind = Literal["classification", "causal_lm"]


@dataclass
class FisherResult:
    fisher: dict[str, torch.Tensor]  # module parameter name -> mean squared per-example gradient (float32)
    examples: int
    label: str
    per_example: str  # what ran: vmap or loop
    kind: str


def _default_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(**model_inputs(batch)).logits


class _Wrap(nn.Module):
    def __init__(self, model: nn.Module, fn: LogitsFn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(self.model, batch)


def _example(batch: Mapping[str, Any], b: int, n: int) -> dict[str, Any]:
    """Row ``b`` as a batch of one, right padding trimmed."""
    ex = {
        k: (v[b : b + 1] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v)
        for k, v in batch.items()
    }
    mask = ex.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        length = int(mask[0].sum())
        if length > 0 and bool(mask[0, :length].all()) and length < mask.shape[1]:
            width = mask.shape[1]
            ex = {
                k: (v[:, :length] if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[1] == width else v)
                for k, v in ex.items()
            }
    return ex


def _resolve_label(label: str, kind: TaskKind) -> str:
    if label == "auto":
        return "expected" if kind == "classification" else "sampled"
    if label == "expected" and kind == "causal_lm":
        raise RecipeError(
            "fisher_label: expected sums over every label (the whole vocabulary for a causal LM); "
            "use sampled or empirical"
        )
    return label


def _kind_of(logits: torch.Tensor, kind: str | None) -> TaskKind:
    if kind is not None:
        return kind  # type: ignore[return-value]
    if logits.dim() == 2:
        return "classification"
    if logits.dim() == 3:
        return "causal_lm"
    raise PlanError(f"logits of shape {list(logits.shape)}: expected [batch, classes] or [batch, positions, vocab]")


def _labels_of(batch: Mapping[str, Any]) -> torch.Tensor:
    for k in ("labels", "label"):
        if isinstance(batch.get(k), torch.Tensor):
            return batch[k]
    raise RecipeError("fisher_label: empirical needs labels in the calibration data (a `label` field)")


class _Accumulator:
    def __init__(self, params: Sequence[torch.Tensor]):
        self.sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]

    def add(self, grads: Sequence[torch.Tensor | None], weight: float | torch.Tensor = 1.0) -> None:
        for acc, g in zip(self.sums, grads):
            if g is None:
                continue
            g = g.float()
            if isinstance(weight, torch.Tensor):  # per-example weights over a leading vmap dimension
                acc.add_(torch.tensordot(weight.float(), g.square(), dims=1))
            elif g.dim() > acc.dim():
                acc.add_(g.square().sum(0), alpha=float(weight))
            else:
                acc.addcmul_(g, g, value=float(weight))  # one fused pass: acc += w g²


def _loop_batch(model, logits_fn, batch, names, params, acc, label, kind, gen) -> tuple[int, str | None]:
    n = batch_rows(batch)
    k: str | None = kind
    for b in range(n):
        ex = _example(batch, b, n)
        logits = logits_fn(model, ex)
        k = _kind_of(logits, kind)
        lab = _resolve_label(label, k)
        logp = torch.log_softmax(logits.float(), dim=-1)[0]
        if k == "classification":
            if lab == "expected":
                p = logp.detach().exp()
                c = logp.shape[-1]
                for y in range(c):
                    grads = torch.autograd.grad(logp[y], params, retain_graph=y < c - 1, allow_unused=True)
                    acc.add(grads, float(p[y]))
                continue
            if lab == "sampled":
                y = int(torch.multinomial(logp.detach().exp(), 1, generator=gen))
            else:
                y = int(_labels_of(ex).reshape(-1)[0])
            acc.add(torch.autograd.grad(logp[y], params, allow_unused=True))
            continue
        # causal LM: positions 0..L-2 predict tokens 1..L-1 (padding was trimmed; any left padding is masked)
        ids = ex["input_ids"][0]
        mask = ex.get("attention_mask")
        valid = torch.ones(ids.shape[0] - 1, device=logp.device)
        if isinstance(mask, torch.Tensor):
            valid = (mask[0, 1:] * mask[0, :-1]).to(logp.dtype)
        if ids.shape[0] < 2 or float(valid.sum()) == 0:
            continue
        if lab == "sampled":
            tgt = torch.multinomial(logp[:-1].detach().exp(), 1, generator=gen).squeeze(1)
        else:
            tgt = ids[1:]
        ll = (logp[:-1].gather(1, tgt[:, None]).squeeze(1) * valid).sum()
        acc.add(torch.autograd.grad(ll, params, allow_unused=True))
    return n, k


def _vmap_batch(wrap, batch, names, pvals, acc, label, kind, gen, chunk: int) -> tuple[int, str | None]:
    from torch.func import functional_call, grad, vmap

    n = batch_rows(batch)
    with torch.no_grad():
        logits_all = functional_call(wrap, pvals, (batch,))
    k = _kind_of(logits_all, kind)
    lab = _resolve_label(label, k)
    logp_all = torch.log_softmax(logits_all.float(), dim=-1)
    per = {kk: v for kk, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n}

    def ll(pv, ex, tgt, valid):
        exb = {kk: v.unsqueeze(0) for kk, v in ex.items()}
        logp = torch.log_softmax(functional_call(wrap, pv, (exb,)).float(), dim=-1)[0]
        if k == "classification":
            return logp.gather(0, tgt.reshape(1)).squeeze(0)
        return (logp[:-1].gather(1, tgt[:, None]).squeeze(1) * valid).sum()

    g_fn = vmap(grad(ll), in_dims=(None, 0, 0, 0))
    for start in range(0, n, chunk):
        sl = slice(start, min(n, start + chunk))
        ex = {kk: v[sl] for kk, v in per.items()}
        m = sl.stop - sl.start
        if k == "classification":
            valid = torch.ones(m, device=logp_all.device)
            if lab == "expected":
                p = logp_all[sl].exp()
                for y in range(p.shape[-1]):
                    tgt = torch.full((m,), y, dtype=torch.long, device=p.device)
                    grads = g_fn(pvals, ex, tgt, valid)
                    acc.add([grads[nm] for nm in names], p[:, y])
                continue
            if lab == "sampled":
                tgt = torch.multinomial(logp_all[sl].exp(), 1, generator=gen).squeeze(1)
            else:
                tgt = _labels_of(batch)[sl].reshape(-1).to(logp_all.device)
        else:
            ids = ex["input_ids"]
            mask = ex.get("attention_mask", torch.ones_like(ids))
            valid = (mask[:, 1:] * mask[:, :-1]).to(logp_all.dtype)
            if lab == "sampled":
                probs = logp_all[sl, :-1].exp()
                tgt = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(probs.shape[:2])
            else:
                tgt = ids[:, 1:]
        grads = g_fn(pvals, ex, tgt, valid)
        acc.add([grads[nm] for nm in names])
    return n, k


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    logits_fn: LogitsFn | None = None,
    kind: TaskKind | None = None,
    label: Label = "auto",
    num_examples: int | None = 256,
    names: Sequence[str] | None = None,
    per_example: PerExample = "auto",
    chunk_size: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    advance: Callable[[int], None] | None = None,
) -> FisherResult:
    """The diagonal Fisher of ``model``'s parameters ``names`` (default: all) on ``batches``.

    ``logits_fn(model, batch)`` returns logits [b, C] (classification) or [b, t, V] (causal LM);
    the default is ``model(**inputs).logits``. The model runs in eval mode; only the parameters in
    ``names`` get gradients. Returns float32 tensors on the model's device.
    """
    fn = logits_fn or _default_logits
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    all_params = dict(model.named_parameters())
    names = list(names) if names is not None else list(all_params)
    missing = [n for n in names if n not in all_params]
    if missing:
        raise PlanError(f"fisher: {missing[0]!r} is not a parameter of the model")
    params = [all_params[n] for n in names]
    was_training = model.training
    flags = {n: p.requires_grad for n, p in all_params.items()}
    model.eval()
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    acc = _Accumulator(params)
    mode = per_example
    wrap = _Wrap(model, fn)
    pvals = {f"model.{n}": p.detach() for n, p in zip(names, params)}
    vnames = [f"model.{n}" for n in names]
    seen = 0
    detected: str | None = kind
    try:
        for p in all_params.values():
            p.requires_grad_(False)
        for batch in take_examples(batches, num_examples):
            batch = to_device(batch, dev)
            done = 0
            if mode == "vmap" or (mode == "auto" and seen == 0):
                try:
                    done, detected = _vmap_batch(wrap, batch, vnames, pvals, acc, label, kind, gen, chunk_size)
                    mode = "vmap"
                except (RecipeError, MergelabError):
                    raise
                except Exception:
                    if per_example == "vmap":
                        raise
                    # auto: the model cannot be vmapped (e.g. data-dependent control flow): start over with a loop
                    mode = "loop"
                    acc = _Accumulator(params)
                    gen.manual_seed(seed)
            elif mode == "auto":
                mode = "loop"
            if mode == "loop":
                for p in params:
                    p.requires_grad_(True)
                with torch.enable_grad():
                    done, detected = _loop_batch(model, fn, batch, names, params, acc, label, kind, gen)
                for p in params:
                    p.requires_grad_(False)
            seen += done
            if advance is not None:
                advance(done)
    finally:
        for n, p in all_params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    if seen == 0:
        raise RecipeError("fisher: the calibration data is empty")
    out = {n: s.div_(seen) for n, s in zip(names, acc.sums)}
    final_kind = detected or "classification"
    return FisherResult(out, seen, _resolve_label(label, final_kind), mode, final_kind)  # type: ignore[arg-type]
