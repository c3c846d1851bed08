"""``mergelab demo``: a complete merge on models built locally, with no downloads.

Builds a small random-init Llama base and three "fine-tunes" (dense, sparse, and one whose
update conflicts in sign with the first), merges them with TIES, reloads the result with
``transformers.AutoModelForCausalLM`` and shows how much of each expert's update the merge
kept (cosine between the merged task vector and each expert's).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table


def default_workdir() -> Path:
    root = Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))
    return root / "demo"


def run_demo(workdir: Path | None = None, console: Console | None = None, err_console: Console | None = None) -> Path:
    """Build (once) the demo models, merge them with TIES, verify the output; returns its folder."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    from mergelab.api import merge
    from mergelab.progress import RichProgress
    from mergelab.synthetic import make_family

    console = console or Console()
    err_console = err_console or Console(stderr=True)
    work = Path(workdir) if workdir else default_workdir()
    models = work / "models"
    if not (models / "expert_2" / "config.json").is_file():
        err_console.print(f"building demo checkpoints in {models} …")
        make_family(models, n_experts=3, hidden=128, layers=4, intermediate=256, vocab=512, max_shard_size="300KB")
    recipe = {
        "merge_method": "ties",
        "base_model": str(models / "base"),
        "models": [
            {"model": str(models / f"expert_{i}"), "parameters": {"weight": 1.0, "density": 0.2}} for i in range(3)
        ],
        "parameters": {"lambda": 1.0},
        "dtype": "float32",
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / "merged-ties"
    result = merge(recipe, out, force=True, progress=RichProgress(err_console))
    err_console.print(f"merged {result.stats.tensors} tensors in {result.stats.seconds:.2f} s → {out}")

    merged = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(models / "base"))
    ids = torch.arange(0, 32).unsqueeze(0)
    with torch.no_grad():
        logits = merged(ids).logits
    table = Table(title="TIES merge of 3 experts (density 0.2): what the merge kept")
    table.add_column("expert")
    table.add_column("kind")
    table.add_column("cos(merged Δ, expert Δ)", justify="right")
    base_sd = base.state_dict()
    merged_sd = merged.state_dict()
    m_delta = torch.cat([(merged_sd[k] - base_sd[k]).flatten() for k in base_sd if base_sd[k].is_floating_point()])
    for i, kind in enumerate(("dense", "sparse", "conflict")):
        e = AutoModelForCausalLM.from_pretrained(str(models / f"expert_{i}")).state_dict()
        e_delta = torch.cat([(e[k] - base_sd[k]).flatten() for k in base_sd if base_sd[k].is_floating_point()])
        cos = torch.nn.functional.cosine_similarity(m_delta, e_delta, dim=0).item()
        table.add_row(f"expert_{i}", kind, f"{cos:+.3f}")
    console.print(table)
    console.print(
        f"The merged model loads with transformers (logits {tuple(logits.shape)}, finite: "
        f"{bool(torch.isfinite(logits).all())}). Recipe: {work / 'recipe.yaml'}; model card: {out / 'README.md'}"
    )
    return out
