"""The genome: a search space as a flat vector of coordinates, and its decoding into recipe parameters.

The layout follows mergekit-evolve's ``ModelGenome`` (mergekit ``evo/genome.py``) so that a search
here and one there explore the same space:

* per-model parameters form an array of shape (layer groups, varying experts, parameter sets,
  parameters), flattened in that (C) order: ``layer groups`` = num_layers / ``layer_granularity``
  (1 when it is 0; the layer count must divide evenly), ``parameter sets`` = one per filter plus
  one for every other tensor;
* global parameters (mergelab's addition: mergekit-evolve has none, λ included) follow, shaped
  (layer groups, parameter sets, parameters);
* decoding (``decode: mergekit``): weights |x| (unless ``allow_negative_weights``), densities
  clamp(|x|, 0, 1) (:func:`mergelab.search.space.decode_value`);
* the start point x0: weights 1/N (N varying experts), densities 1, other coordinates the middle of
  their bounds or the bound's ``x0``; CMA-ES starts there with σ0 = ``sigma0`` (1/6).

A coordinate's value for one (group, set) becomes a recipe setting: a scalar with one group; with
several, a list over the layers holding each layer's group value (piecewise constant; mergelab's
and mergekit's gradient rule then gives every layer of a group exactly its value), or with
``smooth: true`` one value per group interpolated over depth (mergekit-evolve's ``smooth``); with
filters, a list of ``{filter, value}`` conditions, the last one without a filter. Tensors outside the
layer blocks (embeddings, final norm) take group 0's values (the gradient rule). mergekit-evolve
writes the piecewise-constant case as ``slices`` instead; the per-layer form merges the same
values and stays a ``models:`` recipe, which the in-memory session can re-parameterise.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mergelab.errors import RecipeError
from mergelab.recipe import Recipe
from mergelab.search.space import Bound, SearchSpace, decode_value


@dataclass(frozen=True)
class Dim:
    """One coordinate of the genome."""

    name: str
    param: str
    scope: Literal["global", "model"]
    group: int
    set: int
    model: int | None  # position among the varying experts
    expert: int | None  # index among the recipe's experts (the session's model_parameters)
    bound: Bound
    x0: float


@dataclass
class Assignment:
    """Decoded parameters of one genome: global settings and one per-model dict per expert."""

    parameters: dict[str, Any]
    model_parameters: list[dict[str, Any]]
    values: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"parameters": self.parameters, "model_parameters": self.model_parameters, "values": self.values}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Assignment:
        return cls(dict(d["parameters"]), [dict(m) for m in d["model_parameters"]], dict(d.get("values", {})))


def apply_assignment(recipe: Recipe, assignment: Assignment, expert_indices: Sequence[int]) -> Recipe:
    """The recipe with the assignment's parameters (global ones over the recipe's, per-model ones over
    each expert's)."""
    models = list(recipe.models)
    for i, mp in zip(expert_indices, assignment.model_parameters):
        if mp:
            models[i] = models[i].model_copy(update={"parameters": {**models[i].parameters, **mp}})
    return recipe.model_copy(update={"parameters": {**recipe.parameters, **assignment.parameters}, "models": models})


class Genome:
    """The coordinates of ``space`` for a recipe with ``experts`` (their names, in the session's
    order) and ``num_layers`` layers."""

    def __init__(self, space: SearchSpace, experts: Sequence[str], num_layers: int | None, where: str = "space"):
        self.space = space
        self.experts = list(experts)
        self.num_layers = num_layers
        g = space.layer_granularity
        if g > 0:
            if not num_layers:
                raise RecipeError(f"{where}: layer_granularity: the models have no numbered layers to group")
            if num_layers % g:
                raise RecipeError(
                    f"{where}: layer_granularity {g} does not divide the {num_layers} layers; use a divisor of "
                    f"{num_layers}"
                )
            self.n_groups = num_layers // g
        else:
            self.n_groups = 1
        self.n_sets = len(space.filters) + 1
        self.varying = self._varying(where)
        n_models = len(self.varying)
        dims: list[Dim] = []
        mparams = list(space.model_parameters.items())
        for group in range(self.n_groups):
            for m, expert in enumerate(self.varying):
                for s in range(self.n_sets):
                    for key, bound in mparams:
                        dims.append(
                            Dim(
                                self._name(key, group, s, m),
                                key,
                                "model",
                                group,
                                s,
                                m,
                                expert,
                                bound,
                                self._x0(key, bound, n_models),
                            )
                        )
        for group in range(self.n_groups):
            for s in range(self.n_sets):
                for key, bound in space.parameters.items():
                    dims.append(
                        Dim(
                            self._name(key, group, s, None),
                            key,
                            "global",
                            group,
                            s,
                            None,
                            None,
                            bound,
                            self._x0(key, bound, 0),
                        )
                    )
        self.dims = dims

    # -- construction helpers
    def _varying(self, where: str) -> list[int]:
        if self.space.models is None:
            return list(range(len(self.experts)))
        out = []
        for ref in self.space.models:
            if isinstance(ref, int):
                if not 0 <= ref < len(self.experts):
                    raise RecipeError(f"{where}: models: index {ref} is not an expert (0..{len(self.experts) - 1})")
                out.append(ref)
            elif ref in self.experts:
                out.append(self.experts.index(ref))
            else:
                raise RecipeError(f"{where}: models: {ref!r} is not one of the recipe's experts")
        if len(set(out)) != len(out):
            raise RecipeError(f"{where}: models: an expert is listed twice")
        return out

    def _name(self, key: str, group: int, s: int, m: int | None) -> str:
        parts = [key]
        if m is not None:
            parts.append(f"m{self.varying[m]}")
        if self.n_groups > 1:
            parts.append(f"g{group}")
        if self.n_sets > 1:
            parts.append(f"s{s}")
        return ".".join(parts)

    def _x0(self, key: str, bound: Bound, n_models: int) -> float:
        if bound.x0 is not None:
            return bound.x0
        if self.space.decode == "mergekit" and n_models:
            # mergekit-evolve's initial genotype: weight 1/N, density (and any later parameter) 1
            want = 1.0 / n_models if key == "weight" else 1.0 if key == "density" else None
            if want is not None:
                return min(max(want, bound.low), bound.high)
        if bound.log:
            import math

            return math.exp((math.log(bound.low) + math.log(bound.high)) / 2)
        return (bound.low + bound.high) / 2

    # -- vectors
    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    def __len__(self) -> int:
        return len(self.dims)

    def x0(self) -> list[float]:
        return [d.x0 for d in self.dims]

    def vector(self, config: Mapping[str, float]) -> list[float]:
        """The coordinates in genome order from a mapping name -> value."""
        return [float(config[d.name]) for d in self.dims]

    def config(self, x: Sequence[float]) -> dict[str, float]:
        if len(x) != len(self.dims):
            raise RecipeError(f"a genome of {len(self.dims)} coordinates was given {len(x)} values")
        return {d.name: float(v) for d, v in zip(self.dims, x)}

    # -- decoding
    def decode(self, x: Sequence[float]) -> Assignment:
        """Recipe parameters from coordinates (see the module docstring)."""
        config = self.config(x)
        values = {d.name: decode_value(self.space, d.param, config[d.name]) for d in self.dims}
        per_model: dict[tuple[int, str], dict[tuple[int, int], float]] = {}
        glob: dict[str, dict[tuple[int, int], float]] = {}
        for d in self.dims:
            v = values[d.name]
            if d.scope == "model":
                assert d.expert is not None
                per_model.setdefault((d.expert, d.param), {})[(d.group, d.set)] = v
            else:
                glob.setdefault(d.param, {})[(d.group, d.set)] = v
        parameters = {key: self._setting(cells) for key, cells in glob.items()}
        model_parameters: list[dict[str, Any]] = [{} for _ in self.experts]
        for (expert, key), cells in per_model.items():
            model_parameters[expert][key] = self._setting(cells)
        return Assignment(parameters, model_parameters, values)

    def _setting(self, cells: Mapping[tuple[int, int], float]) -> Any:
        per_set: list[Any] = []
        for s in range(self.n_sets):
            groups = [cells[(g, s)] for g in range(self.n_groups)]
            if self.n_groups == 1:
                per_set.append(groups[0])
            elif self.space.smooth:
                per_set.append(groups)
            else:
                assert self.num_layers is not None
                size = self.space.layer_granularity
                per_set.append([groups[layer // size] for layer in range(self.num_layers)])
        if self.n_sets == 1:
            return per_set[0]
        filters: list[str | None] = [*self.space.filters, None]
        return [{"filter": f, "value": v} for f, v in zip(filters, per_set)]

    def describe(self) -> dict[str, Any]:
        return {
            "coordinates": len(self.dims),
            "layer_groups": self.n_groups,
            "parameter_sets": self.n_sets,
            "varying_experts": [self.experts[i] for i in self.varying],
            "names": self.names,
            "x0": self.x0(),
            "bounds": [[d.bound.low, d.bound.high, d.bound.log] for d in self.dims],
        }
