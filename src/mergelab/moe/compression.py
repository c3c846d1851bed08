"""Compressing an MoE by merging or pruning its experts: ``mergelab moe-compress`` and :func:`compress`.

1. **Plan** from the checkpoint's config and headers: the family (:mod:`mergelab.moe.architectures`),
   ``N`` experts and top-k per layer, the MoE layers (those with a router), every expert tensor
   present with one shape per layer; ``--to K`` checked against ``N``. Nothing is read yet.
2. **Data phase** (:mod:`mergelab.moe.routing`) on ``--device``: usage frequencies, router-logit
   similarities and, for Sub-MoE, expert-output similarities from calibration data. Statistics
   computed elsewhere can be passed from Python instead (``statistics=``).
3. **Groups** per layer: M-SMoE's routing-guided groups (:mod:`mergelab.moe.msmoe`, per layer or
   global), Sub-MoE's clusters (:mod:`mergelab.moe.submoe`), or the ``K`` most used experts
   (:mod:`mergelab.moe.prune`).
4. **Write**, streamed group by group into a temporary folder published with one rename:

   * ``layout: shared`` (M-SMoE's and Sub-MoE's default, as M-SMoE defines the compressed model):
     the router is unchanged (``N`` rows) and every member's slot holds its group's merged expert,
     so tokens routed to any member reach it; config.json is unchanged. A safetensors checkpoint
     cannot store one tensor under several names, so the file keeps ``N`` expert slots (``K``
     distinct); ``moe_compress.json`` maps slots to groups for a runtime that deduplicates.
   * ``layout: distinct`` (pruning's only layout; M-SMoE and Sub-MoE with per-layer grouping): ``K``
     experts per layer in config.json and on disk, the router reduced to ``K`` rows
     (``--router-rows``: the members' rows averaged with the usage weights by default, or summed,
     or the core's). The model is smaller, but routing changes: a token whose top-k members fall in
     one group now takes its next group instead. Global grouping gives layers different ``K``,
     which the families' configs (one expert count for every layer) cannot express, so it needs
     ``shared``.

``K = N`` leaves every expert in its own group: the output equals the input.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mergelab.checkpoint.reader import CheckpointReader, open_checkpoint
from mergelab.checkpoint.writer import (
    DEFAULT_MAX_SHARD,
    AtomicOutputDir,
    check_destination,
    copy_side_files_of,
    parse_size,
)
from mergelab.errors import CheckpointError, OptionError, PlanError
from mergelab.executors.base import Progress, check_threads, resolve_device, thread_limit
from mergelab.moe import msmoe, prune, submoe
from mergelab.moe.architectures import DENSE_PROJECTIONS, MoeArchitecture, detect
from mergelab.moe.grouping import LayerGroups, RouterRows, router_rows
from mergelab.moe.output import OutSpec, Unit, WriteStats, model_card, read_checked, write_units
from mergelab.moe.routing import RoutingStats, collect_routing, expert_output_grams
from mergelab.recipe import parse_dtype

Method = Literal["msmoe", "submoe", "prune-frequency"]
METHODS: tuple[str, ...] = ("msmoe", "submoe", "prune-frequency")
Layout = Literal["shared", "distinct"]


class CompressSettings(BaseModel):
    """What ``moe-compress`` does; every field has the paper's default. Combinations that cannot work
    are refused here, before any input is opened."""

    model_config = ConfigDict(extra="forbid")

    to: int = Field(ge=1, description="experts per layer after compression (K); with global grouping, the average")
    method: Method = "msmoe"
    grouping: Literal["layer", "global"] = Field(
        "layer", description="K groups in every layer, or K × layers groups spread by one frequency threshold"
    )
    layout: Layout | None = Field(None, description="shared (router kept) or distinct; default: the method's")
    router_rows: RouterRows = Field("weighted", description="layout distinct: how a group's router row is made")
    align: bool = Field(False, description="align members to their core by weight matching before merging")
    rank: int | None = Field(None, ge=1, description="Sub-MoE: keep this rank of each merged matrix")
    output_tokens: int = Field(
        512,
        ge=1,
        description="Sub-MoE: real tokens per layer, evenly spaced over the calibration data, on which "
        "expert outputs are compared",
    )
    num_examples: int = Field(256, ge=1, description="calibration examples")
    batch_size: int = Field(8, ge=1)
    max_length: int = Field(512, ge=2, description="tokens per calibration example")
    dtype: str = Field("float32", description="dtype of the model during the data phase")

    @model_validator(mode="after")
    def _combinations(self) -> CompressSettings:
        if self.method == "prune-frequency":
            if self.layout == "shared":
                raise ValueError("prune-frequency removes experts: its output layout is distinct")
            if self.grouping == "global":
                raise ValueError("prune-frequency keeps K experts in every layer: use grouping layer")
            if self.align:
                raise ValueError("--align aligns experts before merging; prune-frequency merges nothing")
        if self.rank is not None and self.method != "submoe":
            raise ValueError("--rank is Sub-MoE's rank truncation; use it with --method submoe")
        if self.grouping == "global" and self.resolved_layout == "distinct":
            raise ValueError(
                "global grouping gives layers different numbers of experts, which one config value cannot "
                "describe: use --layout shared (the router kept) or --grouping layer"
            )
        if self.resolved_layout == "shared" and self.router_rows != "weighted":
            raise ValueError("--router-rows applies to --layout distinct (the shared layout keeps the router)")
        return self

    @property
    def resolved_layout(self) -> Layout:
        if self.layout is not None:
            return self.layout
        return "distinct" if self.method == "prune-frequency" else "shared"


@dataclass
class CompressResult:
    """Where the compressed MoE went and what was done (``report`` is also ``out/moe_compress.json``)."""

    path: Path
    report: dict[str, Any]
    stats: WriteStats
    statistics: RoutingStats
    groups: dict[int, LayerGroups] = field(default_factory=dict)


@dataclass
class CompressPlan:
    """The input MoE as headers and config describe it."""

    label: str
    arch: MoeArchitecture
    config: Any  # transformers PretrainedConfig
    num_experts: int
    top_k: int
    layers: list[int]
    hidden_act: str


def _config(reader: CheckpointReader) -> Any:
    from transformers import AutoConfig

    if reader.folder is None or not (reader.folder / "config.json").is_file():
        raise CheckpointError(f"{reader.label}: no config.json beside the weights; an MoE is read with its config")
    try:
        return AutoConfig.from_pretrained(str(reader.folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types
        raise CheckpointError(
            f"{reader.label}: config.json cannot be read by transformers ({type(exc).__name__})"
        ) from None


def plan_compress(reader: CheckpointReader, settings: CompressSettings) -> CompressPlan:
    """Check the MoE and the settings against each other from config and headers."""
    raw = reader.config() or {}
    arch = detect(raw, reader.label)
    cfg = _config(reader)
    n = int(getattr(cfg, arch.count_key))
    top_k = int(getattr(cfg, arch.topk_key))
    metas = reader.tensors()
    layers = [layer for layer in range(int(cfg.num_hidden_layers)) if arch.router_name(layer) in metas]
    if not layers:
        fused = [name for name in metas if name.endswith(("experts.gate_up_proj", "experts.down_proj"))]
        if fused:
            raise CheckpointError(
                f"{reader.label}: experts stored fused ({fused[0]}); mergelab reads the per-expert layout that "
                "transformers' save_pretrained writes: load and save the model with transformers first"
            )
        raise PlanError(f"{reader.label}: no router tensor {arch.router_name(0)}; not a {arch.name} MoE checkpoint")
    for layer in layers:
        shapes: dict[str, tuple[int, ...]] = {}
        for e in range(n):
            for proj in DENSE_PROJECTIONS:
                name = arch.expert_name(layer, e, proj)
                if name not in metas:
                    raise PlanError(f"{reader.label}: no tensor {name} ({n} experts per layer in config.json)")
                shape = tuple(metas[name].shape)
                if shapes.setdefault(proj, shape) != shape:
                    raise PlanError(
                        f"{reader.label}: {name} has shape {list(shape)}, expert 0's is {list(shapes[proj])}; "
                        "the experts of a layer must have the same shapes to be merged"
                    )
        if metas[arch.router_name(layer)].shape[0] != n:
            raise PlanError(f"{reader.label}: {arch.router_name(layer)} has not {n} rows (config.json's expert count)")
    k = settings.to
    if k > n:
        raise OptionError(f"--to {k}: {reader.label} has {n} experts per layer; K must be at most {n}")
    if settings.resolved_layout == "distinct" and k < top_k:
        raise OptionError(
            f"--to {k}: fewer experts than the {top_k} each token is routed to; use --to {top_k} or more, "
            "or --layout shared"
        )
    return CompressPlan(reader.label, arch, cfg, n, top_k, layers, str(getattr(cfg, "hidden_act", "silu")))


def run_calibration(
    plan: CompressPlan,
    reader: CheckpointReader,
    calibration: Any,
    settings: CompressSettings,
    *,
    device: torch.device,
    progress: Progress | None = None,
) -> RoutingStats:
    """The data phase: load the MoE with transformers and collect its routing statistics."""
    from mergelab.data import CalibrationSource, load_examples, load_tokenizer, tokenize_batches
    from mergelab.informed.modeling import load_model

    if isinstance(calibration, CalibrationSource):
        source = calibration
    else:
        try:
            source = CalibrationSource.model_validate(str(calibration))
        except ValidationError as exc:
            raise OptionError(f"--calibration {calibration}: {exc.errors()[0]['msg']}") from None
    assert reader.folder is not None
    dtype = parse_dtype(settings.dtype, "dtype") or torch.float32
    examples = load_examples(source, settings.num_examples)
    tokenizer = load_tokenizer(reader.folder)
    batches = tokenize_batches(
        tokenizer, examples.texts, batch_size=settings.batch_size, max_length=settings.max_length
    )
    model = load_model(reader.folder, "causal_lm", device, dtype)
    routers = {layer: read_checked(reader, plan.arch.router_name(layer)) for layer in plan.layers}
    if progress is not None:
        progress.begin("calibration", len(examples), 0)
    try:
        stats, tokens = collect_routing(
            model,
            batches,
            arch=plan.arch,
            routers=routers,
            top_k=plan.top_k,
            device=device,
            output_tokens=settings.output_tokens if settings.method == "submoe" else 0,
            on_batch=(lambda k: progress.advance(k, 0)) if progress is not None else None,
        )
    finally:
        if progress is not None:
            progress.end()
        del model
    if settings.method == "submoe":
        stats.output_gram = expert_output_grams(reader, plan.arch, tokens, plan.num_experts, plan.hidden_act)
    if stats.tokens == 0:
        raise OptionError(f"--calibration {source.describe()}: no tokens; give non-empty examples")
    return stats


def choose_groups(plan: CompressPlan, stats: RoutingStats, settings: CompressSettings) -> dict[int, LayerGroups]:
    """Each MoE layer's groups under the method and grouping."""
    n, k = plan.num_experts, settings.to
    missing = [layer for layer in plan.layers if layer not in stats.counts]
    if missing or stats.num_experts != n:
        raise PlanError(
            f"the routing statistics do not fit {plan.label}: "
            + (f"no counts for layer {missing[0]}" if missing else f"{stats.num_experts} experts, not {n}")
        )
    if k == n:
        return {layer: LayerGroups.identity(n) for layer in plan.layers}
    if settings.method == "prune-frequency":
        return {layer: prune.keep_most_used(stats.frequencies(layer), k) for layer in plan.layers}
    if settings.grouping == "global":
        per_layer = msmoe.global_group_counts({layer: stats.frequencies(layer) for layer in plan.layers}, k)
    else:
        per_layer = dict.fromkeys(plan.layers, k)
    out = {}
    for layer in plan.layers:
        freq = stats.frequencies(layer)
        if settings.method == "submoe":
            out[layer] = submoe.cluster_experts(stats.output_similarity(layer), freq, per_layer[layer])
        else:
            out[layer] = msmoe.dominant_groups(freq, stats.logit_similarity(layer), per_layer[layer])
    return out


# ------------------------------------------------------------------------------------ writing


def _merge_group(
    reader: CheckpointReader,
    plan: CompressPlan,
    settings: CompressSettings,
    layer: int,
    members: tuple[int, ...],
    core: int,
    freq: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The group's merged expert, by dense projection name."""
    arch = plan.arch
    experts = {
        e: tuple(read_checked(reader, arch.expert_name(layer, e, p)) for p in DENSE_PROJECTIONS) for e in members
    }
    if len(members) == 1 and settings.rank is None:
        return dict(zip(DENSE_PROJECTIONS, experts[members[0]]))
    if settings.align:
        ref = experts[core]
        for e in members:
            if e != core:
                experts[e] = msmoe.permute_expert(experts[e], msmoe.matching_permutation(ref, experts[e]))
    weights = [float(freq[e]) for e in members]
    merged = {}
    for i, proj in enumerate(DENSE_PROJECTIONS):
        tensors = [experts[e][i] for e in members]
        if settings.method == "submoe":
            merged[proj] = submoe.union_merge(tensors, weights, settings.rank)
        else:
            merged[proj] = msmoe.frequency_weighted_merge(tensors, weights)
    return merged


def _copy_unit(reader: CheckpointReader, out: OutSpec) -> Unit:
    return Unit((out,), lambda: {out.name: read_checked(reader, out.name)})


def build_units(
    reader: CheckpointReader,
    plan: CompressPlan,
    settings: CompressSettings,
    groups: Mapping[int, LayerGroups],
    stats: RoutingStats,
) -> list[Unit]:
    arch = plan.arch
    metas = reader.tensors()
    layout = settings.resolved_layout
    expert_re = arch.expert_pattern()
    touched = {arch.router_name(layer) for layer in plan.layers} if layout == "distinct" else set()
    units: list[Unit] = []
    for name, meta in metas.items():
        m = expert_re.match(name)
        if (m and int(m["layer"]) in groups) or name in touched:
            continue
        units.append(_copy_unit(reader, OutSpec(name, tuple(meta.shape), meta.dtype)))
    for layer, lg in groups.items():
        freq = stats.frequencies(layer)
        for g, (members, core) in enumerate(zip(lg.groups, lg.cores)):
            specs: list[OutSpec] = []
            targets: list[tuple[str, str]] = []  # (output name, dense projection)
            slots = members if layout == "shared" else (g,)
            for proj in DENSE_PROJECTIONS:
                meta = metas[arch.expert_name(layer, members[0], proj)]
                for slot in slots:
                    out_name = arch.expert_name(layer, slot, proj)
                    specs.append(OutSpec(out_name, tuple(meta.shape), meta.dtype))
                    targets.append((out_name, proj))

            def compute(
                layer: int = layer,
                members: tuple[int, ...] = members,
                core: int = core,
                freq: Any = freq,
                targets: list[tuple[str, str]] = targets,
                specs: list[OutSpec] = specs,
            ) -> dict[str, torch.Tensor]:
                merged = _merge_group(reader, plan, settings, layer, members, core, freq)
                dtypes = {s.name: s.dtype for s in specs}
                return {name: merged[proj].to(dtypes[name]) for name, proj in targets}

            units.append(Unit(tuple(specs), compute))
        if layout == "distinct":
            rname = arch.router_name(layer)
            meta = metas[rname]

            def router(layer: int = layer, lg: LayerGroups = lg, freq: Any = freq, rname: str = rname) -> dict:
                rows = router_rows(read_checked(reader, rname), lg, freq, settings.router_rows)
                return {rname: rows.to(metas[rname].dtype)}

            units.append(Unit((OutSpec(rname, (lg.k, tuple(meta.shape)[1]), meta.dtype),), router))
    return units


def compress(
    moe: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    to: int,
    method: str = "msmoe",
    calibration: Any = None,
    statistics: RoutingStats | None = None,
    grouping: str = "layer",
    layout: str | None = None,
    router_rows: str = "weighted",
    align: bool = False,
    rank: int | None = None,
    num_examples: int = 256,
    batch_size: int = 8,
    max_length: int = 512,
    output_tokens: int = 512,
    dtype: str = "float32",
    device: str = "cpu",
    threads: int | None = None,
    force: bool = False,
    force_any: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
    progress: Progress | None = None,
) -> CompressResult:
    """Compress the MoE at ``moe`` to ``to`` experts per layer into the folder ``out``.

    ``method``: ``msmoe`` (M-SMoE, Li et al., ICLR 2024), ``submoe`` (Sub-MoE, AAAI 2026,
    experimental) or ``prune-frequency``. ``calibration``: a calibration source (a JSONL/text file,
    ``zoo:<task>``, or a :class:`~mergelab.data.CalibrationSource`) the MoE runs on (on
    ``device``); ``statistics``: routing statistics computed before (then no data phase). See the
    module docstring for ``grouping``, ``layout`` and ``router_rows``; ``align`` aligns each member to
    its group's core by weight matching before merging (needs scipy); ``rank``: Sub-MoE's rank
    truncation. Returns the output path, the report (groups per layer, frequencies, layout) and
    the statistics.
    """
    from mergelab import __version__

    try:
        settings = CompressSettings.model_validate(
            {
                "to": to,
                "method": method,
                "grouping": grouping,
                "layout": layout,
                "router_rows": router_rows,
                "align": align,
                "rank": rank,
                "output_tokens": output_tokens,
                "num_examples": num_examples,
                "batch_size": batch_size,
                "max_length": max_length,
                "dtype": dtype,
            }
        )
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise OptionError(f"{where + ': ' if where else ''}{err['msg'].removeprefix('Value error, ')}") from None
    dev = resolve_device(device)
    check_threads(threads)
    shard_bytes = parse_size(max_shard_size)
    if statistics is None and calibration is None:
        raise OptionError(f"--calibration: {settings.method} needs calibration data (a JSONL/text file or zoo:<task>)")
    inputs = [("MoE", str(moe))]
    check_destination(out, inputs, force=force, force_any=force_any)
    start = time.perf_counter()
    reader = open_checkpoint(moe)
    try:
        plan = plan_compress(reader, settings)
        dest = AtomicOutputDir(out, force=force, force_any=force_any, inputs=inputs, kind="moe-compress")
        try:
            with thread_limit(threads):
                stats = statistics
                if stats is None:
                    stats = run_calibration(plan, reader, calibration, settings, device=dev, progress=progress)
                groups = choose_groups(plan, stats, settings)
                units = build_units(reader, plan, settings, groups, stats)
                written = write_units(dest.tmp, units, max_shard_size=shard_bytes, progress=progress, phase="merging")
            layout_ = settings.resolved_layout
            if layout_ == "distinct":
                setattr(plan.config, plan.arch.count_key, settings.to)
                plan.config.save_pretrained(str(dest.tmp))
                copy_side_files_of(reader.folder, dest.tmp, skip=("config.json",))
            else:
                copy_side_files_of(reader.folder, dest.tmp)
            report = _report(plan, settings, stats, groups, time.perf_counter() - start)
            (dest.tmp / "moe_compress.json").write_text(json.dumps(report, indent=2) + "\n")
            (dest.tmp / "README.md").write_text(
                model_card("Compressed mixture of experts", _card_lines(report), None, __version__)
            )
            path = dest.commit()
        except BaseException as exc:
            dest.fail(exc)
            raise
        finally:
            dest.close_workdir()
    finally:
        reader.close()
    return CompressResult(path=path, report=report, stats=written, statistics=stats, groups=dict(groups))


def _report(
    plan: CompressPlan,
    settings: CompressSettings,
    stats: RoutingStats,
    groups: Mapping[int, LayerGroups],
    seconds: float,
) -> dict[str, Any]:
    layout = settings.resolved_layout
    return {
        "input": plan.label,
        "architecture": plan.arch.name,
        "method": settings.method,
        "experimental": settings.method == "submoe",
        "settings": settings.model_dump(mode="json"),
        "layout": layout,
        "router": (
            "unchanged: every member's slot holds its group's merged expert"
            if layout == "shared"
            else f"{settings.router_rows} rows of each group (distinct experts)"
            if settings.method != "prune-frequency"
            else "rows of the kept experts"
        ),
        "experts_before": plan.num_experts,
        "experts_per_layer": {str(layer): g.k for layer, g in groups.items()},
        "experts_stored_per_layer": plan.num_experts if layout == "shared" else settings.to,
        "groups": {str(layer): g.as_dict() for layer, g in groups.items()},
        "statistics": stats.summary(),
        "seconds": seconds,
    }


def _card_lines(report: Mapping[str, Any]) -> list[str]:
    ks = sorted(set(report["experts_per_layer"].values()))
    return [
        f"input: {report['input']} ({report['architecture']}, {report['experts_before']} experts per layer)",
        f"method: {report['method']}{' (experimental)' if report['experimental'] else ''}",
        f"distinct experts per layer: {', '.join(map(str, ks))}",
        f"layout: {report['layout']}; router: {report['router']}",
        "groups per layer: moe_compress.json",
    ]
