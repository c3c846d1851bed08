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
    adapter: list[str] | None = None,
) -> str:
    """Markdown with a YAML front matter that the Hugging Face Hub understands.

    ``adapter``: the output is a PEFT LoRA adapter of the base (``output: adapter``); its summary
    lines (ranks, reconstruction errors, size) go in an "Adapter" section and the card is tagged
    for PEFT (``library_name: peft``, tags ``lora`` and ``adapter``).
    """
    front = {
        "library_name": "peft" if adapter is not None else "transformers",
        "tags": ["merge", "mergelab", method.name] + (["lora", "adapter", "peft"] if adapter is not None else []),
        "base_model": [base_label] if base_label else list(expert_labels),
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines += [
        "# Merged LoRA adapter" if adapter is not None else "# Merged model",
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
    if adapter is not None:
        lines += [
            "",
            "## Adapter",
            "",
            f"A PEFT LoRA adapter of `{base_label}`: load it with `PeftModel.from_pretrained(base, this_folder)`. "
            "Per-module ranks and relative Frobenius reconstruction errors are in `adapter_report.json`.",
            "",
        ]
        lines += [f"- {line}" for line in adapter]
    lines += ["", "## Recipe", "", "```yaml", recipe_yaml.strip(), "```", ""]
    if stats:
        lines += ["## Run", ""] + [f"- {k}: {v}" for k, v in stats.items()] + [""]
    lines += [
        "The content hash is the BLAKE3 over the sorted (tensor name, dtype, shape, BLAKE3 of the tensor's bytes) "
        "of every tensor read, so it does not depend on how a model is sharded.",
        "",
    ]
    return "\n".join(lines)
