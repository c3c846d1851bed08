"""Ray Tune callbacks of the Ray backend, importable by name (imported only when Ray Tune runs).

Ray Tune pickles its run configuration (callbacks and stoppers included) when it saves the
experiment's state. These classes hold only a token; the driver's live sink (the trial log and the
progress display, which cannot be pickled) is looked up by that token in this process.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ray import tune

_SINKS: dict[str, Callable[[dict[str, Any]], Any]] = {}
_ERRORS: dict[str, dict[str, Any] | None] = {}


def open_run(token: str, sink: Callable[[dict[str, Any]], Any]) -> None:
    _SINKS[token] = sink
    _ERRORS[token] = None


def close_run(token: str) -> dict[str, Any] | None:
    """Forget the run; its first failed trial's record, if any."""
    _SINKS.pop(token, None)
    return _ERRORS.pop(token, None)


class LogResults(tune.Callback):
    """Every reported trial record to the driver's sink; the first error record is kept."""

    def __init__(self, token: str) -> None:
        self.token = token

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict, **info: Any) -> None:
        text = result.get("record")
        if not text:
            return
        record = json.loads(text)
        if "error" in record:
            if _ERRORS.get(self.token) is None:
                _ERRORS[self.token] = record
            return
        sink = _SINKS.get(self.token)
        if sink is not None:
            sink(record)


class StopOnError(tune.Stopper):
    """Stop every trial once one has failed."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, trial_id: str, result: dict) -> bool:
        return _ERRORS.get(self.token) is not None

    def stop_all(self) -> bool:
        return _ERRORS.get(self.token) is not None
