"""What the two suites' evaluators share: the zoo, tasks, split and row limit they score on, and
how a model given in any accepted form becomes a module.

Accepted models: an HF checkpoint directory, a ``.safetensors`` file or a directory of them (a
state dict of the base's architecture), an in-memory state dict (loaded into one scratch module
that later state dicts reuse), an ``nn.Module``, or the names ``base`` and ``expert:<task>``
for the zoo's own models. A suite says how to load a checkpoint directory, how to build a module
from a state dict and how to load one into it (:class:`ZooEvaluator`'s abstract methods).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def load_state_dict_path(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``.safetensors`` file, or of every ``*.safetensors`` file in a directory."""
    from safetensors.torch import load_file

    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors file")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


class ZooEvaluator(ABC):
    """Scores models on a zoo's tasks (one split, the first ``limit`` rows of each)."""

    def __init__(self, zoo: Any, *, tasks: Sequence[str] | None, split: str, limit: int | None) -> None:
        self.zoo = zoo
        self.tasks = list(tasks) if tasks else zoo.tasks
        for t in self.tasks:
            zoo.data(t)  # fail early on an unknown task
        self.split = split
        self.limit = limit
        self._scratch: nn.Module | None = None

    # -- what a suite provides
    @abstractmethod
    def _load_dir(self, path: Path) -> nn.Module: ...

    @abstractmethod
    def _from_state_dict(self, state: Mapping[str, torch.Tensor]) -> nn.Module: ...

    @abstractmethod
    def _load_into(self, module: nn.Module, state: Mapping[str, torch.Tensor]) -> None: ...

    def _prepare(self, module: nn.Module) -> nn.Module:
        """A module given as is, made ready to score (e.g. moved to the zoo's device)."""
        return module

    # -- any model form -> a module
    def zoo_model_dir(self, text: str) -> Path | None:
        """The checkpoint directory of ``base`` or ``expert:<task>`` (an unknown task: ZooError), else None."""
        if text == "base":
            return self.zoo.base_dir
        if text.startswith("expert:"):
            return self.zoo.expert_model_dir(text.split(":", 1)[1])
        return None

    def module(self, model: Any) -> nn.Module:  # the suite's model forms
        """A module for any accepted model form (see the module docstring), in eval mode."""
        if isinstance(model, nn.Module):
            return self._prepare(model).eval()
        if isinstance(model, Mapping):
            if self._scratch is None:
                self._scratch = self._from_state_dict(model)
            else:
                self._load_into(self._scratch, model)
            return self._scratch.eval()
        text = os.fspath(model)
        zoo_dir = self.zoo_model_dir(text)
        if zoo_dir is not None:
            return self._load_dir(zoo_dir)
        path = Path(text)
        if path.is_dir() and (path / "config.json").is_file():
            return self._load_dir(path)
        if path.exists():
            return self.module(load_state_dict_path(path))
        raise FileNotFoundError(f"{text}: no such checkpoint (a directory, a .safetensors file, base or expert:<task>)")
