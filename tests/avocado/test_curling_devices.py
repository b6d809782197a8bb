# SPDX-License-Identifier: GPL-2.0-or-later
"""Curling with real devices: the device matrix.

Each test protects a guest with a set of real devices for
``$CURLING_MATRIX_SECONDS`` (default 120) while its workload keeps them
busy (``curling.devices=1``: O_DIRECT reads of every disk, /dev/hwrng,
ARP requests out of every NIC, the VGA or virtio-gpu console; the test
adds USB input events and moves the balloon), with a thread per vCPU that
dirties and checks its own memory.  Meanwhile it samples the receiver's
RSS every couple of seconds.  Then it kills the sender with SIGKILL and
checks that the guest carries on at the receiver: ticks from the last
committed checkpoint with a clean self-check, every device class still
making progress with no device error, the balloon and the screen still
answering.  Finally the receiver's memory must be flat over the
protected time: no per-checkpoint leak.  The least-squares slopes of the
RSS of both sides, split into guest RAM and QEMU's own memory, are
logged and written to ``<logdir>/rss.json``.

Together the tests cover q35 with its default devices and pc;
virtio-net-pci and e1000e; virtio-blk, an AHCI disk and a virtio-scsi disk;
qemu-xhci with usb-tablet and usb-kbd; std VGA and virtio-gpu;
virtio-balloon; virtio-rng; the serial console; 1, 2 and 4 vCPUs; 512 MiB
and 2 GiB of RAM.  Disks are small raw images, one per side, holding the
same pattern, which the guest checks as it reads them (it never writes:
disk writes are not replicated).  NICs use user networking restricted to
the guest (``restrict=on``): the guest's ARP requests go to its virtual
gateway and no packet leaves QEMU.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import struct
import time
from typing import Any, Callable, Optional

from qemu.qmp import ExecuteError

from curling_test import (BOOT_TIMEOUT, VM, CurlingTest, DeviceReport,
                          curling_info, wait_until)
from curlingtool.bench import least_squares_slope, rss_split

#: Seconds each configuration is protected before the kill;
#: ``$CURLING_MATRIX_SECONDS`` shortens it while developing.
DEFAULT_SECONDS = 120.0
#: Seconds between two RSS samples.
RSS_INTERVAL = 2.0
#: Seconds of protection left out of the slopes: the first checkpoints
#: settle the receiver's buffers, and the balloon is moved then.
RSS_WARMUP = 30.0
#: Largest slope of the receiver's own memory (its RSS less guest RAM)
#: accepted after the warm-up, in MB (10^6 bytes) per minute.
#:
#: Guest RAM is left out because it is the guest's, not a leak: a guest
#: that touches pages it never touched before (a 2 GiB guest whose kernel
#: hands out fresh free pages for a long time) grows the RAM mapping of
#: both sides alike, by whole 2 MiB huge pages, for minutes.  Everything
#: else the receiver holds (device state, checkpoint buffers, the heap)
#: stays the same size from one checkpoint to the next in a healthy
#: receiver: flat at MB resolution (measured: below 0.2 MB/min).  At the
#: default 100 ms interval 2 MB/min is about 3.3 KB per checkpoint (8 KB
#: at the 4 checkpoints/s of a 4-vCPU guest under TCG): a leaked device
#: state copy, checkpoint buffer or per-checkpoint allocation of a few
#: kilobytes goes past it, while the allocator's noise (a few hundred kB
#: taken and returned) stays below it over a minute.
#:
#: A per-checkpoint leak grows the receiver all the time, so it is judged
#: on both halves of the window after the warm-up: memory that grows in
#: both by more than the limit leaks.  A one-off step in one half is a
#: high-water mark, not a leak: the receiver's frame buffer grows once to
#: the largest checkpoint so far (measured: +4.3 MB at once, 80 s into a
#: q35 run, when a checkpoint of ~4 MB came after a stall of the TCG
#: sender, then flat again), and that would tip a slope over the whole
#: window.  Every slope is logged and kept in rss.json all the same.
RSS_SLOPE_LIMIT = 2.0
#: Seconds for the guest's devices to show up and start moving.
DEVICES_DEADLINE = 120.0
#: Seconds of device reports the failed-over guest must show progress over.
DEVICE_PROGRESS_SECONDS = 5.0
#: Size of each disk image, in bytes.
DISK_SIZE = 16 << 20
#: Balloon: what the guest gives back while protected, in bytes.
BALLOON_STEP = 64 << 20
#: Seconds for the guest to reach a balloon target.
BALLOON_DEADLINE = 60.0
#: Seconds between two bursts of input events to the USB devices.
INPUT_INTERVAL = 1.0
#: Attempts of one input event while the guest is stopped for checkpoints.
INPUT_RETRIES = 50

APPEND = "curling.mode=dirty curling.rate=2 curling.mb=16 curling.devices=1"

NET_USER = "user,restrict=on"


def matrix_seconds() -> float:
    value = os.environ.get("CURLING_MATRIX_SECONDS")
    if not value:
        return DEFAULT_SECONDS
    seconds = float(value)
    shortest = RSS_WARMUP + 12 * RSS_INTERVAL
    if seconds < shortest:
        raise ValueError(f"CURLING_MATRIX_SECONDS={value}: must be at least "
                         f"{shortest:g} s, for RSS slopes over two halves "
                         "after the warm-up")
    return seconds


def write_disk_image(path: pathlib.Path, size: int = DISK_SIZE) -> None:
    """A raw image the guest recognises: every 4 KiB block starts with
    ``CURLDISK`` and its block number (64-bit little-endian)."""
    block = 4096
    pad = bytes(block - 16)
    with path.open("wb") as f:
        for n in range(size // block):
            f.write(b"CURLDISK" + struct.pack("<Q", n) + pad)


def mem_bytes(mem: str) -> int:
    units = {"M": 1 << 20, "G": 1 << 30}
    return int(mem[:-1]) * units[mem[-1]]


def ppm_has_content(ppm: bytes) -> bool:
    """A binary PPM (screendump's format) whose pixels are not all the
    same: the console's text is on the screen."""
    fields = ppm.split(maxsplit=4)
    if len(fields) < 5 or fields[0] != b"P6":
        return False
    pixels = fields[4]
    return len(pixels) >= 6 and pixels.count(pixels[:3]) * 3 != len(pixels)


@dataclasses.dataclass(frozen=True)
class Disk:
    """A disk of the guest: the QEMU device and how it is attached."""

    name: str           # drive id, also the image's file name
    device: str         # -device argument, {drive} replaced by the drive id
    readonly: bool = True


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration of the device matrix."""

    name: str
    machine: str
    smp: int
    mem: str
    defaults: bool                  # keep the machine's default devices
    devices: tuple[str, ...]        # -device arguments (no disks)
    disks: tuple[Disk, ...] = ()
    netdevs: tuple[str, ...] = ()   # -netdev arguments
    objects: tuple[str, ...] = ()   # -object arguments
    #: device classes of the guest's report that must keep moving
    classes: tuple[str, ...] = ("disk", "net", "netrx", "tty")
    #: report keys (disks, NICs) that must be there and keep moving
    instances: tuple[str, ...] = ()
    usb_input: bool = False         # send input events to usb-tablet/-kbd
    balloon: bool = False
    #: a blank medium in the default CD-ROM drive: SeaBIOS 1.16 under TCG
    #: waits 32 s for an empty AHCI CD-ROM at every boot (an AHCI hard
    #: disk costs the same 32 s, unpatched QEMU 10.2.2 alike)
    cdrom: bool = False

    def extra_args(self) -> list[str]:
        args: list[str] = []
        for netdev in self.netdevs:
            args += ["-netdev", netdev]
        for obj in self.objects:
            args += ["-object", obj]
        for device in self.devices:
            args += ["-device", device]
        return args

    def disk_args(self, directory: pathlib.Path, side: str) -> list[str]:
        """Each side's own copy of every disk image."""
        args: list[str] = []
        for disk in self.disks:
            image = directory / f"{side}-{disk.name}.img"
            readonly = ",readonly=on" if disk.readonly else ""
            args += ["-drive", f"if=none,id={disk.name},file={image},"
                               f"format=raw{readonly}",
                     "-device", disk.device.format(drive=disk.name)]
        if self.cdrom:
            blank = directory / "blank.iso"
            if not blank.exists():
                blank.write_bytes(bytes(1 << 20))
            args += ["-drive", f"if=ide,index=2,media=cdrom,file={blank},"
                               "format=raw"]
        return args


# q35 with its default devices (std VGA, AHCI with a CD-ROM, ...): the
# virtio family, USB input, balloon and rng, 2 vCPUs, 512 MiB.  (A
# -netdev on the command line replaces the default NIC.)
Q35_DEFAULTS = Config(
    name="q35-defaults-2cpu-512m",
    machine="q35", smp=2, mem="512M", defaults=True,
    netdevs=(f"{NET_USER},id=net0",),
    objects=("rng-random,id=rng0,filename=/dev/urandom",),
    devices=("virtio-net-pci,netdev=net0,mac=52:54:00:c1:00:01",
             "qemu-xhci,id=xhci",
             "usb-tablet,bus=xhci.0",
             "usb-kbd,bus=xhci.0",
             "virtio-balloon-pci,id=balloon0",
             "virtio-rng-pci,rng=rng0"),
    disks=(Disk("vblk0", "virtio-blk-pci,drive={drive}"),),
    classes=("disk", "net", "netrx", "tty", "rng", "input"),
    instances=("vda", "eth0"),
    usb_input=True, balloon=True, cdrom=True)

# pc without default devices, 4 vCPUs, 2 GiB: e1000e, an AHCI disk, a
# virtio-scsi disk and virtio-gpu (fbcon on it).  ide-hd refuses a
# read-only drive: the AHCI disk is writable, and only read.
PC_4CPU = Config(
    name="pc-4cpu-2g",
    machine="pc", smp=4, mem="2G", defaults=False,
    netdevs=(f"{NET_USER},id=net0",),
    devices=("e1000e,netdev=net0,mac=52:54:00:c1:00:02",
             "ahci,id=ahci0",
             "virtio-scsi-pci,id=scsi0",
             "virtio-gpu-pci"),
    disks=(Disk("sata0", "ide-hd,drive={drive},bus=ahci0.0",
                readonly=False),
           Disk("scsi0d", "scsi-hd,drive={drive},bus=scsi0.0")),
    classes=("disk", "net", "netrx", "tty"),
    instances=("sda", "sdb", "eth0"))

# pc with its default devices (std VGA, IDE CD-ROM, floppy, parallel
# port), 1 vCPU, 512 MiB, with virtio-net, virtio-blk and virtio-rng.
PC_DEFAULTS_1CPU = Config(
    name="pc-defaults-1cpu-512m",
    machine="pc", smp=1, mem="512M", defaults=True,
    netdevs=(f"{NET_USER},id=net0",),
    objects=("rng-random,id=rng0,filename=/dev/urandom",),
    devices=("virtio-net-pci,netdev=net0,mac=52:54:00:c1:00:03",
             "virtio-rng-pci,rng=rng0"),
    disks=(Disk("vblk0", "virtio-blk-pci,drive={drive}"),),
    classes=("disk", "net", "netrx", "tty", "rng"),
    instances=("vda", "eth0"))


class CurlingDevices(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,devices
    """

    def test_q35_defaults_virtio_usb_2cpu(self) -> None:
        """q35 with default devices, virtio-net, virtio-blk, qemu-xhci with
        usb-tablet and usb-kbd, std VGA, virtio-balloon, virtio-rng;
        2 vCPUs, 512 MiB."""
        self.run_matrix(Q35_DEFAULTS)

    def test_pc_e1000e_ahci_scsi_gpu_4cpu(self) -> None:
        """pc, e1000e, AHCI and virtio-scsi disks, virtio-gpu; 4 vCPUs,
        2 GiB."""
        self.run_matrix(PC_4CPU)

    def test_pc_defaults_1cpu(self) -> None:
        """pc with default devices, virtio-net, virtio-blk, virtio-rng;
        1 vCPU, 512 MiB."""
        self.run_matrix(PC_DEFAULTS_1CPU)

    # -- one configuration ---------------------------------------------

    def run_matrix(self, cfg: Config) -> None:
        seconds = matrix_seconds()
        t_start = time.monotonic()
        assert self._tmpdir is not None
        for disk in cfg.disks:
            for side in ("sender", "receiver"):
                write_disk_image(self._tmpdir / f"{side}-{disk.name}.img")
        tmpdir = self._tmpdir
        self.log.info("%s: %d vCPUs, %s, %s, protected for %g s", cfg.name,
                      cfg.smp, cfg.mem, cfg.machine, seconds)

        sender, receiver, uri = self.launch_pair(
            machine=cfg.machine, append=APPEND, mem=cfg.mem, smp=cfg.smp,
            defaults=cfg.defaults, extra_args=cfg.extra_args(),
            side_args=lambda side: cfg.disk_args(tmpdir, side))
        sender.wait_tick(1, timeout=BOOT_TIMEOUT)
        boot_s = time.monotonic() - t_start
        self.log.info("%s: first tick after %.1f s", cfg.name, boot_s)
        self.assert_no_guest_errors(sender)
        self.wait_devices_moving(sender, cfg)

        self.protect(sender, receiver, uri)
        t_protect = time.monotonic()
        if cfg.balloon:
            target = mem_bytes(cfg.mem) - BALLOON_STEP
            sender.qmp("balloon", value=target)
            self.wait_balloon(sender, target)

        ram = mem_bytes(cfg.mem)
        samples: dict[str, list[tuple[float, int, int]]] = {
            "receiver": [], "sender": []}
        largest = 0
        next_sample = next_input = 0.0
        while (now := time.monotonic() - t_protect) < seconds:
            if now >= next_sample:
                largest = max(largest,
                              self.assert_protecting(sender, receiver))
                for vm in (receiver, sender):
                    smaps = pathlib.Path(f"/proc/{vm.pid}/smaps").read_text()
                    samples[vm.name].append((now, *rss_split(smaps, ram)))
                next_sample += RSS_INTERVAL
            if cfg.usb_input and now >= next_input:
                self.send_input(sender)
                next_input = now + INPUT_INTERVAL
            time.sleep(0.1)
        checkpoints = curling_info(sender)["checkpoints"]
        slopes = {name: self.rss_slopes(s) for name, s in samples.items()}
        for name, s in samples.items():
            self.log.info(
                "%s: %s RSS %.1f -> %.1f MB (guest RAM %.1f -> %.1f MB); "
                "slope after %g s: %.3f MB/min in all, guest RAM %.3f, "
                "QEMU's own %.3f (halves %.3f, %.3f)", cfg.name, name,
                s[0][1] / 1e6, s[-1][1] / 1e6, s[0][2] / 1e6, s[-1][2] / 1e6,
                RSS_WARMUP, slopes[name]["total"], slopes[name]["guest_ram"],
                slopes[name]["own"], slopes[name]["own_first_half"],
                slopes[name]["own_second_half"])
        self.log.info("%s: %d checkpoints in %g s, the largest seen %d "
                      "bytes", cfg.name, checkpoints, seconds, largest)
        own = [(t, total - guest) for t, total, guest in samples["receiver"]]
        qemu = self.qemu_bin.stat()
        result = {
            "config": dataclasses.asdict(cfg),
            "qemu": {"path": str(self.qemu_bin), "size": qemu.st_size,
                     "mtime": time.strftime("%Y-%m-%dT%H:%M:%S",
                                            time.localtime(qemu.st_mtime))},
            "accel": self.accel,
            "seconds": seconds,
            "boot_s": round(boot_s, 1),
            "checkpoints": checkpoints,
            "largest_checkpoint_bytes": largest,
            "rss_warmup_s": RSS_WARMUP,
            "rss_slope_limit_mb_per_min": RSS_SLOPE_LIMIT,
            "rss_slopes_mb_per_min": slopes,
            # (seconds since protection began, RSS, of which guest RAM)
            "rss": {name: [(round(t, 1), total, guest)
                           for t, total, guest in s]
                    for name, s in samples.items()},
        }
        rss_json = self.logdir_path / "rss.json"
        rss_json.write_text(json.dumps(result, indent=1) + "\n")

        mark = receiver.console_mark()
        before = sender.device_reports()
        rnd = self.kill_round(sender, receiver, 0.5, cfg.name)
        result["failover_s"] = round(rnd.failover_s, 3)
        rss_json.write_text(json.dumps(result, indent=1) + "\n")
        self.check_devices_after_failover(receiver, cfg, mark, before)
        if cfg.balloon:
            target = mem_bytes(cfg.mem)
            receiver.qmp("balloon", value=target)
            self.wait_balloon(receiver, target)
        screen = self.logdir_path / "receiver-screen.ppm"
        receiver.qmp("screendump", filename=str(screen))
        self.assertTrue(ppm_has_content(screen.read_bytes()),
                        f"{receiver.name}'s screen is blank: {screen}")
        self.assert_no_guest_errors(receiver)
        self.assert_ticks_ok(receiver)
        result["wall_s"] = round(time.monotonic() - t_start, 1)
        rss_json.write_text(json.dumps(result, indent=1) + "\n")
        self.log.info("%s: passed the failover checks; %.0f s in all",
                      cfg.name, result["wall_s"])

        mine = slopes["receiver"]
        self.assertLess(
            min(mine["own_first_half"], mine["own_second_half"]),
            RSS_SLOPE_LIMIT,
            f"{receiver.name}'s own memory (RSS less guest RAM) grows all "
            f"the time while protected: {mine['own_first_half']:.2f} and "
            f"{mine['own_second_half']:.2f} MB/min in the two halves after "
            f"the warm-up ({mine['own']:.2f} in all; "
            f"{own[0][1] / 1e6:.1f} -> {own[-1][1] / 1e6:.1f} MB over "
            f"{seconds:g} s, {checkpoints} checkpoints): a per-checkpoint "
            f"leak")

    # -- helpers ---------------------------------------------------------

    def rss_slopes(self, samples: list[tuple[float, int, int]]
                   ) -> dict[str, float]:
        """MB per minute of (time, RSS, guest RAM) samples past the
        warm-up: in all, of guest RAM and of QEMU's own memory, and of
        QEMU's own memory in each half of the window."""
        kept = [s for s in samples if s[0] >= RSS_WARMUP]
        self.assertGreaterEqual(len(kept), 6, "too few RSS samples")
        half = len(kept) // 2

        def slope(value: Callable[[int, int], int],
                  part: list[tuple[float, int, int]] = kept) -> float:
            return round(least_squares_slope(
                [(t / 60, value(total, guest) / 1e6)
                 for t, total, guest in part]), 3)

        def own(total: int, guest: int) -> int:
            return total - guest

        return {"total": slope(lambda total, guest: total),
                "guest_ram": slope(lambda total, guest: guest),
                "own": slope(own),
                "own_first_half": slope(own, kept[:half]),
                "own_second_half": slope(own, kept[half:])}

    def assert_protecting(self, sender: VM, receiver: VM) -> int:
        """Both sides still protect, else fail with what QEMU said;
        returns the size of the sender's last checkpoint."""
        for vm in (receiver, sender):
            if not vm.is_running():
                self.fail(f"{vm.name} died while protecting: "
                          f"{vm.qemu_output_tail(20)}")
        last = 0
        for vm in (sender, receiver):
            info = curling_info(vm)
            if info["status"] != "protecting":
                self.fail(f"{vm.name} stopped protecting ({info['status']}); "
                          f"sender: {sender.qemu_output_tail(10)!r}; "
                          f"receiver: {receiver.qemu_output_tail(10)!r}")
            if vm is sender:
                last = info.get("last-bytes", 0)
        return last

    def assert_no_guest_errors(self, vm: VM) -> None:
        """No module failed to load, no device reported an error."""
        bad = [line for line in vm.console().splitlines()
               if "curling: module " in line or "curling: device error" in line]
        self.assertEqual(bad, [], f"{vm.name}'s guest reported errors")
        reports = vm.device_reports()
        if reports:
            self.assertEqual(reports[-1].total("err"), 0,
                             f"{vm.name}: {reports[-1].line}")

    def moving(self, cfg: Config, first: DeviceReport,
               last: DeviceReport) -> list[str]:
        """What did not move from report ``first`` to ``last``."""
        stuck = []
        for key in cfg.classes + cfg.instances:
            a, b = first.counters.get(key), last.counters.get(key)
            if a is None or b is None or len(a) != len(b) or \
                    not all(y > x for x, y in zip(a, b)):
                stuck.append(f"{key} {a} -> {b}")
        return stuck

    def wait_devices_moving(self, vm: VM, cfg: Config) -> None:
        """Wait until every device of ``cfg`` is there and moving."""
        deadline = time.monotonic() + DEVICES_DEADLINE
        while True:
            if cfg.usb_input:
                self.send_input(vm)
            reports = vm.device_reports()
            stuck = ["no report yet"]
            if len(reports) >= 3:
                stuck = self.moving(cfg, reports[-3], reports[-1])
                if not stuck:
                    self.log.info("%s: devices moving: %s", vm.name,
                                  reports[-1].line)
                    return
            if time.monotonic() >= deadline:
                self.fail(f"{vm.name}'s devices do not all move after "
                          f"{DEVICES_DEADLINE:g} s: {', '.join(stuck)}; "
                          f"last report: "
                          f"{reports[-1].line if reports else None}")
            vm.wait_tick(1)     # checks that QEMU is alive
            time.sleep(1.0)

    def check_devices_after_failover(self, receiver: VM, cfg: Config,
                                     mark: int,
                                     before: list[DeviceReport]) -> None:
        """The failed-over guest's devices all keep making progress."""
        start = time.monotonic()
        deadline = start + DEVICE_PROGRESS_SECONDS + 60
        reports: list[DeviceReport] = []
        while True:
            if cfg.usb_input:
                self.send_input(receiver)
            reports = receiver.device_reports(since=mark)
            if len(reports) >= DEVICE_PROGRESS_SECONDS + 1 and \
                    not self.moving(cfg, reports[0], reports[-1]):
                break
            if time.monotonic() >= deadline:
                break
            receiver.wait_tick(1)
            time.sleep(1.0)
        self.assertTrue(reports, f"{receiver.name}'s guest printed no device "
                                 "report after the failover")
        self.log.info("%s: devices on %s: sender's last %s; after failover "
                      "%s ... %s", cfg.name, receiver.name,
                      before[-1].line if before else None, reports[0].line,
                      reports[-1].line)
        stuck = self.moving(cfg, reports[0], reports[-1])
        self.assertEqual(stuck, [], f"devices stopped on {receiver.name} "
                                    f"after the failover "
                                    f"({len(reports)} reports)")
        self.assertEqual(reports[-1].total("err"), 0,
                         f"device errors on {receiver.name}: "
                         f"{reports[-1].line}")

    def send_input(self, vm: VM) -> None:
        """A tablet move and a Shift key press and release."""
        x = int(time.monotonic() * 1000) % 32768
        self.input_event(vm, [
            {"type": "abs", "data": {"axis": "x", "value": x}},
            {"type": "abs", "data": {"axis": "y", "value": 32767 - x}}])
        for down in (True, False):
            self.input_event(vm, [
                {"type": "key", "data": {"down": down, "key": {
                    "type": "qcode", "data": "shift"}}}])

    def input_event(self, vm: VM, events: list[dict[str, Any]]) -> None:
        """input-send-event, again when it meets the sender's guest
        stopped for a checkpoint (QEMU refuses input while the VM is not
        running, as during a migration's downtime)."""
        for attempt in range(INPUT_RETRIES):
            try:
                vm.qmp("input-send-event", events=events)
                return
            except ExecuteError as exc:
                if "not running" not in str(exc) or \
                        attempt == INPUT_RETRIES - 1:
                    raise
                time.sleep(0.02)

    def wait_balloon(self, vm: VM, target: int,
                     timeout: float = BALLOON_DEADLINE) -> None:
        """Wait until the guest's balloon driver has reached ``target``."""
        def reached() -> Optional[dict]:
            info = vm.qmp("query-balloon")
            return info if abs(info["actual"] - target) < (1 << 20) else None

        start = time.monotonic()
        wait_until(reached, timeout, f"{vm.name}'s balloon at "
                                     f"{target >> 20} MiB", 0.5)
        self.log.info("%s: balloon at %d MiB after %.1f s", vm.name,
                      target >> 20, time.monotonic() - start)
