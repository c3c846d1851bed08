"""Models for data passes: loading any HF checkpoint, its linear layers, heads and logits.

Nothing here depends on an architecture: linear layers are found by type (``nn.Linear`` and
transformers' GPT-2 ``Conv1D``, which stores its weight as in × out), transformer blocks as the
largest ``nn.ModuleList``, and module parameter names are mapped to the checkpoint's tensor
names (they can differ by the task model's prefix, e.g. ``bert.`` in
``BertForSequenceClassification`` loaded from a ``BertModel`` checkpoint).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from mergelab.errors import CheckpointError, PlanError, RecipeError

Kind = Literal["causal_lm", "sequence_classification", "encoder"]
LogitsFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "inputs_embeds")


def detect_kind(config: Mapping[str, Any] | None, requested: str = "auto") -> Kind:
    """``causal_lm`` / ``sequence_classification`` / ``encoder`` from config.json's architectures."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    archs = list((config or {}).get("architectures") or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal_lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "sequence_classification"
    return "encoder"


def auto_class(kind: Kind):
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
    )

    return {
        "causal_lm": AutoModelForCausalLM,
        "sequence_classification": AutoModelForSequenceClassification,
        "encoder": AutoModel,
    }[kind]


def load_model(folder: str | os.PathLike[str], kind: Kind, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """An HF model from a local folder, in eval mode, on ``device``."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the data phase draws its own progress
    try:
        model = auto_class(kind).from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    except Exception as exc:  # transformers raises many types here
        raise CheckpointError(
            f"{folder}: cannot load the model with transformers as {kind} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


def read_config(folder: str | os.PathLike[str] | None) -> dict | None:
    if folder is None:
        return None
    p = Path(folder) / "config.json"
    return json.loads(p.read_text()) if p.is_file() else None


def checkpoint_names(model: nn.Module, stored: Iterable[str]) -> dict[str, str]:
    """Module parameter name → checkpoint tensor name, for the names the checkpoint holds.

    Tries the name itself, then without or with the model's ``base_model_prefix``.
    """
    stored = set(stored)
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for name, _ in model.named_parameters():
        cands = [name]
        if prefix and name.startswith(prefix + "."):
            cands.append(name[len(prefix) + 1 :])
        elif prefix:
            cands.append(f"{prefix}.{name}")
        for c in cands:
            if c in stored:
                out[name] = c
                break
    return out


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D

        return Conv1D
    except ImportError:  # pragma: no cover - very old transformers
        return None


def module_weight(mod: nn.Module) -> torch.Tensor:
    """A linear layer's ``weight`` typed as a tensor (``nn.Module`` attributes read as ``Tensor | Module``)."""
    w = mod.weight
    assert isinstance(w, torch.Tensor)
    return w


def linear_modules(model: nn.Module) -> dict[str, tuple[nn.Module, bool]]:
    """Every linear layer by module name: ``(module, in_out)``; ``in_out`` for GPT-2 ``Conv1D``
    (weight stored in × out), false for ``nn.Linear`` (out × in)."""
    conv1d = _conv1d_type()
    out: dict[str, tuple[nn.Module, bool]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            out[name] = (mod, False)
        elif conv1d is not None and isinstance(mod, conv1d):
            out[name] = (mod, True)
    return out


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The transformer blocks: the ``nn.ModuleList`` holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            n = sum(p.numel() for p in mod.parameters())
            if best is None or n > best[0]:
                best = (n, name, mod)
    if best is None:
        raise PlanError(f"{type(model).__name__}: no nn.ModuleList of blocks found (RegMean++ merges block by block)")
    return best[1], best[2]


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a batch that go into the model (labels are the data pass's own business)."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """[b, t, d] → [b, d]: mean over real tokens, the first token, or the last real token."""
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        idx = (mask.sum(1) - 1).clamp_min(0).long()
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@dataclass
class LinearHead:
    """A task head kept outside the merged checkpoint: ``linear(pool(hidden))``."""

    linear: nn.Linear
    labels: list[str] | None
    pooling: str = "mean"
    normalize: bool = False  # cosine heads (metadata feature_norm=l2): features are L2-normalised first

    @classmethod
    def load(cls, path: str | os.PathLike[str], pooling: str = "mean") -> LinearHead:
        """A ``.safetensors`` file with ``weight`` [C, d] and ``bias`` [C] (label names in the
        metadata ``labels``, as the zoo stores its heads; ``feature_norm: l2`` in the metadata marks a
        cosine head, whose input features are L2-normalised, as the zoo's zero-shot heads)."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        t = load_file(str(path))
        if "weight" not in t:
            raise RecipeError(f"{path}: a head file needs a 'weight' tensor (and optionally 'bias')")
        w = t["weight"].float()
        lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in t)
        with torch.no_grad():
            lin.weight.copy_(w)
            if "bias" in t:
                lin.bias.copy_(t["bias"].float())
        labels = json.loads(meta["labels"]) if "labels" in meta else None
        return cls(lin.eval().requires_grad_(False), labels, pooling, meta.get("feature_norm") == "l2")


def default_logits_fn(kind: Kind, head: LinearHead | None = None) -> LogitsFn:
    """Logits of a batch: ``.logits`` of task models, ``head(pool(last_hidden_state))`` for encoders."""
    if kind in ("causal_lm", "sequence_classification"):

        def logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return model(**model_inputs(batch)).logits

        return logits
    if head is None:
        raise RecipeError(
            "this encoder has no task head: give the calibration source a `head:` (.safetensors with weight/bias, "
            "or `zoo`), load it as sequence_classification, or pass logits_fn from Python"
        )
    lin, how, normalize = head.linear, head.pooling, head.normalize

    def head_logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out = model(**model_inputs(batch))
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        feats = pool(hidden, batch.get("attention_mask"), how)
        if normalize:
            feats = nn.functional.normalize(feats, dim=-1)
        lin.to(device=feats.device, dtype=feats.dtype)
        return lin(feats)

    return head_logits


def default_forward_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> Any:
    return model(**model_inputs(batch))


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def param_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
