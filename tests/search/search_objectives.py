"""Python objectives of the search tests (``python:search_objectives:<name>``)."""

from __future__ import annotations

import os

import torch

CALLS = {"n": 0}


def _layer_mean(state, layer: int) -> float:
    vals = [t.float().mean() for k, t in state.items() if f"layers.{layer}." in k and t.is_floating_point()]
    return float(torch.stack(vals).mean())


def closeness(state) -> float:
    """Peaks where the merged layer-0 tensors' mean is 0.01 above the layer-1 ones'."""
    return -abs(_layer_mean(state, 0) - _layer_mean(state, 1) - 0.01)


def two_tasks(state) -> dict[str, float]:
    return {"first": -abs(_layer_mean(state, 0) - 0.02), "second": -abs(_layer_mean(state, 1) + 0.02)}


two_tasks.tasks = ["first", "second"]  # type: ignore[attr-defined]


def two_accuracies(state) -> dict[str, float]:
    """Two accuracy-like scores in (0, 1) that pull the layers' means different ways."""
    a, b = _layer_mean(state, 0), _layer_mean(state, 1)
    return {
        "first": float(torch.sigmoid(torch.tensor(-((a - 0.01) ** 2) * 1e4))),
        "second": float(torch.sigmoid(torch.tensor(-((b + 0.01) ** 2) * 1e4))),
    }


two_accuracies.tasks = ["first", "second"]  # type: ignore[attr-defined]


def interrupting(state) -> float:
    """closeness, but Ctrl-C at the call numbered by $SEARCH_STOP_AT (a killed search)."""
    CALLS["n"] += 1
    if CALLS["n"] == int(os.environ.get("SEARCH_STOP_AT", "0")):
        raise KeyboardInterrupt
    return closeness(state)
