"""The harness on a tiny random-init BERT zoo, against predictions computed independently."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab_bench.eval.harness import Evaluator, evaluate_model
from mergelab_bench.zoo.backbone import Head, load_encoder, load_tokenizer
from mergelab_bench.zoo.build import Zoo


def _independent_predictions(zoo: Zoo, encoder_dir, task: str, split: str = "test") -> list[int]:
    """One text at a time, no padding, hand-written mean pooling: no shared code path with batching."""
    tok = load_tokenizer(zoo.base_dir)
    enc = load_encoder(encoder_dir)
    head = zoo.head(task)
    texts, _ = zoo.examples(task, split, None)
    preds = []
    with torch.no_grad():
        for text in texts:
            ids = tok(text, truncation=True, max_length=zoo.max_len, return_tensors="pt")
            hidden = enc(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state[0]
            preds.append(int((head.linear.weight @ hidden.mean(0) + head.linear.bias).argmax()))
    return preds


def test_constant_head_gives_the_label_frequency_exactly(tiny_zoo: Zoo) -> None:
    # A head with zero weights and bias favouring class 1 predicts 1 for every input.
    head = tiny_zoo.head("beta")
    with torch.no_grad():
        head.linear.weight.zero_()
        head.linear.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    ev = Evaluator(tiny_zoo, tasks=["beta"], split="test", limit=None)
    report = ev.evaluate("base")
    _, labels = tiny_zoo.examples("beta", "test", None)
    assert report.score("beta").value == sum(y == 1 for y in labels) / len(labels)
    assert report.score("beta").n == len(labels) == 15


def test_accuracy_matches_unbatched_predictions(tiny_zoo: Zoo) -> None:
    report = evaluate_model("expert:alpha", tiny_zoo, limit=None)
    for task in ("alpha", "beta"):
        preds = _independent_predictions(tiny_zoo, tiny_zoo.expert_model_dir("alpha"), task)
        _, labels = tiny_zoo.examples(task, "test", None)
        expected = sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)
        assert report.score(task).value == expected


def test_expert_scores_and_normalization(tiny_zoo: Zoo) -> None:
    report = evaluate_model("expert:alpha", tiny_zoo, limit=None)
    alpha, beta = report.score("alpha"), report.score("beta")
    assert alpha.expert == alpha.value and alpha.normalized == 1.0  # an expert on its own task
    preds = _independent_predictions(tiny_zoo, tiny_zoo.expert_model_dir("beta"), "beta")
    _, labels = tiny_zoo.examples("beta", "test", None)
    assert beta.expert == sum(p == y for p, y in zip(preds, labels, strict=True)) / len(labels)
    assert beta.normalized == pytest.approx(beta.value / beta.expert)
    assert report.average_normalized == pytest.approx((1.0 + beta.normalized) / 2)


def test_every_model_form_gives_the_same_report(tiny_zoo: Zoo, tmp_path) -> None:
    ev = Evaluator(tiny_zoo, split="validation", limit=None)
    expert_dir = tiny_zoo.expert_model_dir("beta")
    state = load_file(str(expert_dir / "model.safetensors"))
    save_file(state, str(tmp_path / "merged.safetensors"))
    reports = [
        ev.evaluate(expert_dir),
        ev.evaluate("expert:beta"),
        ev.evaluate(state),
        ev.evaluate(tmp_path / "merged.safetensors"),
        ev.evaluate(load_encoder(expert_dir)),
    ]
    values = [[s.value for s in r.scores] for r in reports]
    assert all(v == values[0] for v in values)


def test_state_dict_missing_a_parameter_is_rejected(tiny_zoo: Zoo) -> None:
    state = load_file(str(tiny_zoo.base_dir / "model.safetensors"))
    state.pop(next(k for k in state if k.startswith("encoder.")))
    with pytest.raises(ValueError, match="missing"):
        Evaluator(tiny_zoo).evaluate(state)


def test_limit_takes_the_first_rows(tiny_zoo: Zoo) -> None:
    full = Evaluator(tiny_zoo, tasks=["alpha"], limit=None).evaluate("base").score("alpha")
    five = Evaluator(tiny_zoo, tasks=["alpha"], limit=5).evaluate("base").score("alpha")
    assert five.n == 5 and full.n == 14
    preds = _independent_predictions(tiny_zoo, tiny_zoo.base_dir, "alpha")[:5]
    _, labels = tiny_zoo.examples("alpha", "test", 5)
    assert five.value == sum(p == y for p, y in zip(preds, labels, strict=True)) / 5


def test_feature_cache_is_reused_and_sliced(tiny_zoo: Zoo) -> None:
    full = tiny_zoo.features("base", "alpha", "validation", None)
    files = sorted((tiny_zoo.base_dir / "features").glob("alpha-*-validation-*"))
    assert files
    part = tiny_zoo.features("base", "alpha", "validation", 3)
    assert torch.equal(part, full[:3])
    assert sorted((tiny_zoo.base_dir / "features").glob("alpha-*-validation-*")) == files  # no new file


def test_reference_rows(tiny_zoo: Zoo) -> None:
    ev = Evaluator(tiny_zoo, limit=None)
    rows = {r.model: r for r in ev.reference_reports()}
    assert list(rows) == [
        "pretrained + expert heads",
        "pretrained + linear probe",
        "expert: alpha",
        "expert: beta",
        "ensemble: probability average",
        "ensemble: majority vote",
    ]
    assert rows["expert: alpha"].score("alpha").normalized == 1.0
    assert rows["expert: beta"].score("beta").normalized == 1.0
    # the pretrained row equals evaluating the base directly
    assert [s.value for s in rows["pretrained + expert heads"].scores] == [s.value for s in ev.evaluate("base").scores]
    probe = ev.evaluate("base", head="probe")
    assert [s.value for s in rows["pretrained + linear probe"].scores] == [s.value for s in probe.scores]


def test_head_round_trip(tmp_path) -> None:
    lin = torch.nn.Linear(4, 3)
    Head(lin, ["a", "b", "c"], "t").save(tmp_path / "h.safetensors")
    back = Head.load(tmp_path / "h.safetensors")
    assert back.labels == ["a", "b", "c"] and back.task == "t"
    x = torch.randn(5, 4)
    assert torch.equal(back(x), lin(x).detach())
