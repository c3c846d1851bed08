"""The benchmark's commands on ``mergelab``'s command line: ``demo``, ``zoo build``, ``zoo sources``,
``eval`` and ``bench``.

The core CLI (:mod:`mergelab.cli`) never imports this module: it finds :func:`register` through
the ``mergelab.commands`` entry point declared in ``pyproject.toml`` and calls it with its typer
app. The commands themselves live in :mod:`mergelab_bench.eval.commands`; ``demo`` is here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mergelab.cli import console, err_console, user_errors


@user_errors
def demo(
    synthetic: Annotated[
        bool,
        typer.Option(
            "--synthetic", help="the engine-only demo: small random checkpoints merged with TIES (seconds, no zoo)"
        ),
    ] = False,
    install: Annotated[
        bool,
        typer.Option("--install", help="install the zoo's source packages first if any is missing (apt needs root)"),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="also write the leaderboard (markdown, JSON, PNG) into this folder")
    ] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 2,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bars")] = False,
    workdir: Annotated[
        Path | None, typer.Option(help="--synthetic: where to build the demo models (default: a cache folder)")
    ] = None,
) -> None:
    """Build the quick classification zoo (4 experts, cached), merge it with task arithmetic, TIES and
    DARE-TIES, evaluate every merge on every task and print the leaderboard."""
    if synthetic:
        from mergelab_bench.demo import run_demo

        run_demo(workdir, console=console, err_console=err_console)
        return
    from mergelab_bench.eval.commands import demo_bench
    from mergelab_bench.zoo.sources import SourceError, install_sources

    try:
        demo_bench(out=out, threads=threads, progress_enabled=not no_progress)
    except SourceError:
        if not install:
            raise
        err_console.print("some zoo sources are missing: installing them", highlight=False)
        install_sources(None, echo=lambda m: err_console.print(m, highlight=False))
        demo_bench(out=out, threads=threads, progress_enabled=not no_progress)


def register(app: typer.Typer) -> None:
    """Add ``demo``, ``zoo``, ``eval`` and ``bench`` to ``app`` (the ``mergelab.commands`` entry point)."""
    from mergelab_bench.eval.commands import bench_command, eval_command, zoo_command, zoo_sources_command

    app.command()(demo)
    zoo_app = typer.Typer(help="The offline evaluation zoo: build it, list its sources.", no_args_is_help=True)
    zoo_app.command("build")(user_errors(zoo_command))
    zoo_app.command("sources")(user_errors(zoo_sources_command))
    app.add_typer(zoo_app, name="zoo")
    app.command("eval")(user_errors(eval_command))
    app.command("bench")(user_errors(bench_command))
