"""The sequence router: which expert(s) an input needs, from the shared model's hidden states.

Twin-Merging's router (Lu et al. 2024, "Twin-Merging: Dynamic Integration of Modular Expertise in
Model Merging", NeurIPS, arXiv:2406.15479; reference code LZY-the-boys/Twin-Merging
``discriminative/router.py``): features are the mean over the real tokens of the shared model's
last hidden state; the classifier is an MLP ``Linear(d, 2d) → BatchNorm → LeakyReLU → Dropout(0.5)
→ Linear(2d, 2d) → BatchNorm → LeakyReLU → Dropout(0.5) → Linear(2d, T)`` trained with cross
entropy (Adam, lr 5e-4, batch 1024, 50 epochs) on up to 5,500 examples of each expert's task
(:mod:`mergelab.routed.settings`; ⌈rows / batch⌉ Adam steps per epoch, recorded). The
checkpoint kept is the epoch with the best accuracy on **validation** examples: the reference
keeps the best epoch on a set built from the *test* split (HF Trainer's
``load_best_model_at_end`` on its evaluation set); mergelab never reads test rows here.

Routing weights from the logits ``z``: ``softmax(z / temperature)`` (Twin-Merging's mixing),
``top1`` (one-hot argmax: Split-Merge, routed TALL masks / EMR), or softmax restricted to the
``top_k`` largest, renormalised.

Features at training and at inference are computed the same way (:func:`router_inputs`): each
row's real tokens, the first ``max_length`` of them (``router.max_length``, 128), packed from the
left and right-padded, so a row's features do not depend on its batch-mates or on left padding;
the shared model runs in float32. ``router_config.json`` records both (``max_length``,
``feature_dtype``); :class:`mergelab.routed.RoutedModel` applies them (a model loaded in another
dtype keeps a float32 copy of the shared model for the router).

The router is stored as ``router/router.safetensors`` (the MLP's state dict) and
``router/router_config.json`` (what it reads, its classes, temperature, top-k, mixing,
validation accuracy); ``router/router_data.json`` lists the ids of the rows it was trained and
selected on.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mergelab.errors import CheckpointError

Mixing = Literal["softmax", "top1", "topk"]


class SequenceRouter(nn.Module):
    """Twin-Merging's router MLP (see the module docstring); ``hidden`` defaults to 2d."""

    def __init__(self, features: int, classes: int, hidden: int | None = None, dropout: float = 0.5) -> None:
        super().__init__()
        h = hidden or 2 * features
        self.net = nn.Sequential(
            nn.Linear(features, h),
            nn.BatchNorm1d(h),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Linear(h, h),
            nn.BatchNorm1d(h),
            nn.LeakyReLU(),
            nn.Dropout(dropout),
            nn.Linear(h, classes),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def mixing_weights(
    logits: torch.Tensor, mixing: str, temperature: float = 1.0, top_k: int | None = None
) -> torch.Tensor:
    """Routing weights ``[..., T]`` from router logits (see the module docstring)."""
    if mixing not in ("softmax", "top1", "topk"):
        raise ValueError(f"unknown mixing {mixing!r} (softmax, top1, topk)")
    if mixing == "topk" and top_k is None:
        raise ValueError("mixing topk needs top_k")
    if mixing == "top1":
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype)
    probs = torch.softmax(logits / temperature, dim=-1)
    if mixing == "topk" and top_k is not None and top_k < logits.shape[-1]:
        top, idx = probs.topk(top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    return probs


@dataclass
class RouterTraining:
    """What training a router found: the kept state, its validation accuracy, the history."""

    state: dict[str, torch.Tensor]
    validation_accuracy: float
    best_epoch: int
    history: list[dict[str, float]] = field(default_factory=list)
    train_accuracy: float = math.nan
    seconds: float = 0.0
    steps: int = 0
    """Adam steps taken (over every epoch)."""
    steps_per_epoch: int = 0


def train_router(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    classes: int,
    *,
    epochs: int = 50,
    batch_size: int = 1024,
    lr: float = 5e-4,
    hidden: int | None = None,
    dropout: float = 0.5,
    seed: int = 0,
) -> RouterTraining:
    """Train :class:`SequenceRouter` on features ``train_x`` with labels ``train_y``; keep the epoch
    with the best accuracy on ``val_x``/``val_y`` (ties: the earlier epoch)."""
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        router = SequenceRouter(train_x.shape[1], classes, hidden, dropout)
    finally:
        torch.random.set_rng_state(torch_state)
    opt = torch.optim.Adam(router.parameters(), lr=lr)
    n = train_x.shape[0]
    best: dict[str, torch.Tensor] | None = None
    best_acc, best_epoch = -1.0, -1
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    steps = 0
    for epoch in range(epochs):
        router.train()
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() < 2:  # BatchNorm needs two rows
                continue
            loss = nn.functional.cross_entropy(router(train_x[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            total += float(loss.detach()) * idx.numel()
        acc = accuracy(router, val_x, val_y)
        history.append({"epoch": epoch, "train_loss": total / max(1, n), "validation_accuracy": acc})
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch
            best = {k: v.detach().clone() for k, v in router.state_dict().items()}
    assert best is not None
    router.load_state_dict(best)
    return RouterTraining(
        best,
        best_acc,
        best_epoch,
        history,
        accuracy(router, train_x, train_y),
        time.perf_counter() - t0,
        steps,
        steps // max(1, epochs),
    )


@torch.no_grad()
def accuracy(router: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    if x.shape[0] == 0:
        return math.nan
    was = router.training
    router.eval()
    acc = float((router(x).argmax(-1) == y).float().mean())
    router.train(was)
    return acc


# --------------------------------------------------------------------------------------------
# Features


FEATURE_DTYPE = "float32"
"""The dtype the shared model runs in for the router's features (training and inference)."""


def router_inputs(
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None = None,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The router's view of a batch: each row's real tokens (``mask`` 1; all when None), the first
    ``max_length`` of them, moved to the front in order and right-padded (``ids``, a 0/1 mask,
    ``token_type_ids`` gathered the same way)."""
    if mask is None:
        mask = torch.ones_like(ids)
    keep = mask.bool()
    if max_length is not None:
        keep = keep & (keep.long().cumsum(-1) <= max_length)
    lengths = keep.sum(-1)
    width = max(1, int(lengths.max())) if lengths.numel() else 1
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :width]
    new_mask = (torch.arange(width, device=ids.device) < lengths.unsqueeze(-1)).to(mask.dtype)
    tt = token_type_ids.gather(1, order) if token_type_ids is not None else None
    return ids.gather(1, order), new_mask, tt


@torch.no_grad()
def pooled_features(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    device: torch.device | str = "cpu",
    max_length: int | None = None,
) -> torch.Tensor:
    """Mean over real tokens of the last hidden state of ``model``'s body for each row of ``batches``
    (rows as :func:`router_inputs` gives them)."""
    body = model_body(model)
    out = []
    for b in batches:
        mask = b.get("attention_mask")
        out.append(
            body_features(body, b["input_ids"].to(device), mask.to(device) if mask is not None else None,
                          b["token_type_ids"].to(device) if "token_type_ids" in b else None, max_length).cpu()
        )  # fmt: skip
    return torch.cat(out) if out else torch.empty(0)


def body_features(
    body: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None = None,
    max_length: int | None = None,
) -> torch.Tensor:
    """The router's float32 features ``[batch, d]`` of one batch: ``body`` (the model without its head)
    on :func:`router_inputs`, its last hidden state mean-pooled over the real tokens."""
    from mergelab.informed.modeling import pool

    ids, mask, tt = router_inputs(ids, mask, token_type_ids, max_length)
    kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if tt is not None:
        kwargs["token_type_ids"] = tt
    hidden = last_hidden(body(**kwargs, use_cache=False) if _takes_cache(body) else body(**kwargs))
    return pool(hidden.float(), mask, "mean")


def model_body(model: nn.Module) -> nn.Module:
    """The model without its task head (``model.model`` of a causal LM, the model itself for an encoder)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) and inner is not model else model


def _takes_cache(body: nn.Module) -> bool:
    cfg = getattr(body, "config", None)
    return bool(getattr(cfg, "is_decoder", False) or getattr(cfg, "use_cache", False))


def last_hidden(out: Any) -> torch.Tensor:
    if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None:
        return out.last_hidden_state
    return out[0]


# --------------------------------------------------------------------------------------------
# Storage


def router_config(
    *,
    kind: str,
    classes: Sequence[str],
    features: int | None = None,
    hidden: int | None = None,
    mixing: str = "softmax",
    temperature: float = 1.0,
    top_k: int | None = None,
    granularity: str = "sequence",
    **extra: Any,
) -> dict[str, Any]:
    """The ``router_config.json`` of a router (see the module docstring)."""
    cfg: dict[str, Any] = {
        "kind": kind,
        "classes": list(classes),
        "granularity": granularity,
        "mixing": mixing,
        "temperature": temperature,
        "top_k": top_k,
    }
    if kind == "sequence_mlp":
        cfg["reads"] = {
            "model": "shared",
            "hidden_state": "last (the model body's last_hidden_state, after its final norm)",
            "pooling": "mean over the attention mask's real tokens",
            "tokens": "each row's first max_length real tokens, right-padded (router_inputs)",
        }
        cfg["features"] = features
        cfg["hidden"] = hidden
        cfg["architecture"] = (
            "Linear(d, h) BatchNorm LeakyReLU Dropout Linear(h, h) BatchNorm LeakyReLU Dropout Linear(h, T)"
        )
    cfg.update(extra)
    return cfg


def save_router(folder: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    from safetensors.torch import save_file

    from mergelab.routed.bundle import ROUTER_CONFIG, ROUTER_WEIGHTS

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(folder / ROUTER_WEIGHTS))
    (folder / ROUTER_CONFIG).write_text(json.dumps(dict(config), indent=2) + "\n")


def load_router(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors.torch import load_file

    from mergelab.routed.bundle import ROUTER_CONFIG, ROUTER_WEIGHTS

    cfg_path, w_path = folder / ROUTER_CONFIG, folder / ROUTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: missing; the router of this routed model is incomplete")
    try:
        cfg = json.loads(cfg_path.read_text())
        tensors = load_file(str(w_path))
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot read the router ({type(exc).__name__}: {exc})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("classes"), list):
        raise CheckpointError(f"{cfg_path}: no `classes` list; the router config is corrupt")
    return tensors, cfg


def build_sequence_router(tensors: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], where: Path) -> SequenceRouter:
    """A :class:`SequenceRouter` in eval mode from its stored state and config."""
    features, classes = int(cfg.get("features") or 0), len(cfg["classes"])
    mixing, top_k = cfg.get("mixing", "softmax"), cfg.get("top_k")
    if mixing not in ("softmax", "top1", "topk") or (mixing == "topk" and not isinstance(top_k, int)):
        raise CheckpointError(
            f"{where}: router mixing {mixing!r} with top_k {top_k!r}: expected softmax, top1, or topk with an integer "
            "top_k; the router config is corrupt"
        )
    router = SequenceRouter(features, classes, cfg.get("hidden"), float(cfg.get("dropout", 0.5)))
    try:
        router.load_state_dict(dict(tensors))
    except RuntimeError as exc:
        raise CheckpointError(
            f"{where}: router weights do not fit its config ({str(exc).splitlines()[0][:160]})"
        ) from None
    return router.eval()
