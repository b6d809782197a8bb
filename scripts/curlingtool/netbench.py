# SPDX-License-Identifier: GPL-2.0-or-later
"""What output commit costs a guest network service, one run.

The test guest serves on a private network (``netlab``): a client in the
namespace measures request/response rate and latency over
``RR_CONNECTIONS`` connections, then bulk TCP throughput, for ``window``
seconds each; unprotected first, then under Curling at each interval,
with output-triggered checkpoints (curling-output-delay at its default)
and without (only the interval starts checkpoints). Each protected point
has a fresh receiver, and protection is cancelled after it.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import time
from typing import Any, Callable, Iterable, Optional

from .bench import SectionBench, fmt, target
from .netlab import (GUEST_IP, PREFIX, NetClient, NetLab, check_available,
                     netdev_args)
from .vm import VM, free_tcp_port

#: Connections of the request/response client.
RR_CONNECTIONS = 32
#: curling-output-delay that turns output-triggered checkpoints off.
OUTPUT_OFF_MS = 600000
#: curling-output-delay of the output-triggered points (its default).
OUTPUT_DELAY_MS = 4
APPEND = (f"curling.mode=dirty curling.rate=4 curling.serve=1 "
          f"curling.ip={GUEST_IP}/{PREFIX}")
BANDWIDTH = 10 * 1024 ** 3

#: Targets, at this interval with output-triggered checkpoints.
TARGET_INTERVAL = 100
TARGET_ADDED_MEDIAN_MS = 10.0
TARGET_RATE_RATIO = 0.5


@dataclasses.dataclass
class NetPoint:
    """One configuration's measurements."""
    system: str                     # "none" or "curling"
    interval: Optional[int]
    output_triggered: Optional[bool]
    rr_per_s: float
    rr_median_ms: Optional[float]
    rr_p99_ms: Optional[float]
    bulk_mbit_s: float
    checkpoints_per_s: Optional[float] = None
    cycle_ms: Optional[float] = None        # mean duration of a checkpoint
    release_delay_mean_ms: Optional[float] = None
    dropped_packets: Optional[int] = None


class NetBench(SectionBench):
    """Runs the network measurements; ``progress`` gets a line per step."""

    PREFIX = "net"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lab: Optional[NetLab] = None
        self._n = 0

    def launch(self, name: str, incoming: Optional[str] = None) -> VM:
        assert self.lab is not None
        self._n += 1
        tap = self.lab.add_tap(f"tap-b{self._n}")
        return self.start_vm(name, APPEND, netdev_args(tap), incoming,
                             self.lab.wrap)

    def client(self, mode: str, connections: int = 1) -> dict[str, Any]:
        assert self.lab is not None
        status = self.workdir / f"net-client-{mode}.json"
        status.unlink(missing_ok=True)
        c = NetClient(self.lab, mode, status, connections, self.window)
        try:
            c.proc.wait(timeout=self.window + 150)
        except subprocess.TimeoutExpired:
            c.stop()
        st = c.status()
        if st.get("fatal") or st.get("errors"):
            raise AssertionError(f"{mode} client: {st.get('fatal')} "
                                 f"{st.get('errors')}")
        return st

    def measure(self, system: str, interval: Optional[int],
                output: Optional[bool], sender: VM) -> NetPoint:
        info0 = sender.qmp("query-curling") if system == "curling" else None
        t0 = time.monotonic()
        rr = self.client("rr", RR_CONNECTIONS)
        bulk = self.client("bulk")
        t1 = time.monotonic()
        lat = rr.get("latency", {})
        point = NetPoint(system, interval, output,
                         rr_per_s=rr["items"] / max(rr["elapsed"], 1e-9),
                         rr_median_ms=lat.get("median_ms"),
                         rr_p99_ms=lat.get("p99_ms"),
                         bulk_mbit_s=bulk.get("mbit_per_s", 0.0))
        if info0 is not None:
            info1 = sender.qmp("query-curling")
            n = info1["checkpoints"] - info0["checkpoints"]
            point.checkpoints_per_s = n / (t1 - t0)
            point.cycle_ms = info1.get("mean-duration")
            point.release_delay_mean_ms = info1.get("release-delay-mean")
            point.dropped_packets = info1["dropped-packets"]
        self.progress(
            f"net {system} interval {interval} output-triggered {output}: "
            f"{point.rr_per_s:.0f} req/s, median {point.rr_median_ms} ms, "
            f"p99 {point.rr_p99_ms} ms, bulk {point.bulk_mbit_s:.0f} Mbit/s"
            + (f", {point.checkpoints_per_s:.1f} ckpt/s"
               if point.checkpoints_per_s is not None else ""))
        return point

    def run(self, intervals: Iterable[int]) -> list[NetPoint]:
        why = check_available()
        if why:
            raise AssertionError(f"network benchmark: {why}")
        points: list[NetPoint] = []
        self.lab = NetLab(f"curling-bench-{os.getpid()}")
        sender: Optional[VM] = None
        receiver: Optional[VM] = None
        try:
            self.lab.up()
            sender = self.launch("net-sender")
            sender.wait_tick(20, timeout=180)
            points.append(self.measure("none", None, None, sender))
            for interval in intervals:
                for output in (True, False):
                    uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
                    receiver = self.launch(f"net-receiver{self._n}", uri)
                    self.protect(sender, uri, max_bandwidth=BANDWIDTH,
                                 curling_interval=interval,
                                 curling_output_delay=(
                                     OUTPUT_DELAY_MS if output
                                     else OUTPUT_OFF_MS))
                    points.append(self.measure("curling", interval, output,
                                               sender))
                    self.unprotect(sender)
                    receiver.kill()
                    receiver = None
        finally:
            for vm in (sender, receiver):
                if vm is not None:
                    vm.kill()
            self.lab.down()
        return points


def net_targets(points: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The network targets, each met, missed or not measured."""
    base = next((p for p in points if p["system"] == "none"), None)
    at = next((p for p in points if p["system"] == "curling" and
               p["interval"] == TARGET_INTERVAL and p["output_triggered"]),
              None)
    out = []

    def add(name: str, ok: Optional[bool], detail: str) -> None:
        out.append(target(name, ok, detail))

    name = (f"added median request/response latency <= "
            f"{TARGET_ADDED_MEDIAN_MS:g} ms (interval {TARGET_INTERVAL} ms, "
            f"output-triggered)")
    if base and at and base["rr_median_ms"] is not None and \
            at["rr_median_ms"] is not None:
        added = at["rr_median_ms"] - base["rr_median_ms"]
        add(name, added <= TARGET_ADDED_MEDIAN_MS,
            f"{at['rr_median_ms']:.2f} ms vs {base['rr_median_ms']:.2f} ms "
            f"unprotected: +{added:.2f} ms; checkpoint cycle "
            f"{fmt(at.get('cycle_ms'))} ms")
    else:
        add(name, None, "no network points")
    name = (f"request/response rate >= {TARGET_RATE_RATIO:.0%} of unprotected "
            f"(interval {TARGET_INTERVAL} ms, output-triggered, "
            f"{RR_CONNECTIONS} connections)")
    if base and at and base["rr_per_s"]:
        ratio = at["rr_per_s"] / base["rr_per_s"]
        add(name, ratio >= TARGET_RATE_RATIO,
            f"{at['rr_per_s']:.0f}/s vs {base['rr_per_s']:.0f}/s: {ratio:.0%}")
    else:
        add(name, None, "no network points")
    return out


def net_report(points: list[dict[str, Any]]) -> list[str]:
    """Markdown lines of the network section."""
    if not points:
        return []
    base = next((p for p in points if p["system"] == "none"), None)
    out = ["## Network service (output commit)", "",
           f"The guest serves on a bridge in a network namespace; a client "
           f"there measures request/response over {RR_CONNECTIONS} "
           f"connections (rate, latency) and one bulk TCP stream. "
           f"Output-triggered: curling-output-delay {OUTPUT_DELAY_MS} ms (default); "
           f"without: {OUTPUT_OFF_MS} ms (only the interval starts "
           f"checkpoints). Cycle: mean time from the start of a checkpoint "
           f"to its acknowledgement.", "",
           "| system | interval ms | output-triggered | req/s | of unprotected "
           "| median ms | p99 ms | bulk Mbit/s | of unprotected | ckpt/s "
           "| cycle ms | held mean ms | dropped |",
           "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        rr_ratio = (p["rr_per_s"] / base["rr_per_s"]
                    if base and base["rr_per_s"] else None)
        bulk_ratio = (p["bulk_mbit_s"] / base["bulk_mbit_s"]
                      if base and base["bulk_mbit_s"] else None)
        out.append(
            f"| {'Curling' if p['system'] == 'curling' else 'unprotected'} "
            f"| {p['interval'] or '-'} "
            f"| {'-' if p['output_triggered'] is None else ('yes' if p['output_triggered'] else 'no')} "
            f"| {p['rr_per_s']:.0f} | {fmt(rr_ratio, '.0%')} "
            f"| {fmt(p['rr_median_ms'])} | {fmt(p['rr_p99_ms'])} "
            f"| {p['bulk_mbit_s']:.0f} | {fmt(bulk_ratio, '.0%')} "
            f"| {fmt(p.get('checkpoints_per_s'), '.1f')} "
            f"| {fmt(p.get('cycle_ms'))} "
            f"| {fmt(p.get('release_delay_mean_ms'))} "
            f"| {'-' if p.get('dropped_packets') is None else p['dropped_packets']} |")
    out.append("")
    return out

