"""The command line: thin wrappers that parse flags, call the API and render results.

User errors (MergelabError) print as one line and exit non-zero, without a traceback; set
MERGELAB_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.table import Table

from mergelab.checkpoint.writer import fmt_bytes
from mergelab.cli_options import Device, Force, MaxShardSize, Quiet, Threads
from mergelab.errors import MergelabError

app = typer.Typer(
    name="mergelab",
    help="Fuse fine-tuned expert models that share a pretrained base.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


@contextlib.contextmanager
def _notes_as_lines() -> Iterator[None]:
    """Print output notes (a stale temporary folder removed) as one line each while a command runs."""
    from mergelab.checkpoint.output_guard import OutputNote

    previous = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, OutputNote):
            err_console.print(f"[yellow]note:[/] {message}", highlight=False, soft_wrap=True)
        else:
            previous(message, category, *args, **kwargs)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def user_errors(fn: F) -> F:
    """Print MergelabError as one line on stderr and exit with its code."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from mergelab.checkpoint.output_guard import Terminated, sigterm_as_interrupt

        try:
            with sigterm_as_interrupt(), _notes_as_lines():  # SIGTERM cleans up like Ctrl-C, for this command only
                return fn(*args, **kwargs)
        except Terminated as exc:
            err_console.print(f"[bold red]terminated[/] by signal {exc.signum}: nothing was written")
            raise typer.Exit(exc.exit_code) from None
        except MergelabError as exc:
            if os.environ.get("MERGELAB_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: nothing was written")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except Exception as exc:  # not a user error: one line and exit 1 (internal error), traceback on request
            if os.environ.get("MERGELAB_DEBUG"):
                raise
            first = (str(exc).splitlines() or [""])[0][:300]
            err_console.print(
                f"[bold red]internal error:[/] {type(exc).__name__}: {first} (a bug in mergelab or a plugin; "
                "rerun with MERGELAB_DEBUG=1 for the traceback and report it)",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _print_plan(summary: dict[str, Any]) -> None:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_row("method", summary["method"])
    t.add_row("base", str(summary["base"]))
    for i, e in enumerate(summary["experts"]):
        t.add_row("models" if i == 0 else "", e)
    t.add_row(
        "tensors", f"{summary['tensors']} ({summary['merged_tensors']} merged, {summary['copied_tensors']} copied)"
    )
    if summary["tied"]:
        t.add_row("tied", ", ".join(f"{a} → {b}" for a, b in summary["tied"].items()))
    t.add_row("layers", str(summary["num_layers"]))
    t.add_row("passes over the inputs", str(summary["passes"]))
    t.add_row("input read per pass", fmt_bytes(summary["input_bytes"]))
    if summary.get("output") == "adapter":
        t.add_row("output", "PEFT LoRA adapter (size set by the ranks the SVD keeps)")
    else:
        t.add_row("output size", fmt_bytes(summary["output_bytes"]))
    t.add_row("expected peak working memory", fmt_bytes(summary["expected_peak_bytes"]))
    err_console.print(t)
    for w in summary["warnings"]:
        err_console.print(f"[yellow]warning:[/] {w}")


def _check_output(out: Path, inputs: list[tuple[str, str]], force: bool, force_any: bool) -> None:
    """Refuse a bad OUT with one line before the plan is built (the merge checks it again)."""
    from mergelab.checkpoint.writer import check_destination

    check_destination(out, inputs, force=force, force_any=force_any)


@app.command()
@user_errors
def merge(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML (mergekit format)")],
    out: Annotated[Path, typer.Argument(help="output folder (must not exist unless --force)")],
    force: Annotated[
        bool, typer.Option("--force", help="replace OUT if it holds a previous mergelab output (and nothing else)")
    ] = False,
    force_any: Annotated[
        bool, typer.Option("--force-any", help="replace OUT whatever folder it is (never an input of the recipe)")
    ] = False,
    device: Device = "cpu",
    threads: Threads = None,
    seed: Annotated[int | None, typer.Option(help="seed for random methods (default: the recipe's, else 0)")] = None,
    dtype: Annotated[str | None, typer.Option("--dtype", help="compute dtype (default float32)")] = None,
    out_dtype: Annotated[str | None, typer.Option(help="output dtype (default: recipe dtype, else the base's)")] = None,
    max_shard_size: MaxShardSize = "2GB",
    hash_inputs: Annotated[
        bool, typer.Option(help="record BLAKE3 content hashes of the inputs in the model card")
    ] = True,
    quiet: Quiet = False,
    executor: Annotated[
        str,
        typer.Option(
            help="streaming (one process, tensor by tensor), memory (every input resident) "
            "or ray (jobs sharded across Ray workers)"
        ),
    ] = "streaming",
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", help="Ray cluster address (default: start a local Ray)")
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Ray workers (default: 2, or the cluster's CPUs)")] = None,
    read_workers: Annotated[
        int, typer.Option(help="input reads kept in flight (safetensors inputs; 1: one tensor at a time)")
    ] = 4,
    stages_dir: Annotated[
        Path | None,
        typer.Option(help="multi-stage recipes: keep the named stages here (default: a temporary folder)"),
    ] = None,
    allow_adapter_base_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-adapter-base-mismatch",
            help="read LoRA adapters whose recorded base is not base_model (recipe: allow_adapter_base_mismatch)",
        ),
    ] = False,
    adapter_out: Annotated[
        bool,
        typer.Option(
            "--adapter-out", help="write a PEFT LoRA adapter of the base (truncated SVD of merged − base) to OUT"
        ),
    ] = False,
    rank: Annotated[int | None, typer.Option(help="adapter rank (with --adapter-out)")] = None,
    energy: Annotated[
        float | None, typer.Option(help="per-module adapter rank keeping this fraction of ‖ΔW‖² (e.g. 0.9)")
    ] = None,
) -> None:
    """Merge the models of RECIPE into the folder OUT (streamed, atomic).

    A RECIPE with several YAML documents is a multi-stage recipe (mergekit-multi's form): the named
    stages run first, in dependency order, and the unnamed final one is written to OUT."""
    from mergelab.api import merge as run_merge
    from mergelab.api import plan_merge, run_inputs, summarize
    from mergelab.executors.base import check_read_workers, check_threads, resolve_device
    from mergelab.progress import RichProgress
    from mergelab.recipe import is_multi_stage, load_recipe, parse_dtype

    resolve_device(device)  # an unknown or unavailable device and a bad --threads fail before any input is opened
    check_threads(threads)
    check_read_workers(read_workers)
    # one set of run options for both paths (a single recipe and a multi-stage one)
    options: dict[str, Any] = {
        "force": force,
        "force_any": force_any,
        "device": device,
        "threads": threads,
        "seed": seed,
        "compute_dtype": dtype,
        "out_dtype": out_dtype,
        "max_shard_size": max_shard_size,
        "hash_inputs": hash_inputs,
        "progress": RichProgress(err_console, enabled=not quiet),
        "executor": executor,
        "workers": workers,
        "address": ray_address,
        "read_workers": read_workers,
    }
    if is_multi_stage(recipe):
        from mergelab.api import merge_stages

        if adapter_out or rank is not None or energy is not None:
            from mergelab.errors import OptionError

            raise OptionError(
                "--adapter-out/--rank/--energy: multi-stage recipes set output: adapter in their last stage"
            )

        done = merge_stages(recipe, out, stages_dir=stages_dir, **options)
        for st in done:
            what = "reused" if st.result is None else f"merged {st.result.stats.tensors} tensors"
            err_console.print(f"[green]stage {st.name or 'final'}[/]: {what} into {st.path}")
        return

    rec = load_recipe(recipe)
    if allow_adapter_base_mismatch:
        rec = rec.model_copy(update={"allow_adapter_base_mismatch": True})
    if adapter_out or rank is not None or energy is not None:
        from mergelab.lora.sink import with_adapter_output

        rec = with_adapter_output(rec, adapter_out=adapter_out, rank=rank, energy=energy)
    _check_output(out, run_inputs(recipe, rec), force, force_any)  # before any tensor is read
    from mergelab.routed.build import is_routed_method

    if is_routed_method(rec.merge_method):  # twin_merging, split_merge, smile, wemoe: a routed-model folder
        routed = run_merge(rec if not isinstance(recipe, Path) else recipe, out, **options)
        manifest = routed.plan_summary["routed"]
        router = manifest.get("router") or {}
        acc = router.get("validation_accuracy")
        err_console.print(manifest["storage"]["summary"], highlight=False)
        err_console.print(
            f"[green]built[/] {manifest['method']} ({len(manifest['experts'])} experts, {router.get('kind')} router"
            + (f", validation accuracy {100 * acc:.1f} %" if isinstance(acc, (int, float)) else "")
            + f") into {routed.path} in {routed.stats.seconds:.1f} s",
            highlight=False,
        )
        return
    plan = plan_merge(rec, out_dtype=out_dtype)
    try:
        if not quiet:
            _print_plan(summarize(plan, parse_dtype(dtype) or plan.recipe.compute_torch_dtype))
        else:  # warnings are never silenced (-q drops the plan table and the progress bar)
            for w in plan.warnings:
                err_console.print(f"[yellow]warning:[/] {w}")
        result = run_merge(plan.recipe, out, plan=plan, **options)
    finally:
        plan.close()
    from mergelab.routed import is_routed, read_manifest

    if is_routed(result.path):
        err_console.print(read_manifest(result.path)["storage"]["summary"])
    if "adapter" in result.plan_summary:
        _print_adapter(result.plan_summary["adapter"])
    s = result.stats
    err_console.print(
        f"[green]merged[/] {s.tensors} tensors into {result.path} in {s.seconds:.1f} s "
        f"(read {fmt_bytes(s.bytes_read)}, wrote {fmt_bytes(s.bytes_written)}, "
        f"peak RSS {fmt_bytes(s.peak_rss_bytes)})"
    )


def _print_adapter(report: dict[str, Any]) -> None:
    from mergelab.lora.sink import summary_lines

    for line in summary_lines(report):
        err_console.print(f"adapter: {line}", highlight=False, soft_wrap=True)


@app.command("extract-lora")
@user_errors
def extract_lora(
    expert: Annotated[str, typer.Argument(help="the full fine-tune (folder or Hub id)")],
    out: Annotated[Path, typer.Argument(help="output adapter folder (must not exist unless --force)")],
    base: Annotated[str, typer.Option("--base", help="the base model EXPERT was fine-tuned from")],
    rank: Annotated[int | None, typer.Option(help="LoRA rank of every module (capped at min(out, in))")] = None,
    energy: Annotated[
        float | None, typer.Option(help="per module, the smallest rank keeping this fraction of ‖τ‖² (e.g. 0.9)")
    ] = None,
    embeddings: Annotated[bool, typer.Option("--embeddings", help="also extract the embedding matrices")] = False,
    keep_non_lora: Annotated[
        bool,
        typer.Option(
            "--keep-non-lora", help="keep changed norms/biases (modules_to_save, lora_bias) instead of dropping"
        ),
    ] = False,
    svd_dtype: Annotated[str, typer.Option(help="float32 or float64")] = "float32",
    out_dtype: Annotated[str | None, typer.Option(help="the factors' dtype (default: the expert's)")] = None,
    force: Force = False,
    device: Device = "cpu",
    threads: Threads = None,
    quiet: Quiet = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the report (per-module ranks and errors) as JSON")
    ] = False,
) -> None:
    """Extract a PEFT LoRA adapter of BASE from the fine-tune EXPERT (truncated SVD of τ per module) into OUT."""
    from mergelab.lora.extract import extract_lora as run_extract
    from mergelab.progress import RichProgress

    res = run_extract(
        expert,
        base,
        out,
        rank=rank,
        energy=energy,
        embeddings=embeddings,
        keep_non_lora=keep_non_lora,
        svd_dtype=svd_dtype,
        dtype=out_dtype,
        force=force,
        device=device,
        threads=threads,
        progress=RichProgress(err_console, enabled=not quiet),
    )
    if as_json:
        console.print_json(json.dumps(res.report))
    elif not quiet:
        t = Table("module", "rank", "of", "rel. error", box=None, pad_edge=False)
        for name, m in res.report.get("modules", {}).items():
            t.add_row(name, str(m["rank"]), str(m["full_rank"]), f"{m['rel_error']:.3g}")
        err_console.print(t)
    _print_adapter(res.report)
    err_console.print(
        f"[green]extracted[/] {res.report.get('lora_modules', 0)} LoRA modules into {res.path} in "
        f"{res.stats.seconds:.1f} s ({fmt_bytes(res.report.get('adapter_bytes', 0))}, "
        f"{100 * res.size_ratio:.2f}% of the dense expert's {fmt_bytes(res.expert_bytes)})"
    )


@app.command()
@user_errors
def validate(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML")],
    out_dtype: Annotated[str | None, typer.Option(help="output dtype to check")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the plan summary as JSON")] = False,
) -> None:
    """Check RECIPE and its inputs (names, shapes, vocabularies, parameters) without reading tensor data."""
    from mergelab.api import plan_merge, summarize
    from mergelab.recipe import load_recipe
    from mergelab.routed.build import is_routed_method

    routed = load_recipe(recipe).merge_method
    plan = plan_merge(recipe, out_dtype=out_dtype)
    try:
        summary = summarize(plan)
    finally:
        plan.close()
    if is_routed_method(routed):  # the plan checked the inputs against the base; the method is the routed one
        summary["method"] = routed
    if as_json:
        console.print_json(json.dumps(summary))
    else:
        _print_plan(summary)
        err_console.print("[green]ok[/]: the recipe is valid and its inputs fit together")


@app.command()
@user_errors
def methods(
    markdown: Annotated[bool, typer.Option("--markdown", help="print the table as Markdown")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print a JSON list: name, aliases, kind, parameters with defaults, paper")
    ] = False,
) -> None:
    """List the merge methods with their papers and parameters (defaults in parentheses)."""
    from mergelab.methods.docs import method_rows, methods_markdown
    from mergelab.methods.registry import all_methods

    if markdown:
        sys.stdout.write(methods_markdown())
        return
    if as_json:
        sys.stdout.write(json.dumps(_methods_json(), indent=2, ensure_ascii=False) + "\n")
        return
    cards = list(zip(all_methods(), method_rows()))
    if console.width < 110:  # narrow or piped: one block per method, the name alone on its first line
        for m, row in cards:
            aka = f"  (aliases: {', '.join(m.aliases)})" if m.aliases else ""
            console.print(f"[bold]{m.name}[/]{aka}", highlight=False, no_wrap=True, overflow="ignore", crop=False)
            for key, value in (
                ("what", row["summary"]),
                ("paper", row["paper"]),
                ("global", row["params"]),
                ("per-model", row["model_params"]),
                ("base", row["base"]),
            ):
                console.print(f"  {key}: {value}", highlight=False)
        _print_routed_methods()
        return
    t = Table(title="mergelab merge methods", show_lines=True)
    # the name column never wraps or truncates: the other columns fold instead
    names = [m.name for m, _ in cards] + [a for m, _ in cards for a in m.aliases]
    t.add_column("method", no_wrap=True, overflow="ignore", min_width=max(map(len, names)) + 2)
    for col in ("paper", "global parameters", "per-model parameters", "base"):
        t.add_column(col, overflow="fold")
    for m, row in cards:
        label = "\n".join([m.name, *(f"= {a}" for a in m.aliases)])
        t.add_row(label, row["paper"], row["params"], row["model_params"], row["base"])
    console.print(t)
    _print_routed_methods()


def _print_routed_methods() -> None:
    """The routed methods (a routed-model folder: shared + adapters + router), after the merge methods."""
    from mergelab.routed.build import ROUTED_METHODS

    console.print("\n[bold]routed methods[/] (write shared/ + experts/<name>/ PEFT adapters + router/):")
    for m in ROUTED_METHODS.values():
        defaults = m.params().model_dump()
        params = ", ".join(f"{k} ({defaults[k]})" for k in m.params.model_fields)
        tag = " [experimental]" if m.experimental else ""
        console.print(f"[bold]{m.name}[/]{tag}", highlight=False)
        for key, value in (("what", m.summary), ("paper", m.paper), ("parameters", params), ("router", m.router)):
            console.print(f"  {key}: {value}", highlight=False)


def _methods_json() -> list[dict[str, Any]]:
    """``mergelab methods --json``: one object per registered method (JSON-safe defaults)."""
    from pydantic_core import PydanticUndefined

    from mergelab.methods.registry import all_methods

    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)

    def params(model: Any, scope: str) -> list[dict[str, Any]]:
        out = []
        for name, f in model.model_fields.items():
            required = f.default is PydanticUndefined
            out.append(
                {
                    "name": f.alias or name,
                    "scope": scope,
                    "required": required,
                    "default": None if required else plain(f.default),
                }
            )
        return out

    return [
        {
            "name": m.name,
            "aliases": list(m.aliases),
            "kind": "data-informed" if m.statistics is not None else "data-free",
            "outputs": m.outputs,
            "base": m.base,
            "min_experts": m.min_experts,
            "max_experts": m.max_experts,
            "parameters": params(m.params, "global") + params(m.model_params, "per-model"),
            "summary": m.summary,
            "paper": m.paper,
        }
        for m in all_methods()
    ]


@app.command()
@user_errors
def inspect(
    model: Annotated[str, typer.Argument(help="model folder, weights file or Hub id")],
    show_all: Annotated[bool, typer.Option("--all", help="list every tensor, not only the first 40")] = False,
) -> None:
    """Show a checkpoint's tensors, shapes, dtypes, size and shards (headers only)."""
    from collections import Counter

    from mergelab.checkpoint.reader import open_checkpoint
    from mergelab.plan import num_layers_from

    reader = open_checkpoint(model)
    try:
        metas = reader.tensors()
        cfg = reader.config() or {}
        total = sum(m.numel for m in metas.values())
        nbytes = sum(m.numel * __import__("torch").empty((), dtype=m.dtype).element_size() for m in metas.values())
        shards = Counter(m.file for m in metas.values())
        dtypes = Counter(str(m.dtype).removeprefix("torch.") for m in metas.values())
        head = Table(show_header=False, box=None)
        head.add_row("model", str(model))
        if cfg:
            head.add_row("architecture", ", ".join(cfg.get("architectures", [])) or str(cfg.get("model_type")))
        head.add_row("tensors", str(len(metas)))
        head.add_row("parameters", f"{total:,}")
        head.add_row("size", fmt_bytes(nbytes))
        head.add_row("dtypes", ", ".join(f"{k} ({v})" for k, v in dtypes.items()))
        head.add_row("layers", str(num_layers_from(cfg, list(metas))))
        head.add_row("shards", ", ".join(f"{k} ({v} tensors)" for k, v in sorted(shards.items())))
        console.print(head)
        t = Table()
        for col in ("tensor", "shape", "dtype", "shard"):
            t.add_column(col, overflow="fold")
        items = list(metas.values())
        for m in items if show_all else items[:40]:
            t.add_row(m.name, "×".join(map(str, m.shape)) or "scalar", str(m.dtype).removeprefix("torch."), m.file)
        console.print(t)
        if not show_all and len(items) > 40:
            console.print(f"… {len(items) - 40} more (use --all)")
    finally:
        reader.close()


PLUGIN_GROUP = "mergelab.commands"


def load_command_plugins(target: typer.Typer) -> None:
    """Let installed packages add commands: each entry point of the ``mergelab.commands`` group is a
    callable taking the typer app (the benchmark's ``zoo``, ``eval``, ``bench`` and ``demo`` come
    from ``mergelab_bench`` this way). A plugin that fails to load prints one warning line and is
    skipped, so the core commands keep working."""
    from importlib.metadata import entry_points

    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()(target)
        except Exception as exc:  # any failure of a plugin is reported the same way
            err_console.print(
                f"[yellow]warning:[/] command plugin {ep.name!r} ({ep.value}) not loaded: {type(exc).__name__}: {exc}",
                highlight=False,
                soft_wrap=True,
            )


def _register_subcommands() -> None:
    from mergelab.analysis.commands import analyze_command
    from mergelab.continual.commands import register as register_continual
    from mergelab.moe.commands import moe_command, moe_compress_command
    from mergelab.routed.commands import extract_command, routed_command
    from mergelab.search.commands import search_command

    load_command_plugins(app)
    app.command("extract")(user_errors(extract_command))
    app.command("routed")(user_errors(routed_command))
    app.command("analyze")(user_errors(analyze_command))
    app.command("moe")(user_errors(moe_command))
    app.command("moe-compress")(user_errors(moe_compress_command))
    register_continual(app, user_errors)
    app.command("search")(user_errors(search_command))


_register_subcommands()


HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"
"""torch's switch for transparent huge pages on its large CPU allocations (read at the first one)."""


def main() -> None:
    """The ``mergelab`` command. Large CPU tensors go on transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``,
    unless the environment sets it): a fresh 100 MB buffer then costs 50 page faults instead of
    25,000, which made bf16 → float32 casts 3× faster and a cold 3B merge 1.6× faster (README,
    *Performance*). Set ``THP_MEM_ALLOC_ENABLE=0`` to turn it off; where the kernel has no transparent
    huge pages torch's hint does nothing."""
    os.environ.setdefault(HUGE_PAGES_ENV, "1")
    app()


if __name__ == "__main__":
    main()
