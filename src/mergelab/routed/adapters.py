"""Expert adapters of a routed-model folder: written as PEFT LoRA adapters, read back as deltas.

Writing (:class:`ExpertAdapterWriter`, over :class:`mergelab.lora.peft_format.PeftAdapterWriter`):

* low-rank parts of linear layers and embeddings as LoRA factors (``lora_alpha = r``);
* a linear layer's bias as its full value (PEFT ``bias: "all"``: saved under
  ``<module>.base_layer.bias`` when the module is a LoRA target, ``<module>.bias`` otherwise;
  :func:`peft.PeftModel.from_pretrained` loads them into the model);
* normalisation layers and dense matrices as ``modules_to_save`` (every tensor of the module);
  a tied input embedding (``tie_word_embeddings``) is stored whole with its head's copy, as PEFT
  saves a tied pair: PEFT ties an embedding LoRA to the head only for modules named
  ``embed_tokens`` (``ensure_weight_tying``; GPT-2's ``wte`` keeps an unchanged head), and its
  ``merge_and_unload`` then adds the update twice to the one shared tensor.

Reading (:func:`read_expert`): every module an adapter changes becomes an :class:`ExpertDelta`
relative to the shared model's tensors: LoRA factors (scaling folded into B) and dense deltas
(adapter value − shared value), keyed by module name and parameter name, in the checkpoint
tensors' layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import CheckpointError
from mergelab.lora.factors import LoraFactors
from mergelab.lora.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PREFIX,
    PeftAdapterWriter,
)


@dataclass
class ExpertDelta:
    """One module's change in one expert, relative to the shared model.

    ``lora``: factors in PEFT orientation (``out × in``; for embeddings ``B`` is ``dim × r`` and
    ``A`` is ``r × num_embeddings``, so the stored ``[num, dim]`` update is ``(B A)ᵀ``), scaling
    folded in (1.0), ``transposed`` set where the stored tensor is ``(B A)ᵀ`` (embeddings, GPT-2
    ``Conv1D``), so ``lora.stored_delta()`` is the update in the stored layout; ``dense``: parameter
    name -> update in the stored layout.
    """

    lora: LoraFactors | None = None
    dense: dict[str, torch.Tensor] = field(default_factory=dict)


class ExpertAdapterWriter:
    """Writes one expert's adapter into ``folder`` (see the module docstring)."""

    def __init__(self, folder: Path, *, base_name: str, base_config: Mapping[str, Any] | None, dtype: torch.dtype):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._w = PeftAdapterWriter(
            self.folder, base_model_name_or_path=base_name, base_config=base_config, dtype=dtype
        )
        self._biases: dict[str, torch.Tensor] = {}
        self.dtype = dtype

    def add_lora(self, module: str, factors: LoraFactors, *, embedding: bool = False) -> None:
        self._w.add_lora(module, factors, embedding=embedding)

    def add_bias(self, module: str, value: torch.Tensor) -> None:
        """The full bias of linear module ``module`` (PEFT ``bias: all``)."""
        self._biases[module] = value.detach().to("cpu", self.dtype).contiguous()

    def add_saved(self, tensor_name: str, value: torch.Tensor) -> None:
        """A full tensor of a ``modules_to_save`` module (give every tensor of that module)."""
        self._w.add_saved(tensor_name, value.detach().to("cpu", self.dtype).contiguous())

    @property
    def empty(self) -> bool:
        return not self._w.modules and not self._w.saved_modules and not self._biases

    def finish(self) -> dict[str, Any]:
        """Write the weights and ``adapter_config.json``; return the config."""
        from mergelab.lora.peft_format import saved_tensor_key

        for module, bias in sorted(self._biases.items()):
            if module in self._w.saved_modules:
                continue  # the module is stored whole: its bias is among its saved tensors
            key = (
                f"{PREFIX}{module}.base_layer.bias" if module in self._w.modules else saved_tensor_key(f"{module}.bias")
            )
            self._w._put(key, bias)
        if not self._w.modules:
            raise CheckpointError(
                f"{self.folder}: the expert has no low-rank part (PEFT needs at least one LoRA module); "
                "raise the method's rank or density"
            )
        cfg = self._w.config()
        if self._biases:
            cfg["bias"] = "all"
        self._w.finish()
        (self.folder / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
        return cfg

    def abort(self) -> None:
        self._w.abort()

    @property
    def nbytes(self) -> int:
        return self._w.nbytes + sum(b.numel() * b.element_size() for b in self._biases.values())


# --------------------------------------------------------------------------------------------
# Reading


def _strip(key: str) -> str:
    if not key.startswith(PREFIX):
        raise CheckpointError(f"adapter key {key!r} does not start with {PREFIX!r}; not a PEFT LoRA adapter")
    return key[len(PREFIX) :]


def read_expert(
    folder: str | Path,
    shared_param: Callable[[str], torch.Tensor | None],
    module_of_param: Mapping[str, tuple[str, str]],
    tied: Mapping[str, str] | None = None,
    transposed: Collection[str] = (),
) -> dict[str, ExpertDelta]:
    """The deltas of the adapter in ``folder`` relative to the shared model.

    ``shared_param(full_param_name)`` returns the shared model's parameter (module name +
    ``.`` + parameter name, as ``named_parameters`` gives it) or None when the model has no such
    parameter; ``module_of_param`` maps such a name to ``(module, param)``. ``tied``: head
    modules tied to an embedding (their LoRA keys are PEFT's tied copies and are skipped).
    ``transposed``: modules that store their weight ``in × out`` (GPT-2 ``Conv1D``, which PEFT
    adapts with ``fan_in_fan_out``); their factors are marked ``transposed`` as embeddings' are.
    """
    from safetensors.torch import load_file

    from mergelab.lora.config import AdapterConfig

    folder = Path(folder)
    cfg_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights_path.is_file():
        missing = cfg_path if not cfg_path.is_file() else weights_path
        raise CheckpointError(f"{missing}: missing; the expert adapter in {folder} is incomplete")
    try:
        raw_cfg = json.loads(cfg_path.read_text())
        config = AdapterConfig.model_validate(raw_cfg)
        tensors = load_file(str(weights_path))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{folder}: cannot read the adapter ({type(exc).__name__}: {exc})") from None
    tied_heads = set((tied or {}).keys())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, ExpertDelta] = {}
    for key, value in tensors.items():
        rest = _strip(key)
        for suffix, slot in (
            (".lora_A.weight", "A"),
            (".lora_B.weight", "B"),
            (".lora_embedding_A", "eA"),
            (".lora_embedding_B", "eB"),
        ):
            if rest.endswith(suffix):
                module = rest[: -len(suffix)]
                if module not in tied_heads:
                    factors.setdefault(module, {})[slot] = value
                break
        else:
            if rest.endswith(".base_layer.bias"):
                param = rest[: -len(".base_layer.bias")] + ".bias"
            else:
                param = rest.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
                if ".modules_to_save." in rest or ".original_module." in rest:
                    continue  # PEFT's wrapper copies; the plain key holds the saved value
            shared = shared_param(param)
            if shared is None or param not in module_of_param:
                raise CheckpointError(
                    f"{weights_path}: key {key!r} names parameter {param!r}, which the shared model does not have; "
                    "the adapter does not belong to this shared model"
                )
            if tuple(shared.shape) != tuple(value.shape):
                raise CheckpointError(
                    f"{weights_path}: {key!r} has shape {list(value.shape)}, the shared model's {param!r} "
                    f"{list(shared.shape)}"
                )
            module, pname = module_of_param[param]
            wd = torch.promote_types(shared.dtype, torch.float32)
            delta = value.to(wd) - shared.detach().to("cpu", wd)
            out.setdefault(module, ExpertDelta()).dense[pname] = delta
    for module, f in factors.items():
        emb = "eA" in f or "eB" in f
        a, b = (f.get("eA"), f.get("eB")) if emb else (f.get("A"), f.get("B"))
        if a is None or b is None:
            raise CheckpointError(f"{weights_path}: LoRA module {module!r} lacks its A or B factor")
        if a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{weights_path}: LoRA module {module!r} has A {list(a.shape)} and B {list(b.shape)} of different ranks"
            )
        if shared_param(f"{module}.weight") is None:
            raise CheckpointError(
                f"{weights_path}: LoRA module {module!r} is not a module of the shared model; "
                "the adapter does not belong to this shared model"
            )
        s = config.scaling_for(module)
        flip = emb or module in transposed
        out.setdefault(module, ExpertDelta()).lora = LoraFactors(a.float(), b.float() * s, 1.0, transposed=flip)
    return out
