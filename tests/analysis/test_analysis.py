"""Task-vector analysis: statistics on constructed task vectors with known cosines, sign-conflict
rates, TALL counts and sparsifier densities; the streamed analysis of checkpoints against a
direct computation; the HTML report and JSON; the CLI command."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import yaml
from tiny_models import load_dir
from typer.testing import CliRunner

import mergelab.analysis.stats as stats_mod
from mergelab.analysis import AnalysisOptions, TaskVectorStats, analyze, write_report
from mergelab.analysis.stats import breadcrumbs_mask, della_expected_kept, topk_mask
from mergelab.errors import RecipeError
from mergelab.methods.stages.sparsify import magnitude_mask, outlier_mask, rank_keep_probs

T = torch.tensor


def fold(taus_per_tensor, layers, **opts) -> dict:
    """Feed constructed task vectors (base 0) tensor by tensor."""
    st = TaskVectorStats(len(taus_per_tensor[0]), AnalysisOptions(**opts))
    for taus, layer in zip(taus_per_tensor, layers):
        st.update(torch.zeros_like(taus[0]), list(taus), layer)
    return st.result()


def test_cosine_whole_model_and_per_layer():
    # layer 0: τ1 = [1, 0, 0], τ2 = [1, 1, 0] -> cos 1/√2;  layer 1: τ1 = [2, 0], τ2 = [-2, 0] -> cos −1
    # outside blocks: τ1 = [0.5], τ2 = [0] -> undefined
    # whole model: ⟨τ1, τ2⟩ = 1 − 4 = −3, ‖τ1‖² = 1 + 4 + 0.25 = 5.25, ‖τ2‖² = 6 -> −3/√31.5
    r = fold(
        [(T([1.0, 0, 0]), T([1.0, 1, 0])), (T([2.0, 0]), T([-2.0, 0])), (T([0.5]), T([0.0]))],
        [0, 1, None],
    )
    assert r["layers"] == ["0", "1", "other"]
    assert r["cosine"]["per_layer"]["0"][0][1] == pytest.approx(1 / math.sqrt(2))
    assert r["cosine"]["per_layer"]["1"][0][1] == pytest.approx(-1.0)
    assert r["cosine"]["per_layer"]["other"][0][1] is None
    assert r["cosine"]["matrix"][0][1] == pytest.approx(-3 / math.sqrt(5.25 * 6))
    assert r["cosine"]["matrix"][1][0] == r["cosine"]["matrix"][0][1]
    assert r["norms"]["total"] == pytest.approx([math.sqrt(5.25), math.sqrt(6)])
    assert r["norms"]["per_layer"]["1"] == pytest.approx([2.0, 2.0])
    assert r["parameters"] == 6 and r["tensors"] == 3


def _flipped_pair(n=100):
    """τ1 with distinct positive magnitudes; τ2 = τ1 with 10 signs flipped among the 50 largest
    and 20 among the 50 smallest."""
    tau1 = torch.linspace(1.0, 2.0, n)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    order = torch.argsort(tau1, descending=True)
    flip = torch.zeros(n, dtype=torch.bool)
    flip[order[:10]] = True
    flip[order[50:70]] = True
    return tau1, torch.where(flip, -tau1, tau1), flip


@pytest.mark.parametrize(("topk", "rate"), [(1.0, 0.3), (0.5, 0.2)])
def test_sign_conflict_rate_among_topk(topk, rate):
    tau1, tau2, flip = _flipped_pair()
    r = fold([(tau1, tau2, tau1.clone())], [0], topk=topk)
    sc = r["sign_conflict"]
    assert sc["rate"][0][1] == pytest.approx(rate)
    assert sc["rate"][0][2] == 0.0  # τ3 = τ1
    assert sc["rate"][1][2] == pytest.approx(rate)
    assert sc["rate"][0][0] is None
    assert sc["overlap"][0][1] == pytest.approx(1.0)  # same magnitudes: same top-k sets
    assert sc["topk_entries"] == [int(topk * 100)] * 3
    assert sc["all_experts_rate"] == pytest.approx(rate)
    w = tau1.square()
    assert r["cosine"]["matrix"][0][1] == pytest.approx(
        float((w * torch.where(flip, -1.0, 1.0)).sum() / w.sum()), rel=1e-6
    )


def test_sign_conflicts_ignore_zero_entries():
    # τ2 is zero on the first half: only the second half can be in its top-k
    tau1 = torch.linspace(1, 2, 10)
    tau2 = torch.cat([torch.zeros(5), -torch.linspace(1, 2, 5)])
    r = fold([(tau1, tau2)], [0], topk=1.0)
    assert r["sign_conflict"]["topk_entries"] == [10, 5]
    assert r["sign_conflict"]["intersection"][0][1] == 5
    assert r["sign_conflict"]["rate"][0][1] == 1.0


def test_tall_overlap_counts():
    # the TALL example of test_tall_masks.py (λ = 0.5) plus a weight nobody moves:
    # masks [1,0,1,1,1,0], [0,1,1,1,1,0], [0,0,1,1,0,0] -> c = [1, 1, 3, 3, 2, 0]
    taus = (T([1.0, 0.0, 2.0, -1.0, 0.5, 0.0]), T([0.0, 3.0, -2.0, -1.0, 0.5, 0.0]), T([0.0, 0.0, 1.0, 2.0, -0.2, 0.0]))
    r = fold([taus], [3], tall_lambda=0.5)
    tall = r["tall"]
    assert tall["histogram"] == [1, 2, 1, 2]
    assert tall["claimed"] == [4, 4, 2]
    assert tall["claimed_fraction"] == pytest.approx([4 / 6, 4 / 6, 2 / 6])
    assert tall["selfish"] == [1, 1, 0] and tall["selfish_total"] == 2
    assert tall["catastrophic"] == 1 and tall["untouched"] == 1


def test_sparsifier_densities():
    n = 100
    dense = torch.linspace(0.5, 1.5, n)
    sparse = torch.cat([torch.zeros(n // 2), torch.linspace(0.5, 1.5, n // 2)])
    r = fold([(dense, sparse)], [0])
    d = r["density"]
    assert d["nonzero"] == pytest.approx([1.0, 0.5])
    assert d["ties"]["kept"] == pytest.approx([0.2, 0.2]) and d["ties"]["density"] == 0.2
    assert d["breadcrumbs"]["kept"][0] == pytest.approx(0.9)  # ⌊0.9·100⌋ kept, top ⌊0.01·100⌋ dropped
    assert d["breadcrumbs"]["kept"][1] == pytest.approx(0.49)  # the zeros are the smallest; the largest goes
    assert d["dare"]["kept"] == pytest.approx([0.5, 0.25]) and d["dare"]["density"] == 0.5
    # DELLA: p = (0.7 − 0.07) + 0.14·rank/(n − 1); the zeros take the 50 lowest ranks
    assert d["della"]["kept"][0] == pytest.approx(0.7, abs=1e-6)
    want = sum(0.63 + 0.14 * i / 99 for i in range(50, 100)) / n
    assert d["della"]["kept"][1] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("small", [True, False])
def test_masks_equal_the_methods_masks(small, monkeypatch):
    if not small:
        monkeypatch.setattr(stats_mod, "_SMALL", 0)  # force the radix-select path
    g = torch.Generator().manual_seed(3)
    shapes, densities, gammas = (
        ([(37,), (3, 5, 7)], (0.0, 0.1, 0.5, 0.97, 1.0), (0.0, 0.3)) if small else ([(16, 24)], (0.1, 0.97), (0.05,))
    )
    for shape in shapes:
        delta = (torch.randn(shape, generator=g) * 4).round() / 4  # many ties in magnitude
        for density in densities:
            assert torch.equal(topk_mask(delta, density), magnitude_mask(delta, density))
            for gamma in gammas:
                assert torch.equal(breadcrumbs_mask(delta, density, gamma), outlier_mask(delta, density, gamma))


@pytest.mark.parametrize("shape", [(1,), (30,), (7, 1), (6, 11), (3, 4, 5)])
def test_della_closed_form_equals_rank_keep_probs(shape):
    g = torch.Generator().manual_seed(shape[0])
    delta = torch.randn(shape, generator=g).masked_fill_(torch.rand(shape, generator=g) < 0.4, 0.0)
    for density, eps in ((0.7, 0.07), (0.5, 0.5), (0.3, 0.0), (1.0, 0.1)):
        nz = delta != 0
        want = (
            float(rank_keep_probs(delta, density, eps).masked_fill_(~nz, 0.0).sum()) if density < 1 else float(nz.sum())
        )
        assert della_expected_kept(nz, density, eps) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_options_are_validated():
    with pytest.raises(ValueError):
        AnalysisOptions(topk=1.5)
    with pytest.raises(ValueError):
        AnalysisOptions(della_density=0.05, della_epsilon=0.07)
    o = AnalysisOptions()
    assert (o.ties_density, o.dare_density, o.breadcrumbs_density, o.della_density) == (0.2, 0.5, 0.9, 0.7)


# ------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def analysed(family):
    base, experts = family
    rec = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(e)} for e in experts]}
    return base, experts, analyze(rec)


def test_streamed_analysis_matches_direct_computation(analysed):
    base, experts, r = analysed
    b = load_dir(base)
    taus = [{k: v.double() - b[k].double() for k, v in load_dir(e).items()} for e in experts]
    flat = [torch.cat([t[k].reshape(-1) for k in sorted(t)]) for t in taus]
    for i in range(3):
        assert r["norms"]["total"][i] == pytest.approx(float(flat[i].norm()), rel=1e-6)
        for j in range(3):
            cos = float(flat[i] @ flat[j] / (flat[i].norm() * flat[j].norm()))
            assert r["cosine"]["matrix"][i][j] == pytest.approx(cos, rel=1e-5, abs=1e-6)
    layer0 = [torch.cat([t[k].reshape(-1) for k in sorted(t) if ".layers.0." in k]) for t in taus]
    assert r["norms"]["per_layer"]["0"][1] == pytest.approx(float(layer0[1].norm()), rel=1e-6)
    assert r["layers"] == ["0", "1", "other"]
    assert r["parameters"] == flat[0].numel()
    assert r["names"] == ["expert_0", "expert_1", "expert_2"] and r["base"] == str(base)
    # the family's "conflict" expert is built against the first one's delta: strongly negative
    assert r["cosine"]["matrix"][0][2] < -0.5 and r["sign_conflict"]["rate"][0][2] > 0.9


def test_model_list_mode_and_errors(analysed, family):
    base, experts, r = analysed
    r2 = analyze(models=[str(e) for e in experts[:2]], base=str(base), options=AnalysisOptions(topk=0.2))
    assert r2["cosine"]["matrix"][0][1] == pytest.approx(r["cosine"]["matrix"][0][1])
    with pytest.raises(RecipeError, match="base"):
        analyze(models=[str(e) for e in experts])
    with pytest.raises(RecipeError, match="at least one"):
        analyze(models=[], base=str(base))


def test_html_report_and_json(analysed, tmp_path):
    _, _, r = analysed
    html_path, json_path = write_report(r, tmp_path / "rep" / "report.html")
    assert json_path == tmp_path / "rep" / "report.json"
    page = html_path.read_text()
    pngs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(pngs) == 7  # cosine, conflicts, per-layer cosine, norms, TALL histogram and claims, densities
    assert all(p.startswith("iVBORw0KGgo") for p in pngs)  # PNG signature
    for fig in (
        "fig-cosine",
        "fig-conflict",
        "fig-layer_cosine",
        "fig-norms",
        "fig-tall_hist",
        "fig-tall_tasks",
        "fig-density",
    ):
        assert fig in page
    embedded = re.search(r"<script type='application/json' id='mergelab-analysis'>(.*?)</script>", page, re.DOTALL)
    assert json.loads(embedded.group(1)) == json.loads(json_path.read_text()) == json.loads(json.dumps(r))


def test_cli_command(family, tmp_path):
    import typer

    from mergelab.analysis.commands import analyze_command

    base, experts = family
    app = typer.Typer()
    app.command("analyze")(analyze_command)
    app.command("other")(lambda: None)  # keep typer in multi-command mode, as in the real CLI
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "task_arithmetic",
                "base_model": str(base),
                "models": [{"model": str(e)} for e in experts[:2]],
            }
        )
    )
    res = CliRunner().invoke(app, ["analyze", str(recipe), "--report", str(tmp_path / "a.html"), "-q", "--topk", "0.3"])
    assert res.exit_code == 0, res.output
    assert "expert_0 · expert_1: cosine" in res.output
    data = json.loads((tmp_path / "a.json").read_text())
    assert data["sign_conflict"]["topk"] == 0.3 and len(data["experts"]) == 2
    res = CliRunner().invoke(app, ["analyze", str(experts[0]), str(experts[1]), "-q"])
    assert res.exit_code != 0 and isinstance(res.exception, RecipeError)
