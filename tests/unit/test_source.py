# SPDX-License-Identifier: GPL-2.0-or-later
"""Version table, source choice and fall-through, checksums."""

from __future__ import annotations

import dataclasses
import logging
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import TOP, git, make_tarball, write_tree
from curlingtool import source
from curlingtool.source import (ChecksumMismatchError, Obtainer, SourceError,
                                UnknownVersionError)


def test_network_is_forbidden() -> None:
    with pytest.raises(OSError, match="not allowed"):
        socket.create_connection(("deb.debian.org", 80))


def test_version_table() -> None:
    rel = source.get_release("10.2.2")
    assert rel.git_tag == "v10.2.2"
    assert rel.debian_version == "1:10.2.2+ds-1" and rel.debian_suite == "sid"
    assert rel.debian_orig == "qemu_10.2.2+ds.orig.tar.xz"
    assert rel.upstream_tarball == "qemu-10.2.2.tar.xz"
    assert rel.top_dir == "qemu-10.2.2"
    old = source.get_release("10.0.13")
    assert old.debian_suite == "trixie"
    assert old.debian_sha256.startswith("6a0888e8")
    assert source.DEFAULT_VERSION in source.RELEASES


def test_unknown_version() -> None:
    with pytest.raises(UnknownVersionError, match=r"unknown QEMU version '9\.9\.9'.*10\.2\.2"):
        source.get_release("9.9.9")


class FakeApt:
    """Stands in for apt-get: records calls, optionally fails or 'downloads'."""

    def __init__(self, payload: bytes | None = None, fail_update: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.payload = payload
        self.fail_update = fail_update

    def __call__(self, argv: list[str], cwd: Path | None = None, **_kw: Any
                 ) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        if "update" in argv:
            if self.fail_update:
                return subprocess.CompletedProcess(
                    argv, 0, "Err:1 http://deb.debian.org/debian sid InRelease\n"
                             "  Could not resolve 'deb.debian.org'\n"
                             "W: Failed to fetch http://deb.debian.org/debian/dists/sid/InRelease\n")
            return subprocess.CompletedProcess(argv, 0, "Get:1 ... Sources\n")
        assert cwd is not None and "source" in argv
        assert self.payload is not None
        (cwd / "qemu_10.2.2+ds.orig.tar.xz").write_bytes(self.payload)
        return subprocess.CompletedProcess(argv, 0, "Fetched 38 MB\n")


def release_with(**changes: Any) -> source.Release:
    return dataclasses.replace(source.get_release("10.2.2"), **changes)


def obtainer(tmp_path: Path, release: source.Release | None = None, **kw: Any) -> Obtainer:
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    return Obtainer(release=release or source.get_release("10.2.2"), repo_root=repo,
                    build_dir=repo / "build", **kw)


def test_uninitialized_submodule_falls_through_to_debian(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    payload = make_tarball(tmp_path / "orig.tar.xz").read_bytes()
    rel = release_with(debian_sha256=source.sha256_file(tmp_path / "orig.tar.xz"))
    apt = FakeApt(payload)
    ob = obtainer(tmp_path, rel, run=apt)
    (ob.repo_root / "qemu-src").mkdir()
    with caplog.at_level(logging.WARNING):
        src = ob.obtain()
    assert src.kind == "debian-ds"
    assert src.tarball == ob.repo_root / "build/downloads/qemu_10.2.2+ds.orig.tar.xz"
    assert [r.getMessage() for r in caplog.records] == [
        "qemu-src/ submodule: not initialized (git submodule update --init qemu-src)"]
    update, get = apt.calls
    assert "update" in update and get[-2:] == ["--download-only", "qemu=1:10.2.2+ds-1"]
    opts = dict(a.split("=", 1) for a in update if "::" in a)
    assert opts["Dir::Etc::SourceList"].startswith(str(ob.build_dir))
    assert opts["Dir::Etc::SourceParts"] == "/dev/null"
    assert opts["Dir::State::Lists"].startswith(str(ob.build_dir))
    assert opts["Dir::Cache"].startswith(str(ob.build_dir))
    assert (ob.build_dir / "apt/sources.list").read_text() == \
        "deb-src http://deb.debian.org/debian sid main\n"
    # second time: the verified cache, no apt-get at all
    apt.calls.clear()
    assert ob.obtain().tarball == src.tarball
    assert apt.calls == []


def test_all_sources_unreachable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ob = obtainer(tmp_path, run=FakeApt(fail_update=True))
    (ob.repo_root / "qemu-src").mkdir()
    with caplog.at_level(logging.WARNING), pytest.raises(SourceError) as info:
        ob.obtain()
    assert "no source for QEMU 10.2.2" in str(info.value)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[1].startswith("Debian source package: apt-get update failed: W: Failed to fetch")


def test_download_checksum_mismatch(tmp_path: Path) -> None:
    ob = obtainer(tmp_path, run=FakeApt(b"not the tarball"))
    with pytest.raises(ChecksumMismatchError, match="qemu_10.2.2.ds.orig.tar.xz: sha256 .* expected be05230f"):
        ob.obtain()
    assert not (ob.build_dir / "downloads" / "qemu_10.2.2+ds.orig.tar.xz").exists()


def test_corrupt_cache_is_downloaded_again(tmp_path: Path) -> None:
    payload = make_tarball(tmp_path / "orig.tar.xz").read_bytes()
    rel = release_with(debian_sha256=source.sha256_file(tmp_path / "orig.tar.xz"))
    apt = FakeApt(payload)
    ob = obtainer(tmp_path, rel, run=apt)
    cached = ob.build_dir / "downloads" / rel.debian_orig
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"truncated")
    assert ob.obtain().kind == "debian-ds"
    assert cached.read_bytes() == payload and len(apt.calls) == 2


def test_tarball_checksums(tmp_path: Path) -> None:
    tarball = make_tarball(tmp_path / f"{TOP}.tar.xz")
    digest = source.sha256_file(tarball)
    # no pinned upstream checksum: refuse without --sha256, say which to pass
    with pytest.raises(SourceError, match=f"pass --sha256 {digest}"):
        obtainer(tmp_path, qemu_tarball=tarball).obtain()
    with pytest.raises(ChecksumMismatchError, match="does not match --sha256"):
        obtainer(tmp_path, qemu_tarball=tarball, sha256="0" * 64).obtain()
    src = obtainer(tmp_path, qemu_tarball=tarball, sha256=digest).obtain()
    assert (src.kind, src.sha256) == ("tarball", digest)
    # pinned upstream checksum
    pinned = release_with(upstream_sha256=digest)
    assert obtainer(tmp_path, pinned, qemu_tarball=tarball).obtain().kind == "tarball"
    with pytest.raises(ChecksumMismatchError, match="does not match qemu-10.2.2.tar.xz"):
        obtainer(tmp_path, release_with(upstream_sha256="1" * 64),
                 qemu_tarball=tarball).obtain()
    # the Debian orig tarball given by hand is recognised by its checksum
    deb = release_with(debian_sha256=digest)
    assert obtainer(tmp_path, deb, qemu_tarball=tarball).obtain().kind == "debian-ds"


def test_missing_tarball_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file"):
        obtainer(tmp_path, qemu_tarball=tmp_path / "nope.tar.xz").obtain()


def _submodule(repo_root: Path) -> str:
    sub = repo_root / "qemu-src"
    sub.mkdir(parents=True)
    write_tree(sub, {"VERSION": b"10.2.2\n", "configure": b"#!/bin/sh\n"})
    git(sub, "init", "-q", "-b", "master")
    git(sub, "add", "-A")
    git(sub, "commit", "-q", "-m", "Update version for v10.2.2 release")
    git(sub, "tag", "v10.2.2")
    return git(sub, "rev-parse", "HEAD").strip()


def test_submodule_at_tag_wins(tmp_path: Path) -> None:
    ob = obtainer(tmp_path, run=FakeApt())
    head = _submodule(ob.repo_root)
    src = ob.obtain()
    assert (src.kind, src.git_commit) == ("git", head)
    with src.open_tar() as tar:
        names = sorted(m.name for m in tar)
    assert f"{TOP}/VERSION" in names
    pinned = release_with(git_commit=head)
    assert obtainer(tmp_path, pinned).obtain().git_commit == head


def test_submodule_at_wrong_commit_is_an_error(tmp_path: Path) -> None:
    ob = obtainer(tmp_path)
    _submodule(ob.repo_root)
    with pytest.raises(SourceError, match="expected v10.2.2"):
        obtainer(tmp_path, release_with(git_commit="f" * 40)).obtain()
    git(ob.repo_root / "qemu-src", "commit", "-q", "--allow-empty", "-m", "local")
    with pytest.raises(SourceError, match="HEAD is .* expected v10.2.2"):
        ob.obtain()
