"""The static HTML report of a task-vector analysis, with its numbers as JSON beside it.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global
backend change) and embedded as base64 PNG, so the report is one self-contained file. The
same numbers are written to ``<report>.json`` and embedded in the page as
``<script type="application/json" id="mergelab-analysis">``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from mergelab.errors import OptionError, OutputError

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}figure{margin:1em 0}figcaption{font-size:.85em;color:#555}
p.note{font-size:.9em;color:#444}code{background:#f4f4f4;padding:0 .2em}
"""


def _mpl():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise OptionError("the HTML report needs matplotlib: pip install matplotlib") from exc
    return Figure, FigureCanvasAgg


def _png(fig: Any) -> str:
    _, canvas_cls = _mpl()
    canvas_cls(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _heatmap(
    matrix: list[list[float | None]], names: list[str], title: str, vmin: float, vmax: float, cmap: str
) -> str:
    figure_cls, _ = _mpl()
    t = len(names)
    size = max(3.5, 0.6 * t + 2)
    fig = figure_cls(figsize=(size + 1, size))
    ax = fig.add_subplot(1, 1, 1)
    data = [[_nan(v) for v in row] for row in matrix]
    im = ax.imshow(data, vmin=vmin, vmax=vmax, cmap=cmap)
    ax.set_xticks(range(t), names, rotation=45, ha="right")
    ax.set_yticks(range(t), names)
    for i in range(t):
        for j in range(t):
            v = data[i][j]
            if not math.isnan(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def _lines(xs: list[int], series: dict[str, list[float]], title: str, ylabel: str) -> str:
    figure_cls, _ = _mpl()
    fig = figure_cls(figsize=(8, 4))
    ax = fig.add_subplot(1, 1, 1)
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) <= 16:
        ax.legend(fontsize=7, loc="best")
    return _png(fig)


def _bars(groups: list[str], series: dict[str, list[float]], title: str, ylabel: str) -> str:
    figure_cls, _ = _mpl()
    fig = figure_cls(figsize=(max(6, 0.9 * len(groups) * max(1, len(series)) / 2 + 3), 4))
    ax = fig.add_subplot(1, 1, 1)
    k = max(len(series), 1)
    width = 0.8 / k
    for s, (label, ys) in enumerate(series.items()):
        ax.bar([g + (s - (k - 1) / 2) * width for g in range(len(groups))], ys, width=width, label=label)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _png(fig)


def figures(result: dict[str, Any]) -> dict[str, str]:
    """Base64 PNGs keyed by figure id."""
    names = result["names"]
    t = len(names)
    out: dict[str, str] = {}
    out["cosine"] = _heatmap(result["cosine"]["matrix"], names, "cosine similarity of task vectors", -1, 1, "RdBu_r")
    sc = result["sign_conflict"]
    out["conflict"] = _heatmap(sc["rate"], names, f"sign-conflict rate among top-{sc['topk']:g} entries", 0, 1, "Reds")
    block_layers = [k for k in result["layers"] if k.isdigit()]
    xs = [int(k) for k in block_layers]
    if xs:
        norms = {names[i]: [result["norms"]["per_layer"][k][i] for k in block_layers] for i in range(t)}
        out["norms"] = _lines(xs, norms, "L2 norm of each task vector per layer", "‖τ‖₂")
        if t >= 2:
            pairs = {}
            for i in range(t):
                for j in range(i + 1, t):
                    pairs[f"{names[i]} · {names[j]}"] = [
                        _nan(result["cosine"]["per_layer"][k][i][j]) for k in block_layers
                    ]
            out["layer_cosine"] = _lines(xs, pairs, "cosine similarity per layer", "cosine")
    tall = result["tall"]
    out["tall_hist"] = _bars(
        [str(c) for c in range(t + 1)],
        {"weights": tall["histogram"]},
        f"number of TALL masks selecting each weight (λ = {tall['lambda']:g})",
        "weights",
    )
    n = max(result["parameters"], 1)
    out["tall_tasks"] = _bars(
        names,
        {"claimed": tall["claimed_fraction"], "selfish (claimed by this task only)": [s / n for s in tall["selfish"]]},
        "fraction of the model each task's TALL mask claims",
        "fraction of weights",
    )
    d = result["density"]
    out["density"] = _bars(
        names,
        {
            "non-zero": d["nonzero"],
            f"TIES top-{d['ties']['density']:g}": d["ties"]["kept"],
            f"DARE p={d['dare']['density']:g}": d["dare"]["kept"],
            f"breadcrumbs {d['breadcrumbs']['density']:g}/{d['breadcrumbs']['gamma']:g}": d["breadcrumbs"]["kept"],
            f"DELLA {d['della']['density']:g}±{d['della']['epsilon']:g}": d["della"]["kept"],
        },
        "density of each task vector after each sparsifier",
        "fraction of entries non-zero",
    )
    return out


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _matrix_table(matrix: list[list[Any]], names: list[str]) -> str:
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = "".join(
        f"<tr><th class='l'>{html.escape(names[i])}</th>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
        for i, row in enumerate(matrix)
    )
    return f"<table><tr><th></th>{head}</tr>{rows}</table>"


def _rows_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(
        f"<th class='l'>{html.escape(h)}</th>" if i == 0 else f"<th>{html.escape(h)}</th>" for i, h in enumerate(header)
    )
    body = "".join(
        "<tr>"
        + "".join(f"<td class='l'>{_fmt(v)}</td>" if i == 0 else f"<td>{_fmt(v)}</td>" for i, v in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(figs: dict[str, str], key: str, caption: str) -> str:
    if key not in figs:
        return ""
    return (
        f"<figure id='fig-{key}'><img alt='{html.escape(caption)}' src='data:image/png;base64,{figs[key]}'/>"
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def render_html(result: dict[str, Any]) -> str:
    """The report page for an analysis result."""
    figs = figures(result)
    names = result["names"]
    t = len(names)
    n = max(result["parameters"], 1)
    sc, tall, d = result["sign_conflict"], result["tall"], result["density"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>mergelab task-vector analysis</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Task-vector analysis</h1>",
        (
            f"<p>Base <code>{html.escape(str(result['base']))}</code>; {t} expert(s); "
            f"{result['parameters']:,} parameters in {result['tensors']} merged tensors; "
            f"{len(result['layers'])} layer groups.</p>"
        ),
        _rows_table(
            ["name", "model", "‖τ‖₂", "non-zero"],
            [[names[i], result["experts"][i], result["norms"]["total"][i], d["nonzero"][i]] for i in range(t)],
        ),
        "<h2>Cosine similarity</h2>",
        "<p class='note'>cos(τ_i, τ_j) over the whole model; per layer below. Unrelated fine-tunes are near 0.</p>",
        _img(figs, "cosine", "pairwise cosine similarity of task vectors"),
        _matrix_table(result["cosine"]["matrix"], names),
        _img(figs, "layer_cosine", "cosine similarity per layer, per pair"),
        "<h2>Sign conflicts</h2>",
        (
            f"<p class='note'>Among entries in the top {sc['topk']:g} fraction of |τ| of both experts "
            "(per tensor, non-zero), "
            "the fraction with opposite signs. Over all experts: among entries in at least two experts' top-k, "
            f"{_fmt(sc['all_experts_rate'])} have conflicting signs ({sc['all_experts_entries']:,} entries).</p>"
        ),
        _img(figs, "conflict", "sign-conflict rate among top-k entries"),
        _matrix_table(sc["rate"], names),
        "<p class='note'>Overlap of the top-k sets: |S_i ∩ S_j| / min(|S_i|, |S_j|).</p>",
        _matrix_table(sc["overlap"], names),
        "<h2>Task-vector norms per layer</h2>",
        _img(figs, "norms", "L2 norm of each task vector per layer"),
        _rows_table(["layer", *names], [[k, *result["norms"]["per_layer"][k]] for k in result["layers"]]),
        "<h2>TALL-mask overlap</h2>",
        (
            f"<p class='note'>m_t = 1[|τ_t| &gt; λ·|τ_MTL − τ_t|] with τ_MTL = Σ τ_i and λ = {tall['lambda']:g}. "
            f"Selfish weights (claimed by exactly one task): {tall['selfish_total']:,} "
            f"({100 * tall['selfish_total'] / n:.2f} %); "
            f"catastrophic (claimed by none): {tall['catastrophic']:,} "
            f"({100 * tall['catastrophic'] / n:.2f} %), of which "
            f"{tall['untouched']:,} no expert moved. Consensus merging with k = 2 keeps the "
            f"{100 * (n - tall['catastrophic'] - tall['selfish_total']) / n:.2f} % claimed by at least two tasks.</p>"
        ),
        _img(figs, "tall_hist", "histogram of the number of masks selecting each weight"),
        _img(figs, "tall_tasks", "weights claimed per task"),
        _rows_table(
            ["task", "claimed", "claimed fraction", "selfish"],
            [[names[i], tall["claimed"][i], tall["claimed_fraction"][i], tall["selfish"][i]] for i in range(t)],
        ),
        "<h2>Density after each sparsifier</h2>",
        (
            "<p class='note'>Fraction of the model's entries left non-zero in each task vector. TIES and breadcrumbs "
            "are counted (per tensor, as the methods do); "
            "DARE and DELLA are exact expectations of their random drops.</p>"
        ),
        _img(figs, "density", "density after each sparsifier"),
        _rows_table(
            ["expert", "non-zero", "TIES", "DARE", "breadcrumbs", "DELLA"],
            [
                [
                    names[i],
                    d["nonzero"][i],
                    d["ties"]["kept"][i],
                    d["dare"]["kept"][i],
                    d["breadcrumbs"]["kept"][i],
                    d["della"]["kept"][i],
                ]
                for i in range(t)
            ],
        ),
        "<h2>Numbers</h2><p class='note'>Every number above, as JSON (also written next to this file).</p>",
        "<script type='application/json' id='mergelab-analysis'>"
        + json.dumps(result).replace("</", "<\\/")
        + "</script>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def write_report(
    result: dict[str, Any], html_path: str | Path, json_path: str | Path | None = None
) -> tuple[Path, Path]:
    """Write the HTML report and the JSON numbers (default: the report's path with ``.json``)."""
    html_path = Path(html_path).expanduser()
    json_path = Path(json_path).expanduser() if json_path is not None else html_path.with_suffix(".json")
    page = render_html(result)
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        html_path.write_text(page)
    except OSError as exc:
        raise OutputError(f"{html_path}: cannot write the report ({exc.strerror or exc})") from exc
    return html_path, json_path
