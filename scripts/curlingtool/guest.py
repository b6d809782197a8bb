# SPDX-License-Identifier: GPL-2.0-or-later
"""The Curling test guest: a Debian kernel and a busybox initramfs.

The guest is assembled from Debian packages and from our own sources only:

* the kernel is ``/boot/vmlinuz-*`` of the ``linux-image-6.1.0-*-amd64``
  package that Debian's ``linux-image-amd64`` dependency package points to;
* ``/bin/busybox`` comes from ``busybox-static``;
* the kernel modules of ``KERNEL_MODULES`` and every module they depend on
  (read from the ``depends=`` field of each module's ``.modinfo``) come
  uncompressed from the same kernel package; they are packed as
  ``/lib/modules/<name>.ko`` with ``/lib/modules/load-order`` listing them
  dependencies first, for ``/init`` to insmod;
* every ``tests/avocado/guest/*.c`` is compiled with ``gcc -static -O2`` and
  installed as ``/bin/<name>``; ``tests/avocado/guest/init.sh`` is ``/init``.

Packages are fetched with ``apt-get download`` into ``build/downloads/`` and
checked against the SHA256 that apt's package index gives; they are unpacked
with ``dpkg-deb`` into memory, only the files the guest needs, never
installed.  The result is cached under
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
import struct
import subprocess
import tarfile
import tempfile
from typing import Generator, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

# Bump when the layout of the image changes in a way the sources do not show.
GUEST_FORMAT = 2

KERNEL_META_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
CFLAGS: tuple[str, ...] = ("-static", "-O2", "-Wall", "-pthread")

#: Kernel modules the guest loads at boot (module names, as in ``depends=``),
#: for the devices of the functional tests; their dependencies are added.
KERNEL_MODULES: tuple[str, ...] = (
    "virtio_pci",                        # every virtio-*-pci device
    "virtio_net", "e1000e",              # NICs
    "virtio_blk", "ahci", "virtio_scsi", "sd_mod",   # disks
    "ext4", "crc32c_generic",            # ext4 (its checksums use crc32c)
    "xhci_pci", "usbhid", "hid_generic", "evdev",    # usb-tablet, usb-kbd
    "virtio_gpu",                        # virtio-gpu, fbcon on it
    "virtio_balloon",
    "virtio_rng",
)
MODULE_DIR = "lib/modules"
MODULE_ORDER_NAME = "load-order"

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


class ModuleError(GuestError):
    """A kernel module is missing, unreadable or its dependencies loop."""


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


def run_command(argv: Sequence[str], *, cwd: pathlib.Path | None = None,
                env: Mapping[str, str] | None = None, what: str,
                error: type[GuestError] = GuestError
                ) -> subprocess.CompletedProcess[str]:
    """Run a build step; a failure raises ``error`` with ``what`` and the
    step's last line of output."""
    logger.debug("running %s", " ".join(argv))
    try:
        proc = subprocess.run(list(argv), cwd=cwd, env=env,
                              capture_output=True, text=True, check=False)
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
    proc = run_command(["apt-get", "download", "--print-uris", *specs],
                       what=f"apt cannot resolve {' '.join(specs)} "
                            "(is the package index current? run apt-get "
                            "update)",
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
    run_command(["apt-get", "download", ref.spec], cwd=downloads,
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
    proc = run_command(["dpkg-deb", "-f", str(deb), field],
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


@dataclasses.dataclass(frozen=True)
class KernelModule:
    """One kernel module as found in the kernel package."""

    name: str                   # module name, as ``depends=`` spells it
    path: str                   # path inside the package
    depends: tuple[str, ...]


def normalize_module_name(name: str) -> str:
    """The kernel treats ``-`` and ``_`` in module names alike; so do we
    (``depends=`` may say ``t10-pi`` for the module named ``t10_pi``)."""
    return name.replace("-", "_")


def module_name_from_path(path: str) -> str:
    """``.../virtio-gpu.ko`` is module ``virtio_gpu``."""
    return normalize_module_name(path.rsplit("/", 1)[-1].removesuffix(".ko"))


def parse_modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section.

    Keys may repeat (``alias=``), so each maps to a list of values.
    """
    def bad(why: str) -> ModuleError:
        return ModuleError(f"not a 64-bit little-endian kernel module: {why}")

    if len(elf) < 64 or elf[:4] != b"\x7fELF":
        raise bad("no ELF header")
    if elf[4] != 2 or elf[5] != 1:
        raise bad("not ELFCLASS64/ELFDATA2LSB")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    if shentsize < 64 or shstrndx >= shnum or \
            shoff + shnum * shentsize > len(elf):
        raise bad("section headers out of range")

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize)
        if offset + size > len(elf):
            raise bad(f"section {i} out of range")
        return name, offset, size

    _, stroff, strsize = section(shstrndx)
    strtab = elf[stroff:stroff + strsize]
    for i in range(shnum):
        name, offset, size = section(i)
        end = strtab.find(b"\0", name)
        if strtab[name:end] != b".modinfo":
            continue
        info: dict[str, list[str]] = {}
        for item in elf[offset:offset + size].split(b"\0"):
            key, sep, value = item.decode("utf-8", "replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
        return info
    raise ModuleError("no .modinfo section")


def module_from_elf(path: str, elf: bytes) -> KernelModule:
    """Name and dependencies of the module file ``path`` holding ``elf``."""
    try:
        info = parse_modinfo(elf)
    except ModuleError as exc:
        raise ModuleError(f"{path}: {exc}") from None
    names = info.get("name")
    name = normalize_module_name(names[0]) if names else \
        module_name_from_path(path)
    depends = tuple(normalize_module_name(d)
                    for value in info.get("depends", [])
                    for d in value.split(",") if d)
    return KernelModule(name=name, path=path, depends=depends)


def module_load_order(wanted: Iterable[str],
                      depends: Mapping[str, Sequence[str]]) -> list[str]:
    """Modules to load, each after every module it depends on.

    ``depends`` maps every known module name to its ``depends=`` list.
    The order is a depth-first walk of ``wanted`` in the order given,
    dependencies in the order the module names them: the same input
    always gives the same order.
    """
    order: list[str] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            loop = " -> ".join(chain[chain.index(name):] + (name,))
            raise ModuleError(f"module dependencies loop: {loop}")
        if name not in depends:
            what = f" (needed by {chain[-1]})" if chain else ""
            raise ModuleError(f"no kernel module {name}{what}")
        for dep in depends[name]:
            visit(dep, chain + (name,))
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(normalize_module_name(name), ())
    return order


def _module_members(deb: pathlib.Path) -> Generator[tuple[str, bytes], None, None]:
    """(path, contents) of every ``.ko`` in ``deb``, one at a time."""
    members = _deb_members(deb)
    try:
        for member, tar in members:
            name = member.name.removeprefix("./")
            if member.isfile() and name.startswith("lib/modules/") and \
                    name.endswith(".ko"):
                src = tar.extractfile(member)
                if src is not None:
                    with src:
                        yield name, src.read()
    except tarfile.TarError as exc:
        raise PackageContentError(f"cannot unpack {deb.name}: {exc}") from exc
    finally:
        members.close()


def extract_modules(deb: pathlib.Path, wanted: Sequence[str]
                    ) -> list[tuple[KernelModule, bytes]]:
    """The modules ``wanted`` and their dependencies, in load order.

    Two streaming passes over the package, nothing written to disk: the
    first reads every module's ``depends=``, the second keeps the contents
    of the modules needed.
    """
    known: dict[str, KernelModule] = {}
    for path, elf in _module_members(deb):
        module = module_from_elf(path, elf)
        if module.name in known:
            raise ModuleError(f"{deb.name}: module {module.name} twice: "
                              f"{known[module.name].path}, {path}")
        known[module.name] = module
    if not known:
        raise PackageContentError(f"{deb.name} has no kernel modules")
    order = module_load_order(wanted, {n: m.depends for n, m in known.items()})
    paths = {known[name].path: name for name in order}
    data: dict[str, bytes] = {}
    for path, elf in _module_members(deb):
        if path in paths:
            data[paths[path]] = elf
            if len(data) == len(paths):
                break
    return [(known[name], data[name]) for name in order]


def compile_workload(source: pathlib.Path, output: pathlib.Path) -> None:
    argv = ["gcc", *CFLAGS, "-o", str(output), str(source)]
    logger.info("compiling %s", source.name)
    run_command(argv, what=f"cannot compile {source.name} "
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
                   output: pathlib.Path,
                   modules: Sequence[tuple[str, bytes]] = ()) -> None:
    """Write a gzip-compressed newc initramfs; byte-identical for equal input.

    ``modules`` are (module name, contents) in load order: each becomes
    ``/lib/modules/<name>.ko``, and ``/lib/modules/load-order`` lists the
    files in that order.
    """
    cpio = _Cpio()
    for d in ("bin", "dev", "etc", "lib", MODULE_DIR, "proc", "root", "run",
              "sbin", "sys", "tmp", "usr", "usr/bin", "usr/sbin"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3, 0o666)
    cpio.chardev("dev/ttyS0", 4, 64)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for program in sorted(programs):
        cpio.file(f"bin/{program.name}", program.read_bytes(), 0o755)
    order = []
    for name, elf in modules:
        filename = f"{name}.ko"
        if filename in order:
            raise ModuleError(f"module {name} packed twice")
        cpio.file(f"{MODULE_DIR}/{filename}", elf)
        order.append(filename)
    cpio.file(f"{MODULE_DIR}/{MODULE_ORDER_NAME}",
              "".join(f"{f}\n" for f in order).encode())
    cpio.file("init", init_script.read_bytes(), 0o755)
    output.write_bytes(gzip.compress(cpio.finish(), compresslevel=9, mtime=0))


def _content_hash(kernel: DebRef, busybox: DebRef,
                  sources: Sequence[pathlib.Path],
                  init_script: pathlib.Path) -> str:
    inputs = {
        "format": GUEST_FORMAT,
        "cflags": list(CFLAGS),
        "modules": list(KERNEL_MODULES),
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


def point_current(root: pathlib.Path, content_hash: str) -> None:
    """Make ``root/current`` point at the build ``content_hash``
    (atomically: a reader sees the old build or the new one)."""
    current = root / "current"
    if current.is_symlink() and os.readlink(current) == content_hash:
        return
    tmp = root / f".current.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(content_hash)
    os.replace(tmp, current)


def prune(root: pathlib.Path, keep: str) -> None:
    """Remove the builds under ``root`` made from older inputs, and
    unfinished ones (``.<hash>.*``)."""
    for entry in root.iterdir():
        if entry.is_dir() and not entry.is_symlink() and entry.name != keep \
                and re.fullmatch(r"\.?[0-9a-f]{16}(\..*)?", entry.name):
            logger.info("removing stale build %s", entry)
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
            point_current(guest_root, content_hash)
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
            logger.info("reading kernel modules")
            modules = extract_modules(kernel_deb, KERNEL_MODULES)
            logger.info("%d kernel modules: %s", len(modules),
                        " ".join(m.name for m, _ in modules))
            programs = []
            for source in sources:
                out = work / source.stem
                compile_workload(source, out)
                programs.append(out)
            logger.info("packing initramfs")
            pack_initramfs(busybox, init_script, programs, work / INITRD_NAME,
                           [(m.name, elf) for m, elf in modules])
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
                "modules": [{"name": m.name, "path": m.path,
                             "sha256": hashlib.sha256(elf).hexdigest()}
                            for m, elf in modules],
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
        point_current(guest_root, content_hash)
        prune(guest_root, keep=content_hash)
        logger.info("guest ready: %s", directory)
        return GuestImage(kernel=directory / KERNEL_NAME,
                          initrd=directory / INITRD_NAME,
                          kernel_version=kernel_version,
                          directory=directory, content_hash=content_hash)
