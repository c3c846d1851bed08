"""mergekit-moe's recipe format as pydantic models, so a mergekit-moe recipe runs unchanged.

::

    base_model: ./llama-base
    gate_mode: hidden            # hidden | hidden_avg | cheap_embed | random | uniform_random
    dtype: bfloat16
    experts_per_token: 2
    experts:
      - source_model: ./expert-code
        positive_prompts: ["def fibonacci(n):", "Write a Python function"]
        negative_prompts: ["Once upon a time"]
      - source_model: ./llama-base+./adapters/math      # a LoRA adapter over the base
        positive_prompts: ["Solve 3x + 5 = 11"]
        noise_scale: 0.01
    shared_experts:               # Qwen2-MoE only: exactly one
      - source_model: ./llama-base
        positive_prompts: ["Hello"]
        residual_scale: 0.1

Keys are mergekit-moe's (``mergekit/moe/config.py``); ``architecture`` picks the output family
(``mixtral``, ``qwen2_moe``/``qwen``, ``qwen3_moe``), else the first that fits, Mixtral first, as
mergekit-moe does. mergelab adds ``seed`` (the random gate modes and ``noise_scale`` draw from
generators seeded by (seed, tensor name), so a run is reproducible) and ``prompt_batch_size``.
Unknown keys are refused (a typo would otherwise change nothing silently).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mergelab.errors import OptionError, RecipeError

GateMode = Literal["hidden", "hidden_avg", "cheap_embed", "random", "uniform_random"]
GATE_MODES: tuple[str, ...] = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
PROMPT_MODES: tuple[str, ...] = ("hidden", "hidden_avg", "cheap_embed")
"""Gate modes computed from prompts (every routed expert needs positive prompts)."""


class MoeExpert(BaseModel):
    """One expert: a dense fine-tune (or ``base+adapter``, or an adapter folder) and its gate prompts."""

    model_config = ConfigDict(extra="forbid")

    source_model: str
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = Field(None, ge=0, description="std of Gaussian noise added to the expert's MLP")
    residual_scale: float | None = Field(None, description="multiplies the expert's down_proj (shared experts)")

    @field_validator("source_model", mode="before")
    @classmethod
    def _model_ref(cls, v: Any) -> Any:
        # mergekit's ModelReference also reads {model: path} / {path: ...} mappings
        if isinstance(v, Mapping):
            for key in ("path", "model"):
                if isinstance(v.get(key), str):
                    lora = v.get("lora")
                    return f"{v[key]}+{lora}" if isinstance(lora, str) else v[key]
        return v


class MoeRecipe(BaseModel):
    """A mergekit-moe recipe (``MoEMergeConfig``) plus mergelab's ``seed`` and ``prompt_batch_size``."""

    model_config = ConfigDict(extra="forbid")

    base_model: str
    experts: list[MoeExpert] = Field(min_length=1)
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: list[MoeExpert] | None = None
    architecture: str | None = None
    seed: int = Field(0, ge=0)
    prompt_batch_size: int = Field(16, ge=1, description="prompts per forward pass of the base (hidden modes)")

    @field_validator("gate_mode")
    @classmethod
    def _gate_mode(cls, v: str) -> str:
        v = {"hidden_last": "hidden"}.get(v, v)  # mergekit's alias of the default
        if v not in GATE_MODES:
            raise ValueError(f"unknown gate_mode {v!r}; use one of {', '.join(GATE_MODES)}")
        return v

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_ref(cls, v: Any) -> Any:
        return MoeExpert._model_ref(v)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def check_recipe(recipe: MoeRecipe, *, allow_all_same: bool = False, where: str = "recipe") -> None:
    """mergekit-moe's refusals, as one-line RecipeErrors: ``experts_per_token`` out of range,
    missing prompts for a prompt-based gate mode, identical prompts for every expert, and (unless
    ``allow_all_same``) the same model for every expert."""
    n = len(recipe.experts)
    if recipe.experts_per_token < 1 or recipe.experts_per_token > n:
        raise RecipeError(f"{where}: experts_per_token is {recipe.experts_per_token} with {n} experts; use 1 to {n}")
    if recipe.gate_mode in PROMPT_MODES:
        for i, e in enumerate(recipe.experts):
            if not e.positive_prompts:
                raise RecipeError(
                    f"{where}: experts[{i}] ({e.source_model}) has no positive_prompts, which gate_mode "
                    f"{recipe.gate_mode!r} needs; add prompts, or use gate_mode: random"
                )
        shared = recipe.shared_experts or []
        with_prompts = [bool(e.positive_prompts) for e in shared]
        if any(with_prompts) and not all(with_prompts):
            raise RecipeError(f"{where}: give positive_prompts to every shared expert or to none")
        if shared and not any(with_prompts):
            raise RecipeError(
                f"{where}: shared_experts[0] has no positive_prompts; its gate (Qwen2-MoE's shared_expert_gate) "
                f"is computed from them with gate_mode {recipe.gate_mode!r}; add prompts"
            )
        if n > 1:
            first = _prompts(recipe.experts[0])
            if all(_prompts(e) == first for e in recipe.experts[1:]):
                raise RecipeError(
                    f"{where}: every expert has the same positive and negative prompts, so every gate would be the "
                    "same; give each expert prompts for what should be routed to it"
                )
    if not allow_all_same and n > 1 and all(e.source_model == recipe.experts[0].source_model for e in recipe.experts):
        raise RecipeError(
            f"{where}: every expert is {recipe.experts[0].source_model}; the MoE would compute the same as one expert "
            "at a higher cost. To build it anyway (to train it afterwards), pass "
            "--i-understand-this-is-not-useful-without-training (allow_all_same=True)"
        )


def _prompts(e: MoeExpert) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())


def load_moe_recipe(source: str | os.PathLike[str] | Mapping[str, Any] | MoeRecipe) -> MoeRecipe:
    """A :class:`MoeRecipe` from a YAML path, a dict or a recipe; relative model paths are resolved
    against the YAML file's folder when they exist there."""
    from mergelab.recipe import _format_validation, _parse_yaml

    if isinstance(source, MoeRecipe):
        return source
    where = "recipe"
    base_dir: Path | None = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        data = _parse_yaml(path)
        base_dir = path.resolve().parent
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        raise OptionError(f"recipe: expected a YAML file path, a dict or a MoeRecipe, got {type(source).__name__}")
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: an MoE recipe is a mapping with base_model and experts")
    if "merge_method" in data or "models" in data:
        raise RecipeError(f"{where}: this is a merge recipe (merge_method/models); run it with `mergelab merge`")
    try:
        recipe = MoeRecipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_validation(exc, where)) from None
    if base_dir is not None:
        recipe = _resolve_relative(recipe, base_dir)
    return recipe


def _resolve_relative(recipe: MoeRecipe, base_dir: Path) -> MoeRecipe:
    def fix(ref: str) -> str:
        if Path(ref).is_absolute() or Path(ref).exists():
            return ref
        if "+" in ref:  # base+adapter: each part relative to the recipe
            head, _, tail = ref.rpartition("+")
            if head and tail:
                return f"{fix(head)}+{fix(tail)}"
        candidate = base_dir / ref
        return str(candidate) if candidate.exists() else ref

    def fix_all(experts: list[MoeExpert] | None) -> list[MoeExpert] | None:
        if experts is None:
            return None
        return [e.model_copy(update={"source_model": fix(e.source_model)}) for e in experts]

    return recipe.model_copy(
        update={
            "base_model": fix(recipe.base_model),
            "experts": fix_all(recipe.experts),
            "shared_experts": fix_all(recipe.shared_experts),
        }
    )
