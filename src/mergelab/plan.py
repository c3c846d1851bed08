"""Plans: one job per output tensor, built from headers and index files alone.

Everything that can fail without reading tensor data fails here, before any heavy I/O:
unknown methods and parameters, out-of-range values (resolved per tensor, so a bad value in a
filter or gradient is caught too), missing tensors, shape and vocabulary mismatches, dtype
oddities. A user learns about a typo in a second, not after an hour.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from mergelab.checkpoint.reader import CheckpointReader, TensorMeta, open_checkpoint
from mergelab.errors import ParameterError, PlanError, RecipeError
from mergelab.ir import IDENTITY, MASKS, MODEL, Artifact, Copy, Graph, Job, MethodCall, NameMap, OutRef, TensorRef
from mergelab.methods.base import MergeMethod, MethodParams
from mergelab.methods.mergekit_defaults import mergekit_fill, parameter_warnings
from mergelab.methods.registry import get_method
from mergelab.recipe import Recipe, parse_dtype, resolve_setting

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


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _tied_names(reference: CheckpointReader, names: Mapping[str, TensorMeta]) -> dict[str, str]:
    """Tensors that are the same matrix as another (tied weights): merged once, written once.

    In-memory models report shared storage; checkpoints on disk are tied when config.json says
    ``tie_word_embeddings`` (or leaves transformers' default, true) and both ``lm_head.weight``
    and an input embedding of the same shape are stored.
    """
    aliases = getattr(reference, "aliases", None)
    if callable(aliases):
        return aliases()
    cfg = reference.config()
    if cfg is None:
        return {}
    tie = cfg.get("tie_word_embeddings")
    if tie is None and isinstance(cfg.get("text_config"), dict):
        tie = cfg["text_config"].get("tie_word_embeddings")
    if tie is False or "lm_head.weight" not in names:
        return {}
    for name in names:
        # tie_word_embeddings true (or unset, transformers' default): write the shared matrix once
        if (
            name.endswith(_EMBED_SUFFIXES)
            and names[name].shape == names["lm_head.weight"].shape
            and (tie is True or tie is None)
        ):
            return {"lm_head.weight": name}
    return {}


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
            opened[ref] = open_checkpoint(ref)
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
    num_layers = num_layers_from(reference.config(), list(ref_names))
    warnings: list[str] = []

    for r in merged_inputs:
        extra = [n for n in r.tensors() if n not in ref_names]
        if extra:
            raise PlanError(
                f"{r.label}: tensor {extra[0]!r} (and {len(extra) - 1} more) is not in {reference.label}; "
                "the models do not share an architecture, or an expert carries an extra head: remove it or merge "
                "compatible checkpoints"
            )

    jobs: list[Job] = []
    for name in sorted(ref_names, key=natural_order_key):
        meta = ref_names[name]
        if name in tied:
            continue
        layer = layer_index(name)
        if not _is_float(meta.dtype):
            jobs.append(Job((TensorRef(ref_id, name),), Copy(layer), (OutRef(MODEL, name, meta.shape, meta.dtype),)))
            continue
        rows: int | None = None
        refs = tuple(names.ref(s, name) for s in merged_ids)
        for r, ref in zip(merged_inputs, refs):
            other = r.tensors().get(ref.name)
            if other is None:
                raise PlanError(
                    f"{r.label}: missing tensor {name!r} that {reference.label} has; the models do not share an "
                    "architecture (or the checkpoint is incomplete: re-download it)"
                )
            if not _is_float(other.dtype):
                raise PlanError(f"{r.label}: tensor {name!r} is {other.dtype} but {reference.label} has {meta.dtype}")
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
                        f"{reference.label}; merge models with the same tokenizer, or set `vocab_mismatch: truncate` "
                        "to keep the base's rows"
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
        jobs.append(Job(refs, MethodCall(params, model_params, layer, rows, base=base is not None), outputs))
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
    return Plan(recipe=recipe, graph=graph, global_model_params=global_model_params)


def describe_dtype(dtype: str | torch.dtype | None) -> str:
    dt = parse_dtype(dtype) if not isinstance(dtype, torch.dtype) else dtype
    return str(dt).removeprefix("torch.") if dt is not None else "as base"
