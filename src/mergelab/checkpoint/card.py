"""The model card (README.md) written with every merged model: recipe, method and provenance."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping

import yaml

from mergelab.methods.base import MergeMethod, MethodParams


def _params_text(p: MethodParams) -> str:
    data = p.model_dump(by_alias=True)
    return ", ".join(f"{k}={v}" for k, v in data.items()) or "none"


def model_card(
    *,
    recipe_yaml: str,
    method: MergeMethod,
    global_params: MethodParams,
    base_label: str | None,
    expert_labels: list[str],
    expert_params: list[MethodParams],
    hashes: Mapping[str, str],
    version: str,
    stats: Mapping[str, str],
) -> str:
    """Markdown with a YAML front matter that the Hugging Face Hub understands."""
    front = {
        "library_name": "transformers",
        "tags": ["merge", "mergelab", method.name],
        "base_model": [base_label] if base_label else list(expert_labels),
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [
        "# Merged model",
        "",
        f"Made with mergelab {version} on {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}.",
        "",
        "## Method",
        "",
        f"**{method.name}**: {method.summary}",
        "",
        f"Reference: {method.paper}.",
        "",
        f"Global parameters (defaults filled in): {_params_text(global_params)}.",
        "",
        "## Inputs",
        "",
        "| role | model | parameters | content hash (BLAKE3 of tensors) |",
        "| --- | --- | --- | --- |",
    ]
    if base_label:
        lines.append(f"| base | `{base_label}` | | `{hashes.get(base_label, 'not computed')}` |")
    for label, p in zip(expert_labels, expert_params):
        lines.append(f"| expert | `{label}` | {_params_text(p)} | `{hashes.get(label, 'not computed')}` |")
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.strip(), "```", ""]
    if stats:
        lines += ["## Run", ""] + [f"- {k}: {v}" for k, v in stats.items()] + [""]
    lines += [
        "The content hash is the BLAKE3 over the sorted (tensor name, dtype, shape, BLAKE3 of the tensor's bytes) "
        "of every tensor read, so it does not depend on how a model is sharded.",
        "",
    ]
    return "\n".join(lines)
