"""The benchmark's objectives: the LM suite's scores and kinds, the zoo's gradient (Frank–Wolfe's
loss), lm-eval's task guard, and the python: objective's return forms."""

from __future__ import annotations

import math

import pytest
import torch

from mergelab.errors import OptionError
from mergelab.search.objective import ObjectiveContext, Scores, build_objective, check_objective


@pytest.fixture(scope="module")
def lm_zoo(tmp_path_factory: pytest.TempPathFactory):
    import mergelab_bench  # noqa: F401 - registers the objectives
    from mergelab_bench.zoo.lm.build import LMZooConfig, build_lm_zoo
    from mergelab_bench.zoo.lm.testing import write_lm_sources, write_tiny_causal_lm
    from mergelab_bench.zoo.lm.train import LMTrainConfig

    root = tmp_path_factory.mktemp("searchlm")
    train = LMTrainConfig(steps=2, batch_size=4, max_len=24, lr=1e-3, eval_limit=8, eval_batch_size=4)
    zoo = build_lm_zoo(
        LMZooConfig(name="tiny", tasks=("german", "arithmetic"), train=train), cache=root / "cache",
        reader=write_lm_sources(root / "src"), base_source=write_tiny_causal_lm(root / "tiny"), threads=1,
    )  # fmt: skip
    return zoo, root / "cache"


def test_lm_objective_gives_normalized_scores_and_log_perplexity_losses(lm_zoo, tmp_path) -> None:
    from mergelab_bench.eval.evaluator import load_state_dict_path

    zoo, cache = lm_zoo
    obj = build_objective("lm:validation", ObjectiveContext({}, "cpu", {"zoo": "tiny", "cache": str(cache)}))
    assert list(obj.tasks) == ["german", "arithmetic"]
    expert = load_state_dict_path(zoo.expert_model_dir("german"))
    scores = obj.evaluate(expert)
    assert scores.kinds == {"german": "loss", "arithmetic": "accuracy"}
    report = obj.evaluator.evaluate(expert)  # type: ignore[attr-defined]
    ppl = report.score("german").value
    assert scores.metrics["german"] == pytest.approx(math.log(ppl))
    assert scores.tasks["german"] == pytest.approx(1.0)  # the german expert on german: normalized 1
    assert scores.score == pytest.approx(report.average_normalized)


def test_zoo_gradient_is_the_summed_cross_entropy_through_each_tasks_head(tiny_zoo_recipe) -> None:
    from mergelab_bench.eval.evaluator import load_state_dict_path
    from mergelab_bench.zoo.backbone import encoder_from_state_dict, make_batches, pooled

    _, manifest = tiny_zoo_recipe
    obj = build_objective("zoo:validation", ObjectiveContext({}, "cpu", {"zoo": str(manifest), "proxy_limit": "5"}))
    zoo = obj.zoo  # type: ignore[attr-defined]
    state = load_state_dict_path(zoo.expert_model_dir("alpha"))
    loss, grads = obj.gradient(state)  # type: ignore[attr-defined]
    # by hand, one example at a time (the official code's batch of 1, losses summed)
    enc = encoder_from_state_dict(zoo.base_dir, state)
    total = 0.0
    for task in zoo.tasks:
        texts, labels = zoo.examples(task, "validation", 5)
        head = zoo.head(task).linear
        for b in make_batches(zoo.tokenizer, texts, max_len=zoo.max_len, batch_size=1):
            logits = torch.nn.functional.linear(
                pooled(enc, b.input_ids, b.attention_mask), head.weight.detach(), head.bias.detach()
            )
            step = torch.nn.functional.cross_entropy(logits, torch.tensor(labels)[b.index])
            step.backward()
            total += float(step.detach())
    assert loss == pytest.approx(total, rel=1e-5)
    by_hand = {n: p.grad for n, p in enc.named_parameters() if p.grad is not None}
    assert set(grads) == set(by_hand) and "pooler.dense.weight" not in grads  # mean pooling: no pooler gradient
    for n in by_hand:
        torch.testing.assert_close(grads[n], by_hand[n], rtol=1e-4, atol=1e-5)  # batched vs one by one


def test_objective_checks_run_before_anything_is_built(tiny_zoo_recipe) -> None:
    _, manifest = tiny_zoo_recipe
    with pytest.raises(OptionError, match="--objective-option lmit: not an option of zoo"):
        check_objective("zoo:validation", {"zoo": str(manifest), "lmit": "3"})
    with pytest.raises(OptionError, match="the split is train, validation or test"):
        check_objective("zoo:valid", {"zoo": str(manifest)})
    with pytest.raises(OptionError, match="limit='many': expected a whole number"):
        check_objective("zoo:validation", {"zoo": str(manifest), "limit": "many"})
    with pytest.raises(OptionError, match="python: objectives take no options"):
        check_objective("python:search_objectives:closeness", {"limit": "3"})


def test_python_return_forms() -> None:
    assert Scores.of(0.5).tasks == {"objective": 0.5}
    s = Scores.of({"a": 0.2, "b": 0.6})
    assert s.score == pytest.approx(0.4) and s.kinds == {"a": "accuracy", "b": "accuracy"}
    with pytest.raises(OptionError, match="return a number"):
        Scores.of("high")
    assert Scores.from_dict(s.to_dict()) == s
