"""Extraction fidelity: how well a LoRA adapter extracted from a full fine-tune stands in for it.

For each full fine-tune expert of a zoo (the LM suite's :class:`~mergelab_bench.zoo.lm.build.LMZoo`
or a classification :class:`~mergelab_bench.zoo.build.Zoo`, whose heads are fixed per task) and each
*cut* (a rank, every module's full rank, or a retained energy), :func:`extraction_fidelity`

1. extracts an adapter with :func:`mergelab.lora.extract.extract_lora` (``mergelab extract-lora``:
   a truncated SVD of every linear module's task vector; other changed tensors, the norms,
   biases and embeddings, are dropped unless ``keep_non_lora``);
2. loads base + adapter (``loader="peft"``: ``PeftModel.from_pretrained(...).merge_and_unload()``,
   the headless BERT encoders of the classification zoo included; ``"mergelab"``: the base with
   the adapter materialised by mergelab's adapter reader, the same weights);
3. scores it on that expert's own task (test split, the bench's evaluators) and normalizes by the
   expert's own score as the bench does (``merged / expert``; ``expert / merged`` for perplexity),
   with a 95 % percentile bootstrap interval over the test rows
   (:class:`mergelab_bench.eval.stats.Bootstrap`, the expert recomputed on the same resamples).

Each point records the cut, the ranks chosen (min, max, mean over modules), the adapter's file
size against the dense expert's, the mean and largest relative Frobenius error of the modules
(from the extraction's report), what was dropped or kept whole, and the timings; the base's
normalized score on the task is recorded beside as the floor. :func:`write_extraction` writes
``extraction.json``, ``extraction.md`` (a table) and ``extraction.png`` (normalized score against
the mean rank, one line per task, one panel per suite). ``benchmarks/extraction_fidelity.py`` is
the command line.

``full`` is the rank cap of every module (``min(out, in)``): the adapter reconstructs each
module's update exactly (float rounding aside), so what separates it from 100 % is what LoRA does
not hold (dropped norms, biases, embeddings) rather than the truncation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergelab_bench.eval.metrics import EvalReport, fmt_pct
from mergelab_bench.eval.plots import pyplot, save_figure
from mergelab_bench.eval.stats import Bootstrap, estimates_of, rows_of, summarize

FULL_RANK = 1_000_000
"""The rank asked for by the ``full`` cut: above every module's ``min(out, in)``, so each is cut there."""

FORMAT = "mergelab-extraction/1"


@dataclass(frozen=True)
class Cut:
    """One extraction setting: ``rank`` (``full``: every module's full rank) or retained ``energy``."""

    rank: int | None = None
    energy: float | None = None

    @property
    def full(self) -> bool:
        return self.rank == FULL_RANK

    @property
    def label(self) -> str:
        if self.energy is not None:
            return f"energy {self.energy:g}"
        return "full rank" if self.full else f"rank {self.rank}"

    @property
    def token(self) -> str:
        """The form :func:`parse_cuts` reads (``16``, ``full``, ``e0.9``)."""
        if self.energy is not None:
            return f"e{self.energy:g}"
        return "full" if self.full else str(self.rank)


DEFAULT_CUTS: tuple[Cut, ...] = (Cut(rank=4), Cut(rank=16), Cut(rank=64), Cut(rank=FULL_RANK), Cut(energy=0.9))


def parse_cuts(text: str) -> tuple[Cut, ...]:
    """``"4,16,64,full,e0.9"`` -> cuts (a whole number ≥ 1, ``full``, or ``e`` + an energy in (0, 1])."""
    out: list[Cut] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        try:
            if item == "full":
                cut = Cut(rank=FULL_RANK)
            elif item.startswith("e"):
                cut = Cut(energy=float(item[1:]))
                if not 0 < float(item[1:]) <= 1:
                    raise ValueError
            else:
                cut = Cut(rank=int(item))
                if int(item) < 1:
                    raise ValueError
        except ValueError:
            raise ValueError(
                f"cut {item!r}: give a rank (a whole number ≥ 1), full, or e<energy> with the energy in (0, 1]"
            ) from None
        if cut not in out:
            out.append(cut)
    if not out:
        raise ValueError("no cut given (e.g. 4,16,64,full,e0.9)")
    return tuple(out)


# --------------------------------------------------------------------------------------------
# The two suites, as far as extraction needs them


class _Suite:
    """A zoo of either suite: its experts' folders, an evaluator of one task, a model from base + adapter."""

    def __init__(self, zoo: Any, limit: Any) -> None:
        from mergelab_bench.eval.harness import DEFAULT_TEST_LIMIT
        from mergelab_bench.zoo.lm.build import LMZoo

        self.zoo = zoo
        self.lm = isinstance(zoo, LMZoo)
        self.name = "lm" if self.lm else "classification"
        self.limit: Any = limit if limit is not None else "zoo" if self.lm else DEFAULT_TEST_LIMIT

    def evaluator(self, task: str) -> Any:
        if self.lm:
            from mergelab_bench.eval.lm_harness import LMEvaluator

            return LMEvaluator(self.zoo, tasks=[task], split="test", limit=self.limit)
        from mergelab_bench.eval.harness import Evaluator

        return Evaluator(self.zoo, tasks=[task], split="test", limit=self.limit)

    def metric(self, task: str) -> str:
        return self.zoo.metrics(task)[0] if self.lm else "accuracy"

    def base_report(self, ev: Any, task: str) -> EvalReport:
        """The base on ``task`` (cached scores or features)."""
        if self.lm:
            return ev.evaluate("base", name="base")
        return ev.report("base", {task: ev.zoo_logits("base", task).argmax(-1)})

    def load(self, adapter: Path, loader: str) -> Any:
        """Base + ``adapter`` as a module (``peft``) or a state dict (``mergelab``)."""
        if loader == "mergelab":
            from mergelab_bench.eval.adapter_bench import materialise

            return materialise(self.zoo.base_dir, adapter)
        if self.lm:
            from mergelab_bench.zoo.lm.build import load_adapter_model

            return load_adapter_model(self.zoo.base_dir, adapter, self.zoo.device)
        from peft import PeftModel

        from mergelab_bench.zoo.backbone import load_encoder

        model: nn.Module = PeftModel.from_pretrained(load_encoder(self.zoo.base_dir), str(adapter))
        return model.merge_and_unload().eval()  # type: ignore[operator]


def _weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def _normalized(ev: Any, task: str, report: EvalReport, bootstrap: int, seed: int) -> dict[str, Any]:
    """The report's normalized score on ``task`` with its bootstrap interval (the expert resampled alike)."""
    boot = Bootstrap([task], {task: ev.expert_rows(task)}, resamples=bootstrap, seed=seed)
    reps = boot.replicates([rows_of(report.info)])
    score = report.score(task)
    out: dict[str, Any] = {"value": score.value, "expert": score.expert, "n": score.n, "normalized": score.normalized}
    if reps is not None:
        entry = summarize(reps, estimates_of([report]))["average_normalized"]
        out["ci"] = {"low": entry["low"], "high": entry["high"]}
    return out


def extraction_fidelity(
    zoo: Any,
    *,
    cuts: Sequence[Cut] = DEFAULT_CUTS,
    tasks: Sequence[str] | None = None,
    limit: Any = None,
    keep_non_lora: bool = False,
    loader: str = "peft",
    svd_dtype: str = "float32",
    bootstrap: int = 1000,
    bootstrap_seed: int = 0,
    work_dir: str | os.PathLike[str] | None = None,
    done: Mapping[tuple[str, str, str], Mapping[str, Any]] | None = None,
    on_point: Callable[[dict[str, Any]], object] | None = None,
    echo: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Extract, load and score an adapter of every expert of ``zoo`` at every cut (module docstring).

    ``limit``: test rows per task (default: the LM zoo's eval limit, 1000 for a classification
    zoo). ``done`` maps ``(zoo key, task, cut token)`` to points measured earlier with the same
    settings, which are returned as they are instead of being measured again; ``on_point`` is
    called with every new point (the script saves as it goes). Adapters are written under
    ``work_dir`` (or a temporary folder) and removed once scored. Returns one dict per (task, cut),
    and one per task with ``cut: "base"`` (the base, the floor of the plot).
    """
    if loader not in ("peft", "mergelab"):
        raise ValueError(f"loader {loader!r}: use peft or mergelab")
    from mergelab.lora.extract import extract_lora

    say = echo or (lambda _: None)
    suite = _Suite(zoo, limit)
    names = list(tasks or zoo.tasks)
    for t in names:
        zoo.data(t)  # an unknown task fails before any work
    done = done or {}
    points: list[dict[str, Any]] = []
    parent = Path(work_dir) if work_dir is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".extraction-", dir=parent) as tmp:
        for i, task in enumerate(names):
            ev = suite.evaluator(task)
            common = {"suite": suite.name, "zoo": zoo.name, "zoo_key": zoo.key, "task": task}
            common["metric"] = suite.metric(task)
            expert_dir = zoo.expert_model_dir(task)
            expert_bytes = _weights_bytes(expert_dir)
            base = _normalized(ev, task, suite.base_report(ev, task), bootstrap, bootstrap_seed)
            points.append({**common, "cut": "base", **base, "expert_bytes": expert_bytes})
            say(f"[{suite.name} {i + 1}/{len(names)}] {task}: base {fmt_pct(base['normalized'])} % of the expert")
            for cut in cuts:
                key = (zoo.key, task, cut.token)
                if key in done:
                    points.append(dict(done[key]))
                    say(f"  {cut.label}: reused ({fmt_pct(done[key].get('normalized'))} %)")
                    continue
                out = Path(tmp) / f"{task}-{cut.token}"
                t0 = time.perf_counter()
                result = extract_lora(
                    expert_dir, zoo.base_dir, out, rank=cut.rank, energy=cut.energy, keep_non_lora=keep_non_lora,
                    svd_dtype=svd_dtype, threads=torch.get_num_threads(), hash_inputs=False,
                )  # fmt: skip
                t1 = time.perf_counter()
                try:
                    model = suite.load(out, loader)
                    report = ev.evaluate(model, name=f"{task} {cut.label}")
                    del model
                    t2 = time.perf_counter()
                    point = _point(common, cut, result.report, out, expert_bytes, keep_non_lora, loader)
                finally:
                    shutil.rmtree(out, ignore_errors=True)
                point.update(_normalized(ev, task, report, bootstrap, bootstrap_seed))
                point.update(extract_seconds=round(t1 - t0, 2), score_seconds=round(t2 - t1, 2))
                points.append(point)
                if on_point is not None:
                    on_point(point)
                say(
                    f"  {cut.label}: {fmt_pct(point['normalized'])} % of the expert "
                    f"[{_ci_text(point.get('ci'))}], mean rank {point['ranks']['mean']:.1f}, "
                    f"adapter {100 * point['size_ratio']:.2f} % of the expert, mean rel. error "
                    f"{point['mean_rel_error']:.3g} ({point['extract_seconds']:.0f} s + {point['score_seconds']:.0f} s)"
                )
    return points


def _point(
    common: Mapping[str, Any],
    cut: Cut,
    report: Mapping[str, Any],
    adapter: Path,
    expert_bytes: int,
    keep_non_lora: bool,
    loader: str,
) -> dict[str, Any]:
    ranks = [m["rank"] for m in report.get("modules", {}).values()]
    size = (adapter / "adapter_model.safetensors").stat().st_size
    return {
        **common,
        "cut": cut.token,
        "rank": None if cut.energy is not None or cut.full else cut.rank,
        "full_rank": cut.full,
        "energy": cut.energy,
        "ranks": {
            "min": min(ranks, default=0),
            "max": max(ranks, default=0),
            "mean": sum(ranks) / len(ranks) if ranks else 0.0,
        },
        "lora_modules": report.get("lora_modules"),
        "adapter_bytes": size,
        "expert_bytes": expert_bytes,
        "size_ratio": size / expert_bytes if expert_bytes else None,
        "mean_rel_error": report.get("mean_rel_error"),
        "max_rel_error": report.get("max_rel_error"),
        "dropped": len(report.get("dropped", [])),
        "kept_whole": len(report.get("modules_to_save", [])),
        "bias_updates": len(report.get("lora_bias_updates", [])),
        "keep_non_lora": keep_non_lora,
        "loader": loader,
    }


def _ci_text(ci: Mapping[str, Any] | None) -> str:
    if not ci or ci.get("low") is None:
        return "–"
    return f"{fmt_pct(ci['low'])}, {fmt_pct(ci['high'])}"


# --------------------------------------------------------------------------------------------
# Writing


def write_extraction(
    points: Iterable[Mapping[str, Any]], out_dir: str | os.PathLike[str], config: Mapping[str, Any]
) -> dict[str, Path]:
    """Write ``extraction.json`` (``config`` + every point), ``extraction.md`` and ``extraction.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [dict(p) for p in points]
    paths = {"json": out / "extraction.json", "markdown": out / "extraction.md", "png": out / "extraction.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"format": FORMAT, "config": dict(config), "points": rows}, indent=1) + "\n")
    tmp.replace(paths["json"])
    paths["markdown"].write_text(extraction_markdown(rows, config))
    extraction_plot(rows, paths["png"])
    return paths


def read_extraction(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(config, points)`` of an ``extraction.json`` (a ``ValueError`` for another file)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not an extraction-fidelity result ({FORMAT})")
    return dict(data["config"]), list(data["points"])


_LOADERS = {"peft": "PEFT (merge_and_unload)", "mergelab": "mergelab's adapter reader (materialised)"}


def _fmt_mb(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.3g}"


def extraction_markdown(points: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> str:
    """The table of every point: per suite and task, the base, then each cut."""
    keep = config.get("keep_non_lora", False)
    lines = [
        "# Extraction fidelity: base + adapter extracted from each full fine-tune",
        "",
        "Each full fine-tune expert's task vector is factored per linear module by a truncated SVD "
        "(`mergelab extract-lora`, at a rank, at every module's full rank, or at the smallest rank keeping a "
        "fraction of ‖τ‖²_F); "
        + (
            "changed norms, biases and embeddings are kept whole (`--keep-non-lora`). "
            if keep
            else "changed norms, biases and embeddings are dropped (the default of `mergelab extract-lora`), so even "
            "the full rank may fall short of the expert. "
        )
        + f"Base + adapter is loaded with {_LOADERS.get(config.get('loader', 'peft'), '?')} "
        "and scored on the expert's own task, test split; normalized = score / expert's score (expert perplexity / "
        "perplexity for perplexity), 100 = as good as the expert, with a 95 % percentile bootstrap interval over the "
        f"test rows ({config.get('bootstrap')} resamples; the expert is recomputed on the same resamples). "
        "`rank` is the mean rank over the adapted modules (min–max); sizes are the weight files' bytes.",
        "",
        "| suite | zoo | task | metric | cut | rank | adapter MB | % of expert | mean rel. error | score | expert "
        "| normalized % | 95 % CI | dropped | extract s | score s |",
        "|" + "---|" * 16,
    ]
    for p in points:
        if p["cut"] == "base":
            rank, size, ratio, err = "0", "–", "–", "–"
        else:
            r = p.get("ranks", {})
            rank = f"{r.get('mean', 0):.1f}" + (f" ({r['min']}–{r['max']})" if r.get("min") != r.get("max") else "")
            size, err = _fmt_mb(p.get("adapter_bytes")), f"{p.get('mean_rel_error', 0):.3g}"
            ratio = f"{100 * p['size_ratio']:.2f}" if p.get("size_ratio") is not None else "–"
        value = p.get("value")
        metric = p.get("metric", "accuracy")
        show = (lambda v: "–" if v is None else f"{v:.4g}") if metric == "perplexity" else fmt_pct
        cells = [
            p["suite"], p["zoo"], p["task"], metric, _cut_label(p["cut"]), rank, size, ratio, err,
            show(value), show(p.get("expert")), fmt_pct(p.get("normalized")), f"[{_ci_text(p.get('ci'))}]",
            str(p.get("dropped", "–")), str(p.get("extract_seconds", "–")), str(p.get("score_seconds", "–")),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    for suite in dict.fromkeys(p["suite"] for p in points):
        mine = [p for p in points if p["suite"] == suite and p["cut"] != "base"]
        expert = {p["task"]: p.get("expert_bytes") for p in mine}
        if expert:
            lines += [
                "",
                f"{suite}: dense expert size {_fmt_mb(max(v or 0 for v in expert.values()))} MB per expert.",
            ]
    lines += ["", f"Settings: `{json.dumps(dict(config), sort_keys=True)}`", ""]
    return "\n".join(lines)


def _cut_label(token: str) -> str:
    if token == "base":
        return "base (no adapter)"
    if token == "full":
        return "full rank"
    return f"energy {token[1:]}" if token.startswith("e") else f"rank {token}"


def extraction_plot(points: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Normalized score against the mean rank of the adapter (log scale), one line per task and one
    panel per suite; energy cuts are hollow markers on the same line's colour, the base a dotted level."""
    import matplotlib.ticker

    plt = pyplot()

    suites = list(dict.fromkeys(p["suite"] for p in points)) or ["–"]
    fig, axes = plt.subplots(1, len(suites), figsize=(6.2 * len(suites), 4.6), dpi=110, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, suite in zip(axes[0], suites):
        mine = [p for p in points if p["suite"] == suite]
        for j, task in enumerate(dict.fromkeys(p["task"] for p in mine)):
            color = cmap(j % 10)
            rows = [p for p in mine if p["task"] == task and p["cut"] != "base" and p.get("normalized") is not None]
            ranked = sorted((p for p in rows if p.get("energy") is None), key=lambda p: p["ranks"]["mean"])
            xs = [p["ranks"]["mean"] for p in ranked]
            ys = [100 * p["normalized"] for p in ranked]
            err = _errors(ranked)
            ax.errorbar(xs, ys, yerr=err, color=color, marker="o", ms=4, lw=1.2, capsize=2, label=task)
            for p in rows:
                if p.get("energy") is not None:
                    ax.errorbar(
                        [p["ranks"]["mean"]], [100 * p["normalized"]], yerr=_errors([p]), color=color, marker="s",
                        mfc="white", ms=6, capsize=2, ls="none",
                    )  # fmt: skip
            base = next((p for p in mine if p["task"] == task and p["cut"] == "base"), None)
            if base is not None and base.get("normalized") is not None:
                ax.axhline(100 * base["normalized"], color=color, lw=0.8, ls=":")
        ax.axhline(100, color="black", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("rank of the extracted adapter (mean over modules; hollow squares: energy cut)")
        ax.set_ylabel("normalized score (% of the full expert), test")
        ax.set_title(f"{suite}: base + extracted adapter (dotted: base alone)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def _errors(points: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    low, high = [], []
    for p in points:
        ci, y = p.get("ci") or {}, 100 * p["normalized"]
        low.append(max(0.0, y - 100 * ci["low"]) if ci.get("low") is not None else 0.0)
        high.append(max(0.0, 100 * ci["high"] - y) if ci.get("high") is not None else 0.0)
    return [low, high]
