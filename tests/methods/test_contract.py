"""Contracts every registered method must honour, checked over the whole registry.

The parameters come from each method's card (``@method(..., card=MethodCard(identity=...,
typical=...))``): ``identity`` are (global, per-model) parameters under which merging copies of
one expert gives that expert back; ``typical`` exercise the method's non-trivial path (sparsity,
randomness; the defaults when absent). A new method declares them in its own module; the first
test fails, naming that module, until it does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergelab
from mergelab.methods import all_methods, get_method

# Data-informed methods (those that declare `statistics=`: Fisher, RegMean, RegMean++,
# AdaMerging) merge with per-expert statistics from a data phase (ctx.statistics: Fisher diagonals, Gram
# matrices, learned coefficients) that these generic contracts do not provide.
# tests/informed/test_contracts.py checks the same contracts for them (identity, zero task
# vectors, dtype, seeded reproducibility, streamed == in memory) with statistics.
DATA_INFORMED = {m.name for m in all_methods() if m.statistics is not None}
METHODS = [m.name for m in all_methods() if m.name not in DATA_INFORMED]

# global params, per-model params, under which n identical experts must return the expert
IDENTITY_PARAMS: dict[str, tuple[dict, dict]] = {
    m.name: m.card.identity for m in all_methods() if m.card.identity is not None and m.name in METHODS
}
# parameters that exercise each method's non-trivial path (sparsity, randomness)
TYPICAL_PARAMS: dict[str, tuple[dict, dict]] = {
    m.name: m.card.typical for m in all_methods() if m.card.typical is not None and m.name in METHODS
}


def test_data_informed_exclusions_are_the_methods_with_statistics():
    assert {"fisher", "regmean", "regmean_plusplus", "adamerging"} <= DATA_INFORMED
    assert all(get_method(m).statistics is None for m in METHODS)


def test_every_method_declares_identity_params():
    missing = [f"{m} (in {get_method(m).fn.__module__})" for m in METHODS if m not in IDENTITY_PARAMS]
    assert not missing, (
        f"declare card=MethodCard(identity=(global params, per-model params)) on the @method of {', '.join(missing)}"
    )


def n_experts(name: str) -> int:
    m = get_method(name)
    n = max(m.min_experts, 2)
    return min(n, m.max_experts) if m.max_experts is not None else n


def _state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g).to(dtype),
        "model.layers.1.mlp.up_proj.weight": torch.randn(12, 8, generator=g).to(dtype),
        "model.norm.weight": (1 + 0.1 * torch.randn(8, generator=g)).to(dtype),
    }


def _merge(name, experts, base, params=None, model_params=None, **kw):
    gp, mp = params if params is not None else ({}, {})
    m = get_method(name)
    if m.base == "ignored":
        base = None
    return mergelab.merge_state_dicts(
        name,
        experts,
        base,
        parameters=gp,
        model_parameters=[mp] * len(experts) if model_params is None else model_params,
        **kw,
    )


@pytest.mark.parametrize("name", METHODS)
def test_identical_experts_return_that_expert(name):
    base = _state(0)
    expert = {k: v + 0.05 * torch.randn_like(v) for k, v in base.items()}
    n = n_experts(name)
    out = _merge(name, [expert] * n, base, IDENTITY_PARAMS[name])
    for k in base:
        assert torch.allclose(out[k], expert[k], atol=1e-5), k


@pytest.mark.parametrize("name", METHODS)
def test_zero_task_vectors_return_the_base(name):
    if get_method(name).base == "ignored":
        pytest.skip("linear ignores the base: covered by the identity contract")
    base = _state(1)
    n = n_experts(name)
    out = _merge(name, [dict(base) for _ in range(n)], base, TYPICAL_PARAMS.get(name, ({}, {})))
    for k in base:
        assert torch.allclose(out[k], base[k], atol=1e-6), k


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_preserved(name, dtype):
    base = _state(2, dtype)
    n = n_experts(name)
    experts = [{k: (v.float() + 0.02 * (i + 1)).to(dtype) for k, v in base.items()} for i in range(n)]
    out = _merge(name, experts, base, TYPICAL_PARAMS.get(name, ({}, {})))
    assert all(v.dtype == dtype for v in out.values())


@pytest.mark.parametrize("name", METHODS)
def test_seeded_runs_reproducible(name):
    base = _state(3)
    n = n_experts(name)
    experts = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(n)]
    p = TYPICAL_PARAMS.get(name, ({}, {}))
    a = _merge(name, experts, base, p, seed=7)
    b = _merge(name, experts, base, p, seed=7)
    for k in a:
        assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_depend_on_seed_and_name(name):
    if name not in METHODS:
        pytest.skip(f"{name} not registered")
    w0 = torch.zeros(64, 64)
    experts = [torch.randn(64, 64), torch.randn(64, 64)]
    p, mp = TYPICAL_PARAMS[name]
    run = lambda seed, tname: mergelab.merge_tensors(
        name, experts, w0, parameters=p, model_parameters=[mp] * 2, seed=seed, name=tname
    )
    assert torch.equal(run(1, "a"), run(1, "a"))
    assert not torch.equal(run(1, "a"), run(2, "a"))
    assert not torch.equal(run(1, "a"), run(1, "b"))


def _load_dir(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", METHODS)
def test_streaming_merge_equals_in_memory_merge(name, family, tmp_path):
    base, experts = family
    m = get_method(name)
    n = n_experts(name)
    gp, mp = TYPICAL_PARAMS.get(name, ({}, {}))
    recipe = {
        "merge_method": name,
        "base_model": str(base),
        "models": [{"model": str(e), "parameters": mp} for e in experts[:n]],
        "parameters": gp,
        "seed": 11,
    }
    if m.base == "ignored":
        recipe.pop("base_model")
    out = tmp_path / "out"
    mergelab.merge(recipe, out, max_shard_size="120KB", hash_inputs=False)
    streamed = _load_dir(out)
    sds = [_load_dir(p) for p in (base, *experts[:n])]
    mem = _merge(name, sds[1:], sds[0], (gp, mp), seed=11)
    assert set(streamed) == set(mem)
    for k in mem:
        assert torch.equal(streamed[k], mem[k]), k


def test_ties_full_density_without_conflict_equals_normalized_task_arithmetic():
    base = torch.randn(40)
    taus = [torch.rand(40) * 0.1, torch.rand(40) * 0.2]  # same sign everywhere
    experts = [base + t for t in taus]
    ties = mergelab.merge_tensors(
        "ties", experts, base, model_parameters=[{"density": 1.0, "weight": 1.0}, {"density": 1.0, "weight": 2.0}]
    )
    ta = mergelab.merge_tensors(
        "task_arithmetic",
        experts,
        base,
        parameters={"normalize": True},
        model_parameters=[{"weight": 1.0}, {"weight": 2.0}],
    )
    assert torch.allclose(ties, ta, atol=1e-6)


@pytest.mark.parametrize("name", ["dare_linear"])
def test_dare_without_drop_equals_task_arithmetic(name):
    base = torch.randn(30, 5)
    experts = [base + 0.1 * torch.randn(30, 5) for _ in range(3)]
    dare = mergelab.merge_tensors(
        name, experts, base, parameters={"lambda": 0.7}, model_parameters=[{"density": 1.0, "weight": 0.5}] * 3
    )
    ta = mergelab.merge_tensors(
        "task_arithmetic", experts, base, parameters={"lambda": 0.7}, model_parameters=[{"weight": 0.5}] * 3
    )
    assert torch.allclose(dare, ta, atol=1e-6)
