"""LM metrics: exact perplexity, greedy decoding, exact match, normalized-score arithmetic."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergelab_bench.eval.metrics import EvalReport, TaskScore, normalized_score
from mergelab_bench.zoo.lm.base import load_causal_lm, load_lm_tokenizer
from mergelab_bench.zoo.lm.scoring import (
    answer_from_generation,
    cache_keyword,
    doc_token_id,
    encode_texts,
    exact_match,
    greedy_generate,
    make_lm_batches,
    pad_token_id,
    perplexity,
)
from mergelab_bench.zoo.lm.testing import write_tiny_causal_lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    path = write_tiny_causal_lm(tmp_path_factory.mktemp("tiny_lm"))
    return load_causal_lm(path), load_lm_tokenizer(path)


TEXTS = ["def f(x):\n    return x + 1", "Chi va piano", "Question: What is 3 + 4?\nAnswer: 7", "ab"]


def test_encoding_starts_with_the_document_token(tiny) -> None:
    _, tok = tiny
    doc = doc_token_id(tok)
    assert doc == tok.convert_tokens_to_ids("<|endoftext|>")
    assert pad_token_id(tok) == tok.pad_token_id != doc
    seqs = encode_texts(tok, TEXTS, max_len=8, doc_id=doc)
    assert all(s[0] == doc and len(s) <= 8 for s in seqs)
    full = encode_texts(tok, TEXTS, max_len=10_000, doc_id=None)
    assert tok.decode(full[0]) == TEXTS[0]
    assert seqs[0][1:] == full[0][:7]


def test_perplexity_is_the_token_weighted_mean_nll(tiny) -> None:
    model, tok = tiny
    seqs = encode_texts(tok, TEXTS, max_len=24, doc_id=doc_token_id(tok))
    # direct computation: one unpadded sequence at a time, summed NLL over every predicted token
    total, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            ids = torch.tensor([s])
            logits = model(input_ids=ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += len(s) - 1
    expected = math.exp(total / count)
    for batch_size in (1, 3, 16):  # padding and batch-mates do not change the result
        ppl = perplexity(model, make_lm_batches(seqs, batch_size=batch_size, pad_id=pad_token_id(tok)))
        assert ppl.tokens == count and ppl.n == len(seqs)
        assert ppl.value == pytest.approx(expected, rel=1e-5)
        assert ppl.mean_nll == pytest.approx(total / count, rel=1e-5)


def test_perplexity_of_a_hand_checkable_model() -> None:
    class Uniform(torch.nn.Module):  # the same logits everywhere: NLL = log(vocab) per token
        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 5)})()

    batches = make_lm_batches([[0, 1, 2], [0, 3]], batch_size=2, pad_id=4)
    ppl = perplexity(Uniform(), batches)
    assert ppl.tokens == 3 and ppl.value == pytest.approx(5.0)


def _greedy_reference(model, tok, prompt: str, n: int) -> str:
    ids = encode_texts(tok, [prompt], max_len=64, doc_id=doc_token_id(tok))[0]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            if "\n" in tok.decode(out, skip_special_tokens=True):
                break
    return tok.decode(out, skip_special_tokens=True)


def test_batched_greedy_decoding_matches_one_prompt_at_a_time(tiny) -> None:
    model, tok = tiny
    prompts = ["Question: What is 12 + 30?\nAnswer:", "Chi", "def f(x):\n    return", "a text-based mail"]
    got = greedy_generate(model, tok, prompts, doc_id=doc_token_id(tok), max_new_tokens=5, batch_size=4)
    assert got == [_greedy_reference(model, tok, p, 5) for p in prompts]


def test_cache_keyword_follows_the_model_and_its_wrappers(tiny) -> None:
    """Greedy decoding passes the KV cache under the name the model's forward takes (transformers 5.25
    renamed ``past_key_values`` to ``cache``); a ``**kwargs`` wrapper answers for the model it wraps."""
    import inspect

    model, _ = tiny
    params = inspect.signature(model.forward).parameters
    assert cache_keyword(model) == ("cache" if "cache" in params else "past_key_values")

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None):
            return None

    class Wrapper(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.model = inner

        def forward(self, *args, **kwargs):
            return self.model(*args, **kwargs)

    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(Wrapper(Old())) == "past_key_values"
    assert cache_keyword(Wrapper(model)) == cache_keyword(model)
    assert cache_keyword(Wrapper(Wrapper(torch.nn.Identity()))) == "past_key_values"  # neither: the old name


def test_greedy_decoding_runs_without_autograd(tiny) -> None:
    model, tok = tiny
    seen: list[bool] = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.is_grad_enabled()))
    try:
        greedy_generate(model, tok, ["Chi"], doc_id=doc_token_id(tok), max_new_tokens=2, batch_size=1)
    finally:
        hook.remove()
    assert seen and not any(seen)


def test_exact_match_scoring() -> None:
    assert answer_from_generation(" 42\nQuestion: What") == "42"
    assert exact_match([" 42\nQ", "41", " 7 "], ["42", "42", "7"]) == pytest.approx(2 / 3)
    assert exact_match(["420"], ["42"]) == 0.0
    assert math.isnan(exact_match([], []))
    with pytest.raises(ValueError):
        exact_match(["1"], [])


def test_normalized_scores_for_both_directions() -> None:
    assert normalized_score(0.3, 0.6) == pytest.approx(0.5)
    # perplexity: expert / merged, so 1.0 = expert-level and higher is better
    assert normalized_score(20.0, 10.0, lower_is_better=True) == pytest.approx(0.5)
    assert normalized_score(8.0, 10.0, lower_is_better=True) == pytest.approx(1.25)
    assert normalized_score(math.inf, 10.0, lower_is_better=True) == 0.0
    assert normalized_score(math.nan, 10.0, lower_is_better=True) is None
    assert normalized_score(0.0, 10.0, lower_is_better=True) is None
    ppl = TaskScore("python", value=12.5, n=10, expert=10.0, metric="perplexity")
    em = TaskScore("arithmetic", value=0.2, n=10, expert=0.4, metric="exact_match")
    assert ppl.normalized == pytest.approx(0.8) and em.normalized == pytest.approx(0.5)
    report = EvalReport("m", "test", [ppl, em])
    assert report.average_normalized == pytest.approx(0.65)
    assert report.average is None  # a mean of a perplexity and a rate means nothing
    same = EvalReport("m", "test", [ppl, TaskScore("go", value=10.0, n=3, expert=10.0, metric="perplexity")])
    assert same.average == pytest.approx(11.25)
    assert EvalReport.from_dict(report.to_dict()).scores == report.scores


def test_tiny_model_has_tied_embeddings(tiny, tmp_path: Path) -> None:
    model, _ = tiny
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_plain_copy_keeps_weights_and_tying(tiny) -> None:
    from mergelab_bench.zoo.lm.base import _plain_copy

    model, _ = tiny
    copy = _plain_copy(model)
    assert copy is not model
    assert copy.get_output_embeddings().weight is copy.get_input_embeddings().weight
    for (name, a), (_, b) in zip(model.state_dict().items(), copy.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
