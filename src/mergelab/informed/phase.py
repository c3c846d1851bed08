"""The data phase: statistics for data-informed methods, computed before the streamed merge.

``mergelab.merge`` calls :func:`run_data_phase` when the recipe's method declares ``statistics``.
The phase loads each expert with transformers (or takes the nn.Module given from Python), runs
the method's passes over that expert's calibration data on the chosen device, in eval mode, with
gradients only where needed, and writes one statistics folder per expert (see
:mod:`mergelab.informed.stats`). The plan then gets one reader per expert, and the engine hands
each merged tensor's entries to the method (``ctx.statistics``).

========================= =================================== ====================================
statistics (collector)    methods                              what runs
========================= =================================== ====================================
``fisher``                fisher                               per-example squared gradients, per expert
``gram``                  regmean                              forward hooks on linear layers, per expert
``gram_plusplus``         regmean_plusplus                     block-by-block merge (all experts at once)
``adamerging``            adamerging                           Adam on λ (all experts at once)
========================= =================================== ====================================

Statistics are kept in ``calibration.statistics_dir`` when set (reused when the models' files,
the data and the settings are unchanged) and otherwise in a temporary folder that is removed after
the merge. Before each pass the phase states the memory it expects to use.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import resource
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from mergelab.checkpoint.reader import CheckpointReader, weight_files
from mergelab.checkpoint.writer import fmt_bytes, parse_size
from mergelab.data.config import CalibrationSettings, CalibrationSource
from mergelab.data.sources import (
    check_source,
    label_ids,
    load_examples,
    load_tokenizer,
    take_examples,
    tokenize_batches,
    zoo_head_path,
)
from mergelab.errors import InternalError, PlanError, RecipeError
from mergelab.informed import stats as st
from mergelab.informed.modeling import (
    Kind,
    LinearHead,
    LogitsFn,
    checkpoint_names,
    default_logits_fn,
    detect_kind,
    linear_modules,
    load_model,
    module_weight,
    read_config,
)
from mergelab.informed.progress import DataProgress
from mergelab.methods.base import MethodOutput, TensorContext
from mergelab.plan import Plan, _split_inputs
from mergelab.recipe import parse_dtype

if TYPE_CHECKING:
    from mergelab.methods.adamerging import AdaMergingParams
    from mergelab.methods.fisher import FisherParams

DEFAULT_EXAMPLES: dict[str, int | None] = {"fisher": 256, "gram": 256, "gram_plusplus": 256, "adamerging": None}
DEFAULT_BATCH: dict[str, int] = {"fisher": 8, "gram": 16, "gram_plusplus": 16, "adamerging": 16}
# method parameters that change what a per-expert data pass computes (part of the reuse key)
PHASE_PARAMS: dict[str, tuple[str, ...]] = {"fisher": ("fisher_label", "per_example"), "gram": ()}


@dataclass
class Calibration:
    """One expert's calibration from Python, overriding the recipe's source.

    ``batches``: any iterable of dicts of tensors (``input_ids``, ``attention_mask``, optional
    ``labels``; taken up to ``num_examples`` rows); ``logits_fn(model, batch)``: logits for Fisher
    and AdaMerging (e.g. a separate head on pooled features); ``forward_fn(model, batch)``: the
    forward of RegMean's passes (default ``model(**inputs)``); ``model``: an already-loaded module
    with the expert's weights (required when the expert was given in memory).
    """

    batches: Iterable[Mapping[str, torch.Tensor]] | None = None
    logits_fn: LogitsFn | None = None
    forward_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], Any] | None = None
    model: nn.Module | None = None


@dataclass
class DataPhaseResult:
    """Statistics readers (one per expert) and what to tell the user and the model card."""

    readers: list[CheckpointReader]
    side_files: dict[str, str] = field(default_factory=dict)
    summary: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    peak_bytes: int = 0
    compute_seconds: float = 0.0
    """what computing these statistics took, also when they were reused from ``statistics_dir``"""
    cleanup: list[Path] = field(default_factory=list)

    def close(self) -> None:
        for r in self.readers:
            r.close()
        for p in self.cleanup:
            shutil.rmtree(p, ignore_errors=True)


@dataclass
class _Expert:
    index: int
    label: str
    reader: CheckpointReader
    folder: Path | None
    source: CalibrationSource | None
    cal: Calibration | None
    statistics: Any | None  # precomputed folder / mapping / reader

    @property
    def slug(self) -> str:
        """A folder name for this expert's statistics: index + the last two parts of its path."""
        parts = Path(self.label.rstrip("/")).parts[-2:] if self.folder is not None else (self.label,)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts)).strip("_")
        return f"{self.index:02d}-" + (name[-64:] or "expert")


def _experts(plan: Plan, calibration: Sequence[Any] | None, statistics: Sequence[Any] | None) -> list[_Expert]:
    _, idx = _split_inputs(plan.recipe, plan.method)
    n = len(plan.experts)
    for what, seq in (("calibration", calibration), ("statistics", statistics)):
        if seq is not None and len(seq) != n:
            raise RecipeError(
                f"{what}: {len(seq)} entries for {n} experts (give one per expert, None to keep the recipe's)"
            )
    settings = plan.recipe.calibration
    out = []
    for i, (reader, mi) in enumerate(zip(plan.experts, idx)):
        entry = plan.recipe.models[mi]
        cal = calibration[i] if calibration is not None else None
        if cal is not None and not isinstance(cal, Calibration):
            cal = Calibration(batches=cal)
        stat = statistics[i] if statistics is not None and statistics[i] is not None else entry.statistics
        source = entry.calibration or (settings.source if settings is not None else None)
        out.append(_Expert(i, reader.label, reader, reader.folder, source, cal, stat))
    return out


def check_calibration(
    plan: Plan, calibration: Sequence[Any] | None = None, statistics: Sequence[Any] | None = None
) -> None:
    """Fail early (before any model is loaded) when an expert has no calibration data or a file is missing."""
    if plan.method.statistics is None:
        return
    for e in _experts(plan, calibration, statistics):
        if e.statistics is not None:
            if isinstance(e.statistics, (str, os.PathLike)) and not Path(e.statistics).exists():
                raise RecipeError(f"model {e.label}: statistics folder {e.statistics} not found")
            continue
        if e.cal is not None and e.cal.batches is not None:
            continue
        if e.source is None:
            raise RecipeError(
                f"merge_method {plan.method.name} needs calibration data: give model {e.label} a `calibration:` source "
                "(a JSONL/text file or zoo:<task>), a precomputed `statistics:` folder, or batches from Python"
            )
        check_source(e.source)
    joint = plan.method.statistics in ("gram_plusplus", "adamerging")
    exps = _experts(plan, calibration, statistics)
    if joint and any(e.statistics is not None for e in exps) and not all(e.statistics is not None for e in exps):
        raise RecipeError(
            f"{plan.method.name} learns its statistics from all experts at once: give precomputed "
            "statistics for every expert or for none"
        )


# ------------------------------------------------------------------------------------------
# helpers


def _file_identity(path: Path) -> list[Any]:
    s = path.stat()
    return [str(path.resolve()), s.st_size, s.st_mtime_ns]


def _model_identity(reader: CheckpointReader) -> list[Any] | None:
    if reader.folder is None:
        return None
    return [_file_identity(p) for p in weight_files(reader)]


def _source_identity(e: _Expert) -> Any:
    if e.cal is not None and (
        e.cal.batches is not None
        or e.cal.logits_fn is not None
        or e.cal.forward_fn is not None
        or e.cal.model is not None
    ):
        return None  # Python objects: no reuse
    if e.source is None:
        return None
    ident: dict[str, Any] = e.source.model_dump()
    if e.source.path is not None:
        ident["file"] = _file_identity(Path(e.source.path))
    if e.source.head not in (None, "zoo"):
        ident["head_file"] = _file_identity(Path(e.source.head))
    return ident


def _key(payload: Mapping[str, Any]) -> str | None:
    """A reuse key, or None when a model or a source has no stable identity (in memory, Python objects)."""
    if any(payload.get(k) is None for k in ("model", "source") if k in payload) or any(
        v is None for k in ("models", "sources") for v in payload.get(k, [])
    ):
        return None
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _settings(plan: Plan) -> CalibrationSettings:
    return plan.recipe.calibration or CalibrationSettings()


def _settings_ident(s: CalibrationSettings) -> dict[str, Any]:
    d = s.model_dump()
    for k in ("statistics_dir", "memory_budget", "source"):
        d.pop(k, None)
    return d


def _num_examples(e: _Expert, s: CalibrationSettings, collector: str) -> int | None:
    if e.source is not None and e.source.num_examples is not None:
        return e.source.num_examples
    return s.num_examples if s.num_examples is not None else DEFAULT_EXAMPLES[collector]


def _head(e: _Expert, pooling: str) -> LinearHead | None:
    if e.source is None or e.source.head is None:
        return None
    if e.source.head == "zoo":
        assert e.source.zoo_task is not None  # CalibrationSource checks that head: zoo names a zoo_task
        path = zoo_head_path(e.source.zoo_task, e.source.zoo)
    else:
        path = Path(e.source.head)
    return LinearHead.load(path, pooling)


def _batches(
    e: _Expert,
    s: CalibrationSettings,
    collector: str,
    tok_folder: Path | None,
    head: LinearHead | None,
    config: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    n = _num_examples(e, s, collector)
    if e.cal is not None and e.cal.batches is not None:
        return list(take_examples(e.cal.batches, n))
    if e.source is None:
        raise RecipeError(f"model {e.label}: no calibration data")
    ex = load_examples(e.source, n)
    if tok_folder is None:
        raise RecipeError(f"model {e.label}: no tokenizer folder; pass tokenized batches from Python")
    tok = load_tokenizer(tok_folder)
    labels = None
    if ex.labels is not None:
        names = (head.labels if head is not None else None) or ex.label_names
        if names is None and config and isinstance(config.get("label2id"), dict):
            names = sorted(config["label2id"], key=lambda k: config["label2id"][k])
        try:
            labels = label_ids(ex.labels, names)
        except RecipeError:
            labels = None  # only the empirical Fisher needs labels; it says so
    return tokenize_batches(
        tok, ex.texts, batch_size=s.batch_size or DEFAULT_BATCH[collector], max_length=s.max_length, labels=labels
    )


def _tok_folder(e: _Expert, plan: Plan) -> Path | None:
    for folder in (e.folder, plan.base.folder if plan.base is not None else None, plan.reference.folder):
        if folder is not None and any(
            (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")
        ):
            return folder
    return e.folder


def _model(
    e: _Expert, s: CalibrationSettings, device: torch.device, dtype: torch.dtype, folder: Path | None = None
) -> tuple[nn.Module, Kind]:
    if e.cal is not None and e.cal.model is not None and folder is None:
        m = e.cal.model.to(device).eval()
        cfg: Any = getattr(m, "config", None)
        cfg_dict = dict(cfg.to_dict()) if hasattr(cfg, "to_dict") else {}
        if not cfg_dict.get("architectures"):
            cfg_dict["architectures"] = [type(m).__name__]
        return m, detect_kind(cfg_dict, s.model_type)
    own = folder is None
    folder = folder or e.folder
    if folder is None:
        raise RecipeError(f"model {e.label} was given in memory: pass Calibration(model=...) with its nn.Module")
    kind = detect_kind(read_config(folder), s.model_type)
    model = load_model(folder, kind, device, dtype)
    apply = getattr(e.reader, "apply_to_module", None)
    if own and callable(apply):  # a LoRA adapter: e.folder is its base's; write the adapted tensors in
        apply(model)
    return model, kind


def _merge_names(plan: Plan) -> set[str]:
    return {j.name for j in plan.merge_jobs}


def _groups(items: Sequence[tuple[str, int]], budget: int) -> list[list[str]]:
    """Consecutive groups whose byte sizes sum to at most ``budget`` (an item larger than it alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, nbytes in items:
        if groups[-1] and size + nbytes > budget:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return [g for g in groups if g]


def _peak(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _compute_seconds(collector: str, folders: Sequence[Path]) -> float:
    """Seconds that computing the statistics in ``folders`` took (recorded in their metadata): one
    pass per expert (Fisher, Gram) adds up; a joint pass (RegMean++, AdaMerging) is recorded in each."""
    secs = [float((st.read_meta(f) or {}).get("seconds", 0.0)) for f in folders]
    if not secs:
        return 0.0
    side = Path(folders[0]).parent / "adamerging_coefficients.json"
    if collector == "adamerging" and not any(secs) and side.is_file():  # written before metas had seconds
        secs = [float(json.loads(side.read_text()).get("seconds", 0.0))]
    return max(secs) if collector in ("gram_plusplus", "adamerging") else sum(secs)


def _reuse(folder: Path, key: str | None, dp: DataProgress, label: str, summary: dict[str, str]) -> bool:
    if key is None:
        return False
    meta = st.read_meta(folder)
    if meta is not None and meta.get("key") == key:
        dp.note(f"{label}: reusing statistics in {folder}")
        took = f", computed in {meta['seconds']} s" if "seconds" in meta else ""
        summary[label] = f"reused ({meta.get('examples', '?')} examples{took})"
        return True
    return False


# ------------------------------------------------------------------------------------------
# collectors


def _collect_fisher(
    plan: Plan,
    experts: list[_Expert],
    s: CalibrationSettings,
    root: Path,
    device: torch.device,
    dp: DataProgress,
    seed: int,
) -> tuple[list[Path], dict[str, str], dict[str, str]]:
    gp = cast("FisherParams", plan.global_params)  # the fisher collector runs for the fisher method only
    budget = parse_size(s.memory_budget)
    dtype = parse_dtype(s.dtype) or torch.float32
    merge_names = _merge_names(plan)
    folders: list[Path] = []
    summary: dict[str, str] = {}
    for e in experts:
        folder = root / "fisher" / e.slug
        key = _key(
            {
                "collector": "fisher",
                "model": _model_identity(e.reader),
                "source": _source_identity(e),
                "settings": _settings_ident(s),
                "params": {k: getattr(gp, k) for k in PHASE_PARAMS["fisher"]},
                "seed": seed,
            }
        )
        folders.append(folder)
        if _reuse(folder, key, dp, e.label, summary):
            continue
        model, kind = _model(e, s, device, dtype)
        head = _head(e, s.pooling)
        logits_fn = (
            e.cal.logits_fn if e.cal is not None and e.cal.logits_fn is not None else default_logits_fn(kind, head)
        )
        batches = _batches(e, s, "fisher", _tok_folder(e, plan), head, read_config(e.folder))
        mapping = {m: c for m, c in checkpoint_names(model, e.reader.tensors()).items() if c in merge_names}
        if not mapping:
            raise PlanError(f"{e.label}: none of the model's parameters are merged tensors of the checkpoint")
        params = dict(model.named_parameters())
        sizes = [(m, params[m].numel() * 4) for m in mapping]
        total = sum(b for _, b in sizes)
        groups = _groups(sizes, budget)
        n_ex = sum(int(next(iter(b.values())).shape[0]) for b in batches)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        dp.note(
            f"{e.label}: Fisher of {len(mapping)} tensors on {n_ex} examples ({kind}); expected memory on {device}: "
            f"model {fmt_bytes(model_bytes)} + gradients {fmt_bytes(total)} + accumulators "
            f"{fmt_bytes(min(total, budget))}; on disk {fmt_bytes(total)}"
            + (f"; {len(groups)} passes (memory_budget {fmt_bytes(budget)})" if len(groups) > 1 else "")
        )
        writer = st.StatisticsWriter(
            folder,
            [(st.key(mapping[m], "fisher"), torch.float32, tuple(params[m].shape)) for m in mapping],
            {"kind": "fisher", "model": e.label, "key": key},
        )
        t0 = time.perf_counter()
        try:
            from mergelab.informed.fisher import fisher_diagonal

            res = None
            for gi, group in enumerate(groups):
                desc = f"fisher {e.slug}" + (f" [{gi + 1}/{len(groups)}]" if len(groups) > 1 else "")
                with dp.task(desc, n_ex) as advance:
                    res = fisher_diagonal(
                        model,
                        batches,
                        logits_fn=logits_fn,
                        label=gp.fisher_label,
                        num_examples=None,
                        names=group,
                        per_example=gp.per_example,
                        seed=seed,
                        device=device,
                        advance=advance,
                    )
                for m, f in res.fisher.items():
                    writer.add(st.key(mapping[m], "fisher"), f)
                del res.fisher
            assert res is not None
            writer.finish(
                examples=res.examples,
                label=res.label,
                per_example=res.per_example,
                task=res.kind,
                seconds=round(time.perf_counter() - t0, 3),
            )
            summary[e.label] = f"{res.examples} examples, label {res.label}, per-example {res.per_example}"
        except BaseException:
            writer.abort()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            del model
    return folders, {}, summary


def _collect_gram(
    plan: Plan,
    experts: list[_Expert],
    s: CalibrationSettings,
    root: Path,
    device: torch.device,
    dp: DataProgress,
    seed: int,
) -> tuple[list[Path], dict[str, str], dict[str, str]]:
    from mergelab.informed.gram import gram_matrices

    budget = parse_size(s.memory_budget)
    dtype = parse_dtype(s.dtype) or torch.float32
    merge_names = _merge_names(plan)
    folders: list[Path] = []
    summary: dict[str, str] = {}
    for e in experts:
        folder = root / "gram" / e.slug
        key = _key(
            {
                "collector": "gram",
                "model": _model_identity(e.reader),
                "source": _source_identity(e),
                "settings": _settings_ident(s),
            }
        )
        folders.append(folder)
        if _reuse(folder, key, dp, e.label, summary):
            continue
        model, _ = _model(e, s, device, dtype)
        batches = _batches(e, s, "gram", _tok_folder(e, plan), None, read_config(e.folder))
        mapping = checkpoint_names(model, e.reader.tensors())
        lin = {
            m: (mod, io) for m, (mod, io) in linear_modules(model).items() if mapping.get(f"{m}.weight") in merge_names
        }
        d_in = {m: int(module_weight(mod).shape[0 if io else 1]) for m, (mod, io) in lin.items()}
        sizes = [(m, d * d * 4) for m, d in d_in.items()]
        total = sum(b for _, b in sizes)
        groups = _groups(sizes, budget)
        n_ex = sum(int(next(iter(b.values())).shape[0]) for b in batches)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        dp.note(
            f"{e.label}: Gram matrices of {len(lin)} linear layers on {n_ex} examples: Σ d_in² × 4 B = "
            f"{fmt_bytes(total)} per expert ({fmt_bytes(total * len(experts))} for {len(experts)} experts on disk); "
            f"expected memory on {device}: model {fmt_bytes(model_bytes)} + Grams {fmt_bytes(min(total, budget))}"
            + (f"; {len(groups)} passes (memory_budget {fmt_bytes(budget)})" if len(groups) > 1 else "")
        )
        specs = []
        for m, d in d_in.items():
            ck = mapping[f"{m}.weight"]
            specs += [(st.key(ck, "gram"), torch.float32, (d, d)), (st.key(ck, "rows"), torch.float64, ())]
            if lin[m][1]:
                specs.append((st.key(ck, "in_out"), torch.float32, ()))
        writer = st.StatisticsWriter(folder, specs, {"kind": "gram", "model": e.label, "key": key})
        t0 = time.perf_counter()
        fwd = e.cal.forward_fn if e.cal is not None else None
        try:
            seen = 0
            for gi, group in enumerate(groups):
                desc = f"gram {e.slug}" + (f" [{gi + 1}/{len(groups)}]" if len(groups) > 1 else "")
                with dp.task(desc, n_ex) as advance:
                    res, seen = gram_matrices(
                        model,
                        batches,
                        modules={m: lin[m][0] for m in group},
                        num_examples=None,
                        forward_fn=fwd,
                        device=device,
                        advance=advance,
                    )
                for m, (g, rows) in res.items():
                    ck = mapping[f"{m}.weight"]
                    writer.add(st.key(ck, "gram"), g)
                    writer.add(st.key(ck, "rows"), torch.tensor(float(rows), dtype=torch.float64))
                    if lin[m][1]:
                        writer.add(st.key(ck, "in_out"), torch.ones((), dtype=torch.float32))
                del res
            writer.finish(examples=seen, seconds=round(time.perf_counter() - t0, 3), bytes=total)
            summary[e.label] = f"{seen} examples, {len(lin)} linear layers, Grams {fmt_bytes(total)}"
        except BaseException:
            writer.abort()
            shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            del model
    return folders, {}, summary


def _joint_key(plan: Plan, experts: list[_Expert], s: CalibrationSettings, collector: str, seed: int) -> str | None:
    jobs = plan.merge_jobs
    return _key(
        {
            "collector": collector,
            "models": [_model_identity(e.reader) for e in experts],
            "base": _model_identity(plan.base) if plan.base is not None else "none",
            "sources": [_source_identity(e) for e in experts],
            "settings": _settings_ident(s),
            "params": repr(plan.global_params),
            "model_params": [repr(m) for m in plan.global_model_params],
            "per_tensor": hashlib.sha256(repr([(j.name, j.params, j.model_params) for j in jobs]).encode()).hexdigest(),
            "seed": seed,
        }
    )


def _merge_tensor_fn(
    plan: Plan, device: torch.device, compute_dtype: torch.dtype, seed: int, to_ckpt: Mapping[str, str]
) -> Callable[[str, list[dict[str, torch.Tensor]]], torch.Tensor]:
    """Merge one tensor exactly as the engine will: same readers, dtype, parameters and function."""
    jobs = {j.name: j for j in plan.merge_jobs}

    def merge_tensor(module_name: str, aux: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        name = to_ckpt[module_name]
        job = jobs[name]

        def get(r: CheckpointReader) -> torch.Tensor:
            t = r.read(name)
            if job.rows is not None:
                t = t[: job.rows]
            return t.to(device=device, dtype=compute_dtype)

        base = get(plan.base) if plan.base is not None else None
        experts = [get(r) for r in plan.experts]
        ctx = TensorContext(
            name=name, seed=seed, layer=job.layer, num_layers=plan.num_layers, device=device, statistics=aux
        )
        params = job.params
        assert params is not None  # merge jobs always carry a method call
        with torch.no_grad():
            out = plan.method(base, experts, params, job.model_params, ctx)
        return out.merged if isinstance(out, MethodOutput) else out  # as the streaming executor does

    return merge_tensor


def _collect_gram_plusplus(
    plan: Plan,
    experts: list[_Expert],
    s: CalibrationSettings,
    root: Path,
    device: torch.device,
    dp: DataProgress,
    seed: int,
    compute_dtype: torch.dtype,
) -> tuple[list[Path], dict[str, str], dict[str, str]]:
    from mergelab.informed.regmean_pp import regmean_plusplus

    dtype = parse_dtype(s.dtype) or torch.float32
    key = _joint_key(plan, experts, s, "gram_plusplus", seed)
    folders = [root / f"gram_plusplus-{key or 'run'}" / e.slug for e in experts]
    if key is not None and all((meta := st.read_meta(f)) is not None and meta.get("key") == key for f in folders):
        dp.note(f"reusing RegMean++ statistics in {folders[0].parent}")
        return folders, {}, {}
    models = []
    for e in experts:
        models.append(_model(e, s, device, dtype)[0])
    import copy

    merged = copy.deepcopy(models[0])  # the architecture; every merged tensor is overwritten
    batches = [_batches(e, s, "gram_plusplus", _tok_folder(e, plan), None, read_config(e.folder)) for e in experts]
    merge_names = _merge_names(plan)
    mapping = {m: c for m, c in checkpoint_names(merged, plan.reference.tensors()).items() if c in merge_names}
    from mergelab.informed.modeling import find_blocks

    bname, blocks = find_blocks(merged)
    model_bytes = sum(p.numel() * p.element_size() for p in merged.parameters())
    lin = {m: mod for m, (mod, io) in linear_modules(merged).items() if f"{m}.weight" in mapping}
    gram_total = sum(
        int(module_weight(mod).shape[1 if isinstance(mod, nn.Linear) else 0]) ** 2 * 4 for mod in lin.values()
    )
    tokens = [sum(int(b["input_ids"].numel()) for b in bs) for bs in batches]
    hidden = int(getattr(getattr(merged, "config", None), "hidden_size", 0) or 0)
    dp.note(
        f"RegMean++ over {len(blocks)} blocks ({bname}) of {len(experts)} experts: expected memory on {device}: "
        f"{len(experts) + 1} models {fmt_bytes(model_bytes * (len(experts) + 1))} + hidden states "
        f"{fmt_bytes(sum(tokens) * hidden * 4)} + Grams of one block; on disk {fmt_bytes(gram_total * len(experts))}"
    )
    t0 = time.perf_counter()
    with dp.task("regmean++ blocks", len(blocks) + 1, unit="blk") as advance:
        grams = regmean_plusplus(
            models,
            merged,
            batches,
            _merge_tensor_fn(plan, device, compute_dtype, seed, mapping),
            mergeable=lambda n: n in mapping,
            device=device,
            advance=advance,
        )
    secs = time.perf_counter() - t0
    for e, folder, g in zip(experts, folders, grams):
        flat: dict[str, torch.Tensor] = {}
        for m, (gram, rows, io) in g.items():
            ck = mapping[f"{m}.weight"]
            flat[st.key(ck, "gram")] = gram
            flat[st.key(ck, "rows")] = torch.tensor(float(rows), dtype=torch.float64)
            if io:
                flat[st.key(ck, "in_out")] = torch.ones((), dtype=torch.float32)
        st.write_statistics(
            folder, flat, {"kind": "gram_plusplus", "model": e.label, "key": key, "seconds": round(secs, 3)}
        )
    del models, merged
    return folders, {}, {"regmean++": f"{len(blocks)} blocks, {sum(len(b) for b in batches)} batches, {secs:.1f} s"}


def _collect_adamerging(
    plan: Plan,
    experts: list[_Expert],
    s: CalibrationSettings,
    root: Path,
    device: torch.device,
    dp: DataProgress,
    seed: int,
) -> tuple[list[Path], dict[str, str], dict[str, str]]:
    from mergelab.informed.adamerging import AdaTask, learn_coefficients

    gp = cast("AdaMergingParams", plan.global_params)  # the adamerging collector runs for adamerging only
    if plan.base is None:
        raise RecipeError("adamerging needs a base_model")
    key = _joint_key(plan, experts, s, "adamerging", seed)
    folders = [root / f"adamerging-{key or 'run'}" / e.slug for e in experts]
    side_name = "adamerging_coefficients.json"
    cached = folders[0].parent / side_name
    if (
        key is not None
        and cached.is_file()
        and all((meta := st.read_meta(f)) is not None and meta.get("key") == key for f in folders)
    ):
        dp.note(f"reusing AdaMerging coefficients in {folders[0].parent}")
        doc = json.loads(cached.read_text())
        ent = doc.get("entropy", {})
        reused = {
            "adamerging": f"{doc.get('granularity')}-wise, {doc.get('steps')} steps, mean entropy "
            f"{ent.get('initial', float('nan')):.4f} → {ent.get('final', float('nan')):.4f}, "
            f"{doc.get('seconds', 0.0):.1f} s (reused)"
        }
        return folders, {side_name: cached.read_text()}, reused
    dtype = parse_dtype(s.dtype) or torch.float32
    base_exp = _Expert(-1, plan.base.label, plan.base, plan.base.folder, None, None, None)
    base_cal = next((e.cal for e in experts if e.cal is not None and e.cal.model is not None), None)
    if base_cal is not None:
        raise RecipeError(
            "adamerging loads the base model from its folder; in-memory models are not supported here "
            "(use mergelab.informed.learn_coefficients)"
        )
    model, kind = _model(base_exp, s, device, dtype)
    merge_names = _merge_names(plan)
    mapping = {m: c for m, c in checkpoint_names(model, plan.base.tensors()).items() if c in merge_names}
    names = list(mapping)
    base = {m: plan.base.read(mapping[m]).to(device, torch.float32) for m in names}
    tvs = []
    for r in plan.experts:
        tvs.append({m: r.read(mapping[m]).to(device, torch.float32) - base[m] for m in names})
    tasks = []
    for e in experts:
        head = _head(e, s.pooling)
        fn = e.cal.logits_fn if e.cal is not None and e.cal.logits_fn is not None else default_logits_fn(kind, head)
        bs = _batches(e, s, "adamerging", _tok_folder(e, plan), head, read_config(e.folder))
        tasks.append(AdaTask(bs, fn, e.label))
    p_bytes = sum(base[m].numel() * 4 for m in names)
    dp.note(
        f"AdaMerging ({gp.granularity}-wise, {gp.steps} steps, {len(experts)} tasks, "
        f"{sum(len(t.batches) for t in tasks)} batches): expected memory on {device}: base + task vectors "
        f"{fmt_bytes(p_bytes * (len(experts) + 1))} + merged tensors {fmt_bytes(p_bytes)} + activations of "
        f"{gp.batches_per_step} batch(es) per task"
    )
    t0 = time.perf_counter()
    with dp.task("adamerging", gp.steps, unit="step") as advance:
        res = learn_coefficients(
            model,
            base,
            tvs,
            tasks,
            granularity=gp.granularity,
            steps=gp.steps,
            lr=gp.lr,
            init=gp.init,
            clamp=gp.clamp,
            batches_per_step=gp.batches_per_step,
            seed=seed,
            device=device,
            advance=advance,
        )
    secs = time.perf_counter() - t0
    del tvs, base, model
    index = {m: k for k, m in enumerate(res.names)}
    ckpt_to_module = {c: m for m, c in mapping.items()}
    coeffs: dict[str, Any] = {}
    for i, (e, folder) in enumerate(zip(experts, folders)):
        mean_i = float(res.lambdas[i]) if res.lambdas.dim() == 1 else float(res.lambdas[:, i].mean())
        flat = {}
        per_tensor = {}
        for name in sorted(merge_names):
            m = ckpt_to_module.get(name)
            lam = res.coefficient(index[m], i) if m is not None else mean_i
            flat[st.key(name, "lambda")] = torch.tensor(lam, dtype=torch.float32)
            per_tensor[name] = lam
        st.write_statistics(
            folder, flat, {"kind": "adamerging", "model": e.label, "key": key, "seconds": round(secs, 3)}
        )
        coeffs[e.label] = (
            round(mean_i, 6) if gp.granularity == "task" else {k: round(v, 6) for k, v in per_tensor.items()}
        )
    doc = {
        "method": "adamerging",
        "granularity": gp.granularity,
        "steps": gp.steps,
        "lr": gp.lr,
        "init": gp.init,
        "clamp": gp.clamp,
        "batches_per_step": gp.batches_per_step,
        "experts": [e.label for e in experts],
        "coefficients": coeffs,
        "entropy": {"initial": res.initial_entropy, "final": res.final_entropy, "per_step": res.history},
        "seconds": round(secs, 3),
    }
    text = json.dumps(doc, indent=2) + "\n"
    folders[0].parent.mkdir(parents=True, exist_ok=True)
    (folders[0].parent / side_name).write_text(text)
    summary = {
        "adamerging": f"{gp.granularity}-wise, {gp.steps} steps, mean entropy {res.initial_entropy:.4f} → "
        f"{res.final_entropy:.4f}, {secs:.1f} s"
    }
    return folders, {side_name: text}, summary


# ------------------------------------------------------------------------------------------


def run_data_phase(
    plan: Plan,
    *,
    device: str | torch.device = "cpu",
    calibration: Sequence[Calibration | Iterable[Mapping[str, torch.Tensor]] | None] | None = None,
    statistics: Sequence[Any] | None = None,
    progress: Any = None,
    workdir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    compute_dtype: torch.dtype = torch.float32,
) -> DataPhaseResult:
    """Compute (or reuse) the statistics ``plan.method`` needs; one reader per expert."""
    from mergelab.executors.base import resolve_device

    collector = plan.method.statistics
    if collector is None:
        raise RecipeError(f"{plan.method.name} is data-free: there is no data phase to run")
    check_calibration(plan, calibration, statistics)
    dev = resolve_device(str(device))
    experts = _experts(plan, calibration, statistics)
    s = _settings(plan)
    dp = DataProgress(progress)
    result = DataPhaseResult(readers=[])
    t0 = time.perf_counter()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    given = [e for e in experts if e.statistics is not None]
    try:
        if len(given) == len(experts):
            result.readers = [st.open_statistics(e.statistics, e.label) for e in experts if e.statistics is not None]
            if collector == "adamerging":
                for e in experts:
                    if isinstance(e.statistics, (str, os.PathLike)):
                        side_path = Path(e.statistics).parent / "adamerging_coefficients.json"
                        if side_path.is_file():
                            result.side_files["adamerging_coefficients.json"] = side_path.read_text()
                            break
            result.summary["statistics"] = "precomputed"
            return result
        if s.statistics_dir is not None:
            root = Path(s.statistics_dir)
            root.mkdir(parents=True, exist_ok=True)
        else:
            parent = Path(workdir) if workdir is not None else None
            root = Path(tempfile.mkdtemp(prefix=".mergelab-stats-", dir=parent))
            result.cleanup.append(root)
        todo = [e for e in experts if e.statistics is None]
        if collector == "fisher":
            folders, side, summary = _collect_fisher(plan, todo, s, root, dev, dp, seed)
        elif collector == "gram":
            folders, side, summary = _collect_gram(plan, todo, s, root, dev, dp, seed)
        elif collector == "gram_plusplus":
            folders, side, summary = _collect_gram_plusplus(plan, todo, s, root, dev, dp, seed, compute_dtype)
        elif collector == "adamerging":
            folders, side, summary = _collect_adamerging(plan, todo, s, root, dev, dp, seed)
        else:  # pragma: no cover - registry bug
            raise InternalError(f"unknown statistics {collector!r} of {plan.method.name}")
        computed = iter(folders)
        for e in experts:
            result.readers.append(
                st.open_statistics(e.statistics if e.statistics is not None else next(computed), e.label)
            )
        result.compute_seconds = _compute_seconds(collector, folders)
        result.side_files.update(side)
        result.summary.update(summary)
    except BaseException:
        result.close()
        raise
    result.seconds = time.perf_counter() - t0
    result.peak_bytes = _peak(dev)
    result.notes = dp.notes
    result.summary["data phase"] = f"{collector} on {dev}, {result.seconds:.1f} s, peak {fmt_bytes(result.peak_bytes)}"
    if math.isnan(result.seconds):  # pragma: no cover
        result.seconds = 0.0
    return result


COLLECTORS = ("fisher", "gram", "gram_plusplus", "adamerging")
