# SPDX-License-Identifier: GPL-2.0-or-later
"""Fixtures for the tooling's unit tests: no network, tiny synthetic QEMU."""

from __future__ import annotations

import importlib.util
import io
import socket
import subprocess
import tarfile
from pathlib import Path
from types import ModuleType
from typing import Callable

import pytest

from curlingtool import patchqueue, source

VERSION = "10.2.2"
TOP = f"qemu-{VERSION}"

UPSTREAM_FILES: dict[str, bytes] = {
    "VERSION": b"10.2.2\n",
    "configure": b"#!/bin/sh\necho configure \"$@\"\n",
    "README.rst": b"QEMU\n====\n\nA generic machine emulator.\n",
    "migration/migration.c": b"".join(b"int line%d;\n" % i for i in range(60)),
    "migration/ram.c": b"".join(b"static int ram%d;\n" % i for i in range(40)),
    "pc-bios/meson.build": b"roms = []\nif unpack_edk2_blobs\n  fds = []\nendif\n"
                           b"subdir('descriptors')\nsubdir('dtb')\n",
}
UPSTREAM_SYMLINKS = {"scripts/link-to-configure": "../configure"}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs without network: any connection attempt fails."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("network access is not allowed in unit tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture(autouse=True)
def git_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """git run by tests (and by export) ignores the user's configuration."""
    for key, value in patchqueue.GIT_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Test Author")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "author@example.org")
    monkeypatch.setenv("GIT_COMMITTER_NAME", "Test Committer")
    monkeypatch.setenv("GIT_COMMITTER_EMAIL", "committer@example.org")


def write_tree(root: Path, files: dict[str, bytes],
               symlinks: dict[str, str] | None = None) -> None:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if data.startswith(b"#!"):
            path.chmod(0o755)
    for name, target in (symlinks or {}).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)


def make_tarball(path: Path, files: dict[str, bytes] = UPSTREAM_FILES,
                 symlinks: dict[str, str] = UPSTREAM_SYMLINKS) -> Path:
    """A release-style tarball: everything below qemu-X.Y.Z/, owned by a
    user that does not exist here."""
    with tarfile.open(path, "w:xz") as tar:
        def add(info: tarfile.TarInfo, data: bytes | None = None) -> None:
            info.uid, info.gid, info.uname, info.gname = 4242, 4242, "mroth", "mroth"
            info.mtime = 1773797220
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        top = tarfile.TarInfo(TOP)
        top.type, top.mode = tarfile.DIRTYPE, 0o775
        add(top)
        for name, data in files.items():
            info = tarfile.TarInfo(f"{TOP}/{name}")
            info.size = len(data)
            info.mode = 0o775 if data.startswith(b"#!") else 0o664
            add(info, data)
        for name, target in symlinks.items():
            info = tarfile.TarInfo(f"{TOP}/{name}")
            info.type, info.linkname = tarfile.SYMTYPE, target
            add(info)
    return path


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, text=True,
                          stdout=subprocess.PIPE).stdout


@pytest.fixture
def upstream_source(tmp_path: Path) -> source.Source:
    tarball = make_tarball(tmp_path / f"{TOP}.tar.xz")
    return source.Source(kind=source.KIND_TARBALL,
                         release=source.get_release(VERSION), origin="test tarball",
                         tarball=tarball, sha256=source.sha256_file(tarball))


PatchMaker = Callable[..., list[Path]]


@pytest.fixture
def make_patches(tmp_path: Path) -> PatchMaker:
    """Write patches with real git: each change is (author, subject+body,
    {path: new content}); returns format-patch files, oldest first."""
    def make(changes: list[tuple[str, str, dict[str, bytes]]],
             outdir: Path) -> list[Path]:
        work = tmp_path / "patch-work"
        if not work.exists():
            work.mkdir()
            write_tree(work, UPSTREAM_FILES, UPSTREAM_SYMLINKS)
            git(work, "init", "-q", "-b", "main")
            git(work, "add", "-A")
            git(work, "commit", "-q", "-m", "upstream")
            git(work, "tag", "base")
        for author, message, files in changes:
            write_tree(work, files)
            git(work, "add", "-A")
            git(work, "commit", "-q", f"--author={author}", "-m", message,
                "--date=Tue, 3 Feb 2026 10:11:12 +0100")
        outdir.mkdir(parents=True, exist_ok=True)
        out = git(work, *patchqueue.FORMAT_PATCH_ARGS, "-o", str(outdir),
                  "base..HEAD")
        git(work, "tag", "-f", "base")
        return [Path(line) for line in out.split()]
    return make


SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a fresh module (the commands are no package)."""
    spec = importlib.util.spec_from_file_location(f"curling_{name}_script",
                                                  SCRIPTS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
