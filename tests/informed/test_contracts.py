"""The registry-wide method contracts (tests/methods/test_contract.py) for data-informed methods,
with statistics supplied: identity, zero task vectors, dtypes, reproducibility, streamed ==
in memory. Plus the engine's handling of statistics (attach, missing, in the peak estimate)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import load_dir

import mergelab
from mergelab.informed import write_statistics
from mergelab.methods import all_methods, get_method

# every method that declares a data phase (`statistics=`), with its card's parameters
INFORMED = [m.name for m in all_methods() if m.statistics is not None]


def _params(method: str, which: str) -> dict:
    """The card's (global, per-model) parameters as merge_state_dicts keywords."""
    gp, mp = getattr(get_method(method).card, which) or ({}, {})
    return {"parameters": dict(gp), "model_parameters": [dict(mp)] * 2}


def test_informed_methods_declare_their_contract_parameters():
    missing = [f"{m} (in {get_method(m).fn.__module__})" for m in INFORMED if get_method(m).card.identity is None]
    assert not missing, f"declare card=MethodCard(identity=...) on the @method of {', '.join(missing)}"
    assert {"fisher", "regmean", "regmean_plusplus", "adamerging"} <= set(INFORMED)


def _state(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g).to(dtype),
        "model.layers.1.mlp.up_proj.weight": torch.randn(12, 8, generator=g).to(dtype),
        "model.norm.weight": (1 + 0.1 * torch.randn(8, generator=g)).to(dtype),
    }


def _stats(method: str, state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Plausible statistics of one expert for every tensor of ``state``."""
    g = torch.Generator().manual_seed(seed)
    kind = get_method(method).statistics  # the data phase: what its statistics hold
    out = {}
    for name, t in state.items():
        if kind == "fisher":
            out[f"{name}::fisher"] = torch.rand(t.shape, generator=g)
        elif kind in ("gram", "gram_plusplus") and t.dim() == 2:
            x = torch.randn(20, t.shape[1], generator=g)
            out[f"{name}::gram"] = x.T @ x
            out[f"{name}::rows"] = torch.tensor(20.0, dtype=torch.float64)
        elif kind == "adamerging":
            out[f"{name}::lambda"] = torch.rand((), generator=g)
        elif kind not in ("gram", "gram_plusplus"):
            raise AssertionError(f"add plausible {kind!r} statistics for {method} to _stats")
    return out


def _merge(method, experts, base, stats, **kw):
    return mergelab.merge_state_dicts(method, experts, base, statistics=stats, **kw)


@pytest.mark.parametrize("method", INFORMED)
def test_identical_experts_return_that_expert(method):
    base = _state(0)
    expert = {k: v + 0.05 * torch.randn_like(v) for k, v in base.items()}
    stats = [_stats(method, expert, s) for s in (1, 2)]
    if method == "adamerging":  # θ0 + Σ λ τ is the expert when the λ sum to 1
        stats = [{k: torch.tensor(0.5) for k in s} for s in stats]
    out = _merge(method, [expert, expert], base, stats, **_params(method, "identity"))
    for k in base:
        assert torch.allclose(out[k], expert[k], atol=1e-5), k


@pytest.mark.parametrize("method", INFORMED)
def test_zero_task_vectors_return_the_base(method):
    base = _state(1)
    out = _merge(
        method, [dict(base), dict(base)], base, [_stats(method, base, s) for s in (3, 4)], **_params(method, "typical")
    )
    for k in base:
        assert torch.allclose(out[k], base[k], atol=1e-5), k


@pytest.mark.parametrize("method", INFORMED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype_preserved(method, dtype):
    base = _state(2, dtype)
    experts = [{k: (v.float() + 0.02 * (i + 1)).to(dtype) for k, v in base.items()} for i in range(2)]
    out = _merge(method, experts, base, [_stats(method, base, s) for s in (5, 6)], **_params(method, "typical"))
    assert all(v.dtype == dtype for v in out.values())


@pytest.mark.parametrize("method", INFORMED)
def test_seeded_runs_reproducible(method):
    base = _state(3)
    experts = [{k: v + 0.1 * torch.randn_like(v) for k, v in base.items()} for _ in range(2)]
    stats = [_stats(method, base, s) for s in (7, 8)]
    a = _merge(method, experts, base, stats, seed=7, **_params(method, "typical"))
    b = _merge(method, experts, base, stats, seed=7, **_params(method, "typical"))
    for k in a:
        assert torch.equal(a[k], b[k])


@pytest.mark.parametrize("method", INFORMED)
def test_streaming_merge_with_statistics_folders_equals_in_memory_merge(method, family, tmp_path):
    base, experts = family
    sds = [load_dir(p) for p in (base, *experts[:2])]
    stats = [_stats(method, sds[0], s) for s in (9, 10)]
    folders = [write_statistics(tmp_path / f"s{i}", st) for i, st in enumerate(stats)]
    p = _params(method, "typical")
    recipe = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(e), "parameters": mp} for e, mp in zip(experts[:2], p["model_parameters"], strict=True)
        ],
        "parameters": p["parameters"],
    }
    mergelab.merge(recipe, tmp_path / "out", max_shard_size="120KB", hash_inputs=False, statistics=folders)
    streamed = load_dir(tmp_path / "out")
    mem = _merge(method, sds[1:], sds[0], stats, **p)
    assert set(streamed) == set(mem)
    for k in mem:
        assert torch.equal(streamed[k], mem[k]), k


def test_statistics_are_required_and_keyed_by_tensor_and_kind():
    w = torch.randn(3, 3)
    with pytest.raises(mergelab.MergelabError, match="needs per-expert statistics"):
        mergelab.merge_tensors("regmean", [w, w])
    with pytest.raises(mergelab.MergelabError, match="<tensor name>::<kind>"):
        mergelab.merge_state_dicts("fisher", [{"w": w}, {"w": w}], statistics=[{"w": w}, {"w": w}])
    with pytest.raises(mergelab.MergelabError, match="one per expert"):
        mergelab.merge_state_dicts("fisher", [{"w": w}, {"w": w}], statistics=[{"w::fisher": w}])


def test_statistics_count_in_the_expected_peak(family):
    base, experts = family
    recipe = {"merge_method": "regmean", "base_model": str(base), "models": [{"model": str(e)} for e in experts[:2]]}
    plan = mergelab.plan_merge({**recipe, "merge_method": "task_arithmetic"})
    plain = plan.expected_peak_bytes()
    plan.close()
    from mergelab.plan import build_plan
    from mergelab.recipe import load_recipe

    plan = build_plan(load_recipe(recipe))
    sd = load_dir(base)
    plan.attach_aux([mergelab.informed.open_statistics(_stats("regmean", sd, s)) for s in (1, 2)])
    assert plan.expected_peak_bytes() > plain
    assert get_method("regmean").statistics == "gram"
    plan.close()
