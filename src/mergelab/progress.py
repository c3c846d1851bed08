"""A rich progress bar for the engine: tensors, tensors/s, GB/s and ETA per phase."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _RateColumn(ProgressColumn):
    """Tensors per second and gigabytes read per second."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0:
            return Text("", style="progress.data.speed")
        nbytes = task.fields.get("nbytes", 0)
        return Text(
            f"{task.completed / elapsed:5.0f} t/s {nbytes / elapsed / 1e9:5.2f} GB/s", style="progress.data.speed"
        )


class RichProgress:
    """Implements the engine's Progress protocol with a rich progress bar on stderr."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._bytes = 0
        self._t0 = 0.0

    def begin(self, phase: str, total_items: int, total_bytes: int) -> None:
        if not self.enabled:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._progress.start()
        self._bytes = 0
        self._t0 = time.perf_counter()
        self._task = self._progress.add_task(phase, total=total_items, nbytes=0)

    def advance(self, items: int, nbytes: int) -> None:
        if self._progress is None or self._task is None:
            return
        self._bytes += nbytes
        self._progress.update(self._task, advance=items, nbytes=self._bytes)

    def end(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
        self._task = None
