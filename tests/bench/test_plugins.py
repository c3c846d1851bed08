"""How the benchmark plugs into the core: its commands through the ``mergelab.commands`` entry
points, the ``zoo:`` calibration sources through the core's source-kind registry; a broken
plugin leaves the core commands working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mergelab import cli
from mergelab.data import sources
from mergelab.data.config import CalibrationSource
from mergelab.errors import RecipeError

runner = CliRunner()


def test_the_bench_commands_come_from_the_entry_point() -> None:
    from importlib.metadata import entry_points

    assert [ep.value for ep in entry_points(group="mergelab.commands")] == ["mergelab_bench.cli:register"]
    res = runner.invoke(cli.app, ["--help"])
    assert res.exit_code == 0, res.output
    for name in ("merge", "demo", "zoo", "eval", "bench", "analyze"):
        assert f" {name} " in res.output


class _BrokenEntryPoint:
    name, value = "broken", "no_such_module:register"

    def load(self):
        raise ModuleNotFoundError("No module named 'no_such_module'")


def test_a_broken_plugin_is_one_warning_line(monkeypatch) -> None:
    import importlib.metadata

    import typer

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [_BrokenEntryPoint()])
    app = typer.Typer()
    app.command()(lambda: None)
    err = []
    monkeypatch.setattr(cli.err_console, "print", lambda msg, **kw: err.append(msg))
    cli.load_command_plugins(app)
    assert len(err) == 1 and "'broken'" in err[0] and "ModuleNotFoundError" in err[0] and "\n" not in err[0]
    assert len(app.registered_commands) == 1


def test_mergelab_merge_works_with_a_broken_plugin(family, tmp_path: Path) -> None:
    base, experts = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "base_model": str(base),
                "models": [{"model": str(e), "parameters": {"weight": 0.5}} for e in experts[:2]],
            }
        )
    )
    code = (
        "import importlib.metadata as md, sys\n"
        "real = md.entry_points\n"
        "def fake(**kw):\n"
        "    if kw.get('group') == 'mergelab.commands':\n"
        "        return [md.EntryPoint('broken', 'no_such_module:register', 'mergelab.commands')]\n"
        "    return real(**kw)\n"
        "md.entry_points = fake\n"
        "from mergelab.cli import main\n"
        "sys.argv = ['mergelab'] + sys.argv[1:]\n"
        "main()\n"
    )
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-c", code, "merge", str(recipe), str(out), "--quiet", "--no-hash-inputs"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    warnings = [line for line in res.stderr.splitlines() if "plugin" in line]
    assert len(warnings) == 1 and "'broken'" in warnings[0]
    assert json.loads((out / "config.json").read_text())


@pytest.fixture()
def no_source_kinds(monkeypatch):
    """The core's registry as in a fresh process: nothing registered, entry points not yet read."""
    monkeypatch.setattr(sources, "_KINDS", {})
    monkeypatch.setattr(sources, "_entry_points_loaded", False)


def test_zoo_sources_are_found_through_the_entry_point(no_source_kinds, tiny_zoo_manifest: Path) -> None:
    source = CalibrationSource(zoo_task="beta", split="train", zoo=str(tiny_zoo_manifest))
    ex = sources.load_examples(source, 5)
    assert len(ex) == 5 and ex.label_names == ["x", "y", "z"]
    assert set(ex.labels) <= {"x", "y", "z"}
    head = sources.zoo_head_path("beta", str(tiny_zoo_manifest))
    assert head.name == "head.safetensors" and head.is_file()


def test_an_unregistered_source_kind_is_a_recipe_error(no_source_kinds, monkeypatch) -> None:
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [])
    with pytest.raises(RecipeError, match="zoo:"):
        sources.load_examples(CalibrationSource.model_validate("zoo:alpha"), 3)


def test_register_source_kind_replaces_a_kind(no_source_kinds) -> None:
    seen = []

    def loader(source, limit):
        seen.append((source.zoo_task, source.split, limit))
        return sources.Examples(["a", "b"])

    sources.register_source_kind("zoo", loader)
    assert sources.load_examples(CalibrationSource.model_validate("zoo:t:validation"), 2).texts == ["a", "b"]
    assert seen == [("t", "validation", 2)]
    with pytest.raises(RecipeError, match="no task heads"):
        sources.zoo_head_path("t")


def test_a_fresh_process_reads_zoo_sources_without_importing_the_benchmark_first(tiny_zoo_manifest: Path) -> None:
    """The core alone (no mergelab_bench import, no CLI): the entry point brings the zoo kind in."""
    code = (
        "import sys\n"
        "from mergelab.data import sources\n"
        "from mergelab.data.config import CalibrationSource\n"
        "assert 'mergelab_bench' not in sys.modules\n"
        "ex = sources.load_examples(\n"
        f"    CalibrationSource(zoo_task='alpha', split='validation', zoo={str(tiny_zoo_manifest)!r}), 4\n"
        ")\n"
        "print(len(ex), ex.label_names, 'mergelab_bench' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["4", "['no',", "'yes']", "True"]


def test_no_core_module_names_the_benchmark_package() -> None:
    """The import-linter contract cannot see namespace folders (no __init__.py): scan every core file."""
    import ast

    import mergelab

    root = Path(mergelab.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            offenders += [
                f"{path.relative_to(root)}:{node.lineno}" for n in names if n.split(".")[0] == "mergelab_bench"
            ]
    assert offenders == []
