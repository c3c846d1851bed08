"""Mixtures of experts on the LM suite: upcycling the domain experts, then compressing the MoE.

``benchmarks/moe_bench.py`` is the command line.

The measurement of issue 19, in two parts, both scored with the LM suite's evaluator
(:class:`~mergelab_bench.eval.lm_harness.LMEvaluator`, which loads any ``AutoModelForCausalLM``
folder, so a Mixtral or Qwen2-MoE checkpoint is scored as the dense models are) on each domain's
test split, normalized by that domain's expert as the LM bench does (``expert / merged`` perplexity,
``merged / expert`` exact match), with 95 % percentile bootstrap intervals over the test rows:

1. **Upcycling** (:func:`upcycle_rows`): the zoo's domain experts (default: all of them) become
   the routed experts of a top-``k`` MoE (:func:`mergelab.moe.upcycle`, mergekit-moe's recipe
   format), once per gate mode; each expert's positive prompts are the first texts of its
   domain's *train* split (:func:`lm_moe_recipe`; never validation or test rows).
2. **Compression** (:func:`compression_rows`): an MoE of fewer domains (default 4, so that "4 → 2
   experts per layer" holds) is compressed with :func:`mergelab.moe.compress` (M-SMoE, Sub-MoE,
   frequency pruning; layouts ``shared`` and ``distinct``), its calibration data the domains'
   train texts written to a JSONL file (:func:`calibration_file`; the ``zoo:`` calibration source
   reads classification zoos only).

Beside them: the base and every expert on every domain (the zoo's cached scores), and rows read
from an existing LM leaderboard when it was measured on the same zoo and test rows
(:func:`leaderboard_rows`: the best static merges and the routed rows). Every model row records
its parameters (:func:`moe_parameters`: total, active per token = everything but the routed
experts outside the top-k, and for the ``shared`` layout the distinct ones) and its size on disk.
:func:`write_moe` writes ``moe.json``, ``moe.md`` and ``moe.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab_bench.eval.metrics import EvalReport, fmt_pct
from mergelab_bench.eval.plots import pyplot, save_figure
from mergelab_bench.eval.stats import Bootstrap, StatsConfig, estimates_of, rows_of, summarize

FORMAT = "mergelab-moe-bench/1"
GATE_MODES: tuple[str, ...] = ("hidden", "hidden_avg", "cheap_embed", "random", "uniform_random")
COMPRESS_METHODS: tuple[tuple[str, str], ...] = (
    ("msmoe", "shared"),
    ("msmoe", "distinct"),
    ("submoe", "shared"),
    ("prune-frequency", "distinct"),
)
"""(method, layout) of the compression rows by default."""

Echo = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# Parameters and size


def _weights(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def moe_parameters(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Parameters of a checkpoint folder from its config and safetensors headers (no tensor is read).

    ``total``: every stored tensor's entries (a tied head is stored once). For an MoE (Mixtral,
    Qwen2-MoE, Qwen3-MoE, detected from ``model_type``): ``experts_per_layer`` and ``top_k`` from
    the config and the stored expert tensors, ``expert_size`` (one routed expert's MLP entries),
    ``active`` = total − Σ_layers (N_layer − k) × expert size: attention, embeddings, norms, routers,
    any shared expert and k experts' MLPs (what one token runs through), and ``distinct`` (a
    ``shared``-layout compression stores N slots holding K distinct experts, ``moe_compress.json``):
    total − Σ_layers (N − K_layer) × expert size. A dense model: active = distinct = total.
    ``bytes``: the weight files' size on disk.
    """
    from mergelab.checkpoint.safetensors_file import read_header
    from mergelab.moe.architectures import detect

    root = Path(folder)
    config = json.loads((root / "config.json").read_text())
    sizes: dict[str, int] = {}
    for f in _weights(root):
        for name, entry in read_header(f)[0].items():
            sizes[name] = math.prod(entry.shape)
    total = sum(sizes.values())
    out: dict[str, Any] = {
        "total": total,
        "active": total,
        "distinct": total,
        "bytes": sum(f.stat().st_size for f in _weights(root)),
        "model_type": config.get("model_type"),
        "moe": False,
    }
    try:
        arch = detect(config, str(root))
    except Exception:
        return out  # a dense model
    pattern = arch.expert_pattern()
    per_layer: dict[int, dict[int, int]] = {}
    for name, n in sizes.items():
        m = pattern.match(name)
        if m:
            layer = per_layer.setdefault(int(m["layer"]), {})
            layer[int(m["expert"])] = layer.get(int(m["expert"]), 0) + n
    k = int(config.get(arch.topk_key, 1))
    expert_sizes = {size for layer in per_layer.values() for size in layer.values()}
    if len(expert_sizes) > 1:
        raise ValueError(f"{root}: routed experts of different sizes ({sorted(expert_sizes)})")
    size = expert_sizes.pop() if expert_sizes else 0
    inactive = sum(max(0, len(experts) - k) * size for experts in per_layer.values())
    distinct_k: dict[int, int] = {}
    report = root / "moe_compress.json"
    if report.is_file():
        data = json.loads(report.read_text())
        if data.get("layout") == "shared":
            distinct_k = {int(layer): int(v) for layer, v in data.get("experts_per_layer", {}).items()}
    duplicate = sum(max(0, len(per_layer[layer]) - kk) * size for layer, kk in distinct_k.items() if layer in per_layer)
    out.update(
        moe=True,
        architecture=arch.name,
        layers=len(per_layer),
        experts_per_layer=sorted({len(v) for v in per_layer.values()}),
        distinct_experts_per_layer=sorted(set(distinct_k.values())) if distinct_k else None,
        top_k=k,
        expert_size=size,
        active=total - inactive,
        distinct=total - duplicate,
    )
    return out


# --------------------------------------------------------------------------------------------
# Recipes and calibration data from the LM zoo


def domain_prompts(zoo: Any, task: str, n: int, max_chars: int | None) -> list[str]:
    """The first ``n`` non-empty texts of ``task``'s *train* split, each cut to ``max_chars`` characters."""
    texts = [t for t in zoo.data(task).texts("train", None) if t.strip()][:n]
    if not texts:
        raise ValueError(f"{task}: no train texts for its gate prompts")
    return [t[:max_chars] if max_chars else t for t in texts]


def lm_moe_recipe(
    zoo: Any,
    domains: Sequence[str],
    *,
    gate_mode: str,
    prompts: int = 12,
    prompt_chars: int | None = 256,
    experts_per_token: int = 2,
    architecture: str = "mixtral",
    seed: int = 0,
    base: str | os.PathLike[str] | None = None,
    shared_residual_scale: float | None = 0.1,
) -> dict[str, Any]:
    """A mergekit-moe recipe over the zoo: its base, one routed expert per domain (its expert
    checkpoint, positive prompts from its train split). ``qwen2_moe`` adds the base as the one shared
    expert (its gate's prompts: every domain's first prompt). ``base``: another ``base_model`` (a
    static merge of the experts: attention, embeddings, norms and gates then come from it).
    ``shared_residual_scale`` multiplies the shared expert's ``down_proj`` (mergekit-moe's
    ``residual_scale``; 0.1 as it advises for shared experts): Qwen2-MoE adds the sigmoid-gated
    shared expert to the routed ones, so the whole base MLP (None or 1) doubles the MLP path."""
    experts = [
        {
            "source_model": str(zoo.expert_model_dir(t)),
            "positive_prompts": domain_prompts(zoo, t, prompts, prompt_chars),
        }
        for t in domains
    ]
    recipe: dict[str, Any] = {
        "base_model": str(base if base is not None else zoo.base_dir),
        "gate_mode": gate_mode,
        "experts_per_token": experts_per_token,
        "experts": experts,
        "architecture": architecture,
        "seed": seed,
    }
    if architecture == "qwen2_moe":
        shared: dict[str, Any] = {
            "source_model": str(zoo.base_dir),
            "positive_prompts": [e["positive_prompts"][0] for e in experts],
        }
        if shared_residual_scale is not None:
            shared["residual_scale"] = shared_residual_scale
        recipe["shared_experts"] = [shared]
    return recipe


def calibration_file(
    zoo: Any, domains: Sequence[str], per_domain: int, path: str | os.PathLike[str], max_chars: int | None = None
) -> Path:
    """A JSONL file (``{"text": ...}`` a line) of the first ``per_domain`` train texts of each domain, interleaved."""
    per = [domain_prompts(zoo, t, per_domain, max_chars) for t in domains]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as fh:
        for i in range(max(len(p) for p in per)):
            for p in per:
                if i < len(p):
                    fh.write(json.dumps({"text": p[i]}) + "\n")
    return out


# --------------------------------------------------------------------------------------------
# Scoring


class MoeScorer:
    """Scores models (folders of any causal-LM architecture, or the zoo's own ``base`` / ``expert:<t>``)
    on some of the zoo's domains, with the bootstrap interval of the average normalized score."""

    def __init__(self, zoo: Any, domains: Sequence[str], *, limit: Any = "zoo", stats: StatsConfig) -> None:
        from mergelab_bench.eval.lm_harness import LMEvaluator

        self.zoo = zoo
        self.domains = list(domains)
        self.ev = LMEvaluator(zoo, tasks=self.domains, split="test", limit=limit)
        self.limit = self.ev.limit
        self.stats = stats
        self.boot = Bootstrap(
            self.domains,
            {t: self.ev.expert_rows(t) for t in self.domains},
            resamples=stats.bootstrap,
            seed=stats.bootstrap_seed,
        )

    def interval(self, report: EvalReport) -> dict[str, Any] | None:
        reps = self.boot.replicates([rows_of(report.info)])
        if reps is None:
            return None
        return summarize(reps, estimates_of([report]), self.stats.confidence)["average_normalized"]

    def score(self, model: Any, name: str) -> dict[str, Any]:
        """A row: the report (per-domain values and normalized scores), its interval, seconds."""
        t0 = time.perf_counter()
        report = self.ev.evaluate(os.fspath(model) if isinstance(model, Path) else model, name=name)
        return {
            "name": name,
            "report": report.to_dict(),
            "average_normalized": report.average_normalized,
            "interval": self.interval(report),
            "normalized": {s.task: s.normalized for s in report.scores},
            "score_seconds": round(time.perf_counter() - t0, 2),
        }


def reference_rows(scorer: MoeScorer, echo: Echo | None = None) -> list[dict[str, Any]]:
    """The base and every expert on the scorer's domains (the zoo's cached scores), with their sizes."""
    say = echo or (lambda _: None)
    rows = []
    for model, name, kind, folder in (
        ("base", "base", "base", scorer.zoo.base_dir),
        *((f"expert:{t}", f"expert: {t}", "expert", scorer.zoo.expert_model_dir(t)) for t in scorer.domains),
    ):
        row = scorer.score(model, name)
        row.update(kind=kind, parameters=moe_parameters(folder))
        rows.append(row)
        say(f"  {name}: {fmt_pct(row['average_normalized'])} %")
    return rows


def leaderboard_rows(
    path: str | os.PathLike[str], zoo: Any, domains: Sequence[str], limit: Any, *, best: int = 3
) -> tuple[list[dict[str, Any]], str]:
    """The best ``best`` static merges and every routed row of an LM leaderboard measured on the same
    zoo (key) and test rows, restricted to ``domains`` (the average over them); else ``([], why)``."""
    from mergelab_bench.eval.leaderboard import Leaderboard

    p = Path(path)
    with contextlib.suppress(ValueError):  # shown relative to the working folder (the repository) when inside it
        p = p.resolve().relative_to(Path.cwd())
    if not p.is_file():
        return [], f"no leaderboard at `{p}`: static and routed rows not shown (run `mergelab bench --suite lm`)"
    lb = Leaderboard.from_dict(json.loads(p.read_text()))
    if lb.zoo.get("key") != zoo.key or lb.config.get("test_limit") != limit:
        return [], (
            f"`{p}` was measured on zoo {lb.zoo.get('key')} with {lb.config.get('test_limit')} test rows, not zoo "
            f"{zoo.key} with {limit}: its rows are not comparable and are not shown"
        )
    missing = [t for t in domains if t not in lb.tasks]
    if missing:
        return [], f"`{p}` lacks the domains {missing}: its rows are not shown"
    rows = []
    ranked = lb.ranked()
    static = [m for m in ranked if m.kind == "merge"][:best]
    routed = [m for m in ranked if m.kind == "routed_model"]
    for m, kind in [*((m, "static merge") for m in static), *((m, "routed (no task id)") for m in routed)]:
        assert m.test is not None
        norm = {t: m.test.score(t).normalized for t in domains}
        vals = [v for v in norm.values() if v is not None]
        row = {
            "name": m.display_name(),
            "kind": kind,
            "chosen": m.chosen_label(),
            "average_normalized": sum(vals) / len(vals) if vals else None,
            "normalized": norm,
            "interval": (m.stats or {}).get("average_normalized") if set(lb.tasks) == set(domains) else None,
            "source": str(p),
        }
        storage = (m.routing or {}).get("storage")
        if storage:
            row["storage"] = storage
        rows.append(row)
    return rows, f"static and routed rows read from `{p}` (same zoo and test rows)"


# --------------------------------------------------------------------------------------------
# The two parts


def _upcycle(recipe: Mapping[str, Any], out: Path, threads: int | None, device: str) -> dict[str, Any]:
    from mergelab.moe import upcycle

    t0 = time.perf_counter()
    res = upcycle(dict(recipe), out, force=True, threads=threads, device=device)
    return {
        "seconds": round(time.perf_counter() - t0, 2),
        "architecture": res.architecture,
        "warnings": list(res.warnings),
        "degenerate_layers": res.report.get("degenerate_layers"),
        "gate_condition_numbers": res.report.get("gate_condition_numbers"),
    }


def merged_base_rows(
    zoo: Any,
    scorer: MoeScorer,
    work: Path,
    *,
    method: str,
    parameters: Mapping[str, Any],
    gate_mode: str = "hidden",
    prompts: int = 12,
    prompt_chars: int | None = 256,
    experts_per_token: int = 2,
    threads: int | None = None,
    device: str = "cpu",
    keep: bool = False,
    echo: Echo | None = None,
) -> list[dict[str, Any]]:
    """The MoE of the scorer's domains with a static merge of their experts as ``base_model``.

    mergekit-moe takes attention, embeddings, norms and the gates' hidden states from the base model;
    users often point it at a merge of the experts rather than the pretrained model. Here the
    experts are merged with ``method`` (``parameters``: e.g. the LM leaderboard's chosen ones), the
    merge is scored as a row of its own, then upcycled with the experts' MLPs (gate ``gate_mode``).
    """
    import mergelab

    say = echo or (lambda _: None)
    merged = work / f"merged-{method}"
    recipe = {
        "merge_method": method,
        "base_model": str(zoo.base_dir),
        "models": [{"model": str(zoo.expert_model_dir(t))} for t in scorer.domains],
        "parameters": dict(parameters),
    }
    t0 = time.perf_counter()
    mergelab.merge(recipe, merged, force=True, threads=threads, device=device)
    merge_seconds = round(time.perf_counter() - t0, 2)
    label = ", ".join(f"{k} {v}" for k, v in parameters.items())
    static = scorer.score(merged, f"{method} ({label}) of these experts")
    static.update(
        kind="static merge", method=method, merge_parameters=dict(parameters), parameters=moe_parameters(merged)
    )
    say(f"  {method} ({label}): {fmt_pct(static['average_normalized'])} % (merged in {merge_seconds:.0f} s)")
    moe_recipe = lm_moe_recipe(
        zoo, scorer.domains, gate_mode=gate_mode, prompts=prompts, prompt_chars=prompt_chars,
        experts_per_token=experts_per_token, base=merged,
    )  # fmt: skip
    row = _upcycled_row(
        moe_recipe, work / f"upcycle-mixtral-{gate_mode}-on-{method}", scorer,
        f"MoE mixtral top-{experts_per_token}, gate {gate_mode}, base = {method} merge",
        threads=threads, device=device, keep=keep, base_model={"method": method, "parameters": dict(parameters)},
    )  # fmt: skip
    say(
        f"  gate {gate_mode} on the {method} merge: {fmt_pct(row['average_normalized'])} % (built in "
        f"{row['upcycle']['seconds']:.0f} s, scored in {row['score_seconds']:.0f} s)"
    )
    if not keep:
        shutil.rmtree(merged, ignore_errors=True)
    return [static, row]


def _upcycled_row(
    recipe: Mapping[str, Any],
    out: Path,
    scorer: MoeScorer,
    name: str,
    *,
    threads: int | None,
    device: str,
    keep: bool,
    **extra: Any,
) -> dict[str, Any]:
    """Upcycle ``recipe`` into ``out``, measure and score it as the row ``name`` (plus ``extra`` fields),
    then remove ``out`` unless ``keep``."""
    built = _upcycle(recipe, out, threads, device)
    row = scorer.score(out, name)
    row.update(
        kind="upcycled MoE", gate_mode=recipe["gate_mode"], upcycle=built, parameters=moe_parameters(out), **extra
    )
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def upcycle_rows(
    zoo: Any,
    scorer: MoeScorer,
    work: Path,
    *,
    gate_modes: Sequence[str] = GATE_MODES,
    prompts: int = 12,
    prompt_chars: int | None = 256,
    experts_per_token: int = 2,
    architecture: str = "mixtral",
    threads: int | None = None,
    device: str = "cpu",
    keep: bool = False,
    echo: Echo | None = None,
) -> list[dict[str, Any]]:
    """One MoE of the scorer's domains per gate mode: upcycled into ``work``, measured, scored (then removed)."""
    say = echo or (lambda _: None)
    rows = []
    for mode in gate_modes:
        recipe = lm_moe_recipe(
            zoo, scorer.domains, gate_mode=mode, prompts=prompts, prompt_chars=prompt_chars,
            experts_per_token=experts_per_token, architecture=architecture,
        )  # fmt: skip
        row = _upcycled_row(
            recipe, work / f"upcycle-{architecture}-{mode}", scorer, f"MoE {architecture} top-{experts_per_token}, "
            f"gate {mode}", threads=threads, device=device, keep=keep,
        )  # fmt: skip
        rows.append(row)
        params = row["parameters"]
        say(
            f"  gate {mode}: {fmt_pct(row['average_normalized'])} % ({len(scorer.domains)} experts, "
            f"{params['active'] / 1e6:.1f} M of {params['total'] / 1e6:.1f} M parameters active; built in "
            f"{row['upcycle']['seconds']:.0f} s, scored in {row['score_seconds']:.0f} s)"
        )
    return rows


def compression_rows(
    zoo: Any,
    scorer: MoeScorer,
    work: Path,
    *,
    to: int = 2,
    methods: Sequence[tuple[str, str]] = COMPRESS_METHODS,
    gate_mode: str = "hidden",
    prompts: int = 12,
    prompt_chars: int | None = 256,
    experts_per_token: int = 2,
    architecture: str = "mixtral",
    calibration_per_domain: int = 64,
    calibration_max_length: int = 128,
    shared_residual_scale: float | None = 0.1,
    threads: int | None = None,
    device: str = "cpu",
    keep: bool = False,
    echo: Echo | None = None,
) -> list[dict[str, Any]]:
    """Upcycle an MoE of the scorer's domains (``gate_mode``), then compress it to ``to`` experts per layer
    with each (method, layout); every model scored and measured. The first row is the uncompressed MoE."""
    from mergelab.moe import compress

    say = echo or (lambda _: None)
    recipe = lm_moe_recipe(
        zoo, scorer.domains, gate_mode=gate_mode, prompts=prompts, prompt_chars=prompt_chars,
        experts_per_token=experts_per_token, architecture=architecture, shared_residual_scale=shared_residual_scale,
    )  # fmt: skip
    moe = work / f"compress-{architecture}-input"
    built = _upcycle(recipe, moe, threads, device)
    cal = calibration_file(zoo, scorer.domains, calibration_per_domain, work / "calibration.jsonl")
    n_examples = len(cal.read_text().splitlines())
    first = scorer.score(moe, f"MoE {architecture}, {len(scorer.domains)} experts (uncompressed)")
    first.update(
        kind="upcycled MoE", method="none", layout="–", gate_mode=gate_mode, upcycle=built,
        parameters=moe_parameters(moe), architecture=architecture,
    )  # fmt: skip
    rows = [first]
    say(f"  {architecture} uncompressed ({len(scorer.domains)} experts): {fmt_pct(first['average_normalized'])} %")
    stats = None  # the routing statistics of the first M-SMoE / pruning run, reused by the others
    for method, layout in methods:
        out = work / f"compress-{architecture}-{method}-{layout}"
        t0 = time.perf_counter()
        res = compress(
            moe, out, to=to, method=method, layout=layout if method != "prune-frequency" else None,
            calibration=str(cal), statistics=stats if method != "submoe" else None, num_examples=n_examples,
            max_length=calibration_max_length, threads=threads, device=device, force=True,
        )  # fmt: skip
        seconds = time.perf_counter() - t0
        if method != "submoe" and stats is None:
            stats = res.statistics
        row = scorer.score(out, f"{architecture} {len(scorer.domains)}→{to} {method} ({res.report['layout']})")
        row.update(
            kind="compressed MoE", method=method, layout=res.report["layout"], architecture=architecture,
            compress_seconds=round(seconds, 2), parameters=moe_parameters(out),
            groups=res.report.get("groups"), frequencies=res.report.get("statistics"),
        )  # fmt: skip
        rows.append(row)
        say(
            f"  {method} ({row['layout']}): {fmt_pct(row['average_normalized'])} % "
            f"(compressed in {seconds:.0f} s, scored in {row['score_seconds']:.0f} s)"
        )
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    if not keep:
        shutil.rmtree(moe, ignore_errors=True)
    for r in rows:
        r["calibration"] = {"file": "train texts, JSONL", "examples": n_examples, "max_length": calibration_max_length}
        if "shared_experts" in recipe:
            r["shared_residual_scale"] = shared_residual_scale
    return rows


# --------------------------------------------------------------------------------------------
# Writing


PART_KEYS = ("upcycling", "compression")


def combine_moe(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One report from runs of separate parts (``--parts upcycle`` and ``--parts compress`` run side by side).

    The runs must share the zoo, the test rows and the statistics. A part may appear in several runs
    that differ only in :data:`JOINABLE` settings (compression on another architecture, upcycling
    with other gate modes or a merged base): their rows are joined, the reference rows kept once.
    The notes are joined, and each run's command and settings are kept under ``runs``.
    """
    if not results:
        raise ValueError("nothing to combine: give the moe.json of each part's run")
    first = results[0]
    out: dict[str, Any] = {k: first[k] for k in ("format", "zoo", "statistics", "test_limit")}
    out["notes"], out["runs"] = [], []
    for i, r in enumerate(results):
        for k in ("format", "zoo", "statistics", "test_limit"):
            if r.get(k) != first.get(k):
                raise ValueError(f"run {i + 1}: its {k} ({r.get(k)!r}) differs from run 1's ({first.get(k)!r})")
        for part in PART_KEYS:
            if part in r:
                out[part] = _join_part(out[part], r[part], part, i) if part in out else r[part]
        out["notes"] += [n for n in r.get("notes", []) if n not in out["notes"]]
        out["runs"].append({"command": r.get("command"), "config": r.get("config")})
    out["command"] = "; ".join(str(r.get("command")) for r in results)
    seconds = [float((r.get("config") or {}).get("seconds") or 0.0) for r in results]
    out["config"] = {
        **(first.get("config") or {}),
        "parts": [p for r in results for p in (r.get("config") or {}).get("parts", [])],
    }
    out["config"]["seconds"] = round(sum(seconds), 1)
    out["config"]["seconds_note"] = "the runs' seconds added (they may have run side by side)"
    return out


JOINABLE: dict[str, tuple[str, ...]] = {
    "compression": ("architectures", "methods"),
    "upcycling": ("gate_modes", "merged_base"),
}
"""Settings two runs of one part may differ in (lists, joined): the rest must be equal. A value may
appear in two runs only for ``methods`` (the same method on another architecture)."""


def _join_part(have: Mapping[str, Any], new: Mapping[str, Any], part: str, i: int) -> dict[str, Any]:
    """Two runs' parts with other architectures, gate modes or merged bases as one (see :func:`combine_moe`)."""
    keys = JOINABLE[part]
    a, b = dict(have["settings"]), dict(new["settings"])
    lists_a = {k: list(a.pop(k, None) or []) for k in keys}
    lists_b = {k: list(b.pop(k, None) or []) for k in keys}
    if have["domains"] != new["domains"] or a != b:
        raise ValueError(f"run {i + 1}: its {part} part has other domains or settings than an earlier run's")
    for k in keys:
        twice = [x for x in lists_b[k] if x in lists_a[k]]
        if k == "methods":
            lists_b[k] = [x for x in lists_b[k] if x not in twice]
        elif twice:
            raise ValueError(f"run {i + 1}: {part} with {k} {', '.join(map(str, twice))} in two of the runs")
    names = {r["name"] for r in have["rows"]}
    return {
        **have,
        "rows": [*have["rows"], *(r for r in new["rows"] if r["name"] not in names)],
        "settings": {**have["settings"], **{k: lists_a[k] + lists_b[k] for k in keys}},
    }


def write_moe(result: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """``moe.json`` (everything), ``moe.md`` (the two tables) and ``moe.png`` (average normalized score per row)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "moe.json", "markdown": out / "moe.md", "png": out / "moe.png"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(result), indent=1) + "\n")
    tmp.replace(paths["json"])
    paths["markdown"].write_text(moe_markdown(result))
    moe_plot(result, paths["png"])
    return paths


def _m(n: int | None) -> str:
    return "–" if n is None else f"{n / 1e6:.1f}"


def _ci(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("low") is None:
        return "–"
    return f"[{fmt_pct(entry['low'])}, {fmt_pct(entry['high'])}]"


def _table(rows: Sequence[Mapping[str, Any]], domains: Sequence[str], compression: bool) -> list[str]:
    head = ["model", "kind"]
    if compression:
        head += ["method", "layout", "experts per layer (stored / distinct)"]
    head += ["total params M", "active params/token M"]
    if compression:
        head += ["distinct params M"]
    head += ["size MB", "avg normalized %", "95 % CI", *domains]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = r.get("parameters") or {}
        cells = [r["name"], r["kind"]]
        if compression:
            stored = ",".join(map(str, p.get("experts_per_layer") or [])) or "–"
            distinct = ",".join(map(str, p.get("distinct_experts_per_layer") or p.get("experts_per_layer") or []))
            cells += [r.get("method", "–"), r.get("layout", "–"), f"{stored} / {distinct or '–'}"]
        cells += [_m(p.get("total")), _m(p.get("active"))]
        if compression:
            cells += [_m(p.get("distinct"))]
        size = p.get("bytes")
        cells += [
            "–" if size is None else f"{size / 1e6:.0f}",
            fmt_pct(r.get("average_normalized")),
            _ci(r.get("interval")),
            *(fmt_pct((r.get("normalized") or {}).get(t)) for t in domains),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def moe_markdown(result: Mapping[str, Any]) -> str:
    """Both tables with the protocol, the notes and the settings."""
    up, comp = result.get("upcycling", {}), result.get("compression", {})
    lines = [
        "# Mixtures of experts on the LM suite: upcycling and compression",
        "",
        f"LM zoo `{result['zoo']['name']}` ({result['zoo']['key']}), test split, {result['test_limit']} rows per "
        "domain. Normalized score per domain = expert perplexity / model perplexity (exact match: model / expert), "
        "100 = as good as that domain's expert; 95 % CI: percentile bootstrap over the test rows "
        f"({result['statistics']['bootstrap']} resamples). Active parameters per token = attention, embeddings, "
        "norms, routers, any shared expert and the top-k routed experts' MLPs (every parameter of a dense model); "
        "size = the weight files on disk (float32 unless the recipe says otherwise).",
        "",
    ]
    if up:
        s = up["settings"]
        lines += [
            f"## Upcycling: {len(up['domains'])} domain experts → {s['architecture']}, top-{s['experts_per_token']}",
            "",
            f"Each domain's expert MLP becomes a routed expert (`mergelab.moe.upcycle`); its router rows come from "
            f"the first {s['prompts']} texts of the domain's train split (cut to {s['prompt_chars']} characters) "
            "as positive prompts, per gate mode. One model per gate mode, scored on every domain.",
            "",
            *_table(up["rows"], up["domains"], False),
            "",
        ]
        if up.get("leaderboard_note"):
            lines += [f"{up['leaderboard_note'][0].upper()}{up['leaderboard_note'][1:]}.", ""]
        for r in up["rows"]:
            if r.get("upcycle", {}).get("warnings"):
                lines.append(f"* {r['name']}: " + "; ".join(r["upcycle"]["warnings"]))
        lines.append("")
    if comp:
        s = comp["settings"]
        lines += [
            f"## Compression: {len(comp['domains'])} → {s['to']} experts per layer",
            "",
            f"An MoE of the {len(comp['domains'])} domains ({', '.join(comp['domains'])}; gate mode {s['gate_mode']}) "
            f"compressed with `mergelab.moe.compress` to {s['to']} experts per layer. Calibration: the first "
            f"{s['calibration_per_domain']} train texts of each domain (JSONL, {s['calibration_max_length']} tokens "
            "each). `shared` keeps the router and stores N slots holding K distinct experts (the file does not "
            "shrink; distinct params count each merged expert once), `distinct` stores K experts with a K-row "
            "router. Sub-MoE is experimental (see the README).",
            "",
            *_table(comp["rows"], comp["domains"], True),
            "",
        ]
    if result.get("notes"):
        lines += [*(f"* {n}" for n in result["notes"]), ""]
    lines += [f"Settings: `{json.dumps(result.get('config', {}), sort_keys=True)}`", ""]
    return "\n".join(lines)


def moe_plot(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Average normalized score (with its 95 % CI) of every row, one panel per part, coloured by kind."""
    plt = pyplot()

    parts = [(k, result[k]) for k in ("upcycling", "compression") if result.get(k)]
    fig, axes = plt.subplots(1, max(1, len(parts)), figsize=(7.5 * max(1, len(parts)), 5.0), dpi=110, squeeze=False)
    kinds: dict[str, Any] = {}
    cmap = plt.get_cmap("tab10")
    for ax, (title, part) in zip(axes[0], parts):
        rows = [r for r in part["rows"] if r.get("average_normalized") is not None]
        ys = [100 * r["average_normalized"] for r in rows]
        low, high = [], []
        for r, y in zip(rows, ys):
            ci = r.get("interval") or {}
            low.append(max(0.0, y - 100 * ci["low"]) if ci.get("low") is not None else 0.0)
            high.append(max(0.0, 100 * ci["high"] - y) if ci.get("high") is not None else 0.0)
        colors = [kinds.setdefault(r["kind"], cmap(len(kinds) % 10)) for r in rows]
        ax.barh(range(len(rows)), ys, xerr=[low, high], color=colors, capsize=2)
        ax.set_yticks(range(len(rows)), [r["name"] for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(100, color="black", lw=0.8, ls="--")
        ax.set_xlabel("avg normalized score over the domains (%), test")
        ax.set_title(f"{title}: {', '.join(part['domains'])}", fontsize=9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in kinds.values()]
    if handles:
        axes[0][-1].legend(handles, list(kinds), fontsize=7, loc="best")  # inside the axes: kept clear of the labels
    return save_figure(fig, path)
