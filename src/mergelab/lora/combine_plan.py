"""``output: adapter`` with a factor-space combination rule: ``adapter: {combine: cat | knots_ties |
knots_dare_ties | core_space | linear_legacy | ties_legacy}`` (:mod:`mergelab.lora.combine`).

Every model of the recipe must be a PEFT adapter of the base (an :class:`~mergelab.lora.reader.AdapterReader`).
At plan time (headers only) the planner takes the tensors some adapter updates with LoRA factors as
the output's LoRA modules, refuses what a factor rule cannot combine (a DoRA module, a tensor one
adapter LoRAs and another stores whole, ``adapter.rank`` / ``energy``, which belong to ``svd``) and
removes those tensors' dense merge jobs; every other tensor still goes through the recipe's
``merge_method`` and the sink's ``non_lora`` handling (``modules_to_save`` tensors, ``lora_bias``).
When the executor has streamed those, the ``peft_adapter`` sink calls :func:`_combine_into`, which
reads every adapter's factors of the LoRA modules (adapter-sized: the factors of all inputs are held
at once, which KnOTS's model-wide selection needs anyway), runs the rule and adds the factors.

Parameters: ``adapter.combine_parameters`` holds the rule's parameters (e.g. ``{density: 0.2,
scale: 0.6}`` for ``knots_ties``; ``seed``: the DARE draws of ``knots_dare_ties``). The per-adapter
weights are the models' resolved ``weight`` parameters. ``core_space`` merges its core matrices
with the recipe's ``merge_method`` and resolved ``parameters`` (per-model ones included) unless
``combine_parameters.method`` names another method.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from mergelab.errors import CheckpointError, PlanError, RecipeError
from mergelab.ir import ADAPTER, Artifact, Job, OutRef
from mergelab.lora.combine import combine_adapters, get_rule
from mergelab.lora.combine_base import validate_params
from mergelab.lora.factors import LoraFactors
from mergelab.lora.peft_format import module_name, uses_conv1d
from mergelab.lora.reader import AdapterReader
from mergelab.lora.sink import ADAPTER_RULES, AdapterPlan, AdapterTarget, _is_embedding

FACTOR_RULES = ("cat", "knots_ties", "knots_dare_ties", "core_space", "linear_legacy", "ties_legacy")


@dataclass
class FactorAdapterPlan(AdapterPlan):
    """An :class:`AdapterPlan` whose LoRA modules come from a factor-space rule, not from the jobs."""

    rule: str = "cat"
    rule_parameters: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    adapters: tuple[AdapterReader, ...] = ()
    weights: dict[str, tuple[float, ...]] = field(default_factory=dict)

    def combine_factors(self, sink: Any) -> None:
        """Run the rule over every LoRA module and hand the factors to ``sink`` (the adapter sink)."""
        _combine_into(self, sink)


def _weight(mp: Any) -> float:
    w = getattr(mp, "weight", 1.0)
    return float(w) if isinstance(w, (int, float)) else 1.0


def _factor_planner(rule: str) -> Any:
    def planner(graph: Any, plan: AdapterPlan) -> Any:
        spec = get_rule(rule)
        s = plan.settings
        if s.rank is not None or s.energy is not None:
            raise RecipeError(
                f"adapter.combine: {rule} sets the rank itself; adapter.rank / energy (--rank/--energy) apply to "
                "combine: svd only: remove them"
            )
        given = dict(getattr(s, "combine_parameters", None) or {})
        seed = given.pop("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise RecipeError(f"adapter.combine_parameters.seed: expected a whole number, got {seed!r}")
        adapters: list[AdapterReader] = []
        for e in graph.experts:
            r = graph.sources[e]
            if not isinstance(r, AdapterReader):
                raise PlanError(
                    f"adapter.combine: {rule} combines LoRA factors, but model {r.label} is not a PEFT adapter; "
                    "use combine: svd (any models) or give only adapters"
                )
            adapters.append(r)
        if not adapters:
            raise PlanError(f"adapter.combine: {rule} needs at least one adapter among the models")
        lora: dict[str, None] = {}
        for r in adapters:
            lora.update(dict.fromkeys(r.lora_targets()))
        conv1d = uses_conv1d(plan.base_config)
        jobs = {j.name: j for j in graph.jobs}
        targets: dict[str, AdapterTarget] = {}
        weights: dict[str, tuple[float, ...]] = {}
        for name in lora:
            if s.target_modules is not None and name not in plan.targets:
                continue  # left to the dense path (non_lora handling)
            for r in adapters:
                if r.is_dora(name):
                    raise PlanError(
                        f"{r.label}: tensor {name!r} is a DoRA module, not a low-rank update; combine: {rule} cannot "
                        "combine it (use output: model)"
                    )
                if name in r.replaced() and name not in r.lora_targets():
                    raise PlanError(
                        f"{r.label}: tensor {name!r} is stored whole by this adapter and LoRA'd by another; "
                        f"combine: {rule} cannot mix them (use combine: svd)"
                    )
            job = jobs.get(name)
            if job is None:
                raise PlanError(f"adapter.combine: tensor {name!r} adapted by LoRA is not merged by the plan")
            mod = module_name(name)
            emb = _is_embedding(mod) and job.layer is None
            targets[name] = AdapterTarget(name, mod, "embedding" if emb else "conv1d" if conv1d else "linear")
            weights[name] = tuple(_weight(mp) for mp in job.model_params)
        parameters = given
        if rule == "core_space" and "method" not in parameters:
            first = jobs[next(iter(targets))] if targets else None
            parameters = {
                **parameters,
                "method": graph.method.name,
                "parameters": (first.params if first else graph.global_params).model_dump(by_alias=True),
                "model_parameters": [mp.model_dump(by_alias=True) for mp in (first.model_params if first else ())]
                or None,
            }
            weights = {n: tuple(1.0 for _ in w) for n, w in weights.items()}  # already in model_parameters
        validate_params(spec.params, parameters, f"adapter.combine_parameters ({rule})")
        out_jobs = []
        for j in graph.jobs:
            o = j.outputs[0]
            plan.out_dtypes[o.name] = o.dtype
            if o.name in targets:
                continue
            out_jobs.append(Job(j.inputs, j.op, (OutRef(ADAPTER, o.name, o.shape, o.dtype),)))
        fplan = FactorAdapterPlan(
            **{f: getattr(plan, f) for f in AdapterPlan.__dataclass_fields__},
            rule=rule,
            rule_parameters=parameters,
            seed=seed,
            adapters=tuple(adapters),
            weights=weights,
        )
        fplan.targets = targets
        return replace(graph, jobs=out_jobs, artifacts={ADAPTER: Artifact(ADAPTER, "peft_adapter", settings=fplan)})

    return planner


def _combine_into(plan: FactorAdapterPlan, sink: Any) -> None:
    by_weights: dict[tuple[float, ...], list[str]] = {}
    for name, w in plan.weights.items():
        by_weights.setdefault(w, []).append(name)
    if len(by_weights) > 1 and plan.rule not in ("cat", "linear_legacy", "ties_legacy"):
        raise PlanError(
            f"adapter.combine: {plan.rule} combines every module at once and needs one weight per adapter, but the "
            "models' weights vary between modules (filters or gradients); give plain weights"
        )
    for r in plan.adapters:  # a LoRA'd tensor the adapter also stores (PEFT's base_layer copy) must be W0
        for n in sorted(r.replaced() & set(plan.targets) & set(r.lora_targets())):
            if not torch.equal(r.read_base(n), r.base.read(n)):
                raise CheckpointError(
                    f"{r.label}: tensor {n!r}: the adapter's stored base layer differs from the base model's; "
                    f"combine: {plan.rule} writes updates of the base: use combine: svd"
                )
    for w, names in by_weights.items():
        modules = {n: [r.factors(n) for r in plan.adapters] for n in names}
        merged = combine_adapters(plan.rule, modules, weights=w, parameters=plan.rule_parameters, seed=plan.seed)
        for n in names:
            f = merged.get(n)
            if f is None:
                continue
            target = plan.targets[n]
            dtype = sink.writer.dtype or plan.out_dtypes.get(n, torch.float32)
            cast = LoraFactors(f.A.to(dtype).contiguous(), f.B.to(dtype).contiguous(), f.scaling, f.transposed)
            sink.add_factors(target.module, cast, embedding=target.kind == "embedding")
            head = plan.tied_head.get(n)
            if head is not None:  # the tied head (a Linear, weight = the embedding) gets the same update
                sink.writer.add_lora(head, LoraFactors(cast.B.T.contiguous(), cast.A.T.contiguous(), 1.0, False))


def register() -> None:
    """Add the factor-space rules to :data:`mergelab.lora.sink.ADAPTER_RULES` (idempotent)."""
    for rule in FACTOR_RULES:
        ADAPTER_RULES.setdefault(rule, _factor_planner(rule))


register()
