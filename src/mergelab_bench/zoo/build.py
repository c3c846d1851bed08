"""Building the classification zoo, and the :class:`Zoo` object that reads a built one.

``build_zoo(ZooConfig.quick())`` (or ``.full()``) does, reusing whatever is cached:

1. task data for each task (:func:`mergelab_bench.zoo.tasks.ensure_task`);
2. the pretrained backbone, re-saved once as ``models/base-<key>`` (the merge base);
3. per task, ``models/expert-<task>-<key>``: the fine-tuned encoder (``model/``, an HF
   safetensors checkpoint: the thing that gets merged), its head, the probe baseline's head,
   and ``record.json`` (hyperparameters, seed, timings, validation/test accuracy of the
   expert and of the probe). The key hashes the train config, the task data's content hash
   and the base, so experts are shared between zoos and rebuilt only when one of them changes;
4. ``zoos/<key>/manifest.json``, which names all of the above with relative paths, and a
   ``zoos/<name>.latest`` pointer so ``load_zoo("quick")`` finds the last quick build.

Cache layout under ``$MERGELAB_CACHE/zoo`` (default ``~/.cache/mergelab/zoo``)::

    sources/  data/<task>-<key>/  models/base-<key>/  models/expert-<task>-<key>/  zoos/<key>/
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergelab_bench.zoo.backbone import (
    Batch,
    Head,
    backbone_dir,
    embed_batches,
    load_encoder,
    load_tokenizer,
    make_batches,
)
from mergelab_bench.zoo.cache import config_key, file_sha256, read_json, write_json, zoo_root
from mergelab_bench.zoo.heads import TEMPERATURE, CosineHead, load_head, zero_shot_head
from mergelab_bench.zoo.sources import BACKBONE_PACKAGE, SourceReader, SystemSources
from mergelab_bench.zoo.store import BuiltZoo, ZooError, build_stamp, ensure_dir, find_manifest, point_latest, zoo_key
from mergelab_bench.zoo.tasks import ALL_TASKS, SplitConfig, TaskData, ensure_task, get_task
from mergelab_bench.zoo.train import (
    TrainConfig,
    ZeroShotTrainConfig,
    accuracy,
    select_probe,
    train_against_head,
    train_expert,
)
from mergelab_bench.zoo.training import torch_threads

MANIFEST_FORMAT = "mergelab-zoo/1"
EXPERT_FORMAT = 1

QUICK_TASKS: tuple[str, ...] = ("sentiment", "lang_id", "wordnet_pos", "code_lang")
QUICK_EVAL_LIMIT = 300
"""Validation/test rows the quick zoo scores its experts on (the demo's test limit, so the
experts' cached features serve the demo's reference rows)."""
FULL_TASKS: tuple[str, ...] = ALL_TASKS


class ZooConfig(BaseModel):
    """What a zoo is made of. Everything here is part of its content address."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("custom", description="label of the preset (quick, full) or custom")
    tasks: tuple[str, ...] = FULL_TASKS
    train: TrainConfig = TrainConfig()
    validation_frac: float = 0.1
    test_frac: float = 0.2

    @classmethod
    def quick(cls, **overrides: Any) -> ZooConfig:
        """4 tasks x 100 steps at batch 16, max length 64, 300 scored rows: the demo zoo.

        Half the full zoo's batch keeps the build to a few minutes on 2 cores (each expert
        still sees 1,600 training texts and beats its task's linear probe)."""
        base = {
            "name": "quick",
            "tasks": QUICK_TASKS,
            "train": TrainConfig(steps=100, batch_size=16, eval_limit=QUICK_EVAL_LIMIT),
        }
        return cls(**{**base, **overrides})

    @classmethod
    def full(cls, **overrides: Any) -> ZooConfig:
        """8 tasks x 300 steps, max length 64, frozen embeddings: the leaderboard zoo."""
        base = {"name": "full", "tasks": FULL_TASKS, "train": TrainConfig(steps=300, eval_limit=1000)}
        return cls(**{**base, **overrides})

    @property
    def split(self) -> SplitConfig:
        return SplitConfig(validation=self.validation_frac, test=self.test_frac)


ZS_QUICK_TASKS: tuple[str, ...] = QUICK_TASKS
VARIANTS: tuple[str, ...] = ("zeroshot", "lpft")
"""Classification zoo variants: ``zeroshot`` (fixed zero-shot task heads, the leaderboard's
default) and ``lpft`` (a head trained with each expert from its linear probe)."""


class ZeroShotZooConfig(ZooConfig):
    """The ``zeroshot`` variant: each task's head is fixed (:mod:`mergelab_bench.zoo.heads`) and each
    expert fine-tunes the whole encoder against it (task-arithmetic protocol, Ilharco et al. 2023).

    Presets are named ``zeroshot-quick`` and ``zeroshot-full``; the ``lpft`` presets keep the
    names ``quick`` and ``full`` (and their cache keys)."""

    variant: Literal["zeroshot"] = "zeroshot"
    name: str = Field("custom", description="label of the preset (zeroshot-quick, zeroshot-full) or custom")
    train: ZeroShotTrainConfig = ZeroShotTrainConfig()
    temperature: float = Field(TEMPERATURE, gt=0, description="fixed logit scale of the cosine heads")

    @classmethod
    def quick(cls, **overrides: Any) -> ZeroShotZooConfig:
        """4 tasks x 100 steps at batch 16, 300 scored rows: the demo's zoo (a few minutes on 2 cores)."""
        base = {
            "name": "zeroshot-quick",
            "tasks": ZS_QUICK_TASKS,
            "train": ZeroShotTrainConfig(steps=100, batch_size=16, eval_limit=QUICK_EVAL_LIMIT, eval_every=25),
        }
        return cls(**{**base, **overrides})

    @classmethod
    def full(cls, **overrides: Any) -> ZeroShotZooConfig:
        """8 tasks, the whole encoder against the fixed heads: the leaderboard's zoo."""
        base = {
            "name": "zeroshot-full",
            "tasks": FULL_TASKS,
            "train": ZeroShotTrainConfig(**ZS_FULL_TRAIN),
        }
        return cls(**{**base, **overrides})


ZS_FULL_TRAIN: dict[str, Any] = {"steps": 500, "eval_limit": 1000, "eval_every": 50}
"""The full zeroshot variant's first training setting (batch 32, lr 5e-5, whole encoder): 5x the
lpft zoo's examples per expert, since the quick variant's curves (100 steps of 16) were still
rising on 3 of 4 tasks. Each expert's curve and ``plateaued`` flag say whether it sufficed."""


PRESET_ZOOS: dict[str, tuple[str, str]] = {
    "zeroshot-full": ("zeroshot", "full"),
    "zeroshot-quick": ("zeroshot", "quick"),
    "full": ("lpft", "full"),
    "quick": ("lpft", "quick"),
}
"""Zoo preset names -> (variant, preset)."""
LPFT_ALIASES = {"lpft-quick": "quick", "lpft-full": "full"}


def zoo_config(variant: str, preset: str) -> ZooConfig:
    """The ``quick`` or ``full`` preset of a variant (``zeroshot`` or ``lpft``)."""
    if variant not in VARIANTS:
        raise ZooError(f"unknown zoo variant {variant!r}: use {' or '.join(VARIANTS)}")
    cls = ZeroShotZooConfig if variant == "zeroshot" else ZooConfig
    return cls.quick() if preset == "quick" else cls.full()


# --------------------------------------------------------------------------------------------
# Reading a built zoo


class Zoo(BuiltZoo):
    """A built zoo: base checkpoint, one expert (checkpoint + head) and probe head per task.

    Features (mean-pooled encoder outputs) of the base and of every expert are cached on disk
    next to the model they come from, keyed by the task data's content hash, split, row limit
    and max length; they feed the experts' own scores and the output-level ensembles.
    """

    FORMAT = MANIFEST_FORMAT
    DATA = TaskData

    def __init__(self, manifest_path: str | os.PathLike[str]) -> None:
        super().__init__(manifest_path)
        self._heads: dict[tuple[str, str], Head] = {}
        self._batches: dict[tuple[str, str, int | None], list[Batch]] = {}
        self._tokenizer = None
        self._encoders: dict[str, torch.nn.Module] = {}

    # -- paths and metadata
    @property
    def max_len(self) -> int:
        return int(self.manifest["max_len"])

    def data(self, task: str) -> TaskData:
        return super().data(task)

    @property
    def variant(self) -> str:
        """``lpft`` (a head trained with each expert) or ``zeroshot`` (each task's fixed zero-shot head)."""
        return str(self.manifest.get("variant", "lpft"))

    def head(self, task: str, kind: str = "expert") -> Head:
        """The task's head: ``expert`` (the head every encoder is scored with on the task: the expert's
        own in ``lpft``, the task's fixed zero-shot head in ``zeroshot``) or ``probe`` (on pretrained features)."""
        if kind not in ("expert", "probe"):
            raise ValueError("head kind must be 'expert' or 'probe'")
        if (task, kind) not in self._heads:
            name = "head.safetensors" if kind == "expert" else "probe.safetensors"
            entry = self.manifest["tasks"][task]
            if kind == "expert" and "head" in entry:  # zeroshot: the head belongs to the task
                self._heads[task, kind] = load_head(self._path(entry["head"]))
            else:
                self._heads[task, kind] = load_head(self.expert_dir(task) / name)
        return self._heads[task, kind]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.base_dir)
        return self._tokenizer

    # -- evaluation inputs
    def examples(self, task: str, split: str, limit: int | None) -> tuple[list[str], list[int]]:
        return self.data(task).examples(split, limit)

    def batches(self, task: str, split: str, limit: int | None, batch_size: int = 128) -> list[Batch]:
        """Tokenized, length-sorted batches of a split (memoised)."""
        key = (task, split, limit)
        if key not in self._batches:
            texts, _ = self.examples(task, split, limit)
            self._batches[key] = make_batches(self.tokenizer, texts, max_len=self.max_len, batch_size=batch_size)
        return self._batches[key]

    def model_dir(self, model: str) -> Path:
        """``base`` or an expert's task name -> its checkpoint directory."""
        return self.base_dir if model == "base" else self.expert_model_dir(model)

    def features(self, model: str, task: str, split: str, limit: int | None, encoder=None) -> torch.Tensor:
        """Pooled features of zoo model ``model`` (``base`` or a task name) on a split; disk-cached."""
        owner = self.base_dir if model == "base" else self.expert_dir(model)
        path = feature_file(owner, self.data(task), split, limit, self.max_len)
        n_rows = len(self.examples(task, split, limit)[1])
        for cached in _feature_candidates(path, limit):
            feats = torch.load(cached, weights_only=True)
            if len(feats) >= n_rows:  # rows are a prefix of the split: a longer cache covers ours
                return feats[:n_rows].clone()
        if encoder is None:
            if model not in self._encoders:
                self._encoders[model] = load_encoder(self.model_dir(model))
            encoder = self._encoders[model]
        feats = embed_batches(encoder, self.batches(task, split, limit))
        save_features(path, feats)
        return feats

    def expert_accuracy(self, task: str, split: str, limit: int | None) -> float:
        """The expert's own accuracy on its task (the normaliser of merged scores)."""
        _, labels = self.examples(task, split, limit)
        return accuracy(self.head(task)(self.features(task, task, split, limit)), labels)


def feature_file(owner: Path, data: TaskData, split: str, limit: int | None, max_len: int) -> Path:
    """Where features of the model stored in ``owner`` on a task split are cached."""
    content = data.meta["content_sha256"][:16]
    return owner / "features" / f"{data.name}-{content}-{split}-{limit or 'all'}-{max_len}.pt"


def _feature_candidates(path: Path, limit: int | None) -> list[Path]:
    """Cached feature files that cover ``limit`` rows: the exact one first, then larger limits."""
    prefix, _, rest = path.name.rpartition("-")  # rest = "<max_len>.pt"
    stem, _, _ = prefix.rpartition("-")  # drop the limit
    found: list[tuple[float, Path]] = []
    for p in path.parent.glob(f"{stem}-*-{rest}"):
        tag = p.name[len(stem) + 1 : -len(rest) - 1]
        size = float("inf") if tag == "all" else float(tag) if tag.isdigit() else -1.0
        if (limit is None and tag == "all") or (limit is not None and size >= limit):
            found.append((size, p))
    return [p for _, p in sorted(found)]


def save_features(path: Path, feats: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(feats.contiguous(), tmp)
    os.replace(tmp, path)


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def write_manifest(
    root: Path,
    *,
    name: str,
    base_dir: Path,
    tasks: dict[str, tuple[Path, Path]],
    max_len: int,
    config: dict | None = None,
    key: str = "",
    extra: dict | None = None,
) -> Path:
    """Write ``root/manifest.json`` for a base and ``{task: (data dir, expert dir)}``."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": MANIFEST_FORMAT,
        "name": name,
        "key": key,
        "max_len": max_len,
        "config": config or {},
        "base": {"path": _relative(base_dir, root)},
        "task_order": list(tasks),
        "tasks": {
            t: {
                "data": _relative(data_dir, root),
                "expert": _relative(expert_dir, root),
                "labels": TaskData.load(data_dir).labels,
                "content_sha256": TaskData.load(data_dir).meta["content_sha256"],
            }
            for t, (data_dir, expert_dir) in tasks.items()
        },
        **(extra or {}),
    }
    write_json(root / "manifest.json", manifest)
    return root / "manifest.json"


def load_zoo(spec: str | os.PathLike[str] = "quick", *, cache: str | os.PathLike[str] | None = None) -> Zoo:
    """A built zoo by preset name (``zeroshot-quick``, ``zeroshot-full``, and the ``lpft`` variant's
    ``quick``, ``full``, also spelt ``lpft-quick``, ``lpft-full``: the last build of it), directory or manifest."""
    spec = LPFT_ALIASES.get(str(spec), spec)
    manifest = find_manifest(spec, zoo_root(cache) / "zoos")
    if manifest is not None:
        return Zoo(manifest)
    variant, preset = PRESET_ZOOS.get(str(spec), ("zeroshot", "full"))
    command = "mergelab zoo build" + (" --quick" if preset == "quick" else "")
    also = " with `--variant lpft`" if variant == "lpft" else ""
    raise ZooError(f"no built zoo {str(spec)!r} under {zoo_root(cache)}: run `{command}`{also}")


# --------------------------------------------------------------------------------------------
# Building


class _Reporter:
    """Progress reporting: a rich Progress when given, else nothing."""

    def __init__(self, progress=None, echo=None) -> None:
        self.progress = progress
        self.echo = echo or (lambda msg: None)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None) -> Iterator[Any]:
        if self.progress is None:
            yield lambda *a, **k: None
            return
        tid = self.progress.add_task(description, total=total)

        def advance(completed: int | None = None, **fields: Any) -> None:
            if completed is None:
                self.progress.advance(tid)
            else:
                self.progress.update(tid, completed=completed, **fields)

        try:
            yield advance
        finally:
            self.progress.update(tid, completed=total, visible=True)
            self.progress.stop_task(tid)


def ensure_base(cache: str | os.PathLike[str] | None = None, backbone: Path | None = None) -> tuple[Path, dict]:
    """The backbone re-saved (safetensors + tokenizer) as ``models/base-<key>``.

    ``backbone`` defaults to the packaged all-MiniLM-L6-v2; tests pass a tiny one.
    """
    src = backbone or backbone_dir()
    source: dict[str, str] = {"sha256": file_sha256(src / "model.safetensors")}
    if backbone is None:
        source.update(
            package=BACKBONE_PACKAGE[0], version=BACKBONE_PACKAGE[1], model="sentence-transformers/all-MiniLM-L6-v2"
        )

    def build(tmp: Path) -> None:
        load_encoder(src).save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(src).save_pretrained(tmp)
        write_json(tmp / "source.json", source)

    return ensure_dir(zoo_root(cache) / "models" / f"base-{config_key(source)}", build, done="config.json"), source


def expert_key(cfg: ZooConfig, data: TaskData, base_key: str) -> str:
    return config_key(
        {
            "format": EXPERT_FORMAT,
            "task": data.name,
            "data": data.meta["content_sha256"],
            "base": base_key,
            "train": cfg.train.model_dump(),
        }
    )


def _score(feats: torch.Tensor | None, head: Head, labels: list[int]) -> float | None:
    return round(accuracy(head(feats), labels), 6) if labels and feats is not None else None


def _beats(a: float | None, b: float | None) -> bool | None:
    return None if a is None or b is None else a > b


def ensure_expert(
    cfg: ZooConfig,
    data: TaskData,
    base_dir: Path,
    *,
    cache: str | os.PathLike[str] | None = None,
    reporter: _Reporter | None = None,
    force: bool = False,
) -> Path:
    """Train (or reuse) the expert and probe of one task; returns the expert directory."""
    reporter = reporter or _Reporter()
    final = zoo_root(cache) / "models" / f"expert-{data.name}-{expert_key(cfg, data, base_dir.name)}"
    tc = cfg.train

    def build(tmp: Path) -> None:
        tokenizer = load_tokenizer(base_dir)
        base = load_encoder(base_dir)

        def batches(split: str, limit: int | None):
            texts, labels = data.examples(split, limit)
            return make_batches(tokenizer, texts, max_len=tc.max_len, batch_size=tc.eval_batch_size), labels

        t0 = time.perf_counter()
        with reporter.task(f"probe {data.name}", 1) as advance:
            train_b, train_y = batches("train", tc.steps * tc.batch_size)
            val_b, val_y = batches("validation", tc.eval_limit)
            base_val = embed_batches(base, val_b)
            probe, probe_l2, probe_scores = select_probe(
                (embed_batches(base, train_b), train_y), (base_val, val_y), data.labels, data.name, tc
            )
            advance(1)
        probe_s = time.perf_counter() - t0
        probe.save(tmp / "probe.safetensors")

        with reporter.task(f"train {data.name}", tc.steps) as advance:
            trained = train_expert(
                data,
                base_dir,
                tc,
                init_head=probe if tc.head_init == "probe" else None,
                progress=lambda step, total, info: advance(step),
            )
        trained.encoder.save_pretrained(tmp / "model", safe_serialization=True)
        trained.head.save(tmp / "head.safetensors")

        test_b, test_y = batches("test", tc.eval_limit)
        base_test = embed_batches(base, test_b)
        expert_val = embed_batches(trained.encoder, val_b)
        expert_test = embed_batches(trained.encoder, test_b)
        for split, owner, feats in (
            ("validation", tmp, expert_val), ("test", tmp, expert_test),
            ("validation", base_dir, base_val), ("test", base_dir, base_test),
        ):  # fmt: skip
            save_features(feature_file(owner, data, split, tc.eval_limit, tc.max_len), feats)
        scores = {
            "expert": {
                "validation": _score(expert_val, trained.head, val_y),
                "test": _score(expert_test, trained.head, test_y),
            },
            "probe": {"validation": _score(base_val, probe, val_y), "test": _score(base_test, probe, test_y)},
            "pretrained_with_expert_head": {
                "validation": _score(base_val, trained.head, val_y),
                "test": _score(base_test, trained.head, test_y),
            },
            "n": {"validation": len(val_y), "test": len(test_y)},
        }
        record = {
            **trained.record,
            "train_config": tc.model_dump(),
            "data": {k: data.meta[k] for k in ("sizes", "labels", "content_sha256", "sources")},
            "probe_seconds": round(probe_s, 2),
            "probe_train_examples": len(train_y),
            "probe_l2": probe_l2,
            "probe_validation_by_l2": probe_scores,
            "accuracy": scores,
            "eval_limit": tc.eval_limit,
            # the probe's L2 was chosen on validation, so test is the unbiased comparison
            "beats_probe": {s: _beats(scores["expert"][s], scores["probe"][s]) for s in ("validation", "test")},
            **build_stamp(),
        }
        write_json(tmp / "record.json", record)

    return ensure_dir(final, build, done="record.json", force=force)


def ensure_task_head(
    cfg: ZeroShotZooConfig,
    data: TaskData,
    base_dir: Path,
    *,
    cache: str | os.PathLike[str] | None = None,
    force: bool = False,
) -> Path:
    """The task's fixed zero-shot head, built once from the pretrained base (``models/head-<task>-<key>``).

    The folder holds ``head.safetensors`` (a :class:`~mergelab_bench.zoo.heads.CosineHead`) and
    ``record.json`` (template, prompts, temperature, and the pretrained encoder's zero-shot
    accuracy with it on the first ``eval_limit`` validation and test rows).
    """
    spec = get_task(data.name)
    prompts = spec.prompts()
    tc = cfg.train
    identity = {
        "task": data.name,
        "labels": data.labels,
        "template": spec.template,
        "prompts": prompts,
        "temperature": cfg.temperature,
        "base": base_dir.name,
        "max_len": tc.max_len,
    }
    final = zoo_root(cache) / "models" / f"head-{data.name}-{config_key(identity)}"

    def build(tmp: Path) -> None:
        tokenizer, base = load_tokenizer(base_dir), load_encoder(base_dir)
        head = zero_shot_head(
            base, tokenizer, prompts, data.labels, data.name, max_len=tc.max_len, temperature=cfg.temperature
        )
        head.save(tmp / "head.safetensors", {"template": spec.template})
        scores: dict[str, Any] = {}
        for split in ("validation", "test"):
            texts, labels = data.examples(split, tc.eval_limit)
            batches = make_batches(tokenizer, texts, max_len=tc.max_len, batch_size=tc.eval_batch_size)
            feats = embed_batches(base, batches)
            save_features(feature_file(base_dir, data, split, tc.eval_limit, tc.max_len), feats)
            scores[split] = _score(feats, head, labels)
            scores[f"n_{split}"] = len(labels)
        write_json(
            tmp / "record.json",
            {
                **identity,
                "content_sha256": data.meta["content_sha256"],
                "zero_shot_accuracy": scores,
                "chance": round(1 / len(data.labels), 6),
                "head_sha256": file_sha256(tmp / "head.safetensors"),
            },
        )

    return ensure_dir(final, build, done="record.json", force=force)


def ensure_zeroshot_expert(
    cfg: ZeroShotZooConfig,
    data: TaskData,
    base_dir: Path,
    head_dir: Path,
    *,
    cache: str | os.PathLike[str] | None = None,
    reporter: _Reporter | None = None,
    force: bool = False,
) -> Path:
    """Fine-tune (or reuse) the encoder of one task against its frozen zero-shot head.

    The expert folder has the same files as an ``lpft`` expert (``model/``, ``head.safetensors``:
    a byte copy of the task's head, ``probe.safetensors``, ``record.json`` with the validation
    curve), so every reader of a zoo works on either variant.
    """
    reporter = reporter or _Reporter()
    head_record = read_json(head_dir / "record.json")
    key = config_key(
        {
            "format": EXPERT_FORMAT,
            "variant": "zeroshot",
            "task": data.name,
            "data": data.meta["content_sha256"],
            "base": base_dir.name,
            "head": head_record["head_sha256"],
            "train": cfg.train.model_dump(),
        }
    )
    final = zoo_root(cache) / "models" / f"expert-zs-{data.name}-{key}"
    tc = cfg.train

    def build(tmp: Path) -> None:
        tokenizer = load_tokenizer(base_dir)
        base = load_encoder(base_dir)
        head = load_head(head_dir / "head.safetensors")
        assert isinstance(head, CosineHead)

        def batches(split: str, limit: int | None):
            texts, labels = data.examples(split, limit)
            return make_batches(tokenizer, texts, max_len=tc.max_len, batch_size=tc.eval_batch_size), labels

        t0 = time.perf_counter()
        with reporter.task(f"probe {data.name}", 1) as advance:
            train_b, train_y = batches("train", tc.steps * tc.batch_size)
            val_b, val_y = batches("validation", tc.eval_limit)
            base_val = embed_batches(base, val_b)
            probe, probe_l2, probe_scores = select_probe(
                (embed_batches(base, train_b), train_y), (base_val, val_y), data.labels, data.name, tc
            )
            advance(1)
        probe_s = time.perf_counter() - t0
        probe.save(tmp / "probe.safetensors")

        curve_b, curve_y = batches("validation", tc.curve_limit)
        with reporter.task(f"train {data.name}", tc.steps) as advance:
            trained = train_against_head(
                data, base_dir, tc, head, validation=(curve_b, curve_y),
                progress=lambda step, total, info: advance(step),
            )  # fmt: skip
        trained.encoder.save_pretrained(tmp / "model", safe_serialization=True)
        (tmp / "head.safetensors").write_bytes((head_dir / "head.safetensors").read_bytes())

        test_b, test_y = batches("test", tc.eval_limit)
        base_test = embed_batches(base, test_b)
        expert_val = embed_batches(trained.encoder, val_b)
        expert_test = embed_batches(trained.encoder, test_b)
        for split, owner, feats in (
            ("validation", tmp, expert_val), ("test", tmp, expert_test),
            ("validation", base_dir, base_val), ("test", base_dir, base_test),
        ):  # fmt: skip
            save_features(feature_file(owner, data, split, tc.eval_limit, tc.max_len), feats)
        scores = {
            "expert": {"validation": _score(expert_val, head, val_y), "test": _score(expert_test, head, test_y)},
            "zero_shot": {"validation": _score(base_val, head, val_y), "test": _score(base_test, head, test_y)},
            "probe": {"validation": _score(base_val, probe, val_y), "test": _score(base_test, probe, test_y)},
            "n": {"validation": len(val_y), "test": len(test_y)},
        }
        record = {
            **trained.record,
            "variant": "zeroshot",
            "train_config": tc.model_dump(),
            "head": {k: head_record[k] for k in ("template", "prompts", "temperature", "head_sha256")},
            "data": {k: data.meta[k] for k in ("sizes", "labels", "content_sha256", "sources")},
            "probe_seconds": round(probe_s, 2),
            "probe_train_examples": len(train_y),
            "probe_l2": probe_l2,
            "probe_validation_by_l2": probe_scores,
            "accuracy": scores,
            "eval_limit": tc.eval_limit,
            "beats_zero_shot": {s: _beats(scores["expert"][s], scores["zero_shot"][s]) for s in ("validation", "test")},
            "beats_probe": {s: _beats(scores["expert"][s], scores["probe"][s]) for s in ("validation", "test")},
            **build_stamp(),
        }
        write_json(tmp / "record.json", record)

    return ensure_dir(final, build, done="record.json", force=force)


def build_zoo(
    config: ZooConfig | None = None,
    *,
    cache: str | os.PathLike[str] | None = None,
    reader: SourceReader | None = None,
    progress=None,
    echo=None,
    threads: int | None = 2,
    force: bool = False,
    backbone: Path | None = None,
) -> Zoo:
    """Build (or reuse from the cache) every artifact of ``config``; returns the :class:`Zoo`.

    ``progress`` is an optional started ``rich.progress.Progress``; ``echo`` a one-line
    message sink. ``force`` rebuilds the data and retrains the experts. ``backbone``
    replaces the packaged backbone (an HF encoder directory with its tokenizer).
    """
    config = config or ZooConfig.quick()
    reader = reader or SystemSources(cache)
    reporter = _Reporter(progress, echo)
    t_start = time.perf_counter()
    with torch_threads(threads):
        datas: dict[str, TaskData] = {}
        with reporter.task("task data", len(config.tasks)) as advance:
            for name in config.tasks:
                datas[name] = ensure_task(name, reader, cache=cache, cfg=config.split, force=force)
                advance()
        base_dir, base_source = ensure_base(cache, backbone)
        experts: dict[str, Path] = {}
        heads: dict[str, Path] = {}
        for name in config.tasks:
            if isinstance(config, ZeroShotZooConfig):
                heads[name] = ensure_task_head(config, datas[name], base_dir, cache=cache, force=force)
                experts[name] = ensure_zeroshot_expert(
                    config, datas[name], base_dir, heads[name], cache=cache, reporter=reporter, force=force
                )
            else:
                experts[name] = ensure_expert(
                    config, datas[name], base_dir, cache=cache, reporter=reporter, force=force
                )
    key = zoo_key(config.model_dump(mode="json"), experts)
    root = zoo_root(cache) / "zoos" / key
    records = {t: read_json(p / "record.json") for t, p in experts.items()}
    write_manifest(
        root,
        name=config.name,
        base_dir=base_dir,
        tasks={t: (datas[t].path, experts[t]) for t in config.tasks},
        max_len=config.train.max_len,
        config=config.model_dump(mode="json"),
        key=key,
        extra={
            "base_source": base_source,
            "split_config": asdict(config.split),
            "build_seconds_this_run": round(time.perf_counter() - t_start, 1),
            "train_seconds_total": round(sum(r["train_seconds"] + r["probe_seconds"] for r in records.values()), 1),
            "platform": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "machine": platform.machine(),
            },
        },
    )
    if heads:
        _add_task_heads(root, heads)
    point_latest(root, config.name)
    return Zoo(root / "manifest.json")


def _add_task_heads(root: Path, heads: dict[str, Path]) -> None:
    """Record the zeroshot variant's task heads (path, template, prompts, temperature) in the manifest."""
    manifest = read_json(root / "manifest.json")
    manifest["variant"] = "zeroshot"
    for task, head_dir in heads.items():
        rec = read_json(head_dir / "record.json")
        manifest["tasks"][task].update(
            head=_relative(head_dir / "head.safetensors", root),
            template=rec["template"],
            prompts=rec["prompts"],
            temperature=rec["temperature"],
            head_sha256=rec["head_sha256"],
            zero_shot_accuracy=rec["zero_shot_accuracy"],
        )
    write_json(root / "manifest.json", manifest)


def zoo_summary(zoo: Zoo) -> list[dict[str, Any]]:
    """Per task: labels, split sizes, expert, probe (and, zeroshot variant, zero-shot) accuracy (from the records)."""
    out = []
    for task in zoo.tasks:
        rec = zoo.record(task)
        out.append(
            {
                "task": task,
                "labels": len(rec["data"]["labels"]),
                "train": rec["data"]["sizes"]["train"],
                "validation": rec["data"]["sizes"]["validation"],
                "test": rec["data"]["sizes"]["test"],
                "expert_test": rec["accuracy"]["expert"]["test"],
                "probe_test": rec["accuracy"]["probe"]["test"],
                "expert_val": rec["accuracy"]["expert"]["validation"],
                "probe_val": rec["accuracy"]["probe"]["validation"],
                "train_seconds": rec["train_seconds"],
                # zeroshot variant: the pretrained encoder with the task's fixed head, and the curve
                "zero_shot_test": rec["accuracy"].get("zero_shot", {}).get("test"),
                "zero_shot_val": rec["accuracy"].get("zero_shot", {}).get("validation"),
                "plateaued": rec.get("plateaued"),
            }
        )
    return out


def known_names(names: Sequence[str], known: Sequence[str], noun: str = "tasks") -> tuple[str, ...]:
    """``names`` as a tuple, or a ZooError naming the ones not in ``known`` (either suite)."""
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ZooError(f"unknown {noun} {unknown}; known: {', '.join(known)}")
    return tuple(names)


def tasks_list(names: Sequence[str] | None) -> tuple[str, ...]:
    return known_names(names, ALL_TASKS) if names else FULL_TASKS
