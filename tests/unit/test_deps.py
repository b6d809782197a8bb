# SPDX-License-Identifier: GPL-2.0-or-later
"""Debian package checks and the messages for missing ones."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from curlingtool import deps
from curlingtool.deps import MissingDependencyError


class FakeDpkg:
    """dpkg-query and apt-get stand-in over a set of installed packages."""

    def __init__(self, installed: set[str], apt_works_after_update: bool = True,
                 apt_works: bool = True) -> None:
        self.installed = set(installed)
        self.calls: list[list[str]] = []
        self.updated = False
        self.apt_works = apt_works
        self.needs_update = not apt_works_after_update

    def __call__(self, argv: list[str], **_kw: Any) -> subprocess.CompletedProcess:
        self.calls.append(argv)
        if argv[0] == "dpkg-query":
            out = "".join(f"{p}\tii \n" for p in argv[3:] if p in self.installed)
            out += "".join(f"{p}\tun \n" for p in argv[3:]
                           if p not in self.installed and p.startswith("lib"))
            return subprocess.CompletedProcess(argv, 0 if out else 1, out)
        assert argv[0] == "apt-get"
        if argv[1] == "update":
            self.updated = True
            return subprocess.CompletedProcess(argv, 0)
        if not self.apt_works or (self.needs_update and not self.updated):
            return subprocess.CompletedProcess(argv, 100)
        self.installed.update(a for a in argv[2:] if not a.startswith("-"))
        return subprocess.CompletedProcess(argv, 0)


ALL = set(deps.package_names())


def test_one_list_covers_the_build() -> None:
    names = deps.package_names()
    assert len(names) == len(set(names))
    for needed in ("gcc", "libglib2.0-dev", "libpixman-1-dev", "libslirp-dev",
                   "libfdt-dev", "flex", "bison", "ccache", "busybox-static",
                   "seabios", "ipxe-qemu", "qemu-system-data"):
        assert needed in names


def test_nothing_missing() -> None:
    fake = FakeDpkg(ALL)
    deps.ensure(install=True, run=fake, is_root=False)
    assert [c[0] for c in fake.calls] == ["dpkg-query"]


def test_missing_package_message_names_it() -> None:
    fake = FakeDpkg(ALL - {"libfdt-dev", "seabios"})
    with pytest.raises(MissingDependencyError) as info:
        deps.ensure(install=False, run=fake)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg == ("missing Debian packages: libfdt-dev seabios; install them with: "
                   "apt-get install -y --no-install-recommends libfdt-dev seabios")
    assert all(c[0] == "dpkg-query" for c in fake.calls)


def test_not_root_cannot_install() -> None:
    with pytest.raises(MissingDependencyError, match="as root run: apt-get install .* libslirp-dev"):
        deps.ensure(install=True, run=FakeDpkg(ALL - {"libslirp-dev"}), is_root=False)


def test_root_installs_and_updates_only_when_needed(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "deb.debian.org_debian_dists_bookworm_main_binary-amd64_Packages").write_text("")
    monkeypatch.setattr(deps, "APT_LISTS", lists)
    fake = FakeDpkg(ALL - {"ccache"})
    deps.ensure(install=True, run=fake, is_root=True)
    apt = [c[1] for c in fake.calls if c[0] == "apt-get"]
    assert apt == ["install"]
    # stale lists: install fails, update, retry
    fake = FakeDpkg(ALL - {"ccache"}, apt_works_after_update=False)
    deps.ensure(install=True, run=fake, is_root=True)
    assert [c[1] for c in fake.calls if c[0] == "apt-get"] == ["install", "update", "install"]


def test_empty_lists_update_first(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(deps, "APT_LISTS", tmp_path)
    fake = FakeDpkg(ALL - {"cpio"})
    deps.ensure(install=True, run=fake, is_root=True)
    assert [c[1] for c in fake.calls if c[0] == "apt-get"] == ["update", "install"]


def test_apt_failure_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(deps, "APT_LISTS", tmp_path)
    with pytest.raises(MissingDependencyError, match="apt-get could not install: cpio"):
        deps.ensure(install=True, run=FakeDpkg(ALL - {"cpio"}, apt_works=False),
                    is_root=True)


def test_no_dpkg_is_not_fatal() -> None:
    def no_dpkg(argv: list[str], **_kw: Any) -> subprocess.CompletedProcess:
        raise FileNotFoundError(argv[0])
    assert deps.missing_packages(run=no_dpkg) is None
    deps.ensure(install=False, run=no_dpkg)
