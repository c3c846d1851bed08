"""Tiny stand-ins for tests of the LM suite: a random-init Llama, a byte-level BPE tokenizer,
and fixture sources laid out like the Debian packages the domains read.

Nothing here downloads anything or reads system packages; everything is written under a
directory the caller gives, in well under a second.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from mergelab_bench.zoo.sources import AptIndex
from mergelab_bench.zoo.testing import FixtureSources

TINY_CORPUS: tuple[str, ...] = (
    "def f(x):\n    return x + 1\n",
    "func main() { fmt.Println(42) }\n",
    "Wer anderen eine Grube gräbt, fällt selbst hinein.",
    "Chi va piano va sano e va lontano.",
    "Question: What is 12 + 30?\nAnswer: 42",
    "a text-based mail reader with MIME support",
)


def write_tiny_tokenizer(path: Path, corpus: Iterable[str] = TINY_CORPUS, vocab_size: int = 320):
    """A byte-level BPE tokenizer (any text encodes) trained on ``corpus``, saved as an HF tokenizer.

    Special tokens: ``<|endoftext|>`` (EOS, the document token) and ``<pad>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return fast


def write_tiny_causal_lm(path: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """A random-init ``LlamaForCausalLM`` with tied embeddings + :func:`write_tiny_tokenizer`, saved as HF files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = write_tiny_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init: predictions are far from ties
        model.get_input_embeddings().weight.normal_(0.0, 0.5)
    model.save_pretrained(path, safe_serialization=True)
    return path


# --------------------------------------------------------------------------------------------
# Fixture sources


def _python_file(j: int, n: int = 80) -> str:
    body = [f"# module {j}: generated for tests", "import os", ""]
    for i in range(n):
        body.append(f"def helper_{j}_{i}(value, scale={i % 7}):" if i % 4 == 0 else f"    value = value * {i} + {j}")
        if i % 4 == 3:
            body.append("    return os.fspath(str(value))")
    return "\n".join(body) + "\n"


def _go_file(j: int, n: int = 80) -> str:
    body = [f"// Package p{j} is generated for tests.", f"package p{j}", "", 'import "fmt"', ""]
    for i in range(n):
        body.append(f"func h{j}x{i}(v int) int {{ return v*{i} + {j} }}")
    return "\n".join(body) + "\n"


_DE_WORDS = ("Wer", "anderen", "eine", "Grube", "gräbt", "fällt", "selbst", "hinein", "Morgenstund", "Gold", "Mund")
_IT_WORDS = ("Chi", "va", "piano", "sano", "lontano", "tempo", "denaro", "amico", "casa", "vino", "pane")


def _cookies(words: tuple[str, ...], start: int, n: int) -> str:
    out = []
    for i in range(start, start + n):
        picked = [words[(i * k + k) % len(words)] for k in range(1, 6 + i % 4)]
        out.append(" ".join(picked) + f", sagt Nummer {i}.")
    return "\n%\n".join(out) + "\n%\n"


def write_lm_sources(root: Path) -> FixtureSources:
    """Fixture packages for every LM domain (python, go, german, italian, debian)."""
    packages: dict[str, Path] = {}
    py = root / "libpython3.11-stdlib" / "usr/lib/python3.11"
    (py / "test").mkdir(parents=True)
    for j in range(40):
        (py / f"mod{j}.py").write_text(_python_file(j))
    (py / "test" / "test_mod.py").write_text(_python_file(99))  # tests are excluded
    (py / "README.txt").write_text("not python")
    packages["libpython3.11-stdlib"] = root / "libpython3.11-stdlib"
    (root / "libpython3.11-minimal").mkdir()
    packages["libpython3.11-minimal"] = root / "libpython3.11-minimal"

    go = root / "golang-1.19-src" / "usr/share/go-1.19/src"
    (go / "testdata").mkdir(parents=True)
    for j in range(40):
        (go / f"p{j}.go").write_text(_go_file(j))
    (go / "p0_test.go").write_text(_go_file(98))
    (go / "testdata" / "x.go").write_text(_go_file(97))
    packages["golang-1.19-src"] = root / "golang-1.19-src"

    for package, lang, words in (("fortunes-de", "de", _DE_WORDS), ("fortunes-it", "it", _IT_WORDS)):
        d = root / package / "usr/share/games/fortunes" / lang
        d.mkdir(parents=True)
        for f in range(4):
            (d / f"file{f}").write_text(_cookies(words, 50 * f, 50))
        (d / "file0.dat").write_bytes(b"\x00binary")
        packages[package] = root / package

    pk, tr = [], []
    for i in range(60):
        pk.append(
            f"Package: pkg{i}\nVersion: 1.{i}\nDescription: tool number {i}\nDescription-md5: m{i}\nSection: utils\n"
        )
        tr.append(
            f"Package: pkg{i}\nDescription-md5: m{i}\nDescription-en: tool number {i}\n"
            f" This package provides the tool number {i} for testing.\n .\n It reads {i} files at once.\n"
        )
    apt = AptIndex("\n".join(pk), "\n".join(tr), {"release_version": "fixture"})
    return FixtureSources(root, packages, {}, apt)
