"""Plugins registered through entry points: calibration-source kinds, objective kinds."""

from __future__ import annotations

import warnings


def load_entry_points(group: str, what: str) -> None:
    """Call the register function of every entry point in ``group``. A plugin that fails to load is one
    warning (``<what> plugin 'name' (module:fn) failed to load: ...``), attributed to the caller's caller,
    and the others still load: a broken plugin must not break what the core provides itself."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=group):
        try:
            ep.load()()
        except Exception as exc:
            warnings.warn(
                f"{what} plugin {ep.name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}", stacklevel=3
            )
