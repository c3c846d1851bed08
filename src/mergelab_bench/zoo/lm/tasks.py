"""Language-model domains: plain-text corpora from named packages, with fixed hash splits.

A domain is an :class:`LMTaskSpec`: the packages it reads and a ``collect`` function that
turns a :class:`~mergelab_bench.zoo.sources.SourceReader` into :class:`LMRow` objects (a text, a
key locating it in its source, and a group that keeps related texts in one split). Every
domain goes through :func:`finalize_lm`, the same steps as the classification tasks
(:func:`mergelab_bench.zoo.tasks.finalize`) minus the labels:

1. texts are stripped of trailing spaces and cut to ``max_chars``; short ones are dropped;
2. duplicates (same text after NFKC, case folding and whitespace collapsing) are merged,
   keeping the row with the smallest key;
3. a domain with more than ``cap`` rows keeps the ``cap`` rows with the smallest
   ``hash(salt, key)`` (a deterministic sample);
4. each row goes to test / validation / train by ``hash(salt, group)``, so the windows of one
   source file, or both orders of a commutative sum, never straddle splits. Domains read from
   the same files as a classification task share its salt and grouping (``code`` by file,
   ``fortunes`` by text), so a text is held out in both suites or in neither;
5. each split is ordered by another hash: its first *n* rows are a random sample.

Rows are ``{"key", "text"}``; domains with an exact answer (``arithmetic``) add
``{"prompt", "answer"}``, where ``text == prompt + " " + answer + "\n"`` (the newline ends the
answer line, so a trained model learns where its answer stops; greedy decoding stops there). The built data is a
directory with ``{train,validation,test}.jsonl`` and ``meta.json`` (sizes, what was dropped,
source packages with versions, ``content_sha256`` over the three files), cached under
``<zoo cache>/lm/data/<task>-<key>``.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from mergelab_bench.zoo.cache import config_key, zoo_root
from mergelab_bench.zoo.registry import Registry
from mergelab_bench.zoo.sources import SourceReader
from mergelab_bench.zoo.splits import (
    SPLITS,
    Finalized,
    SplitConfig,
    finalized_splits,
    hash_sample,
    normalize_text,
)
from mergelab_bench.zoo.store import SplitFiles, ensure_dir, write_task_folder
from mergelab_bench.zoo.tasks import _deb_paragraphs, _description_text, _is_cookie_file, fortune_entries

LM_BUILDER_VERSION = 2
"""Version of the domain builders (part of every data key). 2: arithmetic texts end with a
newline, 12 000 problems; Python reads 12 windows per file (the stdlib has too few files for
500 test rows at 6)."""
LM_SPLIT = SplitConfig(validation=0.1, test=0.2, max_chars=1000, min_chars=20)
"""Split fractions and text limits of every domain (texts under 20 characters are dropped)."""

METRICS: tuple[str, ...] = ("perplexity", "exact_match")


@dataclass(frozen=True)
class LMRow:
    """One text as a builder emits it; ``fields`` holds extra string columns (prompt, answer)."""

    key: str
    text: str
    group: str | None = None
    fields: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class LMTaskSpec:
    """A domain: the sources it reads, the function that collects rows, its metrics.

    ``metrics[0]`` is the headline metric of the domain (the one normalized scores and
    averages use); the others are reported beside it.
    """

    name: str
    description: str
    salt: str
    collect: Callable[[SourceReader], Iterable[LMRow]]
    deb: tuple[str, ...] = ()
    apt: bool = False
    cap: int | None = None
    metrics: tuple[str, ...] = ("perplexity",)
    generated: str | None = None  # what generates the rows when no package does

    def sources(self, reader: SourceReader) -> list[dict[str, str]]:
        """Source packages with versions (digest for the apt index; generator version otherwise)."""
        fp = reader.fingerprint(self.deb, (), self.apt)
        out = [{"kind": "deb", "name": p, "version": fp[f"deb:{p}"]} for p in self.deb]
        if self.apt:
            out.append({"kind": "apt-index", "name": "Packages+Translation-en", "digest": fp["apt:index"]})
        if self.generated:
            out.append({"kind": "generated", "name": self.generated, "version": str(LM_BUILDER_VERSION)})
        return out


LM_TASKS: Registry[LMTaskSpec] = Registry("LM task")


def lm_task(
    name: str,
    *,
    description: str,
    salt: str | None = None,
    deb: Sequence[str] = (),
    apt: bool = False,
    cap: int | None = None,
    metrics: Sequence[str] = ("perplexity",),
    generated: str | None = None,
) -> Callable[[Callable[[SourceReader], Iterable[LMRow]]], Callable[[SourceReader], Iterable[LMRow]]]:
    """Register a domain whose rows ``fn(reader)`` collects."""

    def decorate(fn: Callable[[SourceReader], Iterable[LMRow]]) -> Callable[[SourceReader], Iterable[LMRow]]:
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"LM task {name!r}: unknown metrics {unknown}")
        LM_TASKS.add(
            LMTaskSpec(
                name=name,
                description=description,
                salt=salt or name,
                collect=fn,
                deb=tuple(deb),
                apt=apt,
                cap=cap,
                metrics=tuple(metrics),
                generated=generated,
            )
        )
        return fn

    return decorate


def get_lm_task(name: str) -> LMTaskSpec:
    return LM_TASKS.spec(name)


# --------------------------------------------------------------------------------------------
# Finalizing and writing


LMFinalized = Finalized


def _clean(text: str, max_chars: int) -> str:
    lines = [line.rstrip() for line in text.strip("\n").splitlines()]
    return "\n".join(lines)[:max_chars].rstrip()


def finalize_lm(spec: LMTaskSpec, rows: Iterable[LMRow], cfg: SplitConfig = LM_SPLIT) -> LMFinalized:
    """Clean, deduplicate, cap and split ``rows`` (see the module docstring); order-independent."""
    dropped: Counter[str] = Counter()
    by_text: dict[str, LMRow] = {}
    keys: set[str] = set()
    for row in rows:
        if row.key in keys:
            raise ValueError(f"LM task {spec.name}: key {row.key!r} emitted twice")
        keys.add(row.key)
        text = row.text if row.fields else _clean(row.text, cfg.max_chars)  # exact-answer rows stay verbatim
        if len(text.strip()) < cfg.min_chars:
            dropped["too_short"] += 1
            continue
        norm = normalize_text(text)
        kept = by_text.get(norm)
        if kept is not None:
            dropped["duplicate"] += 1
            if row.key > kept.key:
                continue
        by_text[norm] = LMRow(row.key, text, row.group, row.fields)

    items = list(by_text.items())
    if spec.cap is not None and len(items) > spec.cap:
        items, over = hash_sample(spec.salt, items, spec.cap, key=lambda it: it[1].key)
        dropped["over_cap"] += over

    records = ((norm, row.group, {"key": row.key, "text": row.text, **dict(row.fields)}) for norm, row in items)
    return finalized_splits(spec.salt, records, cfg, dropped)


@dataclass
class LMTaskData(SplitFiles):
    """A built domain on disk: metadata and the split files."""

    @property
    def metrics(self) -> list[str]:
        return list(self.meta["metrics"])

    def texts(self, split: str, limit: int | None = None) -> list[str]:
        return [r["text"] for r in self.rows(split, limit)]


def lm_data_key(spec: LMTaskSpec, reader: SourceReader, cfg: SplitConfig = LM_SPLIT) -> str:
    """Content address of a domain's data: builder version, split config, cap, sources."""
    return config_key(
        {
            "builder": LM_BUILDER_VERSION,
            "task": spec.name,
            "cap": spec.cap,
            "metrics": list(spec.metrics),
            "split": asdict(cfg),
            "sources": reader.fingerprint(spec.deb, (), spec.apt),
        }
    )


def build_lm_task(spec: LMTaskSpec, reader: SourceReader, out: Path, cfg: SplitConfig = LM_SPLIT) -> dict:
    """Collect, finalize and write one domain into ``out``; returns its metadata."""
    result = finalize_lm(spec, spec.collect(reader), cfg)
    empty = [s for s in SPLITS if not result.splits[s]]
    if empty:
        raise ValueError(f"LM task {spec.name}: empty {', '.join(empty)} split(s); is a source missing or empty?")
    return write_task_folder(
        out,
        spec,
        reader,
        cfg,
        result,
        builder_version=LM_BUILDER_VERSION,
        suite="lm",
        metrics=list(spec.metrics),
        cap=spec.cap,
        chars={s: sum(len(r["text"]) for r in rows) for s, rows in result.splits.items()},
    )


def ensure_lm_task(
    name: str,
    reader: SourceReader,
    *,
    cache: str | os.PathLike[str] | None = None,
    cfg: SplitConfig = LM_SPLIT,
    force: bool = False,
) -> LMTaskData:
    """The built data of domain ``name``, built into the cache first if it is not there."""
    spec = get_lm_task(name)
    final = zoo_root(cache) / "lm" / "data" / f"{name}-{lm_data_key(spec, reader, cfg)}"
    return LMTaskData.load(
        ensure_dir(final, lambda tmp: build_lm_task(spec, reader, tmp, cfg), done="meta.json", force=force)
    )


# --------------------------------------------------------------------------------------------
# Code windows (Debian-installed source files)

CODE_WINDOW_LINES = 16
CODE_WINDOWS_PER_FILE = 6
CODE_MIN_NONSPACE = 120
CODE_MAX_CHARS = 900


def line_windows(
    lines: Sequence[str],
    n: int = CODE_WINDOW_LINES,
    per_file: int = CODE_WINDOWS_PER_FILE,
    *,
    min_nonspace: int = CODE_MIN_NONSPACE,
    max_chars: int = CODE_MAX_CHARS,
) -> Iterator[tuple[int, str]]:
    """Up to ``per_file`` disjoint ``n``-line windows past the licence-header region, as (start line, text).

    Windows are spread evenly over the file; those with little text (blank runs) or very long
    lines (data tables) are skipped.
    """
    start = min(40, len(lines) // 4)
    usable = len(lines) - start
    if usable < n:
        return
    step = max(n, usable // per_file)
    taken = 0
    while start + n <= len(lines) and taken < per_file:
        window = "\n".join(lines[start : start + n]).strip("\n")
        if len("".join(window.split())) >= min_nonspace and len(window) <= max_chars:
            yield start, window
            taken += 1
        start += step


def _installed_path(path: Path) -> str:
    """The file's path as installed (from ``/usr/`` on), so keys and splits do not depend on
    where a source tree was unpacked (the system root, or a test fixture's folder)."""
    text = path.as_posix()
    i = text.find("/usr/")
    return text[i:] if i >= 0 else text


def _source_windows(
    reader: SourceReader, packages: Sequence[str], keep: Callable[[Path], bool], per_file: int = CODE_WINDOWS_PER_FILE
) -> Iterator[LMRow]:
    for package in packages:
        for path in reader.deb_files(package):
            if not keep(path):
                continue
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (UnicodeDecodeError, OSError):
                continue
            where = _installed_path(path)
            for start, text in line_windows(lines, per_file=per_file):
                yield LMRow(f"{package}:{where}:{start}", text, group=f"file:{where}")


def _not_test(path: Path) -> bool:
    return not {"test", "tests", "testdata", "idle_test"}.intersection(path.parts)


PYTHON_WINDOWS_PER_FILE = 12
"""The CPython stdlib has about 400 usable files: 12 windows each give > 500 test rows."""


@lm_task(
    "python",
    description="16-line windows (up to 12 per file) of Python standard-library source (CPython 3.11)",
    salt="code",
    deb=("libpython3.11-minimal", "libpython3.11-stdlib"),
    cap=6000,
)
def _python(reader: SourceReader) -> Iterator[LMRow]:
    yield from _source_windows(
        reader,
        ("libpython3.11-minimal", "libpython3.11-stdlib"),
        lambda p: p.suffix == ".py" and _not_test(p),
        per_file=PYTHON_WINDOWS_PER_FILE,
    )


@lm_task(
    "go",
    description="16-line windows of Go standard-library source (Go 1.19), tests excluded",
    salt="code",
    deb=("golang-1.19-src",),
    cap=6000,
)
def _go(reader: SourceReader) -> Iterator[LMRow]:
    yield from _source_windows(
        reader,
        ("golang-1.19-src",),
        lambda p: p.suffix == ".go" and not p.name.endswith("_test.go") and _not_test(p),
    )


# --------------------------------------------------------------------------------------------
# Fortune cookies (Debian fortunes-de, fortunes-it)


def _fortunes(reader: SourceReader, package: str, subdir: str) -> Iterator[LMRow]:
    for path in reader.deb_files(package):
        if path.parent.name != subdir or not _is_cookie_file(path):
            continue
        for i, text in enumerate(fortune_entries(path)):
            yield LMRow(f"{package}:{path.parent.name}/{path.name}:{i}", text)


@lm_task(
    "german",
    description="German fortune cookies (fortunes-de), quotations and jokes",
    salt="fortunes",
    deb=("fortunes-de",),
    cap=6000,
)
def _german(reader: SourceReader) -> Iterator[LMRow]:
    yield from _fortunes(reader, "fortunes-de", "de")


@lm_task(
    "italian",
    description="Italian fortune cookies (fortunes-it)",
    salt="fortunes",
    deb=("fortunes-it",),
    cap=6000,
)
def _italian(reader: SourceReader) -> Iterator[LMRow]:
    yield from _fortunes(reader, "fortunes-it", "it")


# --------------------------------------------------------------------------------------------
# Debian package descriptions (apt index + English long descriptions)


@lm_task(
    "debian",
    description="English long descriptions of Debian 12 packages, grouped by source package",
    apt=True,
    cap=6000,
)
def _debian(reader: SourceReader) -> Iterator[LMRow]:
    index = reader.apt_index()
    long = {
        f["Description-md5"]: f["Description-en"]
        for f in _deb_paragraphs(index.translations)
        if "Description-md5" in f and "Description-en" in f
    }
    seen: set[str] = set()
    for f in _deb_paragraphs(index.packages):
        package = f.get("Package")
        if not package or package in seen:
            continue
        seen.add(package)
        description = long.get(f.get("Description-md5", ""))
        if not description:
            continue
        source = f.get("Source", package).split(" ")[0]
        yield LMRow(package, _description_text(description), group=f"src:{source}")


# --------------------------------------------------------------------------------------------
# Arithmetic problems with exact answers (generated, no package)

ARITHMETIC_PROBLEMS = 12000
"""Distinct problems generated (the first ones of the hash sequence): about 2400 test rows."""


def arithmetic_problem(i: int) -> tuple[int, str, int]:
    """The ``i``-th problem ``(a, op, b)``: 2-digit sums and differences, 1-by-2-digit products."""
    h = hashlib.sha256(f"mergelab-lm-arithmetic/{i}".encode()).digest()
    op = "+-*"[h[0] % 3]
    if op == "*":
        return 2 + h[1] % 8, op, 10 + int.from_bytes(h[2:4], "big") % 90
    return 10 + int.from_bytes(h[1:3], "big") % 90, op, 10 + int.from_bytes(h[3:5], "big") % 90


def arithmetic_answer(a: int, op: str, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def arithmetic_prompt(a: int, op: str, b: int) -> str:
    """The question up to the answer; the model continues with `` <answer>``."""
    return f"Question: What is {a} {op} {b}?\nAnswer:"


@lm_task(
    "arithmetic",
    description="'What is a op b?' with exact integer answers (2-digit +, -, and 1x2-digit *), generated",
    generated="mergelab arithmetic generator",
    metrics=("exact_match", "perplexity"),
)
def _arithmetic(reader: SourceReader) -> Iterator[LMRow]:
    seen: set[tuple[int, str, int]] = set()
    i = -1
    while len(seen) < ARITHMETIC_PROBLEMS:
        i += 1
        a, op, b = arithmetic_problem(i)
        if (a, op, b) in seen:
            continue
        seen.add((a, op, b))
        prompt, answer = arithmetic_prompt(a, op, b), str(arithmetic_answer(a, op, b))
        # commutative pairs (a + b, b + a) share a group: never one in train and one in test
        group = f"{min(a, b)}{op}{max(a, b)}" if op in "+*" else f"{a}{op}{b}"
        yield LMRow(f"{a}{op}{b}", f"{prompt} {answer}\n", group=group, fields=(("answer", answer), ("prompt", prompt)))


ALL_LM_TASKS: tuple[str, ...] = tuple(LM_TASKS)
