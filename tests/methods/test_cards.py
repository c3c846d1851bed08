"""Method cards (``@method(..., card=MethodCard(...))``) and the consumers that read them: the
benchmark grids and groups, the LM suite's grids, the speed benchmark's recipes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import mergelab
from mergelab.methods import all_methods, get_method
from mergelab_bench.eval.grids import GRIDS, GROUPS, METHOD_GROUPS, ROW_VARIANTS, GridPoint, grid_for, product

ROOT = Path(__file__).resolve().parents[2]


def _speed_module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("merge_speed", ROOT / "benchmarks" / "merge_speed.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["merge_speed"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("m", all_methods(), ids=lambda m: m.name)
def test_card_parameters_validate_against_the_method_parameter_models(m):
    card = m.card
    for scoped in (card.identity, card.typical):
        if scoped is not None:
            m.params.model_validate(dict(scoped[0]))
            m.model_params.model_validate(dict(scoped[1]))
    assert card.group is None or card.group in GROUPS, f"{m.name}: unknown group {card.group!r}"
    for row, fixed in card.variants.items():
        assert row == m.name or row not in {x.name for x in all_methods()}, row  # its own row, or a new name
        m.params.model_validate(dict(fixed))


def test_grids_and_groups_come_from_the_cards():
    for m in all_methods():
        card = m.card
        rows = list(card.variants) or [m.name]
        for row in rows:
            if card.group is not None:
                assert row in METHOD_GROUPS[card.group], row
                assert row in METHOD_GROUPS["all"], row
            if card.grid is not None:
                want = [
                    ({**card.variants.get(row, {}), **p.parameters}, dict(p.model_parameters))
                    for p in product(*card.grid)
                ]
                assert [(dict(p.parameters), dict(p.model_parameters)) for p in GRIDS[row]] == want, row
    assert ROW_VARIANTS["adamerging_task"] == "adamerging"
    assert grid_for("adamerging_layer") == (GridPoint({"granularity": "layer"}),)
    assert METHOD_GROUPS["adamerging"] == ("adamerging_task", "adamerging_layer")
    # a method that keeps its own row beside a variant (ties: per-tensor trim; ties_global: the paper's)
    assert ROW_VARIANTS["ties_global"] == "ties" and "ties" not in ROW_VARIANTS and "ties" not in METHOD_GROUPS
    assert {dict(p.parameters)["scope"] for p in GRIDS["ties_global"]} == {"global"}
    assert all("scope" not in p.parameters for p in GRIDS["ties"])
    # the committed leaderboards' order is kept
    assert METHOD_GROUPS["classic"][:3] == ("linear", "task_arithmetic", "ties")
    assert METHOD_GROUPS["informed"][:3] == ("fisher", "regmean", "regmean_plusplus")


def test_lm_suite_overrides_a_card_grid_and_otherwise_uses_it():
    from mergelab_bench.eval.lm_bench import LM_GRIDS, LM_METHODS, lm_grid_for

    assert lm_grid_for("ties") == LM_GRIDS["ties"] != grid_for("ties")
    assert lm_grid_for("tsv_m") == grid_for("tsv_m") == product(*get_method("tsv_m").card.grid)
    assert lm_grid_for("adamerging_task") == (GridPoint({"granularity": "task"}),)
    assert all(get_method(m) for m in LM_METHODS)


def test_speed_benchmark_recipes_plan_for_every_data_free_method(family, tmp_path):
    speed = _speed_module()
    assert speed.DEFAULT_METHODS == (
        "task_arithmetic", "ties", "dare_ties", "della", "linear", "breadcrumbs", "model_stock", "slerp",
    )  # fmt: skip
    assert set(speed.available_methods()) == {m.name for m in all_methods() if m.statistics is None}
    base, experts = family
    root = tmp_path / "set"
    root.mkdir()
    for name, src in zip(("base", "ft_dense", "ft_sparse", "ft_conflict"), (base, *experts), strict=True):
        (root / name).symlink_to(src)
    for name in speed.available_methods():
        recipe = tmp_path / f"{name}.yaml"
        recipe.write_text(speed.recipe_text(name, root))
        gp, mp = speed.recipe_parameters(name)
        if name not in speed.RECIPES:
            assert (gp, mp) == tuple(dict(x) for x in (get_method(name).card.typical or ({}, {})))
        plan = mergelab.plan_merge(recipe)
        plan.close()
