# SPDX-License-Identifier: GPL-2.0-or-later
"""Disk replication: the receiver's images are the sender's disks at the
last committed checkpoint.

Each side has its own raw image for each drive. The guest rewrites the
first blocks of its virtio-blk disk one after the other with O_DIRECT and
O_DSYNC and compares them with a version table in its memory
(``curling.diskcheck=vda``): memory and disk restored from one checkpoint
always agree, a disk ahead of or behind memory does not.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import time

from qemu.qmp import ExecuteError

from curling_test import (FAILOVER_DEADLINE, QEMU_IMG, VM, CurlingTest,
                          curling_info, free_tcp_port, wait_until)
from curlingtool.deps import sbin

#: Seconds from QEMU start to a guest that ticks.
BOOT_DEADLINE = 120.0
APPEND = "curling.mode=dirty curling.rate=4 curling.diskcheck=vda"
VIRTIO_BLK = (("disk0", "virtio-blk-pci,drive={drive}"),)
#: One drive of each kind the guest knows: virtio-blk, AHCI, virtio-scsi.
THREE_DRIVES = VIRTIO_BLK + (
    ("sata0", "ide-hd,drive={drive},bus=ahci0.0"),
    ("scsi0d", "scsi-hd,drive={drive},bus=scsi0.0"))
CONTROLLERS = ("-device", "ahci,id=ahci0", "-device",
               "virtio-scsi-pci,id=scsi0")


#: The guest's ext4 workload, unmounting after FS_SECONDS of guest time.
FS_SECONDS = 60
FS_APPEND = (f"curling.mode=dirty curling.rate=4 curling.fs=vda "
             f"curling.fstime={FS_SECONDS}")
FS_RE = re.compile(r"curling: fs dev=\w+ ops=(?P<ops>\d+) "
                   r"checks=(?P<checks>\d+) files=\d+ check=(?P<check>\w+)")


def fs_reports(vm: VM, since: int = 0) -> list[re.Match[str]]:
    return list(FS_RE.finditer(vm.console()[since:]))


def digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def first_difference(a: pathlib.Path, b: pathlib.Path) -> int:
    """Offset of the first MiB where two images differ, or -1."""
    mib = 1024 ** 2
    with open(a, "rb") as fa, open(b, "rb") as fb:
        offset = 0
        while True:
            ca, cb = fa.read(mib), fb.read(mib)
            if ca != cb:
                return offset
            if not ca:
                return -1
            offset += mib


class CurlingDisk(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,disk
    """

    ROUNDS = 3

    def wait_diskchecks(self, vm: VM, count: int, since: int = 0,
                        timeout: float = 60.0) -> None:
        wait_until(lambda: len(vm.diskchecks(since)) >= count, timeout,
                   f"{count} disk self-checks on {vm.name}")

    def resume_and_fail_over(self, sender: VM, receiver: VM) -> None:
        """Resume the stopped sender's guest, let checkpoints go on, then
        kill -9 the sender: the receiver's guest resumes with its disk and
        memory in agreement."""
        sender.qmp("cont")
        self.wait_checkpoints(sender, 2)
        mark = receiver.console_mark()
        sender.kill(signal.SIGKILL)
        receiver.wait_event("CURLING_FAILOVER", timeout=FAILOVER_DEADLINE)
        self.wait_diskchecks(receiver, 3, since=mark)
        self.assert_diskchecks_ok(receiver, since=mark)
        self.assert_ticks_ok(receiver, since=mark)

    def test_disk_follows_memory_across_kills(self) -> None:
        """The guest writes its disk all the time; kill -9 the sender at
        random moments, three times chained, each new receiver starting
        from an empty image or one full of junk: after every failover the
        disk holds exactly what the resumed memory says it wrote."""
        seed = int(os.environ.get("CURLING_SEED", time.time_ns() % 2**32))
        self.log.info("random seed %d (set CURLING_SEED=%d to replay)",
                      seed, seed)
        rng = random.Random(seed)
        sender, receiver, uri = self.launch_pair(
            append=APPEND, side_args=lambda n: self.disk_args(n, VIRTIO_BLK))
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        self.wait_diskchecks(sender, 2)
        for rnd in range(1, self.ROUNDS + 1):
            label = f"round {rnd}/{self.ROUNDS} (seed {seed})"
            self.protect(sender, receiver, uri)
            mark = receiver.console_mark()
            self.kill_round(sender, receiver, rng.uniform(0.2, 2.0), label)
            self.wait_diskchecks(receiver, 3, since=mark)
            checks = self.assert_diskchecks_ok(receiver, since=mark)
            self.assert_diskchecks_ok(sender, progress=False)
            self.log.info("%s: %s's guest wrote %d blocks, checked %d "
                          "times after the failover", label, receiver.name,
                          checks[-1].writes - checks[0].writes,
                          checks[-1].checks - checks[0].checks)
            if rnd < self.ROUNDS:
                sender = receiver
                name = f"receiver{rnd + 1}"
                receiver, uri = self.new_receiver(
                    name, sender, append=APPEND,
                    extra_args=self.disk_args(name, VIRTIO_BLK,
                                              junk=rnd % 2 == 1))

    def test_block_changes_refused_while_protected(self) -> None:
        """While the guest's drive is replicated, every block operation
        that would make the guest write where Curling does not look, or
        change what the receiver must hold (a mirror, a stream, a commit,
        a resize, a reopen), is refused with an error that names Curling and the
        way out, and the drive stays as it was; a backup works.  A
        failover then resumes a guest whose disk agrees with its memory,
        and once protection ends the drive takes them again."""
        sender, receiver, uri = self.launch_pair(
            append=APPEND, side_args=lambda n: self.disk_args(n, VIRTIO_BLK))
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        self.wait_diskchecks(sender, 2)
        self.protect(sender, receiver, uri)
        root = self.root_node(sender, "disk0")

        target = self.disk_image("target")
        sender.qmp("blockdev-add", driver="raw", node_name="target",
                   file={"driver": "file", "filename": str(target)})
        refused = [
            ("blockdev-mirror", {"job-id": "mirror0", "device": "disk0",
                                 "target": "target", "sync": "full"}),
            ("block-stream", {"job-id": "stream0", "device": "disk0"}),
            ("block-commit", {"job-id": "commit0", "device": "disk0"}),
            ("block_resize", {"device": "disk0",
                              "size": 2 * self.DISK_SIZE}),
            # A new file or backing would change what the guest reads
            ("blockdev-reopen", {"options": [{"driver": "raw",
                                              "node-name": root,
                                              "file": "target"}]}),
        ]
        for command, args in refused:
            with self.assertRaises(ExecuteError,
                                   msg=f"{command} accepted while the drive "
                                       f"is protected") as ctx:
                sender.qmp(command, args)
            message = str(ctx.exception)
            self.log.info("%s refused: %s", command, message)
            self.assertRegex(message, r"Curling.*migrate_cancel",
                             f"{command}: the error does not say why or "
                             f"what to do")
        self.assertEqual(self.root_node(sender, "disk0"), root,
                         "the protected drive's root node changed")

        sender.qmp("blockdev-backup", job_id="backup0", device="disk0",
                   target="target", sync="full")
        event = sender.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        self.log.info("backup while protected: %s", event["data"])
        self.assertNotIn("error", event["data"], "the backup failed")
        self.assertEqual(event["data"]["offset"], self.DISK_SIZE,
                         "the backup did not copy the whole drive")
        self.assertEqual(curling_info(sender)["status"], "protecting")

        mark = receiver.console_mark()
        self.kill_round(sender, receiver, 0.5, "after refusals")
        self.wait_diskchecks(receiver, 3, since=mark)
        self.assert_diskchecks_ok(receiver, since=mark)

        # Protection that ends lifts the refusals.
        sender = receiver
        receiver, uri = self.new_receiver(
            "receiver2", sender, append=APPEND,
            extra_args=self.disk_args("receiver2", VIRTIO_BLK))
        self.protect(sender, receiver, uri)
        sender.qmp("migrate_cancel")
        wait_until(lambda: curling_info(sender)["status"] == "cancelled",
                   30, f"{sender.name} cancelled", 0.1)
        sender.qmp("block_resize", device="disk0", size=2 * self.DISK_SIZE)

    @staticmethod
    def root_node(vm: VM, drive: str) -> str:
        """Node name of the root of ``drive``."""
        for block in vm.qmp("query-block"):
            if block["device"] == drive:
                return block["inserted"]["node-name"]
        raise AssertionError(f"{vm.name} has no drive {drive}")

    def test_images_identical_at_checkpoint_boundary(self) -> None:
        """Three drives (virtio-blk, AHCI, virtio-scsi), the receiver's
        images full of junk at first: with the sender's guest stopped and
        checkpoints going on, every receiver image is byte-identical to the
        sender's; then a failover resumes a guest whose disk agrees."""
        assert self._tmpdir is not None
        tmpdir = self._tmpdir
        sender, receiver, uri = self.launch_pair(
            append=APPEND, extra_args=CONTROLLERS,
            side_args=lambda n: self.disk_args(n, THREE_DRIVES,
                                               junk=n == "receiver"))
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        self.wait_diskchecks(sender, 2)
        self.protect(sender, receiver, uri)
        # Writes through the AHCI and SCSI drives too (the guest only
        # writes its virtio-blk disk).
        for drive, offset in (("sata0", "8M"), ("scsi0d", "16M")):
            sender.qmp("human-monitor-command",
                       command_line=f'qemu-io {drive} "write -P 0x5a '
                                    f'{offset} 192k"')
        self.wait_checkpoints(sender, 2)

        sender.qmp("stop")
        self.wait_checkpoints(sender, 2)
        for drive, _ in THREE_DRIVES:
            mine = tmpdir / f"sender-{drive}.img"
            theirs = tmpdir / f"receiver-{drive}.img"
            self.assertEqual(
                first_difference(mine, theirs), -1,
                f"the receiver's image of {drive} differs from the "
                f"sender's at a checkpoint boundary")
            self.log.info("%s: identical, sha256 %s", drive,
                          digest(mine)[:16])
        info = curling_info(sender)
        self.log.info("checkpoints %d, mean %d bytes (disk %d), max %d "
                      "bytes (disk %d)", info["checkpoints"],
                      info["mean-bytes"], info["disk-mean-bytes"],
                      info["max-bytes"], info["disk-max-bytes"])
        self.assertEqual(info["disk-size"], 3 * self.DISK_SIZE)
        self.assertEqual(info["disk-remaining"], 0,
                         "disk data left to send with the guest stopped")
        self.assertGreaterEqual(info["disk-max-bytes"], 192 * 1024)

        self.resume_and_fail_over(sender, receiver)

    def test_first_round_onto_a_copy(self) -> None:
        """The receiver's image already holds a copy of the sender's disk
        (64 MiB of random data) but for its first 16 MiB and three blocks
        changed further on, and the first round's walk is slowed down
        (8 MiB/s) while it copies those 16 MiB. Meanwhile writes land just
        behind the walk, right where it stands: the walk compares the
        areas after them all the same, so the first round copies only the
        areas that differ and those written; at a checkpoint boundary both
        images are byte-identical; a failover then resumes a guest whose
        disk agrees."""
        assert self._tmpdir is not None
        mib = 1024 ** 2
        images = {n: self._tmpdir / f"{n}-disk0.img"
                  for n in ("sender", "receiver")}
        images["sender"].write_bytes(os.urandom(self.DISK_SIZE))
        shutil.copyfile(images["sender"], images["receiver"])
        with open(images["receiver"], "r+b") as f:
            f.write(os.urandom(self.DIFFERENT_HEAD))
            for offset in (20 * mib + 4096, 40 * mib, self.DISK_SIZE - 4096):
                f.seek(offset)
                f.write(os.urandom(4096))
        self.assertNotEqual(first_difference(images["sender"],
                                             images["receiver"]), -1)
        sender, receiver, uri = self.launch_pair(
            append=APPEND,
            side_args=lambda n: self.disk_args(n, VIRTIO_BLK,
                                               image=images[n]))
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        self.wait_diskchecks(sender, 2)
        sender.qmp("migrate-set-parameters", max_bandwidth=8 * mib)
        sender.qmp("migrate", uri=uri)
        behind = self.write_behind_the_walk(sender)
        self.log.info("wrote just behind the walk at %s MiB",
                      [o // mib for o in behind])
        self.assertTrue(behind, "no write landed behind the walk")
        sender.qmp("migrate-set-parameters", max_bandwidth=self.BANDWIDTH)
        self.wait_protecting(sender, receiver)
        info = curling_info(sender)
        self.log.info("first round: %d of %d bytes of disk copied",
                      info["disk-copied"], info["disk-size"])
        # The areas that differ (the three blocks' are 1 MiB each), and
        # those written meanwhile: the guest's self-check rewrites its
        # first MiB all along the slowed walk (4 MiB of it in one run), and
        # this test wrote 64 KiB behind the walk at most once per MiB of
        # the first 16. A walk knocked off the hash boundaries copies the
        # 48 MiB after them as well.
        self.assertGreaterEqual(info["disk-copied"],
                                self.DIFFERENT_HEAD + 3 * mib)
        self.assertLessEqual(info["disk-copied"],
                             self.DIFFERENT_HEAD + 16 * mib,
                             "the first round copied areas the receiver's "
                             "image already held")

        sender.qmp("stop")
        self.wait_checkpoints(sender, 2)
        self.assertEqual(first_difference(images["sender"],
                                          images["receiver"]), -1,
                         "the receiver's image differs from the sender's at "
                         "a checkpoint boundary")
        self.resume_and_fail_over(sender, receiver)

    #: Bytes at the start of the receiver's image that differ from the
    #: sender's in test_first_round_onto_a_copy.
    DIFFERENT_HEAD = 16 * 1024 ** 2

    def write_behind_the_walk(self, sender: VM) -> list[int]:
        """While the first round walks the first DIFFERENT_HEAD bytes of
        ``sender``'s disk, write the 64 KiB just before each MiB boundary
        the walk has reached (it walks in areas of 1 MiB, and the disk
        still to walk is what remains dirty). Returns the offsets
        written."""
        mib = 1024 ** 2
        written: list[int] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = curling_info(sender)
            if info["status"] not in ("none", "setup", "initial-sync"):
                break
            if "disk-remaining" not in info:
                time.sleep(0.01)
                continue
            walked = info["disk-size"] - info["disk-remaining"]
            boundary = -(-walked // mib) * mib
            if boundary > self.DIFFERENT_HEAD:
                break
            if boundary >= 2 * mib and boundary - 64 * 1024 not in written:
                offset = boundary - 64 * 1024
                sender.qmp("human-monitor-command",
                           command_line=f'qemu-io disk0 "write -P 0x3c '
                                        f'{offset} 64k"')
                written.append(offset)
            time.sleep(0.01)
        return written

    def test_quit_during_first_round(self) -> None:
        """``quit`` on the sender while the first round is copying its
        disk (64 MiB of data, the bandwidth held to 8 MiB/s): QEMU ends
        cleanly, having released the drives the migration was reading
        before it closes them, and the receiver, left with an incomplete
        first round, never starts the guest."""
        assert self._tmpdir is not None
        image = self._tmpdir / "sender-disk0.img"
        image.write_bytes(os.urandom(self.DISK_SIZE))
        sender, receiver, uri = self.launch_pair(
            append=APPEND,
            side_args=lambda n: self.disk_args(
                n, VIRTIO_BLK, image=image if n == "sender" else None))
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        sender.qmp("migrate-set-parameters", max_bandwidth=8 * 1024 ** 2)
        sender.qmp("migrate", uri=uri)
        wait_until(lambda: curling_info(sender).get("disk-copied", 0) > 0, 60,
                   "the first round to copy disk data", 0.02)
        info = curling_info(sender)
        self.log.info("quit at %s: %d of %d bytes of disk copied",
                      info["status"], info["disk-copied"], info["disk-size"])
        self.assertEqual(info["status"], "initial-sync")
        try:
            sender.qmp("quit")
        except Exception as exc:  # the monitor may go before it answers
            self.log.info("quit: %s", exc)
        wait_until(lambda: not sender.is_running(), 60, "the sender to quit")
        log = sender.qemu_log_path.read_text(errors="replace")
        self.assertNotIn("Assertion", log, "the sender crashed as it quit")
        self.assertEqual(sender.exitcode, 0,
                         f"the sender exited with {sender.exitcode}")
        # The receiver fails as an incomplete incoming migration does: it
        # exits, or (still alive) keeps the guest paused
        time.sleep(5)
        if receiver.is_running():
            self.assertNotEqual(receiver.qmp("query-status")["status"],
                                "running", "the receiver started the guest")
        self.log.info("receiver: %s", "alive" if receiver.is_running() else
                      f"exited with {receiver.exitcode}")

    def test_shared_image_refused(self) -> None:
        """Both sides on one image file: the receiver refuses to write it,
        naming the drive; the sender's guest runs on, alone on its disk,
        and no second copy of the guest ever starts."""
        image = self.disk_image("shared")
        sender, receiver, uri = self.launch_pair(
            append=APPEND,
            side_args=lambda n: self.disk_args(n, VIRTIO_BLK, image=image))
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        self.wait_diskchecks(sender, 2)
        sender.qmp("migrate-set-parameters", max_bandwidth=self.BANDWIDTH)
        sender.qmp("migrate", uri=uri)
        wait_until(lambda: sender.qmp("query-migrate").get("status") ==
                   "failed", 60, "the sender's migration to fail")
        self.assertRegex(sender.qmp("query-migrate").get("error-desc", ""),
                         r"the destination refused the drives: cannot write "
                         r"the image of drive 'disk0' \(each side needs its "
                         r"own copy\)")
        wait_until(lambda: not receiver.is_running(), 30,
                   "the receiver to give up")
        log = receiver.qemu_log_path.read_text(errors="replace")
        self.assertRegex(log, r"cannot write the image of drive 'disk0' "
                              r"\(each side needs its own copy\)")
        self.assertNotEqual(receiver.exitcode, 0,
                            "the receiver ended as if nothing went wrong")
        self.assertEqual(sender.qmp("query-status")["status"], "running")
        self.assertNotEqual(curling_info(sender)["status"], "protecting")
        mark = sender.console_mark()
        self.wait_diskchecks(sender, 2, since=mark)
        self.assert_diskchecks_ok(sender)

    def test_receiver_write_error_ends_protection(self) -> None:
        """An I/O error on the receiver's image (a blkdebug rule on a
        region the guest does not use, hit when the host writes there):
        protection ends on both sides, and the receiver, which missed a
        committed write, never starts the guest."""
        assert self._tmpdir is not None
        target = self.disk_image("receiver-disk0")
        mine = self.disk_args("sender", VIRTIO_BLK)
        # Data writes at 32 MiB fail; the first round's zero writes there
        # do not.
        theirs = self.failing_drive_args(target)
        sender, receiver, uri = self.launch_pair(
            append=APPEND,
            side_args=lambda n: mine if n == "sender" else theirs)
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        self.wait_diskchecks(sender, 2)
        self.protect(sender, receiver, uri)
        self.wait_checkpoints(sender, 2)
        mark = sender.console_mark()
        sender.qmp("human-monitor-command",
                   command_line='qemu-io disk0 "write -P 0x11 32M 4k"')
        wait_until(lambda: curling_info(sender)["status"] == "error", 60,
                   "the sender to end protection")
        error = sender.qmp("query-migrate").get("error-desc", "")
        self.log.info("sender: %s", error)
        self.assertIn("protection lost", error)
        wait_until(lambda: not receiver.is_running(), 30,
                   "the receiver to give up")
        log = receiver.qemu_log_path.read_text(errors="replace")
        self.assertRegex(log, r"writing \d+ bytes at 33554432 of drive "
                              r"'disk0' failed: Input/output error")
        self.assertIn("no checkpoint to resume from", log)
        self.assertNotEqual(receiver.exitcode, 0,
                            "the receiver ended as if nothing went wrong")
        self.assertEqual(sender.qmp("query-status")["status"], "running")
        self.wait_diskchecks(sender, 2, since=mark)
        self.assert_diskchecks_ok(sender, since=mark)

    def test_ext4_survives_kill(self) -> None:
        """ext4 on the guest's disk, files created, appended to, renamed
        and deleted all the time, each change fsynced before the guest
        records it: after a kill -9 at a random moment the guest goes on
        and reads back from its disk (page cache dropped) every file it
        had recorded; after it unmounts, ``e2fsck -fn`` finds the
        receiver's image clean."""
        seed = int(os.environ.get("CURLING_SEED", time.time_ns() % 2**32))
        self.log.info("random seed %d (set CURLING_SEED=%d to replay)",
                      seed, seed)
        rng = random.Random(seed)
        assert self._tmpdir is not None
        sender, receiver, uri = self.ext4_pair()
        self.protect(sender, receiver, uri)
        mark = receiver.console_mark()
        self.kill_round(sender, receiver, rng.uniform(0.5, 5.0),
                        f"ext4 (seed {seed})")
        self.check_fs_after_failover(sender, receiver, mark,
                                     self._tmpdir / "receiver-disk0.img")

    def test_snapshots_followed(self) -> None:
        """External snapshots while protected, as a backup tool takes
        them: ``blockdev-snapshot-sync`` (QEMU creates the overlay), then
        ``blockdev-snapshot`` onto an overlay made beforehand, the guest's
        ext4 workload writing all the time.  Both are accepted, protection
        goes on, the base is copied with ``blockdev-backup`` under the
        overlays; after a kill -9 at a random moment the resumed guest
        reads back every file it had recorded and ``e2fsck -fn`` finds
        the receiver's image clean: the writes that went to the overlays
        were replicated."""
        seed, rng = self.seeded_rng()
        assert self._tmpdir is not None
        tmp = self._tmpdir
        sender, receiver, uri = self.ext4_pair()
        self.protect(sender, receiver, uri)
        base = self.root_node(sender, "disk0")
        self.wait_checkpoints(sender, 2)

        sender.qmp("blockdev-snapshot-sync", device="disk0", format="qcow2",
                   snapshot_file=str(tmp / "snap1.qcow2"),
                   snapshot_node_name="snap1")
        self.assertEqual(self.root_node(sender, "disk0"), "snap1")
        time.sleep(rng.uniform(0.0, 2.0))
        overlay = tmp / "snap2.qcow2"
        subprocess.run([str(QEMU_IMG), "create", "-q", "-f", "qcow2",
                        str(overlay), str(self.DISK_SIZE)], check=True)
        sender.qmp("blockdev-add", driver="qcow2", node_name="snap2",
                   backing=None,
                   file={"driver": "file", "filename": str(overlay)})
        sender.qmp("blockdev-snapshot", node="snap1", overlay="snap2")
        self.assertEqual(self.root_node(sender, "disk0"), "snap2")
        # What a backup tool does next: copy the base, now read-only.
        target = self.disk_image("backup")
        sender.qmp("blockdev-add", driver="raw", node_name="backup",
                   file={"driver": "file", "filename": str(target)})
        sender.qmp("blockdev-backup", job_id="backup0", device=base,
                   target="backup", sync="full")
        event = sender.wait_event("BLOCK_JOB_COMPLETED", timeout=60)
        self.assertNotIn("error", event["data"], "the backup failed")
        self.wait_checkpoints(sender, 2)
        info = curling_info(sender)
        self.assertEqual(info["status"], "protecting",
                         f"protection ended at a snapshot: {info}")

        mark = receiver.console_mark()
        self.kill_round(sender, receiver, rng.uniform(0.2, 3.0),
                        f"snapshots (seed {seed})")
        self.check_fs_after_failover(sender, receiver, mark,
                                     tmp / "receiver-disk0.img")

    def ext4_pair(self) -> tuple[VM, VM, str]:
        """A protected pair whose guest runs its ext4 workload on vda."""
        assert self._tmpdir is not None
        tmpdir = self._tmpdir

        def side(name: str) -> list[str]:
            args = self.disk_args(name, VIRTIO_BLK)
            if name == "sender":
                subprocess.run([sbin("mkfs.ext4"), "-q", "-F",
                                str(tmpdir / "sender-disk0.img")],
                               check=True)
            return args

        sender, receiver, uri = self.launch_pair(append=FS_APPEND,
                                                 side_args=side)
        sender.wait_tick(2, timeout=BOOT_DEADLINE)
        wait_until(lambda: len(fs_reports(sender)) >= 2, 60,
                   "the guest's file system workload to run")
        return sender, receiver, uri

    def check_fs_after_failover(self, sender: VM, receiver: VM, mark: int,
                                image: pathlib.Path) -> None:
        """The resumed guest reads back every file it had recorded, its
        memory self-check is clean, and after it unmounts ``e2fsck -fn``
        finds the receiver's ``image`` clean."""
        before = fs_reports(sender)
        self.assertTrue(all(m["check"] == "ok" for m in before),
                        "the file system check failed on the sender")
        wait_until(lambda: "curling: fs unmounted" in
                   receiver.console()[mark:], FS_SECONDS * 4,
                   "the resumed guest to finish and unmount")
        after = fs_reports(receiver, since=mark)
        self.assertGreaterEqual(len(after), 2)
        bad = [m[0] for m in after if m["check"] != "ok"]
        self.assertEqual(bad, [], "the file system check failed after "
                                  "the failover")
        self.assertGreater(int(after[-1]["checks"]),
                           int(after[0]["checks"]))
        self.assertRegex(receiver.console()[mark:],
                         r"curling: fs unmounted ops=\d+ check=ok")
        self.log.info("resumed guest: ops %s..%s, checks %s..%s",
                      after[0]["ops"], after[-1]["ops"], after[0]["checks"],
                      after[-1]["checks"])
        self.assert_ticks_ok(receiver, since=mark)
        receiver.qmp("quit")
        wait_until(lambda: not receiver.is_running(), 30,
                   "the receiver to quit")
        self.assert_fsck_clean(image, "the receiver's image")

    def test_iothread_drive_refused(self) -> None:
        """A writable drive in an I/O thread cannot be replicated: migrate
        is refused, naming the drive, and nothing starts."""
        iothread = ["-object", "iothread,id=io0"]
        writable = self.disk_args("sender", (
            ("disk0", "virtio-blk-pci,drive={drive},iothread=io0"),))
        vm = self.launch_vm("sender", append="curling.mode=idle",
                            extra_args=iothread + writable)
        vm.wait_tick(1, timeout=BOOT_DEADLINE)
        uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
        with self.assertRaises(ExecuteError,
                               msg="migrate with an I/O thread drive was "
                                   "accepted") as cm:
            vm.qmp("migrate", uri=uri)
        self.check_refused(vm, uri, str(cm.exception),
                           r"drive 'disk0' runs in an I/O thread")
