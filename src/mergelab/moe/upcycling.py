"""Upcycling: a mixture-of-experts model from dense fine-tunes of one base (mergekit-moe's job).

Each expert's MLP (``model.layers.N.mlp.{gate,up,down}_proj``) becomes one routed expert of layer
``N``; attention, norms, embeddings and the head come from ``base_model``; each layer's router is
initialised by the recipe's gate mode (:mod:`mergelab.moe.gates`). The result keeps every expert's
MLP and routes per token (``experts_per_token`` experts per token, their softmax weights
renormalised). Everything that can fail without tensor data (recipe, output family, configs,
tensor names and shapes) fails before the base is run or any tensor is read; the output is written
tensor by tensor into a temporary folder and published with one rename, as ``mergelab merge``.

Experts are full checkpoints or PEFT LoRA adapters (an adapter folder, or ``base+adapter``), read
over the base as ``merge_and_unload`` would give them (:mod:`mergelab.lora.reader`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.reader import CheckpointReader, open_checkpoint
from mergelab.checkpoint.writer import (
    DEFAULT_MAX_SHARD,
    AtomicOutputDir,
    check_destination,
    copy_side_files_of,
    parse_size,
)
from mergelab.errors import CheckpointError, OptionError, PlanError, RecipeError
from mergelab.executors.base import Progress, check_threads, resolve_device, thread_limit
from mergelab.methods.base import tensor_seed
from mergelab.moe import gates as G
from mergelab.moe.architectures import (
    DENSE_MLP,
    DENSE_PROJECTIONS,
    MoeArchitecture,
    dense_mlp_tensor,
    select_output,
)
from mergelab.moe.output import OutSpec, Unit, WriteStats, model_card, read_checked, write_units
from mergelab.moe.recipe import PROMPT_MODES, MoeExpert, MoeRecipe, check_recipe, load_moe_recipe
from mergelab.recipe import parse_dtype

STRUCTURE_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "intermediate_size",
)
"""config.json keys every expert must share with the base (they fix every tensor's shape)."""

_ATTN_BIAS = ("q_proj", "k_proj", "v_proj")


@dataclass
class UpcycleResult:
    """Where the MoE went, what it is, and what the run saw."""

    path: Path
    architecture: str
    num_experts: int
    experts_per_token: int
    gate_mode: str
    warnings: list[str]
    stats: WriteStats
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Inputs:
    base: CheckpointReader
    experts: list[CheckpointReader]  # routed, in recipe order
    shared: list[CheckpointReader]
    owned: list[CheckpointReader]

    def close(self) -> None:
        for r in self.owned:
            r.close()


def _open_inputs(recipe: MoeRecipe, allow_adapter_base_mismatch: bool) -> _Inputs:
    base = open_checkpoint(recipe.base_model)
    if getattr(base, "base", None) is not None:
        base.close()
        raise RecipeError(f"{recipe.base_model}: base_model is an adapter over another model; give the dense base")
    owned: list[CheckpointReader] = [base]
    by_ref: dict[str, CheckpointReader] = {recipe.base_model: base}

    def opened(e: MoeExpert) -> CheckpointReader:
        if e.source_model not in by_ref:
            r = open_checkpoint(e.source_model, base=base, allow_base_mismatch=allow_adapter_base_mismatch)
            by_ref[e.source_model] = r
            owned.insert(0, r)  # closed before the base they may read through
        return by_ref[e.source_model]

    try:
        experts = [opened(e) for e in recipe.experts]
        shared = [opened(e) for e in recipe.shared_experts or []]
    except BaseException:
        for r in owned:
            r.close()
        raise
    return _Inputs(base, experts, shared, owned)


def _structure(cfg: Mapping[str, Any]) -> dict[str, Any]:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), Mapping) else None
    src = text or cfg
    return {k: src.get(k) for k in STRUCTURE_KEYS if src.get(k) is not None}


def _check_expert_configs(inputs: _Inputs, recipe: MoeRecipe, base_cfg: Mapping[str, Any]) -> None:
    want = _structure(base_cfg)
    entries = list(zip(recipe.experts, inputs.experts)) + list(zip(recipe.shared_experts or [], inputs.shared))
    for e, r in entries:
        cfg = r.config()
        if cfg is None:
            continue  # a weights file without config.json: the tensor shapes are still checked
        have = _structure(cfg)
        for key, value in want.items():
            if key in have and have[key] != value:
                raise PlanError(
                    f"{e.source_model}: {key} is {have[key]!r} but base_model {recipe.base_model} has {value!r}; "
                    "every expert must be a fine-tune of base_model (the same architecture and sizes)"
                )


def _out_dtype(recipe: MoeRecipe, base_cfg: Mapping[str, Any]) -> torch.dtype | None:
    dt = parse_dtype(recipe.dtype, "dtype")
    if dt is not None:
        return dt
    for key in ("dtype", "torch_dtype"):
        value = base_cfg.get(key)
        if isinstance(value, str):
            try:
                return parse_dtype(value, key)
            except RecipeError:
                return None
    return None


def recipe_inputs(recipe: MoeRecipe) -> list[tuple[str, str]]:
    """(role, path) of every input the output folder must stay clear of (both parts of ``base+adapter``)."""
    out: list[tuple[str, str]] = []
    entries = [("base_model", recipe.base_model)] + [
        ("expert", e.source_model) for e in [*recipe.experts, *(recipe.shared_experts or [])]
    ]
    for role, ref in entries:
        parts = [ref] if Path(ref).exists() or "+" not in ref else ref.split("+")
        out.extend((role, part) for part in parts if part)
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


@dataclass
class UpcyclePlan:
    """What an upcycle will write, from headers and configs only (no tensor data read)."""

    recipe: MoeRecipe
    arch: MoeArchitecture
    num_layers: int
    hidden_size: int
    base_config: dict[str, Any]
    out_dtype: torch.dtype | None
    copies: list[tuple[str, tuple[int, ...], torch.dtype]]
    """Base tensors written unchanged (name, shape, dtype)."""
    mlp_shapes: dict[tuple[int, str], tuple[int, ...]]
    """(layer, dense projection) -> shape, for every layer."""
    mlp_dtype: torch.dtype
    zero_biases: list[tuple[str, tuple[int, ...]]]
    """q/k/v biases the output family needs and the base lacks (written as zeros)."""
    warnings: list[str] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return len(self.recipe.experts)


def plan_upcycle(recipe: MoeRecipe, inputs: _Inputs, *, where: str = "recipe") -> UpcyclePlan:
    """Validate the recipe against the inputs' configs and headers and lay out the output."""
    base = inputs.base
    base_cfg = base.config()
    if base_cfg is None:
        raise CheckpointError(
            f"{recipe.base_model}: no config.json beside the weights; upcycling writes the MoE's config from it"
        )
    arch = select_output(
        recipe.architecture, base_cfg.get("model_type"), shared_experts=len(recipe.shared_experts or []), where=where
    )
    for e, r in zip(recipe.experts, inputs.experts):
        t = (r.config() or {}).get("model_type")
        if t is not None and t != base_cfg.get("model_type"):
            raise PlanError(
                f"{e.source_model}: model_type {t!r} differs from base_model's {base_cfg.get('model_type')!r}; "
                "every expert must be a fine-tune of base_model"
            )
    _check_expert_configs(inputs, recipe, base_cfg)
    num_layers = base_cfg.get("num_hidden_layers")
    hidden = base_cfg.get("hidden_size")
    if not isinstance(num_layers, int) or not isinstance(hidden, int):
        raise CheckpointError(f"{recipe.base_model}: config.json has no num_hidden_layers / hidden_size")
    metas = base.tensors()
    copies: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    mlp_shapes: dict[tuple[int, str], tuple[int, ...]] = {}
    mlp_dtype = torch.float32
    attn_bias: set[tuple[int, str]] = set()
    for name, meta in metas.items():
        mlp = dense_mlp_tensor(name)
        if mlp is not None:
            layer, proj, kind = mlp
            if kind == "bias":
                raise PlanError(
                    f"{recipe.base_model}: {name}: MLP biases (mlp_bias) have no place in {arch.name}'s experts; "
                    "upcycle a base without MLP biases"
                )
            mlp_shapes[(layer, proj)] = meta.shape
            mlp_dtype = meta.dtype
            continue
        if ".self_attn." in name and name.endswith("_proj.bias"):
            proj = name.rsplit(".", 2)[-2]
            if arch.attention_biases == "none" or (arch.attention_biases == "qkv" and proj not in _ATTN_BIAS):
                raise PlanError(
                    f"{recipe.base_model}: {name}: {arch.name} attention has no {proj} bias; "
                    "choose an output architecture whose attention matches the base (architecture: ...)"
                )
            layer = int(name.split(".")[2])
            attn_bias.add((layer, proj))
        copies.append((name, meta.shape, meta.dtype))
    missing = [
        DENSE_MLP.format(layer=layer, proj=proj)
        for layer in range(num_layers)
        for proj in DENSE_PROJECTIONS
        if (layer, proj) not in mlp_shapes
    ]
    if missing:
        raise PlanError(
            f"{recipe.base_model}: no dense MLP tensor {missing[0]} ({len(missing)} missing); "
            "upcycling needs a Llama-style decoder with gate_proj/up_proj/down_proj in every layer"
        )
    out_dtype = _out_dtype(recipe, base_cfg)
    # every expert (routed and shared) has the same MLP tensors with the same shapes
    entries = list(zip(recipe.experts, inputs.experts)) + list(zip(recipe.shared_experts or [], inputs.shared))
    for e, r in entries:
        have = r.tensors()
        for (layer, proj), shape in mlp_shapes.items():
            name = DENSE_MLP.format(layer=layer, proj=proj)
            if name not in have:
                raise PlanError(f"{e.source_model}: no tensor {name}; the expert's MLP is needed for its routed expert")
            if tuple(have[name].shape) != tuple(shape):
                raise PlanError(
                    f"{e.source_model}: {name} has shape {list(have[name].shape)} but the base's is {list(shape)}; "
                    "every expert's MLP must have the base's shapes (the same intermediate_size)"
                )
    zero_biases: list[tuple[str, tuple[int, ...]]] = []
    if arch.attention_biases == "qkv":
        for layer in range(num_layers):
            for proj in _ATTN_BIAS:
                if (layer, proj) not in attn_bias:
                    w = metas.get(f"model.layers.{layer}.self_attn.{proj}.weight")
                    if w is None:
                        raise PlanError(f"{recipe.base_model}: no model.layers.{layer}.self_attn.{proj}.weight")
                    zero_biases.append((f"model.layers.{layer}.self_attn.{proj}.bias", (w.shape[0],)))
    warnings: list[str] = []
    n = len(recipe.experts)
    if n & (n - 1):
        warnings.append(f"{n} experts is not a power of two; llama.cpp cannot load such a model")
    return UpcyclePlan(
        recipe=recipe,
        arch=arch,
        num_layers=num_layers,
        hidden_size=hidden,
        base_config=dict(base_cfg),
        out_dtype=out_dtype,
        copies=copies,
        mlp_shapes=mlp_shapes,
        mlp_dtype=mlp_dtype,
        zero_biases=zero_biases,
        warnings=warnings,
    )


# ------------------------------------------------------------------------------------ gates


def compute_gates(
    plan: UpcyclePlan,
    inputs: _Inputs,
    *,
    device: torch.device,
    compute_dtype: torch.dtype,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The routers ``[L, N, H]`` and, for a shared expert, its gates ``[L, 1, H]`` (float32)."""
    recipe, arch = plan.recipe, plan.arch
    n, num_layers, hidden = plan.num_experts, plan.num_layers, plan.hidden_size
    shared = arch.has_shared_expert
    if recipe.gate_mode not in PROMPT_MODES:
        uniform = recipe.gate_mode == "uniform_random"
        routers = torch.stack(
            [
                G.random_gate((n, hidden), _generator(recipe.seed, arch.router_name(layer)), uniform=uniform)
                for layer in range(num_layers)
            ]
        )
        shared_gates = (
            torch.stack(
                [
                    G.random_gate((1, hidden), _generator(recipe.seed, arch.shared_gate_name(layer)), uniform=uniform)
                    for layer in range(num_layers)
                ]
            )
            if shared
            else None
        )
        return routers, shared_gates
    from mergelab.data import load_tokenizer

    folder = inputs.base.folder
    if folder is None:
        raise CheckpointError(f"{recipe.base_model}: gate_mode {recipe.gate_mode} needs the base's folder (tokenizer)")
    tokenizer = load_tokenizer(folder)
    experts = list(recipe.experts) + list(recipe.shared_experts or [])
    sets = [G.PromptSet(tuple(e.positive_prompts or ()), tuple(e.negative_prompts or ())) for e in experts]
    model = None
    embed = None
    if recipe.gate_mode == "cheap_embed":
        key = "model.embed_tokens.weight"
        if key not in inputs.base.tensors():
            raise PlanError(f"{recipe.base_model}: no {key}; gate_mode cheap_embed reads the base's token embeddings")
        embed = read_checked(inputs.base, key)
    else:
        from mergelab.informed.modeling import load_model

        model = load_model(folder, "causal_lm", device, compute_dtype)
    n_prompts = len({p for s in sets for p in (*s.positive, *s.negative)})
    if progress is not None:
        progress.begin("gate prompts", n_prompts, 0)
    try:
        vecs = G.prompt_gates(
            sets,
            tokenizer,
            mode=recipe.gate_mode,
            model=model,
            embed=embed,
            num_layers=num_layers,
            batch_size=recipe.prompt_batch_size,
            device=device,
            on_batch=(lambda k: progress.advance(k, 0)) if progress is not None else None,
        )
    finally:
        if progress is not None:
            progress.end()
        del model
    if vecs.shape[-1] != hidden:
        raise PlanError(f"{recipe.base_model}: hidden states have width {vecs.shape[-1]}, config says {hidden}")
    return vecs[:, :n], (vecs[:, n:] if shared else None)


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(tensor_seed(seed, name))


# ------------------------------------------------------------------------------------ units


def _expert_unit(
    reader: CheckpointReader, src: str, out: OutSpec, expert: MoeExpert, seed: int, residual: bool
) -> Unit:
    def compute() -> dict[str, torch.Tensor]:
        t = read_checked(reader, src)
        if expert.noise_scale or (residual and expert.residual_scale is not None):
            t = t.float()
            if expert.noise_scale:
                t = t + torch.randn(t.shape, generator=_generator(seed, out.name)) * expert.noise_scale
            if residual and expert.residual_scale is not None:
                t = t * expert.residual_scale
        return {out.name: t.to(out.dtype)}

    return Unit((out,), compute)


def _copy_unit(reader: CheckpointReader, name: str, out: OutSpec) -> Unit:
    return Unit((out,), lambda: {out.name: _cast(read_checked(reader, name), out.dtype)})


def _value_unit(out: OutSpec, value: torch.Tensor) -> Unit:
    return Unit((out,), lambda: {out.name: value.to(out.dtype)})


def build_units(
    plan: UpcyclePlan, inputs: _Inputs, routers: torch.Tensor, shared_gates: torch.Tensor | None
) -> list[Unit]:
    """The output tensors in base order (each layer's routed experts, shared expert and router where
    its dense MLP was)."""
    arch, recipe = plan.arch, plan.recipe
    dt = plan.out_dtype
    units: list[Unit] = []
    gate_dtype = dt or plan.mlp_dtype
    for name, shape, dtype in plan.copies:
        units.append(
            _copy_unit(inputs.base, name, OutSpec(name, shape, dt if dt and dtype.is_floating_point else dtype))
        )
    for name, shape in plan.zero_biases:
        units.append(_value_unit(OutSpec(name, shape, gate_dtype), torch.zeros(shape)))
    for layer in range(plan.num_layers):
        mlp_dt = dt or plan.mlp_dtype
        for proj in DENSE_PROJECTIONS:
            shape = plan.mlp_shapes[(layer, proj)]
            src = DENSE_MLP.format(layer=layer, proj=proj)
            for e, (expert, reader) in enumerate(zip(recipe.experts, inputs.experts)):
                out = OutSpec(arch.expert_name(layer, e, proj), shape, mlp_dt)
                units.append(_expert_unit(reader, src, out, expert, recipe.seed, proj == "down_proj"))
            if arch.has_shared_expert:
                sexp, sreader = (recipe.shared_experts or [])[0], inputs.shared[0]
                out = OutSpec(arch.shared_name(layer, proj), shape, mlp_dt)
                units.append(_expert_unit(sreader, src, out, sexp, recipe.seed, proj == "down_proj"))
        router = routers[layer].contiguous()
        units.append(_value_unit(OutSpec(arch.router_name(layer), tuple(router.shape), gate_dtype), router))
        if arch.has_shared_expert:
            assert shared_gates is not None
            g = shared_gates[layer].contiguous()
            units.append(_value_unit(OutSpec(arch.shared_gate_name(layer), tuple(g.shape), gate_dtype), g))
    return units


# ------------------------------------------------------------------------------------ config


def output_config(plan: UpcyclePlan, folder: Path, base_folder: Path | None) -> dict[str, Any]:
    """config.json of the MoE: the base's config (every value, defaults included, as transformers reads
    it) turned into the output family's config class, with the MoE keys set; written to ``folder``."""
    from transformers import CONFIG_MAPPING, AutoConfig

    arch = plan.arch
    if base_folder is not None and (base_folder / "config.json").is_file():
        base_dict = AutoConfig.from_pretrained(str(base_folder), local_files_only=True).to_dict()
    else:
        base_dict = dict(plan.base_config)
    for key in ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path", "dtype"):
        base_dict.pop(key, None)
    base_dict.pop("torch_dtype", None)
    cfg = CONFIG_MAPPING[arch.model_type](**base_dict)
    intermediate = plan.base_config.get("intermediate_size") or plan.mlp_shapes[(0, "gate_proj")][0]
    updates: dict[str, Any] = {
        arch.count_key: plan.num_experts,
        arch.topk_key: plan.recipe.experts_per_token,
        **dict.fromkeys(arch.intermediate_keys, intermediate),
        **dict(arch.fixed),
    }
    for key, value in updates.items():
        setattr(cfg, key, value)
    cfg.architectures = [arch.class_name]
    if plan.out_dtype is not None:
        cfg.dtype = plan.out_dtype
    cfg.save_pretrained(str(folder))
    return json.loads((folder / "config.json").read_text())


# ------------------------------------------------------------------------------------ API


def upcycle(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | MoeRecipe,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    force_any: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    compute_dtype: str = "float32",
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
    allow_all_same: bool = False,
    allow_adapter_base_mismatch: bool = False,
    progress: Progress | None = None,
) -> UpcycleResult:
    """Build the MoE of a mergekit-moe recipe into the folder ``out`` (streamed, atomic).

    ``device`` / ``compute_dtype``: where and in which precision the base runs on the prompts
    (gate modes ``hidden`` and ``hidden_avg``; mergekit-moe uses bfloat16). ``allow_all_same``:
    build even when every expert is the same model (mergekit-moe's
    ``--i-understand-this-is-not-useful-without-training``). Returns the output path, the chosen
    output family and the warnings (degenerate gates, expert count); ``report`` is also written to
    ``out/moe_report.json``.
    """
    from mergelab import __version__

    rec = load_moe_recipe(recipe)
    where = str(recipe) if isinstance(recipe, (str, os.PathLike)) else "recipe"
    dev = resolve_device(device)
    check_threads(threads)
    cdt = parse_dtype(compute_dtype, "compute_dtype")
    if cdt is None:
        raise OptionError("compute_dtype: give a dtype such as float32 or bfloat16")
    shard_bytes = parse_size(max_shard_size)
    check_recipe(rec, allow_all_same=allow_all_same, where=where)
    inputs_for_guard = recipe_inputs(rec)
    check_destination(out, inputs_for_guard, force=force, force_any=force_any)
    start = time.perf_counter()
    inputs = _open_inputs(rec, allow_adapter_base_mismatch)
    try:
        plan = plan_upcycle(rec, inputs, where=where)
        dest = AtomicOutputDir(out, force=force, force_any=force_any, inputs=inputs_for_guard, kind="moe")
        try:
            with thread_limit(threads):
                routers, shared_gates = compute_gates(plan, inputs, device=dev, compute_dtype=cdt, progress=progress)
                all_gates = routers if shared_gates is None else torch.cat([routers, shared_gates], dim=1)
                degenerate = G.degenerate_layers(all_gates)
                warning = G.degenerate_warning(degenerate, plan.num_layers)
                warnings = list(plan.warnings) + ([warning] if warning else [])
                units = build_units(plan, inputs, routers, shared_gates)
                stats = write_units(dest.tmp, units, max_shard_size=shard_bytes, progress=progress)
            config = output_config(plan, dest.tmp, inputs.base.folder)
            copy_side_files_of(inputs.base.folder, dest.tmp, skip=("config.json",))
            report = {
                "architecture": plan.arch.name,
                "model_type": config.get("model_type"),
                "num_experts": plan.num_experts,
                "experts_per_token": rec.experts_per_token,
                "gate_mode": rec.gate_mode,
                "layers": plan.num_layers,
                "degenerate_layers": degenerate,
                "gate_condition_numbers": [
                    float(torch.linalg.cond(all_gates[layer].double())) for layer in range(plan.num_layers)
                ],
                "warnings": warnings,
                "seconds": time.perf_counter() - start,
            }
            (dest.tmp / "moe_report.json").write_text(json.dumps(report, indent=2) + "\n")
            (dest.tmp / "mergelab_moe.yaml").write_text(rec.to_yaml())
            lines = [
                f"output architecture: {plan.arch.class_name} ({plan.num_experts} experts, "
                f"{rec.experts_per_token} per token, gate mode {rec.gate_mode})",
                f"base: {rec.base_model}",
                *(f"expert {i}: {e.source_model}" for i, e in enumerate(rec.experts)),
                *(f"shared expert: {e.source_model}" for e in rec.shared_experts or []),
            ]
            (dest.tmp / "README.md").write_text(
                model_card("Mixture of experts upcycled with mergelab", lines, rec.to_yaml(), __version__)
            )
            path = dest.commit()
        except BaseException as exc:
            dest.fail(exc)
            raise
        finally:
            dest.close_workdir()
    finally:
        inputs.close()
    return UpcycleResult(
        path=path,
        architecture=plan.arch.name,
        num_experts=plan.num_experts,
        experts_per_token=rec.experts_per_token,
        gate_mode=rec.gate_mode,
        warnings=warnings,
        stats=stats,
        report=report,
    )
