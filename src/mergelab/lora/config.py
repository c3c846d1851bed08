"""A PEFT adapter's ``adapter_config.json``: the fields that decide how its update is applied.

Only LoRA adapters (``peft_type: LORA``) are read. The scaling of a module follows PEFT
(Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; Kalajdzievski 2023,
"A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA" for rsLoRA):

* rank ``r`` and ``lora_alpha`` of a module are the values of the first key of ``rank_pattern`` /
  ``alpha_pattern`` (in the file's order) that matches the module's name, else ``r`` / ``lora_alpha``;
* a pattern key matches a module name when the name *ends with* the key at a dot boundary, the key
  read as a regular expression (``q_proj`` matches ``model.layers.0.self_attn.q_proj``,
  ``layers\\.0\\.self_attn\\.q_proj`` matches only layer 0, ``lf_proj`` does not match ``self_proj``);
* scaling = ``alpha / r``, or ``alpha / sqrt(r)`` with ``use_rslora``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergelab.errors import CheckpointError

CONFIG_NAME = "adapter_config.json"

_REFUSED_INIT = ("pissa", "olora", "corda", "loftq", "lora_ga")
"""``init_lora_weights`` values whose adapters apply to a *modified* base (the residual of an SVD or
a quantised model) unless converted when saved; PEFT records a converted adapter as ``true``."""


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of ``patterns`` (in order) that matches ``module``'s name, or None.

    A key matches when ``module`` is the key itself or ends with ``"." + key``, the key read as a
    regular expression anchored at both ends of that suffix (PEFT's rule for ``rank_pattern`` and
    ``alpha_pattern``).
    """
    for key in patterns:
        try:
            if re.fullmatch(rf"(?:.*\.)?(?:{key})", module, flags=re.DOTALL):
                return key
        except re.error:
            if module == key or module.endswith("." + key):
                return key
    return None


class AdapterConfig(BaseModel):
    """The parsed ``adapter_config.json`` of a PEFT adapter (fields PEFT writes; the rest kept as extras)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    peft_type: str = "LORA"
    r: int = 8
    lora_alpha: float = 8.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    fan_in_fan_out: bool = False
    target_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    lora_bias: bool = False
    bias: str = "none"
    base_model_name_or_path: str | None = None
    revision: str | None = None
    task_type: str | None = None
    init_lora_weights: bool | str = True
    layer_replication: list[Any] | None = None
    trainable_token_indices: Any = None
    target_parameters: list[str] | None = None
    use_qalora: bool = False
    alora_invocation_tokens: list[int] | None = None

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _none_dict(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("peft_type", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    # --- per module --------------------------------------------------------------------------
    def rank_for(self, module: str) -> int:
        """The rank PEFT gives ``module`` (its name in the base model, e.g. ``model.layers.0.mlp.up_proj``)."""
        key = pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else int(self.r)

    def alpha_for(self, module: str) -> float:
        """``lora_alpha`` of ``module`` (``alpha_pattern`` resolved)."""
        key = pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else float(self.lora_alpha)

    def scaling_for(self, module: str) -> float:
        """PEFT's scaling of ``module``'s update: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        r = self.rank_for(module)
        alpha = self.alpha_for(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # --- what mergelab refuses ---------------------------------------------------------------
    def unsupported(self) -> str | None:
        """Why this adapter cannot be applied exactly as ``W0 + update`` per tensor (None: it can)."""
        if self.peft_type != "LORA":
            return (
                f"peft_type {self.peft_type} is not supported (only LORA adapters are read); "
                "merge it into its base with peft (merge_and_unload) and give that model"
            )
        init = str(self.init_lora_weights).lower()
        if any(init.startswith(p) for p in _REFUSED_INIT):
            return (
                f"init_lora_weights {self.init_lora_weights!r}: this adapter applies to a modified base "
                "(residual/quantised); save it with peft's path_initial_model_for_weight_conversion first"
            )
        for key, what in (
            ("layer_replication", "layer_replication (duplicated layers)"),
            ("trainable_token_indices", "trainable_token_indices (trainable tokens)"),
            ("target_parameters", "target_parameters (LoRA on bare parameters)"),
            ("alora_invocation_tokens", "alora_invocation_tokens (activated LoRA)"),
        ):
            if getattr(self, key):
                return f"{what} is not supported; merge it with peft (merge_and_unload) and give that model"
        if self.use_qalora:
            return "use_qalora (quantisation-aware LoRA) is not supported"
        if self.use_dora and self.lora_bias:
            return "use_dora together with lora_bias is not a valid PEFT adapter"
        for extra in ("use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config"):
            if (self.model_extra or {}).get(extra):
                return f"{extra} is set: this LoRA variant is not supported"
        return None


def load_adapter_config(folder: str | Path) -> AdapterConfig:
    """Parse ``folder/adapter_config.json``; one-line :class:`CheckpointError` for a missing or bad file."""
    path = Path(folder) / CONFIG_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: adapter_config.json not found; a PEFT adapter folder needs it") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot parse JSON ({exc}); re-save the adapter with peft") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object (PEFT's adapter config)")
    try:
        return AdapterConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise CheckpointError(f"{path}: key {loc!r}: {err['msg']}; re-save the adapter with peft") from None
