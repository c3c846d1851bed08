"""Combination rules that merge LoRA adapters into one adapter (mergelab.lora.combine).

Expectations are written independently: dense products in float64, NumPy SVDs and selections for
KnOTS, and PEFT's own ``add_weighted_adapter`` for the factor-space legacy modes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergelab.errors import InternalError, ParameterError, PlanError, RecipeError
from mergelab.lora.combine import RULES, combine_adapters
from mergelab.lora.core_space import core_space_decompose
from mergelab.lora.factors import LoraFactors
from mergelab.lora.knots import knots_decompose
from mergelab.methods.base import TensorContext
from mergelab.methods.kernels.random import keep_indicator, realised_keep_prob

F64 = torch.float64


def lora(out: int, inp: int, r: int, scaling: float, seed: int, dtype: torch.dtype = F64) -> LoraFactors:
    g = torch.Generator().manual_seed(seed)
    return LoraFactors(
        A=torch.randn(r, inp, generator=g, dtype=dtype),
        B=torch.randn(out, r, generator=g, dtype=dtype),
        scaling=scaling,
    )


def dense(f: LoraFactors | None, shape: tuple[int, int], *, scaled: bool = True) -> np.ndarray:
    if f is None:
        return np.zeros(shape)
    d = f.B.double().numpy() @ f.A.double().numpy()
    return d * f.scaling if scaled else d


@pytest.fixture
def two_modules() -> dict[str, list[LoraFactors | None]]:
    """Two modules, three adapters of ranks 2, 3, 4 (heterogeneous), α/r ≠ 1, one adapter missing a module."""
    return {
        "layers.0.q_proj": [lora(10, 12, 2, 2.0, 1), lora(10, 12, 3, 0.5, 2), lora(10, 12, 4, 1.5, 3)],
        "layers.0.v_proj": [lora(9, 12, 2, 2.0, 4), None, lora(9, 12, 4, 1.5, 5)],
    }


# ------------------------------------------------------------------------------------------ cat


def test_cat_equals_weighted_sum_of_updates(two_modules):
    weights = [0.7, -0.3, 1.2]
    out = combine_adapters("cat", two_modules, weights=weights)
    for name, entries in two_modules.items():
        shape = (entries[0].B.shape[0], entries[0].A.shape[1])
        want = sum(w * dense(f, shape) for w, f in zip(weights, entries))
        got = out[name]
        assert got.scaling == 1.0
        assert got.rank == sum(f.rank for f in entries if f is not None)
        np.testing.assert_allclose(got.delta(F64).numpy(), want, rtol=0, atol=1e-12)


def test_cat_keeps_layout_and_skips_modules_no_adapter_adapts():
    t = lora(4, 6, 2, 1.0, 7)
    t = LoraFactors(A=t.A, B=t.B, scaling=1.0, transposed=True)
    out = combine_adapters("cat", {"h.0.attn.c_attn": [t, t], "h.0.mlp.c_fc": [None, None]})
    assert set(out) == {"h.0.attn.c_attn"}
    assert out["h.0.attn.c_attn"].transposed
    np.testing.assert_allclose(out["h.0.attn.c_attn"].delta(F64).numpy(), 2 * dense(t, (4, 6)), atol=1e-12)


# ----------------------------------------------------------------------------------- Core Space


@pytest.mark.parametrize("out_dim", [10, 5])  # 5 < Σr = 9: U_ref is square, still lossless
def test_core_space_bases_reconstruct_every_update(out_dim):
    entries = [lora(out_dim, 12, 2, 2.0, 11), lora(out_dim, 12, 3, 0.25, 12), lora(out_dim, 12, 4, 1.0, 13)]
    mod = core_space_decompose(entries, dtype=F64)
    u, vh = mod.U_ref.numpy(), mod.Vh_ref.numpy()
    np.testing.assert_allclose(u.T @ u, np.eye(u.shape[1]), atol=1e-12)
    np.testing.assert_allclose(vh @ vh.T, np.eye(vh.shape[0]), atol=1e-12)
    for f, core in zip(entries, mod.cores):
        want = dense(f, (out_dim, 12))
        assert np.abs(u @ core.numpy() @ vh - want).max() <= 1e-10 * max(1.0, np.abs(want).max())


def test_core_space_with_task_arithmetic_is_the_exact_sum(two_modules):
    weights = [0.5, 1.0, -0.75]
    out = combine_adapters(
        "core_space",
        two_modules,
        weights=weights,
        parameters={"method": "task_arithmetic", "parameters": {"lambda": 1.0}},
    )
    for name, entries in two_modules.items():
        shape = (next(f for f in entries if f).B.shape[0], 12)
        want = sum(w * dense(f, shape) for w, f in zip(weights, entries))
        assert out[name].rank <= sum(f.rank for f in entries if f is not None)
        np.testing.assert_allclose(out[name].delta(F64).numpy(), want, rtol=0, atol=1e-10)


def test_core_space_ignore_scaling_uses_raw_factors(two_modules):
    out = combine_adapters(
        "core_space", two_modules, parameters={"method": "task_arithmetic", "lora_scaling": "ignore"}
    )
    entries = two_modules["layers.0.q_proj"]
    want = sum(dense(f, (10, 12), scaled=False) for f in entries)
    np.testing.assert_allclose(out["layers.0.q_proj"].delta(F64).numpy(), want, atol=1e-10)


def test_core_space_runs_any_method_including_global_folds(two_modules):
    # TIES with scope: global folds its thresholds over the cores of both modules; the mean of
    # cores (linear) equals the mean of the updates
    ties = combine_adapters("core_space", two_modules, parameters={"method": "ties", "parameters": {"scope": "global"}})
    assert set(ties) == set(two_modules)
    lin = combine_adapters("core_space", two_modules, parameters={"method": "linear"})
    entries = two_modules["layers.0.q_proj"]
    want = sum(dense(f, (10, 12)) for f in entries) / 3
    np.testing.assert_allclose(lin["layers.0.q_proj"].delta(F64).numpy(), want, atol=1e-10)
    tsv = combine_adapters("core_space", two_modules)  # default: TSV-M on the cores
    assert all(torch.isfinite(f.delta(F64)).all() for f in tsv.values())


# ---------------------------------------------------------------------------------------- KnOTS


def knots_expectation(
    modules: dict[str, list[LoraFactors | None]],
    *,
    density: float,
    scale: float,
    scaled: bool = True,
    drops: dict[str, list[np.ndarray]] | None = None,
    keep_prob: float = 1.0,
) -> dict[str, np.ndarray]:
    """KnOTS-TIES in NumPy: dense concat SVD per module, model-wide top-k per task, sign, mean, λ."""
    us, svs = {}, {}
    for name, entries in modules.items():
        f0 = next(f for f in entries if f is not None)
        shape = (f0.B.shape[0], f0.A.shape[1])
        cat = np.concatenate([dense(f, shape, scaled=scaled) for f in entries], axis=1)
        u, s, vh = np.linalg.svd(cat, full_matrices=False)
        keep = s > 1e-5
        u, s, vh = u[:, keep], s[keep], vh[keep]
        n = shape[1]
        us[name] = u
        svs[name] = [s[:, None] * vh[:, t * n : (t + 1) * n] for t in range(len(entries))]
        if drops is not None:
            svs[name] = [v * d / keep_prob for v, d in zip(svs[name], drops[name])]
    names = list(modules)
    T = len(next(iter(modules.values())))
    flat = [np.concatenate([svs[k][t].ravel() for k in names]) for t in range(T)]
    trimmed = []
    for v in flat:
        k = max(1, int(density * v.size)) if density < 1 else v.size
        thr = np.sort(np.abs(v))[::-1][k - 1]
        trimmed.append(np.where(np.abs(v) >= thr, v, 0.0))
    stack = np.stack(trimmed)
    sign = np.sign(stack.sum(axis=0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = (stack * sign) > 0
    merged = scale * (stack * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
    out, pos = {}, 0
    for k in names:
        size = svs[k][0].size
        out[k] = us[k] @ merged[pos : pos + size].reshape(svs[k][0].shape)
        pos += size
    return out


def knots_modules() -> dict[str, list[LoraFactors | None]]:
    # the second module's updates are ~8x larger: a model-wide top-20% keeps mostly its entries,
    # which a per-module threshold would not
    big = [lora(7, 9, 3, 8.0, 23), lora(7, 9, 2, 4.0, 24)]
    return {"layers.0.q_proj": [lora(8, 10, 3, 1.0, 21), lora(8, 10, 2, 0.5, 22)], "layers.1.q_proj": big}


def test_knots_ties_matches_numpy_with_a_model_wide_threshold():
    mods = knots_modules()
    out = combine_adapters("knots_ties", mods, parameters={"density": 0.2, "scale": 0.6})
    want = knots_expectation(mods, density=0.2, scale=0.6)
    for name in mods:
        got = out[name].delta(F64).numpy()
        np.testing.assert_allclose(got, want[name], rtol=0, atol=2e-5 * np.abs(want[name]).max())
    # a per-module selection gives a different answer: the threshold really is global
    alone = knots_expectation({"layers.0.q_proj": mods["layers.0.q_proj"]}, density=0.2, scale=0.6)
    assert np.abs(alone["layers.0.q_proj"] - want["layers.0.q_proj"]).max() > 1e-3


def test_knots_decompose_equals_the_dense_svd_of_the_concatenation():
    entries = [lora(6, 5, 3, 2.0, 31), None, lora(6, 5, 4, 0.5, 32)]  # Σr = 7 > out: rank-deficient concat
    mod = knots_decompose(entries, dtype=F64)
    cat = np.concatenate([dense(f, (6, 5)) for f in entries], axis=1)
    rebuilt = mod.U.numpy() @ np.concatenate([v.numpy() for v in mod.sv], axis=1)
    np.testing.assert_allclose(rebuilt, cat, atol=1e-10)
    np.testing.assert_allclose(
        np.linalg.svd(cat, compute_uv=False)[: mod.U.shape[1]],
        np.linalg.norm(np.concatenate([v.numpy() for v in mod.sv], axis=1), axis=1),
        atol=1e-10,
    )
    np.testing.assert_array_equal(mod.sv[1].numpy(), 0.0)


def test_knots_code_behaviour_ignores_the_lora_scaling():
    mods = knots_modules()
    out = combine_adapters("knots_ties", mods, parameters={"density": 0.5, "scale": 1.0, "lora_scaling": "ignore"})
    want = knots_expectation(mods, density=0.5, scale=1.0, scaled=False)
    for name in mods:
        np.testing.assert_allclose(out[name].delta(F64).numpy(), want[name], atol=2e-5 * np.abs(want[name]).max())


def test_knots_dare_ties_drops_sv_entries_with_the_seeded_streams():
    mods = knots_modules()
    seed, q = 5, 0.7
    out = combine_adapters("knots_dare_ties", mods, parameters={"dare_density": q, "scale": 0.7}, seed=seed)
    drops = {}
    for name, entries in mods.items():
        k = knots_decompose(entries).U.shape[1]
        ctx = TensorContext(name=name, seed=seed)
        drops[name] = [
            keep_indicator(torch.zeros(k, entries[0].A.shape[1]), q, ctx.generator(t + 1)).numpy()
            for t in range(len(entries))
        ]
    want = knots_expectation(mods, density=1.0, scale=0.7, drops=drops, keep_prob=realised_keep_prob(q))
    for name in mods:
        np.testing.assert_allclose(out[name].delta(F64).numpy(), want[name], atol=2e-5 * np.abs(want[name]).max())
    again = combine_adapters("knots_dare_ties", mods, parameters={"dare_density": q, "scale": 0.7}, seed=seed)
    assert all(torch.equal(again[n].A, out[n].A) for n in mods)
    no_drop = combine_adapters("knots_dare_ties", mods, parameters={"dare_density": 1.0, "scale": 0.7})
    plain = combine_adapters("knots_ties", mods, parameters={"density": 1.0, "scale": 0.7})
    for name in mods:
        np.testing.assert_allclose(no_drop[name].delta(F64).numpy(), plain[name].delta(F64).numpy(), atol=1e-12)


def test_knots_original_trim_count_keeps_one_more_entry_per_task():
    mods = knots_modules()
    floor = combine_adapters("knots_ties", mods, parameters={"density": 0.2, "scale": 1.0})
    orig = combine_adapters("knots_ties", mods, parameters={"density": 0.2, "scale": 1.0, "trim_count": "original"})
    assert any(not torch.allclose(floor[n].A, orig[n].A) for n in mods)


# ------------------------------------------------------------------------- PEFT legacy modes


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = torch.nn.Linear(12, 10)
        self.v_proj = torch.nn.Linear(12, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q_proj(x).sum() + self.v_proj(x).sum()


def _peft_pair(r_b: int = 4):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(
        _Tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    model.add_adapter(
        "b", peft.LoraConfig(r=r_b, lora_alpha=3, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    return model


def _factors(model, adapter: str) -> dict[str, LoraFactors]:
    out = {}
    for name in ("q_proj", "v_proj"):
        layer = getattr(model.base_model.model, name)
        out[name] = LoraFactors(
            A=layer.lora_A[adapter].weight.detach().clone(),
            B=layer.lora_B[adapter].weight.detach().clone(),
            scaling=float(layer.scaling[adapter]),
        )
    return out


@pytest.mark.parametrize(
    ("combination", "rule", "params"),
    [
        ("linear", "linear_legacy", {}),
        ("ties", "ties_legacy", {"density": 0.5}),
        ("ties", "ties_legacy", {"density": 0.3, "majority_sign_method": "frequency"}),
        ("cat", "cat", {}),
    ],
)
def test_legacy_modes_equal_peft_add_weighted_adapter(combination, rule, params):
    model = _peft_pair()
    weights = [0.8, -0.6]
    a, b = _factors(model, "default"), _factors(model, "b")
    peft_kw = {"density": params["density"]} if "density" in params else {}
    if "majority_sign_method" in params:
        peft_kw["majority_sign_method"] = params["majority_sign_method"]
    model.add_weighted_adapter(["default", "b"], weights, "merged", combination_type=combination, **peft_kw)
    want = _factors(model, "merged")
    got = combine_adapters(rule, {k: [a[k], b[k]] for k in a}, weights=weights, parameters=params)
    for name in a:
        assert want[name].scaling == pytest.approx(got[name].scaling)
        torch.testing.assert_close(got[name].A, want[name].A, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(got[name].B, want[name].B, rtol=1e-6, atol=1e-7)


def test_legacy_modes_refuse_heterogeneous_ranks_that_exact_rules_accept():
    model = _peft_pair(r_b=2)
    a, b = _factors(model, "default"), _factors(model, "b")
    mods = {k: [a[k], b[k]] for k in a}
    for rule, params in (("linear_legacy", {}), ("ties_legacy", {"density": 0.5})):
        with pytest.raises(PlanError, match=r"different ranks .*r=4.*r=2.*use cat"):
            combine_adapters(rule, mods, parameters=params)
    for rule in ("cat", "knots_ties", "core_space"):
        assert set(combine_adapters(rule, mods)) == set(mods)


def test_legacy_linear_is_only_an_approximation():
    model = _peft_pair()
    a, b = _factors(model, "default"), _factors(model, "b")
    mods = {k: [a[k], b[k]] for k in a}
    lin = combine_adapters("linear_legacy", mods)
    exact = combine_adapters("cat", mods)
    assert not torch.allclose(lin["q_proj"].delta(), exact["q_proj"].delta(), atol=1e-3)


# ---------------------------------------------------------------------------------- bad input


def test_rules_table_names_every_rule():
    assert set(RULES) == {"cat", "knots_ties", "knots_dare_ties", "core_space", "linear_legacy", "ties_legacy"}
    assert [n for n, r in RULES.items() if r.exact] == ["cat"]


@pytest.mark.parametrize(
    ("rule", "kwargs", "error", "pattern"),
    [
        ("cats", {}, RecipeError, r"unknown combine rule 'cats': use one of cat, core_space"),
        ("cat", {"weights": [1.0]}, ParameterError, r"1 weights for 3 adapters"),
        ("cat", {"weights": [1.0, float("nan"), 1.0]}, ParameterError, r"weight of adapter 1"),
        ("cat", {"parameters": {"density": 0.5}}, ParameterError, r"combine cat: density: Extra inputs"),
        ("knots_ties", {"parameters": {"density": 1.5}}, ParameterError, r"combine knots_ties: density"),
        ("knots_ties", {"weights": [1.0, 2.0, 1.0]}, ParameterError, r"one scaling for every adapter"),
        ("ties_legacy", {}, ParameterError, r"combine ties_legacy: density: Field required"),
        ("core_space", {"parameters": {"method": "tiess"}}, RecipeError, r"unknown merge_method 'tiess'"),
        ("core_space", {"parameters": {"method": "fisher"}}, RecipeError, r"needs calibration statistics"),
        ("core_space", {"parameters": {"method": "tall_masks"}}, RecipeError, r"routed parts"),
        (
            "core_space",
            {"parameters": {"method": "slerp"}},
            RecipeError,
            r"method 'slerp' merges exactly 1 expert\(s\) besides its base, got 3 adapters",
        ),
        (
            "core_space",
            {"parameters": {"method": "ties", "parameters": {"densty": 0.2}}},
            ParameterError,
            r"core_space: ties parameters: densty",
        ),
        (
            "core_space",
            {"parameters": {"method": "magmax"}, "weights": [1.0, 2.0, 1.0]},
            ParameterError,
            r"takes no per-model weight",
        ),
    ],
)
def test_bad_rule_parameters_are_one_line_errors(two_modules, rule, kwargs, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        combine_adapters(rule, two_modules, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_factors_are_one_line_errors():
    good = lora(4, 6, 2, 1.0, 1)
    cases = [
        ({"m": [good, lora(5, 6, 2, 1.0, 2)]}, r"module 'm': adapter 1 updates a 5×6 weight"),
        ({"m": [good, LoraFactors(good.A, good.B, 1.0, transposed=True)]}, r"fan_in_fan_out"),
        ({"m": [good, LoraFactors(good.A, good.B[:, :1], 1.0)]}, r"adapter 1: A \[2, 6\] and B \[4, 1\]"),
        ({"m": [good, LoraFactors(good.A * float("nan"), good.B, 1.0)]}, r"NaN or Inf"),
        ({"m": [good], "n": [good, good]}, r"different numbers of adapters"),
        ({}, r"no LoRA module"),
    ]
    for modules, pattern in cases:
        with pytest.raises(PlanError, match=pattern) as info:
            combine_adapters("cat", modules)
        assert "\n" not in str(info.value)


def test_method_failures_are_internal_errors_not_tracebacks(two_modules, monkeypatch):
    from mergelab.methods.registry import get_method

    spec = get_method("task_arithmetic")

    def boom(*args, **kwargs):
        raise ValueError("broken")

    monkeypatch.setattr(type(spec), "__call__", lambda self, *a, **k: boom())
    with pytest.raises(InternalError, match=r"combine core_space: task_arithmetic failed: ValueError: broken"):
        combine_adapters("core_space", two_modules, parameters={"method": "task_arithmetic"})


def test_knots_steps_run_as_a_streamed_executor_would(two_modules):
    """Every pass recomputes each module's blocks (nothing cached): the folds and the merge see the
    same DARE draws and give what the in-memory rule gives."""
    from mergelab.lora.combine_base import validate_params
    from mergelab.lora.knots import KnotsDareTiesParams, knots_factors, knots_module, knots_selection
    from mergelab.methods.registry import get_method

    params = KnotsDareTiesParams(density=0.4, dare_density=0.8)
    name, parameters, model_parameters = knots_selection(params, 3)
    spec = get_method(name)
    gp = validate_params(spec.params, parameters, "test")
    mp = [validate_params(spec.model_params, m, "test") for m in model_parameters]
    folds: dict = {}
    for fold in spec.passes(gp):
        state = fold.init(gp, 3)
        for module, entries in two_modules.items():
            _, blocks = knots_module(module, entries, params, seed=3)
            fold.update(state, torch.zeros_like(blocks[0]), blocks, gp, mp, TensorContext(module, 3, folds=dict(folds)))
        folds[fold.name] = fold.finish(state, gp, 3)
    assert len(folds) == 3  # high and low histograms, majority sign
    want = combine_adapters("knots_dare_ties", two_modules, parameters={"density": 0.4, "dare_density": 0.8}, seed=3)
    for module, entries in two_modules.items():
        mod, blocks = knots_module(module, entries, params, seed=3)
        merged = spec(torch.zeros_like(blocks[0]), blocks, gp, mp, TensorContext(module, 3, folds=dict(folds)))
        assert torch.equal(knots_factors(mod, merged).A, want[module].A)
