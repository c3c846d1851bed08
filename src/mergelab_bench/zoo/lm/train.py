"""Fine-tuning one LM expert per domain: plain next-token training on the domain's texts.

An *expert* is the base model trained on one domain's train split as a plain language model:
every text encoded as ``<doc token> + tokens`` cut to ``max_len`` (no chat template, the same
for every expert), the token-weighted mean NLL minimised with AdamW, linear warm-up then
linear decay, gradient clipping, fixed seeds (Llama has no dropout, so data order is the only
randomness). By default every parameter trains (full fine-tuning, the form most merge users'
checkpoints have); ``train_layers=N`` trains only the last N decoder blocks and the final
norm, and ``freeze_embeddings`` keeps the (tied) embeddings at the base's values.

Tied input/output embeddings stay one tensor: the saved checkpoint has ``embed_tokens`` only.

Cost on 2 CPU cores (SmolLM2-135M, float32): 0.13 steps/s at batch 8 x 128 tokens with 5.5 GB
peak RSS was measured; 64-token sequences run about twice as fast. The record of every expert
holds its measured steps/s.
"""

from __future__ import annotations

import math
import random
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from mergelab_bench.zoo.lm.base import load_causal_lm, load_lm_tokenizer
from mergelab_bench.zoo.lm.scoring import DOC_TOKEN, collate, doc_token_id, encode_texts, lm_loss, pad_token_id
from mergelab_bench.zoo.lm.tasks import LMTaskData
from mergelab_bench.zoo.training import epoch_batches, loss_ema, set_scheduled_lr, task_seed

ProgressFn = Callable[[int, int, dict[str, float]], None]


class LMTrainConfig(BaseModel):
    """Hyperparameters of an LM expert and of its evaluation; every field is part of the cache key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(100, ge=1, description="optimizer steps per expert")
    batch_size: int = Field(8, ge=1)
    max_len: int = Field(64, ge=4, description="tokens per sequence, document token included")
    lr: float = Field(5e-5, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="0 keeps rows of unused tokens exactly at the base")
    warmup_frac: float = Field(0.1, ge=0, le=1)
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm (None: no clipping)")
    train_layers: int | None = Field(
        None, ge=1, description="train only the last N decoder blocks + final norm (None: every block)"
    )
    freeze_embeddings: bool = Field(False, description="keep the (tied) token embeddings at the base's values")
    doc_token: str | None = Field(DOC_TOKEN, description="token every sequence starts with (else EOS/BOS)")
    seed: int = 0
    device: str = Field("cpu", description="torch device for training and the build's evaluation")
    eval_limit: int | None = Field(128, ge=1, description="validation/test rows scored in the record")
    eval_batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(8, ge=1, description="greedy tokens generated for exact match")
    curve_every: int | None = Field(
        None, ge=1, description="score the first curve_rows validation rows every N steps (None: no curve)"
    )
    curve_rows: int = Field(128, ge=1, description="validation rows behind each point of the curve")

    def key_dict(self) -> dict:
        """The fields that address an expert: :meth:`model_dump` without the fields added after
        the first zoos were built while they hold their defaults, so those experts keep their keys."""
        out = self.model_dump()
        for name, default in _LATER_FIELDS.items():
            if out.get(name) == default:
                del out[name]
        return out

    @property
    def training_mode(self) -> str:
        """``full`` or ``last-N-layers`` (+ ``, embeddings frozen``): what the record says was trained."""
        mode = "full" if self.train_layers is None else f"last-{self.train_layers}-layers"
        return mode + (", embeddings frozen" if self.freeze_embeddings else "")


LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Attention and MLP projections of Llama-like decoder blocks (what the LoRA experts adapt)."""


class LoraTrainConfig(BaseModel):
    """A LoRA expert (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), trained
    with ``peft``: rank-``rank`` updates ``(alpha / rank) * B @ A`` on ``target_modules``, the base
    frozen. Steps, batch and sequence length are the full expert's (the same data budget); the
    learning rate is its own, LoRA needs a larger one. Every field is part of the adapter's key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0, description="lora_alpha (scaling alpha / rank)")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: tuple[str, ...] = LORA_TARGETS
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the adapter's training")
    steps: int | None = Field(None, ge=1, description="optimizer steps (None: the full expert's)")

    def peft_config(self):
        """The ``peft.LoraConfig`` of these settings (causal-LM task type, no bias)."""
        from peft import LoraConfig

        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM",
        )  # fmt: skip

    def schedule(self, train: LMTrainConfig) -> LMTrainConfig:
        """The full expert's train config with this adapter's learning rate and steps."""
        return train.model_copy(update={"lr": self.lr, "steps": self.steps or train.steps})


_LATER_FIELDS: dict[str, object] = {"curve_every": None, "curve_rows": 128}
"""Fields added after LM zoos were first built, with their defaults (left out of keys at those)."""

CurveFn = Callable[[nn.Module, int], dict[str, float | None]]
"""``curve(model, step) -> {metric: value}``: one point of the validation curve (model in eval mode)."""


@dataclass
class TrainedLM:
    model: nn.Module
    record: dict


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (``model.model.layers`` for Llama-like models)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: cannot find the decoder blocks (model.model.layers)")
    return layers


def select_trainable(model: nn.Module, cfg: LMTrainConfig) -> list[nn.Parameter]:
    """Set ``requires_grad`` per :class:`LMTrainConfig`; returns the trainable parameters (unique)."""
    if cfg.train_layers is not None:
        for p in model.parameters():
            p.requires_grad_(False)
        layers = decoder_layers(model)
        for block in list(layers)[-cfg.train_layers :]:
            for p in block.parameters():
                p.requires_grad_(True)
        norm = getattr(model.model, "norm", None)
        if norm is not None:
            for p in norm.parameters():
                p.requires_grad_(True)
        out_emb = model.get_output_embeddings()
        if out_emb is not None and out_emb.weight is not model.get_input_embeddings().weight:
            out_emb.weight.requires_grad_(not cfg.freeze_embeddings)
    if cfg.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
        out_emb = model.get_output_embeddings()
        if out_emb is not None:
            out_emb.weight.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round((peak if sys.platform == "darwin" else peak * 1024) / 2**20, 1)


def train_lm_expert(
    data: LMTaskData,
    base_dir: Path,
    cfg: LMTrainConfig,
    *,
    progress: ProgressFn | None = None,
    curve: CurveFn | None = None,
    lora: LoraTrainConfig | None = None,
) -> TrainedLM:
    """Fine-tune the causal LM in ``base_dir`` on ``data``'s train split (see the module docstring).

    With ``curve`` and ``cfg.curve_every``, ``curve(model, step)`` is called at step 0 (the
    base), every ``curve_every`` steps and after the last step; the points go to the record's
    ``curve`` with the training time spent so far (scoring time excluded, recorded apart).
    Scoring is deterministic and draws no random numbers, so the curve does not change the expert.

    With ``lora``, the base is wrapped by ``peft.get_peft_model`` and only the adapter trains
    (``cfg`` gives the schedule: :meth:`LoraTrainConfig.schedule`); the returned model is the
    ``PeftModel`` (``save_pretrained`` writes the standard adapter folder).
    """
    seed = task_seed(cfg.seed, "lm/" + data.name)
    torch.manual_seed(seed)
    order_rng = random.Random(seed)
    tokenizer = load_lm_tokenizer(base_dir)
    model = load_causal_lm(base_dir, cfg.device)
    doc_id = doc_token_id(tokenizer, cfg.doc_token)
    pad_id = pad_token_id(tokenizer)
    seqs = [s for s in encode_texts(tokenizer, data.texts("train"), max_len=cfg.max_len, doc_id=doc_id) if len(s) >= 2]
    if not seqs:
        raise ValueError(f"LM task {data.name} has no usable train text")
    if lora is None:
        params = select_trainable(model, cfg)
    else:
        from peft import get_peft_model

        torch.manual_seed(seed)  # the A matrices' initialisation
        model = get_peft_model(model, lora.peft_config())
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = round(cfg.warmup_frac * cfg.steps)
    model.train()
    batches = epoch_batches(len(seqs), cfg.batch_size, order_rng)
    seen = tokens = 0
    ema = math.nan
    first_loss = math.nan
    step_times: list[float] = []
    points: list[dict] = []
    curve_s = 0.0

    def add_point(step: int) -> None:
        nonlocal curve_s
        tc = time.perf_counter()
        model.eval()
        values = curve(model, step) if curve is not None else {}
        model.train()
        curve_s += time.perf_counter() - tc
        points.append({"step": step, "train_seconds": round(sum(step_times), 2), **values})

    want_curve = curve is not None and cfg.curve_every is not None
    t0 = time.perf_counter()
    if want_curve:
        add_point(0)
    for step in range(cfg.steps):
        idx = next(batches)
        batch = collate([seqs[i] for i in idx], pad_id).to(cfg.device)
        set_scheduled_lr(opt, [cfg.lr], step, cfg.steps, warmup)
        ts = time.perf_counter()
        loss, count = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step_times.append(time.perf_counter() - ts)
        seen += len(idx)
        tokens += count
        value = loss.item()
        first_loss = value if math.isnan(first_loss) else first_loss
        ema = loss_ema(ema, value)
        if progress is not None:
            progress(step + 1, cfg.steps, {"loss": ema})
        if want_curve and ((step + 1) % cfg.curve_every == 0 or step + 1 == cfg.steps):  # type: ignore[operator]
            add_point(step + 1)
            points[-1]["loss_ema"] = round(ema, 4)
    train_s = time.perf_counter() - t0 - curve_s
    model.eval()
    steady = step_times[1:] or step_times  # the first step pays one-off allocation costs
    record = {
        "task": data.name,
        "seed": seed,
        "training": cfg.training_mode if lora is None else f"lora r={lora.rank} alpha={lora.alpha:g}",
        "trainable_parameters": sum(p.numel() for p in params),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "train_sequences_seen": seen,
        "train_tokens_predicted": tokens,
        "train_split_sequences": len(seqs),
        "doc_token_id": doc_id,
        "train_seconds": round(train_s, 2),
        "steps_per_second": round(cfg.steps / train_s, 4) if train_s > 0 else None,
        "steady_steps_per_second": round(len(steady) / sum(steady), 4) if sum(steady) > 0 else None,
        "first_loss": round(first_loss, 4),
        "final_loss_ema": round(ema, 4),
        "peak_rss_mb_process": peak_rss_mb(),
    }
    if want_curve:
        record["curve"] = {"split": "validation", "rows": cfg.curve_rows, "every": cfg.curve_every, "points": points}
        record["curve_seconds"] = round(curve_s, 2)
    return TrainedLM(model, record)
