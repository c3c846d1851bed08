"""Merges written as PEFT LoRA adapters: the recipe's ``adapter:`` settings, the planning step that
turns a dense merge graph into an adapter graph, and the ``peft_adapter`` sink.

**The ``svd`` rule (product space).** The graph is the dense merge's graph, unchanged but for its
artifact: every job still calls the recipe's method on the base and the experts, so the merged
tensor ``W`` is exactly what the dense merge computes (kept in float32). The sink then takes, per
LoRA module, ``ΔW = W − W0`` (the base's tensor, read by the sink) and factors it with a truncated
SVD (:func:`mergelab.lora.svd.truncated_svd`, float32 or float64) at rank ``r`` or by retained
energy; ``B = U_r·diag(S_r)``, ``A = Vh_r``, scaling 1. The method stays a pure tensor function;
the conversion to factors lives here, in the executor path. Every registered method works.

PEFT's ``add_weighted_adapter`` modes that work on products are special cases (their ΔWᵢ are the
adapters' ``scaling·Bᵢ·Aᵢ``, which mergelab's adapter inputs materialise as ``W0 + ΔWᵢ``):

=====================  ==========================================================================
PEFT ``combination``   mergelab recipe
=====================  ==========================================================================
``svd``                ``merge_method: task_arithmetic`` (weights = PEFT's ``weights``), ``combine: svd``
``ties_svd``           ``merge_method: ties`` (PEFT: per-tensor top-k, count-normalised disjoint mean)
``dare_linear_svd``    ``merge_method: dare_linear``
``dare_ties_svd``      ``merge_method: dare_ties``
``magnitude_prune_svd`` ``merge_method: magprune``-style sparsifier of the task-vector family
=====================  ==========================================================================

PEFT's rank defaults to the largest input rank and its SVD is ``full_matrices=True``; here the
rank is fixed or chosen per module by energy, the SVD is thin, and the relative Frobenius error of
every module is measured and reported (``adapter_report.json``, the console, the model card).
PEFT's optional ``svd_clamp`` (clamping U and Vh to a quantile) is not offered.

**What becomes a LoRA module.** By default every 2-D ``*.weight`` of the layers (``job.layer``
set: attention and MLP projections), GPT-2 ``Conv1D`` weights included (``fan_in_fan_out``);
``embeddings: true`` adds the embedding matrices (PEFT embedding LoRA); ``target_modules`` narrows
or names modules (an entry matches a module named exactly so or ending in ``.entry``). Every other
tensor that the merge changes (norms, biases, an untargeted head) is either kept (``non_lora:
modules_to_save``: full tensors of that module; biases of LoRA modules as PEFT ``lora_bias``
updates, which PEFT allows only when every adapted module is a linear layer with a bias: with
embedding LoRA those bias updates are dropped and reported) or dropped (``non_lora: drop``, the
default) and listed in the report. A tied input embedding (GPT-2's ``wte``) is never made an
embedding LoRA module (PEFT would leave the head unchanged, and ``merge_and_unload`` of a tied
pair applies an update twice): it is a non-LoRA tensor, kept whole together with the head.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergelab.errors import OptionError, OutputError, PlanError, RecipeError
from mergelab.ir import ADAPTER, MASKS, Artifact, Job, OutRef
from mergelab.lora.factors import LoraFactors
from mergelab.lora.peft_format import EMBEDDING_MODULES, PeftAdapterWriter, module_name, uses_conv1d
from mergelab.lora.svd import check_rank_energy, truncated_svd

__all__ = ["ADAPTER", "ADAPTER_RULES", "AdapterPlan", "AdapterSettings", "PeftAdapterSink", "adapter_graph"]

REPORT_FILE = "adapter_report.json"
"""Per-module ranks and reconstruction errors, written beside the adapter."""

TargetKind = Literal["linear", "conv1d", "embedding"]


_FACTOR_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


class AdapterSettings(BaseModel):
    """The recipe's ``adapter:`` block (with ``output: adapter``), or ``--adapter-out --rank/--energy``.

    ``combine``: the combination rule (``svd``: merge the dense updates with ``merge_method``, then
    a truncated SVD; other rules, working on adapter factors, register in :data:`ADAPTER_RULES`).
    ``rank`` (a whole number ≥ 1) or ``energy`` (in (0, 1]: per module, the smallest rank keeping
    that fraction of ‖ΔW‖²_F); ``svd_dtype`` float32 (default) or float64. ``target_modules``: module
    names or name endings to adapt (default: every 2-D weight of the layers); ``embeddings``: adapt
    the embedding matrices too. ``non_lora``: what happens to other tensors the merge changes
    (``drop``, reported, or ``modules_to_save``). ``dtype``: the factors' stored dtype (default: the
    merge's output dtype). ``parameters``: the rule's own parameters (e.g. a factor-space rule's
    weights or density), checked by that rule's planner.
    """

    model_config = ConfigDict(extra="forbid")

    combine: str = "svd"
    combine_parameters: dict[str, Any] | None = None  # a factor-space rule's parameters (mergelab.lora.combine_plan)
    rank: int | None = None
    energy: float | None = None
    svd_dtype: Literal["float32", "float64"] = "float32"
    target_modules: list[str] | None = None
    embeddings: bool = False
    non_lora: Literal["drop", "modules_to_save"] = "drop"
    dtype: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    """Parameters of the combination rule itself (factor-space rules; ``svd`` takes none)."""

    @field_validator("rank")
    @classmethod
    def _rank(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError(f"rank {v} must be a whole number ≥ 1 (e.g. 16)")
        return v

    @field_validator("energy")
    @classmethod
    def _energy(cls, v: float | None) -> float | None:
        if v is not None and not (0.0 < v <= 1.0):
            raise ValueError(f"energy {v} must lie in (0, 1] (e.g. 0.9)")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v not in _FACTOR_DTYPES:
            raise ValueError(f"dtype {v!r}: use one of {', '.join(_FACTOR_DTYPES)}")
        return v

    @property
    def factor_dtype(self) -> torch.dtype | None:
        """The factors' stored dtype (None: the merge's output dtype of each tensor)."""
        return _FACTOR_DTYPES[self.dtype] if self.dtype is not None else None

    @model_validator(mode="after")
    def _one_of(self) -> AdapterSettings:
        if self.rank is not None and self.energy is not None:
            raise ValueError("give either rank or energy, not both")
        return self

    @property
    def svd_torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.svd_dtype == "float64" else torch.float32


@dataclass(frozen=True)
class AdapterTarget:
    """One tensor that becomes a LoRA module: its module name and kind (``conv1d``: stored ``in × out``)."""

    tensor: str
    module: str
    kind: TargetKind

    @property
    def transposed(self) -> bool:
        return self.kind != "linear"


@dataclass
class AdapterPlan:
    """What the ``peft_adapter`` sink needs, decided at plan time (the artifact's ``settings``).

    ``targets``: tensor name -> :class:`AdapterTarget`; ``bias_of``: bias tensor name -> its LoRA
    module (biases that can be written as ``lora_bias`` updates); ``groups``: module -> its
    non-LoRA tensors (a ``modules_to_save`` module is written whole); ``base_label`` /
    ``base_config``: the adapter's ``base_model_name_or_path`` and the base's ``config.json``.
    """

    settings: AdapterSettings
    targets: dict[str, AdapterTarget]
    base_label: str | None
    base_config: dict[str, Any] | None
    bias_of: dict[str, str] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    lora_bias_ok: bool = False
    tied_head: dict[str, str] = field(default_factory=dict)
    module_prefix: str = ""
    out_dtypes: dict[str, torch.dtype] = field(default_factory=dict)


def _matches(module: str, entry: str) -> bool:
    return module == entry or module.endswith("." + entry)


def _is_embedding(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last in EMBEDDING_MODULES or "embed" in last


def select_targets(
    graph: Any, settings: AdapterSettings, base_config: Mapping[str, Any] | None
) -> dict[str, AdapterTarget]:
    """The tensors of ``graph`` that become LoRA modules (a one-line :class:`PlanError` for a bad target).

    Only merged (``MethodCall``) jobs qualify. A ``target_modules`` entry that names no module, or
    a module whose tensor is not a 2-D float weight (a norm, a bias), is refused.
    """
    conv1d = uses_conv1d(base_config)
    out: dict[str, AdapterTarget] = {}
    merged = {j.name: j for j in graph.merge_jobs}
    all_names = {j.name: j for j in graph.jobs}
    if settings.target_modules is not None:
        if not settings.target_modules:
            raise RecipeError(
                "adapter.target_modules is empty: list module names (e.g. q_proj, v_proj) or leave it out"
            )
        for entry in settings.target_modules:
            hits = [n for n in all_names if _matches(module_name(n), entry) or _matches(n, entry)]
            if not hits:
                raise PlanError(
                    f"adapter.target_modules: {entry!r} names no module of the base (modules are tensor names "
                    "without .weight, e.g. model.layers.0.self_attn.q_proj or q_proj)"
                )
            for n in hits:
                job = all_names[n]
                if not (n.endswith(".weight") and len(job.shape) == 2 and n in merged):
                    raise PlanError(
                        f"adapter.target_modules: {entry!r} matches tensor {n!r} of shape {list(job.shape)}, which is "
                        "not a 2-D float weight matrix; LoRA adapts matrices only (norms and biases go to "
                        "non_lora: modules_to_save)"
                    )
                mod = module_name(n)
                emb = _is_embedding(mod) and job.layer is None
                out[n] = AdapterTarget(n, mod, "embedding" if emb else "conv1d" if conv1d else "linear")
    else:
        for n, job in merged.items():
            if not n.endswith(".weight") or len(job.shape) != 2:
                continue
            mod = module_name(n)
            if job.layer is not None and not _is_embedding(mod):
                out[n] = AdapterTarget(n, mod, "conv1d" if conv1d else "linear")
    if settings.embeddings:
        for n, job in merged.items():
            mod = module_name(n)
            if n.endswith(".weight") and len(job.shape) == 2 and job.layer is None and _is_embedding(mod):
                out[n] = AdapterTarget(n, mod, "embedding")
    return out


AdapterRule = Callable[[Any, AdapterPlan], Any]
"""A combination rule's planner: (dense merge graph, adapter plan) -> the graph to run."""


def _svd_rule(graph: Any, plan: AdapterPlan) -> Any:
    """The ``svd`` rule: the dense merge's jobs, their outputs re-targeted to the adapter artifact.

    LoRA targets are produced in float32 (``ΔW = W − W0`` is taken from the unrounded merge);
    other tensors keep the dense merge's output dtype (what ``modules_to_save`` would store).
    """
    s = plan.settings
    if s.parameters:
        raise RecipeError(
            f"adapter.parameters: combine: svd takes no parameters of its own (got {', '.join(s.parameters)}); "
            "the method's parameters go under parameters: / models: as for a dense merge"
        )
    if s.rank is None and s.energy is None:
        raise RecipeError("output: adapter with combine: svd needs adapter.rank (e.g. 16) or adapter.energy (e.g. 0.9)")
    jobs = []
    for j in graph.jobs:
        o = j.outputs[0]
        plan.out_dtypes[o.name] = o.dtype
        dt = torch.float32 if o.name in plan.targets and o.dtype != torch.float64 else o.dtype
        jobs.append(Job(j.inputs, j.op, (OutRef(ADAPTER, o.name, o.shape, dt),)))
    return replace(graph, jobs=jobs, artifacts={ADAPTER: Artifact(ADAPTER, "peft_adapter", settings=plan)})


ADAPTER_RULES: dict[str, AdapterRule] = {"svd": _svd_rule}
"""``adapter.combine`` name -> its planner. Factor-space rules (cat, KnOTS, Core Space, PEFT legacy)
register here; each returns a graph whose ``peft_adapter`` sink is fed through
:meth:`PeftAdapterSink.add` (dense merged tensors) or :meth:`PeftAdapterSink.add_factors`."""


def adapter_graph(graph: Any, settings: AdapterSettings, base_label: str | None = None) -> Any:
    """Turn a dense merge graph into one that writes a PEFT adapter of its base (plan time, no tensor read).

    Refuses, in one line, what an adapter of the base cannot express: no base model, a routed
    method (per-task parts), layer stacking (``slices:``), vocabulary changes (``tokenizer_source``),
    or an output tensor whose shape differs from the base's.
    """
    if graph.base is None:
        if getattr(graph.method, "base", None) == "ignored":
            raise RecipeError(
                f"output: adapter needs a method that merges over the base_model; {graph.method.name} ignores it "
                "(use e.g. task_arithmetic, which with normalize: true is the same weighted average)"
            )
        raise RecipeError(
            "output: adapter needs a base_model (the adapter is an update of it); add base_model: to the recipe"
        )
    if MASKS in graph.artifacts:
        raise RecipeError(
            f"merge_method {graph.method.name} writes per-task parts (routed output), which a LoRA adapter cannot "
            "hold; use output: model"
        )
    if graph.config_updates or graph.names.maps:
        raise RecipeError("output: adapter cannot express layer stacking (slices: changing layers); use output: model")
    base = graph.sources[graph.base]
    base_meta = base.tensors()
    for j in graph.jobs:
        if j.vocab is not None or j.rows is not None:
            raise RecipeError(
                f"tensor {j.name!r}: output: adapter cannot change the vocabulary (tokenizer_source, vocab_mismatch: "
                "truncate); an adapter keeps the base's shapes"
            )
        m = base_meta.get(j.name)
        if m is None or tuple(m.shape) != tuple(j.shape):
            raise RecipeError(
                f"tensor {j.name!r}: the merged tensor has no counterpart of the same shape in the base "
                f"{base.label}; output: adapter needs the base's exact layout"
            )
    import mergelab.lora.combine_plan  # noqa: F401  (registers the factor-space rules)

    rule = ADAPTER_RULES.get(settings.combine)
    if rule is None:
        raise RecipeError(
            f"adapter.combine: unknown rule {settings.combine!r} (known: {', '.join(sorted(ADAPTER_RULES))})"
        )
    cfg = base.config()
    targets = select_targets(graph, settings, cfg)
    tied_head = _tied_heads(graph, cfg)
    for name in [n for n, t in targets.items() if t.kind == "embedding" and n in tied_head]:
        # PEFT applies embedding LoRA to the embedding only, and merge_and_unload of a tied pair applies a head
        # LoRA twice: a tied input embedding is handled as a non-LoRA tensor instead (non_lora)
        del targets[name]
        graph.warnings.append(
            f"adapter: {name} is tied to the output head, so it is not made an embedding LoRA module; as a changed "
            "non-LoRA tensor it is kept whole (non_lora: modules_to_save, with the head) or dropped"
        )
    modules = {t.module for t in targets.values()}
    bias_of = {f"{m}.bias": m for m in modules if f"{m}.bias" in base_meta}
    non_target = [j.name for j in graph.jobs if j.name not in targets and j.name not in bias_of]
    groups: dict[str, list[str]] = {}
    for n in non_target:
        groups.setdefault(module_name(n), []).append(n)
    plan = AdapterPlan(
        settings=settings,
        targets=targets,
        base_label=base_label or base.label,
        base_config=cfg,
        bias_of=bias_of,
        groups=groups,
        tied_head=tied_head,
        module_prefix=_module_prefix(cfg, [j.name for j in graph.jobs]),
        # PEFT's lora_bias is one switch for every LoRA module, refused for embeddings and useless without a
        # base bias: usable only when every adapted module is a linear layer with a bias
        lora_bias_ok=bool(modules)
        and all(t.kind != "embedding" and f"{t.module}.bias" in base_meta for t in targets.values()),
    )
    return rule(graph, plan)


def _module_prefix(cfg: Mapping[str, Any] | None, names: list[str]) -> str:
    """The prefix module names need in the model PEFT will wrap, when the checkpoint stores them without it.

    A headless checkpoint whose config names a head class (the original ``gpt2``: tensors ``h.0.*``,
    ``architectures: [GPT2LMHeadModel]``) is loaded by transformers into the head model, whose
    modules are ``transformer.h.0.*``: the adapter's keys must carry that prefix or PEFT would leave
    every factor at its initial value. Found from transformers' ``base_model_prefix`` (empty when
    transformers or the class is not available).
    """
    archs = (cfg or {}).get("architectures") or []
    if not isinstance(archs, list) or not archs:
        return ""
    arch = str(archs[0])
    if arch.endswith("Model") and not arch.endswith("LMHeadModel"):
        return ""  # the base model class itself: its modules are named as stored
    try:
        import transformers

        prefix = str(getattr(getattr(transformers, arch), "base_model_prefix", "") or "")
    except Exception:
        return ""
    if not prefix or any(n.startswith(prefix + ".") for n in names):
        return ""
    return prefix + "."


def _tied_heads(graph: Any, cfg: Mapping[str, Any] | None) -> dict[str, str]:
    """Input-embedding tensor -> the output head module tied to it (the head is then written along with it).

    From the planner's tied names (a stored head aliasing the embedding), else from the base's
    config: ``tie_word_embeddings`` (transformers' default: true) on a causal-LM architecture
    whose head transformers names ``lm_head`` and the checkpoint does not store.
    """
    out = {canon: module_name(alias) for alias, canon in graph.tied.items()}
    names = {j.name for j in graph.jobs}
    archs = (cfg or {}).get("architectures") or []
    lm = any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in archs if isinstance(archs, list))
    if cfg is not None and cfg.get("tie_word_embeddings", True) and lm and "lm_head.weight" not in names:
        for n in names:
            mod = module_name(n)
            if n.endswith(".weight") and mod.rsplit(".", 1)[-1] in (
                "embed_tokens",
                "wte",
                "word_embeddings",
                "embed_in",
            ):
                out.setdefault(n, "lm_head")
    return out


@dataclass
class ModuleReport:
    """One LoRA module of the written adapter."""

    module: str
    rank: int
    full_rank: int
    rel_error: float
    shape: tuple[int, int]
    kind: str


class PeftAdapterSink:
    """The ``peft_adapter`` sink: turns merged tensors (or factors) into one PEFT adapter in ``folder``.

    Fed by an executor: :meth:`add` takes each output tensor of the graph (the dense merge's
    result): LoRA targets are factored (``W − W0``, truncated SVD per module), biases of LoRA
    modules become ``lora_bias`` updates or are dropped, and other tensors the merge changed are
    kept whole (``modules_to_save``) or dropped, per ``non_lora``; unchanged ones are skipped.
    Factor-space rules call :meth:`add_factors` instead. :meth:`finish` writes
    ``adapter_model.safetensors``, ``adapter_config.json`` and ``adapter_report.json`` and
    returns the report; :meth:`abort` drops the scratch file. Memory: one module's tensors and SVD.
    """

    def __init__(self, folder: Path, graph: Any, artifact: str = ADAPTER) -> None:
        art = graph.artifacts[artifact]
        plan = art.settings
        if not isinstance(plan, AdapterPlan):
            raise OutputError(f"artifact {artifact!r} of kind peft_adapter has no adapter plan (an internal error)")
        self.folder = Path(folder) / art.folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.plan = plan
        self.graph = graph
        self.base = graph.sources[graph.base]
        self.writer = PeftAdapterWriter(
            self.folder,
            base_model_name_or_path=plan.base_label,
            base_config=plan.base_config,
            dtype=plan.settings.factor_dtype,
        )
        self.modules: list[ModuleReport] = []
        self.unchanged: list[str] = []
        self.zero_modules: list[str] = []
        self.dropped: list[str] = []
        self.saved: list[str] = []
        self.bias_updates: list[str] = []
        self.prefix = plan.module_prefix
        self._group_of = {n: m for m, names in plan.groups.items() for n in names}
        self._pending: dict[str, dict[str, tuple[torch.Tensor, bool]]] = {}
        self._dense_bytes = 0

    def _base_tensor(self, name: str) -> torch.Tensor:
        return self.base.read(self.graph.names.input_name(self.graph.base, name))

    # --- fed by executors -------------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """One merged output tensor (the dense merge's value for ``name``)."""
        plan = self.plan
        target = plan.targets.get(name)
        self._dense_bytes += tensor.numel() * plan.out_dtypes.get(name, tensor.dtype).itemsize
        if target is not None:
            s = plan.settings
            delta = tensor.to(s.svd_torch_dtype) - self._base_tensor(name).to(tensor.device, s.svd_torch_dtype)
            if target.transposed:
                delta = delta.T
            out_dtype = self.writer.dtype or plan.out_dtypes.get(name, tensor.dtype)
            res = truncated_svd(
                delta,
                rank=s.rank,
                energy=s.energy,
                svd_dtype=s.svd_torch_dtype,
                out_dtype=out_dtype,
                transposed=target.transposed,
            )
            if res.factors is None:
                self.zero_modules.append(self.prefix + target.module)
                return
            self.writer.add_lora(self.prefix + target.module, res.factors, embedding=target.kind == "embedding")
            self.modules.append(
                ModuleReport(
                    self.prefix + target.module,
                    res.rank,
                    res.full_rank,
                    res.rel_error,
                    (int(delta.shape[0]), int(delta.shape[1])),
                    target.kind,
                )
            )
            return
        out_dt = plan.out_dtypes.get(name, tensor.dtype)
        value = tensor.to(out_dt)
        base = self._base_tensor(name).to(tensor.device)
        changed = not torch.equal(value, base.to(out_dt))
        if name in plan.bias_of:
            if not changed:
                return
            if plan.settings.non_lora == "modules_to_save" and plan.lora_bias_ok:
                update = value.to(torch.float32) - base.to(torch.float32)
                self.writer.add_lora_bias(self.prefix + plan.bias_of[name], update)
                self.bias_updates.append(name)
            else:
                self.dropped.append(name)
            return
        group = self._group_of.get(name, module_name(name))
        pend = self._pending.setdefault(group, {})
        pend[name] = (value, changed)
        if len(pend) == len(plan.groups.get(group, [name])):
            self._flush(group)

    def add_factors(
        self, module: str, factors: LoraFactors, *, embedding: bool = False, rel_error: float = 0.0
    ) -> None:
        """One LoRA module's factors from a factor-space rule (``rel_error``: what the rule measured)."""
        self.writer.add_lora(module, factors, embedding=embedding)
        shape = (int(factors.B.shape[0]), int(factors.A.shape[1]))
        self.modules.append(
            ModuleReport(module, factors.rank, min(shape), rel_error, shape, "embedding" if embedding else "linear")
        )

    def add_saved(self, tensor_name: str, tensor: torch.Tensor) -> None:
        """A full tensor of a ``modules_to_save`` module from a factor-space rule."""
        self.writer.add_saved(tensor_name, tensor)
        self.saved.append(tensor_name)

    def _flush(self, group: str) -> None:
        pend = self._pending.pop(group)
        if not any(changed for _, changed in pend.values()):
            self.unchanged.extend(pend)
            return
        if self.plan.settings.non_lora == "modules_to_save":
            for n, (t, _) in pend.items():
                self.writer.add_saved(self.prefix + n, t)
                self.saved.append(n)
                head = self.plan.tied_head.get(n)
                if head is not None:  # the tied head is a copy of the embedding in PEFT: save it too
                    self.writer.add_saved(f"{head}.weight", t)
                    self.saved.append(f"{head}.weight")
        else:
            self.dropped.extend(n for n, (_, changed) in pend.items() if changed)

    # --- completion -------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Per-module ranks and errors, what was kept whole or dropped, sizes (``adapter_report.json``)."""
        errs = [m.rel_error for m in self.modules]
        s = self.plan.settings
        return {
            "combine": s.combine,
            "rank": s.rank,
            "energy": s.energy,
            "svd_dtype": s.svd_dtype,
            "lora_modules": len(self.modules),
            "max_rel_error": max(errs) if errs else 0.0,
            "mean_rel_error": (sum(errs) / len(errs)) if errs else 0.0,
            "ranks": {
                "min": min((m.rank for m in self.modules), default=0),
                "max": max((m.rank for m in self.modules), default=0),
            },
            "adapter_bytes": self.writer.nbytes,
            "dense_bytes": self._dense_bytes,
            "modules": {
                m.module: {
                    "rank": m.rank,
                    "full_rank": m.full_rank,
                    "rel_error": m.rel_error,
                    "shape": list(m.shape),
                    "kind": m.kind,
                }
                for m in self.modules
            },
            "zero_update_modules": self.zero_modules,
            "modules_to_save": self.saved,
            "lora_bias_updates": self.bias_updates,
            "dropped": self.dropped,
        }

    def finish(self) -> dict[str, Any]:
        """Write the adapter and its report; returns the report."""
        if self._pending:  # groups whose tensors did not all arrive (an executor bug)
            missing = ", ".join(sorted(self._pending))
            raise OutputError(f"the adapter sink did not receive every tensor of {missing} (an internal error)")
        combine = getattr(self.plan, "combine_factors", None)
        if combine is not None:  # a factor-space rule (mergelab.lora.combine_plan) adds its LoRA modules now
            combine(self)
        if not self.modules:
            raise OutputError(
                "the merge changes none of the adapter's target modules (every ΔW is zero); nothing to write as LoRA"
            )
        self.writer.finish()
        rep = self.report()
        (self.folder / REPORT_FILE).write_text(json.dumps(rep, indent=1) + "\n")
        return rep

    def abort(self) -> None:
        self.writer.abort()


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """A few lines for the console and the model card."""
    lines = [
        f"LoRA modules: {report['lora_modules']}, rank {report['ranks']['min']}–{report['ranks']['max']}"
        + (f" (energy {report['energy']})" if report.get("energy") is not None else ""),
        f"relative Frobenius error: max {report['max_rel_error']:.3g}, mean {report['mean_rel_error']:.3g}",
    ]
    dense = report.get("dense_bytes") or 0
    size = report.get("adapter_bytes") or 0
    if dense:
        lines.append(f"adapter size: {size / 1e6:.2f} MB ({100 * size / dense:.2f}% of the dense {dense / 1e6:.2f} MB)")
    if report.get("modules_to_save"):
        lines.append(f"kept whole (modules_to_save): {len(report['modules_to_save'])} tensor(s)")
    if report.get("lora_bias_updates"):
        lines.append(f"bias updates (lora_bias): {len(report['lora_bias_updates'])}")
    if report.get("dropped"):
        first = report["dropped"][0]
        more = f" and {len(report['dropped']) - 1} more" if len(report["dropped"]) > 1 else ""
        lines.append(
            f"dropped changed non-LoRA tensors: {first}{more} (non_lora: modules_to_save / --keep-non-lora keeps them)"
        )
    return lines


def check_adapter_options(rank: Any, energy: Any) -> None:
    """CLI/API ``--rank`` / ``--energy``: at most one, valid (one-line OptionError)."""
    if rank is not None and energy is not None:
        raise OptionError("give either --rank or --energy, not both")
    if rank is None and energy is None:
        return
    check_rank_energy(rank, energy, "--rank/--energy")


def with_adapter_output(recipe: Any, *, adapter_out: bool = False, rank: Any = None, energy: Any = None) -> Any:
    """``recipe`` with ``output: adapter`` and ``--rank`` / ``--energy`` folded into its ``adapter:`` block.

    ``rank`` / ``energy`` replace the block's own choice (giving one clears the other). Either
    without ``adapter_out`` on a recipe that writes a model is a one-line OptionError.
    """
    check_adapter_options(rank, energy)
    if not adapter_out and recipe.output != "adapter":
        raise OptionError(
            "--rank/--energy set the adapter's rank: add --adapter-out (or output: adapter in the recipe)"
        )
    data = (recipe.adapter or AdapterSettings()).model_dump()
    if rank is not None:
        data.update(rank=rank, energy=None)
    if energy is not None:
        data.update(energy=float(energy), rank=None)
    try:
        settings = AdapterSettings.model_validate(data)
    except ValueError as exc:
        raise OptionError(f"adapter settings: {exc}".splitlines()[0]) from None
    return recipe.model_copy(update={"output": "adapter", "adapter": settings})


def adapter_result(graph: Any, sinks: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """After the run: the adapter sink's report and its summary lines (for the API result, CLI and card)."""
    for name, art in graph.artifacts.items():
        if art.kind == "peft_adapter" and name in sinks:
            rep = sinks[name].report()
            return rep, summary_lines(rep)
    return {}, []
