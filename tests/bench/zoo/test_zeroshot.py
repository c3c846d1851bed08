"""The zeroshot zoo variant: fixed zero-shot heads, experts trained against them, a tiny build end to end."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergelab_bench.zoo.build import ZeroShotZooConfig, ZooConfig, build_zoo, load_zoo, zoo_config
from mergelab_bench.zoo.heads import TEMPERATURE, CosineHead, cosine_head, load_head, zero_shot_head
from mergelab_bench.zoo.tasks import TASKS, TaskData
from mergelab_bench.zoo.testing import FixtureSources, synthetic_rows, write_task, write_tiny_backbone
from mergelab_bench.zoo.train import ZeroShotTrainConfig, plateaued, train_against_head

TINY = ZeroShotTrainConfig(
    steps=4, batch_size=4, max_len=16, eval_limit=20, probe_epochs=30, eval_every=2, curve_limit=10
)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_backbone(tmp_path_factory.mktemp("bb"))


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> TaskData:
    root = tmp_path_factory.mktemp("task")
    return TaskData.load(write_task(root, "gamma", synthetic_rows("gamma", 40, ["p", "q"]), ["p", "q"]))


def test_cosine_head_logits_by_hand() -> None:
    # label embeddings (3, 4) and (1, 0) normalise to (0.6, 0.8) and (1, 0); the feature (0, 2) to (0, 1)
    head = cosine_head(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), ["a", "b"], "t", temperature=10.0)
    got = head(torch.tensor([[0.0, 2.0], [-5.0, 0.0]]))
    assert torch.allclose(got, torch.tensor([[8.0, 0.0], [-6.0, -10.0]]))
    # scaling a feature does not change its logits (cosine)
    assert torch.allclose(head(torch.tensor([[0.0, 200.0]])), torch.tensor([[8.0, 0.0]]))


def test_zero_shot_head_is_the_pretrained_embedding_of_each_prompt(backbone: Path, tmp_path: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    from mergelab_bench.zoo.backbone import load_encoder, load_tokenizer

    prompts = ["a red cat", "the blue dog sings"]
    head = zero_shot_head(load_encoder(backbone), load_tokenizer(backbone), prompts, ["x", "y"], "t", max_len=16)
    # independent computation: a fresh model, one prompt at a time (no padding), mean over all tokens
    model = AutoModel.from_pretrained(str(backbone)).eval()
    tok = AutoTokenizer.from_pretrained(str(backbone))
    rows = []
    with torch.no_grad():
        for p in prompts:
            hidden = model(**tok(p, return_tensors="pt")).last_hidden_state[0]
            v = hidden.mean(0)
            rows.append(v / v.norm())
    expected_w = TEMPERATURE * torch.stack(rows)
    assert torch.allclose(head.linear.weight, expected_w, atol=1e-4)
    feats = torch.randn(3, expected_w.shape[1], generator=torch.Generator().manual_seed(0))
    expected = torch.stack([feats[i] / feats[i].norm() for i in range(3)]) @ expected_w.T
    assert torch.allclose(head(feats), expected, atol=1e-3)
    # saved and loaded: still a cosine head with its prompts and temperature
    head.save(tmp_path / "h.safetensors")
    again = load_head(tmp_path / "h.safetensors")
    assert isinstance(again, CosineHead) and again.prompts == tuple(prompts) and again.temperature == TEMPERATURE
    assert torch.equal(again(feats), head(feats))


def test_every_task_has_one_prompt_per_label() -> None:
    for spec in TASKS.values():
        prompts = spec.prompts()
        assert len(prompts) == len(spec.labels) == len(set(prompts)), spec.name
        assert all("{}" not in p for p in prompts)
    assert TASKS["lang_id"].prompts()[TASKS["lang_id"].labels.index("de")] == "a text written in German"
    assert TASKS["code_lang"].prompts()[TASKS["code_lang"].labels.index("go")] == "a Go source file"


def test_training_never_updates_the_head(backbone: Path, task: TaskData, monkeypatch: pytest.MonkeyPatch) -> None:
    from mergelab_bench.zoo.backbone import load_encoder, load_tokenizer, make_batches

    head = zero_shot_head(load_encoder(backbone), load_tokenizer(backbone), ["p is", "q is"], ["p", "q"], "gamma")
    before = {k: v.clone() for k, v in head.linear.state_dict().items()}
    held: list[torch.Tensor] = []
    real = torch.optim.AdamW

    def spy(groups, **kw):
        opt = real(groups, **kw)
        held.extend(p for g in opt.param_groups for p in g["params"])
        return opt

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    texts, y = task.examples("validation")
    val = (make_batches(load_tokenizer(backbone), texts, max_len=16, batch_size=8), y)
    trained = train_against_head(task, backbone, TINY.model_copy(update={"lr": 1e-2}), head, validation=val)
    assert held and not any(p is q for p in held for q in head.linear.parameters())
    assert all(torch.equal(before[k], v) for k, v in head.linear.state_dict().items())
    assert trained.head is head and trained.record["head_trainable_parameters"] == 0
    # the encoder, embeddings included (the variant's default), did move
    base = load_encoder(backbone).state_dict()
    moved = {k for k, v in trained.encoder.state_dict().items() if not torch.equal(v, base[k])}
    assert any(k.startswith("embeddings.word_embeddings") for k in moved)
    assert any(k.startswith("encoder.layer.") for k in moved)
    assert [p["step"] for p in trained.record["curve"]] == [0, 2, 4]


def test_plateau_rule() -> None:
    pts = [{"accuracy": a} for a in (0.5, 0.8, 0.9, 0.905, 0.9)]
    assert plateaued(pts, 0.01) is True
    assert plateaued([{"accuracy": a} for a in (0.5, 0.6, 0.7, 0.8)], 0.01) is False
    assert plateaued(pts[:2], 0.01) is None


def test_presets_keep_the_lpft_variant_unchanged() -> None:
    # the lpft presets keep their names and config dumps (so their cache keys)
    assert zoo_config("lpft", "quick") == ZooConfig.quick() and ZooConfig.quick().name == "quick"
    assert "variant" not in ZooConfig.full().model_dump()
    zs = zoo_config("zeroshot", "full")
    assert isinstance(zs, ZeroShotZooConfig) and zs.name == "zeroshot-full" and len(zs.tasks) >= 8
    assert zs.train.freeze_embeddings is False and zs.temperature == TEMPERATURE


def test_tiny_zeroshot_zoo_end_to_end(tmp_path: Path, backbone: Path, fixture_sources: FixtureSources) -> None:
    from mergelab_bench.eval.harness import Evaluator

    cfg = ZeroShotZooConfig(name="tiny-zs", tasks=("wordnet_pos", "lang_id"), train=TINY)
    zoo = build_zoo(cfg, cache=tmp_path, reader=fixture_sources, backbone=backbone, threads=None)
    assert zoo.variant == "zeroshot" and load_zoo("tiny-zs", cache=tmp_path).manifest_path == zoo.manifest_path
    entry = zoo.manifest["tasks"]["lang_id"]
    assert entry["template"] == "a text written in {}" and entry["temperature"] == TEMPERATURE
    assert "a text written in German" in entry["prompts"] and len(entry["content_sha256"]) == 64
    head = zoo.head("lang_id")
    assert isinstance(head, CosineHead)
    # the expert folder's head is a byte copy of the task's head
    assert (zoo.expert_dir("lang_id") / "head.safetensors").read_bytes() == zoo._path(entry["head"]).read_bytes()
    rec = zoo.record("lang_id")
    assert rec["variant"] == "zeroshot" and rec["curve"][0]["step"] == 0 and rec["curve"][-1]["step"] == 4
    assert set(rec["accuracy"]) == {"expert", "zero_shot", "probe", "n"}
    ev = Evaluator(zoo, split="test", limit=TINY.eval_limit)
    refs = ev.reference_reports()
    assert refs[0].model == "pretrained + zero-shot heads"
    # the pretrained row with the task heads is the zero-shot accuracy recorded with the head
    for s in refs[0].scores:
        assert math.isclose(s.value, zoo.record(s.task)["accuracy"]["zero_shot"]["test"], abs_tol=1e-6)
    base = ev.evaluate("base")
    assert [s.value for s in base.scores] == [s.value for s in refs[0].scores]


def test_core_head_loader_reads_a_cosine_head(tmp_path: Path) -> None:
    """Data-informed methods (Fisher, AdaMerging) score with the core's LinearHead: a zero-shot head
    must give the same cosine logits there as in the zoo."""
    from mergelab.informed.modeling import LinearHead, default_logits_fn

    head = cosine_head(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), ["a", "b"], "t", temperature=10.0)
    head.save(tmp_path / "h.safetensors")
    core = LinearHead.load(tmp_path / "h.safetensors")
    assert core.normalize

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask, **_):
            from types import SimpleNamespace

            return SimpleNamespace(last_hidden_state=torch.tensor([[[0.0, 2.0], [0.0, 6.0]]]))

    fn = default_logits_fn("encoder", core)
    got = fn(Fixed(), {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2)})
    assert torch.allclose(got, torch.tensor([[8.0, 0.0]]))


@pytest.mark.slow
def test_quick_zeroshot_zoo_end_to_end() -> None:
    """The real zeroshot-quick zoo (minutes on 2 cores; reuses the cache): experts beat their
    zero-shot start, and task arithmetic beats the pretrained encoder with the zero-shot heads."""
    from mergelab_bench.eval.grids import DEMO_GRIDS
    from mergelab_bench.eval.leaderboard import run_bench
    from mergelab_bench.zoo import SourceError, zoo_summary

    try:
        zoo = build_zoo(ZeroShotZooConfig.quick(), threads=2)
    except SourceError as exc:
        pytest.skip(f"zoo sources not installed: {exc}")
    for row in zoo_summary(zoo):
        assert row["expert_test"] > row["zero_shot_test"] + 0.02, row
    lb = run_bench(zoo, methods=["task_arithmetic"], grids=DEMO_GRIDS, validation_limit=100, test_limit=200)
    ta, pretrained = lb.methods[0], lb.references[0]
    assert pretrained.model == "pretrained + zero-shot heads"
    assert ta.test is not None and ta.test.average_normalized > pretrained.average_normalized
