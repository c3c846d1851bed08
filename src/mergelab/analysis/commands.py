"""CLI command for the task-vector analysis (registered in ``mergelab.cli`` as ``analyze``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from mergelab.cli_options import Quiet


def analyze_command(
    inputs: Annotated[list[str], typer.Argument(help="a recipe YAML, or the expert models (with --base)")],
    report: Annotated[
        Path, typer.Option("--report", help="HTML report to write (numbers go to the same name with .json)")
    ] = Path("analysis.html"),
    base: Annotated[
        str | None, typer.Option("--base", help="base model (required when listing models; overrides the recipe's)")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="where to write the numbers (default: REPORT with .json)")
    ] = None,
    topk: Annotated[
        float, typer.Option(help="fraction of largest |τ| entries per tensor used for sign conflicts")
    ] = 0.2,
    tall_lambda: Annotated[float, typer.Option(help="λ of the TALL masks")] = 0.6,
    quiet: Quiet = False,
) -> None:
    """Compare the experts' task vectors.

    Cosines, sign conflicts, per-layer norms, TALL-mask overlap and sparsifier densities.
    """
    from mergelab.analysis.report import write_report
    from mergelab.analysis.run import analyze
    from mergelab.analysis.stats import AnalysisOptions
    from mergelab.errors import RecipeError
    from mergelab.progress import RichProgress

    err = Console(stderr=True)
    try:
        opts = AnalysisOptions(topk=topk, tall_lambda=tall_lambda)
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    is_recipe = len(inputs) == 1 and inputs[0].lower().endswith((".yaml", ".yml"))
    progress = RichProgress(err, enabled=not quiet)
    if is_recipe:
        result = analyze(inputs[0], base=base, options=opts, progress=progress)
    else:
        if base is None:
            raise RecipeError("give a recipe YAML, or the expert models together with --base BASE")
        result = analyze(models=inputs, base=base, options=opts, progress=progress)
    html_path, json_path = write_report(result, report, json_out)
    names = result["names"]
    err.print(
        f"[green]analysed[/] {len(names)} experts over {result['parameters']:,} parameters: "
        f"{html_path} ({json_path.name})",
        highlight=False,
    )
    cos = result["cosine"]["matrix"]
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            c = cos[i][j]
            r = result["sign_conflict"]["rate"][i][j]
            err.print(
                f"  {names[i]} · {names[j]}: cosine {'–' if c is None else f'{c:+.3f}'}, "
                f"top-{topk:g} sign conflicts {'–' if r is None else f'{100 * r:.1f} %'}",
                highlight=False,
            )
