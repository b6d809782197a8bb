# SPDX-License-Identifier: GPL-2.0-or-later
"""Network output commit: nothing the guest sends leaves the sender before
the checkpoint that produced it is committed.

The guest runs ``curling-netserve`` behind a NIC on a tap of a bridge in a
private network namespace; each QEMU has its own tap, the guest the same
MAC on both. Clients inside the namespace check, as a user's program
would, that what they received was never contradicted by the guest that
took over: a TCP stream whose lines parse and count up one by one, replies
whose numbers never repeat, datagrams whose numbers only go up.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time

from qemu.qmp import ExecuteError

from curling_test import (GUEST_MAC, VM, CurlingTest, NetClient,
                          WaitTimeout, curling_info, free_tcp_port,
                          netdev_args, wait_until)
from curlingtool.vm import parse_ticks

#: Seconds from QEMU start to a guest that serves.
BOOT_DEADLINE = 120.0
#: Items a client must receive to count a service as flowing.
FLOWING = 30


class ConsoleReader:
    """A client of a chardev socket that reads everything it is sent."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port),
                                                     timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(0.2)
        self._data = bytearray()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not chunk:
                return
            with self._lock:
                self._data += chunk

    def text(self) -> str:
        with self._lock:
            return self._data.decode(errors="replace").replace("\r", "")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


class CurlingNetwork(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,network
    """

    ROUNDS = 3

    def kill_rounds(self, mode: str, connections: int = 1,
                    model: str = "virtio-net-pci",
                    rounds: int = ROUNDS) -> dict:
        """Protect the serving guest, kill -9 the sender at a random
        moment, let the receiver take over; ``rounds`` times, chained.
        The client of ``mode`` runs throughout; returns its final status
        after checking that it saw no error."""
        seed = int(os.environ.get("CURLING_SEED", time.time_ns() % 2**32))
        self.log.info("random seed %d (set CURLING_SEED=%d to replay)",
                      seed, seed)
        rng = random.Random(seed)
        lab = self.netlab()
        sender, receiver, uri = self.launch_net_pair(model)
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        client = self.net_client(mode, connections)
        self.wait_client(client, FLOWING)
        for rnd in range(1, rounds + 1):
            label = f"{mode} round {rnd}/{rounds} (seed {seed})"
            started = time.monotonic()
            self.protect(sender, receiver, uri)
            protected = time.monotonic()
            try:
                self.wait_client(client, FLOWING, timeout=60)
            except WaitTimeout:
                self.log.error("%s: output stopped while protecting: sender "
                               "%s; receiver %s; client %s", label,
                               curling_info(sender), curling_info(receiver),
                               client.status())
                raise
            info = curling_info(sender)
            self.log.info("%s: protecting after %.1f s, output flowing %.1f s "
                          "later; %d checkpoints (%d by output), held %d, "
                          "released %d, dropped %d, release delay max %s ms",
                          label, protected - started,
                          time.monotonic() - protected, info["checkpoints"],
                          info.get("output-checkpoints", -1),
                          info.get("held-packets", -1),
                          info.get("released-packets", -1),
                          info.get("dropped-packets", -1),
                          info.get("release-delay-max"))
            self.kill_round(sender, receiver, rng.uniform(0.2, 2.0), label)
            tap = f"tap-{receiver.name}"[:15]
            wait_until(lambda: lab.fdb_port(GUEST_MAC) == tap, 10,
                       f"the bridge to learn the guest's MAC on {tap}", 0.1)
            st = self.wait_client(client, FLOWING, timeout=60)
            self.log.info("%s: client %d items, longest gap %.3f s, "
                          "errors %s", label, st["items"], st["max_gap"],
                          st["errors"])
            self.assertEqual(st["errors"], [], f"{label}: {mode} client")
            if rnd < rounds:
                sender = receiver
                receiver, uri = self.new_net_receiver(f"receiver{rnd + 1}",
                                                      sender, model)
        st = client.stop()
        self.assertEqual(st["fatal"], [], f"{mode} client")
        self.assertEqual(st["errors"], [], f"{mode} client")
        self.assertEqual(st["error_count"], 0, f"{mode} client")
        return st

    def test_tcp_stream_survives_kill(self) -> None:
        """A TCP stream from the guest goes on across kill -9 failovers
        with no byte lost, repeated or changed; the bridge moves the
        guest's MAC to the receiver's tap by itself."""
        self.kill_rounds("stream")

    def test_request_response_survives_kill(self) -> None:
        """Four connections of requests and replies: after each failover
        no reply repeats or contradicts an earlier one."""
        self.kill_rounds("rr", connections=4)

    def test_udp_no_uncommitted_datagram(self) -> None:
        """No datagram sent in an epoch that was never committed reaches
        the client: sequence numbers only go up across failovers."""
        st = self.kill_rounds("udp")
        self.log.info("datagrams received %d, lost %d", st["items"],
                      st["lost"])

    def test_e1000e_stream_survives_kill(self) -> None:
        """The TCP stream through an emulated e1000e."""
        self.kill_rounds("stream", model="e1000e", rounds=1)

    def holding_stream(self) -> tuple[VM, VM, NetClient]:
        """A TCP stream client of a guest protected with a long interval
        and no output-triggered checkpoint: its output stays held."""
        sender, receiver, uri = self.launch_net_pair()
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        client = self.net_client("stream")
        self.wait_client(client, FLOWING)
        self.protect(sender, receiver, uri, curling_interval=60000,
                     curling_output_delay=600000)
        time.sleep(1.0)
        return sender, receiver, client

    def test_cancel_releases_held_output(self) -> None:
        """With a long interval and no output-triggered checkpoint, output
        stays held; migrate_cancel lets it out, in order, and the guest
        serves on unprotected."""
        sender, receiver, client = self.holding_stream()
        seen = client.status()["items"]
        time.sleep(2.0)
        held = curling_info(sender)
        self.log.info("held: %s", {k: v for k, v in held.items()
                                   if "held" in k or "released" in k})
        self.assertEqual(client.status()["items"], seen,
                         "output left the sender before its checkpoint "
                         "was committed")
        self.assertGreater(held["held-packets"], 0)
        self.assertEqual(held["dropped-packets"], 0)

        sender.qmp("migrate_cancel")
        self.wait_client(client, FLOWING, timeout=30)
        after = curling_info(sender)
        self.assertEqual(after["status"], "cancelled")
        self.assertEqual(after["held-packets"], 0)
        self.assertGreaterEqual(after["released-packets"],
                                held["held-packets"])
        # The receiver keeps the guest paused at the last checkpoint.
        self.assertEqual(receiver.qmp("query-status")["status"], "paused")
        st = client.stop()
        self.assertEqual(st["fatal"], [])
        self.assertEqual(st["errors"], [])

    def test_quit_discards_held_output(self) -> None:
        """``quit`` on a sender that holds output ends protection without
        failover and lets none of the held output out: the receiver keeps
        the guest paused, the client receives nothing more."""
        sender, receiver, client = self.holding_stream()
        seen = client.status()["items"]
        held = curling_info(sender)["held-packets"]
        self.assertGreater(held, 0)
        try:
            sender.qmp("quit")
        except Exception as exc:  # the monitor may go before it answers
            self.log.info("quit: %s", exc)
        wait_until(lambda: not sender.is_running(), 30, "the sender to quit",
                   0.1)
        # Well past curling-timeout: a receiver that took the quit for a
        # crash would have taken over by now.
        time.sleep(3.0)
        st = client.stop()
        status = curling_info(receiver)["status"]
        self.log.info("client saw %d lines before quit (%d packets held), "
                      "%d after; receiver %s", seen, held, st["items"],
                      status)
        self.assertEqual(st["errors"], [])
        self.assertEqual(status, "cancelled",
                         "the receiver took the sender's quit for a crash")
        self.assertEqual(receiver.qmp("query-status")["status"], "paused")
        self.assertEqual(st["items"], seen,
                         "held output left a sender that quit")

    def test_output_limit_starts_checkpoint(self) -> None:
        """A bulk TCP transfer held under a small curling-output-limit
        starts checkpoints early instead of losing packets.

        The client's receive buffer (256 KiB, which Linux doubles) bounds
        the TCP window, hence what the guest can have in flight, between
        half the limit and the limit; output-delay is off, so only the
        limit and the interval (1 s) can start checkpoints, and the limit
        starts nearly all of them.

        The interval is there for the guest's TCP: when the window is
        short at the wrong moment (a client that was not scheduled for
        a while, in a busy CI run), the guest can hold less than half
        the limit in flight, wait past its retransmission timeout and
        fall back to one segment at a time. Only a checkpoint then
        releases what it holds; with no interval the transfer would stall
        for good, as it once did (154 KiB held, nothing released in 5
        s)."""
        sender, receiver, uri = self.launch_net_pair()
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        client = self.net_client("bulk", rcvbuf=256 * 1024)
        self.wait_client(client, 100)
        self.protect(sender, receiver, uri, curling_interval=1000,
                     curling_output_delay=600000,
                     curling_output_limit=448 * 1024)
        before = client.status()["bytes"]
        time.sleep(5.0)
        info = curling_info(sender)
        st = client.stop()
        self.assertGreater(st["bytes"], before, "the transfer stalled")
        self.log.info("bulk: %s; sender: %d checkpoints, %d by the limit, "
                      "%d packets dropped", st, info["checkpoints"],
                      info["limit-checkpoints"], info["dropped-packets"])
        self.assertEqual(st["errors"], [])
        self.assertGreater(info["limit-checkpoints"],
                           info["checkpoints"] // 2,
                           "held output did not start most checkpoints")
        self.assertEqual(info["output-checkpoints"], 0)
        self.assertEqual(info["dropped-packets"], 0)

    def test_unholdable_nic_refused(self) -> None:
        """A NIC whose output a filter cannot see (several queues; vhost
        where /dev/vhost-net exists) is refused at migrate, by name."""
        lab = self.netlab()
        tap = lab.add_tap("tap-mq", multi_queue=True)
        args = netdev_args(tap, model="virtio-net-pci",
                           netdev_opts="queues=2")
        args[-1] += ",mq=on,vectors=6"
        sender = self.launch_vm("sender", append=self.NET_APPEND,
                                extra_args=args, netns=True)
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
        with self.assertRaises(ExecuteError) as cm:
            sender.qmp("migrate", uri=uri)
        self.check_refused(sender, uri, str(cm.exception),
                           r"NIC 'nic0'.*2 queues")
        if not os.path.exists("/dev/vhost-net"):
            self.log.info("no /dev/vhost-net here: vhost not tried")
            return
        sender.kill()
        tap = lab.add_tap("tap-vhost")
        vhost = self.launch_vm("vhost", append=self.NET_APPEND,
                               extra_args=netdev_args(
                                   tap, netdev_opts="vhost=on"),
                               netns=True)
        vhost.wait_tick(2, timeout=BOOT_DEADLINE)
        with self.assertRaises(ExecuteError) as cm:
            vhost.qmp("migrate", uri=uri)
        self.check_refused(vhost, uri, str(cm.exception),
                           r"NIC 'nic0'.*vhost=off")

    def test_serial_console_never_ahead(self) -> None:
        """The guest's serial console on a TCP socket, a client reading
        it all the time, as a log collector would: at each kill -9 of the
        sender the resumed guest's first tick comes after the last one
        the client read, never again a tick the client has seen (what
        the sender's guest printed after its last committed checkpoint
        never reached the client).  The lines the client read count up
        one by one."""
        seed, rng = self.seeded_rng()
        rounds = 2
        for rnd in range(1, rounds + 1):
            label = f"serial round {rnd}/{rounds} (seed {seed})"
            port = free_tcp_port()
            sender = self.launch_vm(
                f"sender{rnd}", console_chardev=f"socket,host=127.0.0.1,"
                f"port={port},server=on,wait=off")
            uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
            receiver = self.launch_vm(f"receiver{rnd}", incoming=uri)
            reader = ConsoleReader(port)
            self._cleanups.append(reader.stop)
            sender.wait_tick(3, timeout=BOOT_DEADLINE)
            self.protect(sender, receiver, uri)
            self.wait_checkpoints(sender, 3)
            time.sleep(rng.uniform(0.3, 2.0))
            mark = receiver.console_mark()
            sender.kill(signal.SIGKILL)
            receiver.wait_event("CURLING_FAILOVER", timeout=60)
            wait_until(lambda: len(parse_ticks(
                receiver.console()[mark:])) >= 3, 60,
                f"ticks on {receiver.name}")
            time.sleep(0.5)     # what the socket still held is read
            reader.stop()
            seen = parse_ticks(reader.text())
            self.assertTrue(seen, "the client read no tick")
            numbers = [t.n for t in seen]
            self.assertEqual(numbers, list(range(numbers[0],
                                                 numbers[-1] + 1)),
                             f"{label}: the client's ticks do not count "
                             f"up one by one")
            first = parse_ticks(receiver.console()[mark:])[0].n
            self.log.info("%s: the client read ticks %d..%d, %s went on "
                          "from tick %d", label, numbers[0], numbers[-1],
                          receiver.name, first)
            self.assertGreater(first, numbers[-1],
                               f"{label}: {receiver.name} printed tick "
                               f"{first} again: the client had read up to "
                               f"{numbers[-1]} before the failover")
            receiver.kill()
