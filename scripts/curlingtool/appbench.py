# SPDX-License-Identifier: GPL-2.0-or-later
"""What protection costs real applications, one run.

The Debian application guest (``debimage``: PostgreSQL 15, nginx) runs as
``test_curling_debian`` runs it: q35, ``MEM``, ``SMP`` vCPUs, virtio-blk on
its own copy of the image, virtio-net on a bridge in a network namespace
(``netlab``).  From the namespace, for ``window`` seconds each:

* ``pgbench`` (the image's own binary, its TPC-B-like script) with
  ``PGBENCH_CLIENTS`` clients on a database of scale ``PGBENCH_SCALE``:
  transactions per second, and the median and 99th percentile of the
  latency from its per-transaction log;
* ``ab`` (apache2-utils) with keep-alive and ``HTTP_CONCURRENCY``
  connections fetching nginx's default page: requests per second, median
  and 99th percentile.

Unprotected first, then protected by Curling at each interval (defaults
otherwise: output starts checkpoints); each interval has a receiver of
its own, and protection is cancelled after it.  The VMs are not pinned:
the guest's two vCPUs, the receiver and the clients share the host as
they would in use.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
import subprocess
import time
from typing import Any, Iterable, Optional

from .bench import SectionBench, fmt, percentile, target, window_mean
from .debimage import (MACHINE, MEM, READY, SMP, DebianImage, copy_image,
                       disk_args)
from .netlab import GUEST_IP, NetLab, check_available, netdev_args
from .vm import VM, free_tcp_port

BOOT_TIMEOUT = 400.0
BANDWIDTH = 10 * 1024 ** 3

PGBENCH_CLIENTS = 8
PGBENCH_THREADS = 2
#: pgbench's scale: at least one branch row per client, so that clients
#: do not queue behind one another's row locks
PGBENCH_SCALE = 8
#: seconds of pgbench before the first measurement
WARM_UP_S = 10
PG_USER = "postgres"
PG_DATABASE = "postgres"
HTTP_CONCURRENCY = 8

#: Targets, at this interval
TARGET_INTERVAL = 100
TARGET_RATIO = 0.6
AIM_RATIO = 0.7

TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)",
                    re.M)
AB_RATE_RE = re.compile(r"^Requests per second:\s+([0-9.]+)", re.M)
AB_FAILED_RE = re.compile(r"^Failed requests:\s+(\d+)", re.M)
AB_NON2XX_RE = re.compile(r"^Non-2xx responses:\s+(\d+)", re.M)
AB_PERCENT_RE = re.compile(r"^\s+(\d+)%\s+(\d+)", re.M)

WORKLOADS = ("pgbench", "http")


class AppBenchError(AssertionError):
    """A client failed: the point means nothing."""


@dataclasses.dataclass
class AppPoint:
    """One workload under one configuration."""
    workload: str                   # "pgbench" or "http"
    system: str                     # "none" or "curling"
    interval: Optional[int]
    per_s: float                    # transactions or requests per second
    median_ms: Optional[float]
    p99_ms: Optional[float]
    checkpoints_per_s: Optional[float] = None
    output_share: Optional[float] = None     # started by output
    mean_mb: Optional[float] = None
    pause_ms: Optional[float] = None
    cycle_ms: Optional[float] = None


def pgbench_tps(output: str) -> float:
    """The rate pgbench reports, without its connection time."""
    m = TPS_RE.search(output)
    if not m:
        raise AppBenchError(f"pgbench printed no rate: {output[-500:]!r}")
    return float(m.group(1))


def pgbench_latencies_ms(logs: Iterable[pathlib.Path]) -> list[float]:
    """Per-transaction latencies (ms) from pgbench's ``-l`` logs: each
    line is client, transaction, latency in us, script, epoch s, us."""
    out = []
    for path in logs:
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2].isdigit():
                out.append(int(fields[2]) / 1000)
    return out


def ab_result(output: str) -> tuple[float, Optional[float], Optional[float]]:
    """(requests/s, median ms, p99 ms) of an ``ab`` run that had no failed
    request and no answer but 2xx."""
    rate = AB_RATE_RE.search(output)
    if not rate:
        raise AppBenchError(f"ab printed no rate: {output[-500:]!r}")
    for regex, what in ((AB_FAILED_RE, "failed requests"),
                        (AB_NON2XX_RE, "non-2xx responses")):
        m = regex.search(output)
        if m and int(m.group(1)):
            raise AppBenchError(f"ab: {m.group(1)} {what}")
    percents = {int(p): float(ms) for p, ms in AB_PERCENT_RE.findall(output)}
    return float(rate.group(1)), percents.get(50), percents.get(99)


class AppBench(SectionBench):
    """Runs the application measurements; ``progress`` gets a line per
    step."""

    PREFIX = "app"

    def __init__(self, image: DebianImage, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.image = image
        self.lab: Optional[NetLab] = None
        self._n = 0

    def launch(self, name: str, disk: pathlib.Path,
               incoming: Optional[str] = None) -> VM:
        assert self.lab is not None
        self._n += 1
        tap = self.lab.add_tap(f"tap-a{self._n}")
        return self.start_vm(name, "", [*disk_args(disk), *netdev_args(tap)],
                             incoming, self.lab.wrap, pinned=False,
                             guest=self.image, mem=MEM, machine=MACHINE,
                             smp=SMP, cmdline=self.image.append)

    def _in_lab(self, argv: list[str], timeout: float,
                cwd: Optional[pathlib.Path] = None) -> str:
        assert self.lab is not None
        proc = subprocess.run(self.lab.wrap(argv), capture_output=True,
                              text=True, timeout=timeout, cwd=cwd,
                              stdin=subprocess.DEVNULL, check=False)
        if proc.returncode:
            raise AppBenchError(f"{os.path.basename(argv[0])} failed "
                                f"({proc.returncode}): "
                                f"{(proc.stderr or proc.stdout)[-800:]}")
        return proc.stdout

    def _pgbench(self, *args: str) -> list[str]:
        return [str(self.image.pgbench), "-h", GUEST_IP, "-U", PG_USER,
                *args, PG_DATABASE]

    @staticmethod
    def _pgbench_load(seconds: int) -> list[str]:
        """pgbench's arguments for the measured load, ``seconds`` long."""
        return ["-c", str(PGBENCH_CLIENTS), "-j", str(PGBENCH_THREADS),
                "-T", str(seconds)]

    def pgbench_init(self) -> None:
        t0 = time.monotonic()
        self._in_lab(self._pgbench("-i", "-q", "-s", str(PGBENCH_SCALE)),
                     timeout=900)
        self.progress(f"app: pgbench database of scale {PGBENCH_SCALE} made "
                      f"in {time.monotonic() - t0:.0f} s")

    def pgbench_warm_up(self) -> None:
        """Run pgbench unmeasured first: right after its database is made,
        the guest's caches and PostgreSQL's buffers are cold and its
        background writers busy, and the first window ran at 87 to 165
        transactions per second from one run to the next."""
        self._in_lab(self._pgbench(*self._pgbench_load(WARM_UP_S)),
                     timeout=WARM_UP_S + 300)
        self.progress(f"app: pgbench warmed up for {WARM_UP_S} s")

    def run_pgbench(self, label: str) -> tuple[float, list[float]]:
        folder = self.workdir / f"pgbench-{label}"
        folder.mkdir()
        out = self._in_lab(self._pgbench(
            *self._pgbench_load(int(self.window)), "-l",
            f"--log-prefix={folder / 'tx'}"), timeout=self.window + 300,
            cwd=folder)
        return pgbench_tps(out), pgbench_latencies_ms(folder.glob("tx.*"))

    def run_ab(self) -> tuple[float, Optional[float], Optional[float]]:
        out = self._in_lab(["ab", "-k", "-q", "-c", str(HTTP_CONCURRENCY),
                            "-t", str(int(self.window)), "-n", "100000000",
                            f"http://{GUEST_IP}/"], timeout=self.window + 300)
        return ab_result(out)

    def measure(self, system: str, interval: Optional[int],
                sender: VM) -> list[AppPoint]:
        points = []
        label = f"{system}-{interval or 0}"
        for workload in WORKLOADS:
            info0 = sender.qmp("query-curling") if system == "curling" else None
            t0 = time.monotonic()
            if workload == "pgbench":
                rate, lat = self.run_pgbench(label)
                point = AppPoint(workload, system, interval, rate,
                                 percentile(lat, 0.5), percentile(lat, 0.99))
            else:
                rate, median, p99 = self.run_ab()
                point = AppPoint(workload, system, interval, rate, median, p99)
            t1 = time.monotonic()
            if info0 is not None:
                info1 = sender.qmp("query-curling")
                n = info1["checkpoints"] - info0["checkpoints"]
                by_output = (info1["output-checkpoints"]
                             - info0["output-checkpoints"])
                point.checkpoints_per_s = n / (t1 - t0)
                point.output_share = by_output / n if n else None
                mean = window_mean(info0, info1, "mean-bytes")
                point.mean_mb = mean / 1e6 if mean is not None else None
                point.pause_ms = window_mean(info0, info1, "mean-pause")
                point.cycle_ms = window_mean(info0, info1, "mean-duration")
            self.progress(
                f"app {workload} {system} interval {interval}: "
                f"{point.per_s:.1f}/s, median {fmt(point.median_ms)} ms, "
                f"p99 {fmt(point.p99_ms)} ms"
                + (f", {point.checkpoints_per_s:.1f} ckpt/s"
                   if point.checkpoints_per_s is not None else ""))
            points.append(point)
        return points

    def run(self, intervals: Iterable[int]) -> list[AppPoint]:
        why = check_available()
        if why:
            raise AssertionError(f"application benchmark: {why}")
        points: list[AppPoint] = []
        # The main rows keep this process on one CPU; the guest, its
        # receiver and the clients here share every CPU, as in use
        pinned = os.sched_getaffinity(0)
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
        self.lab = NetLab(f"curling-app-{os.getpid()}")
        sender: Optional[VM] = None
        receiver: Optional[VM] = None
        try:
            self.lab.up()
            sender = self.launch("app-sender", copy_image(
                self.image, self.workdir / "app-sender.raw"))
            t0 = time.monotonic()
            sender.wait_console(READY, timeout=BOOT_TIMEOUT)
            self.progress(f"app: the Debian guest booted in "
                          f"{time.monotonic() - t0:.0f} s")
            self.pgbench_init()
            self.pgbench_warm_up()
            points += self.measure("none", None, sender)
            for interval in intervals:
                name = f"app-receiver{self._n}"
                uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
                receiver = self.launch(name, copy_image(
                    self.image, self.workdir / f"{name}.raw"), uri)
                self.protect(sender, uri, 300, max_bandwidth=BANDWIDTH,
                             curling_interval=interval)
                points += self.measure("curling", interval, sender)
                self.unprotect(sender, 60)
                receiver.kill()
                receiver = None
                (self.workdir / f"{name}.raw").unlink(missing_ok=True)
        finally:
            for vm in (sender, receiver):
                if vm is not None:
                    vm.kill()
            self.lab.down()
            for disk in self.workdir.glob("app-*.raw"):
                disk.unlink(missing_ok=True)
            os.sched_setaffinity(0, pinned)
        return points


def _base(points: list[dict[str, Any]], workload: str
          ) -> Optional[dict[str, Any]]:
    return next((p for p in points if p["workload"] == workload
                 and p["system"] == "none"), None)


def app_targets(points: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The application targets, each met, missed or not measured."""
    out = []
    for workload, what in (("pgbench", "pgbench TPS"),
                           ("http", "HTTP request rate")):
        name = (f"{what} >= {TARGET_RATIO:.0%} of unprotected (aim "
                f"{AIM_RATIO:.0%}; interval {TARGET_INTERVAL} ms)")
        base = _base(points, workload)
        at = next((p for p in points if p["workload"] == workload
                   and p["system"] == "curling"
                   and p["interval"] == TARGET_INTERVAL), None)
        if base and at and base["per_s"]:
            ratio = at["per_s"] / base["per_s"]
            out.append(target(name, ratio >= TARGET_RATIO,
                              f"{at['per_s']:.1f}/s vs {base['per_s']:.1f}/s "
                              f"unprotected: {ratio:.0%}"))
        else:
            out.append(target(name, None, "not measured"))
    return out


def app_report(points: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the application section."""
    if not points:
        return []
    out = ["## Real applications (Debian 12 guest)", "",
           f"The application guest (Debian 12, PostgreSQL 15, nginx; q35, "
           f"{MEM}, {SMP} vCPUs, virtio-blk and virtio-net) on a bridge in a "
           f"network namespace; the clients run on the host in that "
           f"namespace. pgbench: its TPC-B-like script, {PGBENCH_CLIENTS} "
           f"clients, scale {PGBENCH_SCALE}, synchronous commit; latency "
           f"from its per-transaction log. HTTP: ab with keep-alive, "
           f"{HTTP_CONCURRENCY} connections, nginx's default page. By "
           f"output: the share of checkpoints that held output started. "
           f"COLO is not in these rows: its documented set-up (quorum and "
           f"replication drivers with the secondary's hidden and active "
           f"disks, colo-compare on its own links) is not built for the "
           f"application guest here yet.", "",
           "| workload | system | interval ms | rate /s | of unprotected "
           "| median ms | p99 ms | ckpt/s | by output | mean MB "
           "| pause ms | cycle ms |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        base = _base(points, p["workload"])
        ratio = (p["per_s"] / base["per_s"]
                 if base and base["per_s"] else None)
        out.append(
            f"| {p['workload']} "
            f"| {'Curling' if p['system'] == 'curling' else 'unprotected'} "
            f"| {p['interval'] or '-'} | {p['per_s']:.1f} "
            f"| {fmt(ratio, '.0%')} | {fmt(p['median_ms'])} "
            f"| {fmt(p['p99_ms'])} | {fmt(p.get('checkpoints_per_s'), '.1f')} "
            f"| {fmt(p.get('output_share'), '.0%')} "
            f"| {fmt(p.get('mean_mb'))} | {fmt(p.get('pause_ms'))} "
            f"| {fmt(p.get('cycle_ms'))} |")
    out.append("")
    return out
