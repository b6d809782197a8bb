# SPDX-License-Identifier: GPL-2.0-or-later
"""The Curling test guest: a Debian kernel and a busybox initramfs.

The guest is assembled from Debian packages and from our own sources only:

* the kernel is ``/boot/vmlinuz-*`` of the ``linux-image-6.1.0-*-amd64``
  package that Debian's ``linux-image-amd64`` dependency package points to;
* ``/bin/busybox`` comes from ``busybox-static``;
* every ``tests/avocado/guest/*.c`` is compiled with ``gcc -static -O2`` and
  installed as ``/bin/<name>``; ``tests/avocado/guest/init.sh`` is ``/init``.

Packages are fetched with ``apt-get download`` into ``build/downloads/`` and
checked against the SHA256 that apt's package index gives; they are unpacked
with ``dpkg-deb``, never installed.  The result is cached under
``build/guest/<content-hash>/`` with ``build/guest/current`` pointing at the
newest one; the hash covers the packages' checksums and our sources, so an
unchanged second call does no work.
"""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
from typing import Generator, Sequence

logger = logging.getLogger(__name__)

# Bump when the layout of the image changes in a way the sources do not show.
GUEST_FORMAT = 1

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
CFLAGS: tuple[str, ...] = ("-static", "-O2", "-Wall")

GUEST_SOURCE_DIR = pathlib.Path("tests/avocado/guest")
INIT_SCRIPT = "init.sh"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
MANIFEST_NAME = "manifest.json"


class GuestError(Exception):
    """Base class of every error raised while building the test guest."""


class AptError(GuestError):
    """apt could not resolve or download a package."""


class ChecksumError(GuestError):
    """A downloaded file does not match the checksum apt knows for it."""


class PackageContentError(GuestError):
    """A package does not contain what the guest needs from it."""


class CompileError(GuestError):
    """A guest workload did not compile."""


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built guest: kernel and initramfs to pass to -kernel/-initrd."""

    kernel: pathlib.Path
    initrd: pathlib.Path
    kernel_version: str
    directory: pathlib.Path
    content_hash: str


@dataclasses.dataclass(frozen=True)
class DebRef:
    """One .deb as apt knows it: where it comes from and its checksum."""

    spec: str
    url: str
    filename: str
    size: int
    sha256: str


def _run(argv: Sequence[str], *, cwd: pathlib.Path | None = None,
         what: str, error: type[GuestError] = GuestError
         ) -> subprocess.CompletedProcess[str]:
    logger.debug("running %s", " ".join(argv))
    try:
        proc = subprocess.run(list(argv), cwd=cwd, capture_output=True,
                              text=True, check=False)
    except FileNotFoundError as exc:
        raise error(f"{what}: {argv[0]} not found") from exc
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        last = detail[-1] if detail else f"exit code {proc.returncode}"
        raise error(f"{what}: {last}")
    return proc


_PRINT_URI_RE = re.compile(
    r"^'(?P<url>[^']+)'\s+(?P<file>\S+)\s+(?P<size>\d+)\s+SHA256:(?P<sha>[0-9a-f]{64})\s*$")


def resolve_debs(*specs: str) -> list[DebRef]:
    """Ask apt (offline, from its package index) where packages come from.

    Each spec is a package name, optionally ``name=version``.
    """
    proc = _run(["apt-get", "download", "--print-uris", *specs],
                what=f"apt cannot resolve {' '.join(specs)} "
                     "(is the package index current? run apt-get update)",
                error=AptError)
    found: dict[str, DebRef] = {}
    for line in proc.stdout.splitlines():
        m = _PRINT_URI_RE.match(line.strip())
        if m:
            package = m["file"].split("_", 1)[0]
            found[package] = DebRef(spec="", url=m["url"], filename=m["file"],
                                    size=int(m["size"]), sha256=m["sha"])
    refs = []
    for spec in specs:
        ref = found.get(spec.split("=", 1)[0])
        if ref is None:
            raise AptError(f"apt knows no SHA256 for {spec} "
                           "(is the package index current? run apt-get update)")
        refs.append(dataclasses.replace(ref, spec=spec))
    return refs


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_deb(ref: DebRef, downloads: pathlib.Path) -> pathlib.Path:
    """Return the verified .deb for ``ref``, downloading it when needed."""
    downloads.mkdir(parents=True, exist_ok=True)
    path = downloads / ref.filename
    if path.exists():
        if sha256_file(path) == ref.sha256:
            logger.debug("cached %s", path.name)
            return path
        logger.warning("%s does not match its checksum, downloading again",
                       path.name)
        path.unlink()
    logger.info("downloading %s (%.1f MB)", ref.filename, ref.size / 1e6)
    _run(["apt-get", "download", ref.spec], cwd=downloads,
         what=f"apt-get download {ref.spec} failed", error=AptError)
    if not path.exists():
        raise AptError(f"apt-get download {ref.spec} did not leave {ref.filename}")
    actual = sha256_file(path)
    if actual != ref.sha256:
        path.unlink()
        raise ChecksumError(f"{ref.filename}: sha256 {actual}, "
                            f"apt expects {ref.sha256}")
    return path


def deb_field(deb: pathlib.Path, field: str) -> str:
    proc = _run(["dpkg-deb", "-f", str(deb), field],
                what=f"cannot read {field} of {deb.name}",
                error=PackageContentError)
    return proc.stdout.strip()


_KERNEL_DEP_RE = re.compile(
    r"^(?P<name>linux-image-\d[^\s(]*)\s*(?:\(\s*=\s*(?P<version>[^)\s]+)\s*\))?$")


def kernel_spec_from_depends(depends: str) -> str:
    """Pick the real kernel package out of the meta package's Depends."""
    for item in depends.split(","):
        for alternative in item.split("|"):
            m = _KERNEL_DEP_RE.match(alternative.strip())
            if m:
                if m["version"]:
                    return f"{m['name']}={m['version']}"
                return m["name"]
    raise PackageContentError(
        f"{KERNEL_META_PACKAGE} depends on no linux-image package: {depends!r}")


def _deb_members(
        deb: pathlib.Path) -> Generator[tuple[tarfile.TarInfo, tarfile.TarFile], None, None]:
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                          stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                for member in tar:
                    yield member, tar
        finally:
            proc.stdout.close()
            proc.wait()


def extract_from_deb(deb: pathlib.Path, pattern: str,
                     dest: pathlib.Path) -> tuple[pathlib.Path, str]:
    """Unpack the first regular file whose path matches ``pattern``.

    Like ``dpkg-deb -x`` limited to one file: the rest of the package
    (a kernel's modules, hundreds of MB) is not written out.
    Returns the written file and the member's path inside the package.
    """
    regex = re.compile(pattern)
    members = _deb_members(deb)
    try:
        for member, tar in members:
            name = member.name.removeprefix("./")
            if member.isfile() and regex.fullmatch(name):
                src = tar.extractfile(member)
                if src is None:
                    break
                with src, dest.open("wb") as out:
                    shutil.copyfileobj(src, out)
                return dest, name
    except tarfile.TarError as exc:
        raise PackageContentError(f"cannot unpack {deb.name}: {exc}") from exc
    finally:
        members.close()
    raise PackageContentError(f"{deb.name} has no file matching {pattern}")


def compile_workload(source: pathlib.Path, output: pathlib.Path) -> None:
    argv = ["gcc", *CFLAGS, "-o", str(output), str(source)]
    logger.info("compiling %s", source.name)
    _run(argv, what=f"cannot compile {source.name} "
                    "(needs gcc and libc6-dev)", error=CompileError)


class _Cpio:
    """Writer of a newc ("070701") cpio archive, as the kernel unpacks it."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._ino = 1

    @staticmethod
    def _pad(n: int) -> bytes:
        return b"\0" * ((4 - n % 4) % 4)

    def _entry(self, name: str, mode: int, body: bytes = b"",
               rdev: tuple[int, int] = (0, 0), nlink: int = 1) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, nlink, 0, len(body), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self._data += header + encoded + self._pad(len(header) + len(encoded))
        self._data += body + self._pad(len(body))
        self._ino += 1

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755, nlink=2)

    def file(self, name: str, body: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, body)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int,
                perm: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | perm, rdev=(major, minor))

    def finish(self) -> bytes:
        self._ino = 0
        self._entry("TRAILER!!!", 0, nlink=1)
        return bytes(self._data)


def pack_initramfs(busybox: pathlib.Path, init_script: pathlib.Path,
                   programs: Sequence[pathlib.Path],
                   output: pathlib.Path) -> None:
    """Write a gzip-compressed newc initramfs; byte-identical for equal input."""
    cpio = _Cpio()
    for d in ("bin", "dev", "etc", "proc", "root", "run", "sbin", "sys",
              "tmp", "usr", "usr/bin", "usr/sbin"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.chardev("dev/ttyS0", 4, 64)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for program in sorted(programs):
        cpio.file(f"bin/{program.name}", program.read_bytes(), 0o755)
    cpio.file("init", init_script.read_bytes(), 0o755)
    output.write_bytes(gzip.compress(cpio.finish(), compresslevel=9, mtime=0))


def _content_hash(kernel: DebRef, busybox: DebRef,
                  sources: Sequence[pathlib.Path],
                  init_script: pathlib.Path) -> str:
    inputs = {
        "format": GUEST_FORMAT,
        "cflags": list(CFLAGS),
        "kernel_deb": kernel.sha256,
        "busybox_deb": busybox.sha256,
        "sources": {s.name: sha256_file(s) for s in sources},
        "init": sha256_file(init_script),
    }
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _load_cached(directory: pathlib.Path, content_hash: str) -> GuestImage | None:
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    kernel = directory / KERNEL_NAME
    initrd = directory / INITRD_NAME
    if manifest.get("content_hash") != content_hash or \
            not kernel.is_file() or not initrd.is_file():
        return None
    return GuestImage(kernel=kernel, initrd=initrd,
                      kernel_version=manifest["kernel_version"],
                      directory=directory, content_hash=content_hash)


def _point_current(guest_root: pathlib.Path, content_hash: str) -> None:
    current = guest_root / "current"
    if current.is_symlink() and os.readlink(current) == content_hash:
        return
    tmp = guest_root / f".current.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(content_hash)
    os.replace(tmp, current)


def _prune(guest_root: pathlib.Path, keep: str) -> None:
    """Remove guests built from older inputs."""
    for entry in guest_root.iterdir():
        if entry.is_dir() and not entry.is_symlink() and entry.name != keep \
                and re.fullmatch(r"\.?[0-9a-f]{16}(\..*)?", entry.name):
            logger.debug("removing stale guest %s", entry.name)
            shutil.rmtree(entry, ignore_errors=True)


def build_guest(repo_root: pathlib.Path) -> GuestImage:
    """Build (or find in the cache) the test guest; see the module doc."""
    repo_root = pathlib.Path(repo_root).resolve()
    source_dir = repo_root / GUEST_SOURCE_DIR
    init_script = source_dir / INIT_SCRIPT
    sources = sorted(source_dir.glob("*.c"))
    if not init_script.is_file():
        raise GuestError(f"missing {init_script}")
    if not sources:
        raise GuestError(f"no workload sources (*.c) in {source_dir}")

    build = repo_root / "build"
    downloads = build / "downloads"
    guest_root = build / "guest"
    guest_root.mkdir(parents=True, exist_ok=True)

    # One builder at a time (parallel test processes may all ask for it).
    with (guest_root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)

        meta_ref, busybox_ref = resolve_debs(KERNEL_META_PACKAGE, BUSYBOX_PACKAGE)
        meta = fetch_deb(meta_ref, downloads)
        kernel_ref, = resolve_debs(kernel_spec_from_depends(deb_field(meta, "Depends")))
        content_hash = _content_hash(kernel_ref, busybox_ref, sources, init_script)
        directory = guest_root / content_hash

        image = _load_cached(directory, content_hash)
        if image is not None:
            logger.debug("guest %s is up to date", content_hash)
            _point_current(guest_root, content_hash)
            return image

        logger.info("building guest %s (kernel %s)", content_hash, kernel_ref.spec)
        kernel_deb = fetch_deb(kernel_ref, downloads)
        busybox_deb = fetch_deb(busybox_ref, downloads)

        work = pathlib.Path(tempfile.mkdtemp(prefix=f".{content_hash}.",
                                             dir=guest_root))
        work.chmod(0o755)
        try:
            _, vmlinuz = extract_from_deb(kernel_deb, r"boot/vmlinuz-.+",
                                          work / KERNEL_NAME)
            kernel_version = vmlinuz.split("vmlinuz-", 1)[1]
            busybox, _ = extract_from_deb(busybox_deb, r"bin/busybox",
                                          work / "busybox")
            programs = []
            for source in sources:
                out = work / source.stem
                compile_workload(source, out)
                programs.append(out)
            logger.info("packing initramfs")
            pack_initramfs(busybox, init_script, programs, work / INITRD_NAME)
            busybox.unlink()
            for program in programs:
                program.unlink()

            manifest = {
                "content_hash": content_hash,
                "format": GUEST_FORMAT,
                "kernel_version": kernel_version,
                "kernel_package": {"spec": kernel_ref.spec,
                                   "file": kernel_ref.filename,
                                   "sha256": kernel_ref.sha256},
                "busybox_package": {"spec": busybox_ref.spec,
                                    "file": busybox_ref.filename,
                                    "sha256": busybox_ref.sha256},
                "workloads": [s.stem for s in sources],
                "files": {name: sha256_file(work / name)
                          for name in (KERNEL_NAME, INITRD_NAME)},
            }
            (work / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(work, directory)
        finally:
            if work.exists():
                shutil.rmtree(work)
        _point_current(guest_root, content_hash)
        _prune(guest_root, keep=content_hash)
        logger.info("guest ready: %s", directory)
        return GuestImage(kernel=directory / KERNEL_NAME,
                          initrd=directory / INITRD_NAME,
                          kernel_version=kernel_version,
                          directory=directory, content_hash=content_hash)
