# SPDX-License-Identifier: GPL-2.0-or-later
"""The rules of a protected pair: whose settings are in force, what ends
protection, and who may still connect once the receiver took over.

* The sender's ``curling-interval``, ``curling-timeout`` and
  ``curling-managed`` rule both sides: the receiver applies the values
  the sender carries to it, at ``migrate`` and whenever they change, and
  reports them in ``query-curling``.
* ``migrate_cancel`` ends protection only once the receiver confirmed it:
  a cancel that a partition swallowed is a lost receiver, never a clean
  end (in the managed mode it goes through the witness, and one copy of
  the guest runs on).
* A stranger's connection, made before the sender's, is refused even
  when it speaks only after a failover.

What a user would check: the statuses both sides report, how many copies
of the guest run, the guest's ticks and memory self-check, a TCP client
of the guest, and that QEMU is still there.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from typing import Any, Callable, Optional

from curling_test import MANAGED_TIMEOUT_MS as TIMEOUT_MS
from curling_test import (FAILOVER_DEADLINE, TICKS_AFTER_FAILOVER, VM,
                          CurlingTest, WaitTimeout, curling_info, event_time,
                          uri_port, wait_until)

#: Seconds from QEMU start to a ticking guest.
BOOT_DEADLINE = 120.0
#: Curling statuses of a protection that has not ended.
UNDER_WAY = ("setup", "initial-sync", "protecting", "peer-lost")
#: curling-interval (ms) of the cancel tests: a quiet time between two
#: checkpoints, long enough to partition the link and cancel in it.
INTERVAL_MS = 3000
#: Seconds a receiver waits for a new connection's first bytes
#: (CURLING_SCREEN_TIMEOUT_MS).
SCREEN_S = 10.0

APPEND = "curling.mode=dirty curling.rate=4"
#: Items a client must receive to count a service as flowing.
FLOWING = 30


class CurlingRules(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,rules
    """

    # -- helpers ------------------------------------------------------------

    @staticmethod
    def wait_status(vm: VM, ok: Callable[[str], bool], what: str,
                    timeout: float = 120.0) -> dict[str, Any]:
        """Wait until ``ok`` of ``vm``'s Curling status; its query-curling
        then."""
        def done() -> Optional[dict[str, Any]]:
            info = curling_info(vm)
            return info if ok(info["status"]) else None

        return wait_until(done, timeout, f"{vm.name} {what}", 0.05)

    def wait_ended(self, vm: VM, timeout: float = 15.0) -> dict[str, Any]:
        """Wait until ``vm``'s protection ended; its query-curling then."""
        return self.wait_status(vm, lambda s: s not in UNDER_WAY,
                                "to end protection", timeout)

    def assert_pair_protecting(self, sender: VM, receiver: VM,
                               seconds: float, what: str) -> None:
        """Both sides report ``protecting`` all along ``seconds``, and the
        receiver never takes over."""
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            for vm in (receiver, sender):
                info = curling_info(vm)
                self.assertEqual(
                    info["status"], "protecting",
                    f"{what}: {vm.name} left protecting after "
                    f"{time.monotonic() - start:.1f} s (its timeout "
                    f"{info.get('timeout')} ms, interval "
                    f"{info.get('interval')} ms)")
            time.sleep(0.1)
        self.assertEqual(self.failovers(receiver), [],
                         f"{what}: the receiver took over")

    def assert_ticking(self, vm: VM, since: int, count: int = 10) -> None:
        """``vm``'s guest prints ``count`` more ticks, one by one, ok."""
        ticks = vm.wait_ticks(count, timeout=60, since=since)
        self.assert_consecutive(vm, ticks)
        self.assert_ticks_ok(vm, since=since)

    def log_cancel(self, sender: VM) -> None:
        """Log when, in ``sender``'s checkpoints, the cancel came."""
        info = curling_info(sender)
        self.log.info("migrate_cancel %s ms after the commit of checkpoint "
                      "%s (%s checkpoints started by output); sender %s",
                      info.get("since-commit"), info.get("sequence"),
                      info.get("output-checkpoints"), info["status"])

    @staticmethod
    def side_state(vm: VM) -> str:
        """What ``vm`` runs, for messages."""
        if not vm.is_running():
            return f"{vm.name} gone"
        return (f"{vm.name} {curling_info(vm)['status']}, guest "
                f"{vm.qmp('query-status')['status']}")

    # -- whose settings ----------------------------------------------------

    def test_sender_settings_rule_the_pair(self) -> None:
        """curling-interval 2000 and curling-timeout 5000 set on the sender
        only: the receiver, left at its default timeout of 1000 ms, keeps
        protecting through the sender's 2 s intervals and reports 5000,
        2000 and managed off in query-curling.  Lowered on the sender
        while protecting (1500, 3000), the receiver reports the new values
        within 3 s, keeps protecting, and once the sender stops (SIGSTOP)
        takes over after 1.5 s, not 5 s; the guest ticks on one by one."""
        sender, receiver, uri = self.launch_pair(append=APPEND)
        sender.wait_tick(3, timeout=BOOT_DEADLINE)
        sender.qmp("migrate-set-parameters", max_bandwidth=self.BANDWIDTH,
                   curling_interval=2000, curling_timeout=5000)
        sender.qmp("migrate", uri=uri)
        for vm in (sender, receiver):
            self.wait_status(vm, lambda s: s not in ("none", "setup",
                                                     "initial-sync"),
                             "past the first round")
        self.assert_pair_protecting(sender, receiver, 12.0,
                                    "interval 2000, timeout 5000 on the "
                                    "sender")
        rinfo = curling_info(receiver)
        self.log.info("receiver: %s", rinfo)
        self.assertEqual((rinfo["timeout"], rinfo["interval"]),
                         (5000, 2000), "the receiver does not report the "
                         "sender's curling-timeout and curling-interval")
        self.assertIn("managed", rinfo,
                      "query-curling on the receiver has no managed member")
        self.assertIs(rinfo["managed"], False)

        sender.qmp("migrate-set-parameters", curling_timeout=1500,
                   curling_interval=3000)
        wait_until(lambda: (lambda i: (i["timeout"], i["interval"]) ==
                            (1500, 3000))(curling_info(receiver)), 3.0,
                   "the receiver to report the sender's new timeout 1500 "
                   "and interval 3000", 0.1)
        self.assert_pair_protecting(sender, receiver, 8.0,
                                    "interval 3000, timeout 1500 on the "
                                    "sender")

        before = sender.last_tick()
        assert before is not None
        self.wait_checkpoints(sender, 2, timeout=30)
        mark = receiver.console_mark()
        t_stop = time.time()
        os.kill(sender.pid, signal.SIGSTOP)
        try:
            event = receiver.wait_event("CURLING_FAILOVER", timeout=15)
            silent_s = event_time(event) - t_stop
            self.log.info("failover %.3f s after SIGSTOP (sender's timeout "
                          "1500 ms, was 5000)", silent_s)
            self.assertLessEqual(silent_s, 1.5 + 1.0,
                                 "the receiver waited longer than the "
                                 "sender's curling-timeout of 1500 ms")
            # The last heartbeat may have come a quarter of the timeout
            # before the stop; the receiver's own 1000 ms would be sooner.
            self.assertGreaterEqual(silent_s, 0.7 * 1.5,
                                    "the receiver took over before the "
                                    "sender's curling-timeout")
            self.assert_took_over(sender, receiver, before, since=mark)
        finally:
            sender.kill(signal.SIGKILL)

    # -- migrate_cancel ------------------------------------------------------

    def test_cancel_during_partition_managed(self) -> None:
        """Managed mode, etcd witness: the link partitions between two
        checkpoints and the operator cancels at once on the sender.  The
        receiver never confirms the cancel, so the sender counts it as
        lost and asks the witness: exactly one copy runs on, and the
        guest's TCP client never sees output of the copy that lost."""
        witness = self.witness("etcd")
        pair = self.managed_pair(witness, net=True)
        assert pair.link is not None
        # Checkpoints at the interval only, none started by held output.
        pair.sender.qmp("migrate-set-parameters",
                        curling_interval=INTERVAL_MS,
                        curling_output_delay=INTERVAL_MS)
        client = self.net_client("stream")
        self.wait_client(client, FLOWING)
        self.protect_pair(pair, witness, checkpoints=2)
        self.wait_client(client, FLOWING, timeout=60)

        self.wait_checkpoints(pair.sender, 1, timeout=30)
        pair.link.partition()
        pair.sender.qmp("migrate_cancel")
        t_cut = time.monotonic()
        self.log_cancel(pair.sender)
        try:
            winner = self.outcome(pair)
        except WaitTimeout:
            self.log_decisions(pair)
            self.fail(f"after migrate_cancel in a partition, not one copy: "
                      f"{self.side_state(pair.sender)}; "
                      f"{self.side_state(pair.receiver)}")
        decided = time.monotonic() - t_cut
        pair.link.heal()
        time.sleep(2 * TIMEOUT_MS / 1000)
        self.log_decisions(pair)
        alive = [vm for vm in (pair.sender, pair.receiver)
                 if vm.is_running()]
        self.assertEqual([vm.name for vm in alive],
                         [getattr(pair, winner).name],
                         "not exactly one copy of the guest is left")
        survivor = alive[0]
        self.assertEqual(survivor.qmp("query-status")["status"], "running")
        assert pair.sender_agent is not None
        self.assertTrue(any(f"decision={d}" in line
                            for line in pair.sender_agent.decisions()
                            for d in ("continue", "fence")),
                        "the sender did not go through the witness")
        self.wait_client(client, FLOWING, timeout=60)
        st = client.stop()
        self.log.info("cancel in a partition: %s won after %.2f s; client "
                      "%d lines, longest gap %.3f s", winner, decided,
                      st["items"], st.get("max_gap", -1))
        self.assertEqual(st["errors"], [],
                         "the client saw output of the copy that lost")
        self.assert_ticks_ok(survivor)

    def test_cancel_during_partition_automatic(self) -> None:
        """Automatic mode: the link partitions between two checkpoints and
        the operator cancels at once on the sender.  The sender says the
        receiver did not confirm the end of protection (status error,
        not cancelled) and its guest runs on; the receiver, hearing
        nothing, takes over (two copies: the automatic mode's known
        limit on a partition)."""
        sender, receiver, uri = self.launch_pair(append=APPEND)
        link = self.start_link(uri_port(uri))
        sender.wait_tick(3, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, link.uri,
                     curling_interval=INTERVAL_MS)
        self.wait_checkpoints(sender, 2, timeout=30)

        self.wait_checkpoints(sender, 1, timeout=30)
        link.partition()
        mark = sender.console_mark()
        sender.qmp("migrate_cancel")
        self.log_cancel(sender)
        info = self.wait_ended(sender)
        migrate = sender.qmp("query-migrate")
        self.log.info("sender after the cancel: %s; query-migrate %s",
                      info, migrate)
        self.assertEqual(info["status"], "error",
                         "the sender reports a clean end of protection "
                         "that the receiver never confirmed")
        self.assertIn("did not confirm", migrate.get("error-desc", ""))
        self.assertEqual(sender.qmp("query-status")["status"], "running")
        self.assert_ticking(sender, mark)

        event = receiver.wait_event("CURLING_FAILOVER",
                                    timeout=FAILOVER_DEADLINE)
        self.log.info("receiver took over from sequence %d: two copies "
                      "run, as the automatic mode does on a partition",
                      event["data"]["sequence"])
        self.assert_ticking(receiver, 0)
        link.heal()

    def test_cancel_is_acknowledged(self) -> None:
        """migrate_cancel with the link up: both sides report cancelled,
        the receiver keeps its copy paused for three times
        curling-timeout and never takes over, and the sender's guest
        ticks on."""
        sender, receiver, uri = self.launch_pair(append=APPEND)
        sender.wait_tick(3, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, uri)
        self.wait_checkpoints(sender, 3)
        mark = sender.console_mark()
        sender.qmp("migrate_cancel")
        for vm in (sender, receiver):
            info = self.wait_ended(vm)
            self.assertEqual(info["status"], "cancelled",
                             f"{vm.name} after migrate_cancel: {info}")
        timeout_s = curling_info(receiver)["timeout"] / 1000
        end = time.monotonic() + 3 * timeout_s
        while time.monotonic() < end:
            self.assertFalse(receiver.qmp("query-status")["running"],
                             "the receiver ran its copy after the cancel")
            time.sleep(0.1)
        self.assertEqual(self.failovers(receiver), [],
                         "the receiver took over after migrate_cancel")
        self.assertEqual(receiver.qmp("query-status")["status"], "paused")
        self.assertEqual(receiver.ticks(), [])
        self.assertEqual(sender.qmp("query-status")["status"], "running")
        self.assert_ticking(sender, mark)

    # -- strangers --------------------------------------------------------

    def test_stranger_after_failover(self) -> None:
        """A connection made to the receiver before the sender's, silent
        until the receiver took over, then sending another VM's
        migration stream: the receiver refuses it ("refused a
        connection") and runs the guest on, ticking one by one."""
        # The stranger's VM, saved to a file as a migration stream.
        assert self._tmpdir is not None
        stream = self._tmpdir / "other-vm.mig"
        other = self.launch_vm("other", append=APPEND, extra_args=["-S"])
        other.qmp("migrate-set-parameters", max_bandwidth=self.BANDWIDTH)
        other.qmp("migrate", uri=f"file:{stream}")
        self.wait_migration(other, timeout=60)
        other.kill()
        data = stream.read_bytes()
        self.log.info("the other VM's stream: %d bytes", len(data))

        sender, receiver, uri = self.launch_pair(append=APPEND)
        sender.wait_tick(3, timeout=BOOT_DEADLINE)
        stranger = socket.create_connection(("127.0.0.1", uri_port(uri)),
                                            timeout=10)
        self._cleanups.append(stranger.close)
        t_connect = time.monotonic()
        port = stranger.getsockname()[1]
        self.protect(sender, receiver, uri)
        self.wait_checkpoints(sender, 1)
        mark = receiver.console_mark()
        sender.kill(signal.SIGKILL)
        receiver.wait_event("CURLING_FAILOVER", timeout=FAILOVER_DEADLINE)
        receiver.wait_ticks(2, timeout=30, since=mark)
        elapsed = time.monotonic() - t_connect
        self.log.info("failed over %.1f s after the stranger connected",
                      elapsed)
        self.assertLess(elapsed, SCREEN_S - 1.0,
                        "the failover came too late for this test: the "
                        "receiver waits 10 s only for the stranger's first "
                        "bytes")

        refused = rf"refused a connection from 127\.0\.0\.1:{port}\b"
        try:
            stranger.sendall(data)
        except OSError as exc:      # refused while it was sending
            self.log.info("stranger: %s", exc)
        wait_until(lambda: not receiver.is_running() or
                   re.search(refused, self.qemu_log(receiver)), 10,
                   "the receiver to refuse the stranger", 0.1)
        self.assertTrue(receiver.is_running(),
                        f"the receiver died: "
                        f"{receiver.qemu_output_tail()!r}")
        self.assertRegex(self.qemu_log(receiver), refused)
        self.assert_closed(stranger, "a stranger after the failover")
        self.assertEqual(receiver.qmp("query-status")["status"], "running")
        self.assertEqual(len(self.failovers(receiver)), 1)
        ticks = receiver.wait_ticks(TICKS_AFTER_FAILOVER, timeout=60,
                                    since=mark)
        self.assert_consecutive(receiver, ticks)
        self.assert_ticks_ok(receiver)
        self.assertEqual(curling_info(receiver)["status"], "failed-over")
