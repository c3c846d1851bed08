"""lm-eval-harness adapter: a tiny random Llama + offline tokenizer scored on a local JSONL task.

The metric lm-eval reports is checked against log-likelihood scoring done here with the model
directly, on gold labels chosen so that exactly 4 of 6 answers are the model's own argmax.
Everything is local: no hub, no dataset download.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

if os.environ.get("CI"):  # CI installs the test extra, which has lm-eval: a missing one is an error there
    import accelerate  # noqa: F401  (lm-eval's HF model needs it)
    import lm_eval  # noqa: F401
else:
    pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[test]' (the test extra has it)")
    pytest.importorskip("accelerate", reason="accelerate is not installed: pip install -e '.[test]'")

import torch
import typer
import yaml
from typer.testing import CliRunner

from mergelab_bench.eval import commands
from mergelab_bench.eval.lm_eval_adapter import LmEvalError, run_lm_eval

TASK = "mergelab_tiny_mc"
QUESTIONS = [
    ("the cat sat on the", ["mat", "red car", "blue sky above"]),
    ("a dog likes to eat", ["bones", "green apples", "cold soup today"]),
    ("birds fly over the", ["sea", "tall mountain", "old stone bridge"]),
    ("we drink hot", ["tea", "black coffee", "milk with honey"]),
    ("the sun rises in the", ["east", "early morning", "cold winter sky"]),
    ("children play in the", ["park", "green garden", "school yard today"]),
]
N_RIGHT = 4  # the first N_RIGHT gold labels are the model's own argmax, the others are not


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [q + " " + c for q, choices in QUESTIONS for c in choices]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    ctx = tok(context, add_special_tokens=False).input_ids
    cont = tok(continuation, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = model(torch.tensor([ctx + cont])).logits.float().log_softmax(-1)[0]
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A saved tiny Llama + tokenizer, a task folder, and the expected accuracies."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lmeval")
    tok = _tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model_dir = root / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)

    rows, right, right_norm = [], [], []
    for i, (question, choices) in enumerate(QUESTIONS):
        lls = torch.tensor([_loglikelihood(model, tok, question, " " + c) for c in choices])
        pred = int(lls.argmax())
        label = pred if i < N_RIGHT else (pred + 1) % len(choices)
        pred_norm = int((lls / torch.tensor([float(len(c)) for c in choices])).argmax())
        rows.append({"question": question, "choices": choices, "label": label})
        right.append(pred == label)
        right_norm.append(pred_norm == label)

    task_dir = root / "tasks"
    task_dir.mkdir()
    data = root / "data" / "test.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {
        "task": TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(root / "datasets-cache")},
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": 1.0},
    }
    (task_dir / f"{TASK}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return {
        "model_dir": model_dir,
        "task_dir": task_dir,
        "model": model,
        "tokenizer": tok,
        "acc": sum(right) / len(right),
        "acc_norm": sum(right_norm) / len(right_norm),
        "right": right,
    }


def test_lm_eval_scores_match_direct_loglikelihood(tiny_lm: dict) -> None:
    out = run_lm_eval(tiny_lm["model_dir"], [TASK], include_path=tiny_lm["task_dir"], batch_size=4)
    entry = out["tasks"][TASK]
    assert entry["n"] == len(QUESTIONS) and entry["num_fewshot"] == 0
    assert tiny_lm["acc"] == pytest.approx(N_RIGHT / len(QUESTIONS))
    assert entry["metrics"]["acc"] == pytest.approx(tiny_lm["acc"])
    assert entry["metrics"]["acc_norm"] == pytest.approx(tiny_lm["acc_norm"])
    assert entry["stderr"]["acc"] is not None and entry["stderr"]["acc"] > 0
    json.dumps(out)  # JSON-ready


def test_lm_eval_with_a_loaded_model(tiny_lm: dict) -> None:
    out = run_lm_eval(
        tiny_lm["model"], [TASK], tokenizer=tiny_lm["tokenizer"], include_path=tiny_lm["task_dir"], limit=3
    )
    entry = out["tasks"][TASK]
    assert entry["n"] == 3 and entry["n_total"] == len(QUESTIONS)
    assert entry["metrics"]["acc"] == pytest.approx(sum(tiny_lm["right"][:3]) / 3)


def test_eval_command_lm_eval_writes_json(tiny_lm: dict, tmp_path: Path) -> None:
    app = typer.Typer()
    app.command("eval")(commands.eval_command)
    app.command("noop")(lambda: None)  # two commands: "eval" stays a subcommand
    out = tmp_path / "lmeval.json"
    res = CliRunner().invoke(
        app,
        [
            "eval", str(tiny_lm["model_dir"]), "--lm-eval-tasks", TASK, "--lm-eval-include", str(tiny_lm["task_dir"]),
            "--json", str(out), "--threads", "1",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert data["harness"] == "lm-eval"
    assert data["tasks"][TASK]["metrics"]["acc"] == pytest.approx(tiny_lm["acc"])
    assert TASK in res.output and "acc_norm" in res.output


def test_unknown_task_and_bad_folder_are_one_line_errors(tiny_lm: dict, tmp_path: Path) -> None:
    with pytest.raises(LmEvalError, match="unknown lm-eval task.*nope.*" + TASK):
        run_lm_eval(tiny_lm["model_dir"], ["nope"], include_path=tiny_lm["task_dir"])
    with pytest.raises(LmEvalError, match=r"no config\.json"):
        run_lm_eval(tmp_path, [TASK], include_path=tiny_lm["task_dir"])


def test_missing_lm_eval_names_the_extra(monkeypatch: pytest.MonkeyPatch, tiny_lm: dict) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(LmEvalError, match=r'pip install -e "\.\[lmeval\]"') as info:
        run_lm_eval(tiny_lm["model_dir"], [TASK], include_path=tiny_lm["task_dir"])
    assert "\n" not in str(info.value)


def test_the_lm_eval_search_objective_scores_a_merged_state_dict(tiny_lm: dict) -> None:
    """``mergelab search --objective lm-eval:TASK``: the merge written with the base's config and
    tokenizer, scored by lm-eval, its accuracy the trial's score."""
    from mergelab.search.objective import ObjectiveContext
    from mergelab_bench.eval.objectives import LMEvalObjective

    context = ObjectiveContext({"base_model": str(tiny_lm["model_dir"])}, "cpu", {"include": str(tiny_lm["task_dir"])})
    objective = LMEvalObjective(TASK, context)
    scores = objective.evaluate(tiny_lm["model"].state_dict())
    assert scores.score == pytest.approx(tiny_lm["acc"]) and scores.tasks == {TASK: pytest.approx(tiny_lm["acc"])}
    assert scores.kinds == {TASK: "accuracy"}
