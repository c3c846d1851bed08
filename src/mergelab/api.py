"""The Python API: merge checkpoints to disk, or tensors / state dicts / modules in memory.

All entry points go through the same plan and engine, so an in-memory merge and a streamed
merge of the same inputs give the same tensors.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergelab import __version__
from mergelab.checkpoint.card import model_card
from mergelab.checkpoint.output_guard import check_cache_outside_inputs, plan_inputs, recipe_inputs
from mergelab.checkpoint.reader import CheckpointReader, StateDictReader
from mergelab.checkpoint.writer import (
    DEFAULT_MAX_SHARD,
    AtomicOutputDir,
    check_destination,
    copy_side_files_of,
    parse_size,
)
from mergelab.errors import InputDataError, OptionError, OutputError, RecipeError
from mergelab.executors.base import (
    ExecutorOptions,
    Progress,
    RunStats,
    check_read_workers,
    check_threads,
    get_executor,
    resolve_device,
    thread_limit,
)
from mergelab.executors.sinks import MemorySink, abort_sinks, finish_sinks, open_disk_sinks
from mergelab.executors.streaming import StreamingExecutor
from mergelab.ir import MODEL
from mergelab.plan import Plan, build_plan
from mergelab.recipe import Recipe, load_recipe, parse_dtype

StateLike = Mapping[str, torch.Tensor] | torch.nn.Module


@dataclass
class MergeResult:
    """Where the merged model went and what the run measured."""

    path: Path
    stats: RunStats
    plan_summary: dict[str, Any]


def plan_merge(recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe, *, out_dtype: str | None = None) -> Plan:
    """Validate a recipe against its inputs' headers (no tensor data is read) and return the plan.

    For data-informed methods it also checks that every expert has calibration data (its files
    exist) or precomputed statistics. The caller owns the plan and should call ``plan.close()``.
    """
    rec = load_recipe(recipe)
    from mergelab.routed.build import check_routed_recipe, check_router_block, is_routed_method

    if is_routed_method(rec.merge_method):
        # a routed method (twin_merging, ...): its parameters and router data are checked here, and the
        # plan is the shared merge's inputs (every expert read against the base: names, shapes)
        check_routed_recipe(rec)
        rec = rec.model_copy(update={"merge_method": "task_arithmetic", "parameters": {}, "router": None})
    else:
        check_router_block(rec)
    plan = build_plan(rec, out_dtype=parse_dtype(out_dtype, "out_dtype"))
    if plan.method.statistics is not None:
        from mergelab.informed.phase import check_calibration

        try:
            check_calibration(plan)
        except BaseException:
            plan.close()
            raise
    return plan


def summarize(plan: Plan, compute_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Numbers a user wants before a long run: sizes, tensor counts, expected peak memory."""
    itemsize = torch.empty((), dtype=compute_dtype).element_size()
    return {
        "method": plan.method.name,
        "base": plan.base.label if plan.base is not None else None,
        "experts": [r.label for r in plan.experts],
        "tensors": len(plan.jobs),
        "merged_tensors": len(plan.merge_jobs),
        "copied_tensors": len(plan.jobs) - len(plan.merge_jobs),
        "tied": dict(plan.tied),
        "num_layers": plan.num_layers,
        "passes": len(plan.method.passes(plan.global_params)) + 1,
        "input_bytes": plan.input_bytes(),
        "output_bytes": plan.output_bytes(),
        "expected_peak_bytes": plan.expected_peak_bytes(itemsize),
        "warnings": list(plan.warnings),
        **({"output": "adapter"} if any(a.kind == "peft_adapter" for a in plan.graph.artifacts.values()) else {}),
        **(
            {"tokenizer": {"source": plan.tokenizer.source, "vocab_rows": plan.tokenizer.rows}}
            if plan.tokenizer is not None
            else {}
        ),
    }


def copy_side_files(
    source: CheckpointReader | None, dest: Path, out_dtype: torch.dtype | None, tied: Mapping[str, str]
) -> None:
    """The reference model's config and tokenizer files into ``dest`` (config.json's dtype set to
    ``out_dtype`` when given)."""
    if source is None or source.folder is None:
        return
    copy_side_files_of(source.folder, dest)
    cfg_path = dest / "config.json"
    if cfg_path.is_file() and out_dtype is not None:
        cfg = json.loads(cfg_path.read_text())
        dt = str(out_dtype).removeprefix("torch.")
        for key in ("torch_dtype", "dtype"):
            if key in cfg or key == "torch_dtype":
                cfg[key] = dt
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _copy_tokenizer_files(source: CheckpointReader | None, dest: Path) -> None:
    """The base's tokenizer files (not config.json: an adapter folder is not a model folder)."""
    if source is not None:
        copy_side_files_of(source.folder, dest, skip=("config.json", "generation_config.json"))


def _write_tokenizer(plan: Plan, rec: Recipe, dest: Path) -> None:
    """The output tokenizer (``tokenizer_source`` / ``chat_template``), planned and checked by the planner.

    The tokenizer is written with transformers' ``save_pretrained`` (as mergekit does) and
    config.json gets its vocabulary size; a chat template without any tokenizer is written alone.
    """
    out_tok = plan.tokenizer
    if out_tok is None:
        if rec.chat_template not in (None, "auto"):
            from mergelab.tokenizer import resolve_chat_template

            text = resolve_chat_template(rec.chat_template, [])
            (dest / "chat_template.jinja").write_text(text or "")
        return
    out_tok.save(dest)
    cfg_path = dest / "config.json"
    if out_tok.source != "copy" and cfg_path.is_file():
        from mergelab.tokenizer import update_config_vocab

        cfg = json.loads(cfg_path.read_text())
        update_config_vocab(cfg, out_tok.rows)
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def run_inputs(
    source: str | os.PathLike[str] | Mapping[str, Any] | Recipe, rec: Recipe, plan: Plan | None = None
) -> list[tuple[str, str]]:
    """(role, path) of everything a merge reads: the recipe file, its models, tokenizer, data and
    statistics, and the folders of the plan's readers (the destination may be none of them)."""
    found = [("recipe", os.fspath(source))] if isinstance(source, (str, os.PathLike)) else []
    return found + recipe_inputs(rec) + (plan_inputs(plan) if plan is not None else [])


def _apply_config_updates(cfg_path: Path, updates: Mapping[str, Any]) -> None:
    """Set the plan's config keys (dotted for nested, ``text_config.num_hidden_layers``) in the
    output's config.json, e.g. the layer count of a layer-stacked model."""
    if not updates or not cfg_path.is_file():
        return
    cfg = json.loads(cfg_path.read_text())
    for key, value in updates.items():
        holder = cfg
        *path, last = key.split(".")
        for part in path:
            holder = holder.setdefault(part, {})
        holder[last] = value
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def merge(
    recipe: str | os.PathLike[str] | Mapping[str, Any] | Recipe,
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    force_any: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    seed: int | None = None,
    compute_dtype: str | None = None,
    out_dtype: str | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD,
    hash_inputs: bool = True,
    check_finite: bool = True,
    progress: Progress | None = None,
    plan: Plan | None = None,
    calibration: Sequence[Any] | None = None,
    statistics: Sequence[Any] | None = None,
    executor: str = "streaming",
    workers: int | None = None,
    address: str | None = None,
    read_workers: int = 4,
    adapter_out: bool = False,
    rank: int | None = None,
    energy: float | None = None,
    router_data: Sequence[Any] | None = None,
) -> MergeResult:
    """Merge the recipe's models into a Hugging Face folder at ``out``.

    The output (sharded safetensors + index, config and tokenizer files copied from the base,
    a model card) is written to a temporary folder beside ``out`` and renamed into place when
    complete. ``out`` must not exist unless ``force`` (which replaces only a previous mergelab
    output) or ``force_any`` (any folder). ``out`` may never be an input of the recipe, contain
    one or lie inside one. Inputs are only read. Stale temporary folders of dead runs into the
    same ``out`` are removed, with a warning. SIGTERM handlers are left as they are (wrap the call
    in :func:`mergelab.checkpoint.output_guard.sigterm_as_interrupt` to clean up on SIGTERM too).

    Data-informed methods (fisher, regmean, regmean_plusplus, adamerging) first run their data
    phase on ``device`` (:func:`mergelab.informed.run_data_phase`) from the recipe's calibration
    sources; ``calibration`` (one :class:`mergelab.informed.Calibration` or iterable of batches per
    expert, None to keep the recipe's) and ``statistics`` (one precomputed statistics folder or
    dict per expert) override them from Python. Side files of the phase (AdaMerging's learned
    coefficients) are written beside the model.

    ``executor`` runs the merge: ``streaming`` (default, one process) or ``ray`` (``workers``
    Ray worker processes on a local Ray, or the cluster at ``address``; needs ``mergelab[ray]``);
    both give bit-identical tensors. ``read_workers``: positional reads of the inputs kept in
    flight (:class:`~mergelab.executors.base.ExecutorOptions`; 1 reads one tensor at a time).

    ``adapter_out`` (or the recipe's ``output: adapter``) writes a PEFT LoRA adapter of the base
    instead (:mod:`mergelab.lora.sink`): ``rank`` / ``energy`` override the recipe's ``adapter:``
    block; ``result.plan_summary["adapter"]`` holds the per-module ranks and errors.

    Routed methods (``twin_merging``, ``split_merge``, ``smile``, ``wemoe``) write a routed-model
    folder (:func:`mergelab.routed.build.build_routed`; ``result.plan_summary["routed"]`` is its
    manifest); ``tall_masks`` / ``emr`` with a ``router:`` block also train a router into
    ``routed/router/``. ``router_data``: per expert, :class:`mergelab.routed.RouterData` (texts)
    instead of the recipe's router sources.
    """
    rec = load_recipe(recipe)
    from mergelab.routed.build import attach_router, check_router_block, is_routed_method

    if is_routed_method(rec.merge_method):
        if adapter_out or rank is not None or energy is not None:
            raise OptionError(
                f"adapter_out/rank/energy: {rec.merge_method} writes a routed-model folder (its experts are already "
                "PEFT adapters); leave them out"
            )
        return _merge_routed(
            recipe,
            out,
            force=force,
            force_any=force_any,
            device=device,
            threads=threads,
            seed=seed,
            max_shard_size=max_shard_size,
            hash_inputs=hash_inputs,
            progress=progress,
            router_data=router_data,
            calibration=calibration,
            out_dtype=out_dtype,
            executor=executor,
        )
    check_router_block(rec, router_data)
    _check_run_options(device=device, threads=threads, seed=seed)
    check_read_workers(read_workers)
    _check_disk_options(out, max_shard_size, executor)
    if adapter_out or rank is not None or energy is not None or rec.output == "adapter":
        from mergelab.lora.sink import with_adapter_output

        rec = with_adapter_output(rec, adapter_out=adapter_out, rank=rank, energy=energy)
        if executor != "streaming":
            raise OptionError(
                f"executor {executor!r}: adapter outputs (output: adapter / --adapter-out) run on the streaming "
                "executor only; leave out --executor"
            )
    shard_bytes = parse_size(max_shard_size)
    # fail on a bad or existing destination before any work
    inputs = run_inputs(recipe, rec, plan)
    if rec.calibration is not None and rec.calibration.statistics_dir is not None:
        check_cache_outside_inputs(rec.calibration.statistics_dir, inputs, "statistics_dir")
    is_adapter = rec.output == "adapter"
    dest = AtomicOutputDir(
        out, force=force, force_any=force_any, inputs=inputs, kind="adapter" if is_adapter else "merge"
    )
    own_plan = plan is None
    phase = None
    try:
        runner = get_executor(executor)  # an unknown executor fails before any input is opened
        plan = plan or build_plan(rec, out_dtype=parse_dtype(out_dtype, "out_dtype"))
        opts = ExecutorOptions(
            device=device,
            compute_dtype=parse_dtype(compute_dtype, "compute_dtype") or rec.compute_torch_dtype,
            threads=threads,
            seed=rec.seed if seed is None else seed,
            check_finite=check_finite,
            hash_inputs=hash_inputs,
            workers=workers,
            address=address,
            read_workers=read_workers,
        )
        if plan.method.statistics is not None and plan.aux is None:
            from mergelab.informed.phase import run_data_phase

            with thread_limit(threads):
                phase = run_data_phase(
                    plan,
                    device=device,
                    calibration=calibration,
                    statistics=statistics,
                    progress=progress,
                    workdir=dest.workdir(),
                    seed=opts.seed,
                    compute_dtype=opts.compute_dtype,
                )
            plan.attach_aux(phase.readers)
        summary = summarize(plan, opts.compute_dtype)
        if phase is not None:  # what the data phase cost, for benchmarks and leaderboards
            summary["data_phase"] = {"seconds": phase.seconds, "peak_bytes": phase.peak_bytes, **phase.summary}
        # one sink per artifact: the checkpoint, plus the per-task parts of routed methods (TALL masks, EMR)
        sinks = open_disk_sinks(plan, dest.tmp, shard_bytes)
        adapter_lines: list[str] | None = None
        try:
            stats = runner.run(plan, sinks, opts, progress)
            finish_sinks(plan.graph, sinks, stats)
            if is_adapter:
                from mergelab.lora.sink import adapter_result

                summary["adapter"], adapter_lines = adapter_result(plan.graph, sinks)
        finally:
            abort_sinks(sinks)
        out_dt = parse_dtype(out_dtype, "out_dtype") or rec.output_dtype
        if is_adapter:  # an adapter folder carries the tokenizer, not the base's config.json
            _copy_tokenizer_files(plan.reference, dest.tmp)
        else:
            copy_side_files(plan.reference, dest.tmp, out_dt, plan.tied)
            _apply_config_updates(dest.tmp / "config.json", plan.graph.config_updates)
            _write_tokenizer(plan, rec, dest.tmp)
        for fname, text in phase.side_files.items() if phase is not None else ():
            (dest.tmp / fname).write_text(text)
        if rec.router is not None:  # tall_masks / emr: a router so that the output runs without the task id
            with thread_limit(threads):
                summary["router"] = attach_router(dest.tmp, rec, device=device, seed=opts.seed, router_data=router_data)
        expert_recipe_params = list(plan.global_model_params)
        card = model_card(
            recipe_yaml=rec.to_yaml(),
            method=plan.method,
            global_params=plan.global_params,
            base_label=plan.base.label if plan.base is not None else None,
            expert_labels=[r.label for r in plan.experts],
            expert_params=expert_recipe_params,
            hashes=stats.hashes,
            version=__version__,
            stats={
                "tensors": str(stats.tensors),
                "wall time": f"{stats.seconds:.1f} s",
                "compute dtype": str(opts.compute_dtype).removeprefix("torch."),
                "device": device,
                "seed": str(opts.seed),
                **(phase.summary if phase is not None else {}),
            },
            adapter=adapter_lines,
        )
        (dest.tmp / "README.md").write_text(card)
        (dest.tmp / "mergelab_recipe.yaml").write_text(rec.to_yaml())
        path = dest.commit()
    except BaseException as exc:
        dest.fail(exc)
        raise
    finally:
        if phase is not None:
            phase.close()
        dest.close_workdir()
        if own_plan and plan is not None:
            plan.close()
    return MergeResult(path=path, stats=stats, plan_summary=summary)


def _merge_routed(recipe: Any, out: Any, *, executor: str, **options: Any) -> MergeResult:
    """A routed method's build, reported as a :class:`MergeResult`."""
    from mergelab.routed.build import build_routed

    if executor != "streaming":
        raise OptionError(f"executor {executor!r}: routed methods run on the streaming executor only; leave it out")
    res = build_routed(recipe, out, **options)
    stats = RunStats(seconds=res.seconds)
    return MergeResult(
        path=res.path, stats=stats, plan_summary={"method": res.manifest["method"], "routed": res.manifest}
    )


def _check_run_options(*, device: Any, threads: Any, seed: Any = None) -> None:
    """Options every merge entry point takes, checked before any input is opened (one-line OptionError)."""
    resolve_device(device)
    check_threads(threads)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise OptionError(f"seed: expected a whole number or None, got {type(seed).__name__}")


def _check_disk_options(out: Any, max_shard_size: Any, executor: Any) -> None:
    if not isinstance(out, (str, os.PathLike)):
        raise OptionError(f"out: expected a folder path (str or Path), got {type(out).__name__}")
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, (str, int)):
        raise OptionError(f"max_shard_size: expected a size such as '2GB' or a byte count, got {max_shard_size!r}")
    if not isinstance(executor, str):
        raise OptionError(f"executor: expected 'streaming', 'memory' or 'ray', got {type(executor).__name__}")


def _check_state(state: Any, what: str) -> None:
    """``state`` is a state dict (name → tensor) or an ``nn.Module`` whose tensors hold data (not on ``meta``)."""
    if isinstance(state, (str, os.PathLike)):
        raise OptionError(
            f"{what}: got the path {str(state)!r}; merge_state_dicts takes in-memory state dicts or nn.Modules "
            "(for checkpoints on disk use mergelab.merge with a recipe)"
        )
    if not isinstance(state, (Mapping, torch.nn.Module)):
        raise OptionError(f"{what}: expected a state dict (name → tensor) or an nn.Module, got {type(state).__name__}")
    items = state.state_dict().items() if isinstance(state, torch.nn.Module) else state.items()
    for name, t in items:
        if not isinstance(name, str):
            raise OptionError(f"{what}: tensor names must be strings, got the key {name!r}")
        if isinstance(t, torch.Tensor) and t.device.type == "meta":
            raise InputDataError(
                f"{what}: tensor {name!r} is on the meta device (shape only, no data); load real weights first "
                "(e.g. from_pretrained without device_map='meta' / init_empty_weights)"
            )


def _check_mapping(value: Any, what: str) -> None:
    if value is not None and not isinstance(value, Mapping):
        raise OptionError(f"{what}: expected a dict or None, got {type(value).__name__}")


def _check_per_model(value: Any, what: str, entries: bool = True) -> None:
    """``value`` is None or a list with one entry per expert (a dict each, when ``entries``)."""
    if value is None:
        return
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise OptionError(f"{what}: expected a list with one entry per expert, got {type(value).__name__}")
    for i, v in enumerate(value):
        if entries and not isinstance(v, Mapping):
            raise OptionError(f"{what}[{i}]: expected a dict, got {type(v).__name__}")


def _check_method(method: Any) -> None:
    if not isinstance(method, str):
        raise OptionError(f"method: expected a method name such as 'ties', got {type(method).__name__}")


def _check_experts(experts: Any, fn: str) -> None:
    if experts is None or isinstance(experts, (str, bytes, os.PathLike, Mapping, torch.Tensor, torch.nn.Module)):
        got = "None" if experts is None else type(experts).__name__
        raise OptionError(f"{fn}: experts must be a list (one entry per expert), got {got}")
    if not isinstance(experts, Sequence):
        raise OptionError(f"{fn}: experts must be a list (one entry per expert), got {type(experts).__name__}")


@dataclass
class StageResult:
    """One stage of a multi-stage merge: its name (None: the final merge), where it went, and the
    run's result (None when a kept stage output made from the same recipe was reused)."""

    name: str | None
    path: Path
    result: MergeResult | None


def merge_stages(
    recipe: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    stages_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    force_any: bool = False,
    **options: Any,
) -> list[StageResult]:
    """Run a multi-stage recipe (several YAML documents, mergekit-multi's form) stage by stage.

    Stages run in dependency order (:func:`mergelab.recipe.load_stages`), each one a
    :func:`merge` with ``options``. The final (unnamed) stage goes to ``out``; named stages go to
    ``stages_dir/<name>`` when given (kept, and reused on the next run when made from the same
    recipe and no stage they read was rebuilt), else to a temporary folder beside ``out`` that is
    removed at the end. Without an unnamed stage, every stage is written to ``out/<name>`` and
    ``out`` appears only when all are done.
    """
    from mergelab.recipe import load_stages

    dest_path = Path(out).expanduser().absolute()
    probe = load_stages(recipe, stages_dir or dest_path)  # every document checked before any work
    has_final = any(st.name is None for st in probe)
    keep = stages_dir is not None and has_final
    dest: AtomicOutputDir | None = None
    inputs = [("recipe", os.fspath(recipe))] + [i for st in probe for i in recipe_inputs(st.recipe)]
    if stages_dir is not None:
        check_cache_outside_inputs(stages_dir, inputs, "stages_dir")
    if has_final:
        # the one-line errors (an input, exists without --force, not a mergelab output), before any work
        check_destination(dest_path, inputs, force=force, force_any=force_any)
        if keep:
            assert stages_dir is not None
            work = Path(stages_dir).expanduser().absolute()
            work.mkdir(parents=True, exist_ok=True)
        else:
            dest_path.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{dest_path.name}.mergelab-stages-", dir=dest_path.parent))
    else:
        dest = AtomicOutputDir(dest_path, force=force, force_any=force_any, inputs=inputs)
        work = dest.tmp
    results: list[StageResult] = []
    try:
        rebuilt: set[str] = set()
        for st in load_stages(recipe, work):
            if st.name is None:
                final_result = merge(st.recipe, dest_path, force=force, force_any=force_any, **options)
                results.append(StageResult(None, dest_path, final_result))
                continue
            target = work / st.name
            replace = False
            if keep and target.exists():
                made = target / "mergelab_recipe.yaml"
                same = made.is_file() and made.read_text() == st.recipe.to_yaml()
                if not same:
                    raise OutputError(
                        f"{target}: holds a stage output made from another recipe (or not by mergelab); remove it "
                        "or choose another --stages-dir"
                    )
                if not rebuilt & set(st.needs):
                    results.append(StageResult(st.name, target, None))
                    continue
                replace = True  # a stage it reads was rebuilt: rebuild it too
            results.append(StageResult(st.name, target, merge(st.recipe, target, force=replace, **options)))
            rebuilt.add(st.name)
        if dest is not None:
            final = dest.commit()
            results = [StageResult(r.name, final / r.path.name, r.result) for r in results]
    except BaseException:
        if dest is not None:
            dest.abort()
        raise
    finally:
        if has_final and not keep:
            shutil.rmtree(work, ignore_errors=True)
    return results


def _memory_recipe(
    method: str,
    n_experts: int,
    has_base: bool,
    parameters: Mapping[str, Any] | None,
    model_parameters: Sequence[Mapping[str, Any]] | None,
    seed: int,
) -> Recipe:
    if model_parameters is not None and len(model_parameters) != n_experts:
        raise RecipeError(f"model_parameters has {len(model_parameters)} entries for {n_experts} experts")
    models = [
        {"model": f"<expert {i}>", "parameters": dict(model_parameters[i]) if model_parameters else {}}
        for i in range(n_experts)
    ]
    return load_recipe(
        {
            "merge_method": method,
            "base_model": "<base>" if has_base else None,
            "models": models,
            "parameters": dict(parameters or {}),
            "seed": seed,
        }
    )


def merge_state_dicts(
    method: str,
    experts: Sequence[StateLike],
    base: StateLike | None = None,
    *,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    compute_dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    device: str = "cpu",
    statistics: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts (or ``nn.Module``s) with any registered method.

    ``parameters`` are the method's global parameters (e.g. ``{"lambda": 0.3}``), with
    filters and gradients allowed as in recipes; ``model_parameters`` one dict per expert
    (e.g. ``{"weight": 1.0, "density": 0.2}``). Returns a new state dict on the CPU in each
    tensor's original dtype (or ``out_dtype``); tied tensors share storage as in the input.
    For methods that ignore the base (``linear``), pass every model in ``experts``.
    Data-informed methods take ``statistics``: one dict per expert keyed ``"<tensor>::<kind>"``
    (e.g. ``{"w::fisher": F}``; :func:`mergelab.informed.fisher_diagonal` and friends make them).
    """
    _check_method(method)
    _check_experts(experts, "merge_state_dicts")
    if not experts:
        raise RecipeError("merge_state_dicts needs at least one expert")
    for i, e in enumerate(experts):
        _check_state(e, f"experts[{i}]")
    if base is not None:
        _check_state(base, "base")
    _check_mapping(parameters, "parameters")
    _check_per_model(model_parameters, "model_parameters")
    _check_per_model(statistics, "statistics", entries=False)  # dicts, folders or open readers
    _check_run_options(device=device, threads=None, seed=seed)
    if seed is None:
        raise OptionError("seed: expected a whole number, got None")
    recipe = _memory_recipe(method, len(experts), base is not None, parameters, model_parameters, seed)
    readers: dict[str, CheckpointReader] = {
        f"<expert {i}>": StateDictReader(e, f"<expert {i}>") for i, e in enumerate(experts)
    }
    if base is not None:
        readers["<base>"] = StateDictReader(base, "<base>")
    plan = build_plan(recipe, readers=readers, out_dtype=out_dtype)
    if statistics is not None:
        from mergelab.informed.stats import open_statistics

        plan.attach_aux([open_statistics(s, f"<statistics {i}>") for i, s in enumerate(statistics)])
    sink = MemorySink()
    with torch.no_grad():
        StreamingExecutor().run(
            plan,
            {MODEL: sink},
            ExecutorOptions(device=device, compute_dtype=compute_dtype, seed=seed, hash_inputs=False, prefetch=False),
        )
    out = sink.tensors
    for alias, canonical in plan.tied.items():
        out[alias] = out[canonical]
    return {k: out[k] for k in plan.reference.tensors() if k in out}


def merge_tensors(
    method: str,
    experts: Sequence[torch.Tensor],
    base: torch.Tensor | None = None,
    *,
    parameters: Mapping[str, Any] | None = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    seed: int = 0,
    name: str = "tensor",
    compute_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    statistics: Sequence[Mapping[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Merge single tensors: ``merge_tensors("ties", [a, b], base=w0, model_parameters=[{"density": 0.2}] * 2)``.

    ``name`` seeds random methods (DARE, DELLA) exactly as the tensor of that name in a
    checkpoint merge would be seeded. Data-informed methods take ``statistics``: one dict of
    this tensor's statistics per expert, by kind (``[{"fisher": F1}, {"fisher": F2}]``).
    """
    _check_method(method)
    _check_experts(experts, "merge_tensors")
    _check_per_model(statistics, "statistics")
    if not isinstance(name, str):
        raise OptionError(f"name: expected the tensor's name as a string, got {type(name).__name__}")
    if not all(isinstance(e, torch.Tensor) for e in experts) or (
        base is not None and not isinstance(base, torch.Tensor)
    ):
        raise OptionError("merge_tensors takes tensors; use merge_state_dicts for state dicts or modules")
    out = merge_state_dicts(
        method,
        [{name: e} for e in experts],
        None if base is None else {name: base},
        parameters=parameters,
        model_parameters=model_parameters,
        seed=seed,
        compute_dtype=compute_dtype,
        device=device,
        statistics=None if statistics is None else [{f"{name}::{k}": t for k, t in s.items()} for s in statistics],
    )
    return out[name]
