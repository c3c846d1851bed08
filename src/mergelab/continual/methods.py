"""The continual methods by name: OPCM, DOP and the sequential baselines."""

from __future__ import annotations

import difflib

from mergelab.continual.base import ContinualMethod
from mergelab.continual.baselines import AVERAGE, MAGMAX, TASK_ARITHMETIC, TIES
from mergelab.continual.dop import DOP
from mergelab.continual.opcm import OPCM
from mergelab.errors import RecipeError

METHODS: dict[str, ContinualMethod] = {m.name: m for m in (OPCM, DOP, AVERAGE, TASK_ARITHMETIC, TIES, MAGMAX)}
"""Every continual method, by name (``mergelab continual init --method NAME``)."""


def get_method(name: str) -> ContinualMethod:
    """The continual method ``name``; a one-line RecipeError with suggestions if there is none."""
    method = METHODS.get(name)
    if method is not None:
        return method
    close = difflib.get_close_matches(name, list(METHODS), n=2)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(METHODS)}"
    raise RecipeError(f"unknown continual method {name!r}: {hint}")
