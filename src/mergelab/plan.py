"""Plans: one job per output tensor, built from headers and index files alone.

Everything that can fail without reading tensor data fails here, before any heavy I/O:
unknown methods and parameters, out-of-range values (resolved per tensor, so a bad value in a
filter or gradient is caught too), missing tensors, shape and vocabulary mismatches, dtype
oddities. A user learns about a typo in a second, not after an hour.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from mergelab.checkpoint.reader import CheckpointReader, TensorMeta, open_checkpoint, tie_word_embeddings
from mergelab.errors import ParameterError, PlanError, RecipeError
from mergelab.ir import (
    IDENTITY,
    MASKS,
    MODEL,
    Artifact,
    Copy,
    Graph,
    Job,
    MethodCall,
    NameMap,
    OutRef,
    TensorRef,
    VocabAlign,
)
from mergelab.methods.base import MergeMethod, MethodParams, is_numeric_annotation
from mergelab.methods.mergekit_defaults import mergekit_fill, parameter_warnings
from mergelab.methods.registry import get_method
from mergelab.recipe import ModelEntry, Recipe, SliceDef, models_from_slices, parse_dtype, resolve_setting

_LAYER_PATTERNS = [
    re.compile(p)
    for p in (
        r"(?:^|\.)layers\.(\d+)\.",
        r"(?:^|\.)h\.(\d+)\.",
        r"(?:^|\.)block\.(\d+)\.",
        r"(?:^|\.)blocks\.(\d+)\.",
        r"(?:^|\.)layer\.(\d+)\.",
    )
]
_EMBED_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "shared.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "embeddings.weight",
)
_VOCAB_NAMES = re.compile(
    r"(embed_tokens|wte|word_embeddings|shared|embed_in|tok_embeddings|lm_head|embed_out|output)\.weight$"
)


def layer_index(name: str) -> int | None:
    """Transformer block index of a tensor name (``model.layers.3.mlp...`` → 3), or None."""
    for pat in _LAYER_PATTERNS:
        m = pat.search(name)
        if m:
            return int(m.group(1))
    return None


def layer_split(name: str) -> tuple[str, int, str] | None:
    """A layer tensor's name as (prefix, block index, suffix): ``model.layers.3.mlp.w`` ->
    (``model.layers.``, 3, ``.mlp.w``); None outside the blocks. Same patterns as :func:`layer_index`."""
    for pat in _LAYER_PATTERNS:
        m = pat.search(name)
        if m:
            return name[: m.start(1)], int(m.group(1)), name[m.end(1) :]
    return None


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""config.json keys that hold the number of blocks (Llama/Mistral/Qwen/BERT, GPT-2, T5/ChatGLM, ...)."""


def layer_count_key(config: Mapping[str, Any] | None) -> str | None:
    """The config key holding the depth (``text_config.<key>`` for multimodal configs), or None."""
    if not config:
        return None
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            return key
    text = config.get("text_config")
    if isinstance(text, dict):
        inner = layer_count_key(text)
        return f"text_config.{inner}" if inner else None
    return None


def natural_order_key(name: str) -> tuple[int, int, str]:
    """Module order: embeddings, then blocks by index, then the rest (final norm, heads).

    Shards come out in the order a model is built, and the two largest tensors (input
    embedding and output head) are far apart, so reading the next one ahead never holds both.
    """
    layer = layer_index(name)
    if layer is not None:
        return (1, layer, name)
    return (0 if "embed" in name or name.endswith(("wte.weight", "wpe.weight", "shared.weight")) else 2, 0, name)


def num_layers_from(config: Mapping[str, Any] | None, names: Sequence[str]) -> int | None:
    """Depth from config.json (``num_hidden_layers``/``n_layer``/``num_layers``), else from names."""
    if config:
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            v = config.get(key)
            if isinstance(v, int) and v > 0:
                return v
        text = config.get("text_config")
        if isinstance(text, dict):
            return num_layers_from(text, names)
    idx = [i for i in (layer_index(n) for n in names) if i is not None]
    return max(idx) + 1 if idx else None


TensorJob = Job
"""One output tensor (the former name of :class:`mergelab.ir.Job`; same per-tensor attributes)."""


@dataclass
class Plan:
    """A validated merge: the recipe and its job graph (:class:`mergelab.ir.Graph`).

    The attributes below are views of the graph in the planner's terms (readers rather than
    source ids), used by the data phases, the analysis and the API; executors take the graph.
    """

    recipe: Recipe
    graph: Graph
    global_model_params: tuple[MethodParams, ...] = ()
    tokenizer: Any = None  # mergelab.tokenizer.OutputTokenizer when the recipe sets tokenizer_source / tokenizer

    @property
    def method(self) -> MergeMethod:
        return self.graph.method

    @property
    def global_params(self) -> MethodParams:
        return self.graph.global_params

    @property
    def jobs(self) -> list[Job]:
        return self.graph.jobs

    @property
    def num_layers(self) -> int | None:
        return self.graph.num_layers

    @property
    def tied(self) -> dict[str, str]:
        return self.graph.tied

    @property
    def warnings(self) -> list[str]:
        return self.graph.warnings

    @property
    def base(self) -> CheckpointReader | None:
        g = self.graph
        return g.sources[g.base] if g.base is not None else None

    @property
    def experts(self) -> list[CheckpointReader]:
        g = self.graph
        return [g.sources[e] for e in g.experts]

    @property
    def reference(self) -> CheckpointReader:
        return self.graph.sources[self.graph.reference]

    @property
    def aux(self) -> list[CheckpointReader] | None:
        """One statistics reader per expert (keys ``"<tensor>::<kind>"``), attached by :meth:`attach_aux`."""
        return self.graph.aux

    @property
    def aux_index(self) -> list[dict[str, dict[str, str]]]:
        return self.graph.aux_index

    @property
    def inputs(self) -> list[CheckpointReader]:
        """The distinct merged inputs (base, then experts)."""
        return [self.graph.sources[s] for s in self.graph.input_sources]

    @property
    def merge_jobs(self) -> list[Job]:
        return self.graph.merge_jobs

    def job_input_bytes(self, job: Job) -> int:
        """Bytes read from the inputs for one job."""
        return self.graph.job_input_bytes(job)

    def input_bytes(self, jobs: Sequence[Job] | None = None) -> int:
        """Bytes read from the inputs for one pass over ``jobs`` (default: all jobs)."""
        return self.graph.input_bytes(jobs)

    def output_bytes(self) -> int:
        return self.graph.output_bytes(MODEL)

    def readers_for(self, job: Job) -> list[CheckpointReader]:
        return [self.graph.sources[r.source] for r in job.inputs]

    def expected_peak_bytes(self, compute_itemsize: int = 4) -> int:
        """Upper estimate of the engine's working memory beyond the interpreter itself.

        (inputs + 2) × the largest tensor in the compute dtype (the method's inputs, one
        scratch buffer and its result), plus the next job's raw inputs read ahead. With
        statistics attached: plus twice the largest job's statistics (in hand and read ahead)
        and three float64 copies of the largest single statistic (e.g. RegMean's Gram sum and
        its factorisation).
        """
        n_in = len(self.graph.experts) + (1 if self.graph.base is not None else 0)
        largest = max((j.numel for j in self.jobs), default=0)
        raw_ahead = max((self.job_input_bytes(j) for j in self.jobs), default=0)
        aux = 0
        if self.aux is not None:
            per_job = [self.job_aux_bytes(j) for j in self.merge_jobs]
            biggest = max(
                (
                    r.tensors()[k].numel
                    for i, r in enumerate(self.aux)
                    for kinds in self.aux_index[i].values()
                    for k in kinds.values()
                ),
                default=0,
            )
            aux = 2 * max(per_job, default=0) + 3 * 8 * biggest
        return (n_in + 2) * largest * compute_itemsize + raw_ahead + aux

    def attach_aux(self, readers: Sequence[CheckpointReader]) -> None:
        """Attach one statistics reader per expert (keys ``"<tensor name>::<kind>"``).

        Entries of tensors the plan does not merge are ignored; a key without ``::`` is an error.
        """
        if len(readers) != len(self.graph.experts):
            raise PlanError(f"{len(readers)} statistics for {len(self.graph.experts)} experts: give one per expert")
        index: list[dict[str, dict[str, str]]] = []
        for r in readers:
            by_tensor: dict[str, dict[str, str]] = {}
            for key in r.tensors():
                name, sep, kind = key.rpartition("::")
                if not sep or not name or not kind:
                    raise PlanError(f"{r.label}: statistics key {key!r} is not of the form '<tensor name>::<kind>'")
                by_tensor.setdefault(name, {})[kind] = key
            index.append(by_tensor)
        self.graph.aux = list(readers)
        self.graph.aux_index = index

    def aux_keys(self, job: Job) -> list[dict[str, str]]:
        """Per expert, the statistics keys of ``job`` by kind (empty dicts without statistics)."""
        return self.graph.aux_keys(job)

    def job_aux_bytes(self, job: Job) -> int:
        return self.graph.job_aux_bytes(job)

    def close(self) -> None:
        for r in list(self.graph.sources.values()) + list(self.aux or []):
            r.close()


# ------------------------------------------------------------------------------------------


def _split_inputs(recipe: Recipe, method: MergeMethod) -> tuple[str | None, list[int]]:
    """Which recipe entry is the base and which entries are experts (indices into models)."""
    base_ref = recipe.base_model
    if method.base == "required" and base_ref is None:
        raise RecipeError(f"merge_method {method.name} needs a base_model (the shared pretrained model)")
    if method.base == "ignored":
        return base_ref, list(range(len(recipe.models)))
    experts = [i for i, m in enumerate(recipe.models) if m.model != base_ref]
    return base_ref, experts


def _params_error(exc: ValidationError, method: MergeMethod, scope: str, where: str) -> ParameterError:
    parts = []
    for err in exc.errors():
        key = ".".join(str(x) for x in err["loc"]) or "parameters"
        if err["type"] == "extra_forbidden":
            allowed = sorted(
                {f.alias or n for n, f in method.params.model_fields.items()}
                | {f.alias or n for n, f in method.model_params.model_fields.items()}
            )
            parts.append(f"unknown parameter {key!r} for {method.name} (allowed: {', '.join(allowed) or 'none'})")
        else:
            parts.append(f"{key}: {err['msg']}")
    return ParameterError(f"{where}: {scope} parameter error for {method.name}: " + "; ".join(parts))


def _field_keys(model: type[MethodParams]) -> set[str]:
    keys = set()
    for name, f in model.model_fields.items():
        keys.add(name)
        if f.alias:
            keys.add(f.alias)
    return keys


def _mergekit_fill(recipe: Recipe, method: MergeMethod) -> tuple[dict[str, Any], dict[str, Any]]:
    """Values ``defaults: mergekit`` gives parameters the recipe leaves unset (none otherwise)."""
    if recipe.defaults != "mergekit":
        return {}, {}
    g, m = mergekit_fill(method.name)
    gkeys, mkeys = _field_keys(method.params), _field_keys(method.model_params)
    return {k: v for k, v in g.items() if k in gkeys}, {k: v for k, v in m.items() if k in mkeys}


class _ParamResolver:
    """Resolves and validates the method's parameters for every tensor, with caching."""

    def __init__(self, recipe: Recipe, method: MergeMethod, expert_idx: list[int]):
        self.recipe = recipe
        self.method = method
        self.expert_idx = expert_idx
        gkeys, mkeys = _field_keys(method.params), _field_keys(method.model_params)
        unknown = [k for k in recipe.parameters if k not in gkeys | mkeys]
        if unknown:
            allowed = sorted(
                gkeys | mkeys - {n for n in method.params.model_fields if method.params.model_fields[n].alias}
            )
            raise ParameterError(
                f"recipe parameters: unknown parameter {unknown[0]!r} for {method.name} "
                f"(allowed: {', '.join(a for a in allowed if not a.endswith('_')) or 'none'})"
            )
        for i in expert_idx:
            entry = recipe.models[i]
            bad = [k for k in entry.parameters if k not in mkeys]
            if bad:
                kind = (
                    "a global parameter: set it under top-level `parameters`"
                    if bad[0] in gkeys
                    else (
                        f"not a parameter of {method.name} "
                        f"(per-model: {', '.join(sorted(k for k in mkeys if not k.endswith('_'))) or 'none'})"
                    )
                )
                raise ParameterError(f"model {entry.model}: parameter {bad[0]!r} is {kind}")
        self._gkeys = [k for k in recipe.parameters if k in gkeys]
        self._mkeys = mkeys
        self._cache: dict[Any, Any] = {}
        self._fill_global, self._fill_model = _mergekit_fill(recipe, method)
        self.warnings = parameter_warnings(
            method.name,
            recipe.defaults,
            recipe.parameters,
            [recipe.models[i].parameters for i in expert_idx],
        )
        self._check_bool_leaves(gkeys)

    def _check_bool_leaves(self, gkeys: set[str]) -> None:
        """Refuse a boolean anywhere in a numeric parameter's setting (a gradient's point, a
        condition's value), even where no tensor resolves to it: ``[0.5, true]`` is a recipe mistake."""
        settings = [("recipe", k, v) for k, v in self.recipe.parameters.items()]
        for i in self.expert_idx:
            entry = self.recipe.models[i]
            settings += [(f"model {entry.model}", k, v) for k, v in entry.parameters.items()]
        for where, key, setting in settings:
            for leaf in _bool_leaves(setting):
                model = self.method.params if key in gkeys else self.method.model_params
                try:
                    model.model_validate({key: leaf})
                except ValidationError as exc:
                    if any("boolean" in str(e["msg"]) for e in exc.errors()):
                        scope = "global" if model is self.method.params else "per-model"
                        raise _params_error(exc, self.method, scope, where) from None
            model = self.method.params if key in gkeys else self.method.model_params
            field = next((f for n, f in model.model_fields.items() if key in (n, f.alias)), None)
            for gradient in _text_gradients(setting):
                if field is not None and is_numeric_annotation(field.annotation):
                    raise ParameterError(
                        f"{where}: parameter {key!r} for {self.method.name}: gradient {gradient!r} holds text; a "
                        "gradient is interpolated between numbers only (text would be taken step by step): write "
                        "its points unquoted, e.g. [0.2, 0.8]"
                    )

    def resolve(self, tensor: str, t: float) -> tuple[MethodParams, tuple[MethodParams, ...]]:
        gvals = {k: resolve_setting(self.recipe.parameters[k], tensor, t) for k in self._gkeys}
        gvals = {k: v for k, v in gvals.items() if v is not None}
        for k, v in self._fill_global.items():  # `defaults: mergekit`
            gvals.setdefault(k, v)
        per_model = []
        for i in self.expert_idx:
            entry = self.recipe.models[i]
            vals: dict[str, Any] = {}
            for k in self._mkeys:
                if k in entry.parameters:
                    v = resolve_setting(entry.parameters[k], tensor, t)
                elif k in self.recipe.parameters:
                    v = resolve_setting(self.recipe.parameters[k], tensor, t)
                else:
                    v = None
                if v is not None:
                    vals[k] = v
            for k, v in self._fill_model.items():  # `defaults: mergekit`
                vals.setdefault(k, v)
            per_model.append(vals)
        key = (repr(sorted(gvals.items())), repr([sorted(d.items()) for d in per_model]))
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        where = f"tensor {tensor}" if tensor else "recipe"
        try:
            g = self.method.params.model_validate(gvals)
        except ValidationError as exc:
            raise _params_error(exc, self.method, "global", where) from None
        models = []
        for i, vals in zip(self.expert_idx, per_model):
            try:
                models.append(self.method.model_params.model_validate(vals))
            except ValidationError as exc:
                raise _params_error(
                    exc, self.method, "per-model", f"{where}, model {self.recipe.models[i].model}"
                ) from None
        result = (g, tuple(models))
        self._cache[key] = result
        return result


def _text_gradients(setting: Any) -> list[list[Any]]:
    """The gradients (lists of scalars) of a setting that hold a string, conditions' values included."""
    if isinstance(setting, dict) and "value" in setting and set(setting) <= {"filter", "value"}:
        return _text_gradients(setting["value"])
    if not isinstance(setting, list):
        return []
    if setting and all(isinstance(e, (bool, int, float, str)) for e in setting):
        return [setting] if any(isinstance(e, str) for e in setting) else []
    return [g for item in setting for g in _text_gradients(item)]


def _bool_leaves(setting: Any) -> list[bool]:
    """The booleans in a parameter setting: the scalar itself, a gradient's points, conditions' values."""
    if isinstance(setting, bool):
        return [setting]
    if isinstance(setting, dict) and "value" in setting and set(setting) <= {"filter", "value"}:
        return _bool_leaves(setting["value"])
    if isinstance(setting, list):
        return [b for item in setting for b in _bool_leaves(item)]
    return []


def _copy_checks(
    reference: CheckpointReader,
    name: str,
    meta: TensorMeta,
    inputs: Sequence[CheckpointReader],
    refs: Sequence[TensorRef],
    ref_id: str,
) -> tuple[TensorRef, ...]:
    """The inputs whose copy of the non-float tensor ``name`` must equal the reference's.

    Integer and bool tensors (position ids, masks, quantized weights) are copied, not merged.
    That is only right when every merged input holds the same tensor: a different dtype or
    shape is refused here; equal values are checked when the tensors are read (an input that
    lacks the tensor is not consulted).
    """
    out: list[TensorRef] = []
    for r, ref in zip(inputs, refs):
        other = r.tensors().get(ref.name)
        if other is None or ref == TensorRef(ref_id, name) or ref in out:
            continue
        if other.dtype != meta.dtype or other.shape != meta.shape:
            raise PlanError(
                f"{r.label}: tensor {name!r} is {_dt(other.dtype)} {list(other.shape)} but {reference.label} has "
                f"{_dt(meta.dtype)} {list(meta.shape)}; integer and bool tensors are copied, not merged, so every "
                "model must hold the same one: merge checkpoints of one format (dequantize quantized models first)"
            )
        out.append(ref)
    return tuple(out)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _tied_names(reference: CheckpointReader, names: Mapping[str, TensorMeta]) -> dict[str, str]:
    """Tensors that are the same matrix as another (tied weights): merged once, written once.

    Only in-memory models (state dicts, modules) report them, from shared storage. A checkpoint
    on disk never has a stored tensor dropped: when config.json ties the embeddings but the file
    stores ``lm_head.weight`` too, it is merged and written like any other tensor (transformers
    only ties a matrix the checkpoint leaves out, or holds with the same values).
    """
    aliases = getattr(reference, "aliases", None)
    if callable(aliases):
        return dict(aliases())
    return {}


def _ties_alike(reader: CheckpointReader, alias: str, canonical: str) -> bool:
    """Whether ``reader`` agrees that ``alias`` is ``canonical`` (it shares the storage, or lacks ``alias``).

    A tied base merged with an untied expert merges both matrices: merging the alias once would
    drop the expert's own head.
    """
    if alias not in reader.tensors():
        return True
    aliases = getattr(reader, "aliases", None)
    return callable(aliases) and aliases().get(alias) == canonical


def _tied_stand_in(reader: CheckpointReader, name: str, meta: TensorMeta) -> str | None:
    """The stored matrix that stands for ``name`` in a tied checkpoint that leaves ``name`` out.

    A tied model saved by transformers stores its input embedding only; its output head (and
    T5's per-stack embeddings) is that matrix. Returns the embedding's name when ``name`` is a
    vocabulary matrix, ``reader``'s config ties the embeddings (:func:`tie_word_embeddings`) and
    exactly one stored embedding has ``name``'s shape; otherwise None.
    """
    if not _VOCAB_NAMES.search(name) and not name.endswith(_EMBED_SUFFIXES):
        return None
    stored = reader.tensors()
    candidates = [n for n, m in stored.items() if n.endswith(_EMBED_SUFFIXES) and m.shape == meta.shape]
    if len(candidates) != 1 or tie_word_embeddings(reader.config()) is not True:
        return None
    return candidates[0]


_HEAD_NAMES = ("lm_head.weight", "cls.predictions.decoder.weight", "embed_out.weight")
_HEAD_ARCHS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForMaskedLM")


def _missing_head_warning(reader: CheckpointReader, names: Mapping[str, TensorMeta]) -> str | None:
    """A warning when transformers would initialise ``reader``'s output head at random.

    A model class with a language-model head whose checkpoint stores no head matrix is whole only
    when its embeddings are tied; when config.json does not say so and the architecture's default
    is untied (Llama, Mistral, Qwen2), transformers loads the head at random, from the inputs and
    from the merged copy alike.
    """
    cfg = reader.config()
    archs = cfg.get("architectures") if cfg else None
    if not isinstance(archs, list) or not any(isinstance(a, str) and a.endswith(_HEAD_ARCHS) for a in archs):
        return None
    if any(n.endswith(_HEAD_NAMES) for n in names) or not any(n.endswith(_EMBED_SUFFIXES) for n in names):
        return None
    if tie_word_embeddings(cfg) is not False:
        return None
    return (
        f"{reader.label}: stores no output head (lm_head.weight) and its config.json does not tie the embeddings "
        "(tie_word_embeddings unset or false), so transformers will initialise the head at random; if the model is "
        "tied, set tie_word_embeddings: true in its config.json"
    )


def _open_input(ref: str, recipe: Recipe, get: Callable[[str], CheckpointReader]) -> CheckpointReader:
    """Open a model reference of ``recipe``; a PEFT adapter is read over the recipe's base (``get``
    opens it once), its recorded base checked unless ``allow_adapter_base_mismatch``."""
    base_ref = recipe.base_model
    base = (lambda: get(base_ref)) if base_ref is not None and base_ref != ref else None
    return open_checkpoint(ref, base=base, allow_base_mismatch=recipe.allow_adapter_base_mismatch)


def build_plan(
    recipe: Recipe,
    *,
    readers: Mapping[str, CheckpointReader] | None = None,
    out_dtype: torch.dtype | None = None,
) -> Plan:
    """Validate ``recipe`` against its inputs' headers and return the per-tensor plan.

    ``readers`` maps a model reference to an already-open reader (used by the in-memory API);
    other references are opened with :func:`open_checkpoint`.
    """
    method = get_method(recipe.merge_method)
    if recipe.slices is not None:
        return _as_adapter(_build_slices(recipe, method, readers, out_dtype), recipe, readers)
    base_ref, expert_idx = _split_inputs(recipe, method)
    n_exp = len(expert_idx)
    if n_exp < method.min_experts:
        raise RecipeError(
            f"merge_method {method.name} needs at least {method.min_experts} model(s) besides the base, got {n_exp}"
        )
    if method.max_experts is not None and n_exp > method.max_experts:
        raise RecipeError(
            f"merge_method {method.name} takes at most {method.max_experts} model(s) besides the base, got {n_exp}"
        )
    resolver = _ParamResolver(recipe, method, expert_idx)
    global_params, global_model_params = resolver.resolve("", 0.0)

    opened: dict[str, CheckpointReader] = dict(readers or {})

    def get(ref: str) -> CheckpointReader:
        if ref not in opened:
            opened[ref] = _open_input(ref, recipe, get)
        return opened[ref]

    try:
        base = get(base_ref) if base_ref is not None and method.base != "ignored" else None
        experts = [get(recipe.models[i].model) for i in expert_idx]
        reference = base if base is not None else (get(base_ref) if base_ref is not None else experts[0])
        plan = _plan_tensors(
            recipe, method, resolver, base, experts, reference, out_dtype, global_params, global_model_params
        )
        plan.graph.warnings[:0] = resolver.warnings  # parameter warnings first
    except BaseException:
        for r in opened.values():
            if not readers or r not in readers.values():
                r.close()
        raise
    return _as_adapter(plan, recipe, readers)


def _as_adapter(plan: Plan, recipe: Recipe, readers: Mapping[str, CheckpointReader] | None) -> Plan:
    """``output: adapter``: the graph re-targeted to a PEFT adapter (:func:`mergelab.lora.sink.adapter_graph`)."""
    if recipe.output != "adapter":
        return plan
    from mergelab.lora.sink import AdapterSettings, adapter_graph

    try:
        plan.graph = adapter_graph(plan.graph, recipe.adapter or AdapterSettings(), base_label=recipe.base_model)
    except BaseException:
        for r in plan.graph.sources.values():
            if not readers or r not in readers.values():
                r.close()
        raise
    return plan


def _plan_tensors(
    recipe: Recipe,
    method: MergeMethod,
    resolver: _ParamResolver,
    base: CheckpointReader | None,
    experts: list[CheckpointReader],
    reference: CheckpointReader,
    out_dtype: torch.dtype | None,
    global_params: MethodParams,
    global_model_params: tuple[MethodParams, ...],
) -> Plan:
    names: NameMap = IDENTITY
    sources: dict[str, CheckpointReader] = {}

    def source_id(r: CheckpointReader, want: str) -> str:
        for k, v in sources.items():
            if v is r:
                return k
        sources[want] = r
        return want

    base_id = source_id(base, "base") if base is not None else None
    expert_ids = tuple(source_id(r, f"expert{i}") for i, r in enumerate(experts))
    ref_id = source_id(reference, "reference")
    merged_ids = ([base_id] if base_id is not None else []) + list(expert_ids)
    routed = method.outputs == "routed"
    artifacts = {MODEL: Artifact(MODEL, "hf_checkpoint")}
    if routed:
        from mergelab.routed.format import FOLDER

        artifacts[MASKS] = Artifact(MASKS, "masks", FOLDER)

    ref_names = reference.tensors()
    if not ref_names:
        raise PlanError(f"{reference.label}: the checkpoint holds no tensors")
    out_dtype = out_dtype or recipe.output_dtype
    merged_inputs = ([base] if base is not None else []) + experts
    tied = _tied_names(reference, ref_names)
    tied = {a: c for a, c in tied.items() if all(_ties_alike(r, a, c) for r in merged_inputs)}
    num_layers = num_layers_from(reference.config(), list(ref_names))
    warnings: list[str] = []
    head = _missing_head_warning(reference, ref_names)
    if head is not None:
        warnings.append(head)

    for r in merged_inputs:
        extra = [n for n in r.tensors() if n not in ref_names]
        if extra:
            raise PlanError(
                f"{r.label}: tensor {extra[0]!r} (and {len(extra) - 1} more) is not in {reference.label}; "
                "the models do not share an architecture, or an expert carries an extra head: remove it or merge "
                "compatible checkpoints"
            )

    input_refs = ([recipe.base_model or ""] if base is not None else []) + [
        recipe.models[i].model for i in resolver.expert_idx
    ]
    out_tok = _plan_tokenizer(recipe, method, merged_inputs, input_refs, base is not None, reference, ref_names)
    if out_tok is not None:
        warnings.extend(out_tok.warnings)

    jobs: list[Job] = []
    for name in sorted(ref_names, key=natural_order_key):
        meta = ref_names[name]
        if name in tied:
            continue
        layer = layer_index(name)
        if out_tok is not None and not out_tok.identity and _is_vocab_tensor(name, meta) and _is_float(meta.dtype):
            jobs.append(
                _vocab_job(name, meta, merged_inputs, merged_ids, names, out_tok, resolver, out_dtype, routed, base)
            )
            continue
        if not _is_float(meta.dtype):
            in_refs = [names.ref(s, name) for s in merged_ids]
            op = Copy(layer, _copy_checks(reference, name, meta, merged_inputs, in_refs, ref_id))
            jobs.append(Job((TensorRef(ref_id, name),), op, (OutRef(MODEL, name, meta.shape, meta.dtype),)))
            continue
        rows: int | None = None
        refs = [names.ref(s, name) for s in merged_ids]
        for k, (r, ref) in enumerate(zip(merged_inputs, list(refs))):
            other = r.tensors().get(ref.name)
            stand_in = _tied_stand_in(r, ref.name, meta) if other is None else None
            if stand_in is not None:  # a tied input: its embedding is this matrix
                refs[k] = TensorRef(ref.source, stand_in)
                other = r.tensors()[stand_in]
            if other is None:
                raise PlanError(
                    f"{r.label}: missing tensor {name!r} that {reference.label} has; the models do not share an "
                    "architecture (or the checkpoint is incomplete: re-download it)"
                )
            if not _is_float(other.dtype):
                raise PlanError(
                    f"{r.label}: tensor {name!r} is {_dt(other.dtype)} but {reference.label} has {_dt(meta.dtype)}; a "
                    "tensor must be floating point in every model or in none: merge checkpoints of one format "
                    "(dequantize quantized models first)"
                )
            if other.shape != meta.shape:
                vocab = (
                    _VOCAB_NAMES.search(name)
                    and len(other.shape) == len(meta.shape)
                    and other.shape[1:] == meta.shape[1:]
                )
                if vocab and recipe.vocab_mismatch == "truncate" and other.shape[0] >= meta.shape[0]:
                    rows = meta.shape[0]
                    warnings.append(f"{name}: {r.label} has {other.shape[0]} vocabulary rows, truncated to {rows}")
                    continue
                if vocab:
                    raise PlanError(
                        f"{r.label}: vocabulary size {other.shape[0]} in {name!r} differs from {meta.shape[0]} in "
                        f"{reference.label}; merge models with the same tokenizer, set `tokenizer_source: union` "
                        "(or base) to align the vocabularies by token, or `vocab_mismatch: truncate` to keep the "
                        "base's rows"
                    )
                raise PlanError(
                    f"{r.label}: tensor {name!r} has shape {list(other.shape)} but {reference.label} has "
                    f"{list(meta.shape)}; the models do not share an architecture"
                )
        t = 0.0
        if layer is not None and num_layers:
            t = 1.0 if num_layers <= 1 else layer / (num_layers - 1)
        params, model_params = resolver.resolve(name, t)
        outputs: tuple[OutRef, ...] = (OutRef(MODEL, name, meta.shape, out_dtype or meta.dtype),)
        if routed:
            outputs += (OutRef(MASKS, name, meta.shape, torch.bool),)
        jobs.append(Job(tuple(refs), MethodCall(params, model_params, layer, rows, base=base is not None), outputs))
    graph = Graph(
        sources=sources,
        artifacts=artifacts,
        jobs=jobs,
        method=method,
        global_params=global_params,
        base=base_id,
        experts=expert_ids,
        reference=ref_id,
        num_layers=num_layers,
        tied=tied,
        warnings=warnings,
        names=names,
    )
    return Plan(recipe=recipe, graph=graph, global_model_params=global_model_params, tokenizer=out_tok)


def _is_vocab_tensor(name: str, meta: TensorMeta) -> bool:
    return bool(_VOCAB_NAMES.search(name)) and layer_index(name) is None and len(meta.shape) == 2


def _plan_tokenizer(
    recipe: Recipe,
    method: MergeMethod,
    inputs: Sequence[CheckpointReader],
    refs: Sequence[str],
    has_base: bool,
    reference: CheckpointReader,
    ref_names: Mapping[str, TensorMeta],
) -> Any:
    """The output tokenizer and row maps (``tokenizer_source`` / ``tokenizer:``), checked before any tensor is read."""
    from mergelab.tokenizer import plan_chat_template_only, plan_vocabulary

    if recipe.tokenizer_source is None and recipe.tokenizer is None:
        return plan_chat_template_only(recipe, list(zip(refs, inputs)), reference)

    vocab_names = [n for n, m in ref_names.items() if _is_vocab_tensor(n, m) and _is_float(m.dtype)]
    embed_rows: dict[int, int] = {}
    for pos, r in enumerate(inputs):
        metas = r.tensors()
        rows = [metas[n].shape[0] for n in vocab_names if n in metas]
        if rows:
            embed_rows[pos] = min(rows)
    out = plan_vocabulary(recipe, list(zip(refs, inputs)), 0 if has_base else None, reference, embed_rows)
    if out is not None and not out.identity and method.statistics is not None:
        raise PlanError(
            f"merge_method {method.name}: its statistics are computed on each expert's own vocabulary, so "
            f"tokenizer_source {out.source} cannot reorder the embeddings; merge models with the same tokenizer"
        )
    return out


def _vocab_job(
    name: str,
    meta: TensorMeta,
    inputs: Sequence[CheckpointReader],
    ids: Sequence[str],
    names: NameMap,
    out_tok: Any,
    resolver: _ParamResolver,
    out_dtype: torch.dtype | None,
    routed: bool,
    base: CheckpointReader | None,
) -> Job:
    """A vocabulary tensor whose inputs are gathered into the output tokenizer's order (:class:`VocabAlign`)."""
    refs = tuple(names.ref(s, name) for s in ids)
    for pos, (r, ref) in enumerate(zip(inputs, refs)):
        other = r.tensors().get(ref.name)
        if other is None:
            raise PlanError(f"{r.label}: missing tensor {name!r} that the other models have")
        if len(other.shape) != 2 or other.shape[1:] != meta.shape[1:]:
            raise PlanError(
                f"{r.label}: tensor {name!r} has shape {list(other.shape)} but the base has {list(meta.shape)}; "
                "the models do not share an architecture"
            )
        top = int(out_tok.index[pos].max()) if out_tok.index[pos].numel() else -1
        top = max(top, int(out_tok.fill_src[pos].max()) if out_tok.fill_src[pos].numel() else -1)
        if top >= other.shape[0]:
            raise PlanError(
                f"{r.label}: its tokenizer has token id {top} but {name!r} has only {other.shape[0]} rows; "
                "the tokenizer does not fit the embeddings: set vocab_size in its config.json or fix its tokenizer"
            )
    shape = (out_tok.rows, *meta.shape[1:])
    align = VocabAlign(
        rows=out_tok.rows,
        vocab=len(out_tok.vocab),
        index=tuple(out_tok.index),
        fill_rows=out_tok.fill_rows,
        fill_src=tuple(out_tok.fill_src),
    )
    params, model_params = resolver.resolve(name, 0.0)
    outputs: tuple[OutRef, ...] = (OutRef(MODEL, name, shape, out_dtype or meta.dtype),)
    if routed:
        outputs += (OutRef(MASKS, name, shape, torch.bool),)
    return Job(refs, MethodCall(params, model_params, None, None, base=base is not None, vocab=align), outputs)


# --- slices: layer stacking ---------------------------------------------------------------


@dataclass
class _LayerTable:
    """One checkpoint's tensors split into its blocks (index -> suffix -> name) and the rest."""

    prefix: str | None
    layers: dict[int, dict[str, str]]
    other: list[str]


def _layer_table(r: CheckpointReader) -> _LayerTable:
    prefixes: set[str] = set()
    layers: dict[int, dict[str, str]] = {}
    other: list[str] = []
    for name in r.tensors():
        split = layer_split(name)
        if split is None:
            other.append(name)
            continue
        prefix, idx, suffix = split
        prefixes.add(prefix)
        layers.setdefault(idx, {})[suffix] = name
    if len(prefixes) > 1:
        shown = ", ".join(sorted(prefixes)[:3])
        raise PlanError(
            f"{r.label}: numbered layers under several prefixes ({shown}); slices stack one sequence of "
            "layers: merge this model with a `models:` list"
        )
    return _LayerTable(next(iter(prefixes)) if prefixes else None, layers, other)


@dataclass
class _SlicePlan:
    """One slice resolved: its readers (base first, then the others), their source ids, its resolver."""

    definition: SliceDef
    readers: list[CheckpointReader]
    ids: list[str]
    starts: list[int]
    has_base: bool
    resolver: _ParamResolver
    global_params: MethodParams
    model_params: tuple[MethodParams, ...]


def _build_slices(
    recipe: Recipe,
    method: MergeMethod,
    readers: Mapping[str, CheckpointReader] | None,
    out_dtype: torch.dtype | None,
) -> Plan:
    """Plan a ``slices:`` recipe: a single slice taking every model whole is the ``models:`` form;
    anything else (several slices, partial ranges) is planned layer by layer (:func:`_plan_slices`)."""
    assert recipe.slices is not None
    if method.statistics is not None or method.outputs == "routed":
        what = "collects per-model statistics" if method.statistics is not None else "writes per-model parts"
        raise RecipeError(
            f"merge_method {method.name} {what}, which slices of different models cannot give: use a `models:` list"
        )
    given = dict(readers or {})
    opened: dict[str, CheckpointReader] = dict(given)

    def get(ref: str) -> CheckpointReader:
        if ref not in opened:
            opened[ref] = _open_input(ref, recipe, get)
        return opened[ref]

    try:
        depths: dict[str, int] = {}
        for k, sl in enumerate(recipe.slices):
            for src in sl.sources:
                r = get(src.model)
                if src.model not in depths:
                    n = num_layers_from(r.config(), list(r.tensors()))
                    if not n:
                        raise PlanError(
                            f"{r.label}: no numbered layers (config.json has no layer count and no tensor is in "
                            "a block): slices need a layered model; use a `models:` list"
                        )
                    depths[src.model] = n
                start, end = src.layer_range
                if end > depths[src.model]:
                    raise PlanError(
                        f"slices[{k}]: layer_range [{start}, {end}] of {r.label} is out of range: the model has "
                        f"{depths[src.model]} layers (use an end <= {depths[src.model]})"
                    )
        whole = models_from_slices(recipe)
        if whole is not None and all(tuple(s.layer_range) == (0, depths[s.model]) for s in recipe.slices[0].sources):
            return build_plan(whole, readers=opened, out_dtype=out_dtype)
        return _plan_slices(recipe, method, get, out_dtype)
    except BaseException:
        for ref, r in opened.items():
            if ref not in given:
                r.close()
        raise


def _resolve_slice(recipe: Recipe, method: MergeMethod, k: int, sl: SliceDef) -> tuple[list[int], bool, _ParamResolver]:
    """Order (base first) and resolver of slice ``k``; the slice's rules are mergekit's: its base is
    its own ``base_model`` or the recipe's and must be one of its sources (unless the method ignores it)."""
    models = [s.model for s in sl.sources]
    base_ref = None if method.base == "ignored" else (sl.base_model or recipe.base_model)
    if base_ref is not None and base_ref not in models:
        raise RecipeError(
            f"slices[{k}]: base_model {base_ref} is not one of the slice's sources; add it to `sources` with a "
            "layer_range of the same length, or set the slice's own base_model"
        )
    if method.base == "required" and base_ref is None:
        raise RecipeError(
            f"slices[{k}]: merge_method {method.name} needs a base_model (set it for the recipe or the slice, "
            "and list it among the slice's sources)"
        )
    base_pos = models.index(base_ref) if base_ref is not None else None
    experts = [i for i in range(len(models)) if i != base_pos]
    n_exp = len(experts)
    if n_exp < method.min_experts or (method.max_experts is not None and n_exp > method.max_experts):
        want = (
            f"exactly {method.min_experts}"
            if method.max_experts == method.min_experts
            else f"at least {method.min_experts}"
            if n_exp < method.min_experts
            else f"at most {method.max_experts}"
        )
        raise RecipeError(
            f"slices[{k}]: merge_method {method.name} takes {want} model(s) per slice besides the base, got {n_exp}"
        )
    sub = recipe.model_copy(
        update={
            "models": [ModelEntry(model=s.model, parameters=s.parameters or {}) for s in sl.sources],
            "slices": None,
            "base_model": base_ref,
            "parameters": {**recipe.parameters, **(sl.parameters or {})},
        }
    )
    order = ([base_pos] if base_pos is not None else []) + experts
    return order, base_pos is not None, _ParamResolver(sub, method, experts)


def _plan_slices(
    recipe: Recipe, method: MergeMethod, get: Callable[[str], CheckpointReader], out_dtype: torch.dtype | None
) -> Plan:
    """One job per output tensor of a layer-stacked model.

    Output layer j of slice k is layer ``start + j`` of each of the slice's sources, merged with
    the slice's parameters at depth t = j / (length - 1) (1 for a one-layer slice), and numbered
    on from the previous slices' layers. Tensors outside the blocks come from the first slice's
    sources (embeddings and everything module order puts before the blocks) or the last slice's
    (final norm, heads), at depth 0, as mergekit 0.1.5 does. The output config's layer count is
    set to the total.
    """
    assert recipe.slices is not None
    out_dtype = out_dtype or recipe.output_dtype
    sources: dict[str, CheckpointReader] = {}

    def source_id(r: CheckpointReader, want: str) -> str:
        for sid, v in sources.items():
            if v is r:
                return sid
        sources[want] = r
        return want

    base_reader = get(recipe.base_model) if recipe.base_model is not None else None
    resolved = [_resolve_slice(recipe, method, k, sl) for k, sl in enumerate(recipe.slices)]
    if base_reader is not None and any(
        has_base and get(sl.sources[order[0]].model) is base_reader
        for sl, (order, has_base, _) in zip(recipe.slices, resolved)
    ):
        source_id(base_reader, "base")  # the recipe's base is a base of some slice: source "base"
    slices: list[_SlicePlan] = []
    for k, (sl, (order, has_base, resolver)) in enumerate(zip(recipe.slices, resolved)):
        g, mp = resolver.resolve("", 0.0)
        if method.passes(g):
            raise RecipeError(
                f"slices[{k}]: merge_method {method.name} with these parameters gathers statistics over the whole "
                "model (e.g. scope: global), which is not defined across slices of different models; use per-tensor "
                "settings or a `models:` list"
            )
        rs = [get(sl.sources[i].model) for i in order]
        ids = [source_id(r, f"expert{len(sources)}") for r in rs]
        starts = [sl.sources[i].layer_range[0] for i in order]
        slices.append(_SlicePlan(sl, rs, ids, starts, has_base, resolver, g, mp))
    reference = base_reader if base_reader is not None else slices[0].readers[0]
    ref_id = source_id(reference, "reference")
    tables: dict[int, _LayerTable] = {}

    def table(r: CheckpointReader) -> _LayerTable:
        if id(r) not in tables:
            tables[id(r)] = _layer_table(r)
        return tables[id(r)]

    ref_table = table(reference)
    prefix = ref_table.prefix
    for sp in slices:
        for r in sp.readers:
            if table(r).prefix != prefix:
                raise PlanError(
                    f"{r.label}: its layers are named {table(r).prefix}N but {reference.label}'s {prefix}N; "
                    "slices stack models of one architecture"
                )
    assert prefix is not None  # every source has layers (checked with the depths)
    ref_names = reference.tensors()
    tied = _tied_names(reference, ref_names)
    maps: dict[str, dict[str, str]] = {}
    planned: list[tuple[str, _SlicePlan, int | None, float]] = []  # output name, slice, layer, depth t
    copies: list[Job] = []

    out_layer = 0
    layer_sources: list[int] = []  # per output layer: the block of its slice's first source
    for sp in slices:
        length = sp.definition.length
        for off in range(length):
            t = off / (length - 1) if length > 1 else 1.0
            lead = table(sp.readers[0]).layers.get(sp.starts[0] + off, {})
            if not lead:
                raise PlanError(
                    f"{sp.readers[0].label}: no tensor of layer {sp.starts[0] + off} ({prefix}{sp.starts[0] + off}.*) "
                    "although its config counts it; the checkpoint is incomplete: re-download it"
                )
            for r, start in zip(sp.readers, sp.starts):
                have = table(r).layers.get(start + off, {})
                if set(have) != set(lead):
                    odd = sorted(set(have) ^ set(lead))[0]
                    raise PlanError(
                        f"{r.label}: layer {start + off} {'has' if odd in have else 'lacks'} tensor {prefix}N{odd} "
                        f"unlike layer {sp.starts[0] + off} of {sp.readers[0].label}; the models do not share an "
                        "architecture"
                    )
            for suffix in sorted(lead):
                out_name = f"{prefix}{out_layer}{suffix}"
                for r, sid, start in zip(sp.readers, sp.ids, sp.starts):
                    maps.setdefault(sid, {})[out_name] = table(r).layers[start + off][suffix]
                planned.append((out_name, sp, out_layer, t))
            layer_sources.append(sp.starts[0] + off)
            out_layer += 1
    for name in ref_table.other:
        meta = ref_names[name]
        if name in tied:
            continue
        if not _is_float(meta.dtype):  # buffers (position ids): copied from the reference, as for `models:`
            copies.append(Job((TensorRef(ref_id, name),), Copy(None), (OutRef(MODEL, name, meta.shape, meta.dtype),)))
            continue
        sp = slices[0] if natural_order_key(name)[0] == 0 else slices[-1]
        for r, sid in zip(sp.readers, sp.ids):
            if name not in r.tensors():
                raise PlanError(
                    f"{r.label}: missing tensor {name!r} that {reference.label} has; the models do not share an "
                    "architecture (or the checkpoint is incomplete: re-download it)"
                )
            maps.setdefault(sid, {})[name] = name
        planned.append((name, sp, None, 0.0))
    names = NameMap({sid: dict(m) for sid, m in maps.items()})

    jobs: list[Job] = list(copies)
    for out_name, sp, layer, t in planned:
        refs = tuple(names.ref(sid, out_name) for sid in sp.ids)
        metas = [r.tensors()[ref.name] for r, ref in zip(sp.readers, refs)]
        meta = metas[0]
        for r, ref, other in zip(sp.readers, refs, metas):
            if _is_float(other.dtype) != _is_float(meta.dtype):
                raise PlanError(f"{r.label}: tensor {ref.name!r} is {other.dtype} but {refs[0].name!r} is {meta.dtype}")
            if other.shape != meta.shape:
                raise PlanError(
                    f"{r.label}: tensor {ref.name!r} has shape {list(other.shape)} but {sp.readers[0].label}'s "
                    f"{refs[0].name!r} has {list(meta.shape)}; the models do not share an architecture"
                )
        if not _is_float(meta.dtype):
            jobs.append(Job(refs[:1], Copy(layer), (OutRef(MODEL, out_name, meta.shape, meta.dtype),)))
            continue
        params, model_params = sp.resolver.resolve(out_name, t)
        jobs.append(
            Job(
                refs,
                MethodCall(params, model_params, layer, None, base=sp.has_base),
                (OutRef(MODEL, out_name, meta.shape, out_dtype or meta.dtype),),
            )
        )
    jobs.sort(key=lambda j: natural_order_key(j.name))

    warnings: list[str] = []
    if any(sl.residual_weight is not None for sl in recipe.slices):
        warnings.append("slices: residual_weight is ignored (as by mergekit 0.1.5)")
    config_updates: dict[str, Any] = {}
    cfg = reference.config()
    key = layer_count_key(cfg)
    if key is not None and cfg is not None:
        config_updates[key] = out_layer
        holder = cfg.get("text_config") if key.startswith("text_config.") else cfg
        types = holder.get("layer_types") if isinstance(holder, dict) else None
        if isinstance(types, list) and all(0 <= i < len(types) for i in layer_sources):
            # per-layer attention kinds (sliding / full) must list every layer: each output layer
            # keeps its source layer's (read in the reference, whose layout the sources share)
            types_key = "text_config.layer_types" if key.startswith("text_config.") else "layer_types"
            config_updates[types_key] = [types[i] for i in layer_sources]
    elif cfg is not None:
        warnings.append(
            f"{reference.label}: config.json has no layer count ({', '.join(LAYER_COUNT_KEYS)}); set it to "
            f"{out_layer} in the output's config.json"
        )

    base_id = "base" if "base" in sources else None
    expert_ids: list[str] = []
    expert_params: dict[str, MethodParams] = {}
    for sp in slices:
        for n, sid in enumerate(sp.ids):
            if sid == base_id or sid in expert_ids:
                continue
            expert_ids.append(sid)
            pos = n - (1 if sp.has_base else 0)
            expert_params[sid] = sp.model_params[pos] if pos >= 0 else method.model_params.model_construct()
    graph = Graph(
        sources=sources,
        artifacts={MODEL: Artifact(MODEL, "hf_checkpoint")},
        jobs=jobs,
        method=method,
        global_params=slices[0].global_params,
        base=base_id,
        experts=tuple(expert_ids),
        reference=ref_id,
        num_layers=out_layer,
        tied=tied,
        warnings=warnings,
        names=names,
        config_updates=config_updates,
    )
    return Plan(recipe=recipe, graph=graph, global_model_params=tuple(expert_params[s] for s in expert_ids))


def describe_dtype(dtype: str | torch.dtype | None) -> str:
    dt = parse_dtype(dtype) if not isinstance(dtype, torch.dtype) else dtype
    return str(dt).removeprefix("torch.") if dt is not None else "as base"
