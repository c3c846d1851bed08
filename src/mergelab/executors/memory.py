"""The memory executor: a merge session that keeps every input tensor resident and merges in
memory many times, for coefficient searches (λ sweeps, grid search).

:class:`MergeSession` reads every input tensor of a :class:`~mergelab.plan.Plan` once (in the
compute dtype, on the compute device), then :meth:`MergeSession.merge` runs any registered
method over the resident tensors with new parameters, resolved per tensor exactly as the
planner resolves them (filters, gradients), folds (gather passes) included. It returns what
:func:`mergelab.merge_state_dicts` returns for the same parameters, bit for bit.

Stage outputs a parameter change does not touch are cached: for a method with a scaled form
(``@method(scale=..., delta=...)``: ``fn == base + params.<scale> · delta``), the unscaled delta
of each tensor is kept per (tensor, parameters without the scale), so a sweep of the scale
computes thresholds, random masks and sign elections once and then costs one
``torch.add(base, delta, alpha=λ)`` per tensor. Fold results are cached the same way.

:func:`run_memory` is the executor-shaped entry point (plan, sink, options).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from mergelab.errors import InputDataError, InternalError, MergelabError, OptionError, ParameterError, RecipeError
from mergelab.executors.base import (
    ExecutorOptions,
    NoProgress,
    Progress,
    RunStats,
    cast_output,
    check_copy,
    resolve_device,
    thread_limit,
)
from mergelab.ir import MASKS, MODEL, Copy, MethodCall, TensorRef
from mergelab.methods.base import MethodOutput, MethodParams, TensorContext
from mergelab.plan import Plan, TensorJob, _ParamResolver, _split_inputs, build_plan
from mergelab.recipe import Recipe

Tensor = torch.Tensor

__all__ = ["MergeSession", "run_memory"]


def _all_finite(t: Tensor) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _scale_field(params_model: type[MethodParams], key: str) -> str:
    """The field of ``params_model`` named or aliased ``key`` (``lambda`` -> ``lambda_``)."""
    for name, f in params_model.model_fields.items():
        if key in (name, f.alias):
            return name
    raise RecipeError(f"scaled form: {params_model.__name__} has no parameter {key!r}")


def _key(params: MethodParams | None, model_params: Sequence[MethodParams], drop: str | None = None) -> str:
    """A hashable identity of resolved parameters (``drop``: a field left out, the scale)."""
    g = {} if params is None else {k: v for k, v in params.model_dump().items() if k != drop}
    return repr((sorted(g.items()), [sorted(m.model_dump().items()) for m in model_params]))


class MergeSession:
    """Resident inputs of one plan, merged in memory any number of times.

    ``recipe_or_plan``: a :class:`~mergelab.plan.Plan` (the session reads its inputs and does
    not close it), or a recipe (path, mapping or :class:`~mergelab.recipe.Recipe`), planned with
    :func:`mergelab.plan_merge` and closed once read. ``cache``: how many parameter sets' stage
    outputs to keep (the most recent ones).
    """

    def __init__(
        self,
        recipe_or_plan: Plan | Recipe | Mapping[str, Any] | str,
        device: str | torch.device = "cpu",
        compute_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        *,
        cache: int = 2,
        check_finite: bool = True,
    ) -> None:
        if isinstance(recipe_or_plan, Plan):
            plan, owned = recipe_or_plan, False
        else:
            from mergelab.api import plan_merge

            plan, owned = plan_merge(recipe_or_plan), True
        self.plan = plan
        self.method = plan.method
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype
        self.seed = seed
        self.check_finite = check_finite
        self._cache_size = max(0, cache)
        # a slices plan's models are per slice (its jobs carry their parameters): no per-expert overrides
        self._slices = plan.recipe.slices is not None
        self._base_ref, self._expert_idx = (None, []) if self._slices else _split_inputs(plan.recipe, plan.method)
        self._inputs: dict[str, tuple[Tensor | None, list[Tensor], list[dict[str, Tensor]]]] = {}
        self._copies: dict[str, Tensor] = {}
        self._deltas: dict[str, dict[str, Tensor]] = {}  # tensor -> parameter key -> unscaled delta
        self._folds: dict[str, dict[str, Any]] = {}  # parameter key -> fold results
        self._recent: list[str] = []
        try:
            self._read_all()
        finally:
            if owned:
                plan.close()

    @classmethod
    def from_state_dicts(
        cls,
        method: str,
        experts: Sequence[Mapping[str, Tensor]],
        base: Mapping[str, Tensor] | None = None,
        *,
        parameters: Mapping[str, Any] | None = None,
        model_parameters: Sequence[Mapping[str, Any]] | None = None,
        seed: int = 0,
        compute_dtype: torch.dtype = torch.float32,
        out_dtype: torch.dtype | None = None,
        device: str = "cpu",
    ) -> MergeSession:
        """A session over in-memory state dicts, planned as :func:`mergelab.merge_state_dicts` plans them."""
        from mergelab.checkpoint.reader import StateDictReader

        if not experts:
            raise RecipeError("a merge session needs at least one expert")
        if model_parameters is not None and len(model_parameters) != len(experts):
            raise RecipeError(f"model_parameters has {len(model_parameters)} entries for {len(experts)} experts")
        recipe = Recipe.model_validate(
            {
                "merge_method": method,
                "base_model": "<base>" if base is not None else None,
                "models": [
                    {"model": f"<expert {i}>", "parameters": dict(model_parameters[i]) if model_parameters else {}}
                    for i in range(len(experts))
                ],
                "parameters": dict(parameters or {}),
                "seed": seed,
            }
        )
        readers = {f"<expert {i}>": StateDictReader(e, f"<expert {i}>") for i, e in enumerate(experts)}
        if base is not None:
            readers["<base>"] = StateDictReader(base, "<base>")
        plan = build_plan(recipe, readers=readers, out_dtype=out_dtype)
        return cls(plan, device=device, compute_dtype=compute_dtype, seed=seed)

    # ------------------------------------------------------------------------------ reading

    def _read_all(self) -> None:
        plan = self.plan
        sources = plan.graph.sources
        for job in plan.jobs:
            if job.kind == "copy":
                ref = job.inputs[0]
                copied = self._copies[job.name] = sources[ref.source].read(ref.name)
                op = job.op
                assert isinstance(op, Copy)
                check_copy(plan.graph, job, op, copied, {v: sources[v.source].read(v.name) for v in op.verify})
                continue
            converted: dict[TensorRef, Tensor] = {}
            for ref in job.inputs:  # the job's inputs by (source, name in that source): base first when it has one
                if ref in converted:
                    continue
                r = sources[ref.source]
                t = r.read(ref.name)
                if job.rows is not None:
                    t = t[: job.rows]
                if self.check_finite and not _all_finite(t):
                    raise InputDataError(f"{r.label}: tensor {ref.name!r} contains NaN or Inf values")
                converted[ref] = t.to(device=self.device, dtype=self.compute_dtype)
            op = job.op
            has_base = isinstance(op, MethodCall) and op.base
            base = converted[job.inputs[0]] if has_base else None
            experts = [converted[ref] for ref in (job.inputs[1:] if has_base else job.inputs)]
            if job.vocab is not None:  # tokenizer_source: rows in the output vocabulary's order
                aligned = job.vocab.apply(([base] if base is not None else []) + experts)
                base, experts = (aligned[0], aligned[1:]) if base is not None else (None, aligned)
            aux: list[dict[str, Tensor]] = []
            if plan.aux is not None:
                for r, kinds in zip(plan.aux, plan.aux_keys(job)):
                    entry = {}
                    for kind, key in kinds.items():
                        a = r.read(key)
                        if (
                            job.rows is not None
                            and a.dim() == len(job.shape)
                            and a.shape[1:] == job.shape[1:]
                            and a.shape[0] > job.rows
                        ):
                            a = a[: job.rows]
                        entry[kind] = a.to(self.device)
                    aux.append(entry)
            self._inputs[job.name] = (base, experts, aux)

    # ------------------------------------------------------------------------------ resident inputs

    @property
    def experts(self) -> list[str]:
        """The experts' model references, in the order of ``merge``'s ``model_parameters``."""
        if self._slices:
            return []
        return [self.plan.recipe.models[i].model for i in self._expert_idx]

    @property
    def expert_indices(self) -> list[int]:
        """The experts' indices in the recipe's ``models`` list."""
        return list(self._expert_idx)

    def merged_names(self) -> list[str]:
        """The tensors a merge computes (the others are copied from one input)."""
        return [job.name for job in self.plan.jobs if job.kind == "merge"]

    def base_tensors(self) -> dict[str, Tensor]:
        """The resident base tensor of every merged tensor (compute dtype and device; not copies)."""
        out = {}
        for name in self.merged_names():
            base = self._inputs[name][0]
            if base is None:
                raise RecipeError(f"merge_method {self.method.name} reads no base model")
            out[name] = base
        return out

    def expert_tensors(self, index: int) -> dict[str, Tensor]:
        """Expert ``index``'s resident tensors of every merged tensor (the session's own; do not modify)."""
        return {name: self._inputs[name][1][index] for name in self.merged_names()}

    def replace_expert(self, index: int, tensors: Mapping[str, Tensor]) -> None:
        """Make ``tensors`` (every merged tensor, compute dtype) expert ``index``'s resident inputs from now
        on; cached stage outputs are dropped (population methods: Evolver)."""
        missing = [n for n in self.merged_names() if n not in tensors]
        if missing:
            raise InternalError(f"replace_expert: tensor {missing[0]!r} missing")
        for name in self.merged_names():
            base, experts, aux = self._inputs[name]
            experts = list(experts)
            experts[index] = tensors[name]
            self._inputs[name] = (base, experts, aux)
        self.clear()

    def assemble(self, merged: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """A full state dict (output dtypes, on the CPU, copies and tied names included, in the model's
        order) from one tensor per merged tensor, as :meth:`merge` returns it."""
        out: dict[str, Tensor] = {}
        for job in self.plan.jobs:
            if job.kind == "copy":
                out[job.name] = self._copies[job.name]
            else:
                out[job.name] = cast_output(merged[job.name], job.out_dtype, job.name).cpu()
        for alias, canonical in self.plan.tied.items():
            out[alias] = out[canonical]
        ordered = {k: out[k] for k in self.plan.reference.tensors() if k in out}
        ordered.update((k, v) for k, v in out.items() if k not in ordered)
        return ordered

    # ------------------------------------------------------------------------------ merging

    def _jobs(
        self,
        parameters: Mapping[str, Any] | None,
        model_parameters: Sequence[Mapping[str, Any]] | None,
    ) -> tuple[MethodParams, list[TensorJob]]:
        """The plan's jobs with parameters re-resolved for these overrides (the planner's resolver)."""
        if parameters is None and model_parameters is None:
            return self.plan.global_params, self.plan.jobs
        if self._slices:
            raise RecipeError(
                "a merge session over a `slices:` recipe merges with the recipe's parameters only: "
                "change them in the recipe's slices"
            )
        recipe = self.plan.recipe
        update: dict[str, Any] = {}
        if parameters is not None:
            update["parameters"] = {**recipe.parameters, **dict(parameters)}
        if model_parameters is not None:
            if len(model_parameters) != len(self._expert_idx):
                raise RecipeError(
                    f"model_parameters has {len(model_parameters)} entries for {len(self._expert_idx)} experts"
                )
            models = list(recipe.models)
            for i, mp in zip(self._expert_idx, model_parameters):
                models[i] = models[i].model_copy(update={"parameters": {**models[i].parameters, **dict(mp)}})
            update["models"] = models
        recipe = Recipe.model_validate(
            {
                **recipe.model_dump(),
                **{k: v if k != "models" else [m.model_dump() for m in v] for k, v in update.items()},
            }
        )
        resolver = _ParamResolver(recipe, self.method, self._expert_idx)
        global_params, _ = resolver.resolve("", 0.0)
        n_layers = self.plan.num_layers
        jobs = []
        for job in self.plan.jobs:
            if job.kind != "merge":
                jobs.append(job)
                continue
            t = 0.0
            if job.layer is not None and n_layers:
                t = 1.0 if n_layers <= 1 else job.layer / (n_layers - 1)
            params, model_params = resolver.resolve(job.name, t)
            op = job.op
            assert isinstance(op, MethodCall)  # job.kind == "merge"
            jobs.append(dataclasses.replace(job, op=dataclasses.replace(op, params=params, model_params=model_params)))
        return global_params, jobs

    def _context(self, job: TensorJob, stats: Mapping[str, Any], aux: Sequence[Mapping[str, Tensor]]) -> TensorContext:
        return TensorContext(
            name=job.name,
            seed=self.seed,
            layer=job.layer,
            num_layers=self.plan.num_layers,
            folds=stats,
            device=self.device,
            statistics=aux,
        )

    def _run_folds(self, global_params: MethodParams, jobs: Sequence[TensorJob], drop: str | None) -> dict[str, Any]:
        passes = self.method.passes(global_params)
        if not passes:
            return {}
        merge_jobs = [j for j in jobs if j.kind == "merge"]
        key = _key(global_params, (), drop) + "|" + "|".join(_key(j.params, j.model_params, drop) for j in merge_jobs)
        hit = self._folds.get(key)
        if hit is not None:
            return hit
        stats: dict[str, Any] = {}
        n = len(self.plan.experts)
        for fold in passes:
            state = fold.init(global_params, n)
            for job in merge_jobs:
                base, experts, aux = self._inputs[job.name]
                with torch.no_grad():
                    fold.update(state, base, experts, job.params, job.model_params, self._context(job, stats, aux))
            stats[fold.name] = fold.finish(state, global_params, n)
        self._folds = {key: stats}
        return stats

    def merge(
        self,
        parameters: Mapping[str, Any] | None = None,
        model_parameters: Sequence[Mapping[str, Any]] | None = None,
        *,
        parts: dict[str, Any] | None = None,
    ) -> dict[str, Tensor]:
        """Merge the resident tensors with these parameters (overriding the recipe's: global
        ``parameters``, one dict per expert in ``model_parameters``; filters and gradients as in
        recipes). Returns a new state dict on the CPU in each tensor's output dtype, tied names
        included; ``parts`` collects per-task parts of routed methods."""
        m = self.method
        if m.statistics is not None and self.plan.aux is None:
            raise RecipeError(f"merge_method {m.name} needs per-expert statistics (plan.attach_aux)")
        global_params, jobs = self._jobs(parameters, model_parameters)
        drop = _scale_field(m.params, m.scale) if m.scale is not None and m.delta is not None else None
        stats = self._run_folds(global_params, jobs, drop)
        out: dict[str, Tensor] = {}
        used: set[str] = set()
        for job in jobs:
            if job.kind == "copy":
                out[job.name] = self._copies[job.name]
                continue
            base, experts, aux = self._inputs[job.name]
            ctx = self._context(job, stats, aux)
            merged: Tensor | MethodOutput
            try:
                with torch.no_grad():
                    params = job.params
                    assert params is not None  # copies are handled above: a merge job's op is a MethodCall
                    if drop is not None:
                        # drop is set only for a method with a scaled form, base + scale * delta
                        assert m.delta is not None and base is not None
                        key = _key(params, job.model_params, drop)
                        used.add(key)
                        per = self._deltas.setdefault(job.name, {})
                        delta = per.get(key)
                        if delta is None:
                            delta = per[key] = m.delta(base, experts, params, job.model_params, ctx)
                        merged = torch.add(base, delta, alpha=getattr(params, drop)).to(base.dtype)
                    else:
                        merged = m(base, experts, params, job.model_params, ctx)
            except MergelabError:
                raise
            except Exception as exc:
                raise InternalError(f"{m.name} failed on tensor {job.name!r}: {type(exc).__name__}: {exc}") from exc
            if isinstance(merged, MethodOutput):
                if parts is not None:
                    parts[job.name] = merged.parts
                merged = merged.merged
            if self.check_finite and not _all_finite(merged):
                raise ParameterError(f"{m.name} produced NaN/Inf in tensor {job.name!r}; check the parameters")
            out[job.name] = cast_output(merged, job.out_dtype, job.name).cpu()
        self._forget(used)
        for alias, canonical in self.plan.tied.items():
            out[alias] = out[canonical]
        ordered = {k: out[k] for k in self.plan.reference.tensors() if k in out}
        ordered.update((k, v) for k, v in out.items() if k not in ordered)  # renamed outputs (slices)
        return ordered

    def _forget(self, used: set[str]) -> None:
        """Keep the stage outputs of the ``cache`` most recent parameter sets."""
        for k in used:
            if k in self._recent:
                self._recent.remove(k)
            self._recent.append(k)
        keep = set(self._recent[-self._cache_size :]) if self._cache_size else set()
        self._recent = [k for k in self._recent if k in keep]
        for per in self._deltas.values():
            for k in [k for k in per if k not in keep]:
                del per[k]

    def clear(self) -> None:
        """Drop every cached stage output (the resident inputs stay)."""
        self._deltas.clear()
        self._folds.clear()
        self._recent.clear()


class MemoryExecutor:
    """The memory executor behind the :class:`~mergelab.executors.base.Executor` protocol: one
    :class:`MergeSession` per run (inputs read once, merged in memory), results handed to the
    sinks in job order. For repeated merges of the same inputs keep a :class:`MergeSession`."""

    name = "memory"

    def run(
        self,
        graph: Plan,
        sinks: Mapping[str, Any],
        options: ExecutorOptions | None = None,
        progress: Progress | None = None,
    ) -> RunStats:
        if not isinstance(graph, Plan):
            raise OptionError("the memory executor runs a Plan (mergelab.plan_merge / build_plan), not a bare Graph")
        plan = graph
        opts = options or ExecutorOptions()
        prog = progress or NoProgress()
        t0 = time.perf_counter()
        with thread_limit(opts.threads):
            session = MergeSession(
                plan,
                device=resolve_device(opts.device),
                compute_dtype=opts.compute_dtype,
                seed=opts.seed,
                cache=0,
                check_finite=opts.check_finite,
            )
            parts: dict[str, Any] = {}
            prog.begin("merge (in memory)", len(plan.jobs), plan.input_bytes())
            result = session.merge(parts=parts if MASKS in sinks else None)
            prog.end()
        stats = RunStats()
        model = sinks.get(MODEL)
        for job in plan.jobs:
            t = result[job.name]
            if model is not None:
                model.add(job.name, t)
            stats.tensors += 1
            stats.bytes_written += t.numel() * t.element_size()
        if MASKS in sinks:
            for name, p in parts.items():
                sinks[MASKS].add(name, p)
        stats.bytes_read = plan.input_bytes()
        stats.passes = len(plan.method.passes(plan.global_params)) + 1
        stats.seconds = time.perf_counter() - t0
        return stats


def run_memory(plan: Plan, sink: Any, options: ExecutorOptions | None = None) -> RunStats:
    """Merge ``plan`` in memory into ``sink`` (``sink.add(name, tensor)``): the memory executor with one sink."""
    return MemoryExecutor().run(plan, {MODEL: sink}, options)
