"""Learning AdaMerging coefficients (Yang et al. 2024, arXiv:2310.02575) for any nn.Module.

The merged model is never materialised as a copy: each step builds the merged tensors
θ0 + Σ_i λ_i τ_i (λ clamped to [0, 1] as in the paper's code) and runs the one model with them
through ``torch.func.functional_call``; gradients flow to λ only. Memory: the base and every task
vector resident in float32 ((T + 1) × the model), the merged tensors of the step, and the
activations of one batch per task.

Loss per step (the reference code): Σ over tasks of the mean Shannon entropy of the predictions on
``batches_per_step`` batches of that task's unlabeled inputs, each task with its own logits
function (its classification head); for a causal LM the entropy of the next-token distribution at
every real position (attention mask) of the task's text.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mergelab.informed.modeling import LogitsFn, to_device


@dataclass
class AdaTask:
    """One task: its unlabeled batches and how to get logits from the (merged) model."""

    batches: list[dict[str, Any]]
    logits_fn: LogitsFn
    name: str = ""


@dataclass
class AdaMergingResult:
    lambdas: torch.Tensor  # effective (clamped) coefficients: [T] task-wise or [K, T] layer-wise
    names: list[str]  # the K merged parameter names (module names), in order
    granularity: str
    history: list[float] = field(default_factory=list)  # loss (summed mean entropies) per step
    initial_entropy: float = float("nan")  # mean entropy over every calibration batch, before
    final_entropy: float = float("nan")  # and after learning

    def coefficient(self, k: int, i: int) -> float:
        return float(self.lambdas[i] if self.lambdas.dim() == 1 else self.lambdas[k, i])


def entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits): over the batch ([b, C]) or over real positions ([b, t, V])."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    if h.dim() == 2 and mask is not None and tuple(mask.shape) == tuple(h.shape):
        m = mask.to(h.dtype)
        return (h * m).sum() / m.sum().clamp_min(1.0)
    return h.mean()


class _Net(nn.Module):
    def __init__(self, model: nn.Module, fn: LogitsFn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(self.model, batch)


def _cycle(batches: list[Any], rng: random.Random):
    while True:
        order = list(range(len(batches)))
        rng.shuffle(order)
        for i in order:
            yield batches[i]


def learn_coefficients(
    model: nn.Module,
    base: Mapping[str, torch.Tensor],
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    tasks: Sequence[AdaTask],
    *,
    granularity: str = "layer",
    steps: int = 500,
    lr: float = 1e-3,
    init: float = 0.3,
    clamp: bool = True,
    batches_per_step: int = 2,
    seed: int = 0,
    device: str | torch.device | None = None,
    advance: Callable[[int], None] | None = None,
) -> AdaMergingResult:
    """Learn λ for θ0 + Σ λ τ by entropy minimisation; ``base``/``task_vectors`` are keyed by the
    module's parameter names (the tensors merged; other parameters keep the module's values)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    names = list(base)
    n_tasks = len(task_vectors)
    if len(tasks) != n_tasks:
        raise ValueError(f"{len(tasks)} tasks for {n_tasks} task vectors")
    theta0 = {n: base[n].to(dev, torch.float32) for n in names}
    taus = [{n: tv[n].to(dev, torch.float32) for n in names} for tv in task_vectors]
    shape = (n_tasks,) if granularity == "task" else (len(names), n_tasks)
    raw = nn.Parameter(torch.full(shape, float(init), device=dev))
    opt = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    nets = [_Net(model, t.logits_fn) for t in tasks]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    rng = random.Random(seed)
    streams = [_cycle(t.batches, rng) for t in tasks]

    def lambdas() -> torch.Tensor:
        return raw.clamp(0.0, 1.0) if clamp else raw

    def merged(lam: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for k, n in enumerate(names):
            t = theta0[n]
            for i in range(n_tasks):
                coef = lam[i] if lam.dim() == 1 else lam[k, i]
                t = t + coef * taus[i][n]
            out[f"model.{n}"] = t
        return out

    def task_entropy(net: _Net, params: dict[str, torch.Tensor], batch: Mapping[str, Any]) -> torch.Tensor:
        from torch.func import functional_call

        batch = to_device(batch, dev)
        logits = functional_call(net, params, (batch,))
        mask = batch.get("attention_mask") if logits.dim() == 3 else None
        return entropy(logits, mask)

    @torch.no_grad()
    def mean_entropy() -> float:
        params = merged(lambdas())
        vals = [float(task_entropy(net, params, b)) for net, t in zip(nets, tasks) for b in t.batches]
        return sum(vals) / max(len(vals), 1)

    history: list[float] = []
    try:
        initial = mean_entropy()
        for _ in range(steps):
            params = merged(lambdas())
            loss = torch.zeros((), device=dev)
            for net, stream in zip(nets, streams):
                for _b in range(batches_per_step):
                    loss = loss + task_entropy(net, params, next(stream))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append(float(loss.detach()))
            del params, loss
            if advance is not None:
                advance(1)
        final = mean_entropy()
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return AdaMergingResult(lambdas().detach().cpu(), names, granularity, history, initial, final)
