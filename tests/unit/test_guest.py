# SPDX-License-Identifier: GPL-2.0-or-later
"""The test guest's pure parts: module metadata, load order, the initramfs."""

from __future__ import annotations

import gzip
import pathlib
import shutil
import stat
import struct
import subprocess

import pytest

from curlingtool import guest


def make_elf(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 little-endian relocatable file holding ``sections``
    (plus the null section and .shstrtab), like a kernel module."""
    names = [""] + list(sections) + [".shstrtab"]
    shstrtab = b""
    offsets = {}
    for name in names:
        offsets[name] = len(shstrtab)
        shstrtab += name.encode() + b"\0"
    bodies = [b""] + list(sections.values()) + [shstrtab]

    data = bytearray(64)
    placed = []
    for body in bodies:
        placed.append((len(data), len(body)))
        data += body
    while len(data) % 8:
        data += b"\0"
    shoff = len(data)
    for name, (offset, size) in zip(names, placed):
        data += struct.pack("<IIQQQQIIQQ", offsets[name],
                            3 if name == ".shstrtab" else 1, 0, 0,
                            offset, size, 0, 0, 1, 0)
    header = bytearray(b"\x7fELF" + bytes([2, 1, 1]) + bytes(9))
    header += struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64,
                          0, 0, 64, len(names), len(names) - 1)
    data[:64] = header
    return bytes(data)


def modinfo(**fields: str) -> bytes:
    return b"".join(f"{k}={v}\0".encode() for k, v in fields.items())


def read_newc(archive: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, body) of every entry of a newc cpio archive."""
    entries = []
    pos = 0
    while True:
        assert archive[pos:pos + 6] == b"070701"
        fields = [int(archive[pos + 6 + 8 * i:pos + 14 + 8 * i], 16)
                  for i in range(13)]
        mode, filesize, namesize = fields[1], fields[6], fields[11]
        pos += 110
        name = archive[pos:pos + namesize - 1].decode()
        pos += namesize
        pos += (4 - pos % 4) % 4
        body = archive[pos:pos + filesize]
        pos += filesize
        pos += (4 - pos % 4) % 4
        if name == "TRAILER!!!":
            assert archive[pos:].strip(b"\0") == b""
            return entries
        entries.append((name, mode, body))


# -- .modinfo -------------------------------------------------------------

def test_parse_modinfo_reads_the_section() -> None:
    elf = make_elf({".text": b"\x90" * 16,
                    ".modinfo": modinfo(alias="pci:v1", depends="a,b-c",
                                        name="virtio_gpu") + b"alias=pci:v2\0",
                    ".data": b"x"})
    info = guest.parse_modinfo(elf)
    assert info["depends"] == ["a,b-c"]
    assert info["name"] == ["virtio_gpu"]
    assert info["alias"] == ["pci:v1", "pci:v2"]


def test_module_from_elf_normalises_names() -> None:
    elf = make_elf({".modinfo": modinfo(depends="t10-pi,scsi_mod",
                                        name="sd_mod")})
    module = guest.module_from_elf("lib/modules/x/kernel/sd_mod.ko", elf)
    assert module == guest.KernelModule("sd_mod",
                                        "lib/modules/x/kernel/sd_mod.ko",
                                        ("t10_pi", "scsi_mod"))


def test_module_from_elf_without_name_or_depends() -> None:
    elf = make_elf({".modinfo": modinfo(license="GPL")})
    module = guest.module_from_elf("lib/modules/x/virtio-rng.ko", elf)
    assert module.name == "virtio_rng"
    assert module.depends == ()


@pytest.mark.parametrize("elf, message", [
    (b"not an elf at all" * 8, "no ELF header"),
    (b"\x7fELF" + bytes([1, 1]) + bytes(58), "ELFCLASS64"),
    (make_elf({".text": b"\x90"}), "no .modinfo"),
], ids=["not-elf", "elf32", "no-modinfo"])
def test_parse_modinfo_rejects(elf: bytes, message: str) -> None:
    with pytest.raises(guest.ModuleError, match=message):
        guest.parse_modinfo(elf)


def test_parse_modinfo_rejects_truncated_file() -> None:
    elf = make_elf({".modinfo": modinfo(name="x")})
    with pytest.raises(guest.ModuleError, match="out of range"):
        guest.parse_modinfo(elf[:-100])


# -- load order -------------------------------------------------------------

DEPENDS = {
    "virtio": [], "virtio_ring": [], "virtio_pci_modern_dev": [],
    "virtio_pci": ["virtio_ring", "virtio_pci_modern_dev", "virtio"],
    "failover": [], "net_failover": ["failover"],
    "virtio_net": ["virtio_ring", "virtio", "net_failover"],
    "scsi_common": [], "scsi_mod": ["scsi_common"],
    "libata": ["scsi_mod", "scsi_common"], "libahci": ["libata"],
    "ahci": ["libahci", "libata"],
}


def test_load_order_puts_dependencies_first() -> None:
    order = guest.module_load_order(["virtio_net", "ahci", "virtio_pci"],
                                    DEPENDS)
    assert order == ["virtio_ring", "virtio", "failover", "net_failover",
                     "virtio_net", "scsi_common", "scsi_mod", "libata",
                     "libahci", "ahci", "virtio_pci_modern_dev", "virtio_pci"]
    for i, name in enumerate(order):
        assert all(order.index(dep) < i for dep in DEPENDS[name])


def test_load_order_is_stable_and_without_duplicates() -> None:
    wanted = ["ahci", "libata", "ahci", "scsi-mod"]
    order = guest.module_load_order(wanted, DEPENDS)
    assert order == guest.module_load_order(wanted, DEPENDS)
    assert order == ["scsi_common", "scsi_mod", "libata", "libahci", "ahci"]


def test_load_order_missing_module() -> None:
    with pytest.raises(guest.ModuleError,
                       match=r"no kernel module failover \(needed by "
                             r"net_failover\)"):
        guest.module_load_order(["virtio_net"],
                                {k: v for k, v in DEPENDS.items()
                                 if k != "failover"})
    with pytest.raises(guest.ModuleError, match="no kernel module nosuch$"):
        guest.module_load_order(["nosuch"], DEPENDS)


def test_load_order_loop() -> None:
    depends = {"a": ["b"], "b": ["c"], "c": ["a"]}
    with pytest.raises(guest.ModuleError,
                       match="loop: a -> b -> c -> a"):
        guest.module_load_order(["a"], depends)


# -- modules from a package ---------------------------------------------------

def make_kernel_deb(tmp_path: pathlib.Path,
                    modules: dict[str, dict[str, str]]) -> pathlib.Path:
    """A .deb holding lib/modules/<ver>/kernel/<path>.ko for each module."""
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: linux-image-test\nVersion: 1\nArchitecture: all\n"
        "Maintainer: Curling <curling@example.org>\nDescription: test\n")
    (root / "boot").mkdir()
    (root / "boot" / "vmlinuz-9.9").write_bytes(b"KERNEL")
    for path, fields in modules.items():
        ko = root / "lib/modules/9.9/kernel" / f"{path}.ko"
        ko.parent.mkdir(parents=True, exist_ok=True)
        ko.write_bytes(make_elf({".modinfo": modinfo(**fields)}))
    deb = tmp_path / "linux-image-test.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build",
                    str(root), str(deb)], check=True, capture_output=True)
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="no dpkg-deb")
def test_extract_modules_from_a_package(tmp_path: pathlib.Path) -> None:
    deb = make_kernel_deb(tmp_path, {
        "drivers/net/virtio_net": {"depends": "net_failover,virtio",
                                   "name": "virtio_net"},
        "drivers/net/net_failover": {"depends": "failover",
                                     "name": "net_failover"},
        "net/core/failover": {"depends": "", "name": "failover"},
        "drivers/virtio/virtio": {"depends": "", "name": "virtio"},
        "drivers/char/hw_random/virtio-rng": {"depends": "virtio",
                                              "name": "virtio_rng"},
        "drivers/unused": {"depends": "", "name": "unused"},
    })
    modules = guest.extract_modules(deb, ["virtio_net", "virtio-rng"])
    assert [m.name for m, _ in modules] == [
        "failover", "net_failover", "virtio", "virtio_net", "virtio_rng"]
    for module, elf in modules:
        assert module.path.startswith("lib/modules/9.9/kernel/")
        assert guest.parse_modinfo(elf)["name"] == [module.name]
    with pytest.raises(guest.ModuleError, match="no kernel module e1000e"):
        guest.extract_modules(deb, ["e1000e"])


# -- initramfs --------------------------------------------------------------

def pack(tmp_path: pathlib.Path, modules: list[tuple[str, bytes]],
         name: str = "initrd.img") -> bytes:
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"BUSYBOX")
    init = tmp_path / "init.sh"
    init.write_bytes(b"#!/bin/busybox sh\n")
    program = tmp_path / "curling-counter"
    program.write_bytes(b"PROGRAM")
    out = tmp_path / name
    guest.pack_initramfs(busybox, init, [program], out, modules)
    return out.read_bytes()


def test_initramfs_holds_modules_in_load_order(tmp_path: pathlib.Path) -> None:
    modules = [("virtio", b"ELF-virtio"), ("virtio_ring", b"ELF-ring"),
               ("virtio_pci", b"ELF-pci")]
    entries = read_newc(gzip.decompress(pack(tmp_path, modules)))
    files = {name: (mode, body) for name, mode, body in entries}

    assert stat.S_ISDIR(files["lib/modules"][0])
    for name, body in modules:
        mode, data = files[f"lib/modules/{name}.ko"]
        assert stat.S_ISREG(mode) and data == body
    assert files["lib/modules/load-order"][1] == \
        b"virtio.ko\nvirtio_ring.ko\nvirtio_pci.ko\n"
    names = [name for name, _, _ in entries]
    assert names.index("lib") < names.index("lib/modules") < \
        names.index("lib/modules/virtio.ko")
    assert files["init"] == (stat.S_IFREG | 0o755, b"#!/bin/busybox sh\n")
    assert files["bin/curling-counter"][1] == b"PROGRAM"
    assert files["bin/busybox"][1] == b"BUSYBOX"
    assert stat.S_ISCHR(files["dev/console"][0])


def test_initramfs_without_modules_has_an_empty_order(
        tmp_path: pathlib.Path) -> None:
    entries = read_newc(gzip.decompress(pack(tmp_path, [])))
    files = {name: body for name, _, body in entries}
    assert files["lib/modules/load-order"] == b""
    assert not [n for n in files if n.endswith(".ko")]


def test_initramfs_is_byte_identical_for_equal_input(
        tmp_path: pathlib.Path) -> None:
    modules = [("a", b"A" * 1000), ("b", b"B" * 3)]
    first = pack(tmp_path, modules, "one.img")
    second = pack(tmp_path, modules, "two.img")
    assert first == second
    assert first != pack(tmp_path, modules[::-1], "three.img")


def test_initramfs_refuses_a_module_twice(tmp_path: pathlib.Path) -> None:
    with pytest.raises(guest.ModuleError, match="packed twice"):
        pack(tmp_path, [("a", b"1"), ("a", b"2")])


def test_content_hash_covers_the_module_list(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "w.c"
    source.write_text("int main(void) { return 0; }\n")
    init = tmp_path / "init.sh"
    init.write_text("#!/bin/sh\n")
    ref = guest.DebRef("k", "u", "f", 1, "0" * 64)
    before = guest._content_hash(ref, ref, [source], init)
    monkeypatch.setattr(guest, "KERNEL_MODULES",
                        guest.KERNEL_MODULES + ("extra",))
    assert guest._content_hash(ref, ref, [source], init) != before
