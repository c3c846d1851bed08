"""Recipes: what to merge, how, and with which parameters (YAML or Python).

The format is mergekit's for everything both tools share, so a mergekit recipe runs unchanged::

    merge_method: ties
    base_model: ./base
    models:
      - model: ./expert-a
        parameters: {weight: 1.0, density: 0.2}
      - model: ./expert-b
        parameters: {weight: [0, 0.5, 1]}      # gradient over depth
    parameters:
      lambda: 1.0
      density:                                   # per-tensor overrides: first match wins
        - filter: self_attn
          value: 0.3
        - value: 0.2
    dtype: bfloat16

``slices:`` (mergekit's form; instead of ``models``) stacks layer ranges: each slice lists
``sources`` (``model``, ``layer_range: [start, end)``, per-source ``parameters``) of one length,
an optional ``base_model`` and ``parameters``; the method merges each slice's sources layer by
layer, and the output's layers are numbered on across slices (:mod:`mergelab.plan`).

A parameter value is a scalar, a gradient (a list of numbers interpolated over the layer index;
tensors outside the blocks take the first value, as in mergekit), or a list of
``{filter, value}`` conditions matched as substrings of the tensor name. A per-model parameter
set at the top level applies to every model unless the model sets its own.

``tokenizer_source`` (``base`` | ``union`` | ``model:<path>``), mergekit's ``tokenizer:`` block and
``chat_template`` pick the output tokenizer and align the vocabulary rows (:mod:`mergelab.tokenizer`).

mergelab additions: ``seed`` (DARE/DELLA masks), ``compute_dtype`` (default float32),
``out_dtype`` (default: ``dtype``, else the base's dtype), ``vocab_mismatch``, and for
data-informed methods (fisher, regmean, regmean_plusplus, adamerging) a per-model
``calibration`` source or precomputed ``statistics`` folder plus a top-level ``calibration:``
block (see :mod:`mergelab.data.config`); ``output: adapter`` with an ``adapter:`` block writes the
merge as a PEFT LoRA adapter of the base (:mod:`mergelab.lora.sink`). Routed methods
(``twin_merging``, ``split_merge``, ``smile``, ``wemoe``; ``tall_masks`` / ``emr`` with a
``router:`` block) read each model's ``calibration`` (router train rows) and ``validation``
sources and the top-level ``router:`` block (:mod:`mergelab.routed.settings`).

A model may be a PEFT LoRA adapter (folder, Hub id, or mergekit's ``base+adapter`` string), read
over ``base_model`` (:mod:`mergelab.lora.reader`); ``allow_adapter_base_mismatch: true`` reads one
whose recorded base does not name ``base_model``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergelab.data.config import CalibrationSettings, CalibrationSource
from mergelab.errors import OptionError, RecipeError
from mergelab.lora.sink import AdapterSettings
from mergelab.routed.settings import RouterSettings
from mergelab.tokenizer import ModelTokenEmbedding, TokenizerSettings, check_chat_template, normalize_source

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


def parse_dtype(value: str | torch.dtype | None, what: str = "dtype") -> torch.dtype | None:
    """A torch dtype from a recipe or CLI string; None passes through."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if not isinstance(value, str):
        raise RecipeError(f"{what}: expected a dtype name such as 'bfloat16', got {type(value).__name__}")
    key = value.lower().removeprefix("torch.")
    if key not in DTYPES:
        raise RecipeError(f"{what}: unknown dtype {value!r}; use one of float32, bfloat16, float16, float64")
    return DTYPES[key]


class Condition(BaseModel):
    """One ``{filter, value}`` entry of a parameter setting."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = None
    value: Any


ParamSetting = Any  # scalar | list[scalar] (gradient) | list[Condition]


class ModelEntry(BaseModel):
    """One input model and its per-model parameters."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)
    calibration: CalibrationSource | None = None  # data-informed methods: this expert's examples; routers: train rows
    statistics: str | None = None  # data-informed methods: a precomputed statistics folder
    validation: CalibrationSource | None = None  # routers: this expert's model-selection rows (mergelab.routed)
    name: str | None = None  # routed outputs: the expert's (route's) name; default: its folder's name

    @field_validator("model", mode="before")
    @classmethod
    def _model_ref(cls, v: Any) -> Any:
        if isinstance(v, dict) and "model" in v:  # mergekit's long form {model: {path: ...}}
            inner = v["model"]
            v = inner.get("path") if isinstance(inner, dict) else inner
        if isinstance(v, Path):
            v = str(v)
        return v

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_params(cls, v: Any) -> Any:
        return {} if v is None else v


class SliceSource(BaseModel):
    """One source of a slice: layers ``layer_range`` = [start, end) of ``model`` (mergekit's form)."""

    model_config = ConfigDict(extra="forbid")
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, ParamSetting] | None = None

    @field_validator("model", mode="before")
    @classmethod
    def _model_ref(cls, v: Any) -> Any:
        return ModelEntry._model_ref(v)

    @field_validator("layer_range")
    @classmethod
    def _range(cls, v: tuple[int, int]) -> tuple[int, int]:
        start, end = v
        if start < 0 or end <= start:
            raise ValueError(f"layer_range [{start}, {end}] must be [start, end) with 0 <= start < end")
        return v


class SliceDef(BaseModel):
    """One output slice: its sources (same number of layers each), an optional ``base_model``
    (default: the recipe's) and ``parameters`` that override the recipe's for this slice.
    ``residual_weight`` is accepted and ignored, as by mergekit 0.1.5."""

    model_config = ConfigDict(extra="forbid")
    sources: list[SliceSource]
    base_model: str | None = None
    residual_weight: float | None = None
    parameters: dict[str, ParamSetting] | None = None

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_ref(cls, v: Any) -> Any:
        return ModelEntry._model_ref(v)

    @model_validator(mode="after")
    def _same_lengths(self) -> SliceDef:
        if not self.sources:
            raise ValueError("a slice needs at least one source (model + layer_range)")
        lengths = [s.layer_range[1] - s.layer_range[0] for s in self.sources]
        if len(set(lengths)) != 1:
            ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            raise ValueError(f"the sources of a slice must have the same number of layers, got {ranges}")
        models = [s.model for s in self.sources]
        dup = next((m for m in models if models.count(m) > 1), None)
        if dup is not None:
            raise ValueError(f"model {dup} is listed twice in one slice: give each model once per slice")
        return self

    @property
    def length(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


class Recipe(BaseModel):
    """A validated merge recipe."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceDef] | None = None
    parameters: dict[str, ParamSetting] = Field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    compute_dtype: str = "float32"
    tokenizer_source: str | None = None  # base | union | model:<path> (mergelab.tokenizer)
    tokenizer: TokenizerSettings | None = None  # mergekit's tokenizer: block (source, tokens, pad_to_multiple_of)
    chat_template: str | None = None  # auto | a bundled name | Jinja text
    seed: int = 0
    vocab_mismatch: Literal["error", "truncate"] = "error"
    name: str | None = None
    calibration: CalibrationSettings | None = None
    allow_adapter_base_mismatch: bool = Field(
        False,
        description="read PEFT adapters whose base_model_name_or_path does not name base_model (mergelab.lora)",
    )
    output: Literal["model", "adapter"] = Field(
        "model",
        description="model: a dense checkpoint; adapter: a PEFT LoRA adapter of base_model (settings in adapter:)",
    )
    adapter: AdapterSettings | None = None
    router: RouterSettings | None = Field(
        None,
        description="routed methods (twin_merging, split_merge; tall_masks / emr: adds a router): how the "
        "sequence router is trained (mergelab.routed.settings)",
    )
    defaults: Literal["paper", "mergekit"] | None = Field(
        None,
        description="defaults of parameters the recipe leaves unset: paper (mergelab's) or mergekit "
        "(mergekit 0.1.5's, methods/mergekit_defaults.py); unset: paper, with a warning per difference",
    )

    @field_validator("base_model", mode="before")
    @classmethod
    def _base_ref(cls, v: Any) -> Any:
        return ModelEntry._model_ref(v)

    @field_validator("parameters", mode="before")
    @classmethod
    def _none_params(cls, v: Any) -> Any:
        return {} if v is None else v

    @field_validator("dtype", "out_dtype", "compute_dtype")
    @classmethod
    def _known_dtype(cls, v: str | None) -> str | None:
        parse_dtype(v)
        return v

    @model_validator(mode="after")
    def _slices_to_models(self) -> Recipe:
        if self.slices is not None:
            if self.models:
                raise ValueError("give either `models` or `slices`, not both")
            if not self.slices:
                raise ValueError("`slices` is empty: list at least one slice, or give a `models:` list")
        elif not self.models:
            raise ValueError("the recipe lists no models: add a `models:` list")
        check_chat_template(self.chat_template)
        if self.adapter is not None and self.output != "adapter":
            raise ValueError("an adapter: block needs output: adapter (or leave the block out)")
        if self.tokenizer_source is not None:
            if self.tokenizer is not None:
                raise ValueError("give either tokenizer_source or a tokenizer: block, not both")
            self.tokenizer_source = normalize_source(self.tokenizer_source)
        return self

    # --- convenience -----------------------------------------------------------------------
    @property
    def output_dtype(self) -> torch.dtype | None:
        return parse_dtype(self.out_dtype or self.dtype)

    @property
    def compute_torch_dtype(self) -> torch.dtype:
        dt = parse_dtype(self.compute_dtype)
        assert dt is not None
        return dt

    @property
    def model_refs(self) -> list[str]:
        """Every model the recipe names under ``models`` or in its slices' sources, once each, in order."""
        refs = [m.model for m in self.models] + [s.model for sl in self.slices or () for s in sl.sources]
        return list(dict.fromkeys(refs))

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_defaults=True, by_alias=True)
        data.setdefault("merge_method", self.merge_method)
        return yaml.safe_dump(data, sort_keys=False)


def models_from_slices(recipe: Recipe) -> Recipe | None:
    """The ``models:`` form of a recipe with one slice (and no slice ``base_model`` of its own),
    else None. The planner uses it when every source's ``layer_range`` covers the whole model
    (the common mergekit form); a partial range is planned as a slice (only those layers).

    The slice's parameters override the recipe's (mergekit's precedence: source, slice, recipe).
    """
    if recipe.slices is None or len(recipe.slices) != 1:
        return None
    (sl,) = recipe.slices
    if sl.base_model not in (None, recipe.base_model):
        return None
    models = [ModelEntry(model=s.model, parameters=s.parameters or {}) for s in sl.sources]
    return recipe.model_copy(
        update={"models": models, "slices": None, "parameters": {**recipe.parameters, **(sl.parameters or {})}}
    )


def _format_validation(exc: ValidationError, where: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "recipe"
        parts.append(f"{loc}: {err['msg']}")
    return f"{where}: " + "; ".join(parts)


def _yaml_error(path: Path, exc: yaml.YAMLError) -> str:
    """``recipe.yaml:12:5: <problem> (<context> at line L, column C)`` from a PyYAML error (1-based)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    context = getattr(exc, "context", None)
    cmark = getattr(exc, "context_mark", None)
    if context and cmark is not None and mark is not None and (cmark.line, cmark.column) != (mark.line, mark.column):
        problem += f" ({context} at line {cmark.line + 1}, column {cmark.column + 1})"
    elif context:
        problem += f" ({context})"
    return f"{where}: invalid YAML: {problem}; fix the syntax or indentation there"


def _parse_yaml(path: Path, all_documents: bool = False) -> Any:
    """The YAML document of ``path`` (a list of all its documents with ``all_documents``); every way
    the file can be unreadable is a one-line RecipeError."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read the recipe ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte offset {exc.start} (line {line}); "
            "save the recipe as UTF-8"
        ) from None
    try:
        return list(yaml.safe_load_all(text)) if all_documents else yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(_yaml_error(path, exc)) from None
    except RecursionError:
        raise RecipeError(f"{path}: the YAML is nested too deeply to parse; a recipe needs only a few levels") from None


def load_recipe(source: str | os.PathLike[str] | Mapping[str, Any] | Recipe) -> Recipe:
    """A Recipe from a YAML file path, a dict, or a Recipe; relative model paths are
    resolved against the YAML file's folder when they exist there."""
    if isinstance(source, Recipe):
        return source
    where = "recipe"
    base_dir: Path | None = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file not found")
        try:
            data = _parse_yaml(path)
        except RecipeError:
            if is_multi_stage(path):
                raise RecipeError(
                    f"{path}: several YAML documents (a multi-stage recipe): run it with `mergelab merge` "
                    "or mergelab.merge_stages"
                ) from None
            raise
        base_dir = path.resolve().parent
    elif isinstance(source, Mapping):
        data = dict(source)
    else:
        raise OptionError(
            f"recipe: expected a YAML file path, a dict or a Recipe, got {type(source).__name__}; "
            "pass the path of the recipe file"
        )
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe must be a mapping with merge_method, base_model and models")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(_format_validation(exc, where)) from None
    except RecursionError:
        raise RecipeError(f"{where}: the recipe is nested too deeply; a recipe needs only a few levels") from None
    if base_dir is not None:
        recipe = _resolve_relative(recipe, base_dir)
    return recipe


def _resolve_relative(recipe: Recipe, base_dir: Path) -> Recipe:
    def fix(ref: str | None) -> str | None:
        if ref is None or Path(ref).is_absolute() or Path(ref).exists():
            return ref
        if "+" in ref:  # mergekit's base+adapter form: each part relative to the recipe
            head, _, tail = ref.rpartition("+")
            if head and tail:
                return f"{fix(head)}+{fix(tail)}"
        candidate = base_dir / ref
        return str(candidate) if candidate.exists() else ref

    def fix_source(src: CalibrationSource | None) -> CalibrationSource | None:
        if src is None:
            return None
        update: dict[str, Any] = {}
        if src.path is not None:
            update["path"] = fix(src.path)
        if src.head not in (None, "zoo"):
            update["head"] = fix(src.head)
        return src.model_copy(update=update)

    models = [
        m.model_copy(
            update={
                "model": fix(m.model),
                "calibration": fix_source(m.calibration),
                "statistics": fix(m.statistics),
                "validation": fix_source(m.validation),
            }
        )
        for m in recipe.models
    ]
    update: dict[str, Any] = {
        "models": models,
        "base_model": fix(recipe.base_model),
        "tokenizer_source": _fix_tokenizer_source(recipe.tokenizer_source, fix),
    }
    if recipe.tokenizer is not None:
        tokens = {
            t: e.model_copy(
                update={
                    "source": (
                        e.source.model_copy(update={"model": fix(e.source.model)})
                        if isinstance(e.source, ModelTokenEmbedding)
                        else fix(e.source)
                        if isinstance(e.source, str)
                        else e.source
                    )
                }
            )
            for t, e in (recipe.tokenizer.tokens or {}).items()
        }
        update["tokenizer"] = recipe.tokenizer.model_copy(
            update={
                "source": _fix_tokenizer_source(recipe.tokenizer.source, fix),
                "tokens": tokens if recipe.tokenizer.tokens else None,
            }
        )
    if recipe.slices is not None:
        update["slices"] = [
            sl.model_copy(
                update={
                    "base_model": fix(sl.base_model),
                    "sources": [s.model_copy(update={"model": fix(s.model)}) for s in sl.sources],
                }
            )
            for sl in recipe.slices
        ]
    if recipe.calibration is not None:
        cal = recipe.calibration
        stats_dir = cal.statistics_dir
        if stats_dir is not None and not Path(stats_dir).is_absolute():
            stats_dir = str(base_dir / stats_dir)  # may not exist yet: always relative to the recipe
        update["calibration"] = cal.model_copy(update={"source": fix_source(cal.source), "statistics_dir": stats_dir})
    return recipe.model_copy(update=update)


def _fix_tokenizer_source(value: str | None, fix: Any) -> str | None:
    """``base`` and ``union`` are keywords, never folder names; other values are paths."""
    return value if value in (None, "base", "union") else fix(value)


# --- multi-stage recipes (mergekit-multi's form) -----------------------------------------

_MODEL_KEYS = ("model", "base_model", "tokenizer_source", "path")


@dataclass(frozen=True)
class Stage:
    """One merge of a multi-stage recipe: its ``name`` (None: the final merge, written to OUT),
    its recipe (stage names already replaced by their output folders) and the stages it reads."""

    name: str | None
    recipe: Recipe
    needs: tuple[str, ...]


def _yaml_documents(path: Path) -> list[Any]:
    return list(_parse_yaml(path, all_documents=True))


def is_multi_stage(source: object) -> bool:
    """True for a YAML file holding several documents (mergekit-multi's multi-stage recipes)."""
    if not isinstance(source, (str, os.PathLike)) or not Path(source).is_file():
        return False
    try:
        docs = [d for d in _yaml_documents(Path(source)) if d is not None]
    except RecipeError:
        return False  # load_recipe reports the syntax error
    return len(docs) > 1


def load_stages(source: str | os.PathLike[str], stages_dir: str | os.PathLike[str]) -> list[Stage]:
    """The stages of a multi-document recipe, in an order that runs every stage after those it reads.

    Each document is a recipe; one with a ``name`` is an intermediate merge written to
    ``stages_dir/<name>``, and any model reference (``model``, ``base_model``, slice sources,
    ``tokenizer_source``) equal to a stage name reads that output; at most one document has no
    name: the final merge. As mergekit-multi; names must be unique and references acyclic.
    """
    path = Path(source)
    where = str(path)
    docs = [d for d in _yaml_documents(path) if d is not None]
    if not all(isinstance(d, dict) for d in docs):
        raise RecipeError(f"{where}: every document of a multi-stage recipe must be a mapping (a recipe)")
    names: list[str | None] = []
    for i, d in enumerate(docs):
        name = d.get("name")
        if name is not None and (not isinstance(name, str) or not name or "/" in name or name.startswith(".")):
            raise RecipeError(f"{where}: document {i + 1}: stage name {name!r} must be a plain folder name")
        if name in names:
            what = f"two stages are named {name!r}" if name else "two documents have no name"
            raise RecipeError(f"{where}: {what}; give each stage a unique `name` (only the final merge has none)")
        names.append(name)
    stage_names = {n for n in names if n is not None}
    out_dir = Path(stages_dir).expanduser().absolute()

    def patch(value: Any, used: set[str], key: str | None = None) -> Any:
        if isinstance(value, dict):
            return {k: patch(v, used, k) for k, v in value.items()}
        if isinstance(value, list):
            return [patch(v, used, key) for v in value]
        if key in _MODEL_KEYS and isinstance(value, str) and value in stage_names:
            used.add(value)
            return str(out_dir / value)
        return value

    stages: dict[str | None, Stage] = {}
    for d, name in zip(docs, names):
        used: set[str] = set()
        body = patch({k: v for k, v in d.items() if k != "name"}, used)
        label = f"{where} (stage {name or 'final'})"
        try:
            rec = Recipe.model_validate(body)
        except ValidationError as exc:
            raise RecipeError(_format_validation(exc, label)) from None
        if name is not None:
            rec = rec.model_copy(update={"name": name})
        stages[name] = Stage(name, _resolve_relative(rec, path.resolve().parent), tuple(sorted(used)))

    order: list[Stage] = []
    state: dict[str | None, str] = {}

    def visit(name: str | None, chain: tuple[str | None, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = " -> ".join(str(n or "final") for n in (*chain, name))
            raise RecipeError(f"{where}: the stages read each other in a cycle ({cycle}); break it")
        state[name] = "active"
        for dep in stages[name].needs:
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append(stages[name])

    for name in names:
        visit(name, ())
    return order


# --- per-tensor parameter resolution ------------------------------------------------------


def _is_condition(x: Any) -> bool:
    return isinstance(x, Condition) or (isinstance(x, dict) and "value" in x and set(x) <= {"filter", "value"})


def resolve_setting(setting: ParamSetting, tensor_name: str, t: float) -> Any:
    """The value of a setting for one tensor: filters matched by substring (first match wins),
    gradients interpolated at depth ``t`` in [0, 1] (mergekit's rule).

    A mapping that is not a ``{filter, value}`` condition is a literal value (for parameters
    that take a mapping), as is a list whose items are not all scalars or conditions.
    """
    if _is_condition(setting):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)) or setting is None or isinstance(setting, dict):
        return setting
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            numeric = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting)
            if not numeric:
                return setting[int(t * (len(setting) - 1))]
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        if not all(_is_condition(c) for c in setting):
            return setting
        for cond in setting:
            c = cond if isinstance(cond, Condition) else Condition.model_validate(cond)
            if c.filter is None or c.filter == "*" or c.filter in tensor_name:
                return resolve_setting(c.value, tensor_name, t)
        return None
    raise RecipeError(
        f"unsupported parameter value {setting!r}: use a number, a list of numbers, or filter/value pairs"
    )
