"""Building routed models: ``twin_merging``, ``split_merge``, ``smile``, ``wemoe``, and routers for
TALL masks / EMR.

:func:`build_routed` (what ``mergelab merge`` and :func:`mergelab.merge` run for these methods)
writes a routed-model folder (:mod:`mergelab.routed.bundle`) in three passes, all inside one
temporary folder published with one rename:

1. ``shared/``: a plain checkpoint. Twin-Merging and WEMoE run a registered merge through
   :func:`mergelab.merge` (task arithmetic by default, any method for Twin-Merging); SMILE copies
   the base (or averages the non-linear modules), Split-Merge writes θc, tensor by tensor;
2. ``experts/<name>/``: module by module, the base, shared and expert tensors are read and the
   method's pure function (:mod:`mergelab.routed.twin`, ``smile``, ``wemoe``, ``split_merge``)
   gives each expert's LoRA factors and dense parts, written as PEFT adapters
   (:mod:`mergelab.routed.adapters`); memory: one module's tensors of every model (the adapter
   writers spool to disk; only biases and SMILE's gates, T · gate_k · in per linear layer, stay);
3. ``router/``: a sequence router trained on the experts' train rows and selected on their
   validation rows (Twin-Merging, Split-Merge; memory: the shared model and the rows' features),
   SMILE's gates (from pass 2), or WEMoE's gates trained by entropy minimisation on unlabeled
   inputs (memory: the base's feed-forward tensors, read again from the base while
   ``router/router.safetensors`` is written, then, for training, the routed model: the shared
   model plus every expert's block updates, about (T + 1) × the feed-forward weights).

:func:`attach_router` trains the same sequence router for a TALL-masks or EMR output (its shared
checkpoint is the output itself) and writes it to ``routed/router/``: those outputs then run
without the task id (:class:`mergelab.routed.RoutedModel`).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from mergelab.checkpoint.reader import CheckpointReader, open_checkpoint, weight_files
from mergelab.checkpoint.writer import (
    DEFAULT_MAX_SHARD,
    AtomicOutputDir,
    ShardedSafetensorsWriter,
    copy_side_files_of,
    parse_size,
)
from mergelab.data.config import CalibrationSource
from mergelab.errors import CheckpointError, OptionError, ParameterError, PlanError, RecipeError
from mergelab.lora.factors import LoraFactors
from mergelab.recipe import Recipe, load_recipe
from mergelab.routed.adapters import ExpertAdapterWriter
from mergelab.routed.bundle import (
    EXPERTS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    ROUTER,
    ROUTER_DATA,
    SHARED,
    storage_report,
)
from mergelab.routed.data import RouterData, check_router_source, expert_rows, rows_record
from mergelab.routed.format import task_names
from mergelab.routed.settings import RouterSettings
from mergelab.routed.smile import SmileParams, smile_layer
from mergelab.routed.split_merge import SplitMergeParams, compress_complement, split
from mergelab.routed.structure import ModelStructure, ModuleInfo, meta_model, model_structure, require_mlp_blocks
from mergelab.routed.twin import TwinParams, compress, twin_rank
from mergelab.routed.wemoe import WemoeParams, identity_factors


@dataclass(frozen=True)
class RoutedMethod:
    """A routed method: its name, paper, parameters and router."""

    name: str
    paper: str
    summary: str
    params: type[BaseModel]
    router: str  # sequence_mlp | smile | wemoe
    mixing: str
    granularity: str
    experimental: bool = False
    min_experts: int = 1


ROUTED_METHODS: dict[str, RoutedMethod] = {
    "twin_merging": RoutedMethod(
        "twin_merging",
        "Lu et al. 2024, Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging, NeurIPS, "
        "arXiv:2406.15479",
        "Shared merge θ* + per-expert SVD of θₜ − θ* (rank ⌊d·min(m, n)⌋), mixed by a router's softmax per input.",
        TwinParams,
        "sequence_mlp",
        "softmax",
        "sequence",
    ),
    "split_merge": RoutedMethod(
        "split_merge",
        "Gorantla et al. 2025, Split-Merge, EMNLP 2025 (main), anthology 2025.emnlp-main.1533 (no public code)",
        "Common dimensions averaged, complementary ones per expert as principal components × a scalar; top-1 router "
        "(experimental: the split criterion is not published).",
        SplitMergeParams,
        "sequence_mlp",
        "top1",
        "sequence",
        experimental=True,
    ),
    "smile": RoutedMethod(
        "smile",
        "Tang et al. 2024, SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From Pre-Trained "
        "Foundation Models, arXiv:2408.10174",
        "Per linear layer, rank-k SVD experts of Wₜ − W0 routed per token by ‖Vₜ[:, :gate_k]ᵀx‖ (no training).",
        SmileParams,
        "smile",
        "softmax-topk",
        "token",
        min_experts=1,
    ),
    "wemoe": RoutedMethod(
        "wemoe",
        "Tang et al. 2024, Merging Multi-Task Models via Weight-Ensembling Mixture of Experts, ICML, arXiv:2402.00433",
        "Task arithmetic outside the feed-forward blocks; each block mixes its task vectors by an input-dependent "
        "gate trained by test-time entropy minimisation.",
        WemoeParams,
        "wemoe",
        "gates (raw, no softmax)",
        "sequence",
        min_experts=1,
    ),
}
"""The routed methods, by name (``mergelab merge`` dispatches these recipes here)."""


def is_routed_method(name: str) -> bool:
    return name in ROUTED_METHODS


@dataclass
class RoutedResult:
    """Where the routed model went, its manifest and what the build measured."""

    path: Path
    manifest: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)


def _params(spec: RoutedMethod, raw: Mapping[str, Any]) -> Any:
    try:
        return spec.params.model_validate(dict(raw))
    except ValidationError as exc:
        errs = "; ".join(f"{'.'.join(str(x) for x in e['loc']) or 'parameters'}: {e['msg']}" for e in exc.errors())
        raise ParameterError(
            f"{spec.name} parameters: {errs} (see `mergelab methods` / the README's routed table)"
        ) from None


def _torch_dtype(name: str) -> torch.dtype:
    return torch.float64 if name == "float64" else torch.float32


def check_routed_recipe(
    rec: Recipe, router_data: Sequence[Any] | None = None, calibration: Sequence[Any] | None = None
) -> tuple[RoutedMethod, Any]:
    """Everything that can be checked before any model is read: method, parameters, base, data sources."""
    spec = ROUTED_METHODS.get(rec.merge_method)
    if spec is None:
        raise RecipeError(f"{rec.merge_method} is not a routed method ({', '.join(ROUTED_METHODS)})")
    if "mixing" in rec.parameters:
        raise ParameterError(
            f"{spec.name} parameters: mixing is not a method parameter; set the routing weights in the recipe's "
            "router: block (router: {mixing: softmax|top1|topk, top_k: K})"
            + ("" if spec.router == "sequence_mlp" else f" ({spec.name} routes with its own gates and has none)")
        )
    params = _params(spec, rec.parameters)
    if rec.base_model is None:
        raise RecipeError(f"{spec.name} needs a base_model (every expert's update is taken against it)")
    if rec.slices is not None:
        raise RecipeError(f"{spec.name} takes a `models:` list, not `slices:`")
    if rec.output == "adapter":
        raise RecipeError(f"{spec.name} writes a routed-model folder; leave out `output: adapter`")
    if len(rec.models) < spec.min_experts:
        raise RecipeError(f"{spec.name} needs at least {spec.min_experts} experts, the recipe has {len(rec.models)}")
    if router_data is not None and len(router_data) != len(rec.models):
        raise OptionError(f"router_data: {len(router_data)} entries for {len(rec.models)} experts (one per expert)")
    if spec.router == "sequence_mlp":
        _check_router_sources(rec, router_data)
    elif rec.router is not None:
        raise RecipeError(f"{spec.name} has no trained sequence router: leave out the `router:` block")
    if spec.name == "wemoe" and params.steps > 0:
        for i, m in enumerate(rec.models):
            if m.calibration is None and (calibration is None or calibration[i] is None):
                raise RecipeError(
                    f"model {m.model}: wemoe learns its gates from unlabeled inputs: give the model a `calibration:` "
                    "source (with `head:` for encoders without a task head), or set steps: 0"
                )
    return spec, params


# --------------------------------------------------------------------------------------------
# the build


def build_routed(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    force_any: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    seed: int | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
    hash_inputs: bool = True,
    progress: Any = None,
    router_data: Sequence[RouterData | None] | None = None,
    calibration: Sequence[Any] | None = None,
    out_dtype: str | None = None,
) -> RoutedResult:
    """Build the routed model of ``recipe`` into ``out`` (see the module docstring).

    ``router_data``: per expert, :class:`mergelab.routed.data.RouterData` (texts) instead of the
    recipe's sources; ``calibration``: per expert, the data-informed shared merge's calibration
    (Twin-Merging with e.g. ``shared_method: regmean``) or WEMoE's unlabeled batches
    (:class:`mergelab.informed.Calibration` with ``batches`` and ``logits_fn``).
    """
    from mergelab.api import _check_disk_options, _check_run_options, run_inputs
    from mergelab.executors.base import resolve_device, thread_limit

    rec = load_recipe(recipe)
    _check_run_options(device=device, threads=threads, seed=seed)
    _check_disk_options(out, max_shard_size, "streaming")
    spec, params = check_routed_recipe(rec, router_data, calibration)
    run_seed = rec.seed if seed is None else seed
    dev = resolve_device(device)
    shard_bytes = parse_size(max_shard_size)
    t0 = time.perf_counter()
    dest = AtomicOutputDir(out, force=force, force_any=force_any, inputs=run_inputs(recipe, rec), kind="routed")
    notes: list[str] = []
    try:
        with thread_limit(threads):
            builder = _Builder(rec, spec, params, dest.tmp, dev, run_seed, shard_bytes, hash_inputs, out_dtype)
            try:
                builder.shared(calibration)
                builder.experts()
                builder.router(router_data, calibration)
                manifest = builder.manifest(time.perf_counter() - t0)
            finally:
                builder.close()
            notes = builder.notes
        (dest.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (dest.tmp / "README.md").write_text(model_card(manifest))
        (dest.tmp / "mergelab_recipe.yaml").write_text(rec.to_yaml())
        path = dest.commit()
    except BaseException as exc:
        dest.fail(exc)
        raise
    finally:
        dest.close_workdir()
    return RoutedResult(path, manifest, time.perf_counter() - t0, notes)


@dataclass
class _Part:
    """One expert's part of one module: LoRA factors (PEFT orientation), a full bias, full saved tensors."""

    lora: LoraFactors | None = None
    bias: torch.Tensor | None = None
    saved: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Counts:
    lora: int = 0
    dense: int = 0
    ranks: list[int] = field(default_factory=list)


class _Builder:
    def __init__(
        self,
        rec: Recipe,
        spec: RoutedMethod,
        params: Any,
        root: Path,
        device: torch.device,
        seed: int,
        shard_bytes: int,
        hash_inputs: bool,
        out_dtype: str | None,
    ) -> None:
        self.rec, self.spec, self.p = rec, spec, params
        self.root, self.device, self.seed = root, device, seed
        self.shard_bytes, self.hash_inputs = shard_bytes, hash_inputs
        self.labels = [m.model for m in rec.models]
        self.names = task_names(self.labels, [m.name for m in rec.models])
        assert rec.base_model is not None
        self.base = open_checkpoint(rec.base_model)
        self.experts_r: list[CheckpointReader] = []
        for m in rec.models:
            self.experts_r.append(
                open_checkpoint(m.model, base=self.base, allow_base_mismatch=rec.allow_adapter_base_mismatch)
            )
        if self.base.folder is None:
            raise CheckpointError(f"{rec.base_model}: the base must be a local Hugging Face folder (config.json)")
        self._check_inputs()
        metas = self.base.tensors()
        self.structure: ModelStructure = model_structure(
            self.base.folder, {n: m.shape for n, m in metas.items()}, self._kind_request()
        )
        self.out_dtype = self._out_dtype(out_dtype)
        self.shared_dir = root / SHARED
        self.shared_r: CheckpointReader | None = None
        self.extras: dict[str, torch.Tensor] = {}  # router tensors gathered in the expert pass
        self._wemoe_has_lora = [False] * len(self.names)  # wemoe: which experts have their one LoRA module
        self.expert_info: list[dict[str, Any]] = [{} for _ in self.names]
        self.router_info: dict[str, Any] = {}
        self.shared_info: dict[str, Any] = {}
        self.notes: list[str] = []

    # --- inputs --------------------------------------------------------------------------------

    def _kind_request(self) -> str:
        cal = self.rec.calibration
        return cal.model_type if cal is not None else "auto"

    def _check_inputs(self) -> None:
        metas = self.base.tensors()
        for r, label in zip(self.experts_r, self.labels):
            em = r.tensors()
            for name, m in metas.items():
                if not m.dtype.is_floating_point:
                    continue
                if name not in em:
                    raise PlanError(
                        f"{label}: tensor {name!r} of the base is missing; experts must share the base's tensors"
                    )
                if tuple(em[name].shape) != tuple(m.shape):
                    raise PlanError(
                        f"{label}: tensor {name!r} has shape {list(em[name].shape)}, the base {list(m.shape)}; "
                        "routed methods need experts of the base's architecture (task heads of other sizes: keep them "
                        "outside the checkpoint)"
                    )

    def _out_dtype(self, out_dtype: str | None) -> torch.dtype:
        from mergelab.recipe import parse_dtype

        dt = parse_dtype(out_dtype, "out_dtype") or self.rec.output_dtype
        if dt is not None:
            return dt
        for m in self.base.tensors().values():
            if m.dtype.is_floating_point:
                return m.dtype
        return torch.float32

    def close(self) -> None:
        for r in [self.base, *self.experts_r, *([self.shared_r] if self.shared_r is not None else [])]:
            r.close()

    def _read(self, reader: CheckpointReader, name: str) -> torch.Tensor:
        t = reader.read(name)
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{getattr(reader, 'label', '?')}: tensor {name!r} holds NaN or Inf values")
        return t.to(device=self.device, dtype=torch.float32)

    # --- pass 1: the shared model --------------------------------------------------------------

    def shared(self, calibration: Sequence[Any] | None) -> None:
        name = self.spec.name
        if name == "twin_merging":
            p: TwinParams = self.p
            self._merge_shared(p.shared_method, p.shared_recipe_parameters(), p.shared_model_parameters, calibration)
        elif name == "wemoe":
            self._merge_shared("task_arithmetic", {"lambda": self.p.init_lambda}, {}, None)
        elif name == "smile":
            self._write_shared(self._smile_shared)
            self.shared_info = {
                "method": "base" if not self.p.average_experts else "base (linear layers) + mean (other modules)"
            }
        elif name == "split_merge":
            self._write_shared(self._split_shared)
            self.shared_info = {"method": "θ0 + mean of the common parts (Split-Merge's θc)"}
        self.shared_r = open_checkpoint(self.shared_dir)

    def _merge_shared(
        self, method: str, parameters: Mapping[str, Any], model_parameters: Mapping[str, Any], calibration: Any
    ) -> None:
        from mergelab.api import merge

        models = [
            m.model_copy(update={"parameters": dict(model_parameters), "validation": None}) for m in self.rec.models
        ]
        shared_rec = self.rec.model_copy(
            update={"merge_method": method, "parameters": dict(parameters), "models": models, "router": None}
        )
        try:
            merge(
                shared_rec,
                self.shared_dir,
                device=str(self.device),
                seed=self.seed,
                max_shard_size=self.shard_bytes,
                hash_inputs=self.hash_inputs,
                calibration=calibration if method != "task_arithmetic" else None,
                out_dtype=str(self.out_dtype).removeprefix("torch."),
            )
        except RecipeError as exc:
            raise RecipeError(f"the shared merge ({method}): {exc}") from None
        self.shared_info = {
            "method": method,
            "parameters": dict(parameters),
            "model_parameters": dict(model_parameters),
        }

    def _write_shared(self, fn: Callable[[str, torch.Tensor, list[torch.Tensor]], torch.Tensor]) -> None:
        """Write shared/ tensor by tensor: ``fn(name, base, experts)`` for float tensors, copies otherwise."""
        metas = self.base.tensors()
        items = [
            (n, self.out_dtype if m.dtype.is_floating_point else m.dtype, tuple(m.shape)) for n, m in metas.items()
        ]
        self.shared_dir.mkdir(parents=True)
        writer = ShardedSafetensorsWriter(self.shared_dir, items, self.shard_bytes)
        try:
            for n, m in metas.items():
                if not m.dtype.is_floating_point:
                    writer.add(n, self.base.read(n))
                    continue
                base = self._read(self.base, n)
                experts = [self._read(r, n) for r in self.experts_r]
                writer.add(n, fn(n, base, experts).to(self.out_dtype))
            writer.finish()
        finally:
            writer.abort()
        assert self.base.folder is not None
        copy_side_files_of(self.base.folder, self.shared_dir)
        cfg = self.shared_dir / "config.json"
        if cfg.is_file():
            data = json.loads(cfg.read_text())
            data["torch_dtype"] = str(self.out_dtype).removeprefix("torch.")
            cfg.write_text(json.dumps(data, indent=2) + "\n")

    def _smile_shared(self, name: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        info = self.structure.module_of(name)
        if not self.p.average_experts or (info is not None and info.kind in ("linear", "conv1d")):
            return base
        return torch.stack(experts).mean(0)

    def _split_shared(self, name: str, base: torch.Tensor, experts: list[torch.Tensor]) -> torch.Tensor:
        common, _, _ = split(base, experts, self.p.topk)
        return base + common

    # --- pass 2: the experts -----------------------------------------------------------------

    def experts(self) -> None:
        assert self.shared_r is not None and self.base.folder is not None
        config = json.loads((self.shared_dir / "config.json").read_text())
        writers = [
            ExpertAdapterWriter(self.root / EXPERTS / n, base_name=SHARED, base_config=config, dtype=self.out_dtype)
            for n in self.names
        ]
        counts = [_Counts() for _ in self.names]
        try:
            for info in self._modules():
                parts = self._module_parts(info)
                if parts is None:
                    continue
                for t, part in enumerate(parts):
                    if part is None:
                        continue
                    w = writers[t]
                    if part.lora is not None:
                        lora = part.lora
                        if info.kind == "conv1d":  # GPT-2 Conv1D: PEFT's fan_in_fan_out
                            lora = LoraFactors(lora.A, lora.B, lora.scaling, transposed=True)
                        w.add_lora(info.name, lora, embedding=info.kind == "embedding")
                        counts[t].lora += 1
                        counts[t].ranks.append(part.lora.rank)
                    if part.bias is not None:
                        w.add_bias(info.name, part.bias)
                        counts[t].dense += 1
                    for pname, value in part.saved.items():
                        w.add_saved(info.params[pname], value)
                    head = self._tied_embeddings().get(info.name)
                    if head is not None and "weight" in part.saved:  # PEFT's copy of a tied head
                        w.add_saved(f"{head}.weight", part.saved["weight"])
                    if part.saved:
                        counts[t].dense += 1
            for t, w in enumerate(writers):
                if not w._w.modules:
                    raise PlanError(
                        f"{self.spec.name}: expert {self.labels[t]} has no low-rank part (every matrix update is zero "
                        "or its rank rounds to 0); PEFT adapters need one: raise the rank/density parameter"
                    )
                w.finish()
        finally:
            for w in writers:
                w.abort()
        for t, c in enumerate(counts):
            ranks = c.ranks
            self.expert_info[t] = {
                "lora_modules": c.lora,
                "dense_modules": c.dense,
                "rank_min": min(ranks) if ranks else 0,
                "rank_max": max(ranks) if ranks else 0,
            }

    def _modules(self) -> list[ModuleInfo]:
        excluded = [re.compile(x) for x in getattr(self.p, "exclude", [])]
        out = []
        for info in self.structure.modules.values():
            params = {p: n for p, n in info.params.items() if not any(rx.search(n) for rx in excluded)}
            if params:
                out.append(ModuleInfo(info.name, info.kind, params, {p: info.shapes[p] for p in params}))
        if self.spec.name == "wemoe":
            blocks = self._wemoe_blocks()
            linears = {lin for b in blocks.values() for lin in b}
            out = [m for m in out if m.name in linears]
        return out

    def _wemoe_blocks(self) -> dict[str, list[str]]:
        if not hasattr(self, "_blocks"):
            assert self.base.folder is not None
            model, _, _ = meta_model(self.base.folder, self._kind_request())
            found = require_mlp_blocks(model, str(self.base.folder))
            self._blocks = {b.input_module: [lin for lin in b.linears if lin in self.structure.modules] for b in found}
        return self._blocks

    def _tensors(
        self, info: ModuleInfo
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        assert self.shared_r is not None
        base = {p: self._read(self.base, n) for p, n in info.params.items()}
        shared = {p: self._read(self.shared_r, n) for p, n in info.params.items()}
        experts = [{p: self._read(r, n) for p, n in info.params.items()} for r in self.experts_r]
        return base, shared, experts

    def _module_parts(self, info: ModuleInfo) -> list[_Part | None] | None:
        base, shared, experts = self._tensors(info)
        name = self.spec.name
        if name == "twin_merging":
            parts = self._twin(info, shared, experts)
        elif name == "smile":
            return self._smile(info, base, shared, experts)
        elif name == "wemoe":
            return self._wemoe(info, base, shared, experts)
        else:
            parts = self._split(info, base, shared, experts)
        if info.kind == "embedding" and info.name in self._tied_embeddings():
            # PEFT leaves the tied head unchanged by an embedding LoRA (and merge_and_unload then applies the
            # head's tied copy twice): the compressed update is stored whole, with the head's copy
            for part in parts:
                if part is not None and part.lora is not None:
                    part.saved = {"weight": shared["weight"] + part.lora.delta(shared["weight"].dtype).T}
                    part.lora = None
        return parts

    def _tied_embeddings(self) -> dict[str, str]:
        """Input embedding module -> the output head tied to it."""
        return {emb: head for head, emb in self.structure.tied.items()}

    @staticmethod
    def _peft(info: ModuleInfo, stored: torch.Tensor) -> torch.Tensor:
        """A stored weight in PEFT's ``out × in`` orientation (Conv1D and embeddings are stored transposed)."""
        return stored.T if info.transposed else stored

    @staticmethod
    def _lora_target(info: ModuleInfo) -> bool:
        return info.kind in ("linear", "conv1d", "embedding") and "weight" in info.params

    def _twin(
        self, info: ModuleInfo, shared: dict[str, torch.Tensor], experts: list[dict[str, torch.Tensor]]
    ) -> list[_Part | None]:
        p: TwinParams = self.p
        svd_dtype = _torch_dtype(p.svd_dtype)
        parts: list[_Part | None] = []
        for e in experts:
            changed = any(not torch.equal(e[k], shared[k]) for k in e)
            if self._lora_target(info) and p.zero_rank == "dense" and twin_rank(info.shapes["weight"], p.density) == 0:
                parts.append(_Part(saved=dict(e)) if changed else None)  # rank 0: the expert's module whole
            elif self._lora_target(info):
                v = self._peft(info, e["weight"] - shared["weight"])
                lora = compress(v, twin_rank(tuple(v.shape), p.density), svd_dtype)
                bias = e["bias"] if "bias" in e and not torch.equal(e["bias"], shared["bias"]) else None
                parts.append(_Part(lora=lora, bias=bias) if lora is not None or bias is not None else None)
            elif changed:
                parts.append(_Part(saved=dict(e)))  # 1-D (norms) and non-LoRA modules: dense
            else:
                parts.append(None)
        return parts

    def _smile(
        self,
        info: ModuleInfo,
        base: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor],
        experts: list[dict[str, torch.Tensor]],
    ) -> list[_Part | None] | None:
        if info.kind not in ("linear", "conv1d") or "weight" not in info.params:
            return None
        p: SmileParams = self.p
        got = smile_layer(
            self._peft(info, base["weight"]),
            [self._peft(info, e["weight"]) for e in experts],
            k=p.k,
            gate_k=p.gate_k,
            routing_use_diff=p.routing_use_diff,
            svd_dtype=_torch_dtype(p.svd_dtype),
        )
        if got is None:
            return None
        factors, gates = got
        self.extras[f"gate.{info.name}"] = gates.to(self.out_dtype)
        parts: list[_Part | None] = []
        for f, e in zip(factors, experts):
            bias = None
            if "bias" in e and not torch.equal(e["bias"], base["bias"]):
                bias = shared["bias"] + (e["bias"] - base["bias"])
            parts.append(_Part(lora=f, bias=bias) if f is not None or bias is not None else None)
        return parts

    def _wemoe(
        self,
        info: ModuleInfo,
        base: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor],
        experts: list[dict[str, torch.Tensor]],
    ) -> list[_Part | None]:
        """Each expert's block matrix whole (``modules_to_save``: θₜ's weight and bias), except its first
        changed matrix, stored as exact LoRA factors because a PEFT adapter needs one LoRA module (factors
        of full rank cost min(m, n)² more than the dense matrix: once per expert, not per matrix)."""
        parts: list[_Part | None] = []
        for t, e in enumerate(experts):
            delta = self._peft(info, e["weight"] - shared["weight"])
            if not self._wemoe_has_lora[t] and bool(delta.any()):
                self._wemoe_has_lora[t] = True
                bias = e["bias"] if "bias" in e and not torch.equal(e["bias"], shared["bias"]) else None
                parts.append(_Part(lora=identity_factors(delta), bias=bias))
            elif any(not torch.equal(e[k], shared[k]) for k in e):
                parts.append(_Part(saved=dict(e)))
            else:
                parts.append(None)
        return parts

    def _split(
        self,
        info: ModuleInfo,
        base: dict[str, torch.Tensor],
        shared: dict[str, torch.Tensor],
        experts: list[dict[str, torch.Tensor]],
    ) -> list[_Part | None]:
        p: SplitMergeParams = self.p
        per_param = {k: split(base[k], [e[k] for e in experts], p.topk) for k in base}
        parts: list[_Part | None] = []
        for t, e in enumerate(experts):
            part = _Part()
            dense: dict[str, torch.Tensor] = {}
            for k in base:
                _, taus, comps = per_param[k]
                comp = comps[t]
                if k == "weight" and self._lora_target(info):
                    target = e[k] - shared[k] if p.scalar_fit == "residual" else taus[t]
                    rank = max(1, int(p.rank_fraction * min(comp.shape)))
                    part.lora, _ = compress_complement(
                        self._peft(info, comp), self._peft(info, target), rank, _torch_dtype(p.svd_dtype)
                    )
                elif bool(comp.any()):
                    dense[k] = shared[k] + comp
            if dense:
                full = {k: dense.get(k, shared[k]) for k in base if not (k == "weight" and self._lora_target(info))}
                if info.kind in ("linear", "conv1d"):
                    part.bias = full.get("bias")
                else:
                    part.saved = full
            parts.append(part if part.lora is not None or part.bias is not None or part.saved else None)
        return parts

    # --- pass 3: the router --------------------------------------------------------------------

    def router(self, router_data: Sequence[RouterData | None] | None, calibration: Sequence[Any] | None) -> None:
        kind = self.spec.router
        rdir = self.root / ROUTER
        if kind == "sequence_mlp":
            settings = self.rec.router or RouterSettings()
            mixing = settings.mixing or self.spec.mixing
            self.router_info = train_sequence_router(
                self.shared_dir,
                rdir,
                self.rec,
                self.names,
                settings,
                device=self.device,
                seed=self.seed if settings.seed is None else settings.seed,
                mixing=mixing,
                router_data=router_data,
            )
        elif kind == "smile":
            from mergelab.routed.router import router_config, save_router

            p: SmileParams = self.p
            cfg = router_config(
                kind="smile",
                classes=self.names,
                mixing="softmax-topk",
                top_k=p.top_k,
                granularity="token",
                gate_k=p.gate_k,
                rule="logit_t = ||G_t x||_2 with G_t the top gate_k right singular vectors of the layer's W_t - W_0; "
                "softmax over experts, top_k kept and renormalised, per token",
                layers=sorted(k[len("gate.") :] for k in self.extras if k.startswith("gate.")),
            )
            save_router(rdir, self.extras, cfg)
            self.router_info = {"kind": "smile", "trained": False, "layers": len(cfg["layers"])}
        elif kind == "wemoe":
            self.router_info = self._wemoe_router(rdir, router_data, calibration)

    def _wemoe_router(self, rdir: Path, router_data: Any, calibration: Sequence[Any] | None) -> dict[str, Any]:
        from mergelab.routed.layers import WemoeGate
        from mergelab.routed.router import router_config, save_router

        p: WemoeParams = self.p
        blocks = {b: lins for b, lins in self._wemoe_blocks().items() if lins}
        hidden = int(self.structure.config.get("hidden_size") or self.structure.config.get("n_embd") or 0)
        if not hidden:
            raise PlanError(f"{self.base.folder}/config.json: no hidden_size (or n_embd): wemoe's gates need it")
        gen = torch.Generator().manual_seed(self.seed)
        tensors: dict[str, torch.Tensor] = {}
        for lins in blocks.values():  # the base's block tensors, read again here (pass 2 keeps none of them)
            for lin in lins:
                for name in self.structure.modules[lin].params.values():
                    tensors[f"base.{name}"] = self._read(self.base, name).to("cpu", self.out_dtype)
        for block in blocks:
            gate = WemoeGate(hidden, len(self.names), p.depth, p.init_lambda)
            gate.init_weights(gen)
            for k, v in gate.state_dict().items():
                tensors[f"gate.{block}.{k}"] = v
        cfg = router_config(
            kind="wemoe",
            classes=self.names,
            mixing="gates (raw outputs, no softmax)",
            granularity="sequence",
            blocks=blocks,
            hidden_size=hidden,
            depth=p.depth,
            init_lambda=p.init_lambda,
            batch_reduce=p.batch_reduce,
            reads="each block's input hidden states, averaged over the sequence's real tokens",
        )
        save_router(rdir, tensors, cfg)
        info: dict[str, Any] = {"kind": "wemoe", "blocks": len(blocks), "steps": p.steps}
        if p.steps > 0:
            del tensors  # not held while the gates train; read back from router/ below
            (self.root / MANIFEST).write_text(json.dumps(self._manifest_core(), indent=2) + "\n")
            from mergelab.routed.router import load_router
            from mergelab.routed.train_gates import train_wemoe

            learned, history = train_wemoe(self.root, self.rec, p, self.device, self.seed, calibration)
            tensors, _ = load_router(rdir)
            tensors.update(learned)
            cfg["training"] = {
                "objective": "mean entropy of each task's predictions on unlabeled inputs (test-time adaptation)",
                "steps": p.steps,
                "lr": p.lr,
                "batch_size": p.batch_size,
                "sources": [m.calibration.describe() if m.calibration else "python" for m in self.rec.models],
                "entropy_initial": history[0] if history else None,
                "entropy_final": history[-1] if history else None,
            }
            save_router(rdir, tensors, cfg)
            info.update(cfg["training"])
            (self.root / MANIFEST).unlink()
        return info

    # --- manifest ------------------------------------------------------------------------------

    def _manifest_core(self) -> dict[str, Any]:
        from mergelab import __version__

        spec = self.spec
        experts = []
        for t, (n, label) in enumerate(zip(self.names, self.labels)):
            experts.append({"index": t, "name": n, "model": label, "adapter": f"{EXPERTS}/{n}", **self.expert_info[t]})
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "method": spec.name,
            "paper": spec.paper,
            "experimental": spec.experimental,
            "parameters": self.p.model_dump(mode="json"),
            "base_model": self.rec.base_model,
            "shared": {"folder": SHARED, **self.shared_info},
            "experts": experts,
            "routing": {"router": ROUTER, "kind": spec.router, "granularity": spec.granularity, "mixing": spec.mixing},
            "mergelab_version": __version__,
        }

    def manifest(self, seconds: float) -> dict[str, Any]:
        m = self._manifest_core()
        if self.router_info.get("mixing"):
            m["routing"]["mixing"] = self.router_info["mixing"]
        m["router"] = self.router_info
        inputs = 0
        try:
            inputs = sum(f.stat().st_size for r in self.experts_r for f in weight_files(r) if f.is_file())
        except (OSError, AttributeError, TypeError):
            inputs = 0
        for t, n in enumerate(self.names):
            from mergelab.routed.bundle import weights_bytes

            m["experts"][t]["bytes"] = weights_bytes(self.root / EXPERTS / n)
        m["storage"] = storage_report(self.root, self.names, inputs or None)
        m["serving"] = serving_entry(self.spec, self.names, m["routing"]["mixing"])
        m["load"] = load_instructions(self.structure.kind)
        m["build_seconds"] = round(seconds, 3)
        return m


def serving_entry(spec: RoutedMethod, names: Sequence[str], mixing: str) -> dict[str, Any]:
    """The manifest's ``serving`` entry; ``mixing`` is the router's resolved mixing (the ``router:``
    block's, else the method's): top-1 serving is the method itself only when that is ``top1``."""
    exact = spec.router == "sequence_mlp" and mixing == "top1"
    return {
        "base": SHARED,
        "routes": [{"route": i, "name": n, "adapter": f"{EXPERTS}/{n}"} for i, n in enumerate(names)],
        "top1_is_the_method": exact,
        "note": (
            "top-1 serving without mergelab: load shared/ in a multi-LoRA server, register each experts/<name>/ as "
            "a LoRA adapter, run the router (router/: the shared model's mean-pooled last hidden state -> MLP) on "
            "the prompt and send the request to the adapter of its argmax route. "
            + (
                "That is exactly this method's routing."
                if exact
                else f"This model mixes {mixing} ({spec.granularity}); top-1 serving approximates it."
            )
            + " The adapters also hold dense parts (biases with bias='all', normalisation layers as "
            "modules_to_save) that some servers do not load: check that yours does."
        ),
    }


def load_instructions(kind: str) -> dict[str, str]:
    auto = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification"}.get(
        kind, "AutoModel"
    )
    return {
        "mergelab": "from mergelab.routed import RoutedModel; model = RoutedModel.from_pretrained(FOLDER)",
        "transformers": f"from transformers import {auto}; shared = {auto}.from_pretrained('FOLDER/shared')",
        "peft": "from peft import PeftModel; expert = PeftModel.from_pretrained(shared, 'FOLDER/experts/<name>')",
        "extract": "mergelab extract FOLDER <name> OUT  (a plain checkpoint of that route)",
    }


def model_card(manifest: Mapping[str, Any]) -> str:
    """The README.md of a routed-model folder."""
    router = manifest.get("router") or {}
    acc = router.get("validation_accuracy")
    lines = [
        "---",
        "library_name: transformers",
        f"tags: [merge, mergelab, routed, {manifest['method']}, peft, lora]",
        "---",
        "",
        f"# {manifest['method']} routed model" + (" (experimental)" if manifest.get("experimental") else ""),
        "",
        f"Built by mergelab {manifest.get('mergelab_version', '')} with `{manifest['method']}` ({manifest['paper']}) "
        f"from the base `{manifest['base_model']}` and {len(manifest['experts'])} experts:",
        "",
    ]
    for e in manifest["experts"]:
        lines.append(
            f"* `{e['name']}` (`{e['model']}`): `{e['adapter']}/`, rank {e.get('rank_min')}–{e.get('rank_max')}"
        )
    lines += [
        "",
        f"Routing: {manifest['routing']['kind']} router, {manifest['routing']['mixing']}, per "
        f"{manifest['routing']['granularity']}."
        + (f" Router validation accuracy: {100 * acc:.1f} %." if isinstance(acc, (int, float)) else ""),
        "",
        manifest["storage"]["summary"],
        "",
        "## How to load",
        "",
        "```python",
        manifest["load"]["mergelab"],
        manifest["load"]["transformers"],
        manifest["load"]["peft"],
        "```",
        "",
        f"`{manifest['load']['extract']}`",
        "",
        manifest["serving"]["note"],
        "",
        "Parameters:",
        "",
        "```json",
        json.dumps(manifest["parameters"], indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# sequence routers (Twin-Merging, Split-Merge, routed TALL / EMR)


def train_sequence_router(
    shared_dir: Path,
    rdir: Path,
    rec: Recipe,
    names: Sequence[str],
    settings: RouterSettings,
    *,
    device: torch.device,
    seed: int,
    mixing: str,
    router_data: Sequence[RouterData | None] | None = None,
) -> dict[str, Any]:
    """Train the sequence router on the shared model's features and write ``rdir`` (see
    :mod:`mergelab.routed.router`); returns the manifest's router entry."""
    from mergelab.data.sources import load_tokenizer, tokenize_batches
    from mergelab.informed.modeling import detect_kind, load_model, read_config
    from mergelab.routed.router import FEATURE_DTYPE, pooled_features, router_config, save_router, train_router

    labels = [m.model for m in rec.models]
    rows = expert_rows(
        names,
        labels,
        [m.calibration for m in rec.models],
        [m.validation for m in rec.models],
        settings,
        router_data,
    )
    kind = detect_kind(read_config(shared_dir), rec.calibration.model_type if rec.calibration else "auto")
    model = load_model(shared_dir, kind, device, getattr(torch, FEATURE_DTYPE))
    tok = load_tokenizer(shared_dir)
    tok.padding_side, tok.truncation_side = "right", "right"  # the rows as RoutedModel's prepass sees them

    def feats(texts: Sequence[str]) -> torch.Tensor:
        batches = tokenize_batches(tok, texts, batch_size=settings.feature_batch_size, max_length=settings.max_length)
        return pooled_features(model, batches, device, settings.max_length)

    t0 = time.perf_counter()
    xs, ys, vxs, vys = [], [], [], []
    for t, r in enumerate(rows):
        if not len(r.train) or not len(r.validation):
            raise RecipeError(f"model {labels[t]}: no router rows ({r.train.source})")
        xs.append(feats(r.train.texts))
        ys.append(torch.full((len(r.train),), t, dtype=torch.long))
        vxs.append(feats(r.validation.texts))
        vys.append(torch.full((len(r.validation),), t, dtype=torch.long))
    feature_seconds = time.perf_counter() - t0
    x, y, vx, vy = torch.cat(xs), torch.cat(ys), torch.cat(vxs), torch.cat(vys)
    res = train_router(
        x,
        y,
        vx,
        vy,
        len(names),
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        hidden=settings.hidden,
        dropout=settings.dropout,
        seed=seed,
    )
    hidden = settings.hidden or 2 * x.shape[1]
    cfg = router_config(
        kind="sequence_mlp",
        classes=names,
        features=int(x.shape[1]),
        hidden=hidden,
        mixing=mixing,
        temperature=settings.temperature,
        top_k=settings.top_k,
        dropout=settings.dropout,
        max_length=settings.max_length,
        feature_dtype=FEATURE_DTYPE,
        validation_accuracy=res.validation_accuracy,
        train_accuracy=res.train_accuracy,
        best_epoch=res.best_epoch,
        training={
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "steps_per_epoch": res.steps_per_epoch,
            "steps": res.steps,
            "lr": settings.lr,
            "optimizer": "Adam",
            "selection": "best validation accuracy (validation rows only; never test rows)",
            "rows": {"train": int(x.shape[0]), "validation": int(vx.shape[0])},
            "max_length": settings.max_length,
            "seed": seed,
        },
    )
    save_router(rdir, res.state, cfg)
    (rdir / ROUTER_DATA).write_text(json.dumps(rows_record(rows), indent=1) + "\n")
    return {
        "kind": "sequence_mlp",
        "classes": list(names),
        "mixing": mixing,
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "validation_accuracy": res.validation_accuracy,
        "train_accuracy": res.train_accuracy,
        "best_epoch": res.best_epoch,
        "rows": {"train": int(x.shape[0]), "validation": int(vx.shape[0])},
        "batch_size": settings.batch_size,
        "steps_per_epoch": res.steps_per_epoch,
        "steps": res.steps,
        "data": f"{ROUTER}/{ROUTER_DATA}",
        "seconds": round(feature_seconds + res.seconds, 3),
        "sources": {r.name: {"train": r.train.source, "validation": r.validation.source} for r in rows},
    }


def attach_router(
    folder: Path,
    rec: Recipe,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    router_data: Sequence[RouterData | None] | None = None,
) -> dict[str, Any]:
    """Train a sequence router for the TALL-masks / EMR output being written in ``folder`` (its
    checkpoint is the shared model) into ``folder/routed/router/`` and record it in the manifest."""
    from mergelab.executors.base import resolve_device
    from mergelab.routed.format import MANIFEST as MASKS_MANIFEST
    from mergelab.routed.format import routed_dir

    settings = rec.router or RouterSettings()
    mpath = routed_dir(folder) / MASKS_MANIFEST
    manifest = json.loads(mpath.read_text())
    names = [t["name"] for t in manifest["tasks"]]
    info = train_sequence_router(
        folder,
        routed_dir(folder) / "router",
        rec,
        names,
        settings,
        device=resolve_device(str(device)),
        seed=seed if settings.seed is None else settings.seed,
        mixing=settings.mixing or "top1",
        router_data=router_data,
    )
    info["data"] = "routed/router/" + ROUTER_DATA
    manifest["router"] = {**info, "folder": "router"}
    mpath.write_text(json.dumps(manifest, indent=2) + "\n")
    return info


def check_router_block(rec: Recipe, router_data: Sequence[Any] | None = None) -> None:
    """A ``router:`` block on a registered method: only tall_masks / emr take one; every model needs train rows."""
    if rec.router is None:
        return
    from mergelab.methods import get_method

    if get_method(rec.merge_method).outputs != "routed":
        raise RecipeError(
            f"router: only routed outputs take a router (tall_masks, emr, or the routed methods "
            f"{', '.join(ROUTED_METHODS)}); {rec.merge_method} writes one model"
        )
    _check_router_sources(rec, router_data)


def _check_router_sources(rec: Recipe, router_data: Sequence[Any] | None) -> None:
    """Every model without rows in ``router_data`` names the router's training rows (``calibration``) and,
    when given, its validation rows: checked before any model is read."""
    for i, m in enumerate(rec.models):
        if router_data is not None and router_data[i] is not None:
            continue
        check_router_source(m.calibration, m.model)
        if m.validation is not None:
            check_router_source(m.validation, m.model, "validation")


def source_of(value: Any) -> CalibrationSource | None:
    return value if isinstance(value, CalibrationSource) else None
