# SPDX-License-Identifier: GPL-2.0-or-later
"""Curling control: cancel, a lost receiver, the checkpoint interval and
heartbeats, and that the receiver really mirrors the sender (RAM, screen).
"""

from __future__ import annotations

import os
import pathlib
import re
import resource
import select
import signal
import statistics
import threading
import time
from typing import Any, Optional

from qemu.qmp import ExecuteError

from curling_test import (VM, CurlingTest, Tick, curling_info, numa_args,
                          wait_until)
# curling_test puts scripts/ on the path.
from curlingtool.bench import stop_phases

#: Seconds from QEMU start to a ticking guest.
BOOT_DEADLINE = 120.0
PAGE = 4096
MiB = 1024 * 1024


class CurlingControlBase(CurlingTest):
    """Helpers shared by the control tests.

    :avocado: disable
    """

    APPEND = "curling.mode=dirty curling.rate=4"

    def start_protected(self, machine: str = "pc", append: Optional[str] = None,
                        extra_args: tuple[str, ...] = (), smp: int = 1,
                        **params: Any) -> tuple[VM, VM]:
        """Boot a sender, protect it to a receiver, let a few checkpoints
        commit; returns (sender, receiver). A ``curling_timeout`` in
        ``params`` is set on both sides."""
        sender, receiver, uri = self.launch_pair(
            machine=machine, append=append or self.APPEND,
            extra_args=extra_args, smp=smp)
        if "curling_timeout" in params:
            receiver.qmp("migrate-set-parameters",
                         curling_timeout=params["curling_timeout"])
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, uri, **params)
        return sender, receiver

    def assert_ticking(self, vm: VM, since: int, count: int = 10) -> list[Tick]:
        """``vm``'s guest prints ``count`` more ticks, one by one, all ok."""
        ticks = vm.wait_ticks(count, timeout=60, since=since)
        self.assert_consecutive(vm, ticks)
        self.assert_ticks_ok(vm)
        return ticks

    def wait_curling_status(self, vm: VM, status: str,
                            timeout: float = 30.0) -> dict[str, Any]:
        return wait_until(
            lambda: (lambda i: i if i["status"] == status else None)(
                curling_info(vm)),
            timeout, f"Curling status {status} on {vm.name}", 0.05)

    def scratch(self, name: str) -> pathlib.Path:
        assert self._tmpdir is not None
        return self._tmpdir / name


class CurlingControl(CurlingControlBase):
    """
    :avocado: tags=arch:x86_64,curling,control
    """

    # -- ending protection ----------------------------------------------

    def test_cancel_no_failover(self) -> None:
        """migrate_cancel ends protection cleanly: the sender's guest runs
        on, the receiver stays paused and never takes over, not even when
        the sender dies afterwards."""
        sender, receiver = self.start_protected()
        self.wait_checkpoints(sender, 3)

        sender.qmp("migrate_cancel")
        self.wait_curling_status(sender, "cancelled")
        self.wait_curling_status(receiver, "cancelled")
        sender.wait_event("CURLING_STATE",
                          match=lambda e: e["data"]["status"] == "cancelled")
        receiver.wait_event("CURLING_STATE",
                            match=lambda e: e["data"]["status"] == "cancelled")
        self.log.info("sender query-migrate after cancel: %s",
                      sender.qmp("query-migrate").get("status"))
        self.log.info("receiver query-migrate after cancel: %s",
                      receiver.qmp("query-migrate").get("status"))

        self.assertEqual(sender.qmp("query-status")["status"], "running")
        self.assert_ticking(sender, sender.console_mark())
        self.assertEqual(receiver.qmp("query-status")["status"], "paused")

        sender.kill()
        # Well past curling-timeout: a receiver still listening would have
        # taken over by now.
        time.sleep(3 * curling_info(receiver)["timeout"] / 1000 + 1)
        self.assertEqual(self.failovers(receiver), [],
                         "the receiver failed over after migrate_cancel")
        self.assertEqual(receiver.qmp("query-status")["status"], "paused")
        self.assertEqual(curling_info(receiver)["status"], "cancelled")
        self.assertEqual(receiver.ticks(), [],
                         "the cancelled receiver ran the guest")

    def test_cancel_before_protection(self) -> None:
        """migrate_cancel at moments before the first checkpoint commits
        (in the first round, while the receiver loads it, before the first
        checkpoint): the cancel ends at once, the sender's guest runs on,
        and the receiver never runs one, not even once the sender dies."""
        for delay in (0.0, 0.3, 0.45, 0.6, 1.0):
            sender, receiver, uri = self.launch_pair(append=self.APPEND)
            sender.wait_tick(3, timeout=BOOT_DEADLINE)
            sender.qmp("migrate-set-parameters",
                       max_bandwidth=self.BANDWIDTH)
            sender.qmp("migrate", uri=uri)
            time.sleep(delay)
            at = curling_info(sender)["status"]
            t_cancel = time.monotonic()
            sender.qmp("migrate_cancel")
            info = wait_until(
                lambda: (lambda i: i if i["status"] in
                         ("cancelled", "error") else None)(
                    curling_info(sender)), 15, "the cancel to end", 0.05)
            took = time.monotonic() - t_cancel
            self.assertEqual(sender.qmp("query-status")["status"],
                             "running")
            self.assert_ticking(sender, sender.console_mark(), count=3)
            sender.kill()
            # Well past curling-timeout.  A receiver with nothing to
            # resume fails as an incomplete migration and exits.
            time.sleep(4.0)
            outcome = "exited"
            if receiver.is_running():
                outcome = curling_info(receiver)["status"]
                self.assertEqual(self.failovers(receiver), [],
                                 f"the receiver took over after a cancel "
                                 f"{delay} s into the migration")
                self.assertNotEqual(
                    receiver.qmp("query-status")["status"], "running")
            self.log.info("cancelled %.1f s after migrate (sender %s): "
                          "ended %s after %.2f s; receiver %s", delay, at,
                          info["status"], took, outcome)
            self.assertLess(took, 5.0, "the cancel hung")
            self.assertEqual(receiver.ticks(), [],
                             f"the receiver ran the guest after a cancel "
                             f"{delay} s into the migration")
            receiver.kill()

    #: Seconds from boot to the power-off of the guests that power off.
    POWEROFF = 40

    def test_guest_poweroff_no_failover(self) -> None:
        """The protected guest powers itself off and its QEMU exits: the
        receiver keeps its copy paused and never starts a guest that was
        shut down.  Checkpoints are paced to take most of the time, so
        that QEMU's exit is likely to find one on its way."""
        sender, receiver = self.start_protected(
            append=f"{self.APPEND} curling.poweroff={self.POWEROFF}")
        sender.qmp("migrate-set-parameters", max_bandwidth=MiB)
        self.wait_checkpoints(sender, 3)
        info = curling_info(sender)
        self.log.info("checkpoints of %d bytes, %.0f ms each", info["mean-bytes"],
                      info["last-duration"])
        # The guest's last console lines were not committed when QEMU
        # ended, so they never came out: QEMU's SHUTDOWN event says why
        # it ends.
        event = sender.wait_event("SHUTDOWN", timeout=self.POWEROFF + 60)
        self.assertEqual(event["data"]["reason"], "guest-shutdown", event)
        wait_until(lambda: not sender.is_running(), 60,
                   "the sender to exit", 0.2)
        self.assert_no_failover(receiver)

    def test_guest_poweroff_no_shutdown(self) -> None:
        """With -no-shutdown the guest's power-off leaves its QEMU
        running, the VM shut down: protection ends on both sides without
        failover, and a later crash of that QEMU starts nothing."""
        sender, receiver = self.start_protected(
            append=f"{self.APPEND} curling.poweroff={self.POWEROFF}",
            extra_args=("-no-shutdown",))
        self.wait_checkpoints(sender, 3)
        self.wait_curling_status(sender, "cancelled",
                                 timeout=self.POWEROFF + 60)
        self.assertEqual(sender.qmp("query-status")["status"], "shutdown")
        self.wait_curling_status(receiver, "cancelled")
        sender.kill()
        self.assert_no_failover(receiver)

    def test_quit_is_prompt(self) -> None:
        """``quit`` of a protected sender returns within a few seconds:
        at once with a healthy receiver, and within about three times
        curling-timeout when the receiver's answers no longer come (its
        COMMITs held back by a proxy): the sender ends the checkpoint on
        its way and asks the receiver to end protection, each wait bounded
        by curling-timeout.  The receiver, having seen the end asked for,
        never takes over."""
        seed, rng = self.seeded_rng()
        for silent in (False, True):
            label = "silent receiver" if silent else "healthy receiver"
            sender, receiver, uri = self.launch_pair(append=self.APPEND)
            proxy = self.proxy_to(uri, rng)
            sender.wait_tick(3, timeout=BOOT_DEADLINE)
            self.protect(sender, receiver, proxy.uri)
            self.wait_checkpoints(sender, 3)
            timeout_s = curling_info(sender)["timeout"] / 1000
            if silent:
                proxy.hold("commit")
                time.sleep(timeout_s / 2)
            start = time.monotonic()
            try:
                sender.qmp("quit")
            except Exception as exc:  # the monitor may go before it answers
                self.log.info("quit: %s", exc)
            wait_until(lambda: not sender.is_running(), 60,
                       "the sender to quit", 0.05)
            took = time.monotonic() - start
            self.log.info("%s: quit took %.2f s (curling-timeout %.1f s)",
                          label, took, timeout_s)
            self.assertLess(took, 3 * timeout_s + 2 if silent else 2.0,
                            f"{label}: quit took {took:.1f} s")
            if silent:
                proxy.release()
            self.assert_no_failover(receiver)
            receiver.kill()
            proxy.stop()

    def assert_no_failover(self, receiver: VM) -> None:
        """Well past curling-timeout after its sender went, ``receiver``
        still keeps its copy paused, protection ended (cancelled)."""
        time.sleep(3 * curling_info(receiver)["timeout"] / 1000 + 1)
        self.assertEqual(self.failovers(receiver), [],
                         "the receiver started a guest that was shut down")
        self.assertEqual(curling_info(receiver)["status"], "cancelled")
        self.assertEqual(receiver.qmp("query-status")["status"], "paused")
        self.assertEqual(receiver.ticks(), [],
                         "the receiver ran the guest")

    def test_sender_out_of_memory(self) -> None:
        """A sender that cannot grow its checkpoint buffer ends protection
        cleanly: it keeps running its guest, tells the receiver (which
        keeps its copy paused, no failover) and says why; QEMU does not
        abort."""
        append = "curling.mode=dirty curling.rate=400 curling.mb=160"
        sender, receiver, uri = self.launch_pair(append=append, mem="512M")
        sender.wait_tick(3, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, uri, curling_interval=1000)
        # Room for everything but a checkpoint of the 160 MiB the guest
        # rewrites every second.  Limited once protecting, so that the
        # first checkpoint (its size depends on how long the end of the
        # first round took) does not decide the outcome.
        with open(f"/proc/{sender.pid}/status") as f:
            vm_size = next(int(line.split()[1]) * 1024 for line in f
                           if line.startswith("VmSize:"))
        limit = vm_size + 48 * MiB
        resource.prlimit(sender.pid, resource.RLIMIT_AS, (limit, limit))

        self.wait_curling_status(sender, "error", timeout=60)
        error = sender.qmp("query-migrate").get("error-desc", "")
        self.log.info("sender: %s", error)
        self.assertRegex(error, r"cannot allocate \d+ bytes for a checkpoint")
        self.wait_curling_status(receiver, "cancelled")
        self.assertEqual(receiver.qmp("query-status")["status"], "paused")
        self.assertEqual(self.failovers(receiver), [])
        self.assertEqual(sender.qmp("query-status")["status"], "running")
        self.assert_ticking(sender, since=sender.console_mark())

    def test_checkpoint_ceiling(self) -> None:
        """Checkpoints that fit their ceiling (x-curling-checkpoint-max on
        the sender) commit as before; one that does not, here because the
        guest wrote twice the ceiling to its disk, ends protection cleanly,
        as a sender out of memory does: the error names the ceiling, no
        stop phase saved more than the ceiling (the disks are not read on
        while the guest is stopped), the guest runs on, the receiver keeps
        its copy paused."""
        ceiling = 32 * MiB

        def side(name: str) -> list[str]:
            args = self.disk_args(name, [("dl0", "virtio-blk-pci,drive={drive}")])
            if name == "sender":
                args += ["-global", f"migration.x-curling-checkpoint-max={ceiling}",
                         "-trace", "curling_stop_phase", "-trace", "curling_live_phase"]
            return args

        # The guest writes its 64 MiB disk over and over at 16 MiB/s.
        append = ("curling.mode=dirty curling.rate=1 curling.mb=16 "
                  "curling.diskload=seq curling.diskrate=16")
        sender, receiver, uri = self.launch_pair(append=append,
                                                 side_args=side)
        sender.wait_tick(3, timeout=BOOT_DEADLINE)
        sender.wait_console("curling: diskload ", timeout=60)
        self.protect(sender, receiver, uri, curling_interval=200)
        self.wait_checkpoints(sender, 10)
        self.assertEqual(curling_info(sender)["status"], "protecting")
        # 8 s of writes: all of the disk, twice the ceiling.
        sender.qmp("migrate-set-parameters", curling_interval=8000)

        self.wait_curling_status(sender, "error", timeout=60)
        error = sender.qmp("query-migrate").get("error-desc", "")
        self.log.info("sender: %s", error)
        self.assertRegex(error, rf"ceiling of {ceiling} bytes "
                         r"\(x-curling-checkpoint-max\)")
        saved = [phase[-1] for phase in stop_phases(self.qemu_log(sender))]
        self.log.info("bytes saved by each stop phase: %s", saved)
        self.assertTrue(saved, "the sender traced no stop phase")
        self.assertLessEqual(max(saved), ceiling)
        self.wait_curling_status(receiver, "cancelled")
        self.assertEqual(receiver.qmp("query-status")["status"], "paused")
        self.assertEqual(self.failovers(receiver), [])
        self.assertEqual(sender.qmp("query-status")["status"], "running")
        self.assert_ticking(sender, since=sender.console_mark())

    def test_failed_stop_ends_protection(self) -> None:
        """A checkpoint whose stop fails (here the disk flush that stopping
        the VM does: blkdebug fails every flush once the test wrote to that
        drive) ends protection with the error, and the guest runs on,
        unprotected, instead of staying frozen; the receiver, told that
        protection ended, never takes over."""
        assert self._tmpdir is not None
        conf = self.scratch("flush-fails.conf")
        conf.write_text('[set-state]\nevent = "write_aio"\nstate = "1"\n'
                        'new_state = "2"\n\n'
                        '[inject-error]\nevent = "flush_to_disk"\n'
                        'state = "2"\nerrno = "5"\n')
        disk = "virtio-blk-pci,drive=fl0"

        def side(name: str) -> list[str]:
            image = self.disk_image(f"{name}-fl0")
            # Only the sender's flushes fail.
            spec = (f"blkdebug:{conf}:{image}" if name == "sender"
                    else str(image))
            return ["-drive", f"if=none,id=fl0,format=raw,file={spec}",
                    "-device", disk]

        sender, receiver, uri = self.launch_pair(append=self.APPEND,
                                                 side_args=side)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, uri)
        self.wait_checkpoints(sender, 3)
        sender.qmp("human-monitor-command",
                   command_line='qemu-io fl0 "write -P 0x5a 0 64k"')
        info = self.wait_curling_status(sender, "error")
        self.log.info("sender after the failed stop: %s; %s", info,
                      sender.qmp("query-migrate").get("error-desc"))
        self.assertRegex(sender.qmp("query-migrate").get("error-desc", ""),
                         r"stopping the VM failed")
        self.assertEqual(sender.qmp("query-status")["status"], "running",
                         "the failed stop left the guest frozen")
        self.assert_ticking(sender, sender.console_mark())
        self.wait_curling_status(receiver, "cancelled")

        sender.kill()
        time.sleep(3 * curling_info(receiver)["timeout"] / 1000 + 1)
        self.assertEqual(self.failovers(receiver), [],
                         "the receiver failed over after the sender ended "
                         "protection")
        self.assertEqual(receiver.ticks(), [],
                         "the receiver ran the guest")

    def test_receiver_lost(self) -> None:
        """kill -9 the receiver: the sender reports the error and its guest
        runs on untouched."""
        sender, receiver = self.start_protected()
        self.wait_checkpoints(sender, 3)
        mark = sender.console_mark()

        t_kill = time.monotonic()
        receiver.kill()
        info = self.wait_curling_status(sender, "error", timeout=15)
        self.log.info("sender reported error %.3f s after the receiver's "
                      "death: %s", time.monotonic() - t_kill, info)
        migrate = sender.qmp("query-migrate")
        self.log.info("sender query-migrate: %s", migrate)
        self.assertEqual(migrate["status"], "failed")
        self.assertEqual(sender.qmp("query-status")["status"], "running")
        ticks = self.assert_ticking(sender, mark, count=20)
        self.assertGreater(ticks[-1].pages, ticks[0].pages,
                           "the guest stopped dirtying memory")

    def test_receiver_stall_no_split_brain(self) -> None:
        """A receiver that stalls for longer than curling-timeout and then
        comes back must not start a second copy of the guest while the
        sender's copy runs on (the sender is alive and connected: it can
        tell the receiver that it gave up)."""
        sender, receiver = self.start_protected()
        self.wait_checkpoints(sender, 3)
        timeout_s = curling_info(sender)["timeout"] / 1000

        os.kill(receiver.pid, signal.SIGSTOP)
        self.log.info("SIGSTOP to %s (pid %d)", receiver.name, receiver.pid)
        try:
            info = self.wait_curling_status(sender, "error",
                                            timeout=timeout_s + 10)
        finally:
            os.kill(receiver.pid, signal.SIGCONT)
        self.log.info("sender gave up: %s; %s",
                      sender.qmp("query-migrate").get("error-desc"), info)
        time.sleep(2 * timeout_s + 2)

        on_sender = sender.qmp("query-status")["status"]
        on_receiver = receiver.qmp("query-status")["status"]
        self.log.info("after the stall: sender %s, receiver %s (Curling %s, "
                      "failovers %s)", on_sender, on_receiver,
                      curling_info(receiver)["status"],
                      self.failovers(receiver))
        self.assertIn("running", (on_sender, on_receiver),
                      "no copy of the guest runs")
        self.assertFalse(
            on_sender == "running" and on_receiver == "running",
            "split brain: the sender gave up protection and kept its guest "
            "running, and the receiver took over as well")

    # -- the receiver mirrors the sender --------------------------------

    def test_ram_identical_when_stopped(self) -> None:
        """With the sender's guest stopped, two checkpoints later the
        receiver's RAM equals the sender's, byte for byte, and so does all
        of it after cancel, once the receiver loaded the devices (pc)."""
        self.check_ram_identical("pc")

    def test_ram_identical_when_stopped_q35(self) -> None:
        """The same on q35."""
        self.check_ram_identical("q35")

    def test_ram_identical_when_stopped_numa_vga(self) -> None:
        """The same on q35 with the guest's memory in two NUMA nodes, each
        a RAM block of its own, and a VGA device (its video RAM another
        block): every RAM block is checkpointed, not only the first."""
        self.check_ram_identical(
            "q35", extra_args=numa_args(2, 128) + ("-device", "VGA"), smp=2)

    def check_ram_identical(self, machine: str,
                            extra_args: tuple[str, ...] = (),
                            smp: int = 1) -> None:
        # Dumping 256 MiB holds the receiver's main loop, and with it the
        # application of checkpoints, for a second or more on a busy host.
        sender, receiver = self.start_protected(
            machine=machine, extra_args=extra_args, smp=smp,
            curling_timeout=10000)
        self.wait_checkpoints(sender, 3)
        sender.qmp("stop")
        self.assertEqual(sender.qmp("query-status")["status"], "paused")
        info = self.wait_checkpoints(sender, 2)
        self.log.info("stopped sender committed seq %d", info["sequence"])

        # While protecting, the receiver's devices are as QEMU created
        # them: what the guest sees between 640 KiB and 1 MiB depends on
        # the VGA device's registers (its legacy window from 640 KiB) and
        # the chipset's PAM registers, so that window is compared after
        # cancel, when the receiver has loaded the committed devices.
        self.assert_same_ram(sender, receiver, skip=(0xa0000, 0x100000))
        self.assertEqual(curling_info(sender)["status"], "protecting")
        self.assertFalse(receiver.qmp("query-status")["running"])

        sender.qmp("migrate_cancel")
        self.wait_curling_status(receiver, "cancelled")
        self.assert_same_ram(sender, receiver)
        # With its devices loaded the receiver maps its memory as the
        # sender does: every RAM and ROM range the guest sees (each RAM
        # block that is mapped: the nodes, video RAM, firmware) is equal.
        ranges = self.mapped_ram(sender)
        self.log.info("RAM and ROM mapped on %s: %s", sender.name,
                      ", ".join(f"{name} {start:#x}+{size:#x}"
                                for start, size, name in ranges))
        for start, size, name in ranges:
            self.assert_same_ram(sender, receiver, start=start, size=size,
                                 what=name)
        self.assertEqual(receiver.qmp("query-status")["status"], "paused")

    MTREE_RANGE_RE = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) "
                                r"\(prio -?\d+, (?:ram|rom)\): (\S+)")

    def mapped_ram(self, vm: VM) -> list[tuple[int, int, str]]:
        """(start, size, region) of every RAM and ROM range of ``vm``'s
        guest-physical address space, from ``info mtree -f``."""
        text = vm.qmp("human-monitor-command", command_line="info mtree -f")
        for view in text.split("FlatView #")[1:]:
            if 'AS "memory"' not in view:
                continue
            ranges = []
            for line in view.splitlines():
                m = self.MTREE_RANGE_RE.match(line)
                if m:
                    start, end = int(m.group(1), 16), int(m.group(2), 16)
                    ranges.append((start, end - start + 1, m.group(3)))
            self.assertTrue(ranges, f"no RAM in {vm.name}'s memory map")
            return ranges
        raise AssertionError(f"{vm.name} has no 'memory' address space")

    def assert_same_ram(self, sender: VM, receiver: VM,
                        skip: tuple[int, int] = (0, 0), start: int = 0,
                        size: int = 256 * MiB, what: str = "RAM") -> None:
        """``size`` bytes of guest-physical memory from ``start`` (the
        first 256 MiB) are the same on both, but for the pages in ``skip``
        (start, end)."""
        dumps = {}
        for vm in (sender, receiver):
            path = self.scratch(f"{vm.name}-ram.bin")
            vm.qmp("pmemsave", val=start, size=size, filename=str(path))
            self.assertEqual(path.stat().st_size, size)
            dumps[vm.name] = path

        differing = []
        nonzero = 0
        with dumps["sender"].open("rb") as a, dumps["receiver"].open("rb") as b:
            offset = 0
            while True:
                x = a.read(MiB)
                y = b.read(MiB)
                if not x and not y:
                    break
                if x.count(0) != len(x):
                    nonzero += 1
                if x != y:
                    for p in range(0, max(len(x), len(y)), PAGE):
                        if x[p:p + PAGE] != y[p:p + PAGE] and \
                                not skip[0] <= offset + p < skip[1]:
                            differing.append(offset + p)
                offset += len(x)
        for path in dumps.values():
            path.unlink()
        if size >= 64 * MiB:
            self.assertGreater(nonzero, 16, f"the sender's {what} dump is "
                               f"blank")
        self.assertEqual(
            len(differing), 0,
            f"{what}: {len(differing)} of {size // PAGE} 4 KiB pages differ "
            f"between the sender and the receiver, first at "
            f"{[hex(start + a) for a in differing[:10]]}")

    #: (name, display device, guest options) of the screens mirrored.
    SCREENS = (
        ("std VGA, text", "VGA", "curling.vga=1"),
        ("std VGA, graphics", "VGA", "curling.fb=1"),
        # nomodeset keeps the guest's virtio-gpu driver away: virtio-vga
        # stays a VGA (its virtio-gpu scanouts are not mirrored).
        ("virtio-vga, text", "virtio-vga", "curling.vga=1 nomodeset"),
    )

    def test_screen_mirrored(self) -> None:
        """While it protects the VM, the receiver shows the guest's
        screen: with the sender stopped, the receiver's screendump equals
        the sender's (the last checkpoint is the sender's state), and
        again after the guest ran on and changed it; while the guest
        runs, the receiver's screen changes within a second. For the std
        VGA in text and in graphics mode (640x480x32 through VBE) and for
        virtio-vga in text mode. Once protection ends without failover,
        the receiver's own VGA, loaded with the last checkpoint's state,
        draws the same screen.  (virtio-vga driven by the guest's
        virtio-gpu driver is not mirrored.)"""
        for name, device, options in self.SCREENS:
            self.check_screen_mirrored(name, device, options,
                                       cancel=name == self.SCREENS[0][0])

    def check_screen_mirrored(self, name: str, device: str, options: str,
                              cancel: bool) -> None:
        label = name.replace(", ", "-").replace(" ", "-").lower()
        sender, receiver = self.start_protected(
            append=f"{self.APPEND} {options}", extra_args=("-device", device))
        if "curling.fb=1" in options:
            sender.wait_console("curling: fb mode=", timeout=60)
        else:
            # Past tick 60 the 50-line text screen has scrolled: vgacon
            # scrolls by moving the start address, so the CRTC registers
            # matter as well as the video memory.
            sender.wait_tick(60, timeout=60)
        self.wait_checkpoints(sender, 3)

        moving = self.screendump(receiver, f"{label}-receiver-running-1.ppm")
        time.sleep(1.5)
        self.assertTrue(
            moving != self.screendump(receiver,
                                      f"{label}-receiver-running-2.ppm"),
            f"{name}: the receiver's screen did not change in 1.5 s while "
            f"the guest ran")

        previous = b""
        for rnd in (1, 2):
            mark = sender.console_mark()
            sender.wait_ticks(5, timeout=30, since=mark)
            sender.qmp("stop")
            self.wait_checkpoints(sender, 2)
            self.assertEqual(curling_info(receiver)["status"], "protecting")
            on_sender = self.assert_same_screen(
                sender, receiver, f"{label}-{rnd}", f"{name}, while "
                f"protecting, stop {rnd}")
            self.assertTrue(on_sender != previous,
                            f"{name}: the sender's screen did not change as "
                            f"the guest ran")
            previous = on_sender
            sender.qmp("cont")

        if cancel:
            sender.qmp("stop")
            self.wait_checkpoints(sender, 2)
            sender.qmp("migrate_cancel")
            self.wait_curling_status(receiver, "cancelled")
            self.assert_same_screen(sender, receiver, f"{label}-cancelled",
                                    f"{name}, after migrate_cancel")
        sender.kill()
        receiver.kill()

    def assert_same_screen(self, sender: VM, receiver: VM, label: str,
                           what: str) -> bytes:
        """The screendumps of ``sender`` and ``receiver`` are equal and
        not blank; returns the sender's."""
        on_sender = self.screendump(sender, f"{label}-sender.ppm")
        on_receiver = self.screendump(receiver, f"{label}-receiver.ppm")
        header, pixels = self.parse_ppm(on_sender)
        colours = {pixels[i:i + 3] for i in range(0, len(pixels), 3)}
        self.log.info("%s: screen %s, %d colours", what, header, len(colours))
        self.assertGreater(len(colours), 1,
                           f"{what}: the sender's screen is blank")
        if on_receiver != on_sender:
            rheader, rpixels = self.parse_ppm(on_receiver)
            diff = sum(1 for i in range(0, min(len(pixels), len(rpixels)), 3)
                       if pixels[i:i + 3] != rpixels[i:i + 3])
            self.fail(f"{what}: the receiver's screen ({rheader}) differs "
                      f"from the sender's ({header}) in {diff} pixels; see "
                      f"{label}-*.ppm in the test log dir")
        return on_sender

    # -- timing -----------------------------------------------------------

    def measure_period(self, vm: VM, seconds: float) -> tuple[float, float, int]:
        """Measure ``vm``'s checkpoint period over about ``seconds``: returns
        (period ms, mean duration ms of the same checkpoints, count)."""
        def next_commit(after: int) -> tuple[float, dict[str, Any]]:
            info = wait_until(
                lambda: (lambda i: i if i["checkpoints"] > after else None)(
                    curling_info(vm)),
                30, f"a commit on {vm.name}", 0.005)
            return time.monotonic(), info

        t0, i0 = next_commit(curling_info(vm)["checkpoints"])
        time.sleep(seconds)
        t1, i1 = next_commit(curling_info(vm)["checkpoints"])
        n = i1["checkpoints"] - i0["checkpoints"]
        self.assertGreater(n, 0)
        period = (t1 - t0) * 1000 / n
        duration = (i1["mean-duration"] * i1["checkpoints"] -
                    i0["mean-duration"] * i0["checkpoints"]) / n
        return period, duration, n

    def test_interval_honoured(self) -> None:
        """Checkpoints follow each other every curling-interval plus the
        time a checkpoint takes, and a live change of the interval applies."""
        sender, receiver = self.start_protected(curling_interval=100)
        self.wait_checkpoints(sender, 5)
        results = {}
        for interval, seconds in ((100, 4.0), (400, 6.0)):
            if interval != 100:
                sender.qmp("migrate-set-parameters",
                           curling_interval=interval)
                self.assertEqual(curling_info(sender)["interval"], interval)
                self.wait_checkpoints(sender, 2)
            period, duration, n = self.measure_period(sender, seconds)
            expected = interval + duration
            self.log.info("interval %d ms: %d checkpoints, period %.1f ms, "
                          "mean duration %.1f ms, expected %.1f ms", interval,
                          n, period, duration, expected)
            self.assertAlmostEqual(
                period, expected, delta=0.25 * expected,
                msg=f"checkpoint period {period:.1f} ms at interval "
                    f"{interval} ms (mean duration {duration:.1f} ms)")
            results[interval] = (period, duration)
        info = curling_info(sender)
        self.log.info("sender: pause mean %.2f ms max %.2f ms, bytes mean %d "
                      "max %d", info["mean-pause"], info["max-pause"],
                      info["mean-bytes"], info["max-bytes"])
        # The part of the period that is not the checkpoint itself grows by
        # the change of the interval.
        sleep_100 = results[100][0] - results[100][1]
        sleep_400 = results[400][0] - results[400][1]
        self.assertAlmostEqual(
            sleep_400 - sleep_100, 300, delta=75,
            msg=f"time between checkpoints went from {sleep_100:.1f} to "
                f"{sleep_400:.1f} ms when the interval went from 100 to 400")
        self.assertEqual(curling_info(receiver)["status"], "protecting")

    def test_long_interval_heartbeat(self) -> None:
        """An interval longer than curling-timeout: heartbeats keep the
        receiver from taking over, and checkpoints still commit."""
        interval, timeout = 3000, 1000
        sender, receiver, uri = self.launch_pair(append=self.APPEND)
        receiver.qmp("migrate-set-parameters", curling_timeout=timeout)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, uri, curling_interval=interval,
                     curling_timeout=timeout)
        self.assertEqual(curling_info(receiver)["timeout"], timeout)
        self.wait_checkpoints(sender, 1, timeout=30)

        commits = []
        last = curling_info(sender)["checkpoints"]
        max_silence = 0
        end = time.monotonic() + 10.0
        while time.monotonic() < end:
            rinfo = curling_info(receiver)
            self.assertEqual(rinfo["status"], "protecting",
                             f"the receiver stopped protecting: {rinfo}")
            max_silence = max(max_silence, rinfo.get("since-commit", 0))
            info = curling_info(sender)
            self.assertEqual(info["status"], "protecting")
            if info["checkpoints"] > last:
                commits.append((time.monotonic(), info))
                last = info["checkpoints"]
            time.sleep(0.05)
        self.assertEqual(self.failovers(receiver), [])
        self.assertFalse(receiver.qmp("query-status")["running"])
        gaps = [(b[0] - a[0]) * 1000 for a, b in zip(commits, commits[1:])]
        self.log.info("commits in 10 s: %d, gaps %s ms, durations %s ms, "
                      "longest silence seen by the receiver %d ms",
                      len(commits), [round(g) for g in gaps],
                      [round(c[1]["last-duration"]) for c in commits],
                      max_silence)
        self.assertGreater(max_silence, 2 * timeout,
                           "the receiver never went long without a commit")
        self.assertGreaterEqual(len(commits), 2, "checkpoints stopped")
        self.assertLessEqual(len(commits), 4)
        for gap, (_, info) in zip(gaps, commits[1:]):
            expected = interval + info["last-duration"]
            self.assertAlmostEqual(gap, expected, delta=0.25 * expected)

    def test_stalled_main_loop_no_failover(self) -> None:
        """The sender's main loop stalls, holding the BQL, for 0.8 and then
        1.5 times curling-timeout (a screendump into a FIFO that nobody
        reads yet): its checkpoints wait, but the receiver still hears from
        a live sender and never takes over, and checkpoints go on
        afterwards."""
        timeout = 1000
        sender, receiver, uri = self.launch_pair(
            append=self.APPEND, extra_args=("-device", "VGA"))
        receiver.qmp("migrate-set-parameters", curling_timeout=timeout)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, uri, curling_timeout=timeout)
        self.wait_checkpoints(sender, 5)

        for factor in (0.8, 1.5, 1.5):
            stall = factor * timeout / 1000
            before = curling_info(sender)["checkpoints"]
            took = self.stall_main_loop(sender, stall)
            self.log.info("main loop stalled %.2f s (asked %.2f s)", took,
                          stall)
            self.assertGreaterEqual(took, stall * 0.9,
                                    "the main loop did not stall")
            self.wait_checkpoints(sender, 3)
            self.assertEqual(curling_info(receiver)["status"], "protecting")
            self.assertEqual(self.failovers(receiver), [],
                             f"a {stall:.2f} s stall of the sender's main "
                             f"loop made the receiver take over")
            self.assertGreater(curling_info(sender)["checkpoints"], before)
        self.assertFalse(receiver.qmp("query-status")["running"])
        self.assert_ticking(sender, sender.console_mark(), count=3)

    def stall_main_loop(self, vm: VM, seconds: float) -> float:
        """Hold ``vm``'s main loop (and the BQL) for ``seconds``: a
        screendump opens a FIFO for writing, which blocks until a reader
        opens it.  Returns how long the screendump took."""
        fifo = self.scratch("stall.fifo")
        os.mkfifo(fifo)
        done = threading.Event()

        def reader() -> None:
            if done.wait(seconds):
                return
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    ready, _, _ = select.select([fd], [], [], 0.1)
                    data = os.read(fd, 1 << 16) if ready else None
                    if done.is_set() and not data:
                        return
            finally:
                os.close(fd)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        start = time.monotonic()
        try:
            vm.qmp("screendump", filename=str(fifo))
            return time.monotonic() - start
        finally:
            done.set()
            thread.join(70)
            fifo.unlink()

    # -- what protection must not disturb ---------------------------------

    def test_no_pass_events_while_protecting(self) -> None:
        """With the events capability on, protection sends no
        MIGRATION_PASS event per checkpoint."""
        sender, receiver, uri = self.launch_pair(append=self.APPEND)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        sender.qmp("migrate-set-capabilities",
                   capabilities=[{"capability": "events", "state": True}])
        self.protect(sender, receiver, uri)
        first_round = sum(1 for e in sender.events
                          if e["event"] == "MIGRATION_PASS")
        seen = len(sender.events)
        self.wait_checkpoints(sender, 20)
        sender.qmp("query-status")      # collects pending events
        passes = [e for e in sender.events[seen:]
                  if e["event"] == "MIGRATION_PASS"]
        self.log.info("MIGRATION_PASS events: %d in the first round, %d "
                      "during 20 checkpoints", first_round, len(passes))
        self.assertGreater(first_round, 0, "events capability had no effect")
        self.assertEqual(passes, [], "checkpoints sent MIGRATION_PASS events")

    def test_max_bandwidth_set_while_protecting(self) -> None:
        """max-bandwidth set while protecting paces the frames but never
        stops the live phase: the dirty pages are still copied while the
        guest runs, not with it stopped."""
        append = "curling.mode=dirty curling.rate=8"
        trace = ("-trace", "curling_stop_phase",
                 "-trace", "curling_checkpoint_sent")
        sender, receiver, uri = self.launch_pair(append=append,
                                                 extra_args=trace)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, uri)
        # 32 MiB/s is 3.3 MB per rate-limit window: a few checkpoints of
        # this guest (about 0.8 MB each) use a window up.
        sender.qmp("migrate-set-parameters", max_bandwidth=32 * MiB)
        self.wait_checkpoints(sender, 40)
        self.assertEqual(curling_info(receiver)["status"], "protecting")

        log = sender.qemu_log_path.read_text(errors="replace")
        stopped = [int(m) for m in re.findall(
            r"curling_stop_phase .*; (\d+) bytes saved", log)]
        sizes = [int(m) for m in re.findall(
            r"curling_checkpoint_sent checkpoint \d+: (\d+) bytes", log)]
        self.assertGreaterEqual(len(stopped), 40, "no stop-phase trace")
        stopped_mid = statistics.median(stopped[-20:])
        size_mid = statistics.median(sizes[-20:])
        self.log.info("last 20 checkpoints: median %d bytes, %d of them "
                      "saved with the guest stopped", size_mid, stopped_mid)
        self.assertGreater(size_mid, 256 * 1024,
                           "the guest dirtied too little to tell")
        self.assertLess(stopped_mid, size_mid / 4,
                        "most of each checkpoint was copied with the guest "
                        "stopped: the live phase saved nothing")

    # -- parameters over their whole range --------------------------------

    def test_timeout_and_bandwidth_no_stall(self) -> None:
        """curling-timeout 3000 with max-bandwidth 100 MiB/s, set on the
        sender while protecting: the receiver applies the sender's
        timeout, checkpoints go on, and the receiver, which hears from
        the sender all the time, never takes over."""
        sender, receiver = self.start_protected()
        sender.qmp("migrate-set-parameters", curling_timeout=3000)
        wait_until(lambda: curling_info(receiver)["timeout"] == 3000, 5,
                   "the receiver to apply the sender's timeout", 0.1)
        sender.qmp("migrate-set-parameters", max_bandwidth=100 * MiB)
        self.wait_checkpoints(sender, 30, timeout=30)
        time.sleep(4)       # longer than curling-timeout
        self.assertEqual(self.failovers(receiver), [],
                         "the receiver took over from a live sender")
        self.assertEqual(curling_info(receiver)["status"], "protecting")
        self.wait_checkpoints(sender, 10, timeout=10)
        self.assertEqual(sender.qmp("query-status")["status"], "running")

    def test_parameter_ranges(self) -> None:
        """curling-timeout and curling-interval take their documented
        ranges and refuse what is outside with an error naming them."""
        vm = self.launch_vm("sender", append=self.APPEND)
        for name, good, bad in (("curling-timeout", (200, 600000),
                                 (0, 199, 600001, 2 ** 31, 2 ** 32 - 1)),
                                ("curling-interval", (0, 600000),
                                 (600001, 2 ** 31, 2 ** 32 - 1))):
            for value in good:
                vm.qmp("migrate-set-parameters", {name: value})
                self.assertEqual(
                    vm.qmp("query-migrate-parameters")[name], value)
            for value in bad:
                with self.assertRaises(ExecuteError,
                                       msg=f"{name}={value} accepted") as cm:
                    vm.qmp("migrate-set-parameters", {name: value})
                self.assertRegex(str(cm.exception), name.replace("-", "_"))
                self.assertEqual(
                    vm.qmp("query-migrate-parameters")[name], good[-1])
