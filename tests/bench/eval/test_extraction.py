"""Extraction fidelity (``benchmarks/extraction_fidelity.py``, :mod:`mergelab_bench.eval.extraction`) on tiny
zoos of both suites: base + an adapter extracted at full rank with the non-LoRA changes kept is the expert."""

from __future__ import annotations

import json

import pytest
from tiny_models import load_benchmark

from mergelab_bench.eval.extraction import FULL_RANK, Cut, extraction_fidelity, parse_cuts
from mergelab_bench.zoo.build import Zoo
from mergelab_bench.zoo.lm.build import LMZoo, LMZooConfig, build_lm_zoo
from mergelab_bench.zoo.lm.testing import write_lm_sources, write_tiny_causal_lm
from mergelab_bench.zoo.lm.train import LMTrainConfig
from mergelab_bench.zoo.testing import write_tiny_zoo

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def cls_zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(write_tiny_zoo(tmp_path_factory.mktemp("tinyzoo")))


@pytest.fixture(scope="module")
def lm_zoo(tmp_path_factory: pytest.TempPathFactory) -> LMZoo:
    root = tmp_path_factory.mktemp("lmzoo")
    train = LMTrainConfig(steps=2, batch_size=4, max_len=24, lr=1e-3, eval_limit=8, eval_batch_size=4)
    return build_lm_zoo(
        LMZooConfig(name="tiny", tasks=("german",), train=train), cache=root / "cache",
        reader=write_lm_sources(root / "src"), base_source=write_tiny_causal_lm(root / "tiny"), threads=1,
    )  # fmt: skip


@pytest.mark.parametrize("suite", ["classification", "lm"])
def test_full_rank_with_the_other_changes_kept_scores_as_the_expert(suite, cls_zoo, lm_zoo, tmp_path) -> None:
    zoo = cls_zoo if suite == "classification" else lm_zoo
    task = zoo.tasks[0]
    base, full = extraction_fidelity(
        zoo, cuts=[Cut(rank=FULL_RANK)], tasks=[task], keep_non_lora=True, bootstrap=50, work_dir=tmp_path
    )
    assert base["cut"] == "base" and full["cut"] == "full" and full["suite"] == suite
    assert full["normalized"] == pytest.approx(1.0, rel=1e-5)
    assert full["value"] == pytest.approx(full["expert"], rel=1e-5)
    assert full["ci"]["low"] == pytest.approx(1.0, rel=1e-4) and full["ci"]["high"] == pytest.approx(1.0, rel=1e-4)
    assert full["mean_rel_error"] < 1e-5 and full["dropped"] == 0 and full["kept_whole"] > 0
    assert full["rank"] is None and full["full_rank"] and full["ranks"]["min"] >= 1
    assert full["adapter_bytes"] > 0 and full["expert_bytes"] > 0 and full["loader"] == "peft"
    assert list(tmp_path.iterdir()) == []  # the extracted adapters are removed once scored


def test_cuts_record_ranks_sizes_and_errors(cls_zoo, tmp_path) -> None:
    points = extraction_fidelity(cls_zoo, cuts=parse_cuts("2,e0.9"), tasks=["beta"], bootstrap=20)
    r2, energy = points[1:]
    assert r2["ranks"] == {"min": 2, "max": 2, "mean": 2.0} and r2["rank"] == 2 and r2["mean_rel_error"] > 0.1
    assert energy["energy"] == 0.9 and energy["rank"] is None and energy["ranks"]["max"] > 2
    assert r2["adapter_bytes"] < energy["adapter_bytes"] and r2["size_ratio"] < 1
    assert r2["dropped"] > 0 and r2["kept_whole"] == 0  # extract-lora's default drops norms and biases
    # mergelab's adapter reader gives the weights PEFT's merge_and_unload gives: the same score
    again = extraction_fidelity(cls_zoo, cuts=[Cut(rank=2)], tasks=["beta"], bootstrap=20, loader="mergelab")
    assert again[1]["value"] == r2["value"] and again[1]["loader"] == "mergelab"


def test_parse_cuts() -> None:
    assert [c.token for c in parse_cuts("4, 16,full,e0.9,4")] == ["4", "16", "full", "e0.9"]
    assert [c.label for c in parse_cuts("64,full,e0.5")] == ["rank 64", "full rank", "energy 0.5"]
    for bad in ("0", "e1.5", "x", "e", ""):
        with pytest.raises(ValueError):
            parse_cuts(bad)


def test_script_writes_table_and_plot_and_resumes(cls_zoo, tmp_path, capsys, monkeypatch) -> None:
    script = load_benchmark("extraction_fidelity")
    out = tmp_path / "out"
    args = ["--suites", "classification", "--classification-zoo", str(cls_zoo.root), "--out", str(out)]
    args += ["--cuts", "2,full", "--bootstrap", "20", "--threads", "1"]
    assert script.main(args) == 0
    data = json.loads((out / "extraction.json").read_text())
    assert data["format"] == "mergelab-extraction/1" and data["config"]["cuts"] == ["2", "full"]
    assert [(p["task"], p["cut"]) for p in data["points"]] == [
        (t, c) for t in cls_zoo.tasks for c in ("base", "2", "full")
    ]
    text = (out / "extraction.md").read_text()
    assert "| classification | tiny | alpha | accuracy | full rank |" in text and "95 % CI" in text
    assert (out / "extraction.png").stat().st_size > 0
    assert "alpha: base" in capsys.readouterr().out

    import mergelab.lora.extract

    def no_extraction(*a, **k):
        raise AssertionError("a saved point was measured again")

    monkeypatch.setattr(mergelab.lora.extract, "extract_lora", no_extraction)
    assert script.main(args) == 0  # same settings: every point is reused
    assert "reused" in capsys.readouterr().out
    assert json.loads((out / "extraction.json").read_text())["points"] == data["points"]
    assert script.main(["--out", str(out), "--replot"]) == 0
