"""Task builders on fixture sources: labels, deterministic splits, no leakage, stable hashes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mergelab_bench.zoo.cache import config_key
from mergelab_bench.zoo.tasks import (
    SPLITS,
    Row,
    SplitConfig,
    TaskData,
    TaskSpec,
    build_task,
    code_windows,
    content_hash,
    ensure_task,
    finalize,
    get_task,
    normalize_text,
    split_of,
    unit_hash,
)
from mergelab_bench.zoo.testing import FixtureSources

CFG = SplitConfig()


def _spec(name: str = "t", labels=("a", "b"), cap=None, salt=None) -> TaskSpec:
    return TaskSpec(name=name, description="", labels=tuple(labels), salt=salt or name, collect=lambda r: [], cap=cap)


def _all_rows(result) -> list[dict]:
    return [r for s in SPLITS for r in result.splits[s]]


def _build(name: str, sources: FixtureSources, tmp_path: Path) -> TaskData:
    out = tmp_path / name
    build_task(get_task(name), sources, out, CFG, strict=False)
    return TaskData.load(out)


# -- the split function itself -------------------------------------------------------------


def test_hashes_are_pinned() -> None:
    # Changing these silently reshuffles every benchmark split: bump BUILDER_VERSION instead.
    assert unit_hash("vader", "split", "hello") == pytest.approx(0.8194234036525003, abs=1e-15)
    assert split_of("vader", "hello", CFG) == "train"
    assert config_key({"b": 1, "a": [1, 2]}) == "94a786c3662bc7be"


def test_split_fractions_match_the_config() -> None:
    rows = [Row(f"k{i}", f"text number {i}", "a" if i % 2 else "b") for i in range(4000)]
    res = finalize(_spec(), rows, CFG)
    n = {s: len(res.splits[s]) for s in SPLITS}
    assert sum(n.values()) == 4000
    assert abs(n["test"] / 4000 - 0.2) < 0.02
    assert abs(n["validation"] / 4000 - 0.1) < 0.02


def test_finalize_is_independent_of_input_order() -> None:
    rows = [Row(f"k{i}", f"text {i % 150}", "ab"[i % 2 if i < 150 else (i % 150) % 2]) for i in range(300)]
    a = finalize(_spec(cap=40), rows, CFG)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    b = finalize(_spec(cap=40), shuffled, CFG)
    assert a.splits == b.splits
    assert content_hash(a.splits) == content_hash(b.splits)


def test_duplicates_and_conflicts_are_dropped_and_never_leak() -> None:
    rows = [
        Row("1", "Same  text", "a"),
        Row("2", "same text", "a"),  # duplicate after normalisation: one kept
        Row("3", "Ambiguous", "a"),
        Row("4", "ambiguous ", "b"),  # same text, other label: both dropped
        Row("5", "x", "a"),  # shorter than min_chars
    ] + [Row(f"n{i}", f"filler {i}", "b") for i in range(50)]
    res = finalize(_spec(), rows, CFG)
    texts = [normalize_text(r["text"]) for r in _all_rows(res)]
    assert len(texts) == len(set(texts)) == 51
    assert "ambiguous" not in texts
    kept = [r for r in _all_rows(res) if normalize_text(r["text"]) == "same text"]
    assert [r["key"] for r in kept] == ["1"]  # the smallest key wins
    assert res.dropped == {"conflicting_label": 2, "duplicate": 1, "too_short": 1}


def test_groups_never_straddle_splits() -> None:
    rows = [Row(f"f{g}:{i}", f"window {g} {i}", "a", group=f"file{g}") for g in range(60) for i in range(4)]
    res = finalize(_spec(), rows, CFG)
    where: dict[str, set[str]] = {}
    for split in SPLITS:
        for r in res.splits[split]:
            where.setdefault(r["key"].split(":")[0], set()).add(split)
    assert all(len(s) == 1 for s in where.values())
    assert {s for v in where.values() for s in v} == set(SPLITS)


def test_cap_keeps_a_hash_sample_per_label() -> None:
    rows = [Row(f"k{i}", f"text {i}", "a") for i in range(100)] + [Row(f"j{i}", f"other {i}", "b") for i in range(10)]
    res = finalize(_spec(cap=25), rows, CFG)
    counts = {lab: sum(r["label"] == lab for r in _all_rows(res)) for lab in "ab"}
    assert counts == {"a": 25, "b": 10}
    assert res.dropped["over_cap"] == 75


def test_unknown_label_or_repeated_key_is_a_builder_bug() -> None:
    with pytest.raises(ValueError, match="not in"):
        finalize(_spec(), [Row("k", "text", "zzz")], CFG)
    with pytest.raises(ValueError, match="twice"):
        finalize(_spec(), [Row("k", "text", "a"), Row("k", "other", "a")], CFG)


# -- real builders on fixture files --------------------------------------------------------


def test_vader_tasks(fixture_sources: FixtureSources, tmp_path: Path) -> None:
    sent = _build("sentiment", fixture_sources, tmp_path)
    src = _build("text_source", fixture_sources, tmp_path)
    rows = {r["key"]: r for s in SPLITS for r in sent.rows(s)}
    # tweet 1 ("&amp;") equals NYT 1_2 once unescaped, same polarity: one copy, the smaller key
    assert "tweets:1" not in rows and rows["nyt:1_2"]["text"] == "What a lovely day & great friends"
    assert rows["nyt:1_2"]["label"] == "positive"
    assert rows["movie:2"]["label"] == "negative"
    assert "movie:3" not in rows  # |rating| < 0.5
    assert sent.meta["dropped"] == {"duplicate": 1}  # the NYT copy of tweet 1
    src_rows = {r["key"]: r["label"] for s in SPLITS for r in src.rows(s)}
    assert src_rows["movie:3"] == "movie" and src_rows["amazon:1_1"] == "amazon"
    assert src.meta["dropped"] == {"conflicting_label": 2}  # tweet 1 == nyt 1_2: two sources
    # shared inputs share a salt: a text is in the same split in both tasks
    for split in SPLITS:
        for r in sent.rows(split):
            other = [s for s in SPLITS if any(x["text"] == r["text"] for x in src.rows(s))]
            assert other in ([], [split])
    assert sent.meta["sources"][0]["name"] == "vaderSentiment" and sent.meta["sources"][0]["version"] == "3.3.2"


def test_fortune_tasks(fixture_sources: FixtureSources, tmp_path: Path) -> None:
    topic = _build("fortune_topic", fixture_sources, tmp_path)
    texts = {r["text"]: r["label"] for s in SPLITS for r in topic.rows(s)}
    assert "A picture is worth a thousand words." in texts  # overstrike removed
    assert "Bugs are features that bite." not in texts  # in computers and people: ambiguous
    assert not any("pinhead" in t for t in texts)  # zippy is not a topic
    lang = _build("lang_id", fixture_sources, tmp_path)
    labels = {r["label"]: r["text"] for s in SPLITS for r in lang.rows(s)}
    assert set(labels) == {"cs", "de", "en", "es", "it", "pl", "pt", "ru"}
    all_text = " ".join(r["text"] for s in SPLITS for r in lang.rows(s))
    assert "ofensivo" not in all_text and "ascii cat" not in all_text


def test_wordnet_tasks(fixture_sources: FixtureSources, tmp_path: Path) -> None:
    ss = _build("wordnet_supersense", fixture_sources, tmp_path)
    got = {r["text"]: r["label"] for s in SPLITS for r in ss.rows(s)}
    assert got == {
        "jerky: meat cut in strips and dried in the sun": "food",
        'dog: a member of the genus Canis; "the dog barked"': "animal",
        "carpenter: a woodworker who makes or repairs wooden objects": "person",
    }
    pos = _build("wordnet_pos", fixture_sources, tmp_path)
    got = {r["text"]: r["label"] for s in SPLITS for r in pos.rows(s)}
    assert got["move fast by using one's feet"] == "verb"
    assert got["without musical accompaniment"] == "adv" and got["having the necessary means or skill"] == "adj"


def test_deb_section(fixture_sources: FixtureSources, tmp_path: Path) -> None:
    data = _build("deb_section", fixture_sources, tmp_path)
    rows = {r["key"]: r for s in SPLITS for r in data.rows(s)}
    assert set(rows) == {"tuxracer", "tuxracer-data", "mutt", "ghost"}  # libs is not a topical section
    assert rows["tuxracer"]["text"] == (
        "3D racing game featuring Tux Race down icy slopes as Tux the penguin. Collect herring on the way."
    )
    assert rows["ghost"]["label"] == "editors" and rows["ghost"]["text"] == "no long description here"
    split = {k: s for s in SPLITS for k in (r["key"] for r in data.rows(s))}
    assert split["tuxracer"] == split["tuxracer-data"]  # same source package, same split
    assert data.meta["apt_release"] == {"release_version": "fixture"}


def test_code_lang(fixture_sources: FixtureSources, tmp_path: Path) -> None:
    data = _build("code_lang", fixture_sources, tmp_path)
    rows = [r for s in SPLITS for r in data.rows(s)]
    assert {r["label"] for r in rows} == {"c", "go", "javascript", "perl", "python", "ruby"}
    assert all(len(r["text"].splitlines()) == 12 for r in rows)
    assert not any("header of file" in r["text"] for r in rows)  # windows start past the header
    js = [r for r in rows if r["label"] == "javascript"]
    assert js and all("package/src/" in r["key"] for r in js)  # build/ is not read
    by_file: dict[str, set[str]] = {}
    for s in SPLITS:
        for r in data.rows(s):
            by_file.setdefault(r["key"].rsplit(":", 1)[0], set()).add(s)
    assert any(len(r) == 1 for r in by_file.values()) and all(len(v) == 1 for v in by_file.values())
    assert max(sum(1 for r in rows if r["key"].startswith(f + ":")) for f in by_file) == 2


def test_code_windows_skip_header_and_take_two() -> None:
    lines = [f"line {i} " + "x" * 10 for i in range(200)]
    got = list(code_windows(lines))
    assert [s for s, _ in got] == [40, 140]
    assert got[0][1].splitlines()[0].startswith("line 40")


def test_task_files_and_meta(fixture_sources: FixtureSources, tmp_path: Path) -> None:
    data = _build("wordnet_pos", fixture_sources, tmp_path)
    meta = json.loads((data.path / "meta.json").read_text())
    assert meta["labels"] == ["adj", "adv", "noun", "verb"]
    assert sum(meta["sizes"].values()) == 7  # 4 nouns (noun.Tops included), 1 verb, 1 adj, 1 adv
    assert meta["empty_labels"] == []
    assert [(d["kind"], d["name"]) for d in meta["sources"]] == [("deb", "wordnet-base")]
    assert meta["sources"][0]["version"].startswith("fixture")
    assert len(meta["content_sha256"]) == 64
    texts, labels = data.examples("train")
    assert len(texts) == len(labels) == meta["sizes"]["train"]


def test_ensure_task_is_cached_by_config_and_sources(fixture_sources: FixtureSources, tmp_path: Path) -> None:
    a = ensure_task("wordnet_pos", fixture_sources, cache=tmp_path)
    b = ensure_task("wordnet_pos", fixture_sources, cache=tmp_path)
    assert a.path == b.path and a.meta["content_sha256"] == b.meta["content_sha256"]
    c = ensure_task("wordnet_pos", fixture_sources, cache=tmp_path, cfg=SplitConfig(test=0.3))
    assert c.path != a.path
    assert len(list((tmp_path / "zoo" / "data").iterdir())) == 2  # no partial directories left


def test_rebuild_gives_the_same_content_hash(fixture_sources: FixtureSources, tmp_path: Path) -> None:
    a = _build("lang_id", fixture_sources, tmp_path / "one")
    b = _build("lang_id", fixture_sources, tmp_path / "two")
    assert a.meta["content_sha256"] == b.meta["content_sha256"]


def test_content_hash_is_pinned() -> None:
    rows = [Row(f"k{i}", f"sentence number {i}", "ab"[i % 2]) for i in range(200)]
    res = finalize(_spec("pinned", cap=80), rows, CFG)
    assert {s: len(res.splits[s]) for s in SPLITS} == PINNED_SIZES
    assert content_hash(res.splits) == PINNED_CONTENT


PINNED_SIZES = {"train": 111, "validation": 15, "test": 34}
PINNED_CONTENT = "4f606e49832c40c0500524e8e55780e57afaedf0b2ffef19b8c648d70b958571"
