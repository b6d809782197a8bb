# SPDX-License-Identifier: GPL-2.0-or-later
"""What disk replication costs a guest that writes its disk, one run.

The test guest runs a disk load on its virtio-blk disk (``curling.diskload``):
sequential 64 KiB writes offered at 10 and at 50 MiB/s, and 4 KiB random
writes each followed by fdatasync(), back to back. For each load: the guest
unprotected, then protected at each interval (a fresh receiver with its own
empty image each time, protection cancelled after the point), then
unprotected again; the two unprotected windows give the baseline and the
noise. Each side has its own raw image.

With ``colo``, each load also runs under QEMU's COLO with its disk set-up
(docs/COLO-FT.txt): the primary's drive is a quorum whose second child,
added before ``migrate``, replicates every write to the secondary over NBD
(the replication driver), and the secondary keeps its writes in
active/hidden qcow2 overlays over its own raw image. One pair per load,
its checkpoint delay changed for each interval.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import subprocess
import time
from typing import Any, Callable, Iterable, Optional

from .bench import (SectionBench, event_pauses, fmt, percentile,
                    phase_pauses, stop_phases, target, window_mean)
from .vm import VM, free_tcp_port, wait_until

#: name -> kernel command line of the guest's disk load
LOADS: dict[str, str] = {
    "seq-10": "curling.diskload=seq curling.diskrate=10",
    "seq-50": "curling.diskload=seq curling.diskrate=50",
    "fsync-4k": "curling.diskload=fsync",
}
APPEND = "curling.mode=idle"
DISK_SIZE = 128 * 1024 ** 2
#: The COLO variant the disk rows run (TCP_NODELAY on its socket).
COLO_SYSTEM = "colo-nodelay"
SYSTEM_LABELS = {"none": "unprotected", "curling": "Curling",
                 COLO_SYSTEM: "COLO"}
BANDWIDTH = 10 * 1024 ** 3
DISKLOAD_RE = re.compile(
    r"curling: diskload mode=\w+ ops=(?P<ops>\d+) bytes=(?P<bytes>\d+) "
    r"lat_us=(?P<lat>\d+) max_us=(?P<max>\d+)")

#: Targets, at this interval.
TARGET_INTERVAL = 100
TARGET_SEQ_LOAD = "seq-10"
TARGET_SEQ_RATIO = 0.9
TARGET_FSYNC_LOAD = "fsync-4k"
#: fsync latency "unchanged": within the noise of the two unprotected
#: windows, and at least this much.
MIN_LATENCY_TOLERANCE = 0.10


@dataclasses.dataclass
class DiskSample:
    """What the guest reported over one window."""
    mib_s: float
    ops_s: float
    latency_ms: float           # mean, per operation
    latency_max_ms: float


@dataclasses.dataclass
class DiskPoint:
    """One configuration's measurements."""
    load: str
    system: str                 # "none", "curling" or COLO_SYSTEM
    interval: Optional[int]
    mib_s: float
    ops_s: float
    latency_ms: float
    latency_max_ms: float
    checkpoints_per_s: Optional[float] = None
    mean_bytes: Optional[int] = None        # per checkpoint, all of it
    disk_mean_bytes: Optional[int] = None   # per checkpoint, disk data
    pause_ms: Optional[float] = None        # median
    pause_max_ms: Optional[float] = None
    receiver_rss_mb: Optional[float] = None


def parse_diskload(text: str) -> list[tuple[int, int, int, int]]:
    """(ops, bytes, latency sum us, max us since the previous line) of
    every diskload line."""
    return [(int(m["ops"]), int(m["bytes"]), int(m["lat"]), int(m["max"]))
            for m in DISKLOAD_RE.finditer(text)]


def window_sample(lines: list[tuple[int, int, int, int]],
                  seconds: float) -> DiskSample:
    """Rates and latency between the first and the last of ``lines``,
    which span ``seconds``."""
    if len(lines) < 2 or seconds <= 0:
        raise AssertionError("the guest's disk load reported nothing")
    ops = lines[-1][0] - lines[0][0]
    nbytes = lines[-1][1] - lines[0][1]
    lat = lines[-1][2] - lines[0][2]
    return DiskSample(mib_s=nbytes / 1024 ** 2 / seconds,
                      ops_s=ops / seconds,
                      latency_ms=lat / 1000 / ops if ops else 0.0,
                      latency_max_ms=max(m for *_, m in lines[1:]) / 1000)


def rss_mb(pid: int) -> Optional[float]:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class DiskBench(SectionBench):
    """Runs the disk measurements; ``progress`` gets a line per step."""

    PREFIX = "disk"

    def __init__(self, qemu: pathlib.Path, qemu_img: pathlib.Path,
                 *args: Any, **kwargs: Any) -> None:
        super().__init__(qemu, *args, **kwargs)
        self.qemu_img = qemu_img
        self._n = 0

    def image(self, name: str, fmt: str = "raw") -> pathlib.Path:
        path = self.workdir / f"{name}.{'img' if fmt == 'raw' else fmt}"
        path.unlink(missing_ok=True)
        subprocess.run([str(self.qemu_img), "create", "-q", "-f", fmt,
                        str(path), str(DISK_SIZE)], check=True)
        return path

    def launch(self, name: str, load: str,
               incoming: Optional[str] = None) -> VM:
        self._n += 1
        image = self.image(f"disk-{name}")
        # The sender's trace times each pause (Curling's emit no event).
        return self.start_vm(name, f"{APPEND} {LOADS[load]}",
                             ["-drive", f"if=none,id=disk0,file={image},"
                                        "format=raw",
                              "-device", "virtio-blk-pci,drive=disk0",
                              "-trace", "curling_stop_phase"],
                             incoming)

    def sample(self, vm: VM) -> DiskSample:
        start = len(vm.console())
        time.sleep(self.window)
        lines = parse_diskload(vm.console()[start:])
        # Each line is a second apart: the window spans one fewer seconds.
        return window_sample(lines, float(len(lines) - 1))

    def point(self, load: str, system: str, interval: Optional[int],
              s: DiskSample) -> DiskPoint:
        return DiskPoint(load, system, interval, s.mib_s, s.ops_s,
                         s.latency_ms, s.latency_max_ms)

    @staticmethod
    def set_pauses(p: DiskPoint, pauses: list[float]) -> None:
        p.pause_ms = percentile(pauses, 0.5)
        p.pause_max_ms = max(pauses) if pauses else None

    def measure_protected(self, load: str, interval: int,
                          sender: VM) -> DiskPoint:
        uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
        receiver = self.launch(f"receiver{self._n}", load, uri)
        try:
            self.protect(sender, uri, 180, max_bandwidth=BANDWIDTH,
                         curling_interval=interval)
            info0 = sender.qmp("query-curling")
            log_pos = sender.qemu_log_path.stat().st_size
            t0 = time.monotonic()
            p = self.point(load, "curling", interval, self.sample(sender))
            t1 = time.monotonic()
            info1 = sender.qmp("query-curling")
            n = info1["checkpoints"] - info0["checkpoints"]
            p.checkpoints_per_s = n / (t1 - t0)
            if n:
                p.mean_bytes = round(window_mean(info0, info1, "mean-bytes"))
                p.disk_mean_bytes = round(window_mean(info0, info1,
                                                      "disk-mean-bytes"))
            with sender.qemu_log_path.open("rb") as f:
                f.seek(log_pos)
                self.set_pauses(p, phase_pauses(stop_phases(
                    f.read().decode(errors="replace"))))
            p.receiver_rss_mb = rss_mb(receiver.pid)
            self.unprotect(sender)
        finally:
            receiver.kill()
        return p

    # -- COLO -------------------------------------------------------------

    COLO_ARGS = ["-global", "migration.x-colo-nodelay=on"]

    def colo_pair(self, load: str, interval: int) -> tuple[VM, VM]:
        """A COLO primary and secondary, protecting, with the disk set-up
        of docs/COLO-FT.txt."""
        self._n += 1
        n = self._n
        append = f"{APPEND} {LOADS[load]}"
        primary_img = self.image(f"colo{n}-primary")
        primary = self.start_vm(
            f"colo{n}-primary", append,
            ["-drive", "if=none,id=colo-disk0,driver=quorum,"
                       "read-pattern=fifo,vote-threshold=1,"
                       f"children.0.file.filename={primary_img},"
                       "children.0.driver=raw",
             "-device", "virtio-blk-pci,drive=colo-disk0"] + self.COLO_ARGS)
        try:
            parent = self.image(f"colo{n}-parent")
            active = self.image(f"colo{n}-active", "qcow2")
            hidden = self.image(f"colo{n}-hidden", "qcow2")
            port = free_tcp_port()
            secondary = self.start_vm(
                f"colo{n}-secondary", append,
                ["-drive", f"if=none,id=parent0,file.filename={parent},"
                           "driver=raw",
                 "-drive", "if=none,id=childs0,driver=replication,"
                           "mode=secondary,file.driver=qcow2,"
                           "top-id=colo-disk0,"
                           f"file.file.filename={active},"
                           "file.backing.driver=qcow2,"
                           f"file.backing.file.filename={hidden},"
                           "file.backing.backing=parent0",
                 "-drive", "if=none,id=colo-disk0,driver=quorum,"
                           "read-pattern=fifo,vote-threshold=1,"
                           "children.0=childs0",
                 "-device", "virtio-blk-pci,drive=colo-disk0"]
                + self.COLO_ARGS, f"tcp:127.0.0.1:{port}")
        except BaseException:
            primary.kill()
            raise
        try:
            caps = [{"capability": "x-colo", "state": True}]
            nbd_port = free_tcp_port()
            secondary.qmp("migrate-set-capabilities", capabilities=caps)
            secondary.qmp("nbd-server-start", addr={
                "type": "inet",
                "data": {"host": "127.0.0.1", "port": str(nbd_port)}})
            secondary.qmp("nbd-server-add", device="parent0", writable=True)
            wait_until(lambda: len(parse_diskload(primary.console())) >= 3,
                       180, "the guest's disk load", 0.5)
            primary.qmp("human-monitor-command", command_line=(
                "drive_add -n buddy driver=replication,mode=primary,"
                "file.driver=nbd,file.host=127.0.0.1,"
                f"file.port={nbd_port},file.export=parent0,"
                "node-name=replication0"))
            primary.qmp("x-blockdev-change", parent="colo-disk0",
                        node="replication0")
            primary.qmp("migrate-set-capabilities", capabilities=caps)
            primary.qmp("migrate-set-parameters", max_bandwidth=BANDWIDTH,
                        x_checkpoint_delay=interval)
            primary.qmp("migrate", uri=f"tcp:127.0.0.1:{port}")
            wait_until(lambda: primary.qmp("query-migrate").get("status")
                       == "colo", 180, "COLO protection", 0.1)
        except BaseException:
            primary.kill()
            secondary.kill()
            raise
        return primary, secondary

    def measure_colo(self, load: str, interval: int, primary: VM,
                     secondary: VM) -> DiskPoint:
        primary.qmp("migrate-set-parameters", x_checkpoint_delay=interval)
        time.sleep(max(1.0, 2 * interval / 1000))   # the new delay applies
        primary.qmp("query-status")                  # collect old events
        primary.events.clear()
        t0 = time.monotonic()
        p = self.point(load, COLO_SYSTEM, interval, self.sample(primary))
        t1 = time.monotonic()
        primary.qmp("query-status")
        pauses = event_pauses(primary.events)
        p.checkpoints_per_s = len(pauses) / (t1 - t0)
        self.set_pauses(p, pauses)
        p.receiver_rss_mb = rss_mb(secondary.pid)
        return p

    def run_colo(self, intervals: list[int]) -> list[DiskPoint]:
        points: list[DiskPoint] = []
        for load in LOADS:
            primary, secondary = self.colo_pair(load, intervals[0])
            try:
                for interval in intervals:
                    p = self.measure_colo(load, interval, primary, secondary)
                    points.append(p)
                    self.progress(self.describe(p))
            finally:
                primary.kill()
                secondary.kill()
        return points

    def run(self, intervals: Iterable[int],
            colo: bool = False) -> list[DiskPoint]:
        intervals = list(intervals)
        points: list[DiskPoint] = []
        for load in LOADS:
            sender = self.launch(f"sender-{load}", load)
            try:
                wait_until(lambda: len(parse_diskload(sender.console())) >= 3,
                           180, "the guest's disk load", 0.5)
                p = self.point(load, "none", None, self.sample(sender))
                points.append(p)
                self.progress(self.describe(p))
                for interval in intervals:
                    p = self.measure_protected(load, interval, sender)
                    points.append(p)
                    self.progress(self.describe(p))
                p = self.point(load, "none", None, self.sample(sender))
                points.append(p)
                self.progress(self.describe(p))
            finally:
                sender.kill()
        if colo:
            points += self.run_colo(intervals)
        return points

    @staticmethod
    def describe(p: DiskPoint) -> str:
        return (f"disk {p.load} {p.system} interval {p.interval}: "
                f"{p.mib_s:.1f} MiB/s, {p.ops_s:.0f} ops/s, latency mean "
                f"{p.latency_ms:.2f} ms, max {p.latency_max_ms:.1f} ms"
                + (f", {p.checkpoints_per_s:.1f} ckpt/s" if
                   p.checkpoints_per_s is not None else "")
                + (f", disk {p.disk_mean_bytes} B/ckpt" if
                   p.disk_mean_bytes is not None else "")
                + (f", pause median {p.pause_ms:.2f} ms, max "
                   f"{p.pause_max_ms:.2f} ms" if p.pause_ms is not None and
                   p.pause_max_ms is not None else ""))


def baseline(points: list[dict[str, Any]], load: str
             ) -> tuple[Optional[dict[str, float]], float, float]:
    """(mean of the unprotected windows of ``load``, their throughput
    noise, their latency noise) - noise as |a - b| / mean."""
    base = [p for p in points if p["load"] == load and p["system"] == "none"]
    if not base:
        return None, 0.0, 0.0
    mean = {k: sum(p[k] for p in base) / len(base)
            for k in ("mib_s", "ops_s", "latency_ms")}

    def noise(key: str) -> float:
        vals = [p[key] for p in base]
        return ((max(vals) - min(vals)) / mean[key]
                if len(vals) > 1 and mean[key] else 0.0)

    return mean, noise("mib_s"), noise("latency_ms")


def disk_targets(points: list[dict[str, Any]],
                 colo_pause_ms: Optional[float]) -> list[dict[str, str]]:
    """The disk targets, each met, missed or not measured.
    ``colo_pause_ms``: COLO's lowest median pause of the main rows at
    TARGET_INTERVAL, if measured."""
    out = []

    def add(name: str, ok: Optional[bool], detail: str) -> None:
        out.append(target(name, ok, detail))

    def at(load: str) -> Optional[dict[str, Any]]:
        return next((p for p in points if p["load"] == load and
                     p["system"] == "curling" and
                     p["interval"] == TARGET_INTERVAL), None)

    name = (f"{TARGET_SEQ_LOAD} write throughput >= {TARGET_SEQ_RATIO:.0%} "
            f"of unprotected (interval {TARGET_INTERVAL} ms)")
    base, noise, _ = baseline(points, TARGET_SEQ_LOAD)
    p = at(TARGET_SEQ_LOAD)
    if base and p and base["mib_s"]:
        ratio = p["mib_s"] / base["mib_s"]
        add(name, ratio >= TARGET_SEQ_RATIO,
            f"{p['mib_s']:.1f} vs {base['mib_s']:.1f} MiB/s: {ratio:.0%} "
            f"(unprotected windows differ by {noise:.0%})")
    else:
        add(name, None, "no disk points")

    base, _, noise = baseline(points, TARGET_FSYNC_LOAD)
    tolerance = max(noise, MIN_LATENCY_TOLERANCE)
    name = (f"{TARGET_FSYNC_LOAD} write+fdatasync latency unchanged within "
            f"the noise (interval {TARGET_INTERVAL} ms)")
    p = at(TARGET_FSYNC_LOAD)
    if base and p and base["latency_ms"]:
        ratio = p["latency_ms"] / base["latency_ms"]
        add(name, ratio <= 1 + tolerance,
            f"mean {p['latency_ms']:.3f} vs {base['latency_ms']:.3f} ms: "
            f"{ratio - 1:+.0%} (tolerance {tolerance:.0%}: the unprotected "
            f"windows' difference, at least {MIN_LATENCY_TOLERANCE:.0%})")
    else:
        add(name, None, "no disk points")

    name = (f"pause with disk writes below COLO's (interval "
            f"{TARGET_INTERVAL} ms)")
    pauses = [q["pause_ms"] for q in points if q["system"] == "curling" and
              q["interval"] == TARGET_INTERVAL and q["pause_ms"] is not None]
    colo = {q["load"]: q["pause_ms"] for q in points
            if q["system"] == COLO_SYSTEM and
            q["interval"] == TARGET_INTERVAL and q["pause_ms"] is not None}
    pairs = [(q["load"], q["pause_ms"], colo[q["load"]]) for q in points
             if q["system"] == "curling" and q["interval"] == TARGET_INTERVAL
             and q["pause_ms"] is not None and q["load"] in colo]
    if pairs:
        add(name, all(c < k for _, c, k in pairs),
            "median pause, Curling vs COLO with its disk set-up, same "
            "load: " +
            ", ".join(f"{load} {c:.2f} vs {k:.2f} ms"
                      for load, c, k in pairs))
    elif pauses and colo_pause_ms is not None:
        add(name, max(pauses) < colo_pause_ms,
            f"Curling median pause at most {max(pauses):.2f} ms with each disk "
            f"load; COLO's lowest median pause {colo_pause_ms:.2f} ms "
            f"(memory workloads, no disk)")
    else:
        add(name, None, "no disk points or no COLO rows")
    return out


def disk_report(points: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the disk section."""
    if not points:
        return []
    out = ["## Disks (replication)", "",
           "The guest writes its virtio-blk disk (its own 128 MiB raw image "
           "on each side): seq-10 and seq-50 offer sequential 64 KiB "
           "O_DIRECT writes at 10 and 50 MiB/s, fsync-4k writes 4 KiB at "
           "random offsets with fdatasync() after each, back to back. "
           "Latency: one write (plus its fdatasync), mean over the window "
           "and the longest. Unprotected windows before and after the "
           "protected ones; the ratio is to their mean. Pause: median and "
           "longest over the window, Curling's from its trace event "
           "curling_stop_phase. Per checkpoint: "
           "all bytes, and the disk data among them. COLO rows: QEMU's COLO "
           "(TCP_NODELAY on) with its disk set-up: the primary's drive a "
           "quorum whose second child replicates each write to the "
           "secondary over NBD before it completes, the secondary's writes "
           "kept in active/hidden qcow2 overlays over its own raw image; "
           "its ratio is to the same unprotected windows, its pause from "
           "the primary's STOP/RESUME events.", "",
           "| load | system | interval ms | MiB/s | ops/s | of unprotected "
           "| latency mean ms | max ms | ckpt/s | bytes/ckpt | disk bytes/ckpt "
           "| pause median ms | max ms | receiver RSS MB |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
           "---:|"]
    for p in points:
        base, _, _ = baseline(points, p["load"])
        ratio = (p["ops_s"] / base["ops_s"]
                 if base and base["ops_s"] else None)
        out.append(
            f"| {p['load']} "
            f"| {SYSTEM_LABELS.get(p['system'], p['system'])} "
            f"| {p['interval'] or '-'} | {p['mib_s']:.1f} | {p['ops_s']:.0f} "
            f"| {fmt(ratio, '.0%')} | {p['latency_ms']:.3f} "
            f"| {p['latency_max_ms']:.1f} "
            f"| {fmt(p.get('checkpoints_per_s'), '.1f')} "
            f"| {fmt(p.get('mean_bytes'), 'd')} "
            f"| {fmt(p.get('disk_mean_bytes'), 'd')} "
            f"| {fmt(p.get('pause_ms'), '.3f')} "
            f"| {fmt(p.get('pause_max_ms'), '.1f')} "
            f"| {fmt(p.get('receiver_rss_mb'), '.0f')} |")
    out.append("")
    return out
