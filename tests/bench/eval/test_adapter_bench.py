"""The LM leaderboard of LoRA experts (``mergelab bench --suite lm --experts adapters``) on a tiny LM zoo
built with adapters: dense rows on the materialised adapters, adapter-output rows written by mergelab and
loaded with PEFT, normalization by the LoRA experts, ``--update`` and option checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from mergelab_bench.eval import commands
from mergelab_bench.eval.grids import product
from mergelab_bench.eval.stats import StatsConfig
from mergelab_bench.zoo.build import ZooError
from mergelab_bench.zoo.lm.build import LMZoo, LMZooConfig, build_lm_zoo
from mergelab_bench.zoo.lm.testing import write_lm_sources, write_tiny_causal_lm
from mergelab_bench.zoo.lm.train import LMTrainConfig, LoraTrainConfig

pytest.importorskip("peft")

TRAIN = LMTrainConfig(steps=2, batch_size=4, max_len=24, lr=1e-3, eval_limit=8, eval_batch_size=4, max_new_tokens=4)
TASKS = ("german", "python")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> LMZoo:
    root = tmp_path_factory.mktemp("lmzoo-adapters")
    base = write_tiny_causal_lm(root / "tiny")
    config = LMZooConfig(
        name="tiny-lora",
        tasks=TASKS,
        train=TRAIN,
        adapters=LoraTrainConfig(rank=4, alpha=8, lr=1e-2, target_modules=("q_proj", "v_proj", "down_proj")),
    )
    return build_lm_zoo(
        config, cache=root / "cache", reader=write_lm_sources(root / "src"), base_source=base, threads=1
    )


GRIDS = {
    "task_arithmetic": product({"lambda": (0.5, 1.0)}),
    "adapter:cat": product({"lambda": (0.5, 1.0)}),
    "adapter:svd:ties:r4": product({"lambda": (1.0,)}, {"density": (0.5,)}),
    "adapter:knots_ties": product({"scale": (1.0,), "density": (0.5,)}),
}
STATS = StatsConfig(bootstrap=50, max_extensions=1)


@pytest.fixture(scope="module")
def board(zoo: LMZoo, tmp_path_factory: pytest.TempPathFactory):
    from mergelab_bench.eval.adapter_bench import run_adapter_bench

    work = tmp_path_factory.mktemp("work")
    return run_adapter_bench(zoo, methods=list(GRIDS), grids=GRIDS, validation_limit=4, stats=STATS, work_dir=work)


def test_rows_run_and_are_normalized_by_the_lora_experts(zoo: LMZoo, board) -> None:
    rows = {m.method: m for m in board.methods}
    assert list(rows) == list(GRIDS)
    assert all(m.status == "ok" for m in rows.values()), [m.reason for m in rows.values()]
    for t in zoo.tasks:  # the normalizer of each domain is its LoRA expert's own score
        want = zoo.zoo_scores("adapter:" + t, t, "test", 8)["perplexity"]["value"]
        assert board.expert_test[t] == want != zoo.zoo_scores(t, t, "test", 8)["perplexity"]["value"]
        assert rows["task_arithmetic"].test.score(t).expert == want
        assert (
            board.statistics["expert_rows"][t]["nll"]
            == zoo.zoo_scores("adapter:" + t, t, "test", 8)["perplexity"]["rows"]["nll"]
        )
    names = [r.model for r in board.references]
    assert names == ["base", *(f"LoRA expert: {t}" for t in TASKS), *(f"full expert: {t}" for t in TASKS)]
    own = board.references[1].score("german")
    assert own.normalized == pytest.approx(1.0)
    full = board.references[3].score("german")  # the full fine-tune, normalized by the LoRA expert
    assert full.normalized == pytest.approx(own.value / full.value)
    assert board.config["experts"] == "adapters"
    assert board.config["lora"]["settings"]["rank"] == 4 and set(board.config["lora"]["domains"]) == set(TASKS)
    assert board.config["lora"]["domains"]["german"]["train_seconds"] > 0


def test_adapter_rows_record_their_adapter(zoo: LMZoo, board) -> None:
    rows = {m.method: m for m in board.methods}
    svd = rows["adapter:svd:ties:r4"].info
    assert svd["label"] == "ties → adapter (svd r4)" and svd["output"] == "adapter"
    facts = svd["adapter"]
    assert facts["rank"] == {"min": 4, "max": 4} and facts["lora_modules"] == 6  # 2 layers x q, v, down
    assert 0 < facts["adapter_bytes"] < facts["dense_bytes"] and facts["mean_rel_error"] is not None
    assert rows["adapter:cat"].info["adapter"]["rank"] == {"min": 8, "max": 8}  # 4 + 4: exact concatenation
    assert rows["adapter:knots_ties"].info["label"] == "adapter knots_ties"
    assert rows["task_arithmetic"].info == {"output": "dense", "dense_bytes": facts["dense_bytes"]}


def test_cat_row_is_task_arithmetic_on_the_materialised_adapters(zoo: LMZoo, board, tmp_path: Path) -> None:
    from mergelab import merge_state_dicts
    from mergelab_bench.eval.adapter_bench import AdapterMerge, materialise_adapter
    from mergelab_bench.eval.harness import load_state_dict_path

    rows = {m.method: m for m in board.methods}
    ta, cat = rows["task_arithmetic"], rows["adapter:cat"]
    for g_ta, g_cat in zip(ta.grid, cat.grid, strict=True):  # the same λ grid, the same scores
        assert g_ta.point == g_cat.point
        assert g_cat.validation_average_normalized == pytest.approx(g_ta.validation_average_normalized, rel=1e-5)
    assert cat.test.average_normalized == pytest.approx(ta.test.average_normalized, rel=1e-5)

    base = load_state_dict_path(zoo.base_dir)
    experts = [materialise_adapter(zoo, t) for t in zoo.tasks]
    merger = AdapterMerge(zoo, tmp_path)
    kw = {"parameters": {"lambda": 0.7}, "model_parameters": [{}, {}]}
    dense = merger("task_arithmetic", experts, base, **kw)
    assert all(torch.equal(dense[k], v) for k, v in merge_state_dicts("task_arithmetic", experts, base, **kw).items())
    written = merger("adapter:cat", experts, base, **kw).state_dict()
    assert not list(tmp_path.iterdir())  # the adapter folder is removed once loaded
    moved = 0
    for k, v in dense.items():
        torch.testing.assert_close(written[k], v, rtol=0, atol=1e-6)
        moved += not torch.equal(v, base[k])
    assert moved == 6


def test_materialised_adapter_equals_peft_merge_and_unload(zoo: LMZoo) -> None:
    from mergelab_bench.eval.adapter_bench import materialise_adapter

    mine = materialise_adapter(zoo, "german")
    peft = zoo.adapter_model("german").state_dict()
    for k, v in mine.items():
        torch.testing.assert_close(peft[k], v, rtol=0, atol=1e-6)


def test_markdown_and_reproduce_command(board, tmp_path: Path) -> None:
    from mergelab_bench.eval.leaderboard import Leaderboard, reproduce_command, write_leaderboard

    paths = write_leaderboard(board, tmp_path)
    text = paths["markdown"].read_text()
    assert "| ties → adapter (svd r4) |" in text and "| adapter cat |" in text
    assert "LoRA experts' own test scores" in text and "exactly task_arithmetic" in text
    assert "- ties → adapter (svd r4): rank 4 over 6 modules, adapter" in text
    assert "--experts adapters --methods task_arithmetic,adapter:cat," in reproduce_command(board)
    again = Leaderboard.from_dict(json.loads(paths["json"].read_text()))
    assert again.methods[1].display_name() == "adapter cat" and again.config["experts"] == "adapters"


def test_row_names() -> None:
    from mergelab.methods import get_method
    from mergelab_bench.eval.adapter_bench import ADAPTER_BENCH_METHODS, KNOTS_GRIDS, check_rows, parse_row
    from mergelab_bench.eval.lm_bench import LM_GRIDS

    assert parse_row("ties") is None
    row = parse_row("adapter:svd:dare_ties:e0.9")
    assert (row.rule, row.method, row.energy, row.label) == (
        "svd",
        "dare_ties",
        0.9,
        "dare_ties → adapter (svd energy 0.9)",
    )
    assert row.grid() == LM_GRIDS["dare_ties"] and row.spec().card.random and row.spec().name == row.name
    core = parse_row("adapter:core_space:tsv_m")
    assert core.label == "adapter core_space (tsv_m)" and core.spec().params is get_method("tsv_m").params
    assert parse_row("adapter:cat").grid() == LM_GRIDS["task_arithmetic"]
    knots = parse_row("adapter:knots_dare_ties")
    assert knots.grid() == KNOTS_GRIDS["knots_dare_ties"] and knots.spec().card.random
    assert knots.spec().params.model_validate({"scale": 1.0, "dare_density": 0.5}).dare_density == 0.5
    assert check_rows(list(ADAPTER_BENCH_METHODS)) == list(ADAPTER_BENCH_METHODS)
    for bad, match in (
        ("adapter:svd:ties", "unknown adapter row"),
        ("adapter:svd:ties:r0", "rank must be"),
        ("adapter:svd:linear:r4", "ignores the base"),
        ("adapter:core_space:tall_masks", "routed or data-informed"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_row(bad)
    with pytest.raises(ValueError, match="data-informed"):
        check_rows(["regmean"])


# -- the CLI and --update -------------------------------------------------------------------

app = typer.Typer()
app.command("bench")(commands.bench_command)
app.command("eval")(commands.eval_command)
runner = CliRunner()


def _bench(zoo: LMZoo, out: Path, *extra: str):
    args = ["bench", "--suite", "lm", "--zoo", str(zoo.root), "--out", str(out), "--validation-limit", "2"]
    return runner.invoke(app, [*args, "--bootstrap", "20", *extra])


def test_cli_experts_adapters_and_update_refusals(zoo: LMZoo, tmp_path: Path) -> None:
    full, lora = tmp_path / "full", tmp_path / "lora"
    res = _bench(zoo, full, "--methods", "linear")
    assert res.exit_code == 0, res.output
    assert "experts" not in json.loads((full / "leaderboard.json").read_text())["config"]  # --experts full: as before
    res = _bench(zoo, lora, "--experts", "adapters", "--methods", "task_arithmetic", "--no-extend-grid")
    assert res.exit_code == 0, res.output
    data = json.loads((lora / "leaderboard.json").read_text())
    assert data["config"]["experts"] == "adapters" and data["methods"][0]["status"] == "ok"
    # --update never mixes full and LoRA experts, either way round
    res = _bench(zoo, full, "--experts", "adapters", "--methods", "adapter:cat", "--update")
    assert isinstance(res.exception, commands.UsageError) and "experts='full'" in str(res.exception)
    res = _bench(zoo, lora, "--methods", "linear", "--update")
    assert isinstance(res.exception, commands.UsageError) and "experts='adapters'" in str(res.exception)
    res = _bench(zoo, lora, "--experts", "adapters", "--methods", "adapter:cat", "--update", "--no-extend-grid")
    assert res.exit_code == 0, res.output
    data = json.loads((lora / "leaderboard.json").read_text())
    assert [m["method"] for m in data["methods"]] == ["task_arithmetic", "adapter:cat"]
    assert data["config"]["experts"] == "adapters" and data["methods"][1]["info"]["label"] == "adapter cat"


def test_update_conflict_reads_a_missing_experts_entry_as_full(board) -> None:
    from mergelab_bench.eval.leaderboard import update_conflict, update_leaderboard

    old_full = type(board).from_dict({**board.to_dict(), "config": {**board.config}})
    del old_full.config["experts"]
    assert update_conflict(old_full, None, experts="full") is None
    assert update_conflict(old_full, None, experts=None) is None
    assert "experts='full'" in update_conflict(old_full, None, experts="adapters")
    with pytest.raises(ValueError, match="experts"):
        update_leaderboard(old_full, board)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--experts", "adapters"], commands.UsageError),  # the classification suite has no LoRA experts
        (["--suite", "lm", "--experts", "lora"], commands.UsageError),
        (["--suite", "lm", "--experts", "adapters", "--methods", "adapter:nope"], commands.UsageError),
        (["--suite", "lm", "--experts", "adapters", "--methods", "fisher"], commands.UsageError),
    ],
)
def test_cli_option_checks(args: list[str], error: type, tmp_path: Path) -> None:
    res = runner.invoke(app, ["bench", "--cache", str(tmp_path), *args])
    assert isinstance(res.exception, error), res.output
    assert res.exception.exit_code == 2 and "\n" not in str(res.exception)


def test_cli_refuses_a_zoo_without_adapters(tmp_path: Path) -> None:
    root = tmp_path / "z"
    base = write_tiny_causal_lm(root / "tiny")
    one = TRAIN.model_copy(update={"steps": 1})
    plain = build_lm_zoo(
        LMZooConfig(name="plain", tasks=("german",), train=one),
        cache=root / "cache", reader=write_lm_sources(root / "src"), base_source=base, threads=1,
    )  # fmt: skip
    res = _bench(plain, tmp_path / "out", "--experts", "adapters")
    assert isinstance(res.exception, ZooError) and "--adapters" in str(res.exception)
    assert not (tmp_path / "out").exists()
