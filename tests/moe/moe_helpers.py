"""Tiny dense bases (Llama, Qwen2, Qwen3) and tiny MoEs (Mixtral, Qwen2-MoE, Qwen3-MoE), saved by
transformers itself with a word-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from mergelab.synthetic import make_tokenizer

SIZES = {
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 64,
    "max_position_embeddings": 64,
}


def dense_base(path: Path, kind: str = "llama", seed: int = 0, **overrides) -> Path:
    """A random tiny dense causal LM of ``kind`` (llama, qwen2, qwen3) with a word-level tokenizer."""
    import transformers as tf

    cfg_cls, model_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
    }[kind]
    extra = {"head_dim": 8} if kind == "qwen3" else {}
    torch.manual_seed(seed)
    model_cls(cfg_cls(**{**SIZES, **extra, **overrides})).save_pretrained(str(path))
    make_tokenizer(path)
    return path


def tiny_moe(path: Path, kind: str = "mixtral", experts: int = 4, seed: int = 0) -> Path:
    """A random tiny MoE (mixtral, qwen2_moe, qwen3_moe), ``experts`` experts, top-2."""
    import transformers as tf

    cfg_cls, model_cls = {
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM),
    }[kind]
    extra: dict = {"num_experts_per_tok": 2, "head_dim": 8}
    if kind == "mixtral":
        extra["num_local_experts"] = experts
    else:
        extra.update(num_experts=experts, moe_intermediate_size=24, norm_topk_prob=True)
    if kind == "qwen2_moe":
        extra["shared_expert_intermediate_size"] = 40
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**SIZES, **extra}))
    with torch.no_grad():  # routers far from zero, so that experts are used unevenly
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.normal_(0.0, 1.0)
    model.save_pretrained(str(path))
    make_tokenizer(path)
    return path


def load_strict(folder: Path):
    """The causal LM in ``folder`` loaded by transformers (eval mode), asserting that every key matched
    (no missing, unexpected or mismatched tensor)."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()
