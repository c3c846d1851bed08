"""``mergelab search``: the command line of :func:`mergelab.search.runner.run_search`."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from mergelab.errors import OptionError


def _pairs(items: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--objective-option {item!r}: expected KEY=VALUE, e.g. limit=200")
        out[key.strip()] = value.strip()
    return out


def _floats(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise OptionError(f"--preference {text!r}: expected comma-separated numbers, e.g. 1,2,1") from None


class RichSearchProgress:
    """Trials done of the budget, the best score so far and an ETA, on stderr."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self._progress: Any = None
        self._task: Any = None
        self._t0 = 0.0
        self._done0 = 0

    def start(self, total: int, done: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._t0 = time.perf_counter()
        self._done0 = done
        self._progress = Progress(
            TextColumn("[bold]trials"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("best {task.fields[best]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
        )
        self._progress.start()
        self._task = self._progress.add_task("search", total=total, completed=done, best="–", eta="–")

    def trial(self, done: int, total: int, best: float | None, last: Mapping[str, Any]) -> None:
        if self._progress is None:
            return
        elapsed = time.perf_counter() - self._t0
        new = done - self._done0
        eta = "–"
        if new > 0 and total > done:
            left = elapsed / new * (total - done)
            eta = f"{int(left // 60)}:{int(left % 60):02d}"
        elif total <= done:
            eta = "0:00"
        shown = "–" if best is None or not math.isfinite(best) else f"{best:.4f}"
        self._progress.update(self._task, completed=min(done, total), total=max(total, done), best=shown, eta=eta)

    def note(self, message: str) -> None:
        self.console.print(f"[yellow]note:[/] {message}", highlight=False, soft_wrap=True)

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def search_command(
    recipe: Annotated[Path, typer.Argument(help="the recipe whose parameters are searched (a models: recipe)")],
    objective: Annotated[
        str,
        typer.Option(
            help="what a merge is scored with: zoo:validation, lm:validation, lm-eval:TASK,TASK or "
            "python:module:function"
        ),
    ],
    out: Annotated[Path, typer.Option(help="the search folder (trial log, trials, best recipe, plots)")],
    space: Annotated[
        Path | None, typer.Option(help="the space file: which parameters vary, bounds, layer groups, options")
    ] = None,
    algorithm: Annotated[str, typer.Option(help="cma, tpe, random, grid, evolver, map or fw")] = "cma",
    budget: Annotated[
        int | None,
        typer.Option(help="trials (evaluations) [default: 200; evolver, map, fw: their own count]"),
    ] = None,
    objective_option: Annotated[
        list[str] | None, typer.Option(help="KEY=VALUE for the objective (zoo=quick, limit=200, tasks=a+b); repeat")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="a running Ray cluster (auto, or ray://host:port); default: a local Ray")
    ] = None,
    workers: Annotated[int, typer.Option(help="trials in flight at once")] = 1,
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs each trial reserves (and its torch threads)")] = 1.0,
    gpus_per_trial: Annotated[float, typer.Option(help="GPUs each trial reserves (fractions share a GPU)")] = 0.0,
    executor: Annotated[str, typer.Option(help="ray (Ray Tune) or inline (this process, no Ray)")] = "ray",
    seed: Annotated[int, typer.Option(help="seed of the samplers and algorithms")] = 0,
    multi_objective: Annotated[
        bool, typer.Option("--multi-objective", help="optimise every task's score (tpe, random, grid): a Pareto front")
    ] = False,
    preference: Annotated[
        str | None, typer.Option(help="comma-separated task weights: MAP's choice, the multi-objective best")
    ] = None,
    allow_test: Annotated[
        bool,
        typer.Option(
            "--i-know-this-tunes-on-test-data",
            help="allow an objective that reads a test split or a public benchmark's test set",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="start afresh in --out (removes its previous search)")] = False,
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda for merges and scoring [default: cuda with GPUs]")
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
) -> None:
    """Search a recipe's coefficients: merge and score many parameter sets, in memory, on Ray Tune.

    Every trial is appended to OUT/trials.jsonl; running the same command again resumes a killed
    search. Writes OUT/trials.json and .csv, OUT/best_recipe.yaml, OUT/convergence.png (and
    OUT/pareto.png for multi-objective searches and MAP)."""
    from rich.console import Console

    from mergelab.search.runner import run_search

    console, err_console = Console(), Console(stderr=True)
    progress = None if no_progress else RichSearchProgress(err_console)
    result = run_search(
        recipe,
        objective=objective,
        out=out,
        space=space,
        algorithm=algorithm,
        budget=budget,
        objective_options=_pairs(objective_option),
        seed=seed,
        executor=executor,
        address=ray_address,
        workers=workers,
        cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial,
        device=device,
        multi_objective=multi_objective,
        preference=_floats(preference),
        allow_test=allow_test,
        force=force,
        progress=progress,
    )
    best = result.best
    s = result.summary
    if best is None:
        console.print(f"no trial finished; see {result.out}")
        return
    console.print(
        f"{s['trials']} trials, best score {float(best['score']):.6g} (trial {best['trial']}); "
        f"best recipe: {result.out / 'best_recipe.yaml'}",
        highlight=False,
    )
