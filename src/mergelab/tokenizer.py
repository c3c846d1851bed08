"""Output tokenizers: ``tokenizer_source`` / ``tokenizer:`` and ``chat_template`` (mergekit's recipe keys).

``tokenizer_source`` picks the output vocabulary, and every vocabulary tensor (input embedding,
output head) of every input is gathered into that vocabulary's order *by token string* before the
method sees it (an :class:`mergelab.ir.VocabAlign` on the job, so every executor does the same):

* ``base``: the base's tokenizer (tokens with an id at or past the base's ``vocab_size`` dropped);
  an expert's extra tokens are dropped, a token an expert lacks takes its default embedding.
* ``union``: the base's vocabulary, then every token of the other models it lacks (in recipe
  order, each model's tokens by id), then their added tokens.
* ``model:<path>`` (or a plain path): that folder's tokenizer; the folder needs tokenizer files
  only, no weights.

A token that some input lacks takes a *default embedding*, the same for every input that lacks it
(so a model that lacks a token contributes no task vector for it): the only model that has it, else
the base's row when the base has it, else the mean of the rows of the models that have it, else
zeros. The ``tokenizer:`` block (``source``, ``tokens``, ``pad_to_multiple_of``) sets a token's
default explicitly (``source: <model>``, ``{kind: model_token, model, token | token_id}``,
``{kind: zero}``; ``force: true`` uses it in every model), adds the listed tokens to the
tokenizer, and pads the vocabulary to a multiple (padding rows: the mean of the aligned rows).
These are mergekit 0.1.5's rules (its ``tokenizer/build.py`` and ``tokenizer/embed.py``).

The output's ``config.json`` gets the output vocabulary size; the tokenizer is written with
transformers' ``save_pretrained`` (transformers 5 writes a chat template to ``chat_template.jinja``).
Everything here runs at plan time from tokenizer files and headers: no tensor data is read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator

from mergelab.errors import PlanError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files that make up a tokenizer in a Hugging Face folder (replaced as a whole when one is written)."""

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")


# --- recipe schema ------------------------------------------------------------------------


class ModelTokenEmbedding(BaseModel):
    """A token's default embedding: the row of ``token`` (or ``token_id``) in ``model``'s own vocabulary."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["model_token"]
    model: str
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenEmbedding:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("give exactly one of token_id or token")
        return self


class ZeroEmbedding(BaseModel):
    """A token's default embedding: zeros."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["zero"]


class TokenEmbedding(BaseModel):
    """``tokenizer.tokens.<token>``: where the token's default embedding comes from; ``force``: use it everywhere."""

    model_config = ConfigDict(extra="forbid")
    source: ModelTokenEmbedding | ZeroEmbedding | str | None = None
    force: bool = False


class TokenizerSettings(BaseModel):
    """mergekit's ``tokenizer:`` block: ``source`` (``union`` by default), ``tokens``, ``pad_to_multiple_of``."""

    model_config = ConfigDict(extra="forbid")
    source: str = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None

    @model_validator(mode="after")
    def _check(self) -> TokenizerSettings:
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise ValueError("pad_to_multiple_of must be a positive integer")
        self.source = normalize_source(self.source)
        return self


def normalize_source(value: str) -> str:
    """``model:<path>`` -> ``<path>``; ``base`` / ``union`` unchanged."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("tokenizer_source must be base, union, or model:<path>")
    return value[len("model:") :] if value.startswith("model:") else value


# --- chat templates -----------------------------------------------------------------------

# mergelab's own Jinja text for the template names mergekit bundles (same conversation formats).
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}"
        "{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else none %}"
        "{% set turns = messages[1:] if system is not none else messages %}"
        "{{ bos_token }}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate user/assistant after an optional system message') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system is not none %}"
        "{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('only user and assistant roles, after an optional system message') }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    "alpaca": (
        "{% set systems = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{% if systems %}{{ systems[-1]['content'] | trim + '\\n\\n' }}{% endif %}"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim }}"
        "{% elif message['role'] == 'user_context' %}{{ '### Input:\\n' + message['content'] | trim }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] | trim }}"
        "{% endif %}"
        "{% if message['role'] != 'system' and not loop.last %}{{ '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}{{ '\\n\\n### Response:\\n' }}"
        "{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def check_chat_template(value: str | None) -> None:
    """Recipe-time check of ``chat_template``: ``auto``, a bundled name, or Jinja text (mergekit's rule)."""
    if value is None or value == "auto" or value in CHAT_TEMPLATES:
        return
    if "{" not in value or len(value) < 20:
        raise ValueError(
            f"chat_template {value[:40]!r}: not a template; give `auto` (the inputs' most common template), "
            f"one of {', '.join(sorted(CHAT_TEMPLATES))}, or the Jinja template text"
        )


# --- loading ------------------------------------------------------------------------------


def has_tokenizer_files(folder: Path | None) -> bool:
    return folder is not None and folder.is_dir() and any((folder / n).is_file() for n in TOKENIZER_MARKERS)


def load_tokenizer(folder: Path | str, what: str) -> Any:
    """transformers' AutoTokenizer for ``folder`` (offline), or a one-line :class:`PlanError`."""
    folder = Path(folder)
    if not folder.exists():
        raise PlanError(f"{what} {folder}: no such folder; give base, union, or the path of a tokenizer folder")
    if not has_tokenizer_files(folder):
        raise PlanError(
            f"{what} {folder}: no tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model, "
            "vocab.txt or vocab.json): point it at a folder saved with save_pretrained"
        )
    try:
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)
    except Exception as exc:  # transformers raises many kinds (OSError, ValueError, JSON errors ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise PlanError(f"{what} {folder}: transformers cannot load its tokenizer ({first})") from None


def _vocab_size(reader: Any, embed_rows: int | None) -> int | None:
    cfg = reader.config() or {}
    for c in (cfg, cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None):
        if c and isinstance(c.get("vocab_size"), int):
            return int(c["vocab_size"])
    return embed_rows


def _stripped(tok: Any, vocab_size: int | None) -> Any:
    """The tokenizer without tokens whose id is at or past the model's ``vocab_size`` (BPE or added tokens)."""
    if vocab_size is None or all(i < vocab_size for i in tok.get_vocab().values()):
        return tok
    import json

    from tokenizers import Tokenizer

    data = json.loads(tok.backend_tokenizer.to_str())
    model = data.get("model", {})
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    was_added = {e["content"] for e in data.get("added_tokens", [])}
    data["added_tokens"] = [e for e in data.get("added_tokens", []) if e["id"] < vocab_size]
    if isinstance(model.get("vocab"), dict):
        model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in unused}
        if "merges" in model:

            def keep(m: Any) -> bool:
                parts = m.split(" ") if isinstance(m, str) else list(m)
                return not any(p in unused for p in parts)

            model["merges"] = [m for m in model["merges"] if keep(m)]
    elif unused - was_added:
        raise PlanError(
            f"tokenizer_source: the base tokenizer has {len(unused)} tokens past its vocab_size {vocab_size} and is "
            f"of type {model.get('type')}; only BPE and word-level tokenizers can be stripped"
        )
    tok._tokenizer = Tokenizer.from_str(json.dumps(data))
    return tok


# --- the vocabulary plan ------------------------------------------------------------------


@dataclass
class InputVocab:
    """One merged input's tokenizer view: its label, recipe reference, vocabulary and size."""

    label: str
    ref: str
    vocab: dict[str, int]
    vocab_size: int


@dataclass
class OutputTokenizer:
    """The output tokenizer of a plan and how each input's rows map into it."""

    tokenizer: Any
    vocab: dict[str, int]
    rows: int  # output vocabulary rows (len(vocab), padded to pad_to_multiple_of)
    index: list[torch.Tensor] = field(default_factory=list)  # per merged input
    fill_rows: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    fill_src: list[torch.Tensor] = field(default_factory=list)
    identity: bool = False  # every input already in the output order with exactly ``rows`` rows
    source: str = "base"
    chat_template: str | None = None
    warnings: list[str] = field(default_factory=list)

    def save(self, folder: Path) -> None:
        """Write the tokenizer (and chat template) into ``folder``, replacing any tokenizer files there."""
        for name in TOKENIZER_FILES:
            (folder / name).unlink(missing_ok=True)
        if self.chat_template is not None:
            self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(str(folder))


def resolve_chat_template(value: str | None, tokenizers: Sequence[Any]) -> str | None:
    """The template text for ``chat_template`` (``auto``: the most common among the inputs' tokenizers)."""
    if value is None:
        return None
    if value == "auto":
        found = []
        for tok in tokenizers:
            t = getattr(tok, "chat_template", None)
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    return CHAT_TEMPLATES.get(value, value)


def plan_vocabulary(
    recipe: Any,
    inputs: Sequence[tuple[str, Any]],
    base_pos: int | None,
    reference: Any,
    embed_rows: Mapping[int, int],
) -> OutputTokenizer | None:
    """Build the output tokenizer and per-input row maps, or None when the recipe sets no tokenizer.

    ``inputs``: the merged inputs (recipe reference, reader) in job-input order; ``base_pos`` the
    base's position among them (None when the method does not read it); ``reference`` the reader
    whose tokenizer stands in for the base; ``embed_rows`` the stored vocabulary rows per input.
    """
    settings: TokenizerSettings | None = recipe.tokenizer
    source = recipe.tokenizer_source
    if settings is not None:
        source = settings.source
    if source is None:
        return None
    source = normalize_source(source)
    token_cfg = dict(settings.tokens or {}) if settings is not None else {}
    pad = settings.pad_to_multiple_of if settings is not None else None
    warnings: list[str] = []

    if reference.folder is None or not has_tokenizer_files(reference.folder):
        raise PlanError(
            f"{reference.label}: tokenizer_source {source} needs the base's tokenizer, but the folder has no tokenizer "
            "files; copy them in, or give tokenizer_source: <folder with the tokenizer>"
        )
    ref_pos = next((i for i, (_, r) in enumerate(inputs) if r is reference), None)
    ref_rows = embed_rows.get(ref_pos) if ref_pos is not None else None
    base_tok = _stripped(load_tokenizer(reference.folder, "tokenizer of"), _vocab_size(reference, ref_rows))

    views: list[InputVocab] = []
    toks: list[Any] = []
    for pos, (ref, r) in enumerate(inputs):
        if r is reference:
            tok = base_tok
        elif has_tokenizer_files(r.folder):
            tok = load_tokenizer(r.folder, "tokenizer of")
        else:
            warnings.append(f"{r.label}: no tokenizer files; its vocabulary is taken to be {reference.label}'s")
            tok = base_tok
        toks.append(tok)
        vs = _vocab_size(r, embed_rows.get(pos)) or len(tok.get_vocab())
        views.append(InputVocab(r.label, ref, dict(tok.get_vocab()), vs))

    if source == "base":
        out_tok = base_tok
    elif source == "union":
        out_tok = _union(base_tok, toks, views, warnings)
    else:
        out_tok = load_tokenizer(source, "tokenizer_source")
    existing = set(out_tok.get_vocab())
    for t in token_cfg:
        if t not in existing:
            out_tok.add_tokens(t)
            existing.add(t)
    out_vocab = dict(out_tok.get_vocab())
    n = len(out_vocab)
    rows = n if not pad or n % pad == 0 else (n // pad + 1) * pad

    # index[i][row] = the input's own row of that token, or -1
    ordered = sorted(out_vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in ordered] != list(range(n)):
        raise PlanError(f"tokenizer_source {source}: the output tokenizer's ids are not 0..{n - 1}")
    index: list[torch.Tensor] = []
    for v in views:
        idx = [v.vocab.get(tok, -1) for tok, _ in ordered]
        index.append(torch.tensor([i if 0 <= i < v.vocab_size else -1 for i in idx], dtype=torch.long))

    ref_of = {ref: pos for pos, (ref, _) in reversed(list(enumerate(inputs)))}
    fill_rows: list[int] = []
    fill_src: list[list[int]] = [[] for _ in views]
    everywhere = (torch.stack(index) >= 0).all(dim=0) if index else torch.ones(n, dtype=torch.bool)
    need = set((~everywhere).nonzero().flatten().tolist())
    need |= {out_vocab[t] for t, c in token_cfg.items() if c.force and t in out_vocab}
    for tok, row in ordered:
        if row not in need:  # every input has the token (and no recipe forces it): its own rows
            continue
        cfg = token_cfg.get(tok)
        src = [-1] * len(views)
        if cfg is not None and cfg.source is not None:
            s = cfg.source
            if isinstance(s, ZeroEmbedding):
                pass
            else:
                mref = s.model if isinstance(s, ModelTokenEmbedding) else s
                pos = _input_pos(mref, ref_of, tok)
                if isinstance(s, ModelTokenEmbedding):
                    tid = s.token_id if s.token_id is not None else views[pos].vocab.get(s.token or "", -1)
                    if not 0 <= tid < min(views[pos].vocab_size, embed_rows.get(pos, views[pos].vocab_size)):
                        raise PlanError(
                            f"tokenizer.tokens.{tok}: {views[pos].label} has no token "
                            f"{s.token if s.token is not None else s.token_id!r}"
                        )
                    src[pos] = tid
                else:
                    if int(index[pos][row]) < 0:
                        raise PlanError(f"tokenizer.tokens.{tok}: {views[pos].label} has no token {tok!r}")
                    src[pos] = int(index[pos][row])
        else:  # mergekit's automatic rule (also for a listed token without a source)
            src = _auto_sources(index, row, base_pos, tok, warnings)
        if cfg is not None and cfg.force:
            for ix in index:
                ix[row] = -1
        fill_rows.append(row)
        for i, s_ in enumerate(src):
            fill_src[i].append(s_)

    identity = rows == n and all(
        torch.equal(ix, torch.arange(n)) and embed_rows.get(pos) == n for pos, ix in enumerate(index)
    )
    chat = resolve_chat_template(recipe.chat_template, toks)
    return OutputTokenizer(
        tokenizer=out_tok,
        vocab=out_vocab,
        rows=rows,
        index=index,
        fill_rows=torch.tensor(fill_rows, dtype=torch.long),
        fill_src=[torch.tensor(s, dtype=torch.long) for s in fill_src],
        identity=identity,
        source=source,
        chat_template=chat,
        warnings=warnings,
    )


def plan_chat_template_only(recipe: Any, inputs: Sequence[tuple[str, Any]], reference: Any) -> OutputTokenizer | None:
    """``chat_template`` without ``tokenizer_source``: the reference's tokenizer rewritten with the template.

    None when the reference has no tokenizer files (the template is then written alone, as
    ``chat_template.jinja``) or when ``auto`` finds no template among the inputs.
    """
    if recipe.chat_template is None or not has_tokenizer_files(reference.folder):
        return None
    ref_tok = load_tokenizer(reference.folder, "tokenizer of")
    toks = [ref_tok]
    if recipe.chat_template == "auto":
        toks += [
            load_tokenizer(r.folder, "tokenizer of")
            for _, r in inputs
            if r is not reference and has_tokenizer_files(r.folder)
        ]
    chat = resolve_chat_template(recipe.chat_template, toks)
    if chat is None:
        return None
    vocab = dict(ref_tok.get_vocab())
    return OutputTokenizer(
        tokenizer=ref_tok, vocab=vocab, rows=len(vocab), identity=True, source="copy", chat_template=chat
    )


def _input_pos(mref: str, ref_of: Mapping[str, int], tok: str) -> int:
    key = normalize_source(mref)
    if key in ref_of:
        return ref_of[key]
    for ref, pos in ref_of.items():
        if Path(ref).resolve() == Path(key).resolve():
            return pos
    raise PlanError(
        f"tokenizer.tokens.{tok}: source model {mref!r} is not one of the merged models ({', '.join(ref_of)})"
    )


def _auto_sources(
    index: Sequence[torch.Tensor], row: int, base_pos: int | None, tok: str, warnings: list[str]
) -> list[int]:
    """mergekit's default for a token some input lacks: the only holder, else the base, else all holders."""
    have = [int(ix[row]) for ix in index]
    holders = [i for i, h in enumerate(have) if h >= 0]
    src = [-1] * len(index)
    if len(holders) == 1:
        src[holders[0]] = have[holders[0]]
    elif not holders:
        warnings.append(f"token {tok!r} is in no input's vocabulary: its rows are zeros")
    elif base_pos is not None and have[base_pos] >= 0:
        src[base_pos] = have[base_pos]
    else:
        for i in holders:
            src[i] = have[i]
    return src


def _union(base_tok: Any, toks: Sequence[Any], views: Sequence[InputVocab], warnings: list[str]) -> Any:
    """The base's tokenizer plus every other token of the inputs (recipe order; each model's tokens by id)."""
    import tempfile

    from transformers import AutoTokenizer

    new_plain: dict[str, None] = {}
    new_added: dict[str, Any] = {}
    for tok, v in zip(toks, views):
        added = {info.content: info for i, info in tok.added_tokens_decoder.items() if i < v.vocab_size}
        for t, i in sorted(v.vocab.items(), key=lambda kv: kv[1]):
            if i >= v.vocab_size:
                warnings.append(f"{v.label}: token {t!r} has id {i} past its vocab_size {v.vocab_size}: left out")
                continue
            if t in added:
                if t in new_added and str(new_added[t]) != str(added[t]):
                    warnings.append(f"token {t!r} is added with different settings; the first model's are kept")
                new_added.setdefault(t, added[t])
            else:
                new_plain.setdefault(t, None)
    with tempfile.TemporaryDirectory(prefix="mergelab-tok-") as tmp:  # a copy: the base's tokenizer is reused
        base_tok.save_pretrained(tmp)
        out = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    base_vocab = base_tok.get_vocab()
    for t in new_plain:
        if t not in new_added and t not in base_vocab:
            out.add_tokens(t)
    for info in new_added.values():
        out.add_tokens(info)
    return out


def update_config_vocab(config: dict[str, Any], rows: int) -> None:
    """Set the vocabulary size of a config.json dict (``text_config`` too when it holds one)."""
    if isinstance(config.get("text_config"), dict) and "vocab_size" in config["text_config"]:
        config["text_config"]["vocab_size"] = rows
    if "vocab_size" in config or not isinstance(config.get("text_config"), dict):
        config["vocab_size"] = rows
