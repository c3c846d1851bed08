"""LM domain builders on fixture sources: deterministic splits, no leakage, stable hashes."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from mergelab_bench.zoo.lm.tasks import (
    LM_SPLIT,
    SPLITS,
    LMRow,
    LMTaskData,
    LMTaskSpec,
    arithmetic_answer,
    arithmetic_problem,
    build_lm_task,
    ensure_lm_task,
    finalize_lm,
    get_lm_task,
    line_windows,
)
from mergelab_bench.zoo.lm.testing import write_lm_sources
from mergelab_bench.zoo.testing import FixtureSources

PINNED_PROBLEM_0 = (6, "*", 13)
PINNED_ARITHMETIC_SHA256 = "1729530fbf63ba172f60a1a33972eb4ffe5242ef182821ef33f0b36c5eba0896"


@pytest.fixture(scope="module")
def lm_sources(tmp_path_factory: pytest.TempPathFactory) -> FixtureSources:
    return write_lm_sources(tmp_path_factory.mktemp("lm_sources"))


def _spec(cap: int | None = None) -> LMTaskSpec:
    return LMTaskSpec(name="t", description="", salt="t", collect=lambda r: [], cap=cap)


def _build(name: str, sources: FixtureSources, tmp_path: Path) -> LMTaskData:
    build_lm_task(get_lm_task(name), sources, tmp_path / name)
    return LMTaskData.load(tmp_path / name)


def test_finalize_is_order_independent_deduplicates_and_caps() -> None:
    rows = [LMRow(f"k{i:04d}", f"some text number {i % 300}, long enough") for i in range(600)]
    a = finalize_lm(_spec(cap=200), rows)
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    b = finalize_lm(_spec(cap=200), shuffled)
    assert a.splits == b.splits
    assert a.dropped == {"duplicate": 300, "over_cap": 100}
    kept = [r for s in SPLITS for r in a.splits[s]]
    assert len(kept) == 200 and len({r["text"] for r in kept}) == 200
    # of each duplicate pair the smaller key is kept
    assert all(int(r["key"][1:]) < 300 for r in kept)


def test_groups_never_straddle_splits() -> None:
    rows = [LMRow(f"k{i}", f"window {i} of a file, with enough text", group=f"file{i % 37}") for i in range(1000)]
    res = finalize_lm(_spec(), rows)
    split_of_group: dict[str, set[str]] = {}
    for split in SPLITS:
        for r in res.splits[split]:
            split_of_group.setdefault(f"file{int(r['key'][1:]) % 37}", set()).add(split)
    assert all(len(s) == 1 for s in split_of_group.values())
    assert all(res.splits[s] for s in SPLITS)


def test_line_windows_are_disjoint_and_skip_sparse_text() -> None:
    lines = [f"x_{i} = compute({i}, value)  # line {i}" for i in range(200)]
    wins = list(line_windows(lines))
    assert 1 < len(wins) <= 6
    starts = [s for s, _ in wins]
    assert all(b - a >= 16 for a, b in itertools.pairwise(starts))
    assert list(line_windows([""] * 200)) == []


def test_code_domains_exclude_tests_and_group_by_file(lm_sources: FixtureSources, tmp_path: Path) -> None:
    for name in ("python", "go"):
        data = _build(name, lm_sources, tmp_path)
        rows = {s: data.rows(s) for s in SPLITS}
        keys = [r["key"] for s in SPLITS for r in rows[s]]
        assert keys
        assert not any("/test/" in k or "testdata" in k or "_test.go" in k for k in keys)
        files = {s: {r["key"].rsplit(":", 1)[0] for r in rows[s]} for s in SPLITS}
        assert not files["train"] & files["test"] and not files["train"] & files["validation"]
        assert all(rows[s] for s in SPLITS)
        assert data.meta["sources"][0]["kind"] == "deb" and data.meta["metrics"] == ["perplexity"]


def test_fortune_and_debian_domains(lm_sources: FixtureSources, tmp_path: Path) -> None:
    de = _build("german", lm_sources, tmp_path)
    assert sum(de.meta["sizes"].values()) == 200  # 4 files x 50 cookies, the .dat file skipped
    assert all("Nummer" in t for t in de.texts("train"))
    deb = _build("debian", lm_sources, tmp_path)
    assert sum(deb.meta["sizes"].values()) == 60
    assert "This package provides the tool number" in deb.texts("test")[0]
    assert deb.meta["apt_release"] == {"release_version": "fixture"}


def test_arithmetic_rows_are_exact_and_commutative_pairs_share_a_split(lm_sources, tmp_path: Path) -> None:
    data = _build("arithmetic", lm_sources, tmp_path)
    assert data.metrics == ["exact_match", "perplexity"]
    where: dict[tuple, str] = {}
    for split in SPLITS:
        for r in data.rows(split):
            assert r["text"] == f"{r['prompt']} {r['answer']}\n"  # the newline ends the answer line
            a, op, b = r["prompt"].removeprefix("Question: What is ").removesuffix("?\nAnswer:").split(" ")
            assert int(r["answer"]) == arithmetic_answer(int(a), op, int(b))
            where[(int(a), op, int(b))] = split
    for (a, op, b), split in where.items():
        if op in "+*" and (b, op, a) in where:
            assert where[(b, op, a)] == split
    assert sum(data.meta["sizes"].values()) == 12000
    # generated data is pinned, so a changed generator is noticed (bump LM_BUILDER_VERSION)
    assert arithmetic_problem(0) == PINNED_PROBLEM_0
    assert data.meta["content_sha256"] == PINNED_ARITHMETIC_SHA256


def test_ensure_lm_task_caches_by_content(lm_sources: FixtureSources, tmp_path: Path) -> None:
    a = ensure_lm_task("german", lm_sources, cache=tmp_path)
    assert a.path.parent == tmp_path / "zoo" / "lm" / "data"
    mtime = (a.path / "meta.json").stat().st_mtime_ns
    b = ensure_lm_task("german", lm_sources, cache=tmp_path)
    assert b.path == a.path and (b.path / "meta.json").stat().st_mtime_ns == mtime
    assert a.meta["split_config"] == {
        "validation": LM_SPLIT.validation, "test": LM_SPLIT.test,
        "max_chars": LM_SPLIT.max_chars, "min_chars": LM_SPLIT.min_chars,
    }  # fmt: skip
    assert a.rows("test", limit=3) == a.rows("test")[:3]


def test_code_splits_do_not_depend_on_where_the_sources_are_unpacked(tmp_path: Path) -> None:
    """Keys use the installed path (/usr/...), so the same files unpacked in two folders give the
    same rows and splits (absolute fixture paths made the split assignment vary from run to run)."""
    a = write_lm_sources(tmp_path / "first-unpack")
    b = write_lm_sources(tmp_path / "second" / "elsewhere")
    rows = []
    for sources, out in ((a, tmp_path / "out-a"), (b, tmp_path / "out-b")):
        data = _build("python", sources, out)
        rows.append({s: [r["key"] for r in data.rows(s)] for s in SPLITS})
    assert rows[0] == rows[1]
    assert all(k.startswith("libpython3.11-stdlib:/usr/lib/python3.11/") for s in SPLITS for k in rows[0][s])


def test_italian_domain_reads_fortunes_it(lm_sources: FixtureSources, tmp_path: Path) -> None:
    it = _build("italian", lm_sources, tmp_path)
    assert sum(it.meta["sizes"].values()) == 200  # 4 files x 50 cookies of the fortunes-it fixture
    assert all(w in " ".join(it.texts("train")) for w in ("piano", "lontano"))
    assert not any("Grube" in t for s in SPLITS for t in it.texts(s))  # nothing of fortunes-de
    assert [(d["kind"], d["name"]) for d in it.meta["sources"]] == [("deb", "fortunes-it")]
    assert it.meta["split_salt"] == "fortunes"  # held out in both suites or in neither


def test_arithmetic_generation_is_deterministic_and_gives_500_test_rows(tmp_path: Path) -> None:
    """Cheap (no model, no sources): the generator is a pure function of the index, and the default
    problem count gives >= 500 test rows, so one problem moves exact match by <= 0.2 points."""
    from mergelab_bench.zoo.lm.build import LMZooConfig
    from mergelab_bench.zoo.lm.tasks import ARITHMETIC_PROBLEMS

    first = [arithmetic_problem(i) for i in range(50)]
    assert first == [arithmetic_problem(i) for i in range(50)]
    for a, op, b in first:
        assert op in "+-*" and (2 <= a <= 9 and 10 <= b <= 99 if op == "*" else 10 <= a <= 99 and 10 <= b <= 99)
    assert arithmetic_answer(57, "-", 83) == -26 and arithmetic_answer(7, "*", 13) == 91
    spec = get_lm_task("arithmetic")
    rows = list(spec.collect(None))  # generated: the reader is never used
    assert len(rows) == ARITHMETIC_PROBLEMS and rows == list(spec.collect(None))
    sizes = {s: len(v) for s, v in finalize_lm(spec, rows).splits.items()}
    cfg = LMZooConfig.default()
    limit = cfg.train_for("arithmetic").eval_limit
    assert limit is None or limit >= 500
    assert sizes["test"] >= 500 and (limit is None or sizes["test"] >= limit)
    assert sizes["validation"] >= 256  # tuning rows and the validation curve


@pytest.mark.parametrize("name", ["python", "go", "german", "italian"])
def test_default_domains_have_500_test_rows_from_the_system_packages(name: str, tmp_path: Path) -> None:
    """On a machine with the Debian packages installed (skipped elsewhere): >= 500 test rows."""
    from mergelab_bench.zoo.lm.build import LMZooConfig
    from mergelab_bench.zoo.sources import SourceError, SystemSources

    spec = get_lm_task(name)
    reader = SystemSources(tmp_path)
    try:
        for package in spec.deb:
            if not reader.deb_files(package):
                raise SourceError(package)
    except SourceError as exc:
        pytest.skip(f"Debian package not installed: {exc}")
    sizes = {s: len(v) for s, v in finalize_lm(spec, spec.collect(reader)).splits.items()}
    limit = LMZooConfig.default().train_for(name).eval_limit
    assert sizes["test"] >= max(500, limit or 0), sizes
