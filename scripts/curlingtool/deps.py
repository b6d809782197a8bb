# SPDX-License-Identifier: GPL-2.0-or-later
"""Debian packages needed to build QEMU, build the test guest and run tests.

PACKAGES is the one list. It was checked by building in a Debian 12
minbase chroot that had only python3, python3-venv, git and
ca-certificates installed.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import CurlingError

log = logging.getLogger(__name__)

# (package, why it is needed)
PACKAGES: tuple[tuple[str, str], ...] = (
    # QEMU build
    ("gcc", "C compiler"),
    ("libc6-dev", "C library headers, static libc for guest workloads"),
    ("pkg-config", "library lookup by meson"),
    ("libglib2.0-dev", "QEMU core"),
    ("zlib1g-dev", "QEMU core"),
    ("libpixman-1-dev", "QEMU display"),
    ("libslirp-dev", "user-mode networking (-netdev user)"),
    ("libfdt-dev", "device tree library"),
    ("libgnutls28-dev", "TLS for migration and Curling (tls-creds)"),
    ("flex", "QEMU build"),
    ("bison", "QEMU build"),
    ("ccache", "compiler cache for fast rebuilds"),
    ("perl", "scripts/checkpatch.pl"),
    ("git", "patch export (git format-patch)"),
    # test guest
    ("xz-utils", "Debian package extraction"),
    ("busybox-static", "test guest userland"),
    ("cpio", "test guest initramfs"),
    # network tests: namespace, bridge, taps (ip, bridge)
    ("iproute2", "network namespaces, bridges and taps of the network tests"),
    # disk tests: an ext4 image made and checked on the host
    ("e2fsprogs", "mkfs.ext4 and e2fsck of the disk tests and the Debian image"),
    # application guest: a Debian 12 image with PostgreSQL and nginx
    ("debootstrap", "installs the Debian application guest's system"),
    ("debian-archive-keyring", "debootstrap checks the Debian archive with it"),
    # application benchmark: pgbench (copied out of the image) and an HTTP
    # load generator, run on the host against the guest
    ("libpq5", "PostgreSQL's client library, for the image's pgbench"),
    ("apache2-utils", "ab, the HTTP load generator of the benchmark"),
    # arbitration tests: a throw-away etcd as the agents' witness
    ("etcd-server", "the etcd witness of the arbitration tests"),
    # TLS tests and benchmark: a test CA and certificates (certtool)
    ("gnutls-bin", "certtool, which makes the TLS tests' certificates"),
    # test runtime firmware (--firmwarepath)
    ("seabios", "x86 BIOS"),
    ("ipxe-qemu", "NIC option ROMs"),
    ("qemu-system-data", "option ROMs, keymaps, VGA BIOS"),
)

APT_LISTS = Path("/var/lib/apt/lists")

Runner = Callable[..., subprocess.CompletedProcess]


class MissingDependencyError(CurlingError):
    """Debian packages are missing and could not be (or may not be) installed."""


def sbin(tool: str) -> str:
    """A system tool of /usr/sbin (e2fsprogs, debootstrap), also when
    /usr/sbin is not on PATH."""
    return shutil.which(tool) or f"/usr/sbin/{tool}"


def package_names() -> list[str]:
    return [name for name, _why in PACKAGES]


def apt_get_line(packages: Iterable[str]) -> str:
    return "apt-get install -y --no-install-recommends " + " ".join(packages)


def missing_packages(packages: Sequence[str] | None = None,
                     run: Runner = subprocess.run) -> list[str] | None:
    """Return the packages that are not installed, per dpkg.

    None means this is not a Debian-like system (no dpkg-query): nothing
    can be checked.
    """
    if packages is None:
        packages = package_names()
    if not packages:
        return []
    try:
        proc = run(["dpkg-query", "-W",
                    "-f=${Package}\t${db:Status-Abbrev}\n", *packages],
                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                   text=True, check=False)
    except FileNotFoundError:
        return None
    installed = set()
    for line in proc.stdout.splitlines():
        name, _, status = line.partition("\t")
        if status.startswith("ii"):
            installed.add(name.split(":", 1)[0])
    return [p for p in packages if p not in installed]


def _lists_are_empty() -> bool:
    try:
        return not any(p.name.endswith(("_Packages", "_Packages.lz4",
                                        "_Packages.xz", "_Packages.gz"))
                       for p in APT_LISTS.iterdir())
    except OSError:
        return True


def _apt(args: Sequence[str], run: Runner) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.info("$ %s", " ".join(["apt-get", *args]))
    return run(["apt-get", *args], env=env, check=False).returncode == 0


def ensure(install: bool = True, packages: Sequence[str] | None = None,
           run: Runner = subprocess.run, is_root: bool | None = None) -> None:
    """Make sure the Debian packages are installed.

    install=False (--no-system-deps) only checks; missing packages raise
    MissingDependencyError naming them and the exact apt-get line.
    """
    missing = missing_packages(packages, run=run)
    if missing is None:
        log.warning("no dpkg-query: cannot check Debian build dependencies")
        return
    if not missing:
        log.debug("Debian packages: all installed")
        return
    line = apt_get_line(missing)
    if is_root is None:
        is_root = os.geteuid() == 0
    if not install:
        raise MissingDependencyError(
            f"missing Debian packages: {' '.join(missing)}; install them with: {line}")
    if not is_root:
        raise MissingDependencyError(
            f"missing Debian packages: {' '.join(missing)}; as root run: {line}")
    log.info("installing Debian packages: %s", " ".join(missing))
    updated = False
    if _lists_are_empty():
        updated = _apt(["update"], run)
    install_args = ["install", "-y", "--no-install-recommends", *missing]
    ok = _apt(install_args, run)
    if not ok and not updated:
        _apt(["update"], run)
        ok = _apt(install_args, run)
    if not ok:
        raise MissingDependencyError(
            f"apt-get could not install: {' '.join(missing)} (command: {line})")
    still = missing_packages(missing, run=run) or []
    if still:
        raise MissingDependencyError(
            f"still missing after apt-get install: {' '.join(still)}")
