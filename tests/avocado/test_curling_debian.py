# SPDX-License-Identifier: GPL-2.0-or-later
"""A real Debian 12 guest running PostgreSQL and nginx across failovers.

The application guest (``scripts/curlingtool/debimage.py``, built by
``scripts/build.py``) boots with systemd on its own copy of the image on
each side, virtio-blk and virtio-net on the test's bridge.  Transaction
clients and an HTTP download talk to it through the guest's network while
the sender is killed; what they were told must be what the database and
the file system hold afterwards.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import time
from typing import Any, Optional

from curling_test import (REPO_ROOT, CurlingTest, curling_info, event_time,
                          free_tcp_port, wait_until)
from curlingtool.debimage import (MACHINE, MEM, READY, SMP, DebianImage,
                                  GuestError, build_image, copy_image,
                                  disk_args)
from curlingtool.netlab import NetClient
from curlingtool.vm import VM

BOOT_TIMEOUT = 400
#: Transactions clients commit after each failover before the next step
AFTER_FAILOVER = 40


class CurlingDebian(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,debian
    """

    def setUp(self) -> None:
        super().setUp()
        try:
            self.image: DebianImage = build_image(REPO_ROOT)
        except GuestError as exc:
            self.cancel(f"no Debian application guest: {exc}")
        self.log.info("Debian image %s", self.image.directory)

    def disk(self, name: str) -> pathlib.Path:
        """``name``'s own copy of the image, in the test's folder."""
        assert self._tmpdir is not None
        return copy_image(self.image, self._tmpdir / f"{name}.raw")

    def app_args(self, name: str, disk: pathlib.Path) -> list[str]:
        return [*disk_args(disk), *self.nic_args(name)]

    def launch_app(self, name: str, incoming: Optional[str] = None,
                   disk: Optional[pathlib.Path] = None) -> VM:
        disk = disk or self.disk(name)
        return self.launch_vm(name, incoming=incoming, mem=MEM,
                              machine=MACHINE, smp=SMP, append="",
                              extra_args=self.app_args(name, disk),
                              netns=True, guest=self.image,
                              cmdline=self.image.append)

    def app_client(self, mode: str, *extra: str,
                   connections: int = 1) -> NetClient:
        status = self.logdir_path / f"app-{mode}-{time.monotonic_ns()}.json"
        return NetClient(self.netlab(), mode, status, connections,
                         module="curlingtool.appclient", extra=extra)

    def wait_acked(self, client: NetClient, more: int,
                   timeout: float = 120.0) -> dict[str, Any]:
        start = client.status().get("acked", 0)

        def done() -> Optional[dict[str, Any]]:
            st = client.status()
            if st.get("fatal") or st.get("errors"):
                raise AssertionError(f"transaction client: {st.get('fatal')} "
                                     f"{st.get('errors')}")
            return st if st.get("acked", 0) >= start + more else None

        return wait_until(done, timeout, f"{more} more transactions", 0.2)

    @staticmethod
    def wait_done(client: NetClient, timeout: float,
                  what: str) -> dict[str, Any]:
        """``client``'s final status, once it has stopped by itself."""
        def done() -> Optional[dict[str, Any]]:
            st = client.status()
            return st if st.get("done") else None

        return wait_until(done, timeout, what, 0.5)

    def check_database(self, states: list[dict[str, Any]]) -> dict[str, Any]:
        """What the guest's database holds, checked against what the
        transaction clients were told (appclient ``check``)."""
        path = self.logdir_path / f"states-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(states))
        checker = self.app_client("check", "--states", str(path),
                                  "--wait", "120")
        st = self.wait_done(checker, 180, "the database check")
        checker.stop()
        self.assertEqual(st["fatal"], [], "database check")
        self.assertEqual(st["errors"], [], "database check")
        return st

    def kill(self, sender: VM, receiver: VM, hold: float, label: str) -> None:
        """kill -9 the sender ``hold`` s after a fresh commit; the receiver
        must take over from a checkpoint no older than the last the sender
        saw committed, and run."""
        committed = self.wait_checkpoints(sender, 2)["sequence"]
        time.sleep(hold)
        info = curling_info(sender)
        self.assertEqual(info["status"], "protecting",
                         f"{label}: the sender stopped protecting")
        committed = max(committed, info["sequence"])
        t_kill = time.time()
        sender.kill(signal.SIGKILL)
        event = receiver.wait_event("CURLING_FAILOVER", timeout=30)
        self.log.info("%s: sender killed after %.2f s (committed %d; %d "
                      "checkpoints, %d started by output, mean %.1f MB of "
                      "which disk %.2f MB, pause %.2f ms, cycle %.2f ms, "
                      "released %d packets); resumed seq %d after %.3f s",
                      label, hold, committed, info["checkpoints"],
                      info["output-checkpoints"], info["mean-bytes"] / 1e6,
                      info.get("disk-mean-bytes", 0) / 1e6,
                      info.get("mean-pause", 0), info.get("mean-duration", 0),
                      info["released-packets"], event["data"]["sequence"],
                      event_time(event) - t_kill)
        self.assertGreaterEqual(event["data"]["sequence"], committed)
        self.assertEqual(receiver.qmp("query-status")["status"], "running")

    def test_postgres_and_http_survive_kills(self) -> None:
        """Eight connections commit transactions and an HTTP download runs
        while the sender is killed (kill -9, at a random moment) in chained
        rounds (``CURLING_DEBIAN_ROUNDS``, default 2), the old receiver becoming the
        sender.  Every acknowledged transaction is in the database, none
        that was never attempted, counters match; no connection broke and
        the postmaster is the same process; the download arrives whole.
        After a clean power-off the survivor's file system is clean and
        boots again with the same data."""
        rounds = int(os.environ.get("CURLING_DEBIAN_ROUNDS", "2"))
        seed, rng = self.seeded_rng()
        sender_disk = self.disk("sender")
        sender = self.launch_app("sender", disk=sender_disk)
        started = time.monotonic()
        sender.wait_console(READY, timeout=BOOT_TIMEOUT)
        self.log.info("the Debian guest booted in %.0f s",
                      time.monotonic() - started)
        disks = {"sender": sender_disk}

        pg = self.app_client("pg", "--wait", "120", connections=8)
        self.wait_acked(pg, 50)
        http: Optional[NetClient] = None
        for rnd in range(1, rounds + 1):
            label = f"round {rnd}/{rounds} (seed {seed})"
            name = "receiver" if rnd == 1 else f"receiver{rnd}"
            disks[name] = self.disk(name)
            uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
            receiver = self.launch_app(name, incoming=uri, disk=disks[name])
            t0 = time.monotonic()
            self.protect(sender, receiver, uri, timeout=600,
                         curling_interval=100)
            self.log.info("%s: protecting after %.1f s", label,
                          time.monotonic() - t0)
            if http is None:
                # 64 MiB at 4 MB/s: the download spans the kill below
                http = self.app_client("http", "--rate", str(4e6))
                wait_until(lambda: http.status().get("bytes"), 60,
                           "the HTTP download to start", 0.2)
            self.wait_acked(pg, 20)
            before = pg.status()
            self.kill(sender, receiver, rng.uniform(0.5, 4.0), label)
            after = self.wait_acked(pg, AFTER_FAILOVER)
            self.log.info("%s: %d transactions acknowledged before the kill, "
                          "%d now; longest wait %.2f s; HTTP %d bytes",
                          label, before.get("acked", 0), after["acked"],
                          max(c["max_gap"] for c in after["clients"]),
                          http.status().get("bytes", 0))
            sender = receiver

        final = pg.stop(timeout=60)
        self.assertEqual(final["fatal"], [], "transaction client")
        self.assertEqual(final["errors"], [], "transaction client")
        for c in final["clients"]:
            self.assertEqual(c["postmaster_start"], c["postmaster_end"],
                             f"client {c['client']}: the postmaster "
                             "restarted")
        checked = self.check_database(final["clients"])
        self.log.info("database: %d rows, %d acknowledged, no problem",
                      checked["rows"], final["acked"])

        assert http is not None
        st = self.wait_done(http, 120, "the HTTP download")
        http.stop()
        self.assertEqual(st["errors"], [], "HTTP download")
        self.assertTrue(st.get("complete"), f"HTTP download: {st}")
        self.assertEqual(st.get("sha256"), self.image.big_file_sha256,
                         "the downloaded file differs")

        # A clean power-off, the file system checked, booted again
        survivor = sender
        survivor.qmp("system_powerdown")
        wait_until(lambda: not survivor.is_running(), 180,
                   "the guest to power off", 0.5)
        survivor_disk = disks[survivor.name]
        self.assert_fsck_clean(survivor_disk, "the survivor's image")
        again = self.launch_app("again", disk=survivor_disk)
        again.wait_console(READY, timeout=BOOT_TIMEOUT)
        self.check_database(final["clients"])
        again.qmp("system_powerdown")
        wait_until(lambda: not again.is_running(), 180,
                   "the guest to power off again", 0.5)
