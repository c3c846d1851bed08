"""Fixtures of the search tests: a tiny two-task zoo with its recipe, a tiny Llama family, and a
python objective module (``search_objectives``, importable because pytest puts this folder on
``sys.path``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny_models import one_torch_thread  # noqa: F401 - autouse: one torch thread in these tests


@pytest.fixture(scope="session")
def tiny_zoo_recipe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(recipe.yaml, zoo manifest): TIES over the tiny zoo's two experts (BERT, 2 layers)."""
    import mergelab_bench  # noqa: F401 - registers the zoo: objectives when the entry points are not installed
    from mergelab_bench.zoo.build import Zoo
    from mergelab_bench.zoo.testing import write_tiny_zoo

    root = tmp_path_factory.mktemp("searchzoo")
    manifest = write_tiny_zoo(root / "zoo")
    zoo = Zoo(manifest)
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(zoo.base_dir),
                "models": [{"model": str(zoo.expert_model_dir(t))} for t in zoo.tasks],
                "parameters": {"lambda": 1.0},
            }
        )
    )
    return recipe, manifest


@pytest.fixture(scope="session")
def llama_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """task_arithmetic over a tiny Llama base and two experts (2 layers)."""
    from mergelab.synthetic import make_family

    root = tmp_path_factory.mktemp("searchllama")
    base, experts = make_family(root, n_experts=2)
    recipe = root / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(base),
                "models": [{"model": str(e)} for e in experts],
            }
        )
    )
    return recipe
