"""Scoring a merged causal LM with lm-eval-harness tasks that are available locally.

:func:`run_lm_eval` evaluates an HF causal-LM folder (the output of ``mergelab merge``, which
carries the base's config and tokenizer files) or an already-loaded model + tokenizer with
lm-eval's Python API (``lm_eval.simple_evaluate`` with its ``hf`` model), on tasks found by
name in ``include_path`` (a folder of lm-eval task YAMLs, e.g. ``dataset_path: json`` with local
``data_files``) and/or in lm-eval's built-in tasks whose datasets are already in the local
datasets cache. Nothing is downloaded: the Hub and datasets libraries run in offline mode for the
duration of the call. The result is a plain, JSON-ready dict of per-task metrics;
:func:`lm_eval_table` renders it for ``mergelab eval --lm-eval-tasks``.

lm-eval is an optional dependency (``pip install -e ".[lmeval]"``); without it the functions
raise :class:`LmEvalError`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mergelab.errors import MergelabError

INSTALL_HINT = 'pip install -e ".[lmeval]"'
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


class LmEvalError(MergelabError):
    """lm-eval is missing, a task is unknown or its data is not available locally."""

    exit_code = 2


def require_lm_eval() -> None:
    """Raise :class:`LmEvalError` (one line, with the install command) when lm-eval is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise LmEvalError(f"lm-eval-harness is not installed; install the optional extra: {INSTALL_HINT}")


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Hub and datasets offline mode for the duration of the block (environment variables, plus
    the module-level flags of ``huggingface_hub`` and ``datasets`` that were read at import)."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    for k in _OFFLINE_ENV:
        os.environ[k] = "1"
    patched: list[tuple[Any, str, Any]] = []
    for module_name, attrs in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        module = sys.modules.get(module_name)
        if module is None:
            with contextlib.suppress(ImportError):
                module = __import__(module_name, fromlist=["_"])
        for attr in attrs:
            if module is not None and hasattr(module, attr):
                patched.append((module, attr, getattr(module, attr)))
                setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in reversed(patched):
            setattr(module, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_model_dir(path: Path, tokenizer: Any) -> None:
    if not path.is_dir() or not (path / "config.json").is_file():
        raise LmEvalError(f"{path}: not a Hugging Face model folder (no config.json); pass a mergelab merge output")
    if tokenizer is None and not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise LmEvalError(
            f"{path}: no tokenizer files; copy the base model's tokenizer into it or pass tokenizer=<folder>"
        )


def _number(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if isinstance(value, float) and math.isnan(value) else value


def _split_metrics(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """lm-eval's ``{"acc,none": x, "acc_stderr,none": s, "alias": ...}`` as
    ``({"acc": x}, {"acc": s})``; a filter other than ``none`` stays in the name (``em,strict``)."""
    metrics: dict[str, Any] = {}
    stderr: dict[str, Any] = {}
    for key, value in raw.items():
        if "," not in key:
            continue  # alias, name, sample_len, ...
        metric, _, filt = key.partition(",")
        is_stderr = metric.endswith("_stderr")
        base = metric.removesuffix("_stderr")
        name = base if filt == "none" else f"{base},{filt}"
        if is_stderr:
            stderr[name] = _number(value)
        else:
            metrics[name] = value if isinstance(value, str) else _number(value)
    return metrics, stderr


def _summarize(results: dict[str, Any], *, model: str, limit: Any, num_fewshot: int | None) -> dict[str, Any]:
    import lm_eval

    n_samples = results.get("n-samples", {})
    n_shot = results.get("n-shot", {})

    def section(raw_section: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, raw in raw_section.items():
            metrics, stderr = _split_metrics(raw)
            counts = n_samples.get(name) or {}
            out[name] = {
                "metrics": metrics,
                "stderr": stderr,
                "n": counts.get("effective", raw.get("sample_len")),
                "n_total": counts.get("original"),
                "num_fewshot": n_shot.get(name),
                "higher_is_better": results.get("higher_is_better", {}).get(name, {}),
            }
        return out

    summary: dict[str, Any] = {
        "model": model,
        "harness": "lm-eval",
        "lm_eval_version": lm_eval.__version__,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "tasks": section(results.get("results", {})),
    }
    groups = section(results.get("groups", {}))
    if groups:
        summary["groups"] = groups
        for g in groups:
            summary["tasks"].pop(g, None)
    return summary


def run_lm_eval(
    model: str | os.PathLike | Any,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    include_defaults: bool | None = None,
    tokenizer: str | os.PathLike | Any | None = None,
    limit: float | None = None,
    batch_size: int | str = 8,
    device: str = "cpu",
    dtype: str = "auto",
    num_fewshot: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate a causal LM with lm-eval-harness on local tasks; returns per-task metrics.

    ``model`` is an HF causal-LM folder (``mergelab merge``'s output) or a loaded
    ``transformers`` model (then ``tokenizer`` must be the loaded tokenizer; ``device`` and
    ``dtype`` are the model's own). ``tasks`` are lm-eval task, group or tag names (or YAML
    paths). ``include_path``: folder(s) of task YAMLs. ``include_defaults``: also index
    lm-eval's built-in tasks (their datasets must be in the local cache); by default only when
    no ``include_path`` is given, because indexing them takes a while. ``limit``: first N
    documents per task (a float < 1 is a fraction). Runs offline.

    Returns ``{"model", "harness", "lm_eval_version", "limit", "num_fewshot", "tasks": {task:
    {"metrics": {"acc": ...}, "stderr": {"acc": ...}, "n", "n_total", "num_fewshot",
    "higher_is_better"}}}`` plus ``"groups"`` (same shape) when a group aggregates its tasks.
    """
    require_lm_eval()
    tasks = [t for t in tasks if t]
    if not tasks:
        raise LmEvalError("no lm-eval task given")
    loaded_model = not isinstance(model, (str, os.PathLike))
    if not loaded_model:
        model_dir = Path(model)
        _check_model_dir(model_dir, tokenizer)
    elif tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        raise LmEvalError("a loaded model needs its loaded tokenizer (tokenizer=...)")
    paths: list[str] = []
    if include_path is not None:
        raw_paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
        for p in raw_paths:
            if not Path(p).is_dir():
                raise LmEvalError(f"{p}: lm-eval include folder not found")
            paths.append(str(Path(p).resolve()))
    if include_defaults is None:
        include_defaults = not paths

    with offline_hub():
        import lm_eval
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=paths or None, include_defaults=include_defaults)
        known = set(manager.all_tasks)
        unknown = [t for t in tasks if t not in known and not Path(t).is_file()]
        if unknown:
            where = ", ".join(paths) if paths else "lm-eval's built-in tasks"
            sample = ", ".join(sorted(known)[:10]) if paths else ""
            raise LmEvalError(
                f"unknown lm-eval task(s) {', '.join(unknown)} (searched {where}"
                + (f"; found: {sample}" if sample else "")
                + ")"
            )
        if loaded_model:
            from lm_eval.models.huggingface import HFLM

            lm: Any = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            model_args: dict[str, Any] | None = None
            model_name = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        else:
            lm = "hf"
            model_args = {"pretrained": str(model_dir), "backend": "causal", "dtype": dtype}
            if tokenizer is not None:
                model_args["tokenizer"] = tokenizer if not isinstance(tokenizer, os.PathLike) else os.fspath(tokenizer)
            model_name = str(model_dir)
        try:
            results = lm_eval.simple_evaluate(
                model=lm,
                model_args=model_args,
                tasks=list(tasks),
                num_fewshot=num_fewshot,
                batch_size=batch_size,
                device=device,
                limit=limit,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
                task_manager=manager,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except (ConnectionError, FileNotFoundError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise LmEvalError(f"lm-eval task data is not available locally (offline mode): {first}") from exc
    if results is None:  # not rank 0 of a distributed run
        return {}
    return _summarize(results, model=model_name, limit=limit, num_fewshot=num_fewshot)


def lm_eval_table(summary: dict[str, Any]):
    """A rich table of :func:`run_lm_eval`'s result: one row per task (and group) and metric."""
    from rich.table import Table

    table = Table(title=f"lm-eval {summary.get('lm_eval_version', '')}: {summary.get('model', '')}")
    for col in ("task", "metric", "value", "± stderr", "n", "shots"):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    rows = list(summary.get("tasks", {}).items()) + list(summary.get("groups", {}).items())
    for name, entry in rows:
        for i, (metric, value) in enumerate(entry["metrics"].items()):
            err = entry["stderr"].get(metric)
            table.add_row(
                name if i == 0 else "",
                metric,
                f"{value:.4f}" if isinstance(value, (int, float)) else str(value),
                f"{err:.4f}" if isinstance(err, (int, float)) else "",
                str(entry.get("n") or "") if i == 0 else "",
                str(entry.get("num_fewshot") if entry.get("num_fewshot") is not None else "") if i == 0 else "",
            )
    return table
