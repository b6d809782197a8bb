# SPDX-License-Identifier: GPL-2.0-or-later
"""Curling failover: the receiver takes over from the last committed
checkpoint when the sender dies or goes silent.

Every test checks the guest's own view: the tick counter it prints on its
serial console must go on from a point no older than the last committed
checkpoint and no newer than what the sender had reached, one by one, and
its memory self-check (``check=ok``) must never see a state that mixes two
points in time.
"""

from __future__ import annotations

import os
import random
import re
import signal
import time

from curling_test import (FAILOVER_DEADLINE, TICKS_AFTER_FAILOVER,
                          CurlingTest, curling_info, event_time, held_ticks,
                          wait_until)

#: Seconds from QEMU start to a ticking guest.
BOOT_DEADLINE = 120.0

TICK_NUMBER_RE = re.compile(r"curling: tick=(\d+)")


class CurlingFailoverBase(CurlingTest):
    """Helpers shared by the failover tests.

    :avocado: disable
    """

    APPEND = "curling.mode=dirty curling.rate=4"


class CurlingFailover(CurlingFailoverBase):
    """
    :avocado: tags=arch:x86_64,curling,failover
    """

    ROUNDS = 10

    def test_kill_rounds(self) -> None:
        """kill -9 the sender at random moments, round after round; every
        time the receiver goes on from the last committed checkpoint.

        Rounds are chained: the failed-over QEMU protects the guest again
        with a new receiver, so the guest boots once. ``CURLING_SEED``
        replays a run.
        """
        seed = int(os.environ.get("CURLING_SEED", time.time_ns() % 2**32))
        self.log.info("random seed %d (set CURLING_SEED=%d to replay)",
                      seed, seed)
        rng = random.Random(seed)

        sender, receiver, uri = self.launch_pair(append=self.APPEND)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        results = []
        for rnd in range(1, self.ROUNDS + 1):
            label = f"round {rnd}/{self.ROUNDS} (seed {seed})"
            start = time.monotonic()
            self.protect(sender, receiver, uri)
            self.log.info("%s: %s protects the guest to %s after %.1f s",
                          label, sender.name, receiver.name,
                          time.monotonic() - start)
            results.append(self.kill_round(sender, receiver,
                                           rng.uniform(0.3, 2.5), label))
            if rnd < self.ROUNDS:
                sender = receiver
                receiver, uri = self.new_receiver(f"receiver{rnd + 1}",
                                                  sender, "pc", self.APPEND)

        times = sorted(r.failover_s for r in results)
        self.log.info("failover after kill: min %.3f s, median %.3f s, "
                      "max %.3f s", times[0], times[len(times) // 2],
                      times[-1])

    def test_kill_heavy_dirtying(self) -> None:
        """A guest rewriting 100 MiB/s of distinct pages: the sender copies
        each checkpoint in several live passes, each after a new dirty
        bitmap synchronisation, and a kill -9 still finds the receiver at
        the last committed checkpoint with every page right (the guest's
        self-check covers its whole 64 MiB buffer every second)."""
        append = "curling.mode=dirty curling.rate=100 curling.mb=64"
        trace = ["-trace", "curling_live_phase"]
        sender, receiver, uri = self.launch_pair(append=append,
                                                 extra_args=trace)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        for rnd in range(1, 4):
            self.protect(sender, receiver, uri, curling_interval=200)
            self.wait_checkpoints(sender, 5)
            passes = re.findall(r"curling_live_phase pass (\d+)",
                                sender.qemu_log_path.read_text(errors="replace"))
            self.assertIn("1", passes,
                          f"{sender.name} never needed a second live pass: "
                          "the guest does not dirty fast enough for this test")
            self.kill_round(sender, receiver, 0.3 + 0.4 * rnd, f"round {rnd}/3")
            if rnd < 3:
                sender = receiver
                receiver, uri = self.new_receiver(f"receiver{rnd + 1}", sender,
                                                  "pc", append, trace)

    def test_kill_mid_transfer(self) -> None:
        """kill -9 while a checkpoint is on the wire: the receiver drops
        the partial checkpoint and resumes from the last committed one."""
        # A checkpoint holds what the guest dirtied in interval + duration,
        # and takes size / bandwidth to send: with 6 MiB/s dirtied and
        # 16 MiB/s of bandwidth it settles at ~6 MiB and ~450 ms on the
        # wire.  (A dirty rate above the bandwidth would make checkpoints
        # grow until they hold the whole buffer.)
        append = "curling.mode=dirty curling.rate=6 curling.mb=64"
        sender, receiver, uri = self.launch_pair(append=append)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, uri, curling_interval=500)
        interval = curling_info(sender)["interval"]
        self.assertEqual(interval, 500)

        sender.qmp("migrate-set-parameters", max_bandwidth=16 * 1024 * 1024)
        self.wait_checkpoints(sender, 3)
        durations = []
        sizes = []
        for _ in range(4):
            info = self.wait_checkpoints(sender, 1)
            durations.append(info["last-duration"])
            sizes.append(info["last-bytes"])
        duration = sorted(durations)[len(durations) // 2]
        self.log.info("throttled checkpoints: durations %s ms, sizes %s",
                      durations, sizes)
        self.assertGreater(duration, 150,
                           "checkpoints are too quick to be hit mid-transfer "
                           "(does max-bandwidth apply to checkpoints?)")

        # Kill once the next checkpoint's transfer is well under way but
        # far from its end; retry when a commit slipped in.
        target = interval + 0.4 * duration
        for attempt in range(10):
            # The second commit from now holds a state taken after tick
            # t_seen was printed.
            t_seen = sender.last_tick().n
            prev = curling_info(sender)["checkpoints"]
            info = wait_until(
                lambda: (lambda i: i if i["checkpoints"] >= prev + 2 else
                         None)(curling_info(sender)), 30, "two commits", 0.01)
            committed = info["sequence"]
            time.sleep(max(0.0, (target - info["since-commit"]) / 1000))
            info = curling_info(sender)
            rinfo = curling_info(receiver)
            if (info["sequence"] != committed or
                    rinfo["sequence"] != committed or
                    info["status"] != "protecting"):
                self.log.info("attempt %d: a commit came in first: %s %s",
                              attempt, info, rinfo)
                continue
            if info["since-commit"] < interval + 100:
                self.log.info("attempt %d: too early: %s", attempt, info)
                continue
            sender.kill(signal.SIGKILL)
            self.log.info("killed %s %d ms after commit of seq %d (interval "
                          "%d ms, typical duration %d ms)", sender.name,
                          info["since-commit"], committed, interval, duration)
            break
        else:
            self.fail("could not kill the sender between two commits")

        event = receiver.wait_event("CURLING_FAILOVER",
                                    timeout=FAILOVER_DEADLINE)
        self.assertEqual(event["data"]["sequence"], committed,
                         "the receiver did not resume from the last "
                         "committed checkpoint")
        self.assertEqual(curling_info(receiver)["sequence"], committed)
        ticks = receiver.wait_ticks(TICKS_AFTER_FAILOVER, timeout=60)
        last, _ = self.sender_final_tick(sender)
        self.log.info("sender's ticks %d..%d, receiver's first %d", t_seen,
                      last, ticks[0].n)
        self.assertGreaterEqual(ticks[0].n, max(t_seen, last) + 1)
        self.assertLessEqual(ticks[0].n, last + 2 +
                             held_ticks(curling_info(receiver)["interval"]))
        self.assert_consecutive(receiver, ticks)
        self.assert_ticks_ok(receiver)
        self.assert_ticks_ok(sender)

    def test_silent_sender(self) -> None:
        """A stopped (SIGSTOP) sender says nothing: the receiver takes over
        after curling-timeout, not before."""
        timeout_ms = 2000
        sender, receiver, uri = self.launch_pair(append=self.APPEND)
        receiver.qmp("migrate-set-parameters", curling_timeout=timeout_ms)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, uri, curling_timeout=timeout_ms)
        self.assertEqual(curling_info(receiver)["timeout"], timeout_ms)

        before = sender.last_tick()
        assert before is not None
        info = self.wait_checkpoints(sender, 2)
        t_stop = time.time()
        os.kill(sender.pid, signal.SIGSTOP)
        self.log.info("SIGSTOP to %s (pid %d), committed seq %d",
                      sender.name, sender.pid, info["sequence"])
        try:
            event = receiver.wait_event("CURLING_FAILOVER",
                                        timeout=timeout_ms / 1000 + 20)
            silent_s = event_time(event) - t_stop
            self.log.info("failover %.3f s after SIGSTOP (timeout %d ms), "
                          "seq %d", silent_s, timeout_ms,
                          event["data"]["sequence"])
            self.assertGreaterEqual(
                silent_s, 0.8 * timeout_ms / 1000,
                "the receiver failed over before curling-timeout")
            self.assertLessEqual(
                silent_s, timeout_ms / 1000 + 3,
                "the receiver took far longer than curling-timeout")
            self.assertGreaterEqual(event["data"]["sequence"],
                                    info["sequence"])
            self.assert_took_over(sender, receiver, before)
            self.assertEqual(receiver.qmp("query-status")["status"],
                             "running")
        finally:
            sender.kill(signal.SIGKILL)

    def test_failover_q35(self) -> None:
        """One kill round on q35, whose receiver reloads the device state
        of the ICH9 chipset at every checkpoint."""
        sender, receiver, uri = self.launch_pair(machine="q35",
                                                 append=self.APPEND)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, uri)
        self.wait_checkpoints(sender, 10)
        self.kill_round(sender, receiver, 1.0, "q35")
