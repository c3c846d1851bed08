"""Where mergelab's defaults differ from mergekit 0.1.5's, and parameters mergekit accepts
without effect: the table behind the recipe key ``defaults:`` and its warnings.

mergelab's defaults are its papers' (each method module's docstring gives the source); mergekit
0.1.5 chose others for the same parameter names (e.g. ``density`` 1.0, "no sparsification", for
every sparsifying method). A recipe that omits such a parameter runs differently in the two
tools, so planning (``mergelab validate`` and ``mergelab merge``) warns, naming both defaults,
unless the recipe chose with the top-level key

* ``defaults: paper`` (the default when the key is absent, but without the warnings), or
* ``defaults: mergekit``: every parameter of this table that the recipe leaves unset takes
  mergekit's value (global parameters once, per-model parameters for every model).

Some rows are mergekit behaviours that mergelab exposes as a parameter of its own
(``rescale_mode``, ``bound_ties``, ``norm_product_floor``, ``uniform_below``): mergekit has no
such key, but ``defaults: mergekit`` sets it to what mergekit does. The table is listed in
``docs/mergekit.md`` (``python -m mergelab.methods.mergekit_defaults`` prints it), and the test
``tests/test_mergekit_defaults.py`` checks every mergekit value against mergekit's own
parameter specs when ``MERGEKIT_PYTHON`` is set.

``IGNORED`` lists parameters mergekit accepts for a method and ignores (so its recipes carry
them): mergelab accepts them too and warns that they have no effect.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

Scope = Literal["global", "model"]


@dataclass(frozen=True)
class DefaultDifference:
    """One parameter whose default differs: ``ours`` (mergelab, ``source``) against ``mergekit``."""

    method: str
    parameter: str
    scope: Scope
    ours: Any
    mergekit: Any
    source: str
    mergekit_key: bool = True  # False: a mergelab parameter standing for a mergekit behaviour


_BOUND_TIES = "streamed bounds keep every tied entry; mergekit counts exactly, ties in torch.sort's order"

#: The differences, one row each: (parameter, scope, mergelab's default, mergekit's, source of
#: mergelab's, whether mergekit has the key). Several methods share a row (below).
_ROWS: dict[str, tuple[str, Scope, Any, Any, str, bool]] = {
    "ties_density": ("density", "model", 0.2, 1.0, "TIES paper: keep the top 20 %", True),
    "ties_normalize": ("normalize", "global", True, False, "TIES disjoint mean", True),
    "breadcrumbs_density": ("density", "model", 0.9, 1.0, "mergelab's choice: the paper tunes it per setting", True),
    "bound_ties": ("bound_ties", "global", "keep", "sort", _BOUND_TIES, False),
    "dare_density": ("density", "model", 0.5, 1.0, "DARE authors' example (drop rate 0.5)", True),
    "dare_rescale": (
        "rescale_mode",
        "global",
        "inverse",
        "l1",
        "DARE paper: divide by 1 − p; mergekit matches the L1 norm",
        False,
    ),
    "della_density": ("density", "model", 0.7, 1.0, "DELLA authors' reference command (drop 0.3)", True),
    "della_epsilon": ("epsilon", "model", 0.07, 0.15, "DELLA authors' reference command", True),
    "della_rescale": (
        "rescale_mode",
        "global",
        "inverse",
        "l1",
        "DELLA paper: divide by each keep probability; mergekit matches the L1 norm",
        False,
    ),
    "model_stock_floor": (
        "norm_product_floor",
        "global",
        0.0,
        1e-6,
        "Model Stock paper: the exact cosine; mergekit divides by max(‖τi‖‖τj‖, 1e-6)",
        False,
    ),
    "sce_uniform": (
        "uniform_below",
        "global",
        0.0,
        1e-6,
        "FuseChat: variance-ratio weights; mergekit uses equal weights below a 1e-6 sum",
        False,
    ),
}

#: Per method, its rows of :data:`_ROWS`, in the order they are listed and warned about.
_METHOD_ROWS: dict[str, tuple[str, ...]] = {
    "ties": ("ties_density",),
    "breadcrumbs": ("breadcrumbs_density", "bound_ties"),
    "breadcrumbs_ties": ("breadcrumbs_density", "ties_normalize", "bound_ties"),
    "dare_linear": ("dare_density", "dare_rescale"),
    "dare_ties": ("dare_density", "ties_normalize", "dare_rescale"),
    "della": ("della_density", "della_epsilon", "della_rescale"),
    "della_linear": ("della_density", "della_epsilon", "della_rescale"),
    "model_stock": ("model_stock_floor",),
    "sce": ("sce_uniform",),
}

DIFFERENCES: tuple[DefaultDifference, ...] = tuple(
    DefaultDifference(method, *_ROWS[row][:5], mergekit_key=_ROWS[row][5])
    for method, rows in _METHOD_ROWS.items()
    for row in rows
)
"""Every (method, parameter) whose default differs, method by method."""

IGNORED: dict[str, dict[str, str]] = {
    "task_arithmetic": {
        "density": "task arithmetic does not sparsify (mergekit ignores it too); use ties or dare_linear",
        "rescale": "task arithmetic does not sparsify, so there is nothing to rescale (mergekit ignores it too)",
    },
}
"""Per method: parameters mergekit accepts without effect (mergelab accepts them with a warning)."""

DefaultsChoice = Literal["paper", "mergekit"]


def differences(method: str) -> tuple[DefaultDifference, ...]:
    """The rows of :data:`DIFFERENCES` for one method (by its registered name)."""
    return tuple(d for d in DIFFERENCES if d.method == method)


def mergekit_fill(method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, per-model) values that ``defaults: mergekit`` gives unset parameters."""
    g = {d.parameter: d.mergekit for d in differences(method) if d.scope == "global"}
    m = {d.parameter: d.mergekit for d in differences(method) if d.scope == "model"}
    return g, m


def _fmt(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def parameter_warnings(
    method: str,
    defaults: DefaultsChoice | None,
    global_keys: Iterable[str],
    model_keys: Iterable[Iterable[str]],
) -> list[str]:
    """One-line warnings for a recipe: parameters mergekit accepts without effect that it sets,
    and (without a ``defaults:`` key) parameters it leaves at a default that differs from
    mergekit's. ``global_keys``: the recipe's top-level parameter names; ``model_keys``: each
    merged model's parameter names."""
    gkeys = set(global_keys)
    mkeys = [set(k) for k in model_keys]
    out: list[str] = []
    for key, why in IGNORED.get(method, {}).items():
        if key in gkeys or any(key in k for k in mkeys):
            out.append(f"{method}: parameter {key!r} has no effect: {why}")
    if defaults is not None:
        return out
    for d in differences(method):
        if d.scope == "global":
            unset = d.parameter not in gkeys
        else:
            unset = d.parameter not in gkeys and any(d.parameter not in k for k in mkeys)
        if unset:
            mk = (
                f"mergekit 0.1.5 uses {_fmt(d.mergekit)}"
                if d.mergekit_key
                else f"mergekit 0.1.5 behaves as {_fmt(d.mergekit)}"
            )
            out.append(
                f"{method}: {d.parameter!r} not set: mergelab uses {_fmt(d.ours)} ({d.source}), {mk}; "
                f"set it, or add `defaults: mergekit` (mergekit's defaults) or `defaults: paper` to the recipe"
            )
    return out


def markdown_table() -> str:
    """The table of :data:`DIFFERENCES` as Markdown (docs/mergekit.md)."""
    rows = [
        "| method | parameter | scope | mergelab default | mergekit 0.1.5 default | source of mergelab's |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for d in DIFFERENCES:
        mk = _fmt(d.mergekit) if d.mergekit_key else f"({_fmt(d.mergekit)}: its behaviour, no key)"
        rows.append(
            f"| `{d.method}` | `{d.parameter}` | {'per model' if d.scope == 'model' else 'global'} | "
            f"{_fmt(d.ours)} | {mk} | {d.source} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
