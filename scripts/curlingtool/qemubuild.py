# SPDX-License-Identifier: GPL-2.0-or-later
"""Configure and build QEMU (x86_64-softmmu) out of tree with meson/ninja.

build/qemu/          source (patchqueue)
build/qemu-build/    meson build directory
build/bin/           hard links to the binaries the tests use

configure runs again only when its options change (a stamp file holds
them); otherwise ninja alone decides what to rebuild.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import CurlingError

log = logging.getLogger(__name__)

TARGETS = ("qemu-system-x86_64", "qemu-img")
FIRMWARE_PATH = "/usr/share/qemu:/usr/share/seabios:/usr/lib/ipxe/qemu"
CONFIGURE_OPTIONS = (
    "--target-list=x86_64-softmmu",
    "--disable-docs",
    "--disable-werror",
    "--enable-kvm",
    "--enable-slirp",
    "--enable-gnutls",
    "--disable-gtk",
    "--disable-sdl",
    "--disable-opengl",
    "--disable-xen",
    "--disable-rust",
    "--disable-install-blobs",
    "--with-pkgversion=curling",
    f"--firmwarepath={FIRMWARE_PATH}",
)
STAMP = "curling-configure.json"

# Rough free space needed (GiB) before each stage.
SPACE_APPLY_GIB = 1.5
SPACE_BUILD_GIB = 3.0

Runner = Callable[..., subprocess.CompletedProcess]


class BuildError(CurlingError):
    pass


class DiskSpaceError(BuildError):
    pass


def check_disk_space(path: Path, need_gib: float, what: str,
                     usage: Callable[[str], Any] = shutil.disk_usage
                     ) -> None:
    """Raise DiskSpaceError unless `need_gib` GiB are free where `path` lives."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = usage(str(probe)).free / (1 << 30)
    if free < need_gib:
        raise DiskSpaceError(f"not enough disk space for {what}: {free:.1f} GiB "
                             f"free in {probe}, need {need_gib:.1f} GiB")


def jobs() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def configure_args(python: Path, source_kind: str,
                   ccache: Optional[str] = None) -> list[str]:
    args = list(CONFIGURE_OPTIONS)
    if source_kind != "git":
        # release tarballs carry the meson subprojects QEMU needs; a git
        # checkout has to download them
        args.append("--disable-download")
    args.append(f"--python={python}")
    args.append(f"--cc={ccache} gcc" if ccache else "--cc=gcc")
    return args


def tool_env(venv_bin: Path) -> dict[str, str]:
    """Environment with the venv's meson and ninja first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{venv_bin}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return env


class QemuBuild:
    def __init__(self, src_dir: Path, build_dir: Path, bin_dir: Path,
                 venv_bin: Path, log_dir: Path) -> None:
        self.src_dir = src_dir
        self.build_dir = build_dir
        self.bin_dir = bin_dir
        self.venv_bin = venv_bin
        self.log_dir = log_dir

    @property
    def stamp(self) -> Path:
        return self.build_dir / STAMP

    def wanted_args(self, source_kind: str) -> list[str]:
        ccache = shutil.which("ccache")
        return configure_args(self.venv_bin / "python3", source_kind,
                              "ccache" if ccache else None)

    def needs_configure(self, args: Sequence[str]) -> bool:
        if not (self.build_dir / "build.ninja").is_file():
            return True
        try:
            old = json.loads(self.stamp.read_text())
        except (OSError, ValueError):
            return True
        return old != {"src": str(self.src_dir), "args": list(args)}

    def configure(self, source_kind: str, force: bool = False,
                  run: Runner = subprocess.run) -> bool:
        """Run QEMU's configure if needed. Returns True if it ran."""
        configure = self.src_dir / "configure"
        if not configure.is_file():
            raise BuildError(f"{configure} not found (run scripts/build.py apply)")
        args = self.wanted_args(source_kind)
        if not force and not self.needs_configure(args):
            log.info("configure: options unchanged, skipped")
            return False
        if self.build_dir.exists():
            log.info("configure: options changed, starting from a clean %s",
                     self.build_dir.name)
            shutil.rmtree(self.build_dir)
        self.build_dir.mkdir(parents=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        logfile = self.log_dir / "configure.log"
        log.info("configure: %s (log: %s)", " ".join(args), logfile)
        with open(logfile, "w") as out:
            proc = run([str(configure), *args], cwd=self.build_dir,
                       env=tool_env(self.venv_bin), stdout=out,
                       stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            tail = logfile.read_text(errors="replace").strip().splitlines()[-15:]
            for line in tail:
                log.error("  %s", line)
            raise BuildError(f"QEMU configure failed (exit {proc.returncode}); "
                             f"full log: {logfile}")
        self.stamp.write_text(json.dumps({"src": str(self.src_dir),
                                          "args": list(args)}) + "\n")
        return True

    def build(self, targets: Sequence[str] = TARGETS, njobs: Optional[int] = None,
              run: Runner = subprocess.run) -> None:
        """ninja with its own progress output, then refresh build/bin."""
        njobs = njobs or jobs()
        ninja = shutil.which("ninja", path=str(self.venv_bin)) or shutil.which("ninja")
        if ninja is None:
            raise BuildError("ninja not found (it is installed in .venv by build.py)")
        cmd = [ninja, "-C", str(self.build_dir), f"-j{njobs}", *targets]
        log.info("build: ninja -j%d %s", njobs, " ".join(targets))
        proc = run(cmd, env=tool_env(self.venv_bin), check=False)
        if proc.returncode != 0:
            raise BuildError(f"ninja failed (exit {proc.returncode}) in {self.build_dir}")
        self.link_binaries(targets)

    def link_binaries(self, targets: Sequence[str] = TARGETS) -> None:
        """Hard-link the built binaries into build/bin.

        Not symlinks: QEMU started from its build directory finds the
        "qemu-bundle" there and looks for firmware only inside it, while
        started from build/bin it uses --firmwarepath, i.e. the files of
        Debian's seabios, ipxe-qemu and qemu-system-data packages.
        """
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        for name in targets:
            target = self.build_dir / name
            if not target.is_file():
                raise BuildError(f"{target} was not built")
            link = self.bin_dir / name
            try:
                if not link.is_symlink() and link.samefile(target):
                    continue
            except OSError:
                pass
            tmp = link.with_name(f".{name}.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(target, tmp)
            except OSError:
                shutil.copy2(target, tmp)
            os.replace(tmp, link)
        log.info("binaries: %s", ", ".join(str(self.bin_dir / t) for t in targets))
