"""Progress of data passes: a rich bar in examples/s (or steps/s) beside the engine's tensors/s bar.

Receives the engine's progress object: when it is the CLI's rich bar, data passes draw their own
bar on the same console; any other receiver gets the plain begin/advance/end events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("mergelab.informed")


class DataProgress:
    def __init__(self, engine_progress: Any = None):
        self.engine = engine_progress
        enabled = getattr(engine_progress, "enabled", False)
        self.console = getattr(engine_progress, "console", None) if enabled else None
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        """A line for the user (expected memory, reuse of cached statistics)."""
        self.notes.append(text)
        log.info(text)
        if self.console is not None:
            self.console.print(f"[cyan]data phase:[/] {text}", highlight=False, soft_wrap=True)

    @contextmanager
    def task(self, description: str, total: int | None, unit: str = "ex") -> Iterator[Callable[[int], None]]:
        if self.console is not None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}", style="progress.data.speed"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            bar.start()
            tid = bar.add_task(description, total=total, rate="")

            def advance(n: int = 1) -> None:
                bar.update(tid, advance=n)
                t = bar.tasks[0]
                if t.elapsed:
                    bar.update(tid, rate=f"{t.completed / t.elapsed:6.1f} {unit}/s")

            try:
                yield advance
            finally:
                bar.stop()
            return
        engine = self.engine
        if engine is not None and hasattr(engine, "begin"):
            engine.begin(description, total or 0, 0)

            def advance_engine(n: int = 1) -> None:
                engine.advance(n, 0)

            try:
                yield advance_engine
            finally:
                engine.end()
            return

        def ignore(n: int = 1) -> None:
            pass

        yield ignore
