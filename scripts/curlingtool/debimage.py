# SPDX-License-Identifier: GPL-2.0-or-later
"""The application guest: a Debian 12 disk image with PostgreSQL and nginx.

Where the test guest (``guest.py``) is our own initramfs, this one is what
users protect: a Debian system booted by systemd, with PostgreSQL 15 and
nginx, on one ext4 file system.  It is built as follows:

* ``debootstrap --variant=minbase`` installs ``PACKAGES`` from a Debian
  mirror (build.py's ``--debian-mirror``); debootstrap checks the suite's Release file
  against ``debian-archive-keyring`` and every package against it, as apt
  does.  Downloaded packages are kept in ``build/downloads/debootstrap/``;
* the files under ``tests/avocado/debian/root/`` are copied over the
  result (networking, PostgreSQL's settings, fstab...), a few systemd
  units are enabled or masked, and ``www/big.bin`` (``BIG_FILE_SIZE``
  deterministic bytes) is put where nginx serves it;
* ``mkfs.ext4 -d`` makes ``disk.raw`` (``IMAGE_SIZE``, sparse) from the
  tree without mounting anything; the kernel and initramfs that Debian's
  packages installed are copied beside it for ``-kernel``/``-initrd``, and
  so is ``pgbench``, for the benchmark to run on the host.

The result is cached under ``build/debian/<content-hash>/`` with
``build/debian/current`` pointing at it.  The hash covers the package list,
the checksums apt's index gives for those packages today, our files and
``IMAGE_FORMAT``: an unchanged second call does no work.  Tests never boot
``disk.raw`` itself: each QEMU gets a copy of its own (``copy_image``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import random
import shutil
import subprocess
import tempfile
import time

from .deps import sbin
from .guest import (AptError, GuestError, point_current, prune,
                    resolve_debs, run_command, sha256_file)

logger = logging.getLogger(__name__)

# Bump when the image changes in a way the inputs below do not show.
IMAGE_FORMAT = 2

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
KEYRING = pathlib.Path("/usr/share/keyrings/debian-archive-keyring.gpg")

#: What debootstrap installs beyond the minimal base (and their dependencies);
#: dbus lets systemd-logind run, which powers off on ACPI's power button
PACKAGES: tuple[str, ...] = (
    "systemd-sysv", "udev", "linux-image-amd64", "initramfs-tools",
    "iproute2", "procps", "dbus", "postgresql", "nginx",
)
#: systemd units enabled in the image (networkd gives eth0 its address;
#: ours says on the serial console once PostgreSQL accepts connections)
ENABLE_UNITS: tuple[tuple[str, str], ...] = (
    ("systemd-networkd.service", "multi-user.target.wants"),
    ("curling-ready.service", "multi-user.target.wants"),
)
#: Timers that would start work of their own in the middle of a test
MASK_UNITS: tuple[str, ...] = (
    "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer",
    "e2scrub_reap.service", "fstrim.timer", "logrotate.timer",
    "man-db.timer", "systemd-timesyncd.service",
)

IMAGE_SIZE = 3 << 30
BIG_FILE = "var/www/html/big.bin"
BIG_FILE_SIZE = 64 << 20
BIG_FILE_SEED = 20261207

OVERLAY_DIR = pathlib.Path("tests/avocado/debian/root")
IMAGE_NAME = "disk.raw"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
MANIFEST_NAME = "manifest.json"
#: PostgreSQL's own benchmark client, copied out of the image: the same
#: version as the guest's server, run on the host (it needs libpq5 there)
PGBENCH_NAME = "pgbench"

#: The kernel command line the image boots with
KERNEL_APPEND = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
#: The machine the image is run on, by the tests and the benchmark
MACHINE = "q35"
MEM = "1G"
SMP = 2
#: What the image's curling-ready.service writes to ttyS0 once PostgreSQL
#: accepts connections
READY = "curling-debian: ready"
#: Where the guest's services listen (the network tests' guest address)
POSTGRES_PORT = 5432
HTTP_PORT = 80


class ImageError(GuestError):
    """The Debian guest image could not be built."""


@dataclasses.dataclass(frozen=True)
class DebianImage:
    """A built application guest."""

    disk: pathlib.Path
    kernel: pathlib.Path
    initrd: pathlib.Path
    directory: pathlib.Path
    content_hash: str
    big_file_sha256: str
    pgbench: pathlib.Path

    @property
    def append(self) -> str:
        return KERNEL_APPEND


def big_file_bytes(size: int = BIG_FILE_SIZE,
                   seed: int = BIG_FILE_SEED) -> bytes:
    """What nginx serves as /big.bin: the same bytes on every build."""
    return random.Random(seed).randbytes(size)


def overlay_files(overlay: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in overlay.rglob("*") if p.is_file())


def content_hash(package_shas: dict[str, str],
                 overlay: pathlib.Path) -> str:
    inputs = {
        "format": IMAGE_FORMAT,
        "suite": SUITE,
        "packages": package_shas,
        "enable": [list(u) for u in ENABLE_UNITS],
        "mask": list(MASK_UNITS),
        "size": IMAGE_SIZE,
        "big": [BIG_FILE, BIG_FILE_SIZE, BIG_FILE_SEED],
        "append": KERNEL_APPEND,
        "files": {str(p.relative_to(overlay)): sha256_file(p)
                  for p in overlay_files(overlay)},
    }
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _customize(root: pathlib.Path, overlay: pathlib.Path) -> str:
    """Our files, units and served file over the debootstrapped tree;
    returns the served file's SHA256."""
    for src in overlay_files(overlay):
        dst = root / src.relative_to(overlay)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        dst.chmod(0o644)
    units = root / "etc/systemd/system"
    for unit, wants in ENABLE_UNITS:
        target = next((d / unit for d in (root / "etc/systemd/system",
                                          root / "lib/systemd/system",
                                          root / "usr/lib/systemd/system")
                       if (d / unit).exists()), None)
        if target is None:
            raise ImageError(f"the image has no {unit}")
        link = units / wants / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to("/" + str(target.relative_to(root)))
    for unit in MASK_UNITS:
        link = units / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    # PostgreSQL's configuration belongs to its user
    pg_conf = root / "etc/postgresql"
    if not any(pg_conf.glob("*/main/postgresql.conf")):
        raise ImageError("the image has no PostgreSQL cluster "
                         "(etc/postgresql/*/main)")
    big = big_file_bytes()
    (root / BIG_FILE).parent.mkdir(parents=True, exist_ok=True)
    (root / BIG_FILE).write_bytes(big)
    # Nothing to download again inside the guest
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    return hashlib.sha256(big).hexdigest()


def mounts_under(root: pathlib.Path,
                 mountinfo: str = "/proc/self/mountinfo") -> list[str]:
    """Mount points at or below ``root``, deepest first."""
    prefix = str(root).rstrip("/") + "/"
    found = []
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            # field 5 is the mount point, octal-escaped
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix[:-1] or point.startswith(prefix):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_all(root: pathlib.Path) -> None:
    """Unmount what debootstrap may have left mounted in the tree (its
    /proc, when unmounting it at exit failed): nothing may be copied into
    the image from, or deleted through, a host file system."""
    for point in mounts_under(root):
        logger.info("unmounting %s", point)
        if subprocess.run(["umount", point], check=False).returncode:
            subprocess.run(["umount", "-l", point], check=False)
    left = mounts_under(root)
    if left:
        raise ImageError(f"cannot unmount {', '.join(left)}")


def _boot_files(root: pathlib.Path, work: pathlib.Path) -> str:
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"expected one kernel in /boot, found "
                         f"{[k.name for k in kernels]}")
    version = kernels[0].name.split("vmlinuz-", 1)[1]
    initrd = root / "boot" / f"initrd.img-{version}"
    if not initrd.is_file():
        raise ImageError(f"no initramfs for kernel {version} in /boot")
    shutil.copyfile(kernels[0], work / KERNEL_NAME)
    shutil.copyfile(initrd, work / INITRD_NAME)
    pgbench = sorted(root.glob("usr/lib/postgresql/*/bin/pgbench"))
    if len(pgbench) != 1:
        raise ImageError(f"expected one pgbench in the image, found "
                         f"{[str(p.relative_to(root)) for p in pgbench]}")
    shutil.copy2(pgbench[0], work / PGBENCH_NAME)
    return version


def _load_cached(directory: pathlib.Path, digest: str) -> DebianImage | None:
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    image = DebianImage(disk=directory / IMAGE_NAME,
                        kernel=directory / KERNEL_NAME,
                        initrd=directory / INITRD_NAME,
                        directory=directory, content_hash=digest,
                        big_file_sha256=manifest.get("big_file_sha256", ""),
                        pgbench=directory / PGBENCH_NAME)
    if manifest.get("content_hash") != digest or not all(
            p.is_file() for p in (image.disk, image.kernel, image.initrd,
                                  image.pgbench)):
        return None
    return image


def find_image(repo_root: pathlib.Path) -> DebianImage | None:
    """The image ``build_image`` made last, without checking apt."""
    current = pathlib.Path(repo_root) / "build" / "debian" / "current"
    if not current.is_symlink():
        return None
    return _load_cached(current.resolve(), os.readlink(current))


def build_image(repo_root: pathlib.Path,
                mirror: str = DEFAULT_MIRROR) -> DebianImage:
    """Build (or find in the cache) the application guest; see the module
    doc."""
    repo_root = pathlib.Path(repo_root).resolve()
    overlay = repo_root / OVERLAY_DIR
    if not overlay.is_dir():
        raise ImageError(f"missing {overlay}")
    if not KEYRING.is_file():
        raise ImageError(f"missing {KEYRING} (package debian-archive-keyring)")
    build = repo_root / "build"
    image_root = build / "debian"
    image_root.mkdir(parents=True, exist_ok=True)

    with (image_root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        refs = resolve_debs(*PACKAGES)
        digest = content_hash({r.spec: r.sha256 for r in refs}, overlay)
        directory = image_root / digest
        image = _load_cached(directory, digest)
        if image is not None:
            logger.debug("Debian image %s is up to date", digest)
            point_current(image_root, digest)
            return image

        cache = build / "downloads" / "debootstrap"
        cache.mkdir(parents=True, exist_ok=True)
        work = pathlib.Path(tempfile.mkdtemp(prefix=f".{digest}.",
                                             dir=image_root))
        work.chmod(0o755)
        root = work / "root"
        try:
            started = time.monotonic()
            logger.info("building Debian image %s: debootstrap %s from %s "
                        "(a few minutes)", digest, SUITE, mirror)
            try:
                run_command([sbin("debootstrap"), "--variant=minbase",
                             f"--include={','.join(PACKAGES)}",
                             f"--keyring={KEYRING}", f"--cache-dir={cache}",
                             SUITE, str(root), mirror],
                            what="debootstrap failed", error=ImageError,
                            env={**os.environ,
                                 "DEBIAN_FRONTEND": "noninteractive"})
            except ImageError as exc:
                log = root / "debootstrap" / "debootstrap.log"
                if log.is_file():
                    kept = image_root / "debootstrap.log"
                    shutil.copyfile(log, kept)
                    raise ImageError(f"{exc} (its log: {kept})") from None
                raise
            logger.info("debootstrap done in %.0f s",
                        time.monotonic() - started)
            unmount_all(root)
            big_sha = _customize(root, overlay)
            kernel_version = _boot_files(root, work)
            logger.info("making the %d GiB ext4 image", IMAGE_SIZE >> 30)
            disk = work / IMAGE_NAME
            with disk.open("wb") as f:
                f.truncate(IMAGE_SIZE)
            run_command([sbin("mkfs.ext4"), "-q", "-F", "-L", "curling-debian",
                         "-d", str(root), str(disk)],
                        what="mkfs.ext4 -d failed", error=ImageError)
            shutil.rmtree(root)
            manifest = {
                "content_hash": digest,
                "format": IMAGE_FORMAT,
                "suite": SUITE,
                "mirror": mirror,
                "kernel_version": kernel_version,
                "packages": {r.spec: {"file": r.filename, "sha256": r.sha256}
                             for r in refs},
                "big_file": "/" + BIG_FILE.removeprefix("var/www/html/"),
                "big_file_sha256": big_sha,
                "append": KERNEL_APPEND,
            }
            (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2)
                                              + "\n")
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(work, directory)
        finally:
            if work.exists():
                # never delete through a mount left in the tree
                unmount_all(work)
                shutil.rmtree(work, ignore_errors=True)
        point_current(image_root, digest)
        prune(image_root, keep=digest)
        logger.info("Debian image ready in %.0f s: %s",
                    time.monotonic() - started, directory)
        image = _load_cached(directory, digest)
        assert image is not None
        return image


def disk_args(disk: pathlib.Path) -> list[str]:
    """QEMU arguments of the image's drive ``disk`` (a copy of it)."""
    return ["-drive", f"if=none,id=disk0,file={disk},format=raw",
            "-device", "virtio-blk-pci,drive=disk0"]


def copy_image(image: DebianImage, dest: pathlib.Path) -> pathlib.Path:
    """A private, sparse copy of the image's disk for one QEMU."""
    run_command(["cp", "--sparse=always", str(image.disk), str(dest)],
                what=f"copying {image.disk.name}", error=ImageError)
    return dest


__all__ = ["AptError", "DebianImage", "ImageError", "build_image",
           "copy_image", "disk_args", "find_image", "big_file_bytes"]
