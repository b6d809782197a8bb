# SPDX-License-Identifier: GPL-2.0-or-later
"""The guest's clock keeps real time while protected and across failover."""

from __future__ import annotations

import os
import signal
import time
from typing import Optional

from curling_test import CurlingTest, curling_info, wait_until
from curlingtool.bench import clock_drift_ppm
from curlingtool.vm import VM, parse_clock_page

# What ntpd can slew away (ppm); the guest must keep within it
MAX_DRIFT_PPM = 500
# How far behind real time a failed-over guest may be (ms): the age of
# the last committed checkpoint when it was received, not the wait for
# the sender's silence (curling-timeout, 1000 ms)
MAX_LAG_MS = 100
# How far behind real time the first round may leave the guest (ms):
# nothing of its stop (55 ms here for this guest), only the reading's own
# error (the page is rewritten every 2 ms)
MAX_FIRST_ROUND_LAG_MS = 20


class CurlingClock(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,clock
    """

    @staticmethod
    def read_clock(vm: VM, phys: int) -> tuple[int, float]:
        """The guest's clock at ``phys`` in ``vm``'s memory (guest ns, host
        s)."""
        reading = vm.guest_clock_ns(phys)
        assert reading is not None
        return reading

    def read_written_clock(self, vm: VM, phys: int) -> tuple[int, float]:
        """Like read_clock, once the guest is seen writing its clock page
        (two readings in a row differ): a guest that has just resumed may
        not have rewritten it yet, and its page would then say what the
        checkpoint held however well its clock keeps time."""
        first = self.read_clock(vm, phys)

        def written() -> Optional[tuple[int, float]]:
            reading = self.read_clock(vm, phys)
            return reading if reading[0] != first[0] else None

        reading = wait_until(written, 10, f"{vm.name}'s guest to write its "
                             f"clock page", 0.05)
        self.log.info("%s's guest rewrote its clock page %.0f ms after the "
                      "first reading", vm.name, (reading[1] - first[1]) * 1000)
        return reading

    def assert_lag(self, a: tuple[int, float], b: tuple[int, float],
                   what: str, limit_ms: float) -> None:
        """Across ``what``, from clock reading a to b, the guest's clock
        must fall behind real time by less than ``limit_ms``."""
        lag_ms = ((b[1] - a[1]) - (b[0] - a[0]) / 1e9) * 1000
        self.log.info("across %s the guest's clock fell behind real time by "
                      "%.1f ms", what, lag_ms)
        self.assertLess(lag_ms, limit_ms,
                        f"{what} set the guest's clock back")

    def test_guest_clock_keeps_time(self) -> None:
        """Checkpointed as often as output can start checkpoints (four
        request/response connections, curling-interval 25 ms), the guest's
        monotonic clock keeps real time within 500 ppm, and the first
        round's stop does not set it back.  When the sender
        freezes (SIGSTOP, as a host that dies without closing its
        connections), the receiver takes over once curling-timeout has
        passed; the guest is then behind real time by no more than the age
        of the last checkpoint, not by the timeout, and runs at real speed.
        ``CURLING_CLOCK_SECONDS`` (default 30) sets the measuring window;
        600 is the 10-minute soak."""
        seconds = float(os.environ.get("CURLING_CLOCK_SECONDS", "30"))
        append = self.NET_APPEND + " curling.clock=1"
        sender, receiver, uri = self.launch_net_pair(append=append)
        sender.wait_tick(3, timeout=120)
        phys = wait_until(lambda: parse_clock_page(sender.console()), 60,
                          "the guest's clock page", 0.2)
        client = self.net_client("rr", connections=4)
        self.wait_client(client, 100)
        # The first round stops the guest while it sends the last of its
        # memory: the guest must not lose that time either
        unprotected = self.read_clock(sender, phys)
        self.protect(sender, receiver, uri, curling_interval=25)
        self.wait_checkpoints(sender, 20)

        before = curling_info(sender)
        c0 = self.read_clock(sender, phys)
        self.assert_lag(unprotected, c0, "the first round",
                        MAX_FIRST_ROUND_LAG_MS)
        time.sleep(seconds)
        c1 = self.read_clock(sender, phys)
        after = curling_info(sender)
        drift = clock_drift_ppm(c0, c1)
        rate = (after["checkpoints"] - before["checkpoints"]) / (c1[1] - c0[1])
        by_output = (after["output-checkpoints"]
                     - before["output-checkpoints"])
        self.log.info("protected for %.0f s: %.1f checkpoints/s (%d started "
                      "by output), guest clock %+.0f ppm", c1[1] - c0[1],
                      rate, by_output, drift)
        self.assertGreater(by_output, 0, "no checkpoint started by output")
        self.assertLess(abs(drift), MAX_DRIFT_PPM,
                        f"guest clock drift at {rate:.1f} checkpoints/s")

        # A host that dies without a word: the receiver waits out
        # curling-timeout before it takes over
        c2 = self.read_clock(sender, phys)
        os.kill(sender.pid, signal.SIGSTOP)
        mark = receiver.console_mark()
        wait_until(lambda: self.failovers(receiver), 30, "failover", 0.05)
        sender.kill()
        # Let the resumed guest run a moment
        receiver.wait_ticks(5, timeout=30, since=mark)
        c3 = self.read_written_clock(receiver, phys)
        self.assert_lag(c2, c3, "failover", MAX_LAG_MS)
        time.sleep(10)
        c4 = self.read_clock(receiver, phys)
        drift = clock_drift_ppm(c3, c4)
        self.log.info("after failover: guest clock %+.0f ppm over 10 s", drift)
        self.assertLess(abs(drift), MAX_DRIFT_PPM,
                        "the failed-over guest's clock runs off real time")
        st = client.stop()
        self.assertEqual(st["errors"], [], "rr client")
