"""A registry of task specs by name, one per suite (``TASKS``, ``LM_TASKS``)."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar


class _Named(Protocol):
    @property
    def name(self) -> str: ...  # read-only, so frozen dataclasses qualify


S = TypeVar("S", bound=_Named)


class Registry(dict[str, S], Generic[S]):
    """Specs by name; ``noun`` names them in errors (``task``, ``LM task``)."""

    def __init__(self, noun: str) -> None:
        super().__init__()
        self.noun = noun

    def add(self, spec: S) -> S:
        if spec.name in self:
            raise ValueError(f"{self.noun} {spec.name!r} registered twice")
        self[spec.name] = spec
        return spec

    def spec(self, name: str) -> S:
        if name not in self:
            raise KeyError(f"unknown {self.noun} {name!r}; known: {', '.join(sorted(self))}")
        return self[name]
