"""Tiny bases and adapters made by peft itself, and the dense models its merge_and_unload gives."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch


def llama_base(path: Path, *, attention_bias: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """A random tiny Llama causal LM (transformers' own class) saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_bias=attention_bias,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(dtype).save_pretrained(str(path))
    return path


def gpt2_base(path: Path) -> Path:
    """A random tiny GPT-2 (Conv1D projections; the square attention c_proj is 32 × 32)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)).save_pretrained(
        str(path)
    )
    return path


def _model_class(base: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM


def make_adapter(base: Path, out: Path, *, seed: int = 1, safe: bool = True, **lora: Any) -> Path:
    """A PEFT LoRA adapter of ``base`` with every trainable tensor randomised (nonzero updates)."""
    from peft import LoraConfig, get_peft_model

    model = _model_class(base).from_pretrained(str(base))
    lora.setdefault("r", 4)
    lora.setdefault("lora_alpha", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in peft_model.named_parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn(p.shape, generator=gen))
        peft_model.save_pretrained(str(out), safe_serialization=safe)
    return out


def merged_state(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's dense model: ``PeftModel.from_pretrained(base, adapter).merge_and_unload()``."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_model_class(base).from_pretrained(str(base)), str(adapter))
        return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def save_merged(base: Path, adapter: Path, out: Path) -> Path:
    """The dense merge_and_unload'ed model saved as a full checkpoint folder."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(_model_class(base).from_pretrained(str(base)), str(adapter))
        model.merge_and_unload().save_pretrained(str(out))
    return out
