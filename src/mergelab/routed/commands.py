"""CLI commands for routed outputs (registered in ``mergelab.cli``).

``extract_command`` is ``mergelab extract FOLDER TASK OUT [--force | --force-any]``; ``routed_command``
is ``mergelab routed FOLDER`` (list the tasks and the storage report). Both raise
``MergelabError`` for user errors; the CLI's ``user_errors`` wrapper prints them in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mergelab.cli_options import ForceAny, MaxShardSize


def extract_command(
    folder: Annotated[Path, typer.Argument(help="output of a tall_masks / emr merge, or a routed-model folder")],
    task: Annotated[str, typer.Argument(help="task name, index or model reference (see `mergelab routed FOLDER`)")],
    out: Annotated[Path, typer.Argument(help="where to write the task's model (must not exist unless --force)")],
    force: Annotated[
        bool, typer.Option("--force", help="replace OUT if it holds a previous mergelab output (and nothing else)")
    ] = False,
    force_any: ForceAny = False,
    max_shard_size: MaxShardSize = "2GB",
) -> None:
    """Rebuild one TASK of a routed merge in FOLDER as a plain Hugging Face checkpoint in OUT."""
    from mergelab.checkpoint.writer import fmt_bytes
    from mergelab.routed.extract import extract
    from mergelab.routed.format import format_storage

    err = Console(stderr=True)
    result = extract(folder, task, out, force=force, force_any=force_any, max_shard_size=max_shard_size)
    t = result.task
    if "adapter" in t:  # a routed-model folder: the route's expert, shared + its adapter
        err.print(
            f"[green]extracted[/] expert {t['index']} ({t['name']}) into {result.path}: {result.tensors} tensors, "
            f"{fmt_bytes(result.bytes_written)} (shared/ + {t['adapter']}/)",
            highlight=False,
        )
        return
    err.print(
        f"[green]extracted[/] task {t['index']} ({t['name']}) into {result.path}: {result.tensors} tensors, "
        f"{fmt_bytes(result.bytes_written)}, scale {t['scale']:.6g}, mask keeps {100 * t.get('mask_density', 0):.2f} %",
        highlight=False,
    )
    storage = result.manifest.get("storage")
    if storage:
        err.print(format_storage(storage), highlight=False)


def routed_command(
    folder: Annotated[Path, typer.Argument(help="output of a tall_masks / emr merge, or a routed-model folder")],
) -> None:
    """List the tasks (experts) of a routed output in FOLDER with their parts, router and storage."""
    from mergelab.routed.bundle import is_bundle, read_bundle_manifest
    from mergelab.routed.format import format_storage, read_manifest

    if is_bundle(folder):
        bundle = read_bundle_manifest(folder)
        console = Console()
        router = bundle.get("router") or {}
        acc = router.get("validation_accuracy")
        table = Table(
            title=f"{folder}: {bundle['method']} ({len(bundle['experts'])} experts, "
            f"{bundle['routing']['kind']} router, {bundle['routing']['mixing']} per {bundle['routing']['granularity']}"
            + (f", validation accuracy {100 * acc:.1f} %" if isinstance(acc, (int, float)) else "")
            + ")"
        )
        for col in ("index", "name", "model", "adapter", "LoRA modules", "rank", "bytes"):
            table.add_column(col, overflow="fold")
        for e in bundle["experts"]:
            table.add_row(
                str(e["index"]), e["name"], e["model"], e["adapter"], str(e.get("lora_modules", "")),
                f"{e.get('rank_min')}–{e.get('rank_max')}", str(e.get("bytes", "")),
            )  # fmt: skip
        console.print(table)
        console.print(bundle["storage"]["summary"], highlight=False)
        return
    manifest = read_manifest(folder)
    console = Console()
    table = Table(title=f"{folder}: {manifest.get('method')} ({len(manifest['tasks'])} tasks)")
    for col in ("index", "name", "model", "scale", "mask keeps"):
        table.add_column(col, overflow="fold")
    for t in manifest["tasks"]:
        table.add_row(
            str(t["index"]), t["name"], t["model"], f"{t['scale']:.6g}", f"{100 * t.get('mask_density', 0):.2f} %"
        )
    console.print(table)
    if manifest.get("storage"):
        console.print(format_storage(manifest["storage"]), highlight=False)
