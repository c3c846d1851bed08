"""Text-classification tasks built from named packages, with fixed hash splits.

A task is a :class:`TaskSpec`: a label set, the packages it reads and a ``collect`` function
that turns a :class:`~mergelab_bench.zoo.sources.SourceReader` into :class:`Row` objects. Every
task goes through the same :func:`finalize` step, which makes the data independent of the
order in which files were read:

1. texts are stripped and cut to ``max_chars``; very short ones are dropped;
2. duplicates (same text after NFKC, case folding and whitespace collapsing) are merged:
   a text seen with two different labels is dropped altogether (it is ambiguous), otherwise
   the row with the smallest key is kept;
3. labels with more than ``cap`` rows keep the ``cap`` rows whose ``hash(salt, key)`` is
   smallest (a deterministic sample);
4. each row goes to test / validation / train by ``hash(salt, group)``: rows of one group
   (a source file, a Debian source package, or by default the text itself) never straddle
   splits. Tasks that share inputs share a ``salt`` (``vader``, ``fortunes``, ``wordnet``),
   so a text that appears in two tasks lands in the same split in both;
5. each split is ordered by another hash, so its first *n* rows are a random sample.

The built data of one task is a directory with ``{train,validation,test}.jsonl`` (rows
``{"text", "label", "key"}``) and ``meta.json`` (labels, sizes, per-label counts, what was
dropped, the source packages with versions, and ``content_sha256`` over the three files).
It is cached under ``<zoo cache>/data/<task>-<key>``, where the key hashes the builder
version, the split config and the versions/digests of the sources.
"""

from __future__ import annotations

import html
import io
import os
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mergelab_bench.zoo.cache import config_key, zoo_root
from mergelab_bench.zoo.registry import Registry
from mergelab_bench.zoo.sources import ARCHIVES, SourceReader
from mergelab_bench.zoo.splits import (  # noqa: F401 - SPLITS .. unit_hash are re-exported for both suites
    SPLITS,
    Finalized,
    SplitConfig,
    content_hash,
    finalized_splits,
    hash_sample,
    jsonl_bytes,
    normalize_text,
    split_of,
    unit_hash,
)
from mergelab_bench.zoo.store import SplitFiles, ensure_dir, write_task_folder

BUILDER_VERSION = 1


@dataclass(frozen=True)
class Row:
    """One labelled text as a builder emits it.

    ``key`` locates the text in its source and is unique within a task; rows with the same
    ``group`` always land in the same split (``None``: the normalised text is the group).
    """

    key: str
    text: str
    label: str
    group: str | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A task: its label set, the sources it reads and the function that collects rows."""

    name: str
    description: str
    labels: tuple[str, ...]
    salt: str
    collect: Callable[[SourceReader], Iterable[Row]]
    deb: tuple[str, ...] = ()
    archives: tuple[str, ...] = ()
    apt: bool = False
    cap: int | None = None
    template: str = ""
    label_names: tuple[str, ...] = ()

    def prompts(self) -> list[str]:
        """One sentence per label: :attr:`template` with the label's name (the zero-shot head's inputs).

        ``label_names`` spell out coded labels (``de`` -> ``German``) in label order; without
        them the label itself is the name. Templates are written once and never tuned (see
        :mod:`mergelab_bench.zoo.heads`); they are not part of the task data's key.
        """
        if not self.template:
            raise ValueError(f"task {self.name} has no zero-shot template")
        names = self.label_names or self.labels
        if len(names) != len(self.labels):
            raise ValueError(f"task {self.name}: {len(names)} label names for {len(self.labels)} labels")
        return [self.template.format(name) for name in names]

    def sources(self, reader: SourceReader) -> list[dict[str, str]]:
        """Source packages with versions (and digests for archives / the apt index)."""
        fp = reader.fingerprint(self.deb, self.archives, self.apt)
        out = [{"kind": "deb", "name": p, "version": fp[f"deb:{p}"]} for p in self.deb]
        for name in self.archives:
            a = ARCHIVES[name]
            out.append({"kind": a.registry, "name": a.name, "version": a.version, "digest": fp[f"archive:{name}"]})
        if self.apt:
            out.append({"kind": "apt-index", "name": "Packages+Translation-en", "digest": fp["apt:index"]})
        return out


TASKS: Registry[TaskSpec] = Registry("task")


def task(
    name: str,
    *,
    description: str,
    labels: Sequence[str],
    salt: str | None = None,
    deb: Sequence[str] = (),
    archives: Sequence[str] = (),
    apt: bool = False,
    cap: int | None = None,
    template: str = "",
    label_names: Sequence[str] = (),
) -> Callable[[Callable[[SourceReader], Iterable[Row]]], Callable[[SourceReader], Iterable[Row]]]:
    """Register a task whose rows ``fn(reader)`` collects (``template``: its zero-shot prompt)."""

    def decorate(fn: Callable[[SourceReader], Iterable[Row]]) -> Callable[[SourceReader], Iterable[Row]]:
        TASKS.add(
            TaskSpec(
                name=name,
                description=description,
                labels=tuple(labels),
                salt=salt or name,
                collect=fn,
                deb=tuple(deb),
                archives=tuple(archives),
                apt=apt,
                cap=cap,
                template=template,
                label_names=tuple(label_names),
            )
        )
        return fn

    return decorate


def get_task(name: str) -> TaskSpec:
    return TASKS.spec(name)


# --------------------------------------------------------------------------------------------
# Deterministic splitting


def _clean(text: str, max_chars: int) -> str:
    lines = [line.rstrip() for line in text.strip().splitlines()]
    return "\n".join(lines)[:max_chars].strip()


def finalize(spec: TaskSpec, rows: Iterable[Row], cfg: SplitConfig) -> Finalized:
    """Clean, deduplicate, cap and split ``rows`` (see the module docstring); order-independent."""
    known = set(spec.labels)
    dropped: Counter[str] = Counter()
    by_text: dict[str, list[Row]] = defaultdict(list)
    keys: set[str] = set()
    for row in rows:
        if row.label not in known:
            raise ValueError(f"task {spec.name}: label {row.label!r} is not in {spec.labels}")
        if row.key in keys:
            raise ValueError(f"task {spec.name}: key {row.key!r} emitted twice")
        keys.add(row.key)
        text = _clean(row.text, cfg.max_chars)
        if len(text) < cfg.min_chars:
            dropped["too_short"] += 1
            continue
        by_text[normalize_text(text)].append(Row(row.key, text, row.label, row.group))

    kept: list[tuple[str, Row]] = []
    for norm, group in by_text.items():
        if len({r.label for r in group}) > 1:
            dropped["conflicting_label"] += len(group)
            continue
        dropped["duplicate"] += len(group) - 1
        kept.append((norm, min(group, key=lambda r: r.key)))

    if spec.cap is not None:
        per_label: dict[str, list[tuple[str, Row]]] = defaultdict(list)
        for item in kept:
            per_label[item[1].label].append(item)
        kept = []
        for label in sorted(per_label):
            sample, over = hash_sample(spec.salt, per_label[label], spec.cap, key=lambda it: it[1].key)
            dropped["over_cap"] += over
            kept += sample

    records = ((norm, row.group, {"text": row.text, "label": row.label, "key": row.key}) for norm, row in kept)
    return finalized_splits(spec.salt, records, cfg, dropped)


# --------------------------------------------------------------------------------------------
# Built task data


@dataclass
class TaskData(SplitFiles):
    """A built classification task on disk: labels, metadata and the split files."""

    @property
    def labels(self) -> list[str]:
        return list(self.meta["labels"])

    def examples(self, split: str, limit: int | None = None) -> tuple[list[str], list[int]]:
        """(texts, label ids) of a split; label ids index :attr:`labels`."""
        index = {label: i for i, label in enumerate(self.labels)}
        rows = self.rows(split, limit)
        return [r["text"] for r in rows], [index[r["label"]] for r in rows]


def data_key(spec: TaskSpec, reader: SourceReader, cfg: SplitConfig) -> str:
    """Content address of a task's data: builder version, split config, cap, sources."""
    return config_key(
        {
            "builder": BUILDER_VERSION,
            "task": spec.name,
            "labels": list(spec.labels),
            "cap": spec.cap,
            "split": asdict(cfg),
            "sources": reader.fingerprint(spec.deb, spec.archives, spec.apt),
        }
    )


def build_task(spec: TaskSpec, reader: SourceReader, out: Path, cfg: SplitConfig, *, strict: bool = True) -> dict:
    """Collect, finalize and write one task into ``out``; returns its metadata.

    With ``strict`` a label without any example is an error (a source is missing or empty).
    """
    result = finalize(spec, spec.collect(reader), cfg)
    counts = {s: dict(sorted(Counter(r["label"] for r in rows).items())) for s, rows in result.splits.items()}
    missing = [label for label in spec.labels if not any(label in c for c in counts.values())]
    if missing and strict:
        raise ValueError(f"task {spec.name}: no examples for labels {missing}")
    return write_task_folder(
        out,
        spec,
        reader,
        cfg,
        result,
        builder_version=BUILDER_VERSION,
        labels=list(spec.labels),
        cap_per_label=spec.cap,
        label_counts=counts,
        empty_labels=missing,
    )


_DEFAULT_SPLIT = SplitConfig()  # frozen: one shared default is safe


def ensure_task(
    name: str,
    reader: SourceReader,
    *,
    cache: str | os.PathLike[str] | None = None,
    cfg: SplitConfig = _DEFAULT_SPLIT,
    force: bool = False,
) -> TaskData:
    """The built data of task ``name``, built into the cache first if it is not there."""
    spec = get_task(name)
    final = zoo_root(cache) / "data" / f"{name}-{data_key(spec, reader, cfg)}"
    return TaskData.load(
        ensure_dir(final, lambda tmp: build_task(spec, reader, tmp, cfg), done="meta.json", force=force)
    )


# --------------------------------------------------------------------------------------------
# VADER ground truth (PyPI sdist vaderSentiment 3.3.2): sentiment and text source

_VADER_SOURCES = {
    "amazonReviewSnippets": "amazon",
    "movieReviewSnippets": "movie",
    "nytEditorialSnippets": "nyt",
    "tweets": "tweets",
}


def vader_ratings(sdist: Path) -> Iterator[tuple[str, str, float, str]]:
    """(key, text, mean human rating in [-4, 4], source) from the ``*_GroundTruth.txt`` files."""
    with tarfile.open(sdist) as outer:
        member = next((m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz")), None)
        if member is None:
            raise ValueError(f"{sdist} has no additional_resources/hutto_ICWSM_2014.tar.gz")
        inner_bytes = outer.extractfile(member).read()  # type: ignore[union-attr]
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        for m in sorted(inner.getmembers(), key=lambda m: m.name):
            base = Path(m.name).name
            if not base.endswith("_GroundTruth.txt"):
                continue
            source = _VADER_SOURCES[base.split("_")[0]]
            raw = inner.extractfile(m).read()  # type: ignore[union-attr]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            for line in text.splitlines():
                parts = line.split("\t")
                if len(parts) < 3:
                    continue
                yield f"{source}:{parts[0]}", html.unescape(parts[2]), float(parts[1]), source


@task(
    "sentiment",
    description="polarity of a snippet (tweet, movie or product review, NYT editorial) by mean human rating",
    labels=("negative", "positive"),
    salt="vader",
    archives=("vaderSentiment",),
    template="a text with a {} sentiment",
)
def _sentiment(reader: SourceReader) -> Iterator[Row]:
    for key, text, score, _ in vader_ratings(reader.archive("vaderSentiment")):
        if abs(score) >= 0.5:
            yield Row(key, text, "positive" if score > 0 else "negative")


@task(
    "text_source",
    description="where a snippet comes from: tweet, movie review, Amazon review or NYT editorial",
    labels=("amazon", "movie", "nyt", "tweets"),
    salt="vader",
    archives=("vaderSentiment",),
    cap=3700,
    template="a snippet from {}",
    label_names=("an Amazon product review", "a movie review", "a New York Times editorial", "a tweet"),
)
def _text_source(reader: SourceReader) -> Iterator[Row]:
    for key, text, _, source in vader_ratings(reader.archive("vaderSentiment")):
        yield Row(key, text, source)


# --------------------------------------------------------------------------------------------
# fortune(6) cookie files (Debian fortunes*): topic and language

FORTUNE_MIN_CHARS = 20
FORTUNE_MAX_CHARS = 600
FORTUNE_TOPICS = (
    "art",
    "computers",
    "definitions",
    "men-women",
    "people",
    "politics",
    "science",
    "songs-poems",
    "wisdom",
    "work",
)
ENGLISH_FORTUNE_FILES = (*FORTUNE_TOPICS, "education", "food", "law", "love", "medicine", "sports")
FORTUNE_LANGS = {
    # label: (package, directory the files sit in, or None for any file of the package)
    "en": ("fortunes", None),
    "de": ("fortunes-de", "de"),
    "es": ("fortunes-es", "es"),
    "it": ("fortunes-it", "it"),
    "pl": ("fortunes-pl", "pl"),
    "ru": ("fortunes-ru", "ru"),
    "cs": ("fortunes-cs", "cs"),
    "pt": ("fortunes-br", None),
}


def fortune_entries(path: Path) -> list[str]:
    """The cookies of one fortune file (``%`` lines separate them), overstriking removed."""
    text = path.read_text(encoding="utf-8", errors="replace")
    text = re.sub(r".\x08", "", text)
    entries = (e.strip() for e in re.split(r"^%[ \t]*$", text, flags=re.M))
    return [e for e in entries if FORTUNE_MIN_CHARS <= len(e) <= FORTUNE_MAX_CHARS]


def _is_cookie_file(path: Path) -> bool:
    skip_parts = {"off"}  # the packages' offensive sub-collections
    return (
        path.suffix not in (".dat", ".u8")
        and not skip_parts.intersection(path.parts)
        and "ascii" not in path.name
        and path.name not in ("banner",)
    )


@task(
    "fortune_topic",
    description="category file of an English fortune cookie (noisy: loose topics)",
    labels=FORTUNE_TOPICS,
    salt="fortunes",
    deb=("fortunes",),
    template="a quotation about {}",
    label_names=(
        "art",
        "computers",
        "definitions",
        "men and women",
        "people",
        "politics",
        "science",
        "songs and poems",
        "wisdom",
        "work",
    ),
)
def _fortune_topic(reader: SourceReader) -> Iterator[Row]:
    for path in reader.deb_files("fortunes"):
        if path.name in FORTUNE_TOPICS and _is_cookie_file(path):
            for i, text in enumerate(fortune_entries(path)):
                yield Row(f"{path.name}:{i}", text, path.name)


@task(
    "lang_id",
    description="language of a fortune cookie (8 languages)",
    labels=tuple(sorted(FORTUNE_LANGS)),
    salt="fortunes",
    deb=tuple(p for p, _ in FORTUNE_LANGS.values()),
    cap=1500,
    template="a text written in {}",
    label_names=("Czech", "German", "English", "Spanish", "Italian", "Polish", "Portuguese", "Russian"),
)
def _lang_id(reader: SourceReader) -> Iterator[Row]:
    for lang, (package, subdir) in sorted(FORTUNE_LANGS.items()):
        for path in reader.deb_files(package):
            if not _is_cookie_file(path):
                continue
            if subdir is not None and path.parent.name != subdir:
                continue
            if lang == "en" and path.name not in ENGLISH_FORTUNE_FILES:
                continue
            for i, text in enumerate(fortune_entries(path)):
                yield Row(f"{lang}:{package}:{path.parent.name}/{path.name}:{i}", text, lang)


# --------------------------------------------------------------------------------------------
# Debian archive metadata: package description -> section

DEB_SECTIONS = (
    "admin",
    "editors",
    "games",
    "graphics",
    "mail",
    "math",
    "net",
    "science",
    "sound",
    "text",
    "video",
    "web",
)


def _deb_paragraphs(text: str) -> Iterator[dict[str, str]]:
    """Fields of each RFC 822 paragraph; continuation lines kept with their newlines."""
    for para in text.split("\n\n"):
        fields: dict[str, str] = {}
        name = None
        for line in para.splitlines():
            if line[:1] in (" ", "\t") and name is not None:
                fields[name] += "\n" + line
            elif ":" in line:
                name, _, value = line.partition(":")
                fields[name] = value.strip()
        if fields:
            yield fields


def _description_text(value: str) -> str:
    """A Debian Description field as one paragraph of text: synopsis + extended body."""
    first, *body = value.split("\n")
    lines = [first.strip()] + [line.strip() for line in body if line.strip() != "."]
    return " ".join(line for line in lines if line)


@task(
    "deb_section",
    description="Debian archive section of a package from its description (12 topical sections)",
    labels=DEB_SECTIONS,
    apt=True,
    cap=1000,
    template="a software package in the {} category",
    label_names=(
        "system administration",
        "editors",
        "games",
        "graphics",
        "mail",
        "mathematics",
        "networking",
        "science",
        "sound",
        "text processing",
        "video",
        "web",
    ),
)
def _deb_section(reader: SourceReader) -> Iterator[Row]:
    index = reader.apt_index()
    long = {
        f["Description-md5"]: f["Description-en"]
        for f in _deb_paragraphs(index.translations)
        if "Description-md5" in f and "Description-en" in f
    }
    seen: set[str] = set()
    for f in _deb_paragraphs(index.packages):
        package, section = f.get("Package"), f.get("Section", "").split("/")[-1]
        if not package or section not in DEB_SECTIONS or package in seen:
            continue
        seen.add(package)
        description = long.get(f.get("Description-md5", ""), f.get("Description", ""))
        if not description:
            continue
        source = f.get("Source", package).split(" ")[0]
        yield Row(package, _description_text(description), section, group=f"src:{source}")


# --------------------------------------------------------------------------------------------
# WordNet 3.0 (Debian wordnet-base): noun supersense and part of speech

WORDNET_LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
"""Lexicographer file names by number (WordNet 3.0, lexnames(5WN))."""

SUPERSENSES = (
    "act", "animal", "artifact", "attribute", "body", "cognition", "communication", "food",
    "group", "location", "object", "person", "plant", "quantity", "state", "substance",
)  # fmt: skip
WORDNET_POS = ("adj", "adv", "noun", "verb")


def wordnet_synsets(path: Path) -> Iterator[tuple[str, str, list[str], str]]:
    """(offset, lexicographer file name, words, gloss) for each synset line of a ``data.*`` file."""
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            if line.startswith("  ") or "|" not in line:
                continue  # licence header
            head, _, gloss = line.partition("| ")
            parts = head.split()
            n_words = int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(n_words)]
            yield parts[0], WORDNET_LEXNAMES[int(parts[1])], words, gloss.strip()


def _wordnet_file(reader: SourceReader, pos: str) -> Path:
    for path in reader.deb_files("wordnet-base"):
        if path.name == f"data.{pos}":
            return path
    raise FileNotFoundError(f"wordnet-base has no data.{pos}")


@task(
    "wordnet_supersense",
    description="WordNet noun supersense (lexicographer file) of 'lemma: gloss' (16 classes)",
    labels=SUPERSENSES,
    salt="wordnet",
    deb=("wordnet-base",),
    cap=1000,
    template="a dictionary definition of a noun about {}",
)
def _wordnet_supersense(reader: SourceReader) -> Iterator[Row]:
    for offset, lexname, words, gloss in wordnet_synsets(_wordnet_file(reader, "noun")):
        label = lexname.split(".", 1)[1]
        if label in SUPERSENSES:
            yield Row(f"noun:{offset}", f"{words[0]}: {gloss}", label)


@task(
    "wordnet_pos",
    description="part of speech of a WordNet synset from the first clause of its gloss (no lemma)",
    labels=WORDNET_POS,
    salt="wordnet",
    deb=("wordnet-base",),
    cap=2500,
    template="a dictionary definition of {}",
    label_names=("an adjective", "an adverb", "a noun", "a verb"),
)
def _wordnet_pos(reader: SourceReader) -> Iterator[Row]:
    for pos in WORDNET_POS:
        for offset, _, _, gloss in wordnet_synsets(_wordnet_file(reader, pos)):
            yield Row(f"{pos}:{offset}", gloss.split(";")[0], pos)


# --------------------------------------------------------------------------------------------
# Programming language of a 12-line code window

CODE_LANGS: dict[str, tuple[tuple[str, ...], str]] = {
    "c": (("libc6-dev", "linux-libc-dev"), ".h"),
    "go": (("golang-1.19-src",), ".go"),
    "perl": (("perl-modules-5.36",), ".pm"),
    "python": (("libpython3.11-minimal", "libpython3.11-stdlib"), ".py"),
    "ruby": (("libruby3.1",), ".rb"),
}
JS_ARCHIVE_DIR = "package/src/"
WINDOW_LINES = 12
WINDOWS_PER_FILE = 2


def code_windows(lines: Sequence[str], n: int = WINDOW_LINES) -> Iterator[tuple[int, str]]:
    """Up to two ``n``-line windows past the licence-header region, as (start line, text)."""
    start = min(40, len(lines) // 3)
    step = max(4 * n, len(lines) // 2)
    taken = 0
    while start + n <= len(lines) and taken < WINDOWS_PER_FILE:
        window = "\n".join(lines[start : start + n])
        if len("".join(window.split())) >= 80 and len(window) <= 1200:
            yield start, window
            taken += 1
        start += step


@task(
    "code_lang",
    description="programming language of a 12-line source window (c, go, javascript, perl, python, ruby)",
    labels=("c", "go", "javascript", "perl", "python", "ruby"),
    salt="code",
    deb=tuple(p for pkgs, _ in CODE_LANGS.values() for p in pkgs),
    archives=("three",),
    cap=1200,
    template="a {} source file",
    label_names=("C", "Go", "JavaScript", "Perl", "Python", "Ruby"),
)
def _code_lang(reader: SourceReader) -> Iterator[Row]:
    for lang, (packages, suffix) in CODE_LANGS.items():
        for package in packages:
            for path in reader.deb_files(package):
                if path.suffix != suffix or "testdata" in path.parts:
                    continue
                try:
                    lines = path.read_text(encoding="utf-8").splitlines()
                except (UnicodeDecodeError, OSError):
                    continue
                for start, text in code_windows(lines):
                    yield Row(f"{package}:{path}:{start}", text, lang, group=f"file:{path}")
    with tarfile.open(reader.archive("three")) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            if not (m.isfile() and m.name.startswith(JS_ARCHIVE_DIR) and m.name.endswith(".js")):
                continue
            try:
                lines = tf.extractfile(m).read().decode("utf-8").splitlines()  # type: ignore[union-attr]
            except UnicodeDecodeError:
                continue
            for start, text in code_windows(lines):
                yield Row(f"three:{m.name}:{start}", text, "javascript", group=f"file:three/{m.name}")


ALL_TASKS: tuple[str, ...] = tuple(TASKS)
