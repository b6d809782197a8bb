# SPDX-License-Identifier: GPL-2.0-or-later
"""Curling against bad input: malformed URIs, garbage on the wire, corrupt,
spoiled and truncated frames.

The frame tests put ``curling_proxy.CurlingProxy`` between sender and
receiver.  A frame the receiver cannot trust (bad header, wrong checksum)
must be discarded whole: the receiver reports an error, does not fail
over and keeps the state of the last committed checkpoint, which ``cont``
must run cleanly.  A connection that ends, even in the middle of a frame,
means the sender is lost: the receiver fails over from its last committed
checkpoint.  Every check ends in the guest's own view: its tick counter
and its memory self-check (``check=ok``).

``CURLING_SEED`` replays the random choices of a run (logged).
"""

from __future__ import annotations

import random
import signal
import socket
import struct
import time
from typing import Any, Optional

from qemu.qmp import ExecuteError

from curling_proxy import (CHECKPOINT, HEARTBEAT, break_device_section,
                           break_ram_record)
from curling_test import (VM, CurlingTest, VMDied, curling_info,
                          free_tcp_port, held_ticks, uri_port, wait_until)

#: Seconds from QEMU start to a ticking guest.
BOOT_DEADLINE = 120.0
#: Seconds from a cut connection to CURLING_FAILOVER.
FAILOVER_DEADLINE = 10.0
#: Seconds a QEMU that must exit gets to do so.
EXIT_DEADLINE = 30.0

APPEND = "curling.mode=dirty curling.rate=4"

#: Sender URIs that must be refused, and what the error must talk about.
BAD_URIS = {
    "curling:": r"address",
    "curling:exec:cat": r"tcp|unix|exec",
    "curling:file:{tmp}/curling-file": r"tcp|unix|file",
    "curling:fd:3": r"tcp|unix|fd",
    "curling:tcp:": r"address",
    "curling:rdma:127.0.0.1:4444": r"tcp|unix|rdma|RDMA",
    "curling:vsock:1:2": r"tcp|unix|vsock",
    "curling:bogus:1": r"bogus|protocol",
}

QEVM_HEADER = struct.pack(">II", 0x5145564D, 3)   # QEMU_VM_FILE_MAGIC, v3


class CurlingInputBase(CurlingTest):
    """Helpers of the input tests.

    :avocado: disable
    """

    # -- guest checks ----------------------------------------------------

    def assert_still_ticking(self, vm: VM, count: int = 10) -> None:
        """``vm``'s guest prints ``count`` more clean, consecutive ticks."""
        mark = vm.console_mark()
        ticks = vm.wait_ticks(count, timeout=60, since=mark)
        self.assert_consecutive(vm, ticks)
        self.assert_ticks_ok(vm, since=mark)
        self.assert_ticks_ok(vm)

    def wait_exit(self, vm: VM, timeout: float = EXIT_DEADLINE) -> int:
        """Wait for ``vm``'s QEMU to exit on its own; its exit status
        (negative: the signal that killed it)."""
        wait_until(lambda: not vm.is_running(), timeout,
                   f"{vm.name} to exit", 0.1)
        return vm.kill()

    def assert_clean_exit(self, vm: VM, pattern: str, what: str) -> str:
        status = self.wait_exit(vm)
        text = self.qemu_log(vm)
        self.log.info("%s: %s exited with %d: %s", what, vm.name, status,
                      text.strip().replace("\n", " | "))
        self.assertGreaterEqual(status, 0,
                                f"{what}: {vm.name} was killed by signal "
                                f"{-status}: {text}")
        self.assertEqual(status, 1, f"{what}: {vm.name} exit status: {text}")
        self.assertNotRegex(text, r"(?i)assert|abort|core dumped|segmentation",
                            f"{what}: {vm.name} crashed")
        self.assertRegex(text, pattern,
                         f"{what}: {vm.name} did not say what was wrong")
        return text

    # -- a spoiled frame: error, no failover, last checkpoint kept ---------

    def spoil_and_check(self, how: str, error_pattern: str) -> None:
        _, rng = self.seeded_rng()
        sender, receiver, uri = self.launch_pair(append=APPEND)
        proxy = self.proxy_to(uri, rng)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, proxy.uri)
        self.assertTrue(proxy.ready.is_set(), "the proxy saw no READY")
        self.wait_checkpoints(sender, 3)

        # Any checkpoint started after ``c + 1`` was committed holds a
        # state newer than ``before``.
        before = sender.last_tick()
        assert before is not None
        c = curling_info(sender)["sequence"]
        if how == "corrupt":
            proxy.arm_corrupt(min_sequence=c + 3)
        elif how == "unappliable":
            proxy.arm_rewrite(break_ram_record, min_sequence=c + 3)
        else:
            proxy.arm_garbage(min_sequence=c + 3)
        result = proxy.wait_action(timeout=30)
        at_spoil = sender.last_tick()
        assert at_spoil is not None
        bad, good = result["sequence"], result["committed"]
        self.log.info("%s checkpoint %d (%d bytes); last good %d; sender's "
                      "ticks %d..%d", how, bad, result["length"], good,
                      before.n, at_spoil.n)
        self.assertEqual(good, bad - 1)
        self.assertGreaterEqual(good, c + 2)

        wait_until(lambda: curling_info(receiver)["status"] != "protecting",
                   FAILOVER_DEADLINE, f"{receiver.name} to stop protecting")
        rinfo = curling_info(receiver)
        self.log.info("receiver: %s", rinfo)
        self.assertEqual(rinfo["status"], "error",
                         f"the receiver did not report the {how} frame as an "
                         f"error: {rinfo}")
        self.assertEqual(rinfo["sequence"], good,
                         "the receiver's last committed checkpoint is not "
                         "the last good one")
        wait_until(lambda: curling_info(sender)["status"] != "protecting",
                   FAILOVER_DEADLINE, f"{sender.name} to stop protecting")
        sinfo = curling_info(sender)
        self.log.info("sender: %s", sinfo)
        self.assertEqual(sinfo["status"], "error")
        self.assertLessEqual(sinfo["sequence"], good)
        proxy.wait_closed(timeout=10)

        # Longer than curling-timeout: a receiver that treats the closed
        # connection as a lost sender fails over by then.
        time.sleep(2 * rinfo["timeout"] / 1000 + 1)
        self.assertEqual(self.failovers(receiver), [],
                         f"the receiver failed over after a {how} frame")
        self.assertEqual(curling_info(receiver)["status"], "error")
        self.assertNotEqual(receiver.qmp("query-status")["status"], "running",
                            "the receiver runs its guest")
        self.assertEqual(receiver.ticks(), [],
                         "the receiver's guest ran before cont")
        self.assertRegex(self.qemu_log(receiver), error_pattern,
                         "the receiver logged no error about the frame")
        states = [e["data"]["status"] for e in receiver.events
                  if e["event"] == "CURLING_STATE"]
        self.assertIn("error", states)

        # The sender's guest goes on.
        self.assertEqual(sender.qmp("query-status")["status"], "running")
        self.assertEqual(sender.qmp("query-migrate")["status"], "failed")
        self.assert_still_ticking(sender)

        # The receiver holds the last good checkpoint: run it.
        mark = receiver.console_mark()
        receiver.qmp("cont")
        self.assertEqual(receiver.qmp("query-status")["status"], "running")
        self.assert_resumed(receiver, mark, before.n + 1,
                            at_spoil.n + 2 + held_ticks(rinfo["interval"]),
                            f"cont after a {how} checkpoint")
        self.assertEqual(self.failovers(receiver), [])


class CurlingInput(CurlingInputBase):
    """
    :avocado: tags=arch:x86_64,curling,input
    """

    def test_malformed_uris_sender(self) -> None:
        """``migrate`` to a curling: URI that is not tcp: or unix: fails
        with a clear error and starts nothing; the guest runs on."""
        vm = self.launch_vm("sender", append=APPEND)
        vm.wait_tick(3, timeout=BOOT_DEADLINE)
        vm.qmp("migrate-set-parameters", max_bandwidth=self.BANDWIDTH)
        mark = vm.console_mark()
        assert self._tmpdir is not None
        # A refused URI must not leave the curling capability on: the next
        # ordinary migration would become Curling (or be refused).  Leaks
        # are collected and reported at the end, after the other checks.
        leaks: list[str] = []
        for template, pattern in BAD_URIS.items():
            uri = template.format(tmp=self._tmpdir)
            with self.assertRaises(ExecuteError,
                                   msg=f"migrate {uri} was accepted") as cm:
                vm.qmp("migrate", uri=uri)
            self.check_refused(vm, uri, str(cm.exception), pattern)
            if self.curling_capability(vm):
                leaks.append(uri)
                vm.qmp("migrate-set-capabilities",
                       capabilities=[{"capability": "curling",
                                      "state": False}])
        self.assertFalse((self._tmpdir / "curling-file").exists(),
                         "migrate curling:file: created its file")

        # The capability with an exec transport in the channels form.
        vm.qmp("migrate-set-capabilities",
               capabilities=[{"capability": "curling", "state": True}])
        channels = [{"channel-type": "main",
                     "addr": {"transport": "exec",
                              "args": ["/bin/sh", "-c", "cat >/dev/null"]}}]
        with self.assertRaises(ExecuteError,
                               msg="curling over exec: was accepted") as cm:
            vm.qmp("migrate", channels=channels)
        self.check_refused(vm, "channels exec + curling", str(cm.exception),
                           r"tcp|unix|exec")
        vm.qmp("migrate-set-capabilities",
               capabilities=[{"capability": "curling", "state": False}])

        self.assertEqual(vm.qmp("query-status")["status"], "running")
        ticks = vm.wait_ticks(10, timeout=60, since=mark)
        self.assert_consecutive(vm, vm.ticks(mark))
        self.assert_ticks_ok(vm)
        self.log.info("guest ticked %d..%d meanwhile", ticks[0].n,
                      ticks[-1].n)
        self.assertFalse(leaks, "a refused migrate left the curling "
                         "capability on (the next ordinary migrate becomes "
                         "Curling or is refused) after: " + ", ".join(leaks))

    def test_malformed_uris_receiver(self) -> None:
        """``-incoming`` with a curling: URI that is not tcp: or unix: makes
        QEMU exit with status 1 and an error naming the problem."""
        assert self._tmpdir is not None
        for i, (template, pattern) in enumerate(BAD_URIS.items()):
            uri = template.format(tmp=self._tmpdir)
            try:
                vm = self.launch_vm(f"bad-incoming-{i}", incoming=uri,
                                    append=APPEND)
            except VMDied:
                vm = self.vms[f"bad-incoming-{i}"]
            text = self.assert_clean_exit(vm, pattern, f"-incoming {uri}")
            self.assertIn("-incoming", text,
                          f"-incoming {uri}: the error does not name the "
                          f"option")
        self.assertFalse((self._tmpdir / "curling-file").exists(),
                         "-incoming curling:file: created its file")

    def test_garbage_before_sync(self) -> None:
        """A connection that is not a migration stream (random bytes, or
        closed at once) is refused, and the receiver goes on listening;
        a stream header followed by garbage instead of a first round then
        makes it exit with an error, not crash (nothing is protected
        yet)."""
        _, rng = self.seeded_rng()
        refused = {
            "random bytes": b"\xff" + rng.randbytes(64 * 1024),
            "connection closed at once": b"",
        }
        garbage = QEVM_HEADER + bytes(
            [rng.choice([b for b in range(256) if b != 0x07])]) + \
            rng.randbytes(64 * 1024)
        uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
        vm = self.launch_vm("receiver", incoming=uri, append=APPEND)
        self.assertEqual(curling_info(vm)["role"], "receiver")
        for what, data in refused.items():
            said = len(self.qemu_log(vm))
            self.send_to(uri, data, what)
            wait_until(lambda: "refused a connection" in
                       self.qemu_log(vm)[said:], 30,
                       f"{vm.name} to refuse {what}", 0.1)
            self.log.info("%s: %s", what, self.qemu_log(vm)[said:].strip())
            self.assertTrue(vm.is_running(), f"{what}: the receiver exited")
            self.assertEqual(vm.qmp("query-status")["status"], "inmigrate")
        self.send_to(uri, garbage, "stream header then garbage")
        self.assert_clean_exit(vm, r"(?i)error|fail|invalid|unknown|magic",
                               "garbage after a stream header")

    def send_to(self, uri: str, data: bytes, what: str) -> None:
        """Connect to ``uri``'s port, send ``data`` and close."""
        sock = wait_until(lambda: self.try_connect(uri_port(uri)), 30,
                          f"{uri} to listen")
        try:
            sock.settimeout(10)
            try:
                sock.sendall(data)
            except OSError as exc:  # it may close before all is sent
                self.log.info("%s: sending stopped: %s", what, exc)
        finally:
            sock.close()

    @staticmethod
    def try_connect(port: int) -> Optional[socket.socket]:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=1)
        except OSError:
            return None

    def test_corrupt_checkpoint(self) -> None:
        """A checkpoint with a flipped payload byte is discarded: receiver
        in error, no failover, last good checkpoint kept and runnable."""
        self.spoil_and_check("corrupt", r"(?i)checkpoint \d+ has a wrong "
                             r"checksum|checksum|crc")

    def test_unappliable_checkpoint(self) -> None:
        """A checkpoint with a valid checksum but a broken page record in
        the middle of its RAM is refused before any of it is applied: the
        receiver keeps the last good checkpoint whole, and runs it."""
        self.spoil_and_check("unappliable", r"checkpoint \d+ cannot be "
                             r"applied: .*RAM page flags")

    def test_device_load_fails_at_failover(self) -> None:
        """When the device state of the last committed checkpoint cannot
        be loaded at failover (a section in the middle of it claims a
        version this QEMU does not have), the receiver runs nothing: it
        exits with the error instead of starting a guest whose devices
        are half loaded."""
        _, rng = self.seeded_rng()
        sender, receiver, uri = self.launch_pair(append=APPEND)
        proxy = self.proxy_to(uri, rng)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        # A long interval: the sender is killed before the checkpoint
        # after the spoiled one replaces its device state.  The proxy holds
        # a whole checkpoint (megabytes after 3 s) while it rewrites it:
        # on a loaded machine that can outlast the default curling-timeout
        # on both sides (a silent sender, a late acknowledgement); the
        # kill is seen at once anyway.
        receiver.qmp("migrate-set-parameters", curling_timeout=10000)
        self.protect(sender, receiver, proxy.uri, curling_interval=3000,
                     curling_timeout=10000)
        self.wait_checkpoints(sender, 1)
        c = curling_info(sender)["sequence"]
        proxy.arm_rewrite(break_device_section, min_sequence=c + 1)
        bad = proxy.wait_action(timeout=30)["sequence"]
        wait_until(lambda: curling_info(sender)["sequence"] >= bad, 10,
                   f"checkpoint {bad} to be committed")
        self.assertEqual(curling_info(sender)["sequence"], bad)
        sender.kill(signal.SIGKILL)

        self.assert_clean_exit(
            receiver, rf"loading the device state of checkpoint {bad} "
            r"failed: .*unsupported version", "device state that cannot load")
        self.assertEqual(receiver.ticks(), [],
                         "the receiver ran a guest whose devices did not load")

    def test_garbage_frame(self) -> None:
        """A frame replaced by random bytes is discarded the same way."""
        self.spoil_and_check("garbage", r"(?i)corrupt frame header|frame")

    def test_cut_stream(self) -> None:
        """The connection cut at random points of the frame stream (between
        frames, mid-header, mid-payload, with FIN or reset): the receiver
        fails over from its last committed checkpoint, every time.

        Rounds are chained: the failed-over QEMU protects the guest again
        with a new receiver, so the guest boots once.
        """
        seed, rng = self.seeded_rng()
        plan: list[dict[str, Any]] = [
            {"cut": "header", "type": CHECKPOINT},
            {"cut": "payload", "type": CHECKPOINT},
            {"cut": "before", "type": CHECKPOINT},
            {"cut": "after", "type": CHECKPOINT},
            {"cut": "payload", "type": CHECKPOINT, "rst": True},
            {"cut": "header", "type": HEARTBEAT},
        ]
        rng.shuffle(plan)
        sender, receiver, uri = self.launch_pair(append=APPEND)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        for rnd, step in enumerate(plan, 1):
            label = f"round {rnd}/{len(plan)} (seed {seed})"
            self.cut_round(sender, receiver, uri, step, rng, label)
            sender.kill(signal.SIGKILL)
            if rnd < len(plan):
                sender = receiver
                receiver, uri = self.new_receiver(f"receiver{rnd + 1}",
                                                  sender, append=APPEND)

    def cut_round(self, sender: VM, receiver: VM, uri: str,
                  step: dict[str, Any], rng: random.Random,
                  label: str) -> None:
        start = time.monotonic()
        proxy = self.proxy_to(uri, rng, name=f"proxy-{receiver.name}")
        heartbeat = step["type"] == HEARTBEAT
        # Heartbeats only go out when the interval is longer than a third
        # of curling-timeout.
        interval = 1000 if heartbeat else 100
        self.protect(sender, receiver, proxy.uri, curling_interval=interval)
        self.wait_checkpoints(sender, 2)
        before = sender.last_tick()
        assert before is not None
        c = curling_info(sender)["sequence"]
        mark = receiver.console_mark()
        proxy.arm_cut(step["cut"], frame_type=step["type"],
                      min_sequence=c + (2 if heartbeat else 3) +
                      rng.randrange(3),
                      rst=step.get("rst", False))
        result = proxy.wait_action(timeout=30)
        at_cut = sender.last_tick()
        assert at_cut is not None
        self.log.info("%s: %s: cut %s %d (%d bytes) after %d bytes, %s; "
                      "last whole checkpoint %d; sender's ticks %d..%d",
                      label, step, result["frame_type"], result["sequence"],
                      result["length"], result["cut_at"],
                      "reset" if result["rst"] else "FIN",
                      result["committed"], before.n, at_cut.n)
        self.assertGreaterEqual(result["committed"], c + 2)

        event = receiver.wait_event("CURLING_FAILOVER",
                                    timeout=FAILOVER_DEADLINE)
        self.assertEqual(
            event["data"]["sequence"], result["committed"],
            f"{label}: the receiver did not fail over from the last "
            f"checkpoint it received whole")
        self.assert_resumed(receiver, mark, before.n + 1,
                            at_cut.n + 2 + held_ticks(interval),
                            label)
        self.assertEqual(receiver.qmp("query-status")["status"], "running")
        rinfo = curling_info(receiver)
        self.assertEqual(rinfo["status"], "failed-over")
        self.assertEqual(rinfo["sequence"], result["committed"])

        wait_until(lambda: curling_info(sender)["status"] != "protecting",
                   FAILOVER_DEADLINE, f"{sender.name} to stop protecting")
        self.assertEqual(curling_info(sender)["status"], "error")
        self.assert_ticks_ok(sender)
        self.log.info("%s: done in %.1f s", label, time.monotonic() - start)
