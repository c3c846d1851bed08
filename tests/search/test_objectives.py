"""The benchmark's objectives: the LM suite's scores and kinds, the zoo's and the LM suite's gradients
(Frank–Wolfe's loss) and a Frank–Wolfe search on the LM suite, lm-eval's task guard, and the python:
objective's return forms."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import pytest
import torch

from mergelab.errors import OptionError
from mergelab.search.objective import ObjectiveContext, Scores, build_objective, check_objective

if TYPE_CHECKING:
    from pathlib import Path

    from mergelab_bench.eval.objectives import LMObjective
    from mergelab_bench.zoo.lm.build import LMZoo


@pytest.fixture(scope="module")
def lm_zoo(tmp_path_factory: pytest.TempPathFactory):
    import mergelab_bench  # noqa: F401 - registers the objectives
    from mergelab_bench.zoo.lm.build import LMZooConfig, build_lm_zoo
    from mergelab_bench.zoo.lm.testing import write_lm_sources, write_tiny_causal_lm
    from mergelab_bench.zoo.lm.train import LMTrainConfig

    root = tmp_path_factory.mktemp("searchlm")
    # 48 tokens: the tiny tokenizer spends ~25 on an arithmetic prompt, and the answer must fit after it
    train = LMTrainConfig(steps=2, batch_size=4, max_len=48, lr=1e-3, eval_limit=8, eval_batch_size=4)
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


def _lm_objective(cache: Path, **options: str) -> LMObjective:
    """``lm:validation`` on the tiny LM zoo."""
    from mergelab_bench.eval.objectives import LMObjective

    obj = build_objective("lm:validation", ObjectiveContext({}, "cpu", {"zoo": "tiny", "cache": str(cache), **options}))
    assert isinstance(obj, LMObjective)
    return obj


def _nll_by_hand(zoo: LMZoo, proxy: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The HF checkpoint of the german expert and, per domain, its mean token NLL on the first ``proxy``
    validation rows: one row at a time, no padding, encoded with the tokenizer directly (the document
    token, then the text; arithmetic: the prompt's ids then the answer line's, only the latter scored)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(zoo.expert_model_dir("german")), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(zoo.base_dir))
    doc, max_len = tok.convert_tokens_to_ids("<|endoftext|>"), zoo.eval_settings["max_len"]
    out = {}
    for task in ("german", "arithmetic"):
        nll, count = torch.zeros(()), 0
        for row in zoo.data(task).rows("validation", proxy):
            if task == "arithmetic":
                head = [doc, *tok(row["prompt"], add_special_tokens=False)["input_ids"]]
                tail = tok(" " + row["answer"] + "\n", add_special_tokens=False)["input_ids"]
                ids, start = (head + tail)[:max_len], len(head)
            else:
                ids, start = [doc, *tok(row["text"], add_special_tokens=False)["input_ids"]][:max_len], 1
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            targets = torch.tensor(ids)
            nll = nll + torch.nn.functional.cross_entropy(logits[start - 1 : -1], targets[start:], reduction="sum")
            count += len(ids) - start
        assert count > 0, f"{task}: nothing to score (max_len cuts the answers)"
        out[task] = nll / count
    return model, out


PROXY = 12
"""Proxy rows per domain in the gradient tests: two batches of the gradient (8 rows each), so
accumulation and padding are exercised."""


def test_lm_gradient_equals_autograd_of_the_loss_computed_by_hand(lm_zoo) -> None:
    from mergelab_bench.eval.evaluator import load_state_dict_path

    zoo, cache = lm_zoo
    obj = _lm_objective(cache, proxy_limit=str(PROXY))
    state = load_state_dict_path(zoo.expert_model_dir("german"))
    _, grads = obj.gradient(state)
    model, by_hand = _nll_by_hand(zoo, PROXY)
    want = torch.autograd.grad(by_hand["german"] + by_hand["arithmetic"], list(model.parameters()))
    for (n, _), g in zip(model.named_parameters(), want, strict=True):
        assert grads[n].dtype == torch.float32 and not grads[n].requires_grad
        torch.testing.assert_close(grads[n], g, rtol=1e-3, atol=1e-6)  # batched and padded vs one row at a time


def test_lm_gradient_loss_is_the_sum_of_domain_nlls_keyed_by_the_states_names(lm_zoo) -> None:
    from mergelab_bench.eval.evaluator import load_state_dict_path

    zoo, cache = lm_zoo
    obj = _lm_objective(cache, proxy_limit=str(PROXY))
    state = load_state_dict_path(zoo.expert_model_dir("german"))
    assert "lm_head.weight" not in state  # tied: the checkpoint holds the embedding only
    loss, grads = obj.gradient(state)
    assert set(grads) == set(state)
    model, by_hand = _nll_by_hand(zoo, PROXY)
    assert loss == pytest.approx(float(by_hand["german"].detach() + by_hand["arithmetic"].detach()), rel=1e-5)
    # the perplexity domain's term is the harness's log perplexity of the same rows
    ppl = zoo.scorer.score(model, zoo.data("german"), "validation", PROXY, metrics=["perplexity"])["perplexity"]
    assert float(by_hand["german"].detach()) == pytest.approx(ppl["mean_nll"], rel=1e-5)
    # one module for scores and gradients, its gradients cleared; the same state, the same answer
    module = obj.evaluator.module(state)
    assert all(p.grad is None for p in module.parameters()) and not module.training
    again, grads2 = obj.gradient(state)
    assert again == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(grads2["model.embed_tokens.weight"], grads["model.embed_tokens.weight"])
    # a state that names the tied head too: both names get the shared matrix's gradient
    _, tied = obj.gradient({**state, "lm_head.weight": state["model.embed_tokens.weight"]})
    assert set(tied) == set(state) | {"lm_head.weight"}
    torch.testing.assert_close(tied["lm_head.weight"], grads["model.embed_tokens.weight"])
    torch.testing.assert_close(tied["model.embed_tokens.weight"], grads["model.embed_tokens.weight"])


def test_fw_search_on_the_lm_suite(lm_zoo, tmp_path) -> None:
    import yaml
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from mergelab import cli

    zoo, cache = lm_zoo
    recipe, space = tmp_path / "recipe.yaml", tmp_path / "space.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": str(zoo.base_dir),
                "models": [{"model": str(zoo.expert_model_dir(t))} for t in zoo.tasks],
                "parameters": {"lambda": 1.0},
            }
        )
    )
    space.write_text(yaml.safe_dump({"algorithms": {"fw": {"max_iters": 2}}}))
    out = tmp_path / "fw"
    options = ["zoo=tiny", f"cache={cache}", "proxy_limit=4", "limit=4"]
    args = ["search", str(recipe), "--space", str(space), "--objective", "lm:validation", "--algorithm", "fw"]
    args += [x for o in options for x in ("--objective-option", o)]
    res = CliRunner().invoke(cli.app, [*args, "--executor", "inline", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    trials = json.loads((out / "trials.json").read_text())
    assert [r["key"] for r in trials] == ["fw/0", "fw/1"]
    assert all(math.isfinite(r["loss"]) and r["chosen"]["kept"] == 0 for r in trials)  # every tensor has a gradient
    merged = load_file(str(out / "fw" / "merged.safetensors"))
    assert set(merged) == set(load_file(str(zoo.base_dir / "model.safetensors")))
    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert best["models"][0]["model"].endswith("merged.safetensors")
    assert math.isfinite(_lm_objective(cache, limit="4").evaluate(merged).score)


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
