"""``mergelab continual``: init, add, status, export (registered in ``mergelab.cli``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mergelab.checkpoint.writer import fmt_bytes
from mergelab.cli_options import Device, Force, ForceAny, MaxShardSize, Quiet, Threads
from mergelab.errors import OptionError


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["alpha=0.5", "exclude=lm_head"]`` → ``{"alpha": 0.5, "exclude": "lm_head"}`` (values read as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"--param {item!r}: give KEY=VALUE, e.g. --param alpha=0.5")
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def init_command(
    base: Annotated[str, typer.Argument(help="the base model (folder, weights file or Hub id)")],
    state: Annotated[Path, typer.Argument(help="the state folder to create")],
    method: Annotated[
        str, typer.Option(help="opcm, dop, average, task_arithmetic, ties or magmax (mergelab continual methods)")
    ] = "opcm",
    param: Annotated[
        list[str] | None, typer.Option("--param", help="a method parameter KEY=VALUE (repeat for several)")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="replace STATE if it is a previous mergelab output")] = False,
    force_any: Annotated[bool, typer.Option("--force-any", help="replace STATE whatever folder it is")] = False,
) -> None:
    """Create a continual merge of BASE in the folder STATE (headers only; no tensor is read)."""
    from mergelab.continual.session import ContinualMerge

    err = Console(stderr=True)
    cm = ContinualMerge.init(base, state, method=method, params=parse_params(param), force=force, force_any=force_any)
    params = ", ".join(f"{k}={v}" for k, v in cm.record.params.items()) or "no parameters"
    err.print(
        f"[green]created[/] {cm.folder}: {cm.method.name} ({params}) over {cm.record.base.label}", highlight=False
    )
    err.print(f"expected peak working memory per add: {cm.expected_peak().line()}", highlight=False)


def add_command(
    state: Annotated[Path, typer.Argument(help="the state folder (mergelab continual init)")],
    expert: Annotated[str, typer.Argument(help="the new expert (folder, weights file or Hub id)")],
    name: Annotated[str | None, typer.Option(help="label recorded for the expert (default: as given)")] = None,
    base: Annotated[str | None, typer.Option(help="the base, if it moved since init (same tensors)")] = None,
    device: Device = "cpu",
    threads: Threads = None,
    max_shard_size: Annotated[str, typer.Option(help="largest shard of the state's task vector")] = "2GB",
    quiet: Quiet = False,
) -> None:
    """Merge EXPERT into the continual merge in STATE (one streamed pass; the state is replaced atomically)."""
    from mergelab.continual.session import ContinualMerge
    from mergelab.progress import RichProgress

    err = Console(stderr=True)
    cm = ContinualMerge.open(state, base=base)
    err.print(
        f"adding expert #{cm.record.steps + 1} to {cm.folder} ({cm.method.name}); expected peak working memory "
        f"{cm.expected_peak().line()}",
        highlight=False,
    )
    rep = cm.add(
        expert,
        name=name,
        device=device,
        threads=threads,
        max_shard_size=max_shard_size,
        progress=RichProgress(err, enabled=not quiet),
    )
    e = rep.expert
    extra = "".join(f", {k} = {v:.4g}" for k, v in e.history.items())
    err.print(
        f"[green]added[/] expert #{e.index} {e.label} (content hash {e.content_hash[:16]}…) in {e.seconds:.1f} s: "
        f"‖τ‖ = {e.task_vector_norm:.4g}, ‖merged − base‖ = {e.merged_norm:.4g}{extra} "
        f"(read {fmt_bytes(rep.bytes_read)}, peak RSS {fmt_bytes(rep.peak_rss_bytes)})",
        highlight=False,
    )


def status_command(
    state: Annotated[Path, typer.Argument(help="the state folder")],
    base: Annotated[str | None, typer.Option(help="the base, if it moved since init")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
) -> None:
    """Show the experts merged so far (hashes, norms, λ history), the method and the storage."""
    from mergelab.continual.session import ContinualMerge

    s = ContinualMerge.open(state, base=base).status()
    out = Console()
    if as_json:
        out.print_json(json.dumps(s.to_dict()))
        return
    params = ", ".join(f"{k}={v}" for k, v in s.params.items()) or "none"
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_row("state", str(s.folder))
    head.add_row("method", f"{s.method} ({params})")
    head.add_row("base", f"{s.base['label']} (content hash {(s.base.get('content_hash') or 'not yet computed')[:16]})")
    head.add_row("experts", str(len(s.experts)))
    head.add_row("scale", f"merged = base + {s.scale:.6g} × running task vector")
    head.add_row("storage", f"{fmt_bytes(s.state_bytes)} (running task vector {fmt_bytes(s.task_vector_bytes)})")
    peak = s.expected_peak
    head.add_row(
        "next add",
        f"expected peak {fmt_bytes(peak['bytes'])} (tensor {peak['tensor']})" if "bytes" in peak else peak["error"],
    )
    out.print(head)
    if s.experts:
        t = Table("#", "expert", "content hash", "‖τ‖", "‖merged − base‖", *s.history, "added", box=None)
        for e in s.experts:
            t.add_row(
                str(e["index"]),
                e["label"],
                e["content_hash"][:16],
                f"{e['task_vector_norm']:.4g}",
                f"{e['merged_norm']:.4g}",
                *(f"{e['history'].get(k, float('nan')):.4g}" for k in s.history),
                e["added"],
            )
        out.print(t)


def export_command(
    state: Annotated[Path, typer.Argument(help="the state folder")],
    out: Annotated[Path, typer.Argument(help="output folder (must not exist unless --force)")],
    base: Annotated[str | None, typer.Option(help="the base, if it moved since init")] = None,
    force: Force = False,
    force_any: ForceAny = False,
    out_dtype: Annotated[str | None, typer.Option(help="dtype of the float tensors (default: the base's)")] = None,
    max_shard_size: MaxShardSize = "2GB",
    device: Device = "cpu",
    threads: Threads = None,
    quiet: Quiet = False,
) -> None:
    """Write the current merged model of STATE to OUT as a plain Hugging Face checkpoint (atomic)."""
    from mergelab.continual.session import ContinualMerge
    from mergelab.progress import RichProgress

    err = Console(stderr=True)
    cm = ContinualMerge.open(state, base=base)
    path = cm.export(
        out,
        force=force,
        force_any=force_any,
        out_dtype=out_dtype,
        max_shard_size=max_shard_size,
        device=device,
        threads=threads,
        progress=RichProgress(err, enabled=not quiet),
    )
    err.print(
        f"[green]exported[/] the merge of {cm.record.steps} experts ({cm.method.name}) to {path}", highlight=False
    )


def methods_command() -> None:
    """List the continual methods with their papers and parameters (defaults in parentheses)."""
    from mergelab.continual.methods import METHODS

    out = Console()
    for m in METHODS.values():
        params = ", ".join(f"{f.alias or n} ({f.default})" for n, f in m.params.model_fields.items()) or "none"
        out.print(f"[bold]{m.name}[/]: {m.summary}", highlight=False)
        out.print(f"  paper: {m.paper}", highlight=False)
        out.print(f"  parameters: {params}", highlight=False)


def register(app: typer.Typer, user_errors: Any) -> None:
    """Add the ``continual`` sub-commands to the CLI app (each wrapped in the CLI's error handler)."""
    sub = typer.Typer(
        help="Continual merging: add experts one at a time to a running state (OPCM, DOP, baselines).",
        no_args_is_help=True,
    )
    sub.command("init")(user_errors(init_command))
    sub.command("add")(user_errors(add_command))
    sub.command("status")(user_errors(status_command))
    sub.command("export")(user_errors(export_command))
    sub.command("methods")(user_errors(methods_command))
    app.add_typer(sub, name="continual")
