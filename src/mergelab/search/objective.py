"""Objectives of a search: what a merged model is scored with.

An objective is named on the command line as ``KIND:ARG`` (``--objective zoo:validation``),
with options ``--objective-option key=value``. The core provides ``python:module:name`` (a user
function); the benchmark (:mod:`mergelab_bench.eval.objectives`) registers ``zoo:``, ``lm:`` and
``lm-eval:`` through the ``mergelab.objectives`` entry-point group, the way it registers the
``zoo:`` calibration sources: the core never imports the benchmark.

An :class:`Objective` scores a merged state dict and returns :class:`Scores`:

* ``score``: the one number a single-objective search maximises (the benchmark's: the average
  normalized score over tasks);
* ``tasks``: one higher-is-better number per task (the objectives of a multi-objective search);
* ``metrics`` and ``kinds``: each task's raw metric and whether it is an ``accuracy`` (in [0, 1],
  higher is better) or a ``loss`` (≥ 0, lower is better). MAP fits its surrogates to these, with
  a sigmoid link for accuracies and a softplus link for losses, as its official code does.

An objective may also give the gradient of a differentiable loss with respect to the merged
tensors (:meth:`Objective.gradient`), which Frank–Wolfe merging needs.

**The test-split guard.** Tuning on a test split makes the reported score meaningless. A kind
declares which of its specs read test data (``zoo:test``, ``lm:test``, lm-eval tasks whose names
start with a benchmark's prefix, as mergekit-evolve's ``check_for_naughty_config`` lists them), and
:func:`check_not_test` refuses them unless the user passes ``allow_test`` (the command line's
``--i-know-this-tunes-on-test-data``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from mergelab.errors import OptionError
from mergelab.plugins import load_entry_points

Kind = Literal["accuracy", "loss"]

ENTRY_POINT_GROUP = "mergelab.objectives"

BENCHMARK_PREFIXES: tuple[str, ...] = (
    "mmlu",
    "hendrycks",
    "agieval",
    "gsm8k",
    "hellaswag",
    "winogrande",
    "arc_",
    "ai2_arc",
    "truthfulqa",
    "bigbench",
    "piqa",
    "openbookqa",
    "leaderboard",
)
"""lm-eval task-name prefixes of common benchmarks' test sets (mergekit-evolve's list); a task named
``<prefix>..._train`` is allowed, as there."""


@dataclass
class Scores:
    """What an objective says about one merged model (see the module docstring)."""

    score: float
    tasks: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    kinds: dict[str, Kind] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "tasks": dict(self.tasks),
            "metrics": dict(self.metrics),
            "kinds": dict(self.kinds),
            **({"info": self.info} if self.info else {}),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scores:
        return cls(
            float(d["score"]),
            {k: float(v) for k, v in d.get("tasks", {}).items()},
            {k: float(v) for k, v in d.get("metrics", {}).items()},
            dict(d.get("kinds", {})),
            dict(d.get("info", {})),
        )

    @classmethod
    def of(cls, value: Any, name: str = "objective") -> Scores:
        """Scores from what a user function returns: a :class:`Scores`, a number (one task named
        ``name``), or a mapping task -> number (the score is their mean; kinds: accuracy)."""
        if isinstance(value, Scores):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
            return cls(v, {name: v}, {name: v}, {name: "accuracy"})
        if isinstance(value, Mapping) and value and all(isinstance(v, (int, float)) for v in value.values()):
            tasks = {str(k): float(v) for k, v in value.items()}
            return cls(sum(tasks.values()) / len(tasks), tasks, dict(tasks), dict.fromkeys(tasks, "accuracy"))
        raise OptionError(
            f"objective {name}: returned {type(value).__name__}; return a number, a mapping task -> number, "
            "or mergelab.search.Scores"
        )

    def finite(self) -> bool:
        return math.isfinite(self.score) and all(math.isfinite(v) for v in self.tasks.values())


@runtime_checkable
class Objective(Protocol):
    """Scores merged models (state dicts on the CPU, the merge's output dtypes)."""

    name: str

    @property
    def tasks(self) -> Sequence[str]:
        """The task names (may be empty until the first evaluation for a python function)."""
        ...

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> Scores: ...


class GradientObjective(Objective, Protocol):
    """An objective that also gives ``(loss, {tensor name: d loss / d tensor})`` at a merged model."""

    def gradient(self, state: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class ObjectiveContext:
    """What an objective kind may know when it builds an objective: the recipe (as a dict, model
    paths absolute), the compute device and options given with ``--objective-option``."""

    recipe: Mapping[str, Any]
    device: str = "cpu"
    options: Mapping[str, str] = field(default_factory=dict)


ObjectiveFactory = Callable[[str, ObjectiveContext], Objective]
TestCheck = Callable[[str, Mapping[str, str]], "str | None"]
SpecCheck = Callable[[str, Mapping[str, str]], None]


@dataclass(frozen=True)
class ObjectiveKind:
    """One kind of objective: ``build(arg, context)``, ``reads_test(arg, options)`` (why the spec
    reads test data, or None) and ``check(arg, options)`` (a cheap validation the driver runs before
    anything is written: names, options, files; raises a MergelabError)."""

    prefix: str
    build: ObjectiveFactory
    reads_test: TestCheck | None = None
    description: str = ""
    check: SpecCheck | None = None

    @property
    def plugin(self) -> str | None:
        """The top-level package that registered the kind (importing it registers it again in a
        worker process), or None for the core's own kinds."""
        top = (getattr(self.build, "__module__", "") or "").split(".")[0]
        return None if top in ("", "mergelab", "__main__") else top


_KINDS: dict[str, ObjectiveKind] = {}
_entry_points_loaded = False


def register_objective_kind(
    prefix: str,
    build: ObjectiveFactory,
    *,
    reads_test: TestCheck | None = None,
    description: str = "",
    check: SpecCheck | None = None,
) -> None:
    """Register (or replace) the objectives named ``<prefix>:...``."""
    _KINDS[prefix] = ObjectiveKind(prefix, build, reads_test, description, check)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    load_entry_points(ENTRY_POINT_GROUP, "objective")


def objective_kinds() -> dict[str, ObjectiveKind]:
    """Every registered kind (entry points loaded)."""
    _load_entry_points()
    return dict(_KINDS)


def split_spec(spec: str) -> tuple[str, str]:
    """``KIND:ARG`` -> (kind, arg)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise OptionError(
            f"--objective {spec!r}: expected KIND:ARG, e.g. zoo:validation, lm:validation, lm-eval:TASKS "
            "or python:module:function"
        )
    kind, arg = spec.split(":", 1)
    return kind.strip(), arg.strip()


def objective_kind(prefix: str) -> ObjectiveKind:
    if prefix not in _KINDS:
        _load_entry_points()
    if prefix not in _KINDS:
        known = ", ".join(sorted(_KINDS)) or "none"
        raise OptionError(
            f"--objective {prefix}:...: no objective kind {prefix!r} is registered (known: {known}); zoo:, lm: "
            "and lm-eval: come with mergelab_bench (part of `pip install -e .`)"
        )
    return _KINDS[prefix]


def check_not_test(spec: str, options: Mapping[str, str] | None = None, *, allow_test: bool = False) -> str | None:
    """Refuse an objective that tunes on test data (OptionError) unless ``allow_test``; returns the
    reason when allowed (to record it), else None."""
    kind, arg = split_spec(spec)
    k = objective_kind(kind)
    reason = k.reads_test(arg, dict(options or {})) if k.reads_test is not None else None
    if reason and not allow_test:
        raise OptionError(
            f"--objective {spec}: {reason}; a search tuned on test data reports a meaningless score. Search on "
            "validation data, or pass --i-know-this-tunes-on-test-data if that is really meant"
        )
    return reason


def check_objective(spec: str, options: Mapping[str, str] | None = None) -> None:
    """The kind's cheap validation of ``spec`` (run by the driver before anything is written)."""
    kind, arg = split_spec(spec)
    k = objective_kind(kind)
    if k.check is not None:
        k.check(arg, dict(options or {}))


def lm_eval_reads_test(tasks: str, options: Mapping[str, str] | None = None) -> str | None:
    """Why an lm-eval task list reads benchmarks' test sets (mergekit-evolve's prefix rule), or None."""
    for task in (t.strip() for t in tasks.split(",")):
        if task and not task.endswith("_train") and task.startswith(BENCHMARK_PREFIXES):
            return f"lm-eval task {task!r} is a public benchmark's test set"
    return None


def build_objective(spec: str, context: ObjectiveContext) -> Objective:
    """The objective named by ``spec`` (``KIND:ARG``)."""
    kind, arg = split_spec(spec)
    return objective_kind(kind).build(arg, context)


# --- python:module:name ---------------------------------------------------------------------


def _python_target(target: str) -> Any:
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise OptionError(f"--objective python:{target}: expected python:module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OptionError(f"--objective python:{target}: cannot import {module_name!r} ({exc})") from None
    fn = getattr(module, attr, None)
    if fn is None:
        raise OptionError(f"--objective python:{target}: module {module_name!r} has no {attr!r}")
    return fn


class PythonObjective:
    """``python:module:name``: ``name`` is a function ``f(state_dict) -> number | {task: number} |
    Scores``, or an object with ``evaluate(state_dict)`` (and optionally ``gradient(state_dict)``
    and ``tasks``). A function may take a second argument: the :class:`ObjectiveContext`."""

    def __init__(self, target: str, context: ObjectiveContext) -> None:
        fn = _python_target(target)
        self.name = f"python:{target}"
        self._context = context
        self._target = fn
        self.tasks: list[str] = list(getattr(fn, "tasks", None) or [])
        self._takes_context = _arity(fn) >= 2 if callable(fn) and not hasattr(fn, "evaluate") else False

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> Scores:
        if hasattr(self._target, "evaluate"):
            value = self._target.evaluate(state)
        elif self._takes_context:
            value = self._target(state, self._context)
        else:
            value = self._target(state)
        scores = Scores.of(value, self.name)
        if not self.tasks:
            self.tasks = list(scores.tasks)
        return scores

    def gradient(self, state: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
        grad = getattr(self._target, "gradient", None)
        if grad is None:
            raise OptionError(f"--objective {self.name}: gives no gradient; give the object a gradient(state) method")
        loss, grads = grad(state)
        return float(loss), dict(grads)


def _arity(fn: Any) -> int:
    import inspect

    try:
        return len(
            [
                p
                for p in inspect.signature(fn).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
            ]
        )
    except (TypeError, ValueError):
        return 1


def _check_python(arg: str, options: Mapping[str, str]) -> None:
    if options:
        raise OptionError(f"--objective-option {next(iter(options))}: python: objectives take no options")
    _python_target(arg)


register_objective_kind(
    "python",
    lambda arg, ctx: PythonObjective(arg, ctx),
    description="python:module:function - a user function of the merged state dict",
    check=_check_python,
)
