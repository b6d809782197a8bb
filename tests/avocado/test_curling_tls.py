# SPDX-License-Identifier: GPL-2.0-or-later
"""Curling over TLS, and who may connect to a receiver.

A receiver takes its sender's connection only: with ``tls-creds`` the
sender must complete a TLS handshake with a certificate of the receiver's
CA that ``tls-authz`` allows; every other connection (a stranger's
certificate, a plain client, anyone once a sender is connected) is
refused before a byte of guest state is read, and the receiver goes on
waiting for its sender, then is protected as if nothing had happened.
Every check ends in what users see: the guest's ticks and memory
self-check, the receiver's events (never a ``CURLING_FAILOVER`` that
was not earned), the errors both sides report.

``CURLING_SEED`` replays the random choices of a run (logged).
"""

from __future__ import annotations

import pathlib
import signal
import socket
import ssl
import struct
import time
from typing import Optional

from curling_test import (VM, CurlingTest, curling_info, uri_port,
                          wait_until)
from curlingtool import tlscerts

#: Seconds from QEMU start to a ticking guest.
BOOT_DEADLINE = 120.0
#: Seconds a refused sender gets to report its failed migration.
REFUSE_DEADLINE = 30.0
#: Seconds from a cut connection to CURLING_FAILOVER.
FAILOVER_DEADLINE = 10.0

APPEND = "curling.mode=dirty curling.rate=4"

#: Magic numbers that would show in a plain stream: the first round's
#: (QEMU_VM_FILE_MAGIC) and Curling's frames' ("CURL").
PLAIN_MAGICS = (struct.pack(">I", 0x5145564D), b"CURL")


class CurlingTlsBase(CurlingTest):
    """Helpers of the TLS tests.

    :avocado: disable
    """

    def tls_pair(self, strangers: tuple[str, ...] = (),
                 receiver_tls: bool = True) -> tuple[VM, VM, str]:
        """A sender and a receiver with this test's credentials
        (``self.pki``), TLS on both sides (on the receiver only with
        ``receiver_tls``).  The receiver also holds client credentials
        (``tls1``) to protect its guest again after a failover."""
        self.pki = self.tls_pki()

        def side(name: str) -> list[str]:
            if name == "receiver":
                return self.tls_args(self.pki, "receiver", other=True)
            return self.tls_args(self.pki, "sender", strangers=strangers)

        sender, receiver, uri = self.launch_pair(append=APPEND,
                                                 side_args=side)
        self.use_tls(sender, "sender")
        if receiver_tls:
            self.use_tls(receiver, "receiver")
        return sender, receiver, uri

    def assert_waiting(self, receiver: VM, what: str) -> None:
        """``receiver`` still waits for its sender: no guest, no failover,
        the monitor answers."""
        self.assertEqual(receiver.qmp("query-status")["status"], "inmigrate",
                         f"after {what}: the receiver left inmigrate")
        self.assertEqual(self.failovers(receiver), [],
                         f"after {what}: the receiver failed over")
        self.assertEqual(receiver.ticks(), [],
                         f"after {what}: the receiver ran a guest")
        self.assertIn(curling_info(receiver)["status"], ("none", "setup"),
                      f"after {what}")

    def refused_migrate(self, sender: VM, uri: str, what: str) -> str:
        """``migrate`` from ``sender`` to ``uri`` fails; the error it
        reports.  Its guest runs on, unprotected."""
        sender.qmp("migrate", uri=uri)

        def ended() -> Optional[dict]:
            info = sender.qmp("query-migrate")
            return info if info.get("status") in ("failed", "cancelled",
                                                  "completed") else None

        info = wait_until(ended, REFUSE_DEADLINE,
                          f"migrate with {what} to end", 0.1)
        self.log.info("%s: sender: %s", what, info)
        self.assertEqual(info["status"], "failed",
                         f"{what}: the migration was not refused")
        self.assertEqual(sender.qmp("query-status")["status"], "running",
                         f"{what}: the sender's guest stopped")
        return info.get("error-desc", "")

    def receiver_said(self, receiver: VM, offset: int, what: str) -> str:
        """What ``receiver`` logged after ``offset``, once it logged."""
        wait_until(lambda: len(self.qemu_log(receiver)) > offset, 10,
                   f"the receiver to report {what}", 0.1)
        time.sleep(0.2)     # the rest of the message
        return self.qemu_log(receiver)[offset:].strip()

    def tls_stranger(self, port: int, folder: pathlib.Path) -> str:
        """Connect to ``port`` over TLS with the client credentials in
        ``folder``, trusting this test's CA; if the handshake goes
        through, send the start of a migration stream.  Returns how it
        ended; the receiver must have closed the connection."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(self.pki.ca.cert)
        ctx.load_cert_chain(folder / "client-cert.pem",
                            folder / "client-key.pem")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(PLAIN_MAGICS[0] + struct.pack(">I", 3))
                    data = tls.recv(1)
                    self.assertEqual(data, b"", "the receiver answered a "
                                     "stranger")
                    return "closed after the handshake"
            except (ssl.SSLError, OSError) as exc:
                return f"{type(exc).__name__}: {exc}"


class CurlingTls(CurlingTlsBase):
    """
    :avocado: tags=arch:x86_64,curling,tls
    """

    def test_tls_pair_survives_kill(self) -> None:
        """A pair protected over TLS: checkpoints flow, nothing of the
        stream is readable on the wire, and kill -9 of the sender fails
        over cleanly; twice, the failed-over QEMU protecting its guest
        again over TLS (with migrate's channels argument)."""
        _, rng = self.seeded_rng()
        sender, receiver, uri = self.tls_pair()
        proxy = self.proxy_to(uri, rng)
        proxy.sample_limit = 8 * 1024 * 1024
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        self.protect(sender, receiver, proxy.uri, curling_interval=100)
        info = self.wait_checkpoints(sender, 30)
        self.log.info("over TLS: %s", info)
        sample = bytes(proxy.sample)
        self.log.info("%d bytes of the stream sampled", len(sample))
        self.assertGreater(len(sample), 1024 * 1024)
        for magic in PLAIN_MAGICS:
            self.assertNotIn(magic, sample[:4096],
                             f"{magic!r} in the clear at the stream's start")
        self.assertFalse(proxy.ready.is_set(),
                         "the proxy read a READY acknowledgement in clear")
        self.kill_round(sender, receiver, hold=rng.uniform(0.0, 1.0),
                        label="TLS round 1")

        # The failed-over QEMU is protected again, over TLS too.
        sender = receiver
        self.use_tls(sender, "sender", creds="tls1")
        receiver, uri = self.new_receiver(
            "receiver2", sender, append=APPEND,
            extra_args=self.tls_args(self.pki, "receiver"))
        self.use_tls(receiver, "receiver")
        # This time in the channels form of migrate, with the capability.
        sender.qmp("migrate-set-capabilities",
                   capabilities=[{"capability": "curling", "state": True}])
        sender.qmp("migrate-set-parameters", max_bandwidth=self.BANDWIDTH,
                   curling_interval=100)
        sender.qmp("migrate", channels=[{
            "channel-type": "main",
            "addr": {"transport": "socket", "type": "inet",
                     "host": "127.0.0.1", "port": str(uri_port(uri))}}])
        for vm in (sender, receiver):
            wait_until(lambda vm=vm: curling_info(vm)["status"] ==
                       "protecting", 120, f"{vm.name} protecting", 0.1)
        self.kill_round(sender, receiver, hold=rng.uniform(0.0, 1.0),
                        label="TLS round 2 (channels)")

    def test_tls_cut_mid_frame(self) -> None:
        """The TLS connection cut at a random byte of the stream (inside a
        TLS record and a frame, FIN or reset): the receiver fails over
        from its last committed checkpoint, as without TLS.  Three
        chained rounds."""
        seed, rng = self.seeded_rng()
        sender, receiver, uri = self.tls_pair()
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        for rnd in range(1, 4):
            label = f"round {rnd}/3 (seed {seed})"
            proxy = self.proxy_to(uri, rng)
            self.protect(sender, receiver, proxy.uri, curling_interval=100)
            # Checkpoints committed from now on have seen this tick.
            before = sender.last_tick()
            assert before is not None
            self.wait_checkpoints(sender, 3)
            committed = curling_info(sender)["sequence"]
            mark = receiver.console_mark()
            rst = rng.random() < 0.5
            proxy.arm_raw_cut(rng.randrange(1, 2 * 1024 * 1024), rst=rst)
            result = proxy.wait_action(timeout=60)
            event = receiver.wait_event("CURLING_FAILOVER",
                                        timeout=FAILOVER_DEADLINE)
            wait_until(lambda: curling_info(sender)["status"] !=
                       "protecting", FAILOVER_DEADLINE,
                       f"{sender.name} to stop protecting")
            sinfo = curling_info(sender)
            self.log.info("%s: cut after %d bytes (%s); sender committed "
                          "%d..%d; receiver failed over from %d", label,
                          result["forwarded"], "reset" if rst else "FIN",
                          committed, sinfo["sequence"],
                          event["data"]["sequence"])
            self.assertGreaterEqual(event["data"]["sequence"], committed,
                                    f"{label}: an older checkpoint")
            self.assertLessEqual(event["data"]["sequence"],
                                 sinfo["sequence"] + 1,
                                 f"{label}: a checkpoint never sent whole")
            self.assertEqual(sinfo["status"], "error")
            self.assert_resumed(receiver, mark, before.n + 1, None, label)
            self.assertEqual(curling_info(receiver)["status"], "failed-over")
            sender.kill(signal.SIGKILL)
            if rnd < 3:
                sender = receiver
                self.use_tls(sender, "sender", creds="tls1")
                receiver, uri = self.new_receiver(
                    f"receiver{rnd + 1}", sender, append=APPEND,
                    extra_args=self.tls_args(self.pki, "receiver",
                                             other=True))
                self.use_tls(receiver, "receiver")

    def test_tls_strangers_refused(self) -> None:
        """With TLS on the receiver, each stranger is refused before
        anything is read: a client with a certificate of another CA, with
        an expired one, a QEMU whose certificate tls-authz does not allow,
        a plain QEMU, a client that connects and says nothing.  The
        receiver keeps waiting, is then protected by its sender, refuses a
        second connection with the sender's own credentials, and fails
        over cleanly on kill -9."""
        sender, receiver, uri = self.tls_pair(strangers=("unauthorized",))
        port = uri_port(uri)
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        self._cleanups.append(silent.close)
        sender.wait_tick(3, timeout=BOOT_DEADLINE)

        # Clients that QEMU itself would not start with (their own
        # certificate is expired, or not of their CA): Python's TLS.
        refused = r"Curling: refused a connection from 127\.0\.0\.1:\d+: "
        for kind, pattern in (("other-ca", refused + r".*known issuer"),
                              ("expired", refused + r".*(expired|not "
                               r"trusted)")):
            what = tlscerts.STRANGERS[kind]
            log_before = len(self.qemu_log(receiver))
            outcome = self.tls_stranger(port, self.pki.stranger(kind))
            said = self.receiver_said(receiver, log_before, what)
            self.log.info("%s: client: %s | receiver: %s", what, outcome,
                          said)
            self.assertRegex(said, pattern,
                             f"{what}: the receiver did not say why")
            self.assert_waiting(receiver, what)

        receiver_says = {
            "unauthorized": refused + r".*authz check for CN=curling-"
                                      r"stranger is denied",
            "plain": refused + r"no TLS handshake, and tls-creds is set",
        }
        for kind, pattern in receiver_says.items():
            what = tlscerts.STRANGERS.get(kind, "a plain QEMU")
            self.use_tls(sender, "sender",
                         creds="" if kind == "plain" else f"tls-{kind}")
            log_before = len(self.qemu_log(receiver))
            error = self.refused_migrate(sender, uri, what)
            self.assertTrue(error.strip(), f"{what}: no error on the sender")
            said = self.receiver_said(receiver, log_before, what)
            self.log.info("%s: sender: %s | receiver: %s", what, error, said)
            self.assertRegex(said, pattern,
                             f"{what}: the receiver did not say why")
            self.assert_waiting(receiver, what)

        # The silent client held no lock: the monitor answered all along.
        # It is refused once the wait for its first bytes is over.
        silent.settimeout(30)
        self.assert_closed(silent, "a silent client")
        self.assertRegex(self.qemu_log(receiver), r"refused a connection "
                         r"from 127\.0\.0\.1:\d+: it sent too little")
        self.assert_waiting(receiver, "a silent client")

        # The sender, with the right credentials, is taken.
        self.use_tls(sender, "sender")
        self.protect(sender, receiver, uri, curling_interval=100)
        self.wait_checkpoints(sender, 5)

        # A second sender with valid credentials is refused at once.
        intruder = self.launch_vm("intruder", append=APPEND,
                                  extra_args=self.tls_args(self.pki,
                                                           "sender"))
        self.use_tls(intruder, "sender")
        seq = curling_info(receiver)["sequence"]
        self.refused_migrate(intruder, uri, "a second sender")
        self.assertRegex(self.qemu_log(receiver),
                         r"refused a connection from 127\.0\.0\.1:\d+: the "
                         r"sender is connected already")
        info = self.wait_checkpoints(sender, 5)
        self.assertGreater(curling_info(receiver)["sequence"], seq)
        self.assertEqual(curling_info(receiver)["status"], "protecting")
        self.assertEqual(self.failovers(receiver), [])
        self.log.info("protection undisturbed: %s", info)
        self.kill_round(sender, receiver, hold=0.3, label="after strangers")

    def test_tls_client_to_plain_receiver(self) -> None:
        """A receiver without TLS refuses a TLS client and a client that
        sends no migration stream, and keeps waiting; it is then
        protected by a plain sender, refuses a second connection while
        protected, and fails over cleanly."""
        _, rng = self.seeded_rng()
        sender, receiver, uri = self.tls_pair(receiver_tls=False)
        sender.wait_tick(3, timeout=BOOT_DEADLINE)
        error = self.refused_migrate(sender, uri, "a TLS client")
        self.log.info("TLS client to a plain receiver: %s", error)
        self.assertRegex(error, r"(?i)tls|handshake|connection|closed|reset")
        wait_until(lambda: "tls-creds is not set" in self.qemu_log(receiver),
                   10, "the receiver to refuse the TLS client", 0.1)
        self.assertRegex(self.qemu_log(receiver),
                         r"refused a connection from 127\.0\.0\.1:\d+: a TLS "
                         r"handshake, and tls-creds is not set")
        self.assert_waiting(receiver, "a TLS client")

        with socket.create_connection(("127.0.0.1", uri_port(uri)),
                                      timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\n" + rng.randbytes(4096))
            self.assert_closed(sock, "a client with garbage")
        self.assertRegex(self.qemu_log(receiver),
                         r"refused a connection from 127\.0\.0\.1:\d+: not a "
                         r"migration stream")
        self.assert_waiting(receiver, "a client with garbage")

        self.use_tls(sender, "sender", creds="")
        self.protect(sender, receiver, uri, curling_interval=100)
        self.wait_checkpoints(sender, 5)
        seq = curling_info(receiver)["sequence"]
        with socket.create_connection(("127.0.0.1", uri_port(uri)),
                                      timeout=10) as sock:
            # What a second sender would send first
            try:
                sock.sendall(struct.pack(">II", 0x5145564D, 3) +
                             rng.randbytes(4096))
            except OSError:
                pass
            self.assert_closed(sock, "a second connection")
        self.assertRegex(self.qemu_log(receiver),
                         r"refused a connection from 127\.0\.0\.1:\d+: the "
                         r"sender is connected already")
        self.wait_checkpoints(sender, 5)
        self.assertGreater(curling_info(receiver)["sequence"], seq)
        self.assertEqual(self.failovers(receiver), [])
        self.kill_round(sender, receiver, hold=0.3, label="after strangers")
