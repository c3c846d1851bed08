"""Every registered method returns its inputs' dtype, called directly (no engine in between).

The engine casts each merged tensor to the planned output dtype, so a contract checked through
``merge_state_dicts`` cannot see a method that silently computes (and returns) float32 while the
run asked for float64 or bfloat16 compute. Here each method function is called as the engine
calls it, ``get_method(name)(base, experts, params, model_params, ctx)``, after running its folds
(gather passes) by hand, with inputs in the compute dtype; the result must be in that dtype, and a
float64 run must really compute in float64 (its result differs from the float32 run by far less
than float32 rounding).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pytest
import torch

from mergelab.methods import all_methods, get_method
from mergelab.methods.base import MergeMethod, MethodOutput, TensorContext

# Parameters exercising each method's non-trivial path (the method card's ``typical`` wins when declared).
TYPICAL: dict[str, tuple[dict, dict]] = {
    "ties": ({}, {"density": 0.3}),
    "dare_linear": ({}, {"density": 0.5}),
    "dare_ties": ({}, {"density": 0.5}),
    "breadcrumbs": ({}, {"density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties": ({}, {"density": 0.8, "gamma": 0.05}),
    "della": ({}, {"density": 0.5, "epsilon": 0.1}),
    "della_linear": ({}, {"density": 0.5, "epsilon": 0.1}),
    "slerp": ({"t": 0.3}, {}),
    "nuslerp": ({}, {"weight": 1.0}),
    "tsv_m": ({"alpha": 1.0}, {"weight": 1.0}),
    "iso_c": ({"alpha": 1.3}, {}),
    "iso_cts": ({"alpha": 1.3, "common_space_fraction": 0.5}, {}),
    "pcb": ({"pcb_ratio": 0.2, "scope": "global"}, {}),
    "lines": ({"beta": 0.5, "merge_method": "ties", "merge_parameters": "{scope: global}"}, {"density": 0.3}),
    "tall_masks": ({"multitask": "ties"}, {"tall_lambda": 0.4, "density": 0.3}),
    "consensus": ({"lambda": 0.5}, {"tall_lambda": 0.3}),
}

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
NAMES = ("model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.norm.weight")
NUM_LAYERS = 2


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        NAMES[0]: torch.randn(12, 8, generator=g, dtype=torch.float64),
        NAMES[1]: torch.randn(12, 8, generator=g, dtype=torch.float64),
        NAMES[2]: 1 + 0.1 * torch.randn(8, generator=g, dtype=torch.float64),
    }


def _aux(method: MergeMethod, name: str, t: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Plausible data-phase statistics of one expert for one tensor (as tests/informed/test_contracts.py)."""
    g = torch.Generator().manual_seed(seed)
    if method.statistics == "fisher":
        return {"fisher": torch.rand(t.shape, generator=g)}
    if method.statistics is not None and method.statistics.startswith("gram"):
        if t.dim() != 2:
            return {}
        x = torch.randn(20, t.shape[1], generator=g)
        return {"gram": x.T @ x, "rows": torch.tensor(20.0, dtype=torch.float64)}
    if method.statistics == "adamerging":
        return {"lambda": torch.rand((), generator=g)}
    return {}


def _params(method: MergeMethod) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    card = getattr(method, "card", None)
    if card is not None and card.typical is not None:
        return card.typical
    return TYPICAL.get(method.name, ({}, {}))


def _n_experts(method: MergeMethod) -> int:
    n = max(method.min_experts, 2)
    return min(n, method.max_experts) if method.max_experts is not None else n


def _ctx(name: str, stats: Mapping[str, Any], aux=()) -> TensorContext:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return TensorContext(
        name=name, seed=5, layer=int(m.group(1)) if m else None, num_layers=NUM_LAYERS, folds=stats, statistics=aux
    )


def run_direct(name: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Fold every gather pass, then call the method once per tensor, exactly as the engine does."""
    method = get_method(name)
    gp_raw, mp_raw = _params(method)
    gp = method.params.model_validate(dict(gp_raw))
    n = _n_experts(method)
    mps = tuple(method.model_params.model_validate(dict(mp_raw)) for _ in range(n))
    base64 = _state(0)

    # each (expert, tensor) its own noise: tensors of one shape must not share task vectors, whose exact
    # ties across tensors would make model-wide selections keep different entries in float32 and float64
    def noise(shape: torch.Size, seed: int) -> torch.Tensor:
        return 0.05 * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    experts64 = [{k: v + noise(v.shape, 10 + i + 100 * j) for j, (k, v) in enumerate(base64.items())} for i in range(n)]
    base = None if method.base == "ignored" else {k: v.to(dtype) for k, v in base64.items()}
    experts = [{k: v.to(dtype) for k, v in e.items()} for e in experts64]
    aux = (
        {k: [_aux(method, k, base64[k], 20 + i) for i in range(n)] for k in NAMES}
        if method.statistics is not None
        else dict.fromkeys(NAMES, ())
    )

    def inputs(k):
        return (None if base is None else base[k]), [e[k] for e in experts]

    stats: dict[str, Any] = {}
    with torch.no_grad():
        for fold in method.passes(gp):
            state = fold.init(gp, n)
            for k in NAMES:
                b, xs = inputs(k)
                fold.update(state, b, xs, gp, mps, _ctx(k, stats, aux[k]))
            stats[fold.name] = fold.finish(state, gp, n)
        out = {}
        for k in NAMES:
            b, xs = inputs(k)
            res = method(b, xs, gp, mps, _ctx(k, stats, aux[k]))
            out[k] = res.merged if isinstance(res, MethodOutput) else res
    return out


METHODS = sorted(m.name for m in all_methods())


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("name", METHODS)
def test_method_returns_the_compute_dtype(name, dtype):
    out = run_direct(name, dtype)
    wrong = {k: v.dtype for k, v in out.items() if v.dtype != dtype}
    assert not wrong, f"{name} returned {wrong} for {dtype} inputs"
    ref = _state(0)
    assert all(out[k].shape == ref[k].shape for k in NAMES)


@pytest.mark.parametrize("name", METHODS)
def test_float64_compute_is_honoured(name):
    """A float64 run must not round through float32 on the way (its error would be ~1e-7, not ~1e-15).

    Every method passes (until issue 13's clean-up, DARE, DELLA, PCB, EMR, LiNeS, TALL masks and
    Consensus computed in float32 inside; each failed the second assertion)."""
    out64 = run_direct(name, torch.float64)
    out32 = run_direct(name, torch.float32)
    worst = max(float((out64[k] - out32[k].double()).abs().max()) for k in NAMES)
    # float32 and float64 runs must agree to float32 precision (same maths) ...
    assert worst < 1e-3, f"{name}: float32 and float64 results differ by {worst}"
    # ... and the float64 result must carry more than float32's 24 bits somewhere.
    assert any(not torch.equal(out64[k], out64[k].float().double()) for k in NAMES), (
        f"{name}: the float64 result is exactly representable in float32, so it was computed in float32"
    )
