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


def extract_command(
    folder: Annotated[Path, typer.Argument(help="output folder of a tall_masks or emr merge")],
    task: Annotated[str, typer.Argument(help="task name, index or model reference (see `mergelab routed FOLDER`)")],
    out: Annotated[Path, typer.Argument(help="where to write the task's model (must not exist unless --force)")],
    force: Annotated[
        bool, typer.Option("--force", help="replace OUT if it holds a previous mergelab output (and nothing else)")
    ] = False,
    force_any: Annotated[bool, typer.Option("--force-any", help="replace OUT whatever folder it is")] = False,
    max_shard_size: Annotated[str, typer.Option(help="largest output shard, e.g. 2GB, 500MB")] = "2GB",
) -> None:
    """Rebuild one TASK of a routed merge in FOLDER as a plain Hugging Face checkpoint in OUT."""
    from mergelab.routed.extract import extract
    from mergelab.routed.format import fmt_bytes, format_storage

    err = Console(stderr=True)
    result = extract(folder, task, out, force=force, force_any=force_any, max_shard_size=max_shard_size)
    t = result.task
    err.print(
        f"[green]extracted[/] task {t['index']} ({t['name']}) into {result.path}: {result.tensors} tensors, "
        f"{fmt_bytes(result.bytes_written)}, scale {t['scale']:.6g}, mask keeps {100 * t.get('mask_density', 0):.2f} %",
        highlight=False,
    )
    storage = result.manifest.get("storage")
    if storage:
        err.print(format_storage(storage), highlight=False)


def routed_command(
    folder: Annotated[Path, typer.Argument(help="output folder of a tall_masks or emr merge")],
) -> None:
    """List the tasks of a routed merge in FOLDER with their scales, mask densities and storage."""
    from mergelab.routed.format import format_storage, read_manifest

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
