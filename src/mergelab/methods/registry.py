"""The method registry: ``@method(...)`` registers a function; lookup and listing read it.

Adding a method means writing one module in this package that decorates its function with
:func:`method`; :func:`load_all` imports every module of the package, so nothing else changes.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from collections.abc import Callable, Sequence
from typing import Literal

from mergelab.errors import RecipeError
from mergelab.methods.base import (
    BaseUse,
    DeltaFn,
    MergeFn,
    MergeMethod,
    MethodCard,
    MethodParams,
    NoParams,
    PassesFn,
)

_REGISTRY: dict[str, MergeMethod] = {}
_ALIASES: dict[str, str] = {}
_LOADED = False


def method(
    name: str,
    *,
    paper: str,
    params: type[MethodParams] = NoParams,
    model_params: type[MethodParams] = NoParams,
    base: BaseUse = "required",
    min_experts: int = 1,
    max_experts: int | None = None,
    passes: PassesFn | None = None,
    aliases: Sequence[str] = (),
    summary: str | None = None,
    outputs: Literal["model", "routed"] = "model",
    statistics: str | None = None,
    card: MethodCard | None = None,
    scale: str | None = None,
    delta: DeltaFn | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn(base, experts, params, model_params, ctx) -> Tensor`` under ``name``.

    ``summary`` defaults to the first line of the function's docstring. ``statistics`` names the
    data phase (``mergelab.informed.phase.COLLECTORS``) whose per-expert results the engine
    passes as ``ctx.statistics``; ``None`` for data-free methods. ``card`` declares the identity and
    typical parameters, the benchmark grid and group (:class:`MethodCard`). ``scale`` and
    ``delta`` declare the scaled form ``fn == base + params.<scale> * delta`` (bit for bit), which
    lets the memory session sweep the scale without recomputing the delta.
    """
    if (scale is None) != (delta is None):
        raise ValueError(f"merge method {name!r}: give both scale= and delta=, or neither")

    def decorate(fn: MergeFn) -> MergeFn:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"merge method {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        spec = MergeMethod(
            name=name,
            fn=fn,
            params=params,
            model_params=model_params,
            paper=paper,
            summary=summary or (doc[0] if doc else ""),
            base=base,
            min_experts=min_experts,
            max_experts=max_experts,
            passes_fn=passes,
            aliases=tuple(aliases),
            outputs=outputs,
            statistics=statistics,
            card=card or MethodCard(),
            scale=scale,
            delta=delta,
        )
        _REGISTRY[name] = spec
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return decorate


_NOT_METHODS = {"base", "registry", "docs"}


def load_all() -> None:
    """Import every module of ``mergelab.methods`` so their ``@method`` decorators run."""
    global _LOADED
    if _LOADED:
        return
    import mergelab.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in _NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _LOADED = True


def get_method(name: str) -> MergeMethod:
    """The method registered under ``name`` (or an alias); a RecipeError with suggestions if none."""
    load_all()
    key = _ALIASES.get(name, name)
    if key in _REGISTRY:
        return _REGISTRY[key]
    known = sorted(_REGISTRY) + sorted(_ALIASES)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "run `mergelab methods` for the list"
    raise RecipeError(f"unknown merge_method {name!r}: {hint}")


def all_methods() -> list[MergeMethod]:
    """Every registered method, sorted by name."""
    load_all()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]
