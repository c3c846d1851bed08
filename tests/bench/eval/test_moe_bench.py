"""The MoE benchmark (``benchmarks/moe_bench.py``, :mod:`mergelab_bench.eval.moe_bench`): parameter counts of a
tiny Mixtral by hand, the LM evaluator on an MoE folder, leaderboard rows, and the script end to end on a tiny
LM zoo (upcycling per gate mode, 4 -> 2 compression)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tiny_models import load_benchmark

from mergelab_bench.eval import moe_bench as M
from mergelab_bench.eval.stats import StatsConfig


def test_parameters_of_a_tiny_mixtral_by_hand(tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    sizes = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
    sizes.update(num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**sizes, num_local_experts=4, num_experts_per_tok=2)).save_pretrained(
        tmp_path / "moe"
    )
    # per layer: q 32x32, k and v 16x32 (2 kv heads of 8), o 32x32, 2 norms of 32, router 4x32,
    # 4 experts of 3 x 32x48; plus embeddings and head 64x32 each and the final norm
    expert = 3 * 32 * 48
    layer = 1024 + 512 + 512 + 1024 + 64 + 128 + 4 * expert
    total = 2 * layer + 2 * 64 * 32 + 32
    p = M.moe_parameters(tmp_path / "moe")
    assert p["moe"] and p["architecture"] == "mixtral" and p["top_k"] == 2 and p["experts_per_layer"] == [4]
    assert p["expert_size"] == expert and p["total"] == total == 47520
    assert p["active"] == total - 2 * (4 - 2) * expert == 29088  # 2 of 4 experts per layer run per token
    assert p["distinct"] == total and p["bytes"] > 4 * total
    # a shared-layout compression: 4 slots per layer holding 2 distinct experts
    shutil.copytree(tmp_path / "moe", tmp_path / "shared")
    report = {"layout": "shared", "experts_per_layer": {"0": 2, "1": 2}}
    (tmp_path / "shared" / "moe_compress.json").write_text(json.dumps(report))
    s = M.moe_parameters(tmp_path / "shared")
    assert s["distinct"] == total - 2 * 2 * expert and s["active"] == p["active"]
    assert s["distinct_experts_per_layer"] == [2]
    # a dense model: everything is active
    LlamaForCausalLM(LlamaConfig(**sizes)).save_pretrained(tmp_path / "dense")
    d = M.moe_parameters(tmp_path / "dense")
    assert not d["moe"] and d["active"] == d["total"] == d["distinct"] == 2 * (3072 + 64 + 3 * 32 * 48) + 4096 + 32


def test_recipe_and_calibration_come_from_train_texts(tiny_lm_zoo4, tmp_path: Path) -> None:
    zoo = tiny_lm_zoo4
    recipe = M.lm_moe_recipe(zoo, ["german", "python"], gate_mode="hidden", prompts=3, prompt_chars=20)
    train = zoo.data("german").texts("train", 3)
    assert recipe["experts"][0]["positive_prompts"] == [t[:20] for t in train]
    assert recipe["experts"][1]["source_model"] == str(zoo.expert_model_dir("python"))
    assert "shared_experts" not in recipe
    qwen = M.lm_moe_recipe(zoo, ["german", "python"], gate_mode="random", architecture="qwen2_moe")
    assert qwen["shared_experts"][0]["source_model"] == str(zoo.base_dir)
    assert qwen["shared_experts"][0]["residual_scale"] == 0.1  # the base MLP scaled, not added whole
    whole = M.lm_moe_recipe(zoo, ["german"], gate_mode="random", architecture="qwen2_moe", shared_residual_scale=None)
    assert "residual_scale" not in whole["shared_experts"][0]
    assert M.lm_moe_recipe(zoo, ["german"], gate_mode="random", base=tmp_path)["base_model"] == str(tmp_path)
    path = M.calibration_file(zoo, ["german", "python"], 2, tmp_path / "cal.jsonl")
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert texts == [zoo.data(t).texts("train", 2)[i] for i in range(2) for t in ("german", "python")]


def test_leaderboard_rows_same_zoo_only(tiny_lm_zoo4, tmp_path: Path) -> None:
    from mergelab_bench.eval.grids import GridPoint
    from mergelab_bench.eval.leaderboard import write_leaderboard
    from mergelab_bench.eval.lm_bench import run_lm_bench

    zoo = tiny_lm_zoo4
    rows, note = M.leaderboard_rows(tmp_path / "none.json", zoo, zoo.tasks, 8)
    assert rows == [] and "no leaderboard" in note
    lb = run_lm_bench(
        zoo, methods=["task_arithmetic", "linear"], validation_limit=4,
        grids={"task_arithmetic": [GridPoint({"lambda": 1.0})], "linear": [GridPoint()]},
        stats=StatsConfig(bootstrap=20, extend_edges=False),
    )  # fmt: skip
    path = write_leaderboard(lb, tmp_path / "lb")["json"]
    rows, note = M.leaderboard_rows(path, zoo, ["german", "italian"], 8, best=1)
    assert len(rows) == 1 and rows[0]["kind"] == "static merge" and "same zoo" in note
    best = lb.ranked()[0]
    assert rows[0]["name"] == best.method and rows[0]["interval"] is None  # another set of domains: no interval
    want = [best.test.score(t).normalized for t in ("german", "italian")]
    assert rows[0]["average_normalized"] == pytest.approx(sum(want) / 2)
    rows, note = M.leaderboard_rows(path, zoo, zoo.tasks, 16)
    assert rows == [] and "not comparable" in note


def test_script_upcycles_and_compresses(tiny_lm_zoo4, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = ["--zoo", str(tiny_lm_zoo4.root), "--out", str(out), "--domains", "german,italian"]
    args += ["--gate-modes", "hidden,cheap_embed", "--prompts", "2", "--calibration-per-domain", "3"]
    args += ["--compress-methods", "msmoe:shared,prune-frequency", "--bootstrap", "20", "--threads", "1"]
    args += ["--leaderboard", str(tmp_path / "none.json"), "--work", str(tmp_path / "work")]
    args += ["--merged-base", "task_arithmetic:lambda=0.5"]
    assert load_benchmark("moe_bench").main(args) == 0
    data = json.loads((out / "moe.json").read_text())
    up = data["upcycling"]
    assert [r["name"] for r in up["rows"]][:3] == ["base", "expert: german", "expert: italian"]
    moes = [r for r in up["rows"] if r["kind"] == "upcycled MoE"]
    assert [r["gate_mode"] for r in moes] == ["hidden", "cheap_embed", "hidden"]
    merged, on_merged = up["rows"][-2:]  # the static merge of the experts, then the MoE upcycled onto it
    assert merged["kind"] == "static merge" and merged["merge_parameters"] == {"lambda": 0.5}
    assert on_merged["base_model"] == {"method": "task_arithmetic", "parameters": {"lambda": 0.5}}
    assert on_merged["parameters"]["total"] == moes[0]["parameters"]["total"]
    assert up["settings"]["merged_base"] == ["task_arithmetic:lambda=0.5"]
    moes = moes[:2]
    for r in moes:  # 2 experts, top-2: every parameter is active
        p = r["parameters"]
        assert p["architecture"] == "mixtral" and p["experts_per_layer"] == [2] and p["active"] == p["total"]
        assert set(r["normalized"]) == {"german", "italian"} and r["interval"]["low"] is not None
    comp = data["compression"]
    assert comp["domains"] == tiny_lm_zoo4.tasks  # the first 4
    by = {(r.get("method"), r.get("layout")): r for r in comp["rows"] if r["kind"] != "base"}
    first = by[("none", "–")]["parameters"]
    assert first["experts_per_layer"] == [4] and first["active"] == first["total"] - 2 * 2 * first["expert_size"]
    shared = by[("msmoe", "shared")]["parameters"]
    assert shared["experts_per_layer"] == [4] and shared["distinct_experts_per_layer"] == [2]
    assert shared["total"] == first["total"] and shared["distinct"] == first["active"]
    pruned = by[("prune-frequency", "distinct")]["parameters"]
    # 2 of 2 experts per layer: all active; the same as the 4-expert MoE's active count less the 2 dropped
    # router rows of each of the 2 layers (hidden size 32)
    assert pruned["experts_per_layer"] == [2] and pruned["active"] == pruned["total"] == first["active"] - 2 * 2 * 32
    assert pruned["bytes"] < first["bytes"]
    text = (out / "moe.md").read_text()
    assert "## Upcycling" in text and "## Compression: 4 → 2" in text and "No leaderboard at" in text
    assert (out / "moe.png").stat().st_size > 0
    assert list((tmp_path / "work").iterdir()) == []  # the MoE folders are removed once scored
    assert "prune-frequency (distinct)" in capsys.readouterr().out


def test_script_combines_parts_run_apart(tmp_path: Path) -> None:
    """``--combine``: the upcycling part of one run and the compression part of another give one report
    with both tables; runs on different zoos or test rows, or the same part twice, are refused."""
    base = {"format": M.FORMAT, "zoo": {"name": "z", "key": "k", "tasks": ["a", "b"]}, "test_limit": 8,
            "statistics": {"bootstrap": 20}, "notes": ["n1"]}  # fmt: skip
    row = {"name": "base", "kind": "base", "parameters": {}, "average_normalized": 0.5, "normalized": {"a": 0.5}}
    up = {
        **base,
        "command": "up",
        "config": {"parts": ["upcycle"], "seconds": 10.0},
        "upcycling": {
            "domains": ["a"],
            "rows": [row],
            "leaderboard_note": "",
            "settings": {
                "architecture": "mixtral",
                "experts_per_token": 2,
                "prompts": 2,
                "prompt_chars": 9,
                "gate_modes": [],
            },
        },
    }
    comp = {**base, "command": "comp", "notes": ["n1", "n2"], "config": {"parts": ["compress"], "seconds": 5.0},
            "compression": {"domains": ["a"], "rows": [{**row, "name": "base 2"}], "leaderboard_note": "", "settings": {
                "to": 2, "methods": [], "gate_mode": "hidden", "calibration_per_domain": 3,
                "calibration_max_length": 8, "architectures": ["mixtral"]}}}  # fmt: skip
    paths = []
    for name, r in (("up", up), ("comp", comp)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(r))
    out = tmp_path / "out"
    assert load_benchmark("moe_bench").main(["--combine", *map(str, paths), "--out", str(out)]) == 0
    data = json.loads((out / "moe.json").read_text())
    assert data["upcycling"] == up["upcycling"] and data["compression"] == comp["compression"]
    assert data["notes"] == ["n1", "n2"] and [r["command"] for r in data["runs"]] == ["up", "comp"]
    assert data["config"]["parts"] == ["upcycle", "compress"] and data["config"]["seconds"] == 15.0
    text = (out / "moe.md").read_text()
    assert "## Upcycling" in text and "## Compression: 1 → 2" in text
    with pytest.raises(ValueError, match="upcycling with gate_modes hidden in two of the runs"):
        hidden = {**up["upcycling"]["settings"], "gate_modes": ["hidden"]}
        M.combine_moe([{**up, "upcycling": {**up["upcycling"], "settings": hidden}}] * 2)
    # a second compression run on another architecture: its rows joined, the shared reference row once
    qwen_row = {**row, "name": "qwen2_moe 1→2 msmoe (shared)", "kind": "compressed MoE"}
    qwen_settings = {**comp["compression"]["settings"], "architectures": ["qwen2_moe"], "methods": ["m:s"]}
    qwen_rows = [{**row, "name": "base 2"}, qwen_row]
    qwen = {**comp, "compression": {**comp["compression"], "rows": qwen_rows, "settings": qwen_settings}}
    joined = M.combine_moe([up, comp, qwen])["compression"]
    assert [r["name"] for r in joined["rows"]] == ["base 2", "qwen2_moe 1→2 msmoe (shared)"]
    assert joined["settings"]["architectures"] == ["mixtral", "qwen2_moe"] and joined["settings"]["methods"] == ["m:s"]
    again = {**qwen, "compression": {**qwen["compression"], "settings": {**qwen_settings, "architectures": ["x"]}}}
    assert M.combine_moe([comp, qwen, again])["compression"]["settings"]["methods"] == ["m:s"]  # the same method again
    with pytest.raises(ValueError, match="compression with architectures mixtral in two of the runs"):
        M.combine_moe([comp, comp])
    other = {**comp, "compression": {**comp["compression"], "settings": {**qwen_settings, "to": 3}}}
    with pytest.raises(ValueError, match="its compression part has other domains or settings"):
        M.combine_moe([comp, other])
    with pytest.raises(ValueError, match="run 2: its test_limit"):
        M.combine_moe([up, {**comp, "test_limit": 16}])
    with pytest.raises(SystemExit):
        load_benchmark("moe_bench").main(["--combine", str(tmp_path / "missing.json"), "--out", str(out)])
