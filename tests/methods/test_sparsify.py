"""Shared sparsification pieces: selection-based masks, random drops, DELLA ranks, rescale
rules, the exact radix-histogram k-th largest; plus a parity run against mergekit 0.1.5.

References here are naive sort-based versions written from the definitions, independent of
the selection code under test.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from reference.masks import bernoulli_mask

from mergelab.methods.base import TensorContext
from mergelab.methods.kernels import random as rnd
from mergelab.methods.kernels import ranks, select
from mergelab.methods.registry import get_method
from mergelab.methods.stages import sparsify as stages

# The live parity test runs mergekit 0.1.5 from this python (a venv with mergekit); unset: skipped.
MERGEKIT_PY = Path(os.environ["MERGEKIT_PYTHON"]) if os.environ.get("MERGEKIT_PYTHON") else None
NO_MERGEKIT = "set MERGEKIT_PYTHON to a python with mergekit 0.1.5 to run the live mergekit parity test"


def distinct(shape, seed: int) -> torch.Tensor:
    """Random values with distinct magnitudes (so top-k is unambiguous)."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.tensor(shape).prod()) if shape else 1
    mags = (torch.randperm(n, generator=g).float() + 1) / n
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return (mags * signs).reshape(shape)


# ------------------------------------------------------------------------------------ counting


@pytest.mark.parametrize(
    ("n", "density", "at_least_one", "expected"),
    [
        (10, 0.0, False, 0),
        (10, 0.0, True, 0),
        (10, 0.05, False, 0),
        (10, 0.05, True, 1),
        (10, 0.25, False, 2),
        (5, 0.4, False, 2),
        (10, 1.0, False, 10),
        (0, 0.5, True, 0),
    ],
)
def test_keep_count(n, density, at_least_one, expected):
    assert select.keep_count(n, density, at_least_one=at_least_one) == expected


# ------------------------------------------------------------------------------ magnitude mask


def naive_topk_mask(x: torch.Tensor, density: float) -> torch.Tensor:
    flat = x.reshape(-1)
    n = flat.numel()
    k = n if density >= 1 else (0 if density <= 0 else max(1, int(density * n)))
    order = sorted(range(n), key=lambda i: -abs(float(flat[i])))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


@pytest.mark.parametrize("shape", [(7,), (4, 9), (3, 4, 5), ()])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.5, 0.99, 1.0])
def test_magnitude_mask_matches_sorted_topk(shape, density):
    x = distinct(shape, seed=len(shape) * 10 + int(density * 100))
    mask = stages.magnitude_mask(x, density)
    assert mask.shape == x.shape and mask.dtype == torch.bool
    assert torch.equal(mask, naive_topk_mask(x, density))


def test_magnitude_mask_keeps_every_entry_tied_with_the_threshold():
    x = torch.tensor([3.0, -3.0, 3.0, 1.0, -1.0])
    # k = max(1, floor(0.2 * 5)) = 1, but three entries share the largest magnitude: all kept.
    assert stages.magnitude_mask(x, 0.2).tolist() == [True, True, True, False, False]
    # k = 4: the 4th largest magnitude is 1, tied with the 5th: everything is kept.
    assert stages.magnitude_mask(x, 0.8).all()


def test_masks_use_selection_not_a_full_sort(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a full sort was used")

    for name in ("sort", "argsort", "msort"):
        monkeypatch.setattr(torch, name, forbidden)
        monkeypatch.setattr(torch.Tensor, name, forbidden, raising=False)
    x = distinct((40, 25), seed=3)
    assert int(stages.magnitude_mask(x, 0.3).sum()) == 300
    assert int(stages.outlier_mask(x, 0.6, 0.05).sum()) == 600


# -------------------------------------------------------------------------------- outlier mask


def naive_outlier_mask(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit's counting, by a full ascending sort (reference only)."""
    flat = x.reshape(-1)
    n = flat.numel()
    if density >= 1:
        return torch.ones_like(x, dtype=torch.bool)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    order = sorted(range(n), key=lambda i: abs(float(flat[i])))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[n_bottom : n_bottom + target]] = True
    return mask.reshape(x.shape)


@pytest.mark.parametrize(
    ("density", "gamma"),
    [(0.9, 0.01), (0.6, 0.1), (0.5, 0.25), (0.95, 0.1), (0.3, 0.0), (0.0, 0.1), (1.0, 0.2), (0.2, 0.8)],
)
def test_outlier_mask_matches_sorted_reference(density, gamma):
    x = distinct((13, 11), seed=int(density * 100 + gamma * 1000))
    mask = stages.outlier_mask(x, density, gamma)
    assert torch.equal(mask, naive_outlier_mask(x, density, gamma))
    assert int(mask.sum()) == (x.numel() if density >= 1 else int(density * x.numel()))


def test_outlier_mask_hand_case():
    # Magnitudes ascending: .02(5) .05(0) .08(9) .12(3) .25(7) .30(2) .45(8) .60(4) .90(1) 1.5(6).
    # density .6, gamma .1: target 6, n_top 1, n_bottom 10 - 6 - 1 = 3 -> positions 3..8 kept.
    x = torch.tensor([0.05, -0.9, 0.3, 0.12, -0.6, 0.02, 1.5, -0.25, 0.45, -0.08])
    kept = stages.outlier_mask(x, 0.6, 0.1).nonzero().flatten().tolist()
    assert kept == [1, 2, 3, 4, 7, 8]


# ------------------------------------------------------------------------------- random drops


def test_bernoulli_mask_is_seeded_and_reaches_the_density():
    x = torch.ones(20000)
    a = rnd.keep_indicator(x, 0.3, torch.Generator().manual_seed(7)).bool()
    b = rnd.keep_indicator(x, 0.3, torch.Generator().manual_seed(7)).bool()
    c = rnd.keep_indicator(x, 0.3, torch.Generator().manual_seed(8)).bool()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.float().mean().item() - 0.3) < 0.015  # sd 0.0032
    assert not rnd.keep_indicator(x, 0.0, torch.Generator().manual_seed(1)).bool().any()
    assert rnd.keep_indicator(x, 1.0, torch.Generator().manual_seed(1)).bool().all()


def test_keep_indicator_draws_the_reference_scheme():
    """keep_indicator (0/1 floats) equals the reference bool masks of the pinned scheme, for a
    scalar and for per-entry probabilities, and rescale by the realised probability."""
    x = torch.randn(4097)
    for p in (0.3, 0.5, 0.77, 0.0, 1.0):
        got = rnd.keep_indicator(x, p, torch.Generator().manual_seed(3))
        assert got.dtype == x.dtype
        assert torch.equal(got.bool(), bernoulli_mask(x, p, torch.Generator().manual_seed(3)))
    probs = torch.rand(4097, generator=torch.Generator().manual_seed(1))
    got = rnd.keep_indicator(x, probs, torch.Generator().manual_seed(9))
    assert torch.equal(got.bool(), bernoulli_mask(x, probs, torch.Generator().manual_seed(9)))
    assert rnd.realised_keep_prob(0.3) == round(0.3 * 65536) / 65536


def test_bernoulli_mask_with_per_entry_probabilities():
    p = torch.cat([torch.full((10000,), 0.1), torch.full((10000,), 0.9)])
    m = rnd.keep_indicator(p, p, torch.Generator().manual_seed(0)).bool().float()
    assert abs(m[:10000].mean().item() - 0.1) < 0.015
    assert abs(m[10000:].mean().item() - 0.9) < 0.015


# ------------------------------------------------------------------------------ DELLA ranks


def test_rank_keep_probs_hand_case():
    # |x| ascending: 0.1 (rank 0), 0.3 (rank 1), 0.5 (rank 2); r = rank / 2 = [0, 1, 0.5].
    # p = (0.5 - 0.1) + 0.2 r = [0.4, 0.6, 0.5].
    x = torch.tensor([0.1, -0.5, 0.3])
    assert torch.allclose(stages.rank_keep_probs(x, 0.5, 0.1), torch.tensor([0.4, 0.6, 0.5]))


def test_rank_keep_probs_are_per_row():
    x = torch.tensor([[0.1, -0.5, 0.3], [9.0, 8.0, -7.0]])
    p = stages.rank_keep_probs(x, 0.5, 0.1)
    assert torch.allclose(p, torch.tensor([[0.4, 0.6, 0.5], [0.6, 0.5, 0.4]]))
    assert torch.allclose(p.mean(dim=1), torch.tensor([0.5, 0.5]))


def test_row_ranks_ties_shapes_and_single_column():
    # Equal magnitudes get distinct ranks in index order (stable).
    assert ranks.row_ranks(torch.tensor([1.0, -1.0, 1.0])).tolist() == [0.0, 0.5, 1.0]
    # k-D tensors: rows are the first dimension, the rest flattened.
    x3 = distinct((2, 3, 4), seed=5)
    assert torch.equal(ranks.row_ranks(x3), ranks.row_ranks(x3.reshape(2, 12)).reshape(2, 3, 4))
    assert ranks.row_ranks(torch.tensor([[2.0], [-3.0]])).tolist() == [[0.5], [0.5]]
    assert ranks.row_ranks(torch.tensor(4.0)).tolist() == 0.5


def test_rank_probabilities_are_not_quantised():
    # A 5504-wide row (Llama MLP width): bf16 ranks would give ~800 distinct values.
    x = distinct((2, 5504), seed=11)
    p = stages.rank_keep_probs(x, 0.6, 0.2)
    assert p.dtype == torch.float32
    assert torch.unique(p[0]).numel() == 5504
    assert abs(p.min().item() - 0.4) < 1e-6 and abs(p.max().item() - 0.8) < 1e-6
    # exactly linear in the rank
    order = torch.argsort(x[0].abs())
    expected = 0.4 + 0.4 * torch.arange(5504, dtype=torch.float64) / 5503
    assert torch.allclose(p[0][order].double(), expected, atol=1e-6)


# ------------------------------------------------------------------------------ rescale rules


def test_apply_mask_rescale_rules():
    x = torch.tensor([1.0, -2.0, 3.0, -4.0])
    m = torch.tensor([True, False, True, False])
    assert apply(x, m, rescale=False).tolist() == [1.0, 0.0, 3.0, 0.0]
    assert apply(x, m, rescale=True, mode="inverse", keep_prob=0.5).tolist() == [2.0, 0.0, 6.0, 0.0]
    p = torch.tensor([0.25, 0.5, 0.5, 1.0])
    assert apply(x, m, rescale=True, mode="inverse", keep_prob=p).tolist() == [4.0, 0.0, 6.0, 0.0]
    # L1: |x|_1 = 10, kept |.|_1 = 4 -> factor 2.5
    assert apply(x, m, rescale=True, mode="l1").tolist() == [2.5, 0.0, 7.5, 0.0]
    # nothing kept: no division by zero
    none = torch.zeros(4, dtype=torch.bool)
    assert apply(x, none, rescale=True, mode="l1").tolist() == [0.0] * 4
    assert apply(x, none, rescale=True, mode="inverse", keep_prob=0.0).tolist() == [0.0] * 4
    # the input is not modified
    assert x.tolist() == [1.0, -2.0, 3.0, -4.0]


def apply(x, m, **kw):
    return stages.apply_mask(x, m, **kw)


# ------------------------------------------------------ exact k-th largest by two radix passes


def radix_kth_largest(chunks: list[torch.Tensor], k: int, high: torch.Tensor) -> float:
    b, r = select.locate_from_top(high, k)
    low = sum(select.magnitude_low_histogram(c, b) for c in chunks)
    lo, _ = select.locate_from_top(low, r)
    return select.magnitude_bits_to_float(b, lo)


def test_radix_histograms_give_the_exact_kth_largest():
    g = torch.Generator().manual_seed(0)
    chunks = [
        torch.randn(300, generator=g) * 1e-3,
        torch.randn(17, 5, generator=g),
        torch.zeros(40),  # many exact zeros
        torch.tensor([1e-40, -1e-40, 3.0, -3.0, 3.0, 1e30]),  # denormals, duplicates, huge
        torch.round(torch.randn(200, generator=g) * 4) / 4,  # heavy duplication
    ]
    everything = torch.cat([c.reshape(-1) for c in chunks]).abs()
    ordered = torch.sort(everything, descending=True).values
    high = sum(select.magnitude_high_histogram(c) for c in chunks)  # pass 1, once
    for k in [1, 2, 3, 4, 7, 50, 123, 300, 400, len(ordered) - 41, len(ordered) - 1, len(ordered)]:
        assert radix_kth_largest(chunks, k, high) == ordered[k - 1].item(), k


def test_locate_in_histogram_bounds():
    hist = torch.tensor([2, 0, 3], dtype=torch.int64)  # items: 0,0,2,2,2
    assert select.locate_from_top(hist, 1) == (2, 1)
    assert select.locate_from_top(hist, 3) == (2, 3)
    assert select.locate_from_top(hist, 4) == (0, 1)
    with pytest.raises(ValueError):
        select.locate_from_top(hist, 6)
    with pytest.raises(ValueError):
        select.locate_from_top(hist, 0)


# ------------------------------------------------ parity with mergekit 0.1.5 (optional: its venv)

_MERGEKIT_DRIVER = textwrap.dedent(
    """
    import hashlib, sys, torch
    from mergekit.merge_methods.registry import registered_methods
    from mergekit.merge_methods.base import TensorGroup

    def tensor_seed(seed, name):
        digest = hashlib.sha256(f"{seed}\\x00{name}".encode()).digest()
        return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)

    methods = {getattr(m, "method_name", None): m for m in registered_methods()}
    cases = torch.load(sys.argv[1])
    out = {}
    real_bernoulli = torch.bernoulli
    for key, c in cases.items():
        # Same draws as mergelab's per-expert ctx.generator(i) streams for this tensor name.
        calls = [0]
        def bern(p, *a, **k):  # mergelab's documented draw: 16-bit lanes of 64-bit words,
            calls[0] += 1      # expert i (the i-th call) from stream i of the tensor's seed
            gen = torch.Generator().manual_seed(tensor_seed(0, key + "\\x00" + str(calls[0])))
            n = p.numel()
            words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, generator=gen)
            u = words.view(torch.int16)[:n].to(torch.int32).reshape(p.shape) + 32768
            return (u < (p.float() * 65536).round()).to(p.dtype)
        torch.bernoulli = bern
        ids = list(range(1, len(c["experts"]) + 1))
        params = {"int8_mask": False, "normalize": c["normalize"], "rescale": c["rescale"],
                  "lambda": c["lambda"]}
        for name, values in c["per_model"].items():
            params[name] = dict(zip(ids, values))
        group = TensorGroup.from_tensors([c["base"]] + c["experts"], base_index=0)
        out[key] = methods[c["method"]].merge_group(group, **params)
        torch.bernoulli = real_bernoulli
    torch.save(out, sys.argv[2])
    """
)


def _parity_cases() -> dict[str, dict]:
    g = torch.Generator().manual_seed(123)

    def case(method, shape, per_model, *, normalize, rescale, lam=1.0):
        base = torch.randn(shape, generator=g)
        n = len(per_model["weight"])
        experts = [base + torch.randn(shape, generator=g) * (0.5 + i) for i in range(n)]
        return dict(
            method=method,
            base=base,
            experts=experts,
            per_model=per_model,
            normalize=normalize,
            rescale=rescale,
            **{"lambda": lam},
        )

    w3 = [1.0, 0.5, 2.0]
    return {
        "ties.a": case(
            "ties", (16, 24), {"weight": w3, "density": [0.2, 0.3, 0.5]}, normalize=True, rescale=False, lam=0.7
        ),
        "ties.b": case("ties", (257,), {"weight": [1.0] * 4, "density": [0.1] * 4}, normalize=False, rescale=False),
        "ties.c": case("ties", (8, 8, 3), {"weight": [0.3, -0.5], "density": [0.6, 0.9]}, normalize=True, rescale=True),
        "bc.a": case(
            "breadcrumbs",
            (32, 17),
            {"weight": [0.4, 0.3, 0.3], "density": [0.8, 0.9, 0.7], "gamma": [0.01, 0.05, 0.1]},
            normalize=False,
            rescale=False,
        ),
        "bct.a": case(
            "breadcrumbs_ties",
            (32, 17),
            {"weight": w3, "density": [0.8, 0.9, 0.7], "gamma": [0.02, 0.0, 0.1]},
            normalize=True,
            rescale=False,
        ),
        "dl.a": case(
            "dare_linear",
            (20, 30),
            {"weight": [0.5, 0.3, 0.2], "density": [0.5, 0.3, 0.9]},
            normalize=False,
            rescale=True,
        ),
        "dt.a": case(
            "dare_ties", (20, 30), {"weight": [1.0] * 3, "density": [0.5, 0.3, 0.9]}, normalize=False, rescale=True
        ),
        "de.a": case(
            "della",
            (12, 40),
            {"weight": [1.0, 0.7, 0.5], "density": [0.5, 0.6, 0.4], "epsilon": [0.1, 0.2, 0.3]},
            normalize=True,
            rescale=True,
        ),
        "del.a": case(
            "della_linear",
            (333,),
            {"weight": [0.5, 0.5], "density": [0.5, 0.6], "epsilon": [0.15, 0.05]},
            normalize=False,
            rescale=True,
            lam=1.1,
        ),
    }


@pytest.mark.skipif(MERGEKIT_PY is None, reason=NO_MERGEKIT)
def test_family_matches_mergekit_with_its_options(tmp_path):
    """With mergekit's options (rescale_mode l1, sign_tie positive, its normalize) and the same
    random masks (its torch.bernoulli replaced by our generator's 16-bit draws), outputs agree in float32.
    Distinct random magnitudes: no ties, so top-k and ranks are unambiguous."""
    cases = _parity_cases()
    torch.save(cases, tmp_path / "in.pt")
    driver = tmp_path / "driver.py"
    driver.write_text(_MERGEKIT_DRIVER)
    proc = subprocess.run(
        [str(MERGEKIT_PY), str(driver), str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = torch.load(tmp_path / "out.pt")
    for key, c in cases.items():
        m = get_method(c["method"])
        glob = {"lambda": c["lambda"], "normalize": c["normalize"], "rescale": c["rescale"], "rescale_mode": "l1"}
        if "sign_tie" in m.params.model_fields:
            glob["sign_tie"] = "positive"
        n = len(c["experts"])
        per_model = [{k: v[i] for k, v in c["per_model"].items()} for i in range(n)]
        out = m(
            c["base"],
            c["experts"],
            m.params.model_validate(glob),
            [m.model_params.model_validate(p) for p in per_model],
            TensorContext(name=key),
        )
        assert torch.allclose(out, reference[key], rtol=0, atol=2e-6), key


def test_tensor_seed_used_by_the_parity_driver_matches_mergelab():
    from mergelab.methods.base import tensor_seed

    digest = hashlib.sha256(b"0\x00ties.a").digest()
    assert tensor_seed(0, "ties.a") == int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ----------------------------------------------------------- sampled-bracket k-th largest magnitude


def _sorted_magnitudes(x: torch.Tensor, minus: torch.Tensor) -> torch.Tensor:
    return torch.sort((x - minus).abs().reshape(-1), descending=True).values


@pytest.mark.parametrize("kind", ["normal", "bf16_ties", "sparse", "identical", "constant"])
def test_kth_largest_magnitude_is_exact_on_large_tensors(kind):
    """Tensors above 4 × SAMPLE entries take the sampled-bracket path; the answer must equal a full
    sort's for every rank, including heavy ties (bf16 deltas), mostly-zero and all-zero deltas."""
    g = torch.Generator().manual_seed(7)
    n = 4 * select.SAMPLE + 12_345
    base = torch.randn(n, generator=g) * 0.02
    if kind == "normal":
        expert = base + torch.randn(n, generator=g) * 0.002
    elif kind == "bf16_ties":
        base = base.bfloat16().float()
        expert = (base + torch.randn(n, generator=g) * 0.002).bfloat16().float()
    elif kind == "sparse":
        expert = base + (torch.rand(n, generator=g) < 0.1) * torch.randn(n, generator=g) * 0.006
    elif kind == "identical":
        expert = base.clone()
    else:
        expert = base + 0.001
    ordered = _sorted_magnitudes(expert, base)
    for k in sorted({1, 2, n // 100, n // 5, n // 2, n - n // 5, n - 1, n}):
        want = ordered[k - 1].item()
        assert select.kth_largest_magnitude(expert, k, minus=base) == want, (kind, k)
        assert select.kth_largest_magnitude(expert - base, k) == want, (kind, k)


def test_kth_largest_magnitude_falls_back_to_the_exact_radix_select(monkeypatch):
    """A bracket that misses (forced here by a negative width) must still give the exact answer."""
    calls = []
    original = select._kth_largest_chunked
    monkeypatch.setattr(select, "_kth_largest_chunked", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setattr(select, "SAMPLE_SIGMAS", -1.0)
    g = torch.Generator().manual_seed(3)
    n = 4 * select.SAMPLE + 1
    base, expert = torch.randn(n, generator=g), torch.randn(n, generator=g)
    ordered = _sorted_magnitudes(expert, base)
    for k in [1, 1000, n // 3, n // 2, n - 1, n]:
        assert select.kth_largest_magnitude(expert, k, minus=base) == ordered[k - 1].item(), k
    assert calls, "the fallback was never exercised"


def test_kth_largest_magnitude_rejects_bad_ranks():
    with pytest.raises(ValueError, match="rank"):
        select.kth_largest_magnitude(torch.ones(5), 0)
    with pytest.raises(ValueError, match="rank"):
        select.kth_largest_magnitude(torch.ones(5), 6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_kth_largest_magnitude_matches_the_callers_arithmetic(dtype):
    """With a bf16 or float64 compute dtype the threshold is the k-th largest of |x − minus| as
    computed in that dtype, so comparing in that dtype keeps exactly the k largest (no ties here
    beyond those the dtype creates, which are all kept)."""
    g = torch.Generator().manual_seed(4)
    n = 4 * select.SAMPLE + 777
    base = (torch.randn(n, generator=g) * 0.02).to(dtype)
    expert = (base.double() + torch.randn(n, generator=g).double() * 0.002).to(dtype)
    mag = (expert - base).abs()
    ordered = torch.sort(mag.double(), descending=True).values
    for k in [1, n // 10, n // 2]:
        t = select.kth_largest_magnitude(expert, k, minus=base)
        assert t == ordered[k - 1].item()
        assert int((mag >= t).sum()) >= k
