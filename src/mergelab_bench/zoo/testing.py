"""Tiny stand-ins for tests: a random-init BERT backbone, fixture sources, a two-task zoo.

Nothing here downloads or reads system packages; everything is written under a directory the
caller gives. Used by mergelab's own tests and usable by anyone testing code that takes a
:class:`~mergelab_bench.zoo.build.Zoo`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from mergelab_bench.zoo.backbone import Head
from mergelab_bench.zoo.sources import ARCHIVES, AptIndex
from mergelab_bench.zoo.tasks import Row, SplitConfig, TaskSpec, build_task

TINY_WORDS: tuple[str, ...] = (
    "red", "blue", "green", "cat", "dog", "bird", "runs", "sleeps", "sings", "big", "small",
    "the", "a", "very", "not", "happy", "sad", "fast", "slow", "old", "new",
)  # fmt: skip


def write_tiny_backbone(path: Path, *, seed: int = 0, hidden: int = 16, layers: int = 2) -> Path:
    """A random-init BERT encoder + word-level tokenizer over :data:`TINY_WORDS`, saved as HF files."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    vocab_list = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_WORDS]
    vocab = {w: i for i, w in enumerate(vocab_list)}
    try:
        tokenizer = BertTokenizer(vocab=vocab)
    except TypeError:  # transformers 4.x takes a vocab file
        (path / "vocab.txt").write_text("\n".join(vocab_list) + "\n")
        tokenizer = BertTokenizer(vocab_file=str(path / "vocab.txt"))
    tokenizer.save_pretrained(path)
    config = BertConfig(
        vocab_size=len(vocab_list),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    model.save_pretrained(path, safe_serialization=True)
    return path


def perturbed_copy(src: Path, dst: Path, *, scale: float, seed: int, skip: Sequence[str] = ("embeddings.",)) -> Path:
    """``src`` with Gaussian noise of std ``scale`` added to every parameter not under ``skip``."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(src), local_files_only=True)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith(tuple(skip)):
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(dst, safe_serialization=True)
    return dst


def random_head(in_features: int, labels: list[str], task: str, seed: int) -> Head:
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, len(labels))
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen))
        linear.bias.copy_(torch.randn(linear.bias.shape, generator=gen) * 0.1)
    return Head(linear, labels, task)


def synthetic_rows(task: str, n: int, labels: Sequence[str], seed: int = 0) -> list[Row]:
    """``n`` distinct word sequences from :data:`TINY_WORDS` with hash-derived labels."""
    rows: list[Row] = []
    i = 0
    while len(rows) < n:
        h = hashlib.sha256(f"{task}/{seed}/{i}".encode()).digest()
        words = [TINY_WORDS[b % len(TINY_WORDS)] for b in h[: 3 + h[0] % 5]]
        rows.append(Row(f"{task}:{i}", " ".join(words), labels[h[-1] % len(labels)]))
        i += 1
    return rows


def write_task(
    root: Path, name: str, rows: Iterable[Row], labels: Sequence[str], *, cfg: SplitConfig | None = None
) -> Path:
    """Build a task directory from given rows (through the same finalize step as real tasks)."""
    rows = list(rows)
    spec = TaskSpec(
        name=name, description=f"fixture task {name}", labels=tuple(labels), salt=name, collect=lambda _r: rows
    )
    out = root / name
    build_task(spec, FixtureSources(root / "_no_sources"), out, cfg or SplitConfig(validation=0.2, test=0.3))
    return out


def write_tiny_zoo(root: Path, *, n_rows: int = 60, seed: int = 0) -> Path:
    """A two-task zoo (``alpha``: 2 labels, ``beta``: 3 labels) with perturbed-base experts.

    Returns the manifest path; open it with :class:`mergelab_bench.zoo.build.Zoo`.
    """
    from mergelab_bench.zoo.build import write_manifest

    base = write_tiny_backbone(root / "base", seed=seed)
    tasks = {"alpha": ["no", "yes"], "beta": ["x", "y", "z"]}
    entries = {}
    for i, (task, labels) in enumerate(tasks.items()):
        data = write_task(root / "data", task, synthetic_rows(task, n_rows, labels, seed), labels)
        expert = root / "experts" / task
        perturbed_copy(base, expert / "model", scale=0.05, seed=seed + 10 + i)
        hidden = 16
        random_head(hidden, labels, task, seed + 20 + i).save(expert / "head.safetensors")
        random_head(hidden, labels, task, seed + 30 + i).save(expert / "probe.safetensors")
        entries[task] = (data, expert)
    return write_manifest(root / "zoo", name="tiny", base_dir=base, tasks=entries, max_len=16, key="tiny")


class FixtureSources:
    """A :class:`~mergelab_bench.zoo.sources.SourceReader` over fixture files.

    ``packages`` maps a Debian package name to the directory holding its files (every
    regular file under it belongs to the package); ``archives`` maps an archive name to a
    file; ``apt`` gives the index texts.
    """

    def __init__(
        self,
        root: Path,
        packages: dict[str, Path] | None = None,
        archives: dict[str, Path] | None = None,
        apt: AptIndex | None = None,
    ) -> None:
        self.root = root
        self.packages = dict(packages or {})
        self.archives = dict(archives or {})
        self.apt = apt

    def deb_files(self, package: str) -> list[Path]:
        d = self.packages[package]
        return sorted(p for p in d.rglob("*") if p.is_file() and not p.is_symlink())

    def deb_version(self, package: str) -> str:
        return "fixture"

    def archive(self, name: str) -> Path:
        return self.archives[name]

    def apt_index(self) -> AptIndex:
        if self.apt is None:
            raise KeyError("no apt index in this fixture")
        return self.apt

    def fingerprint(self, deb: Sequence[str], archives: Sequence[str], apt: bool) -> dict[str, str]:
        fp = {}
        for p in deb:
            digest = hashlib.sha256()
            for f in self.deb_files(p):
                digest.update(f.relative_to(self.packages[p]).as_posix().encode() + b"\0" + f.read_bytes())
            fp[f"deb:{p}"] = "fixture:" + digest.hexdigest()[:16]
        for name in archives:
            fp[f"archive:{name}"] = "sha256:" + hashlib.sha256(self.archives[name].read_bytes()).hexdigest()
            assert name in ARCHIVES
        if apt:
            idx = self.apt_index()
            fp["apt:index"] = "sha256:" + hashlib.sha256((idx.packages + idx.translations).encode()).hexdigest()
        return fp
