# SPDX-License-Identifier: GPL-2.0-or-later
"""configure options, configure stamp, disk space, binaries."""

from __future__ import annotations

import collections
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from curlingtool import qemubuild
from curlingtool.qemubuild import BuildError, DiskSpaceError, QemuBuild

Usage = collections.namedtuple("Usage", "total used free")


def test_disk_space_error(tmp_path: Path) -> None:
    def nearly_full(_path: str) -> Usage:
        return Usage(100 << 30, 99 << 30, 1 << 29)
    with pytest.raises(DiskSpaceError) as info:
        qemubuild.check_disk_space(tmp_path / "not" / "yet", 3.0, "building QEMU",
                                   usage=nearly_full)
    assert str(info.value) == (f"not enough disk space for building QEMU: 0.5 GiB "
                               f"free in {tmp_path}, need 3.0 GiB")
    qemubuild.check_disk_space(tmp_path, 0.1, "x",
                               usage=lambda _p: Usage(1 << 30, 0, 1 << 30))


def test_configure_args() -> None:
    args = qemubuild.configure_args(Path("/r/.venv/bin/python3"), "debian-ds", "ccache")
    for opt in ("--target-list=x86_64-softmmu", "--disable-docs", "--enable-kvm",
                "--enable-slirp", "--disable-rust", "--disable-download",
                "--disable-install-blobs", "--python=/r/.venv/bin/python3",
                "--cc=ccache gcc",
                "--firmwarepath=/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu"):
        assert opt in args
    git_args = qemubuild.configure_args(Path("/p"), "git", None)
    assert "--disable-download" not in git_args and "--cc=gcc" in git_args


class FakeConfigure:
    def __init__(self, rc: int = 0) -> None:
        self.runs = 0
        self.rc = rc

    def __call__(self, argv: list[str], cwd: Path, stdout: Any, **_kw: Any
                 ) -> subprocess.CompletedProcess:
        self.runs += 1
        stdout.write("ERROR: Dependency \"pixman-1\" not found\n")
        if self.rc == 0:
            (cwd / "build.ninja").write_text("")
        return subprocess.CompletedProcess(argv, self.rc)


def make_build(tmp_path: Path) -> QemuBuild:
    src = tmp_path / "qemu"
    src.mkdir()
    (src / "configure").write_text("#!/bin/sh\n")
    return QemuBuild(src, tmp_path / "qemu-build", tmp_path / "bin",
                     tmp_path / ".venv/bin", tmp_path / "logs")


def test_configure_only_when_options_change(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    qb = make_build(tmp_path)
    fake = FakeConfigure()
    assert qb.configure("debian-ds", run=fake)
    (qb.build_dir / "object.o").write_text("")
    assert not qb.configure("debian-ds", run=fake)
    assert fake.runs == 1 and (qb.build_dir / "object.o").exists()
    assert qb.configure("git", run=fake)      # options differ: clean reconfigure
    assert fake.runs == 2 and not (qb.build_dir / "object.o").exists()


def test_configure_failure_is_one_line(tmp_path: Path) -> None:
    qb = make_build(tmp_path)
    with pytest.raises(BuildError) as info:
        qb.configure("debian-ds", run=FakeConfigure(rc=1))
    assert "\n" not in str(info.value)
    assert "configure failed (exit 1)" in str(info.value)


def test_link_binaries(tmp_path: Path) -> None:
    qb = make_build(tmp_path)
    qb.build_dir.mkdir()
    for name in qemubuild.TARGETS:
        (qb.build_dir / name).write_text("")
    qb.link_binaries()
    link = qb.bin_dir / "qemu-system-x86_64"
    assert not link.is_symlink(), "a symlink makes QEMU look for firmware in its build dir"
    assert link.samefile(qb.build_dir / "qemu-system-x86_64")
    qb.link_binaries()   # idempotent
    (qb.build_dir / "qemu-img").unlink()
    with pytest.raises(BuildError, match="qemu-img was not built"):
        qb.link_binaries()
