"""The speed benchmark's inputs and regimes (issue 20): the shapes table, the bounded-memory base
writer (``mergelab.synthetic.write_base_streamed``), the disk check, page-cache eviction and its
fallbacks, the cold/cached tables, and the GPU-path script's CPU smoke mode."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import load_dir, one_torch_thread  # noqa: F401 - one_torch_thread: autouse

from mergelab.synthetic import make_base, make_expert, write_base_streamed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # merge_speed and gpu_path import their siblings by name

import gpu_path  # noqa: E402
import make_inputs  # noqa: E402
import merge_speed  # noqa: E402
import page_cache  # noqa: E402

SMALL = {"hidden": 128, "layers": 2, "intermediate": 256, "vocab": 512, "heads": 4}


def test_shapes_table_has_the_issue_numbers():
    assert make_inputs.SHAPES["3b"] == {"hidden": 3072, "layers": 26, "intermediate": 8192, "heads": 24, "vocab": 32000}
    assert make_inputs.SHAPES["7b"] == {
        "hidden": 4096,
        "layers": 32,
        "intermediate": 11008,
        "heads": 32,
        "vocab": 32000,
    }
    assert make_inputs.models_for("3b") == make_inputs.MODELS
    assert make_inputs.models_for("7b") == ("base", "ft_dense", "ft_conflict")
    # 168m/738m keep their save_pretrained base (their sets stay byte-identical)
    assert {"168m", "738m"}.isdisjoint(make_inputs.STREAMED) and {"3b", "7b"} <= make_inputs.STREAMED
    assert round(make_inputs.param_count(make_inputs.SHAPES["738m"]) / 1e5) == 7382  # the README's 738.2 M
    assert round(make_inputs.param_count(make_inputs.SHAPES["168m"]) / 1e5) == 1683
    est3, est7 = make_inputs.estimate_bytes("3b"), make_inputs.estimate_bytes("7b")
    assert round(est3["per_model"] / 2**30, 1) == 5.9  # the issue's "5.9 GB each" (GiB)
    assert est3["set"] == 4 * est3["per_model"] and est7["set"] == 3 * est7["per_model"]
    assert 13.4e9 < est7["per_model"] < 13.6e9 and est7["with_output"] == 4 * est7["per_model"]


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_base_loads_in_transformers_and_matches_save_pretrained(tmp_path, tied):
    from transformers import LlamaForCausalLM

    from mergelab.checkpoint.reader import open_checkpoint

    kw = {**SMALL, "tie_embeddings": tied}
    ref = make_base(tmp_path / "ref", **kw, dtype=torch.bfloat16)
    out = write_base_streamed(tmp_path / "st", **kw, max_shard_size="200KB", chunk_elements=5000)
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    for f in ("config.json", "generation_config.json"):
        assert json.loads((out / f).read_text()) == json.loads((ref / f).read_text()), f
    model, info = LlamaForCausalLM.from_pretrained(str(out), output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    assert model.dtype == torch.bfloat16
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 3, 4, 5]])).logits).all()
    got, want = load_dir(out), load_dir(ref)
    assert {n: t.shape for n, t in got.items()} == {n: t.shape for n, t in want.items()}
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got) and index["metadata"]["total_size"] == 2 * sum(
        t.numel() for t in got.values()
    )
    reader = open_checkpoint(out)
    assert set(reader.tensors()) == set(got)
    assert torch.equal(reader.read("model.norm.weight"), got["model.norm.weight"])
    reader.close()


def test_streamed_base_has_transformers_init_statistics_and_is_seeded(tmp_path):
    a = load_dir(write_base_streamed(tmp_path / "a", **SMALL, kv_heads=2, chunk_elements=3000))
    b = load_dir(write_base_streamed(tmp_path / "b", **SMALL, kv_heads=2, chunk_elements=3000))
    c = load_dir(write_base_streamed(tmp_path / "c", **SMALL, kv_heads=2, chunk_elements=3000, seed=1))
    assert a["model.layers.0.self_attn.k_proj.weight"].shape == (64, 128)  # 2 KV heads of 32
    for name, t in a.items():
        assert torch.equal(t, b[name]), name  # same seed: the same bytes
        x = t.float()
        if "norm" in name:
            assert torch.all(x == 1), name
        else:
            assert not torch.equal(t, c[name]), name
            assert abs(x.mean().item()) < 2e-3 and abs(x.std().item() - 0.02) < 1.5e-3, name
            assert len({x[0, 0].item(), x[-1, -1].item()}) == 2  # not one chunk repeated
    whole = torch.cat([t.float().flatten() for n, t in a.items() if "norm" not in n])
    assert abs(whole.std().item() - 0.02) < 2e-4  # initializer_range, as transformers' _init_weights


def test_experts_are_written_over_a_streamed_base(tmp_path):
    base = write_base_streamed(tmp_path / "base", **SMALL, max_shard_size="200KB")
    ft = make_expert(base, tmp_path / "ft", kind="dense", seed=1, scale=2e-3)
    assert sorted(p.name for p in ft.iterdir()) == sorted(p.name for p in base.iterdir())
    d = load_dir(ft)["model.layers.1.mlp.up_proj.weight"].float() - load_dir(base)["model.layers.1.mlp.up_proj.weight"]
    assert 1.5e-3 < d.std().item() < 2.5e-3


def test_build_checks_free_disk_and_names_the_bytes(tmp_path, monkeypatch, capsys):
    class Usage:
        free = 10**9

    monkeypatch.setattr(make_inputs.shutil, "disk_usage", lambda _p: Usage)
    with pytest.raises(make_inputs.DiskSpaceError, match=r"53,9\d\d,\d{3},\d{3} bytes .* 1,000,000,000 bytes"):
        make_inputs.check_disk(tmp_path / "not-yet" / "there", "7b")
    assert make_inputs.main(["--size", "3b", "--workdir", str(tmp_path)]) == 3
    assert "3b set needs" in capsys.readouterr().err
    assert not (tmp_path / "3b").exists()


def test_tiny_set_records_its_models_and_recipes_use_only_those(tmp_path, monkeypatch):
    monkeypatch.setitem(make_inputs.SET_MODELS, "tiny", ("base", "ft_dense", "ft_conflict"))
    root = tmp_path / "tiny"
    make_inputs.build(root, "tiny")
    assert make_inputs.is_complete(root) and make_inputs.set_models(root) == ("base", "ft_dense", "ft_conflict")
    assert not (root / "ft_sparse").exists()
    done = json.loads((root / "DONE.json").read_text())
    assert done["base_writer"] == "write_base_streamed" and done["params"] == make_inputs.param_count(
        make_inputs.SHAPES["tiny"]
    )
    text = merge_speed.recipe_text("ties", root)
    assert "ft_dense" in text and "ft_conflict" in text and "ft_sparse" not in text
    assert merge_speed.floor_label(len(make_inputs.set_models(root))) == "read 3 + write 1"


# ---------------------------------------------------------------------------------------------
# page-cache eviction


def _file(tmp_path: Path, n: int = 1 << 20) -> Path:
    p = tmp_path / "inputs" / "w.bin"
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(os.urandom(n))
    return p


def test_fadvise_evicts_a_file_and_mincore_sees_it(tmp_path):
    f = _file(tmp_path)
    f.read_bytes()
    ev = page_cache.evict([f.parent], "fadvise")
    assert ev.method == "fadvise" and ev.files == 1 and ev.bytes == f.stat().st_size
    if ev.resident_after is None:
        pytest.skip("mincore cannot report this file's page cache here")
    assert ev.resident_before > 0.5 and ev.resident_after < 0.05
    assert "by fadvise" in ev.line()


def test_auto_falls_back_to_fadvise_when_drop_caches_is_refused(tmp_path, monkeypatch):
    calls = []

    def refused() -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(page_cache, "drop_caches", refused)
    monkeypatch.setattr(page_cache, "fadvise_dontneed", lambda files: calls.append(files))
    ev = page_cache.evict([_file(tmp_path)], "auto")
    assert ev.method == "fadvise" and len(calls) == 1 and "not writable" in ev.note
    with pytest.raises(PermissionError):
        page_cache.evict([tmp_path / "inputs"], "drop_caches")  # asked for explicitly: no fallback


def test_auto_adds_fadvise_when_drop_caches_leaves_the_files_cached(tmp_path, monkeypatch):
    calls = []
    fractions = iter([1.0, 0.9, 0.0])  # before, after the drop, after fadvise
    monkeypatch.setattr(page_cache, "drop_caches", lambda: calls.append("drop"))
    monkeypatch.setattr(page_cache, "fadvise_dontneed", lambda files: calls.append("fadvise"))
    monkeypatch.setattr(page_cache, "resident_fraction", lambda files: next(fractions))
    ev = page_cache.evict([_file(tmp_path)], "auto")
    assert calls == ["drop", "fadvise"] and ev.method == "drop_caches+fadvise" and ev.resident_after == 0.0
    fractions = iter([1.0, 0.0])
    calls.clear()
    assert page_cache.evict([tmp_path / "inputs"], "auto").method == "drop_caches" and calls == ["drop"]


def test_measure_evicts_before_the_run_and_kills_at_the_timeout(tmp_path, monkeypatch):
    seen = []

    def fake_evict(paths, method):
        seen.append((list(paths), method))
        return page_cache.Eviction(method, 0.0, 1, 1, 1.0, 0.0)

    monkeypatch.setattr(merge_speed.page_cache, "evict", fake_evict)
    env = dict(os.environ)
    run = merge_speed.measure(
        [sys.executable, "-c", "pass"], tmp_path / "out", tmp_path / "a.log", env, evict=[tmp_path], evict_method="x"
    )
    assert run.rc == 0 and seen == [([tmp_path], "x")] and run.eviction["method"] == "x"
    run = merge_speed.measure([sys.executable, "-c", "pass"], tmp_path / "out", tmp_path / "b.log", env)
    assert run.eviction is None and len(seen) == 1  # cached regime: nothing evicted
    slow = [sys.executable, "-c", "import time; time.sleep(60)"]
    run = merge_speed.measure(slow, tmp_path / "out", tmp_path / "c.log", env, timeout=0.5)
    assert run.rc == -9 and run.wall_s < 30


def test_cold_is_a_regime_and_conflicts_with_another():
    with pytest.raises(SystemExit):
        merge_speed.main(["--cold", "--regime", "cached", "--methods", "none"])


def _result(regime: str | None, walls: dict[str, float]) -> dict:
    def row(tool: str, method: str, w: float) -> dict:
        ev = {"method": "fadvise", "resident_after": 0.0} if regime == "cold" else None
        run = merge_speed.Run(w, 10**9, 0, 1.0, eviction=ev)
        return {"tool": tool, "method": method, "runs": [run.__dict__], "command": "", "source": ""}

    floor = row("floor", "read 4 + write 1", walls["floor"])
    rows = [row("mergelab", "ties", walls["ties"])]
    out = {
        "size": "738m",
        "set": {"params": 738e6, "bytes_per_model": 1.48e9},
        "floor": floor,
        "rows": rows,
        "table": {"head": ["tool"], "body": [["floor"], ["mergelab"]]},
    }
    if regime:
        out["regime"] = regime
    return out


def test_report_reads_old_results_and_compares_the_regimes(capsys):
    meta = {"command": "x", "machine": {"nproc": 2, "cpu": "c", "ram_gb": 1, "load_avg": [1, 1, 1]}, "versions": {}}
    merge_speed.report({**meta, "results": [_result(None, {"floor": 1, "ties": 3})]}, markdown=False)
    out = capsys.readouterr().out
    assert "base + 3 fine-tunes; page cache: cached" in out and "cold against cached" not in out
    doc = {**meta, "results": [_result("cached", {"floor": 1, "ties": 3}), _result("cold", {"floor": 2, "ties": 5})]}
    merge_speed.report(doc, markdown=True)
    out = capsys.readouterr().out
    assert "page cache: cold (evicted by fadvise before each run; at most 0.0 % of the inputs left cached" in out
    assert (
        "| mergelab | ties | 3.00 | 5.00 | 1.67× |" in out
        and "| floor | read 4 + write 1 | 1.00 | 2.00 | 2.00× |" in out
    )


# ---------------------------------------------------------------------------------------------
# the GPU path


def test_gpu_path_budget_and_data_recipe(tmp_path):
    from mergelab.recipe import load_recipe

    gpu = gpu_path
    b = gpu.Budget(10.0, start=0.0)
    b.left = lambda: 5.0  # type: ignore[method-assign]
    assert b.fits(None) and b.fits(4.0) and not b.fits(4.9)
    models = {"base": "b", "experts": ["e0", "e1"], "calibration": ["c0.jsonl", "c1.jsonl"], "max_length": 64}
    r = gpu.data_recipe("regmean", models, 32)
    assert r["calibration"] == {"num_examples": 32, "max_length": 64, "model_type": "causal_lm"}
    assert [m["calibration"]["path"] for m in r["models"]] == ["c0.jsonl", "c1.jsonl"]
    p = tmp_path / "r.yaml"
    p.write_text(json.dumps(r))
    assert load_recipe(p).merge_method == "regmean"
    a = gpu.parse_args(["--smoke", "--out", str(tmp_path / "o")])
    assert (a.size, a.device, a.repeats, a.data_shape) == ("tiny", "cpu", 1, "tiny")


@pytest.mark.slow
def test_gpu_path_smoke_mode_runs_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / "cache"))  # no LM zoo here: the synthetic stand-in
    gpu = gpu_path
    out = tmp_path / "out"
    rc = gpu.main(["--smoke", "--workdir", str(tmp_path / "work"), "--out", str(out), "--methods", "ties,della"])
    assert rc == 0
    doc = json.loads((out / "gpu_path.json").read_text())
    assert doc["finished"] and doc["data_models"]["synthetic"] and "SYNTHETIC" in doc["data_models"]["source"]
    labels = {e["label"]: e for e in doc["entries"]}
    assert set(labels) == {
        "floor",
        "mergelab ties",
        "mergelab della",
        *(f"{m} (data phase + merge)" for m in ("regmean", "fisher")),
    }
    assert all(r["rc"] == 0 for e in labels.values() for r in e["runs"])
    assert labels["regmean (data phase + merge)"]["data_phase"][0]["seconds"] > 0
    assert "della on cpu" in (out / "gpu_path.md").read_text()
