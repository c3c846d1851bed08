"""`mergelab demo`: the zoo leaderboard demo (wiring only; the bench itself is tested in
tests/bench/eval) and the engine-only `--synthetic` demo (run for real)."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from mergelab import cli
from mergelab_bench.eval import commands
from mergelab_bench.zoo import sources

runner = CliRunner()


def test_synthetic_demo_merges_and_reports(tmp_path: Path) -> None:
    res = runner.invoke(cli.app, ["demo", "--synthetic", "--workdir", str(tmp_path / "demo")])
    assert res.exit_code == 0, res.output
    assert "ties" in res.output.lower()


def test_zoo_demo_runs_the_bench_with_the_options(monkeypatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr(commands, "demo_bench", lambda **kw: calls.append(kw))
    res = runner.invoke(cli.app, ["demo", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert calls == [{"out": tmp_path, "threads": 1, "progress_enabled": False}]


def test_missing_sources_are_installed_only_with_install(monkeypatch) -> None:
    state = {"installed": False, "bench_calls": 0}

    def bench(**kw):
        state["bench_calls"] += 1
        if not state["installed"]:
            raise sources.SourceError("vaderSentiment 3.3.2 sdist is missing: run `mergelab zoo sources --install`")

    def install(cache, echo=print, **kw):
        state["installed"] = True

    monkeypatch.setattr(commands, "demo_bench", bench)
    monkeypatch.setattr(sources, "install_sources", install)
    res = runner.invoke(cli.app, ["demo", "--no-progress"])
    assert res.exit_code == 7 and "zoo sources --install" in res.output
    assert not state["installed"]
    res = runner.invoke(cli.app, ["demo", "--no-progress", "--install"])
    assert res.exit_code == 0, res.output
    assert state["installed"] and state["bench_calls"] == 3
