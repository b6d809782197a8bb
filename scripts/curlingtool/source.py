# SPDX-License-Identifier: GPL-2.0-or-later
"""Obtain and verify the pinned upstream QEMU source.

Sources are tried in order; the first that works wins:

1. the `qemu-src/` git submodule, if initialized (HEAD must be the
   release tag's commit)                                  kind "git"
2. a tarball given with --qemu-tarball (sha256 must match
   the table, or the --sha256 given)          kind "tarball" or "debian-ds"
3. Debian's source package of the same upstream version, downloaded
   with `apt-get source --download-only` through a private sources
   list and cached under build/downloads/            kind "debian-ds"

A source that cannot be reached is reported in one line and the next is
tried. A source that can be reached but does not verify is an error.

The source kind also selects patch topic folders: `patches/debian-ds/`
applies only to the "debian-ds" kind (see patchqueue.KIND_TOPICS).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional

from . import CurlingError

log = logging.getLogger(__name__)

DEFAULT_VERSION = "10.2.2"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

KIND_GIT = "git"
KIND_TARBALL = "tarball"
KIND_DEBIAN = "debian-ds"


@dataclasses.dataclass(frozen=True)
class Release:
    """One upstream QEMU release and every way we know to obtain it."""

    version: str
    git_tag: str
    git_commit: Optional[str]       # commit the tag points to, when verified
    upstream_tarball: str
    upstream_sha256: Optional[str]  # qemu-X.Y.Z.tar.xz from the QEMU project
    debian_version: str
    debian_suite: str
    debian_orig: str
    debian_sha256: str

    @property
    def top_dir(self) -> str:
        return f"qemu-{self.version}"


def _release(version: str, *, debian_version: str, suite: str,
             debian_sha256: str, git_commit: Optional[str] = None,
             upstream_sha256: Optional[str] = None) -> Release:
    return Release(version=version, git_tag=f"v{version}",
                   git_commit=git_commit,
                   upstream_tarball=f"qemu-{version}.tar.xz",
                   upstream_sha256=upstream_sha256,
                   debian_version=debian_version, debian_suite=suite,
                   debian_orig=f"qemu_{version}+ds.orig.tar.xz",
                   debian_sha256=debian_sha256)


# The version table. Adding a release is one entry.
RELEASES: dict[str, Release] = {
    "10.2.2": _release(
        "10.2.2", debian_version="1:10.2.2+ds-1", suite="sid",
        debian_sha256="be05230fe47a6937cd29f28f562932c8125f9c93c2a82c625198f7a4aa601dfb"),
    "10.0.13": _release(
        "10.0.13", debian_version="1:10.0.13+ds-0+deb13u1", suite="trixie",
        debian_sha256="6a0888e806c2ffc0c5f0733e974f9aea55491950d3c47c98669c8b236dde59ae"),
}


class SourceError(CurlingError):
    """The QEMU source could not be obtained or did not verify."""


class UnknownVersionError(SourceError):
    pass


class ChecksumMismatchError(SourceError):
    pass


class SourceUnavailable(SourceError):
    """This source cannot be reached; the next one is tried."""


def get_release(version: str) -> Release:
    try:
        return RELEASES[version]
    except KeyError:
        known = ", ".join(sorted(RELEASES))
        raise UnknownVersionError(
            f"unknown QEMU version {version!r} (known: {known})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class Source:
    """A verified QEMU source tree, as a tarball or a git commit."""

    kind: str
    release: Release
    origin: str                       # for humans
    tarball: Optional[Path] = None
    sha256: Optional[str] = None
    git_dir: Optional[Path] = None
    git_commit: Optional[str] = None

    @property
    def identity(self) -> str:
        """Changes exactly when the pristine tree may change."""
        return f"{self.kind}:{self.sha256 or self.git_commit}"

    @contextlib.contextmanager
    def open_tar(self) -> Iterator[tarfile.TarFile]:
        """Stream the source as a tar archive whose members sit below one
        top-level directory."""
        if self.tarball is not None:
            with tarfile.open(self.tarball, mode="r|*") as tar:
                yield tar
            return
        assert self.git_dir is not None and self.git_commit is not None
        proc = subprocess.Popen(
            ["git", "-C", str(self.git_dir), "archive", "--format=tar",
             f"--prefix={self.release.top_dir}/", self.git_commit],
            stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                yield tar
        finally:
            if proc.stdout:
                proc.stdout.close()
            if proc.wait() != 0:
                raise SourceError(f"git archive failed in {self.git_dir}")


Runner = Callable[..., subprocess.CompletedProcess]


@dataclasses.dataclass
class Obtainer:
    """Tries the sources in order. Paths are absolute."""

    release: Release
    repo_root: Path
    build_dir: Path
    qemu_tarball: Optional[Path] = None
    sha256: Optional[str] = None
    mirror: str = DEFAULT_MIRROR
    run: Runner = subprocess.run

    @property
    def downloads(self) -> Path:
        return self.build_dir / "downloads"

    def obtain(self) -> Source:
        failures = []
        for name, attempt in (("qemu-src/ submodule", self.from_submodule),
                              ("--qemu-tarball", self.from_tarball),
                              ("Debian source package", self.from_debian)):
            try:
                source = attempt()
            except SourceUnavailable as exc:
                log.warning("%s: %s", name, exc)
                failures.append(f"{name}: {exc}")
                continue
            if source is not None:
                log.info("QEMU %s source: %s", self.release.version, source.origin)
                return source
        raise SourceError(f"no source for QEMU {self.release.version} could be "
                          f"obtained ({'; '.join(failures) or 'none tried'})")

    # 1. git submodule -------------------------------------------------
    def from_submodule(self) -> Optional[Source]:
        sub = self.repo_root / "qemu-src"
        if not (sub / ".git").exists():
            if sub.is_dir():
                raise SourceUnavailable("not initialized "
                                        "(git submodule update --init qemu-src)")
            return None
        import pygit2

        try:
            repo = pygit2.Repository(str(sub))
            head = str(repo.head.peel(pygit2.Commit).id)
        except (pygit2.GitError, KeyError, ValueError) as exc:
            raise SourceUnavailable(f"cannot read qemu-src/: {exc}") from exc
        rel = self.release
        expected = rel.git_commit
        if expected is None:
            try:
                ref = repo.references[f"refs/tags/{rel.git_tag}"]
                expected = str(ref.peel(pygit2.Commit).id)
            except (KeyError, pygit2.GitError):
                raise SourceError(
                    f"qemu-src/ has no tag {rel.git_tag} to verify HEAD "
                    f"{head[:12]} against (git -C qemu-src fetch --tags)") from None
        if head != expected:
            raise SourceError(f"qemu-src/ HEAD is {head[:12]}, expected "
                              f"{rel.git_tag} = {expected[:12]}")
        return Source(kind=KIND_GIT, release=rel, git_dir=sub, git_commit=head,
                      origin=f"qemu-src/ at {rel.git_tag} ({head[:12]})")

    # 2. explicit tarball ----------------------------------------------
    def from_tarball(self) -> Optional[Source]:
        if self.qemu_tarball is None:
            return None
        path = self.qemu_tarball
        if not path.is_file():
            raise SourceError(f"--qemu-tarball {path}: no such file")
        rel = self.release
        actual = sha256_file(path)
        if actual == rel.debian_sha256:
            kind = KIND_DEBIAN
        elif self.sha256:
            if actual != self.sha256.lower():
                raise ChecksumMismatchError(
                    f"{path}: sha256 {actual} does not match --sha256 {self.sha256}")
            kind = KIND_TARBALL
        elif rel.upstream_sha256 is None:
            raise SourceError(
                f"{path}: no pinned sha256 for {rel.upstream_tarball}; verify the "
                f"release signature, then pass --sha256 {actual}")
        elif actual != rel.upstream_sha256:
            raise ChecksumMismatchError(
                f"{path}: sha256 {actual} does not match {rel.upstream_tarball} "
                f"({rel.upstream_sha256}) nor {rel.debian_orig}")
        else:
            kind = KIND_TARBALL
        return Source(kind=kind, release=rel, tarball=path, sha256=actual,
                      origin=f"{path} ({kind}, sha256 verified)")

    # 3. Debian source package -----------------------------------------
    def from_debian(self) -> Optional[Source]:
        rel = self.release
        cached = self.downloads / rel.debian_orig
        if cached.is_file():
            if sha256_file(cached) == rel.debian_sha256:
                return self._debian_source(cached, "cached")
            log.warning("%s: checksum mismatch, downloading again", cached)
            cached.unlink()
        self.downloads.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.downloads,
                                         prefix=".apt-source-") as tmp:
            self._apt_get_source(Path(tmp))
            got = Path(tmp) / rel.debian_orig
            if not got.is_file():
                raise SourceUnavailable(f"apt-get source left no {rel.debian_orig}")
            actual = sha256_file(got)
            if actual != rel.debian_sha256:
                raise ChecksumMismatchError(
                    f"{rel.debian_orig}: sha256 {actual}, expected {rel.debian_sha256}")
            os.replace(got, cached)
        return self._debian_source(cached, "downloaded")

    def _debian_source(self, path: Path, how: str) -> Source:
        rel = self.release
        shown = (path.relative_to(self.repo_root)
                 if path.is_relative_to(self.repo_root) else path)
        return Source(kind=KIND_DEBIAN, release=rel, tarball=path,
                      sha256=rel.debian_sha256,
                      origin=f"Debian qemu {rel.debian_version}, {how} "
                             f"{shown}, sha256 verified")

    def apt_options(self) -> list[str]:
        """apt-get options that keep everything private under build/apt/."""
        apt = self.build_dir / "apt"
        opts = {
            "Dir::Etc::SourceList": str(apt / "sources.list"),
            "Dir::Etc::SourceParts": "/dev/null",
            "Dir::State::Lists": str(apt / "lists"),
            "Dir::Cache": str(apt / "cache"),
            "Acquire::Languages": "none",
            # A mirror serving a stale sid index must not stop us: what we
            # download is checked against the pinned sha256 anyway.
            "Acquire::Check-Valid-Until": "false",
        }
        if os.geteuid() == 0:
            # files land in our own directories: no need to drop to _apt
            opts["APT::Sandbox::User"] = "root"
        return [arg for k, v in opts.items() for arg in ("-o", f"{k}={v}")]

    def _apt_get_source(self, workdir: Path) -> None:
        rel = self.release
        apt = self.build_dir / "apt"
        for sub in ("lists/partial", "cache/archives/partial"):
            (apt / sub).mkdir(parents=True, exist_ok=True)
        (apt / "sources.list").write_text(
            f"deb-src {self.mirror} {rel.debian_suite} main\n")
        opts = self.apt_options()
        log.info("apt-get source --download-only qemu=%s (%s %s)",
                 rel.debian_version, self.mirror, rel.debian_suite)
        steps = (("apt-get update", ["update"], None),
                 ("apt-get source", ["source", "--download-only",
                                     f"qemu={rel.debian_version}"], workdir))
        for label, args, cwd in steps:
            try:
                proc = self.run(["apt-get", *opts, *args], cwd=cwd,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, check=False)
            except FileNotFoundError:
                raise SourceUnavailable("apt-get not found") from None
            # apt-get update exits 0 even when an index could not be fetched
            bad = [ln.strip() for ln in proc.stdout.splitlines()
                   if ln.startswith(("E:", "Err:", "W: Failed"))]
            if proc.returncode != 0 or bad:
                last = (bad or proc.stdout.strip().splitlines() or ["no output"])[-1]
                raise SourceUnavailable(f"{label} failed: {last}")
