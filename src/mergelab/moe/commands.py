"""CLI commands of the MoE jobs (registered in ``mergelab.cli`` as ``moe`` and ``moe-compress``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mergelab.checkpoint.writer import fmt_bytes
from mergelab.cli_options import Device, Force, ForceAny, MaxShardSize, Quiet, Threads


def moe_command(
    recipe: Annotated[Path, typer.Argument(help="mergekit-moe recipe YAML (base_model, gate_mode, experts, ...)")],
    out: Annotated[Path, typer.Argument(help="output folder (must not exist unless --force)")],
    force: Force = False,
    force_any: ForceAny = False,
    device: Annotated[
        str, typer.Option(help="where the base runs on the prompts: cpu, cuda, cuda:N, mps, auto")
    ] = "cpu",
    threads: Threads = None,
    dtype: Annotated[str, typer.Option("--dtype", help="dtype of the base on the prompts (mergekit-moe: bfloat16)")] = (
        "float32"
    ),
    max_shard_size: MaxShardSize = "2GB",
    allow_all_same: Annotated[
        bool,
        typer.Option(
            "--i-understand-this-is-not-useful-without-training",
            help="build even when every expert is the same model (to train it afterwards)",
        ),
    ] = False,
    allow_adapter_base_mismatch: Annotated[
        bool,
        typer.Option("--allow-adapter-base-mismatch", help="read LoRA experts whose recorded base is not base_model"),
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Build a mixture-of-experts model from dense fine-tunes of one base (mergekit-moe's recipes).

    Each expert's MLP becomes a routed expert; attention, norms and embeddings come from the base;
    the routers are set from the prompts' hidden states (gate_mode hidden, hidden_avg, cheap_embed)
    or at random. Output: Mixtral, Qwen2-MoE or Qwen3-MoE, as transformers loads it."""
    from mergelab.moe.upcycling import upcycle
    from mergelab.progress import RichProgress

    err = Console(stderr=True)
    res = upcycle(
        recipe,
        out,
        force=force,
        force_any=force_any,
        device=device,
        threads=threads,
        compute_dtype=dtype,
        max_shard_size=max_shard_size,
        allow_all_same=allow_all_same,
        allow_adapter_base_mismatch=allow_adapter_base_mismatch,
        progress=RichProgress(err, enabled=not quiet),
    )
    for w in res.warnings:
        err.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    err.print(
        f"[green]built[/] {res.architecture} with {res.num_experts} experts ({res.experts_per_token} per token, "
        f"gate mode {res.gate_mode}) into {res.path}: {res.stats.tensors} tensors, "
        f"{fmt_bytes(res.stats.bytes_written)} in {res.report['seconds']:.1f} s",
        highlight=False,
    )


def moe_compress_command(
    moe: Annotated[str, typer.Argument(help="the MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE folder)")],
    out: Annotated[Path, typer.Argument(help="output folder (must not exist unless --force)")],
    to: Annotated[int, typer.Option("--to", help="experts per layer after compression (K)")],
    method: Annotated[str, typer.Option(help="msmoe, submoe (experimental) or prune-frequency")] = "msmoe",
    calibration: Annotated[
        str | None, typer.Option(help="calibration data: a JSONL ({'text': ...}) or text file, or zoo:<task>")
    ] = None,
    grouping: Annotated[str, typer.Option(help="layer (K per layer) or global (K × layers in all)")] = "layer",
    layout: Annotated[
        str | None, typer.Option(help="shared (router kept, N slots) or distinct (K experts); default: the method's")
    ] = None,
    router_rows: Annotated[
        str, typer.Option(help="--layout distinct: a group's router row: weighted, sum or dominant")
    ] = "weighted",
    align: Annotated[bool, typer.Option("--align", help="align members to their core by weight matching")] = False,
    rank: Annotated[int | None, typer.Option(help="submoe: rank of each merged matrix (default: full)")] = None,
    num_examples: Annotated[int, typer.Option(help="calibration examples")] = 256,
    batch_size: Annotated[int, typer.Option(help="calibration batch size")] = 8,
    max_length: Annotated[int, typer.Option(help="tokens per calibration example")] = 512,
    output_tokens: Annotated[int, typer.Option(help="submoe: tokens per layer for expert outputs")] = 512,
    dtype: Annotated[str, typer.Option("--dtype", help="dtype of the MoE during calibration")] = "float32",
    device: Device = "cpu",
    threads: Threads = None,
    force: Force = False,
    force_any: ForceAny = False,
    max_shard_size: MaxShardSize = "2GB",
    as_json: Annotated[bool, typer.Option("--json", help="print the report (groups per layer) as JSON")] = False,
    quiet: Quiet = False,
) -> None:
    """Shrink an MoE to K experts per layer by merging (M-SMoE, Sub-MoE) or pruning its experts.

    Usage frequencies and router logits come from running the MoE on the calibration data; each
    layer's experts are grouped around the most used ones and merged weighted by usage."""
    from mergelab.moe.compression import compress
    from mergelab.progress import RichProgress

    err = Console(stderr=True)
    res = compress(
        moe,
        out,
        to=to,
        method=method,
        calibration=calibration,
        grouping=grouping,
        layout=layout,
        router_rows=router_rows,
        align=align,
        rank=rank,
        num_examples=num_examples,
        batch_size=batch_size,
        max_length=max_length,
        output_tokens=output_tokens,
        dtype=dtype,
        device=device,
        threads=threads,
        force=force,
        force_any=force_any,
        max_shard_size=max_shard_size,
        progress=RichProgress(err, enabled=not quiet),
    )
    r = res.report
    if as_json:
        Console().print_json(json.dumps(r))
    elif not quiet:
        for layer, g in r["groups"].items():
            err.print(f"layer {layer}: groups {g['groups']}" + (f", dropped {g['dropped']}" if g["dropped"] else ""))
    ks = sorted(set(r["experts_per_layer"].values()))
    err.print(
        f"[green]compressed[/] {r['input']} ({r['experts_before']} experts per layer) to "
        f"{'/'.join(map(str, ks))} with {r['method']}{' (experimental)' if r['experimental'] else ''}, "
        f"layout {r['layout']}, into {res.path} ({r['statistics']['tokens']} calibration tokens, "
        f"{r['seconds']:.1f} s)",
        highlight=False,
    )
