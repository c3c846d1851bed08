"""Shared fixtures of the benchmark tests (zoo, eval, demo): fixture sources (small files laid out like
the real packages) and a tiny two-task zoo (random-init BERT, perturbed experts), written once per
session; every test runs with one torch thread."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from tiny_models import one_torch_thread  # noqa: F401 - autouse: one torch thread in these tests

from mergelab_bench.zoo.build import Zoo
from mergelab_bench.zoo.sources import AptIndex
from mergelab_bench.zoo.testing import FixtureSources, write_tiny_zoo


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


VADER = {
    "tweets_GroundTruth.txt": [
        ("1", "2.5", "What a lovely day &amp; great friends"),
        ("2", "-1.8", "my phone died again, worst"),
    ],
    "movieReviewSnippets_GroundTruth.txt": [
        ("1", "3.1", "A gorgeous, moving film."),
        ("2", "-2.2", "Dull and far too long."),
        ("3", "0.3", "It is a film about a man."),  # |rating| < 0.5: not in sentiment
    ],
    "amazonReviewSnippets_GroundTruth.txt": [
        ("1_1", "1.2", "works fine, good value"),
        ("1_2", "-0.9", "the battery is weak"),
    ],
    "nytEditorialSnippets_GroundTruth.txt": [
        ("1_1", "-1.1", "The council failed the city again."),
        ("1_2", "0.7", "What a lovely day & great friends"),  # same text as tweet 1 after unescaping
    ],
}


def write_vader_sdist(path: Path) -> Path:
    inner = {
        f"hutto_ICWSM_2014/{name}": "".join(f"{i}\t{s}\t{t}\r\n" for i, s, t in rows).encode()
        for name, rows in VADER.items()
    }
    inner["hutto_ICWSM_2014/_README_.txt"] = b"readme"
    outer = {
        "vaderSentiment-3.3.2/setup.py": b"",
        "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": _tar_gz(inner),
    }
    path.write_bytes(_tar_gz(outer))
    return path


def _cookies(*texts: str) -> str:
    return "\n%\n".join(texts) + "\n%\n"


def write_fortunes(root: Path) -> dict[str, Path]:
    pk = {}
    en = root / "fortunes" / "usr/share/games/fortunes"
    en.mkdir(parents=True)
    (en / "computers").write_text(
        _cookies("The computer is down, again, and so am I.", "Bugs are features that bite.", "short")
    )
    (en / "people").write_text(
        _cookies("He who laughs last thinks slowest.\n\t\t-- Anon", "Bugs are features that bite.")
    )
    (en / "art").write_text(_cookies("A picture is worth a thousand w\x08words."))
    (en / "computers.dat").write_bytes(b"\x00\x01binary")
    (en / "zippy").write_text(_cookies("Are we having fun yet, asks the pinhead?"))
    pk["fortunes"] = root / "fortunes"
    de = root / "fortunes-de" / "usr/share/games/fortunes/de"
    de.mkdir(parents=True)
    (de / "sprueche").write_text(
        _cookies("Wer anderen eine Grube gräbt, fällt selbst hinein.", "Morgenstund hat Gold im Mund, sagt man.")
    )
    (de / "asciiart").write_text(_cookies("  /\\_/\\   ( o.o )  > ^ < ascii cat"))
    pk["fortunes-de"] = root / "fortunes-de"
    es = root / "fortunes-es" / "usr/share/games/fortunes/es"
    (es / "off").mkdir(parents=True)
    (es / "refranes.fortunes").write_text(_cookies("Más vale pájaro en mano que ciento volando."))
    (es / "off" / "varios.fortunes").write_text(_cookies("Un texto del directorio ofensivo, excluido."))
    pk["fortunes-es"] = root / "fortunes-es"
    for lang, pkg, text in (
        ("it", "fortunes-it", "Chi va piano va sano e va lontano."),
        ("pl", "fortunes-pl", "Gdzie kucharek sześć, tam nie ma co jeść."),
        ("ru", "fortunes-ru", "Тише едешь — дальше будешь, говорят."),
        ("cs", "fortunes-cs", "Kdo jinému jámu kopá, sám do ní padá."),
    ):
        d = root / pkg / "usr/share/games/fortunes" / lang
        d.mkdir(parents=True)
        (d / "misc").write_text(_cookies(text))
        pk[pkg] = root / pkg
    br = root / "fortunes-br" / "usr/share/games/fortunes"
    br.mkdir(parents=True)
    (br / "brasil").write_text(_cookies("Quem não tem cão caça com gato, diz o ditado."))
    pk["fortunes-br"] = root / "fortunes-br"
    return pk


WORDNET_HEADER = "  1 This software and database is being provided to you, the LICENSEE, by\n"


def write_wordnet(root: Path) -> Path:
    d = root / "wordnet-base" / "usr/share/wordnet"
    d.mkdir(parents=True)
    (d / "data.noun").write_text(
        WORDNET_HEADER
        + "07000001 13 n 01 jerky 0 000 | meat cut in strips and dried in the sun  \n"
        + '02000002 05 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis; "the dog barked"  \n'
        + "09000003 18 n 01 carpenter 0 000 | a woodworker who makes or repairs wooden objects  \n"
        + "09000004 03 n 01 entity 0 000 | that which is perceived to have its own existence  \n"  # noun.Tops: skipped
    )
    (d / "data.verb").write_text(
        WORDNET_HEADER + '01000005 30 v 01 run 0 000 | move fast by using one\'s feet; "run!"  \n'
    )
    (d / "data.adj").write_text(
        WORDNET_HEADER + "00000006 00 a 01 able 0 000 | having the necessary means or skill  \n"
    )
    (d / "data.adv").write_text(
        WORDNET_HEADER + "00000007 02 r 01 a_cappella 0 000 | without musical accompaniment  \n"
    )
    return root / "wordnet-base"


APT_PACKAGES = """Package: tuxracer
Version: 1.0
Description: 3D racing game featuring Tux
Description-md5: aaa
Section: games
Source: tuxracer-src (1.0-1)

Package: tuxracer-data
Version: 1.0
Description: data files for tuxracer
Description-md5: bbb
Section: games
Source: tuxracer-src

Package: mutt
Version: 2.0
Description: text-based mailreader
Description-md5: ccc
Section: mail

Package: libfoo1
Version: 1.0
Description: a library
Description-md5: ddd
Section: libs

Package: ghost
Version: 1.0
Description: no long description here
Description-md5: zzz
Section: contrib/editors
"""

APT_TRANSLATIONS = """Package: tuxracer
Description-md5: aaa
Description-en: 3D racing game featuring Tux
 Race down icy slopes as Tux the penguin.
 .
 Collect herring on the way.

Package: tuxracer-data
Description-md5: bbb
Description-en: data files for tuxracer
 Sounds and textures for the penguin racing game.

Package: mutt
Description-md5: ccc
Description-en: text-based mailreader
 Mutt reads and sends mail with MIME and PGP support.
"""


def _code_lines(lang: str, n: int) -> str:
    templates = {
        "python": "def f_{i}(x):\n    return x * {i} + len(str(x))  # python line {i}",
        "c": "static int f_{i}(int x) {{ return x * {i} + sizeof(long); }} /* c line {i} */",
        "go": "func f{i}(x int) int {{ return x * {i} + len(fmt.Sprint(x)) }} // go line {i}",
    }
    return "\n".join(templates[lang].format(i=i) for i in range(n)) + "\n"


def write_code(root: Path) -> tuple[dict[str, Path], Path]:
    pk = {}
    for lang, pkg, suffix in (
        ("python", "libpython3.11-stdlib", ".py"),
        ("c", "libc6-dev", ".h"),
        ("go", "golang-1.19-src", ".go"),
    ):
        d = root / pkg / "usr/lib" / lang
        d.mkdir(parents=True)
        for j in range(3):
            (d / f"mod{j}{suffix}").write_text(f"# header of file {j}\n" + _code_lines(lang, 60 + 70 * j))
        (d / "notes.txt").write_text("not code")
        pk[pkg] = root / pkg
    for pkg in ("libpython3.11-minimal", "linux-libc-dev", "perl-modules-5.36", "libruby3.1"):
        (root / pkg).mkdir(parents=True)
        pk[pkg] = root / pkg
    (root / "perl-modules-5.36" / "Foo.pm").write_text(
        "\n".join(f'sub f{i} {{ my ($x) = @_; return $x * {i} + length("$x"); }} # perl {i}' for i in range(60))
    )
    (root / "libruby3.1" / "foo.rb").write_text(
        "\n".join(f"def f{i}(x) = x * {i} + x.to_s.length # ruby line number {i} here" for i in range(60))
    )
    js = "\n".join(f"export function f{i}( x ) {{ return x * {i} + String( x ).length; }} // js {i}" for i in range(60))
    tgz = root / "three-0.187.0.tgz"
    tgz.write_bytes(
        _tar_gz(
            {"package/src/math/f.js": js.encode(), "package/build/three.js": js.encode(), "package/README.md": b"x"}
        )
    )
    return pk, tgz


@pytest.fixture(scope="session")
def fixture_sources(tmp_path_factory: pytest.TempPathFactory) -> FixtureSources:
    root = tmp_path_factory.mktemp("sources")
    packages = write_fortunes(root)
    packages["wordnet-base"] = write_wordnet(root)
    code_pk, tgz = write_code(root)
    packages.update(code_pk)
    archives = {"vaderSentiment": write_vader_sdist(root / "vaderSentiment-3.3.2.tar.gz"), "three": tgz}
    return FixtureSources(
        root, packages, archives, AptIndex(APT_PACKAGES, APT_TRANSLATIONS, {"release_version": "fixture"})
    )


@pytest.fixture(scope="session")
def tiny_zoo_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_zoo(tmp_path_factory.mktemp("tinyzoo"))


@pytest.fixture()
def tiny_zoo(tiny_zoo_manifest: Path) -> Zoo:
    """A fresh Zoo object (its in-memory caches are per test; feature files persist)."""
    return Zoo(tiny_zoo_manifest)


@pytest.fixture(scope="session")
def tiny_lm_zoo4(tmp_path_factory: pytest.TempPathFactory):
    """A tiny LM zoo of four domains (python, german, italian, arithmetic; 2 training steps each, 8 test rows),
    for the continual and MoE benchmarks' tests."""
    from mergelab_bench.zoo.lm.build import LMZooConfig, build_lm_zoo
    from mergelab_bench.zoo.lm.testing import write_lm_sources, write_tiny_causal_lm
    from mergelab_bench.zoo.lm.train import LMTrainConfig

    root = tmp_path_factory.mktemp("lmzoo4")
    train = LMTrainConfig(steps=2, batch_size=4, max_len=24, lr=1e-3, eval_limit=8, eval_batch_size=4)
    return build_lm_zoo(
        LMZooConfig(name="tiny", tasks=("python", "german", "italian", "arithmetic"), train=train),
        cache=root / "cache", reader=write_lm_sources(root / "src"), base_source=write_tiny_causal_lm(root / "tiny"),
        threads=1,
    )  # fmt: skip
