# SPDX-License-Identifier: GPL-2.0-or-later
"""Never two live copies: the managed mode, its agents and their witness.

Each QEMU runs with an agent (scripts/agent.py) on a monitor of its own;
the agents decide through a witness (a throw-away etcd on 127.0.0.1, or
the lock-file witness) which side acts when sender and receiver lost each
other. The link between the QEMUs is a proxy process: SIGSTOP on it is a
network partition, both hosts alive and both connections open.

What a user would check: afterwards exactly one QEMU runs the guest, and a
TCP client of the guest reads one consistent stream throughout: output
that the losing side held is never seen.
"""

from __future__ import annotations

import os
import random
import signal
import time

from curling_test import DECISION_DEADLINE
from curling_test import MANAGED_TIMEOUT_MS as TIMEOUT_MS
from curling_test import (CurlingTest, curling_info, event_time,
                          free_tcp_port, wait_until)

#: Items a client must receive to count a service as flowing.
FLOWING = 30


class CurlingArbitration(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,arbitration
    """

    ROUNDS = 3

    # -- partitions ---------------------------------------------------------

    #: The sender's curling-timeout in each round (ms): shorter than the
    #: receiver's, it finds the loss first and tends to win; longer, the
    #: receiver does.
    SENDER_TIMEOUTS = (400, TIMEOUT_MS, 2 * TIMEOUT_MS)

    def partition_rounds(self, kind: str) -> None:
        seed = int(os.environ.get("CURLING_SEED", time.time_ns() % 2**32))
        self.log.info("random seed %d (set CURLING_SEED=%d to replay)",
                      seed, seed)
        rng = random.Random(seed)
        witness = self.witness(kind)
        outcomes = []
        for rnd in range(1, self.ROUNDS + 1):
            tag, vm = str(rnd), f"guest-{rnd}"
            pair = self.managed_pair(witness, tag, vm, net=True)
            sender_timeout = self.SENDER_TIMEOUTS[(rnd - 1) %
                                                  len(self.SENDER_TIMEOUTS)]
            pair.sender.qmp("migrate-set-parameters",
                            curling_timeout=sender_timeout)
            client = self.net_client("stream")
            self.wait_client(client, FLOWING)
            self.protect_pair(pair, witness, tag, vm)
            self.wait_client(client, FLOWING)
            time.sleep(rng.uniform(0, 2))

            pair.link.partition()
            t_cut = time.monotonic()
            winner = self.outcome(pair)
            decided = time.monotonic() - t_cut
            time.sleep(rng.uniform(0.5, 2))
            pair.link.heal()
            time.sleep(2 * TIMEOUT_MS / 1000)
            survivor = self.assert_one_copy(pair, winner)
            self.wait_client(client, FLOWING, timeout=60)
            st = client.stop()
            self.log_decisions(pair)
            self.log.info("%s round %d (sender timeout %d ms): %s won "
                          "after %.2f s; client %d lines, longest gap "
                          "%.3f s", kind, rnd, sender_timeout, winner,
                          decided, st["items"], st.get("max_gap", -1))
            self.assertEqual(st["errors"], [],
                             f"round {rnd}: the client saw output of the "
                             f"copy that lost")
            self.assert_ticks_ok(survivor)
            outcomes.append(winner)
            for side in (pair.sender, pair.receiver):
                side.kill()
        self.log.info("%s partitions: %s", kind, outcomes)

    def test_partition_etcd(self) -> None:
        """Partitions at random moments, etcd witness: each time exactly one
        copy runs on, and the client never sees the other's output."""
        self.partition_rounds("etcd")

    def test_partition_lock_file(self) -> None:
        """The same with the single-host lock-file witness."""
        self.partition_rounds("file")

    # -- a stalled sender -------------------------------------------------

    def test_stopped_sender_never_releases(self) -> None:
        """SIGSTOP the sender past curling-timeout: the receiver takes over;
        SIGCONT: the old sender finds it lost, quits, and the client never
        sees the output it held."""
        witness = self.witness("etcd")
        pair = self.managed_pair(witness, "", "guest", net=True, link=False)
        client = self.net_client("stream")
        self.wait_client(client, FLOWING)
        self.protect_pair(pair, witness, "", "guest")
        self.wait_client(client, FLOWING)
        os.kill(pair.sender.pid, signal.SIGSTOP)
        pair.receiver.wait_event("CURLING_FAILOVER", timeout=30)
        time.sleep(1.0)
        os.kill(pair.sender.pid, signal.SIGCONT)
        wait_until(lambda: not pair.sender.is_running(), DECISION_DEADLINE,
                   "the old sender to fence itself", 0.1)
        self.wait_client(client, FLOWING, timeout=60)
        st = client.stop()
        self.log_decisions(pair)
        self.assertEqual(st["errors"], [],
                         "the client saw output of the stopped sender")
        self.assertTrue(any("decision=fence" in line
                            for line in pair.sender_agent.decisions()))
        self.assert_one_copy(pair, "receiver")

    # -- failover time ----------------------------------------------------

    def test_kill_failover_time(self) -> None:
        """kill -9 of the sender: the receiver's agent wins the etcd
        witness and the guest runs on within curling-timeout + 0.5 s."""
        witness = self.witness("etcd")
        pair = self.managed_pair(witness, "", "guest", link=False)
        self.protect_pair(pair, witness, "", "guest")
        t_kill = time.time()
        pair.sender.kill(signal.SIGKILL)
        event = pair.receiver.wait_event("CURLING_FAILOVER", timeout=30)
        failover = event_time(event) - t_kill
        self.log_decisions(pair)
        self.log.info("failover with the etcd witness: %.3f s (timeout "
                      "%d ms)", failover, TIMEOUT_MS)
        self.assertLess(failover, TIMEOUT_MS / 1000 + 0.5)
        ticks = pair.receiver.wait_ticks(5, timeout=60)
        self.assert_consecutive(pair.receiver, ticks)
        self.assert_ticks_ok(pair.receiver)

    # -- the witness down ---------------------------------------------------

    def test_witness_down(self) -> None:
        """The etcd witness is down when the link partitions: neither side
        acts (the receiver stays paused, the sender's output held); once
        it is back, exactly one does."""
        witness = self.witness("etcd")
        pair = self.managed_pair(witness, "", "guest")
        self.protect_pair(pair, witness, "", "guest")
        self.etcd.stop()
        pair.link.partition()
        for side in (pair.sender, pair.receiver):
            wait_until(lambda side=side: curling_info(side)["status"] ==
                       "peer-lost", DECISION_DEADLINE,
                       f"{side.name} to lose its peer", 0.1)
        time.sleep(3.0)
        for side in (pair.sender, pair.receiver):
            self.assertTrue(side.is_running(), f"{side.name} went away "
                            f"while the witness was down")
            self.assertEqual(curling_info(side)["status"], "peer-lost",
                             f"{side.name} acted without the witness")
        self.assertEqual(pair.receiver.qmp("query-status")["status"],
                         "inmigrate")
        self.etcd.start()
        winner = self.outcome(pair)
        self.log_decisions(pair)
        self.log.info("witness back: %s won", winner)
        pair.link.heal()
        self.assert_one_copy(pair, winner)
        waits = [line for agent in (pair.sender_agent, pair.receiver_agent)
                 for line in agent.decisions() if "decision=wait" in line]
        self.assertTrue(waits, "no agent said it waited for the witness")

    # -- two failovers ------------------------------------------------------

    def test_two_failovers(self) -> None:
        """kill -9 the sender; the receiver's agent takes over and
        protects the guest again, to a standby; kill -9 that one too: the
        standby runs the guest on, its ticks carrying on one by one."""
        witness = self.witness("etcd")
        port = free_tcp_port()
        standby_uri = f"curling:tcp:127.0.0.1:{port}"
        pair = self.managed_pair(witness, "", "guest", link=False,
                                 standby=standby_uri)
        standby = self.launch_side("standby", False, 0, incoming=standby_uri)
        sagent = self.start_agent("standby", "receiver", "C", witness,
                                  vm="guest", peer="B")
        self.protect_pair(pair, witness, "", "guest")

        first = pair.sender.last_tick()
        pair.sender.kill(signal.SIGKILL)
        pair.receiver.wait_event("CURLING_FAILOVER", timeout=30)
        for vm in (pair.receiver, standby):
            wait_until(lambda vm=vm: curling_info(vm)["status"] ==
                       "protecting", 120, f"{vm.name} protecting again", 0.2)
        self.wait_checkpoints(pair.receiver, 3)
        wait_until(lambda: any("decision=armed" in line for line in
                               sagent.decisions()), 30,
                   "the standby's agent to learn the term", 0.1)
        second = pair.receiver.last_tick()
        mark = standby.console_mark()
        pair.receiver.kill(signal.SIGKILL)
        standby.wait_event("CURLING_FAILOVER", timeout=30)
        ticks = standby.wait_ticks(10, timeout=60, since=mark)
        self.log_decisions(pair)
        for line in sagent.decisions():
            self.log.info("C: %s", line.split(" ", 2)[-1])
        self.log.info("ticks: sender at %s, receiver at %s, standby from "
                      "%d", first and first.n, second and second.n,
                      ticks[0].n)
        assert first is not None and second is not None
        self.assertGreater(second.n, first.n)
        self.assertGreater(ticks[0].n, second.n - 1)
        self.assert_consecutive(standby, ticks)
        self.assert_ticks_ok(standby)
