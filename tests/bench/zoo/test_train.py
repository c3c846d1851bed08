"""Expert training and the probe baseline on a tiny random-init backbone; a fast end-to-end build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergelab_bench.zoo import build as build_mod
from mergelab_bench.zoo.build import ZooConfig, build_zoo, load_zoo
from mergelab_bench.zoo.tasks import TaskData
from mergelab_bench.zoo.testing import FixtureSources, synthetic_rows, write_task, write_tiny_backbone
from mergelab_bench.zoo.train import TrainConfig, lr_factor, select_probe, train_expert, train_probe

TINY = TrainConfig(steps=4, batch_size=4, max_len=16, eval_limit=20, probe_epochs=30)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_backbone(tmp_path_factory.mktemp("bb"))


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> TaskData:
    root = tmp_path_factory.mktemp("task")
    return TaskData.load(write_task(root, "gamma", synthetic_rows("gamma", 40, ["p", "q"]), ["p", "q"]))


def test_lr_schedule() -> None:
    assert [round(lr_factor(s, 10, 2), 3) for s in range(10)] == [
        0.5,
        1.0,
        1.0,
        0.875,
        0.75,
        0.625,
        0.5,
        0.375,
        0.25,
        0.125,
    ]
    assert lr_factor(0, 5, 0) == 1.0


def test_expert_training_is_seeded_and_keeps_embeddings(backbone: Path, task: TaskData) -> None:
    from transformers import AutoModel

    a = train_expert(task, backbone, TINY)
    b = train_expert(task, backbone, TINY)
    sa, sb = a.encoder.state_dict(), b.encoder.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.head.linear.weight, b.head.linear.weight)
    base = AutoModel.from_pretrained(str(backbone), local_files_only=True).state_dict()
    assert all(torch.equal(sa[k], base[k]) for k in sa if k.startswith("embeddings."))
    assert any(not torch.equal(sa[k], base[k]) for k in sa if k.startswith("encoder."))
    assert a.record["train_examples_seen"] == 16 and a.record["seed"] == b.record["seed"]
    assert a.head.labels == ["p", "q"]
    c = train_expert(task, backbone, TINY.model_copy(update={"seed": 1}))
    assert not torch.equal(c.head.linear.weight, a.head.linear.weight)


def test_unfrozen_embeddings_move(backbone: Path, task: TaskData) -> None:
    from transformers import AutoModel

    out = train_expert(task, backbone, TINY.model_copy(update={"freeze_embeddings": False}))
    base = AutoModel.from_pretrained(str(backbone), local_files_only=True).state_dict()
    s = out.encoder.state_dict()
    assert not torch.equal(s["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])


def test_probe_fits_raw_features() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 5.0, 0.0], [0.0, -5.0, 0.0], [4.0, 0.0, 0.0]]) * 0.01 + 3.0  # tiny spread, big offset
    y = torch.arange(90) % 3
    x = centers[y] + 0.002 * torch.randn(90, 3, generator=gen)
    head = train_probe(x, y.tolist(), ["a", "b", "c"], "t", TINY.model_copy(update={"probe_epochs": 200}), l2=1e-4)
    assert (head(x).argmax(-1) == y).all()  # standardisation folded back: works on raw features
    _chosen, l2, scores = select_probe((x, y.tolist()), (x, y.tolist()), ["a", "b", "c"], "t", TINY)
    assert set(scores) == {repr(v) for v in TINY.probe_l2} and l2 in TINY.probe_l2


def test_build_and_reuse(
    tmp_path: Path, backbone: Path, fixture_sources: FixtureSources, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ZooConfig(name="tiny", tasks=("wordnet_pos", "lang_id"), train=TINY)
    zoo = build_zoo(cfg, cache=tmp_path, reader=fixture_sources, backbone=backbone, threads=None)
    assert zoo.tasks == ["wordnet_pos", "lang_id"] and zoo.max_len == 16
    rec = zoo.record("lang_id")
    assert rec["train_config"]["steps"] == 4 and rec["data"]["labels"] == [
        "cs",
        "de",
        "en",
        "es",
        "it",
        "pl",
        "pt",
        "ru",
    ]
    assert set(rec["accuracy"]) == {"expert", "probe", "pretrained_with_expert_head", "n"}
    assert (zoo.expert_model_dir("lang_id") / "model.safetensors").is_file()
    assert (
        zoo.head("lang_id").labels == rec["data"]["labels"]
        and zoo.head("lang_id", "probe").labels == rec["data"]["labels"]
    )
    assert load_zoo("tiny", cache=tmp_path).manifest_path == zoo.manifest_path

    def no_training(*a, **k):
        raise AssertionError("a cached expert was retrained")

    monkeypatch.setattr(build_mod, "train_expert", no_training)
    again = build_zoo(cfg, cache=tmp_path, reader=fixture_sources, backbone=backbone, threads=None)
    assert again.manifest_path == zoo.manifest_path
    # a changed hyperparameter is a different expert
    with pytest.raises(AssertionError, match="retrained"):
        build_zoo(
            cfg.model_copy(update={"train": TINY.model_copy(update={"lr": 1e-4})}),
            cache=tmp_path,
            reader=fixture_sources,
            backbone=backbone,
        )
    assert not list((tmp_path / "zoo" / "models").glob(".*partial"))  # the failed build left nothing behind


def test_missing_zoo_names_the_build_command(tmp_path: Path) -> None:
    from mergelab_bench.zoo.build import ZooError

    with pytest.raises(ZooError, match="run `mergelab zoo build --quick`"):
        load_zoo("quick", cache=tmp_path)


def test_head_starts_from_the_given_head(backbone: Path, task: TaskData) -> None:
    from mergelab_bench.zoo.train import new_head

    init = new_head(16, ["p", "q"], "gamma", torch.Generator().manual_seed(5))
    cfg = TINY.model_copy(update={"steps": 1, "head_lr": 1e-12})
    out = train_expert(task, backbone, cfg, init_head=init)
    assert torch.allclose(out.head.linear.weight, init.linear.weight, atol=1e-9)
    with pytest.raises(ValueError, match="labels"):
        train_expert(task, backbone, cfg, init_head=new_head(16, ["q", "p"], "gamma", torch.Generator()))
