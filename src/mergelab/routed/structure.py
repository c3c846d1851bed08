"""What each tensor of a Hugging Face checkpoint is, from its config alone (no weights read).

The routed builders need to know, per stored tensor, which module holds it and what kind of
module that is: a linear layer (``nn.Linear``, or transformers' GPT-2 ``Conv1D`` whose weight is
stored in × out), an embedding, a normalisation layer (LayerNorm, RMSNorm: affine in their
parameters), or anything else. The model class named by ``config.json`` is instantiated on the
``meta`` device (no memory, no weights) and its modules are walked; parameter names are mapped
to the checkpoint's tensor names (:func:`mergelab.informed.modeling.checkpoint_names`).

:func:`mlp_blocks` finds the feed-forward block of every transformer layer (WEMoE mixes those):
``*.mlp`` modules (Llama, Qwen, Mistral, GPT-2, CLIP) and BERT's ``*.intermediate`` +
``*.output`` pair.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mergelab.errors import CheckpointError, PlanError

ModuleKind = Literal["linear", "conv1d", "embedding", "norm", "other"]


@dataclass(frozen=True)
class ModuleInfo:
    """One module holding parameters: its name, kind and parameters (param name -> checkpoint tensor)."""

    name: str
    kind: ModuleKind
    params: Mapping[str, str]
    shapes: Mapping[str, tuple[int, ...]]

    @property
    def weight(self) -> str | None:
        return self.params.get("weight")

    @property
    def transposed(self) -> bool:
        """The stored weight is the transpose of the PEFT ``out × in`` orientation (Conv1D, embeddings)."""
        return self.kind in ("conv1d", "embedding")


@dataclass
class ModelStructure:
    """Modules by name, the module of every stored tensor, tied tensors, the model kind."""

    modules: dict[str, ModuleInfo]
    owner: dict[str, tuple[str, str]]  # checkpoint tensor -> (module name, param name)
    kind: str  # causal_lm | sequence_classification | encoder
    tied: dict[str, str] = field(default_factory=dict)  # tied module name -> module it shares its weight with
    config: dict = field(default_factory=dict)

    def module_of(self, tensor: str) -> ModuleInfo | None:
        hit = self.owner.get(tensor)
        return self.modules[hit[0]] if hit else None


def module_kind(mod: nn.Module) -> ModuleKind:
    """The kind of a module holding parameters (see the module docstring)."""
    from mergelab.informed.modeling import _conv1d_type

    conv1d = _conv1d_type()
    if isinstance(mod, nn.Linear):
        return "linear"
    if conv1d is not None and isinstance(mod, conv1d):
        return "conv1d"
    if isinstance(mod, nn.Embedding):
        return "embedding"
    if isinstance(mod, (nn.LayerNorm, nn.GroupNorm)) or type(mod).__name__.endswith(("Norm", "RMSNorm", "LayerNorm")):
        return "norm"
    return "other"


def meta_model(folder: str | Path, kind: str = "auto") -> tuple[nn.Module, str, dict]:
    """The model class of ``folder/config.json``, instantiated on the meta device; (model, kind, config)."""
    from mergelab.informed.modeling import auto_class, detect_kind

    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder}: no config.json; routed outputs need a Hugging Face model folder")
    config = json.loads(cfg_path.read_text())
    k = detect_kind(config, kind)
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            model = auto_class(k).from_config(hf_config)
    except Exception as exc:  # transformers raises many types
        raise CheckpointError(
            f"{folder}: transformers cannot build the model of config.json as {k} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
        ) from None
    return model, k, config


def model_structure(folder: str | Path, stored: Mapping[str, tuple[int, ...]], kind: str = "auto") -> ModelStructure:
    """The structure of the checkpoint in ``folder`` whose stored tensors (name -> shape) are ``stored``."""
    from mergelab.informed.modeling import checkpoint_names

    model, k, config = meta_model(folder, kind)
    to_ckpt = checkpoint_names(model, stored)
    modules: dict[str, ModuleInfo] = {}
    owner: dict[str, tuple[str, str]] = {}
    first_owner: dict[int, str] = {}
    tied: dict[str, str] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        direct = dict(mod.named_parameters(recurse=False))
        if not direct:
            continue
        params: dict[str, str] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for pname, p in direct.items():
            full = f"{mname}.{pname}" if mname else pname
            key = id(p)
            if key in first_owner and first_owner[key] != mname:
                tied[mname] = first_owner[key]
                continue
            first_owner.setdefault(key, mname)
            ck = to_ckpt.get(full)
            if ck is None:
                continue
            params[pname] = ck
            shapes[pname] = tuple(stored[ck])
        if params:
            info = ModuleInfo(mname, module_kind(mod), params, shapes)
            modules[mname] = info
            for pname, ck in params.items():
                owner[ck] = (mname, pname)
    return ModelStructure(modules, owner, k, tied, config)


# --------------------------------------------------------------------------------------------
# Feed-forward blocks (WEMoE)


@dataclass(frozen=True)
class MlpBlock:
    """One transformer layer's feed-forward block: the module whose forward input is the block's
    input (the gate reads it) and the linear layers of the block (module names)."""

    input_module: str
    linears: tuple[str, ...]


_BERT_INTERMEDIATE = re.compile(r"^(?P<layer>.+)\.intermediate$")


def mlp_blocks(model: nn.Module) -> list[MlpBlock]:
    """The feed-forward blocks of ``model`` (see the module docstring), in module order."""
    kinds = {n: module_kind(m) for n, m in model.named_modules()}
    names = set(kinds)
    out: list[MlpBlock] = []
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last == "mlp":
            lin = tuple(n for n, k in kinds.items() if n.startswith(name + ".") and k in ("linear", "conv1d"))
            if lin:
                out.append(MlpBlock(name, lin))
            continue
        m = _BERT_INTERMEDIATE.match(name)
        if m and f"{m['layer']}.output.dense" in names and f"{name}.dense" in names:
            out.append(MlpBlock(name, (f"{name}.dense", f"{m['layer']}.output.dense")))
    return out


def require_mlp_blocks(model: nn.Module, where: str) -> list[MlpBlock]:
    blocks = mlp_blocks(model)
    if not blocks:
        raise PlanError(
            f"{where}: no feed-forward blocks recognised (looked for `*.mlp` modules with linear layers and BERT's "
            "`*.intermediate` + `*.output.dense`); wemoe needs them"
        )
    return blocks
