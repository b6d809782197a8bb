# SPDX-License-Identifier: GPL-2.0-or-later
"""Reading the test guest's console and QEMU's command line."""

from __future__ import annotations

import logging
import pathlib
import subprocess
import sys

import pytest

from curlingtool import guest, vm

CONSOLE = """\
curling: start mode=dirty mb=16 rate=2 period=100 threads=2 devices=1
curling: tick=1 work=4096 pages=3 check=ok
curling: devices disk=3 rng=5 net=2 netrx=1 tty=1 input=0 err=0 vda=3 eth0=2/1
curling: tick=2 work=8192 pages=6 check=FAIL thread=1 page=7 want=2 word=3
curling: device error sda: block 12 holds the wrong data
curling: devices disk=9 rng=8 net=4 netrx=4 tty=2 input=7 err=1 vda=5 sda=4 eth0=4/4
curling: devices disk=1 rng
"""


def test_ticks_and_device_reports_from_one_console() -> None:
    ticks = vm.parse_ticks(CONSOLE)
    assert [(t.n, t.ok) for t in ticks] == [(1, True), (2, False)]
    assert ticks[1].detail == "thread=1 page=7 want=2 word=3"

    reports = vm.parse_device_reports(CONSOLE)
    assert len(reports) == 2
    first, second = reports
    assert first.counters == {"disk": (3,), "rng": (5,), "net": (2,),
                              "netrx": (1,), "tty": (1,), "input": (0,),
                              "err": (0,), "vda": (3,), "eth0": (2, 1)}
    assert second.counters["sda"] == (4,)
    assert second.total("err") == 1
    assert second.total("eth0") == 8
    assert second.total("nosuch") == 0


def guest_image(tmp_path: pathlib.Path) -> guest.GuestImage:
    return guest.GuestImage(kernel=tmp_path / "vmlinuz",
                            initrd=tmp_path / "initrd.img",
                            kernel_version="6.1", directory=tmp_path,
                            content_hash="0" * 16)


def test_guest_args_defaults(tmp_path: pathlib.Path) -> None:
    args = vm.guest_args("qemu", guest_image(tmp_path), "sender",
                         accel="tcg", console=tmp_path / "c",
                         qmp_path=tmp_path / "q")
    assert args[args.index("-smp") + 1] == "1"
    assert "-nodefaults" in args
    assert args[args.index("-nic") + 1] == "none"
    assert "-incoming" not in args


def test_guest_args_smp_and_default_devices(tmp_path: pathlib.Path) -> None:
    args = vm.guest_args("qemu", guest_image(tmp_path), "receiver",
                         accel="tcg", console=tmp_path / "c",
                         qmp_path=tmp_path / "q", smp=4, mem="2G",
                         defaults=True, incoming="curling:tcp:127.0.0.1:1",
                         extra_args=["-device", "virtio-gpu-pci"])
    assert args[args.index("-smp") + 1] == "4"
    assert args[args.index("-m") + 1] == "2G"
    assert "-nodefaults" not in args and "-nic" not in args
    assert args[-4:] == ["-device", "virtio-gpu-pci", "-incoming",
                         "curling:tcp:127.0.0.1:1"]
    with pytest.raises(ValueError):
        vm.guest_args("qemu", guest_image(tmp_path), "x", accel="tcg",
                      console=tmp_path / "c", qmp_path=tmp_path / "q", smp=0)


def test_diskchecks() -> None:
    text = ("curling: tick=3 work=1 pages=2 check=ok\n"
            "curling: diskcheck dev=vda writes=120 checks=9 check=ok\n"
            "curling: diskcheck dev=vda writes=121 checks=10 check=FAIL "
            "block=7 want=3 have=2\n")
    checks = vm.parse_diskchecks(text)
    assert [(c.dev, c.writes, c.checks, c.ok) for c in checks] == [
        ("vda", 120, 9, True), ("vda", 121, 10, False)]
    assert checks[1].line.endswith("have=2")
    assert len(vm.parse_ticks(text)) == 1


def test_clock_page_and_xp() -> None:
    text = ("curling: tick=3 work=1 pages=2 check=ok\n"
            "curling: clock phys=0x3a2f000\n"
            "curling: tick=4 work=1 pages=2 check=ok\n"
            "curling: clock phys=0x1000\n")
    assert vm.parse_clock_page(text) == 0x1000
    assert vm.parse_clock_page("curling: tick=1 work=0 pages=0\n") is None
    assert vm.parse_xp_u64("0000000003a2f000: 0x000000123456789a\r\n") == \
        0x123456789a
    with pytest.raises(ValueError):
        vm.parse_xp_u64("Cannot access memory\r\n")


def test_freshest_clock_reading() -> None:
    # The guest's clock runs 10 s ahead of the host's; the second reading
    # found a page 5 ms stale, the third one read 1 ms late
    readings = [(10_000_000_000, 0.0), (10_005_000_000, 0.010),
                (10_019_000_000, 0.020)]
    assert vm.freshest_clock_reading(readings) == readings[0]
    assert vm.freshest_clock_reading(readings[1:]) == readings[2]


def test_is_running_records_the_exit_code(tmp_path: pathlib.Path) -> None:
    """A QEMU found ended by is_running() says how it ended."""
    v = vm.VM("q", [], tmp_path / "console.log", tmp_path / "qemu.log",
              tmp_path / "qmp.sock", logging.getLogger("q"))
    assert not v.is_running()                  # never launched
    v._proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    v._proc.wait()
    assert not v.is_running()
    assert v.exitcode == 3
