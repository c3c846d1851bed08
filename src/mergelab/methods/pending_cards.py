"""TEMPORARY: the method cards of the modules being restructured on the ``stages`` branch.

REMOVED WHEN THE STAGES BRANCH MERGES (delete this file; nothing else refers to it). The stages
branch declares these cards on the methods' own ``@method(..., card=...)``; until it lands, this
module gives the registry the same values, so that the consumers (the contract tests, the
benchmark grids and groups, the speed benchmark) read every card from the registry already.

:func:`mergelab.methods.registry.load_all` imports this module like a method module; it imports
every other module of the package first, then fills in the card of each method listed here whose
own card is still empty (a method that declares its card keeps it).
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from mergelab.methods import registry
from mergelab.methods.base import MethodCard

_SUM = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
_SUM_SPARSE = (0.2, 0.4, 0.7, 1.0, 1.3)
_MEAN = (1.0, 1.5, 2.0, 2.5, 3.0)
_MEAN_SPARSE = (1.0, 1.5, 2.0, 2.5)

PENDING: dict[str, MethodCard] = {
    "linear": MethodCard(identity=({}, {"weight": 1.0}), grid=({}, {}), group="classic"),
    "task_arithmetic": MethodCard(
        identity=({"lambda": 1.0, "normalize": True}, {"weight": 1.0}),
        grid=({"lambda": _SUM}, {}),
        group="classic",
    ),
    "ties": MethodCard(
        identity=({"lambda": 1.0}, {"density": 1.0, "weight": 1.0}),
        typical=({}, {"density": 0.3}),
        grid=({"lambda": _MEAN}, {"density": (0.1, 0.2, 0.3)}),
        group="classic",
    ),
    "dare_linear": MethodCard(
        identity=({"lambda": 1.0, "normalize": True}, {"density": 1.0, "weight": 1.0}),
        typical=({}, {"density": 0.5}),
        grid=({"lambda": _SUM_SPARSE}, {"density": (0.1, 0.3, 0.5)}),
        group="classic",
    ),
    "dare_ties": MethodCard(
        identity=({"lambda": 1.0}, {"density": 1.0, "weight": 1.0}),
        typical=({}, {"density": 0.5}),
        grid=({"lambda": _MEAN_SPARSE}, {"density": (0.1, 0.3, 0.5)}),
        group="classic",
    ),
    "breadcrumbs": MethodCard(
        identity=({"lambda": 1.0, "normalize": True}, {"density": 1.0, "gamma": 0.0, "weight": 1.0}),
        typical=({}, {"density": 0.8, "gamma": 0.05}),
        grid=({"lambda": _SUM_SPARSE}, {"density": (0.7, 0.9), "gamma": (0.01,)}),
        group="classic",
    ),
    "breadcrumbs_ties": MethodCard(
        identity=({"lambda": 1.0}, {"density": 1.0, "gamma": 0.0, "weight": 1.0}),
        typical=({}, {"density": 0.8, "gamma": 0.05}),
        grid=({"lambda": _MEAN_SPARSE}, {"density": (0.7, 0.9), "gamma": (0.01,)}),
        group="classic",
    ),
    "della": MethodCard(
        identity=({"lambda": 1.0}, {"density": 1.0, "epsilon": 0.0, "weight": 1.0}),
        typical=({}, {"density": 0.5, "epsilon": 0.1}),
        grid=({"lambda": _MEAN_SPARSE}, {"density": (0.3, 0.5, 0.7)}),
        group="classic",
    ),
    "della_linear": MethodCard(
        identity=({"lambda": 1.0, "normalize": True}, {"density": 1.0, "epsilon": 0.0, "weight": 1.0}),
        typical=({}, {"density": 0.5, "epsilon": 0.1}),
        grid=({"lambda": _SUM_SPARSE}, {"density": (0.3, 0.5, 0.7)}),
        group="classic",
    ),
    "model_stock": MethodCard(identity=({}, {}), grid=({}, {}), group="classic"),
    "tall_masks": MethodCard(
        identity=({"normalize": True}, {}),  # shared model θ0 + mean τ (the masks are parts)
        typical=({"multitask": "ties"}, {"tall_lambda": 0.4, "density": 0.3}),
        grid=({"multitask": ("sum", "ties")}, {"tall_lambda": (0.2, 0.4, 0.6)}),
        group="advanced",
    ),
    "consensus": MethodCard(
        identity=({"normalize": True}, {}),
        typical=({"lambda": 0.5}, {"tall_lambda": 0.3}),
        grid=({"multitask": ("sum", "ties"), "lambda": (0.4, 0.7, 1.0), "k": (2,)}, {}),
        group="advanced",
    ),
    "emr": MethodCard(identity=({}, {}), typical=({}, {}), grid=({}, {}), group="advanced"),  # θ0 + τ_uni
    "magmax": MethodCard(
        identity=({"lambda": 1.0}, {}),
        typical=({}, {}),
        grid=({"lambda": (0.3, 0.5, 0.7, 1.0, 1.3)}, {}),
        group="advanced",
    ),
    "pcb": MethodCard(
        identity=({"pcb_ratio": 1.0, "clip_ratio": 0.0, "unscored": "mean"}, {"weight": 1.0}),
        typical=({"pcb_ratio": 0.2, "scope": "global"}, {}),
        grid=({"pcb_ratio": (0.1, 0.2, 0.3), "lambda": (1.0, 1.2)}, {}),
        group="advanced",
    ),
}


def _apply() -> None:
    import mergelab.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if (
            info.name not in registry._NOT_METHODS
            and not info.name.startswith("_")
            and info.name != __name__.rsplit(".", 1)[1]
        ):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    for name, card in PENDING.items():
        spec = registry._REGISTRY.get(name)
        if spec is not None and spec.card == MethodCard():
            registry._REGISTRY[name] = dataclasses.replace(spec, card=card)


_apply()
