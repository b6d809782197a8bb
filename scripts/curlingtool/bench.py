# SPDX-License-Identifier: GPL-2.0-or-later
"""Measure what protection costs: Curling, unprotected and COLO, one run.

Everything runs on this machine with the QEMU of build/bin and the test
guest. Two hosts are modelled by pinning the sender (or COLO's primary) to
one CPU and the receiver (COLO's secondary) to the other.

For each system and workload one sender boots, and windows of host time
are measured on it, protected and unprotected in turn:

* guest throughput: work the guest's counter loop did per host second
  (from its tick lines), divided by the unprotected throughput of the
  same guest in the windows just before and after (this machine's speed
  drifts by several per cent over minutes, so only neighbours compare);
  Curling is protected and unprotected again for every window (ABAB), COLO
  cannot be, so its windows of all intervals sit between two unprotected
  ones;
* guest pause per checkpoint and where it goes: for Curling from the
  sender's trace event curling_stop_phase (its pauses emit no QMP event),
  for COLO from the STOP/RESUME QMP events of the primary;
* checkpoints, their bytes and the bandwidth used (TCP bytes the sender
  sent, per ss(8));
* CPU time of each side (/proc/PID/stat) and the receiver's RSS.

Failover time is measured separately: sender killed -> first guest output
on the receiver, for SIGKILL (broken connection) and SIGSTOP (silence,
detected after curling-timeout), over chained rounds (the failed-over
receiver protects the guest again to a new receiver).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import re
import signal
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable, Iterable, Iterator, Optional

from . import CurlingError, agent, tlscerts
from .etcdserver import EtcdFailed, EtcdMissing, EtcdServer
from .guest import GuestImage
from .vm import VM, die_with_parent, free_tcp_port, guest_args, wait_until

log = logging.getLogger(__name__)

INTERVALS = (25, 50, 100, 200, 500)
WORKLOADS: dict[str, str] = {
    "counter": "curling.mode=counter",
    "dirty-1": "curling.mode=dirty curling.rate=1 curling.mb=16",
    "dirty-10": "curling.mode=dirty curling.rate=10 curling.mb=64",
    "dirty-100": "curling.mode=dirty curling.rate=100 curling.mb=128",
    "idle": "curling.mode=idle",
}
SYSTEMS = ("curling", "colo", "colo-nodelay")
#: Curling over TLS (x509, a CA made for the run), measured at
#: TLS_INTERVALS for TLS_WORKLOADS alternately with plain Curling on the
#: same sender (TLS_TWIN), so that the machine's drift hits both alike.
TLS_SYSTEM = "curling-tls"
TLS_TWIN = "curling-tcp"
TLS_INTERVALS = (25, 100)
TLS_WORKLOADS = ("counter", "dirty-10", "dirty-100")
#: A pause longer than this is a stall.
STALL_S = 1.0
#: curling-timeout of the SIGSTOP failover rounds, in milliseconds.
FAILOVER_TIMEOUT_MS = 1000
#: Failover keys of the managed mode (agents deciding through a witness).
WITNESS_PREFIX = "with a witness: "
BANDWIDTH = 10 * 1024 ** 3
MEM = "512M"


SYSTEM_NOTES = {
    "curling": "this series: live pre-copy of the dirty pages into a local "
    "buffer, a short stop to copy the rest and the devices, resume, then "
    "send the frame and wait for the receiver's acknowledgement while the "
    "guest runs. The receiver only buffers and loads; it does not run the "
    "guest.",
    "colo": "QEMU's in-tree COLO in periodic mode (x-checkpoint-delay = the "
    "interval), -machine pc, with the series' BQL fix (patch 0008: as shipped "
    "it aborts at its first checkpoint under TCG) and its main socket as "
    "shipped, without TCP_NODELAY (-global migration.x-colo-nodelay=off): "
    "every checkpoint's request/reply exchange waits for delayed ACKs. The "
    "guest stays stopped while COLO sends the whole checkpoint and the "
    "secondary loads it; the secondary runs the guest.",
    "colo-nodelay": "the same COLO with TCP_NODELAY on its socket (patch "
    "0009), the fair comparison for the pause.",
    TLS_SYSTEM: "Curling with tls-creds on both sides (x509 certificates of "
    "a CA made for the run, ECDSA P-256 keys, tls-authz on the receiver): "
    "the first round, every frame and acknowledgement go through the TLS "
    "session.",
    TLS_TWIN: "plain Curling on the sender that is also protected over TLS, "
    "alternately with it (TLS, then plain, then plain, then TLS...): the "
    "comparison for curling-tls.",
}


def is_curling(system: str) -> bool:
    return system in ("curling", TLS_SYSTEM, TLS_TWIN)


class BenchError(CurlingError):
    pass


def percentile(values: list[float], q: float) -> Optional[float]:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def least_squares_slope(points: Iterable[tuple[float, float]]) -> float:
    """Slope of the least-squares line through ``points`` (x, y)."""
    pts = list(points)
    if len(pts) < 2:
        raise ValueError(f"a slope needs at least 2 points, not {len(pts)}")
    mean_x = sum(x for x, _ in pts) / len(pts)
    mean_y = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mean_x) ** 2 for x, _ in pts)
    if sxx == 0:
        raise ValueError("a slope needs at least 2 distinct x values")
    return sum((x - mean_x) * (y - mean_y) for x, y in pts) / sxx


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tcp_bytes_sent(port: Optional[int]) -> int:
    """Bytes sent so far on the established TCP connections to 127.0.0.1
    port ``port`` (the sender's side of a protection), per ss(8)."""
    if port is None:
        return 0
    try:
        out = subprocess.run(["ss", "-tinH", "state", "established",
                              f"( dport = :{port} )"], capture_output=True,
                             text=True, check=False).stdout
    except FileNotFoundError:
        return 0
    return sum(int(n) for n in re.findall(r"\bbytes_sent:(\d+)", out))


def thread_kind(name: str) -> str:
    """``vcpu`` (runs the guest), ``migration`` (the migration thread and
    Curling's), or ``other``, by a QEMU thread's name (debug-threads)."""
    if name.startswith("CPU ") and "/" in name:
        return "vcpu"
    if name.startswith("mig/"):
        return "migration"
    return "other"


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds the threads of ``pid`` used so far, by thread_kind()."""
    out = {"vcpu": 0.0, "migration": 0.0, "other": 0.0}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue        # the thread ended
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[thread_kind(name)] += (int(fields[11]) + int(fields[12])) / tick
    return out


def rss_bytes(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


_SMAPS_HEADER_RE = re.compile(
    r"^[0-9a-f]+-[0-9a-f]+ (?P<perms>\S{4}) \S+ \S+ \S+\s*(?P<path>.*)$")


def rss_split(smaps: str, ram_bytes: int) -> tuple[int, int]:
    """(total RSS, RSS of guest RAM) in bytes from a QEMU's
    /proc/PID/smaps: guest RAM is the private anonymous read-write
    mappings of at least ``ram_bytes`` (TCG's code buffer is as large but
    executable); the rest is QEMU's own memory."""
    total = guest = 0
    in_ram = False
    for line in smaps.splitlines():
        m = _SMAPS_HEADER_RE.match(line)
        if m:
            in_ram = m["perms"] == "rw-p" and not m["path"]
            continue
        key, _, value = line.partition(":")
        if key == "Size":
            in_ram = in_ram and int(value.split()[0]) * 1024 >= ram_bytes
        elif key == "Rss":
            rss = int(value.split()[0]) * 1024
            total += rss
            if in_ram:
                guest += rss
    return total, guest


def memcpy_bandwidth(size: int = 256 << 20, rounds: int = 5) -> float:
    """Bytes per second this machine copies memory at (best of rounds)."""
    src = bytearray(os.urandom(1 << 20)) * (size >> 20)
    dst = bytearray(size)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        dst[:] = src
        best = max(best, size / (time.perf_counter() - start))
    return best


@dataclasses.dataclass
class Window:
    """One measured window of one configuration."""

    system: str             # none, curling, colo, colo-nodelay
    workload: str
    interval: Optional[int]
    seconds: float
    work_per_s: float
    pages_per_s: float
    pauses_ms: list[float]
    checkpoints: int
    sender_bytes: int       # TCP bytes the sender sent to the receiver
    sender_cpu_s: float
    receiver_cpu_s: Optional[float]
    receiver_rss: Optional[int]
    #: unprotected work_per_s of the neighbouring windows (protected only)
    baseline_work_per_s: Optional[float] = None
    #: the sender's CPU seconds by thread kind (thread_cpu()): how much of
    #: its core the guest got, and how much the migration threads took
    sender_threads: dict[str, float] = dataclasses.field(default_factory=dict)
    #: Curling: mean time from the end of an interval to the checkpoint's
    #: acknowledgement (saving, sending, loading), in ms
    ack_ms: Optional[float] = None
    #: Curling: (stop, RAM, devices, start) microseconds and bytes saved
    #: with the VM stopped, per checkpoint (trace event curling_stop_phase)
    stop_phases: list[tuple[int, int, int, int, int]] = dataclasses.field(
        default_factory=list)
    #: how far the guest's clock ran ahead of (+) or behind (-) this host's
    #: over the window, in parts per million (clock_drift_ppm())
    clock_ppm: Optional[float] = None


STOP_PHASE_RE = re.compile(r"curling_stop_phase VM stopped: stop (\d+) us, "
                           r"RAM (\d+) us, devices (\d+) us, start (\d+) us; "
                           r"(\d+) bytes")


def clock_drift_ppm(start: Optional[tuple[int, float]],
                    end: Optional[tuple[int, float]]) -> Optional[float]:
    """Drift of the guest's clock against the host's between two
    VM.guest_clock_ns() readings (guest ns, host s), in parts per million:
    negative when the guest's clock fell behind."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    guest_s = (end[0] - start[0]) / 1e9
    return (guest_s / (end[1] - start[1]) - 1) * 1e6


def stop_phases(log_text: str) -> list[tuple[int, int, int, int, int]]:
    return [tuple(int(g) for g in m.groups())      # type: ignore[misc]
            for m in STOP_PHASE_RE.finditer(log_text)]


def phase_pauses(phases: list[tuple[int, int, int, int, int]]) -> list[float]:
    """Pauses in ms from ``curling_stop_phase`` lines: stop, RAM, devices
    and start are the whole time the VM is stopped."""
    return [(stop + ram + devices + start) / 1000.0
            for stop, ram, devices, start, _bytes in phases]


def set_baselines(seq: list[Window]) -> None:
    """Give each protected window of the chronological ``seq`` the mean
    unprotected throughput of the nearest unprotected window before it and
    the nearest after it (or the one that exists)."""
    for i, w in enumerate(seq):
        if w.system == "none":
            continue
        before = next((u for u in reversed(seq[:i]) if u.system == "none"), None)
        after = next((u for u in seq[i + 1:] if u.system == "none"), None)
        near = [u.work_per_s for u in (before, after) if u is not None]
        w.baseline_work_per_s = statistics.mean(near) if near else None


class Bench:
    """Runs the measurements; ``progress`` gets one line per step."""

    def __init__(self, qemu: pathlib.Path, guest: GuestImage,
                 workdir: pathlib.Path, accel: str, window: float,
                 progress: Callable[[str], None]) -> None:
        self.qemu = qemu
        self.guest = guest
        self.workdir = workdir
        self.accel = accel
        self.window = window
        self.progress = progress
        cpus = sorted(os.sched_getaffinity(0))
        self.cpus = (cpus[0], cpus[1 % len(cpus)])
        self._n = 0
        self.port: Optional[int] = None     # of the current protection
        self.steps = 0                      # windows and failover rounds
        self.done = 0
        self._pki: Optional[tlscerts.Pki] = None

    def tls_args(self, role: str) -> list[str]:
        """``role``'s TLS credentials (Pki.qemu_args), of a CA made once
        per run."""
        if self._pki is None:
            self._pki = tlscerts.Pki.create(self.workdir / "tls")
        return self._pki.qemu_args(role)

    @staticmethod
    def count_steps(systems: Iterable[str], workloads: Iterable[str],
                    intervals: int, reps: int, rounds: int) -> int:
        """Windows and failover rounds a run will measure, for progress."""
        systems = list(systems)
        per_workload = sum(1 + 2 * reps * intervals * (2 if s == TLS_SYSTEM
                                                       else 1)
                           if is_curling(s)
                           else intervals + 2 for s in systems)
        return (per_workload * len(list(workloads))
                + (4 * rounds if "curling" in systems else 0))

    def step(self, line: str) -> None:
        self.done += 1
        self.progress(f"[{self.done}/{self.steps}] {line}")

    # -- VMs ---------------------------------------------------------------

    def launch(self, role: str, append: str, incoming: Optional[str] = None,
               extra: Iterable[str] = (), with_agent: bool = False) -> VM:
        """A QEMU running the test guest; ``with_agent`` gives it a
        monitor for an agent at ``agent_qmp(vm)``."""
        self._n += 1
        name = f"{role}-{self._n}"
        console = self.workdir / f"{name}-console.log"
        console.touch()
        qmp = self.workdir / f"{name}.qmp"
        if with_agent:
            extra = [*extra, *agent.monitor_args(self.agent_qmp(name))]
        # The guest publishes its clock, for Window.clock_ppm.
        args = guest_args(self.qemu, self.guest, name, accel=self.accel,
                          console=console, qmp_path=qmp, incoming=incoming,
                          mem=MEM, append=f"{append} curling.clock=1",
                          extra_args=extra)
        cpu = self.cpus[0] if role in ("sender", "primary") else self.cpus[1]
        vm = VM(name, args, console, self.workdir / f"{name}-qemu.log", qmp,
                log, cpu_affinity={cpu})
        vm.launch()
        return vm

    def agent_qmp(self, name: str) -> pathlib.Path:
        return self.workdir / f"{name}-agent.qmp"

    def protect_managed(self, sender: VM, append: str, witness: str,
                        timeout_ms: int
                        ) -> tuple[VM, list[subprocess.Popen]]:
        """Protect ``sender``'s guest with an agent on each side deciding
        through ``witness``; returns the receiver and the two agents."""
        port = self.port = free_tcp_port()
        uri = f"curling:tcp:127.0.0.1:{port}"
        receiver = self.launch("receiver", append, incoming=uri,
                               with_agent=True)
        for vm in (sender, receiver):
            vm.qmp("migrate-set-parameters", max_bandwidth=BANDWIDTH,
                   curling_interval=100, curling_timeout=timeout_ms)
        # A key and ids of their own: the witness keeps earlier terms.
        vm_key = f"bench-{receiver.name}"
        s_id, r_id = f"S-{receiver.name}", f"R-{receiver.name}"
        r_log = self.workdir / f"agent-{r_id}.log"
        agents = [agent.spawn(self.agent_qmp(receiver.name), "receiver",
                              vm_key, r_id, witness, r_log, peer=s_id,
                              preexec_fn=die_with_parent)]
        wait_until(lambda: receiver.qmp("query-migrate-parameters")
                   .get("curling-managed"), 30, "the receiver's agent", 0.1)
        agents.append(agent.spawn(self.agent_qmp(sender.name), "sender",
                                  vm_key, s_id, witness,
                                  self.workdir / f"agent-{s_id}.log",
                                  protect=uri, preexec_fn=die_with_parent))
        wait_until(lambda: any("decision=armed" in line
                               for line in agent.decisions(r_log)), 120,
                   "managed Curling protection", 0.1)
        return receiver, agents

    @staticmethod
    def colo_extra(system: str) -> list[str]:
        if system.startswith("colo"):
            nodelay = "on" if system == "colo-nodelay" else "off"
            return ["-global", f"migration.x-colo-nodelay={nodelay}"]
        return []

    def protect(self, system: str, sender: VM, append: str,
                interval: int) -> VM:
        """Start a receiver and protect ``sender``'s guest to it."""
        port = self.port = free_tcp_port()
        if is_curling(system):
            uri = f"curling:tcp:127.0.0.1:{port}"
            tls = system == TLS_SYSTEM
            receiver = self.launch("receiver", append, incoming=uri,
                                   extra=self.tls_args("receiver")
                                   if tls else ())
            if tls:
                receiver.qmp("migrate-set-parameters", tls_creds="tls0",
                             tls_authz="authz0")
            if system in (TLS_SYSTEM, TLS_TWIN):
                sender.qmp("migrate-set-parameters",
                           tls_creds="tls0" if tls else "",
                           tls_hostname="127.0.0.1" if tls else "")
            sender.qmp("migrate-set-parameters", max_bandwidth=BANDWIDTH,
                       curling_interval=interval)
            sender.qmp("migrate", uri=uri)
            wait_until(lambda: receiver.qmp("query-curling")["status"]
                       == "protecting", 120, "Curling protection", 0.1)
            return receiver
        uri = f"tcp:127.0.0.1:{port}"
        receiver = self.launch("secondary", append, incoming=uri,
                               extra=self.colo_extra(system))
        caps = [{"capability": "x-colo", "state": True}]
        receiver.qmp("migrate-set-capabilities", capabilities=caps)
        sender.qmp("migrate-set-capabilities", capabilities=caps)
        sender.qmp("migrate-set-parameters", max_bandwidth=BANDWIDTH,
                   x_checkpoint_delay=interval)
        sender.qmp("migrate", uri=uri)
        wait_until(lambda: sender.qmp("query-migrate").get("status") == "colo",
                   120, "COLO protection", 0.1)
        return receiver

    def set_interval(self, system: str, sender: VM, interval: int) -> None:
        key = ("curling_interval" if is_curling(system)
               else "x_checkpoint_delay")
        sender.qmp("migrate-set-parameters", **{key: interval})

    # -- one window ----------------------------------------------------------

    def measure(self, system: str, workload: str, interval: Optional[int],
                sender: VM, receiver: Optional[VM]) -> Window:
        sender.qmp("query-status")              # drain old events
        sender.events.clear()
        first = sender.last_tick()
        t0 = time.monotonic()
        cpu0 = cpu_seconds(sender.pid)
        threads0 = thread_cpu(sender.pid)
        rcpu0 = cpu_seconds(receiver.pid) if receiver else None
        port = self.port if receiver else None
        wr0 = tcp_bytes_sent(port)
        info0 = (sender.qmp("query-curling") if is_curling(system) else None)
        log_pos = sender.qemu_log_path.stat().st_size
        clock0 = sender.guest_clock_ns()
        deadline = t0 + self.window
        while time.monotonic() < deadline:
            time.sleep(0.2)
            sender.qmp("query-status")          # collects STOP/RESUME events
        clock1 = sender.guest_clock_ns()
        last = sender.last_tick()
        t1 = time.monotonic()
        info1 = (sender.qmp("query-curling") if is_curling(system) else None)
        ticked = not (first is None or last is None or last.n <= first.n)
        if not ticked and system == "none":
            raise BenchError(f"{sender.name}: the unprotected guest did not tick")
        if not ticked:
            # protected so heavily that the guest made no visible progress
            self.progress(f"{sender.name}: the guest did not tick in this window")
        with sender.qemu_log_path.open("rb") as f:
            f.seek(log_pos)
            phases = stop_phases(f.read().decode(errors="replace"))
        # Curling pauses quietly (no STOP/RESUME): its trace times each pause.
        pauses = (phase_pauses(phases) if is_curling(system)
                  else event_pauses(sender.events))
        ack_ms = None
        if info0 and info1 and info1["checkpoints"] > info0["checkpoints"]:
            checkpoints = info1["checkpoints"] - info0["checkpoints"]
            if "mean-duration" in info1:
                ack_ms = ((info1["mean-duration"] * info1["checkpoints"] -
                           info0.get("mean-duration", 0) *
                           info0["checkpoints"]) / checkpoints)
        else:
            checkpoints = len(pauses)
        return Window(
            system=system, workload=workload, interval=interval,
            seconds=t1 - t0,
            work_per_s=(last.work - first.work) / (t1 - t0) if ticked else 0.0,
            pages_per_s=(last.pages - first.pages) / (t1 - t0) if ticked else 0.0,
            pauses_ms=pauses, checkpoints=checkpoints,
            sender_bytes=tcp_bytes_sent(port) - wr0,
            sender_cpu_s=cpu_seconds(sender.pid) - cpu0,
            receiver_cpu_s=(cpu_seconds(receiver.pid) - rcpu0
                            if receiver and rcpu0 is not None else None),
            receiver_rss=rss_bytes(receiver.pid) if receiver else None,
            sender_threads={k: v - threads0.get(k, 0.0)
                            for k, v in thread_cpu(sender.pid).items()},
            ack_ms=ack_ms, stop_phases=phases,
            clock_ppm=clock_drift_ppm(clock0, clock1))

    # -- a whole system x workload -------------------------------------------

    def run(self, system: str, workload: str, intervals: Iterable[int],
            reps: int) -> list[Window]:
        """Protected windows with unprotected ones around them, in time order.

        Curling: ``reps`` times, for every interval: protect, measure,
        migrate_cancel, measure unprotected (after one unprotected window
        to begin with).  TLS_SYSTEM: the same, with TLS and without
        (TLS_TWIN) in turn, in alternating order.  COLO cannot end protection and start it again on
        the same primary: one unprotected window, protect, every interval,
        x-colo-lost-heartbeat, one unprotected window.
        """
        append = WORKLOADS[workload]
        intervals = list(intervals)
        seq: list[Window] = []
        colo = not is_curling(system)
        extra = (self.colo_extra(system) if colo
                 else ["-trace", "curling_stop_phase"])
        systems = [system]
        if system == TLS_SYSTEM:
            extra += self.tls_args("sender")
            systems = [TLS_SYSTEM, TLS_TWIN]
        sender = self.launch("primary" if colo else "sender", append,
                             extra=extra)
        receiver: Optional[VM] = None

        def window(kind: str, interval: Optional[int], what: str) -> None:
            seq.append(self.measure(kind, workload, interval, sender, receiver))
            w = seq[-1]
            ratio = ""
            last_u = next((u for u in reversed(seq[:-1]) if u.system == "none"), None)
            if kind != "none" and last_u and last_u.work_per_s:
                ratio = f", {w.work_per_s / last_u.work_per_s:.1%} of the last unprotected"
            self.step(f"{system if kind == 'none' else kind} {workload}: "
                      f"{what}{ratio}")

        try:
            sender.wait_tick(20, timeout=180)
            window("none", None, "unprotected")
            if colo:
                receiver = self.protect(system, sender, append, intervals[0])
                for interval in intervals:
                    self.set_interval(system, sender, interval)
                    time.sleep(1.0)
                    window(system, interval, f"interval {interval} ms")
                sender.qmp("x-colo-lost-heartbeat")
                receiver.kill()
                receiver = None
                time.sleep(1.0)
                window("none", None, "unprotected")
            else:
                turn = 0
                for rep in range(reps):
                    for interval in intervals:
                        for kind in (systems if turn % 2 == 0
                                     else systems[::-1]):
                            receiver = self.protect(kind, sender, append,
                                                    interval)
                            time.sleep(1.0)
                            window(kind, interval, f"interval {interval} ms "
                                   f"(repetition {rep + 1}/{reps})")
                            sender.qmp("migrate_cancel")
                            wait_until(lambda: sender.qmp("query-curling")
                                       ["status"] == "cancelled", 30,
                                       "cancel", 0.1)
                            receiver.kill()
                            receiver = None
                            time.sleep(0.5)
                            window("none", None, "unprotected")
                        turn += 1
        finally:
            for vm in (sender, receiver):
                if vm is not None:
                    vm.kill()
        set_baselines(seq)
        return seq

    # -- failover ------------------------------------------------------------

    def failover(self, sig: int, rounds: int,
                 timeout_ms: int = FAILOVER_TIMEOUT_MS,
                 witness: Optional[str] = None) -> list[float]:
        """Seconds from signalling the sender to the receiver's first tick;
        with ``witness``, in the managed mode with an agent on each side."""
        append = WORKLOADS["dirty-10"]
        times = []
        sender = self.launch("sender", append, with_agent=bool(witness))
        stopped: list[VM] = []
        agents: list[subprocess.Popen] = []
        try:
            sender.wait_tick(20, timeout=180)
            for n in range(rounds):
                if witness:
                    # The agent of a receiver that took over is done: the
                    # next protection gets agents of its own.
                    for proc in agents:
                        if proc.poll() is None:
                            proc.kill()
                    receiver, agents = self.protect_managed(
                        sender, append, witness, timeout_ms)
                else:
                    receiver = self.protect("curling", sender, append, 100)
                    sender.qmp("migrate-set-parameters",
                               curling_timeout=timeout_ms)
                time.sleep(1.0 + (n % 5) * 0.13)
                mark = receiver.console_mark()
                start = time.monotonic()
                os.kill(sender.pid, sig)
                wait_until(lambda: receiver.ticks(mark), 30,
                           f"{receiver.name}'s first tick", 0.002)
                times.append(time.monotonic() - start)
                self.step(f"failover {signal.Signals(sig).name} "
                          f"{'with a witness ' if witness else ''}round "
                          f"{n + 1}: {times[-1] * 1000:.0f} ms")
                if sig == signal.SIGSTOP:
                    stopped.append(sender)
                else:
                    sender.kill()
                sender = receiver
        finally:
            for vm in [sender, *stopped]:
                vm.kill()
            for proc in agents:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
        return times


@contextlib.contextmanager
def witness_for(workdir: pathlib.Path, progress: Callable[[str], None]
                ) -> Iterator[tuple[str, str]]:
    """(kind, spec) of a witness for the failover rounds with agents: a
    throw-away etcd on 127.0.0.1, or the lock-file witness when etcd
    cannot run here (said in the progress log)."""
    server = EtcdServer(workdir / "etcd")
    try:
        server.start()
    except (EtcdMissing, EtcdFailed) as exc:
        progress(f"no etcd ({exc}): the lock-file witness instead")
        server.stop()
        directory = workdir / "witness"
        directory.mkdir(exist_ok=True)
        yield "lock file", f"file:{directory}"
        return
    try:
        yield "etcd", server.spec
    finally:
        server.stop()


def noise_floor(windows: list[Window]) -> Optional[dict[str, float]]:
    """How much the unprotected throughput of one guest moves between two
    unprotected windows with one protected window between them (the
    neighbours a protected window is compared with): |U2 / U1 - 1|."""
    changes = []
    for a, b, c in zip(windows, windows[1:], windows[2:]):
        if (a.system == "none" and c.system == "none" and b.system != "none"
                and a.workload == b.workload == c.workload and a.work_per_s):
            changes.append(abs(c.work_per_s / a.work_per_s - 1))
    if not changes:
        return None
    return {"median": statistics.median(changes), "max": max(changes),
            "pairs": len(changes)}


def summarise(windows: list[Window], memcpy_bw: float = 0.0
              ) -> list[dict[str, Any]]:
    """One row per (system, workload, interval) with the ratios.

    Throughput: each protected window against its own unprotected
    neighbours (Window.baseline_work_per_s), or else the median of all
    unprotected windows of the workload. ``memcpy_bw`` (bytes/s) gives the
    physical bound of a pause: the bytes saved while the guest is stopped
    copied at memory speed. For Curling these bytes come from its trace
    (``stop_phases``); COLO sends a whole checkpoint with the guest
    stopped, so for COLO they are the checkpoint's bytes on the wire."""
    base: dict[str, list[float]] = {}
    for w in windows:
        if w.system == "none":
            base.setdefault(w.workload, []).append(w.work_per_s)
    rows = []
    groups: dict[tuple[str, str, int], list[Window]] = {}
    for w in windows:
        if w.system != "none" and w.interval is not None:
            groups.setdefault((w.system, w.workload, w.interval), []).append(w)
    for (system, workload, interval), ws in sorted(groups.items()):
        fallback = statistics.median(base.get(workload, [0])) or None
        ratios = []
        for w in ws:
            ref = w.baseline_work_per_s or fallback
            if ref:
                ratios.append(w.work_per_s / ref)
        pauses = [p for w in ws for p in w.pauses_ms]
        phases = [ph for w in ws for ph in w.stop_phases]
        secs = sum(w.seconds for w in ws)
        cps = sum(w.checkpoints for w in ws)
        wire = sum(w.sender_bytes for w in ws)
        row = {
            "system": system, "workload": workload, "interval": interval,
            "throughput_ratio": statistics.median(ratios) if ratios else None,
            "throughput_min": min(ratios) if ratios else None,
            "throughput_max": max(ratios) if ratios else None,
            "throughput_spread": (max(ratios) - min(ratios)) if len(ratios) > 1 else 0,
            "checkpoints_per_s": cps / secs if secs else 0,
            "pause_median_ms": percentile(pauses, 0.5),
            "pause_p99_ms": percentile(pauses, 0.99),
            "pause_max_ms": max(pauses) if pauses else None,
            "stalls": sum(1 for p in pauses if p > STALL_S * 1000),
            "bytes_per_checkpoint": wire / cps if cps else None,
            "bandwidth_mb_s": wire / secs / 1e6 if secs else 0,
            "sender_cpu": sum(w.sender_cpu_s for w in ws) / secs if secs else 0,
            "receiver_cpu": (sum(w.receiver_cpu_s or 0 for w in ws) / secs
                             if secs else 0),
            "receiver_rss_mb": max((w.receiver_rss or 0) for w in ws) / 1e6,
            "ack_ms": (statistics.mean(acks) if (acks := [
                w.ack_ms for w in ws if w.ack_ms is not None]) else None),
            "vcpu_share": thread_share(ws, "vcpu"),
            "migration_share": thread_share(ws, "migration"),
            "clock_ppm": median_clock_ppm(ws),
            "windows": len(ws),
        }
        if phases:
            row["stop_bytes"] = percentile([float(ph[4]) for ph in phases], 0.5)
            for i, name in enumerate(("stop", "ram", "devices", "start")):
                row[f"phase_{name}_us"] = percentile([float(ph[i]) for ph in phases], 0.5)
        elif not is_curling(system):
            row["stop_bytes"] = row["bytes_per_checkpoint"]
        stop_bytes = row.get("stop_bytes")
        row["bound_ms"] = (stop_bytes / memcpy_bw * 1000
                           if stop_bytes is not None and memcpy_bw else None)
        row["pause_vs_bound"] = (row["pause_median_ms"] / row["bound_ms"]
                                 if row["bound_ms"] and row["pause_median_ms"]
                                 else None)
        rows.append(row)
    return rows


def median_clock_ppm(windows: Iterable[Window]) -> Optional[float]:
    """Median clock drift of the windows that measured it."""
    drifts = [w.clock_ppm for w in windows if w.clock_ppm is not None]
    return statistics.median(drifts) if drifts else None


def unprotected_clock_ppm(windows: list[Window]) -> Optional[float]:
    """Median clock drift of the unprotected windows: the noise floor of
    the guest clock column."""
    return median_clock_ppm(w for w in windows if w.system == "none")


def thread_share(ws: list[Window], kind: str) -> Optional[float]:
    """Share of a host CPU the sender's ``kind`` threads used over the
    windows that measured threads."""
    measured = [w for w in ws if w.sender_threads]
    secs = sum(w.seconds for w in measured)
    return (sum(w.sender_threads.get(kind, 0.0) for w in measured) / secs
            if secs else None)


def tls_pairs(rows: list[dict[str, Any]]
              ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(plain Curling, Curling over TLS) rows of the same workload and
    interval, measured in turn on the same sender."""
    plain = {(r["workload"], r["interval"]): r for r in rows
             if r["system"] == TLS_TWIN}
    return [(plain[(r["workload"], r["interval"])], r) for r in rows
            if r["system"] == TLS_SYSTEM
            and (r["workload"], r["interval"]) in plain]


def tls_targets(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """TLS keeps Curling's speed: at every interval and workload measured
    both ways, the median pause over TLS is at most 25% (+0.05 ms) above
    plain Curling's (TLS must not reach into the pause), and the guest
    keeps its time: the share of its core its vCPU thread got is at most
    5 points below.  (The guest's own throughput ratio is in the table
    too, but the machine's noise between windows is as large as the
    difference.)"""
    pairs = tls_pairs(rows)
    if not pairs:
        return []
    pause_ok = all(t["pause_median_ms"] is not None and
                   p["pause_median_ms"] is not None and
                   t["pause_median_ms"] <= p["pause_median_ms"] * 1.25 + 0.05
                   for p, t in pairs)
    tput_ok = all(t.get("vcpu_share") is not None and
                  p.get("vcpu_share") is not None and
                  t["vcpu_share"] >= p["vcpu_share"] - 0.05
                  for p, t in pairs)
    pauses = ", ".join(f"{p['workload']}@{p['interval']} "
                       f"{fmt(p['pause_median_ms'])}/"
                       f"{fmt(t['pause_median_ms'])}" for p, t in pairs)
    tputs = ", ".join(f"{p['workload']}@{p['interval']} "
                      f"{fmt(p.get('vcpu_share'), '.1%')}/"
                      f"{fmt(t.get('vcpu_share'), '.1%')}"
                      for p, t in pairs)
    return [target("TLS: median pause at most 25% (+0.05 ms) above plain "
                   "Curling's", pause_ok, f"plain/TLS ms: {pauses}"),
            target("TLS: the guest's share of its core at most 5 points "
                   "below plain Curling's", tput_ok,
                   f"vCPU thread, plain/TLS: {tputs}")]


def tls_report(rows: list[dict[str, Any]]) -> list[str]:
    """The cost of TLS, plain and TLS rows side by side."""
    pairs = tls_pairs(rows)
    if not pairs:
        return []
    out = ["## The cost of TLS", "",
           "The same guest on the same sender protected with TLS and "
           "without (curling-tls and curling-tcp in the table above), in "
           "turn, each window compared with the unprotected windows around "
           "it. Cycle: "
           "host time per checkpoint (interval, live phase, pause, sending "
           "and the acknowledgement); ack: from the end of the interval to "
           "the acknowledgement (mean). Guest CPU: share of the sender's "
           "core its vCPU thread got; migration CPU: what the migration "
           "threads (saving, encrypting, sending) took of it; both from "
           "the threads' own CPU time.", "",
           "| workload | interval ms | throughput plain | TLS | pause median "
           "ms plain | TLS | p99 plain | TLS | cycle ms plain | TLS "
           "| ack ms plain | TLS | MB/s plain | TLS | guest CPU plain | TLS "
           "| migration CPU plain | TLS | receiver CPU plain | TLS |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def cycle(r: dict[str, Any]) -> str:
        return (fmt(1000 / r["checkpoints_per_s"], ".1f")
                if r["checkpoints_per_s"] else "-")

    for p, t in pairs:
        out.append(
            f"| {p['workload']} | {p['interval']} "
            f"| {fmt(p['throughput_ratio'], '.1%')} "
            f"| {fmt(t['throughput_ratio'], '.1%')} "
            f"| {fmt(p['pause_median_ms'])} | {fmt(t['pause_median_ms'])} "
            f"| {fmt(p['pause_p99_ms'])} | {fmt(t['pause_p99_ms'])} "
            f"| {cycle(p)} | {cycle(t)} "
            f"| {fmt(p.get('ack_ms'))} | {fmt(t.get('ack_ms'))} "
            f"| {p['bandwidth_mb_s']:.1f} | {t['bandwidth_mb_s']:.1f} "
            f"| {fmt(p.get('vcpu_share'), '.1%')} "
            f"| {fmt(t.get('vcpu_share'), '.1%')} "
            f"| {fmt(p.get('migration_share'), '.1%')} "
            f"| {fmt(t.get('migration_share'), '.1%')} "
            f"| {p['receiver_cpu']:.0%} | {t['receiver_cpu']:.0%} |")
    out.append("")
    return out


def write_json(path: pathlib.Path, meta: dict[str, Any], windows: list[Window],
               failover: dict[str, list[float]],
               targets: Optional[list[dict[str, str]]] = None,
               net: Optional[list[dict[str, Any]]] = None,
               disk: Optional[list[dict[str, Any]]] = None,
               app: Optional[list[dict[str, Any]]] = None) -> None:
    path.write_text(json.dumps({
        "meta": meta,
        "targets": targets or [],
        "windows": [dataclasses.asdict(w) for w in windows],
        "failover_s": failover,
        "net": net or [],
        "disk": disk or [],
        "app": app or [],
    }, indent=1) + "\n")


def read_net_json(path: pathlib.Path) -> list[dict[str, Any]]:
    """The network points of a bench.json (none in older ones)."""
    return list(json.loads(path.read_text()).get("net", []))


def read_disk_json(path: pathlib.Path) -> list[dict[str, Any]]:
    """The disk points of a bench.json (none in older ones)."""
    return list(json.loads(path.read_text()).get("disk", []))


def read_app_json(path: pathlib.Path) -> list[dict[str, Any]]:
    """The application points of a bench.json (none in older ones)."""
    return list(json.loads(path.read_text()).get("app", []))


def read_json(path: pathlib.Path) -> tuple[dict[str, Any], list[Window],
                                           dict[str, list[float]]]:
    """(meta, windows, failover) of a bench.json written by write_json."""
    data = json.loads(path.read_text())
    windows = []
    for d in data["windows"]:
        d = dict(d)
        d["stop_phases"] = [tuple(ph) for ph in d.get("stop_phases", [])]
        windows.append(Window(**d))
    return data["meta"], windows, data["failover_s"]


def event_pauses(events: list[dict[str, Any]]) -> list[float]:
    """The guest's pauses (ms), from STOP/RESUME QMP events (COLO's)."""
    pauses, stopped = [], None
    for ev in events:
        ts = ev["timestamp"]["seconds"] + ev["timestamp"]["microseconds"] / 1e6
        if ev["event"] == "STOP":
            stopped = ts
        elif ev["event"] == "RESUME" and stopped is not None:
            pauses.append((ts - stopped) * 1000)
            stopped = None
    return pauses


def window_mean(info0: dict[str, Any], info1: dict[str, Any],
                key: str) -> Optional[float]:
    """The mean of query-curling's ``key`` (a mean over every checkpoint
    so far) over the checkpoints between the readings ``info0`` and
    ``info1`` alone."""
    n = info1["checkpoints"] - info0["checkpoints"]
    if n <= 0 or key not in info1:
        return None
    return (info1[key] * info1["checkpoints"]
            - info0.get(key, 0) * info0["checkpoints"]) / n


class SectionBench:
    """What the extra sections of the benchmark (network, disks) share:
    the QEMU and guest, a work folder, the window, and VMs pinned as the
    main rows pin them (a sender on the first CPU, a receiver on the
    second). ``progress`` gets a line per step."""

    #: Prefix of the files of this section's VMs in the work folder.
    PREFIX = "section"

    def __init__(self, qemu: pathlib.Path, guest: Any, workdir: pathlib.Path,
                 accel: str, window: float, mem: str, cpus: tuple[int, int],
                 progress: Callable[[str], None]) -> None:
        self.qemu = qemu
        self.guest = guest
        self.workdir = workdir
        self.accel = accel
        self.window = window
        self.mem = mem
        self.cpus = cpus
        self.progress = progress

    def start_vm(self, name: str, append: str, extra_args: list[str],
                 incoming: Optional[str] = None,
                 wrap: Callable[[list[str]], list[str]] = lambda a: a,
                 pinned: bool = True, **guest: Any) -> VM:
        """Launch the test guest as ``name`` (a receiver when
        ``incoming``); ``wrap`` turns the command line into the one to
        run (e.g. inside a network namespace).  ``guest`` are more of
        ``guest_args``'s (another ``guest``, ``mem``, ``machine``, ``smp``,
        ``cmdline``); unless ``pinned`` the VM runs on every CPU."""
        base = self.workdir / f"{self.PREFIX}-{name}"
        console = base.with_name(base.name + "-console.log")
        console.touch()
        qmp = base.with_name(base.name + ".qmp")
        guest.setdefault("guest", self.guest)
        guest.setdefault("mem", self.mem)
        args = guest_args(self.qemu, name=name, accel=self.accel,
                          console=console, qmp_path=qmp, incoming=incoming,
                          append=append, extra_args=extra_args, **guest)
        cpu = self.cpus[1] if incoming else self.cpus[0]
        vm = VM(name, wrap(args), console,
                base.with_name(base.name + "-qemu.log"), qmp,
                logging.getLogger(name),
                cpu_affinity={cpu} if pinned else None)
        vm.launch()
        return vm

    @staticmethod
    def protect(sender: VM, uri: str, timeout: float = 120.0,
                **params: Any) -> None:
        """Protect ``sender`` by the receiver at ``uri`` with ``params``
        (migrate-set-parameters); return once it is protecting."""
        sender.qmp("migrate-set-parameters", **params)
        sender.qmp("migrate", uri=uri)
        wait_until(lambda: sender.qmp("query-curling")["status"]
                   == "protecting", timeout, "protection", 0.1)

    @staticmethod
    def unprotect(sender: VM, timeout: float = 30.0) -> None:
        """Cancel ``sender``'s protection; return once it is cancelled."""
        sender.qmp("migrate_cancel")
        wait_until(lambda: sender.qmp("query-curling")["status"]
                   == "cancelled", timeout, "cancel", 0.1)


def fmt(value: Any, spec: str = ".2f") -> str:
    """``value`` formatted, or "-" when it was not measured."""
    return "-" if value is None else format(value, spec)


def target(name: str, ok: Optional[bool], detail: str) -> dict[str, str]:
    """One target of the report: met, missed or not measured."""
    return {"target": name, "detail": detail,
            "verdict": "not measured" if ok is None
            else "met" if ok else "**missed**"}


def mem_bytes(mem: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(mem[:-1]) * units[mem[-1]] if mem[-1] in units else int(mem)


def check_targets(rows: list[dict[str, Any]], failover: dict[str, list[float]],
                  mem: str, timeout_ms: int = FAILOVER_TIMEOUT_MS
                  ) -> list[dict[str, str]]:
    """The targets of the benchmark, each met, missed or not measured."""
    out: list[dict[str, str]] = []

    def add(name: str, ok: Optional[bool], detail: str) -> None:
        out.append(target(name, ok, detail))

    def row(system: str, workload: str, interval: int) -> Optional[dict[str, Any]]:
        return next((r for r in rows if (r["system"], r["workload"], r["interval"])
                     == (system, workload, interval)), None)

    curling = [r for r in rows if r["system"] == "curling"]
    for interval, goal in ((100, 0.95), (25, 0.80)):
        for wl in ("counter", "dirty-10"):
            r = row("curling", wl, interval)
            t = r and r["throughput_ratio"]
            add(f"throughput >= {goal:.0%} at {interval} ms, {wl}",
                None if t is None else t >= goal,
                "-" if t is None else
                f"{t:.1%} (windows {r['throughput_min']:.1%}..{r['throughput_max']:.1%})")
    pairs = []
    for r in curling:
        c = row("colo-nodelay", r["workload"], r["interval"])
        if c and c["pause_median_ms"] and r["pause_median_ms"]:
            pairs.append((r["pause_median_ms"] / c["pause_median_ms"], r, c))
    if pairs:
        worst = max(pairs, key=lambda p: p[0])
        add("median pause below COLO's (with TCP_NODELAY) at every interval",
            all(p[0] < 1 for p in pairs),
            f"{len(pairs)} points; closest: {worst[1]['workload']} "
            f"{worst[1]['interval']} ms, {worst[1]['pause_median_ms']:.2f} vs "
            f"{worst[2]['pause_median_ms']:.2f} ms")
    else:
        add("median pause below COLO's (with TCP_NODELAY) at every interval",
            None, "no COLO-nodelay rows")
    bounds = [r["pause_vs_bound"] for r in curling if r["pause_vs_bound"]]
    add("median pause within 3x of the physical bound",
        None if not bounds else max(bounds) <= 3,
        "-" if not bounds else f"{min(bounds):.0f}x to {max(bounds):.0f}x")
    stalls = sum(r["stalls"] for r in curling)
    worst_pause = max((r["pause_max_ms"] or 0 for r in curling), default=None)
    add("no stall over 1 s", None if not curling else stalls == 0,
        "-" if not curling else f"{stalls} stalls; longest pause {worst_pause:.1f} ms")
    for prefix, limit, what in (
            ("SIGKILL", 500.0, "failover <= 0.5 s after a broken connection (kill -9)"),
            ("SIGSTOP", timeout_ms + 500.0,
             f"failover <= curling-timeout + 0.5 s = {(timeout_ms + 500) / 1000:.1f} s "
             "for a silent sender (SIGSTOP)"),
            (WITNESS_PREFIX + "SIGKILL", timeout_ms + 500.0,
             "with agents and a witness: failover <= curling-timeout + 0.5 s "
             "after kill -9"),
            (WITNESS_PREFIX + "SIGSTOP", timeout_ms + 500.0,
             "with agents and a witness: failover <= curling-timeout + 0.5 s "
             "for a silent sender")):
        times = next((v for k, v in failover.items() if k.startswith(prefix)), None)
        if not times:
            add(what, None, "-")
            continue
        ms = [t * 1000 for t in times]
        add(what, statistics.median(ms) <= limit,
            f"median {statistics.median(ms):.0f} ms, max {max(ms):.0f} ms "
            f"over {len(ms)} rounds")
    if curling:
        rss = max(r["receiver_rss_mb"] for r in curling) * 1e6
        ckpt = max(r["bytes_per_checkpoint"] or 0 for r in curling)
        limit = mem_bytes(mem) + ckpt
        add("receiver memory <= guest RAM + one checkpoint", rss <= limit,
            f"RSS at most {rss / 1e6:.0f} MB; limit {limit / 1e6:.0f} MB "
            f"({mem} + {ckpt / 1e6:.1f} MB)")
    return out


def write_report(path: pathlib.Path, meta: dict[str, Any],
                 rows: list[dict[str, Any]],
                 failover: dict[str, list[float]], plots: list[str],
                 notes: Iterable[str] = (),
                 extra_targets: Iterable[dict[str, str]] = (),
                 sections: Iterable[str] = ()) -> None:
    accel = meta["accel"].upper()
    unprotected_ppm = meta.get("unprotected_clock_ppm")
    out = [f"# Curling benchmark ({meta['date']})", "",
           f"Accelerator: **{accel}**. Machine: {meta['cpus']} CPUs; "
           f"sender/primary pinned to CPU {meta['pin'][0]}, receiver/secondary "
           f"to CPU {meta['pin'][1]}. Guest: {meta['mem']} RAM, -machine pc, "
           f"{meta['kernel']}. Window {meta['window']} s per point. "
           f"memcpy bandwidth {meta['memcpy_gb_s']:.2f} GB/s.", "",
           f"Command: `{meta['command']}`", ""]
    targets = check_targets(rows, failover, meta["mem"]) + list(extra_targets)
    out += [f"## Targets ({accel})", "", "| target | verdict | measured |",
            "|---|---|---|"]
    out += [f"| {t['target']} | {t['verdict']} | {t['detail']} |" for t in targets]
    out += [""]
    noise = meta.get("noise")
    if noise:
        out += [f"Noise floor: the same guest's unprotected throughput moved by "
                f"{noise['median']:.1%} (median; max {noise['max']:.1%}) between "
                f"the two unprotected windows around one protected window "
                f"({noise['pairs']} pairs), so a single window's ratio is only "
                f"good to a few per cent; the rows give the median of the "
                f"repetitions.", ""]
    out += [f"## Cost of protection ({accel})", "",
            "| system | workload | interval ms | throughput | min..max | ckpt/s "
            "| pause median ms | p99 | max | stalls | MB/ckpt | stopped KB "
            "| bound ms | pause/bound | MB/s | sender CPU | receiver CPU "
            "| receiver RSS MB | guest clock ppm |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
            "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        bpc = r["bytes_per_checkpoint"]
        stop = r.get("stop_bytes")
        spread = ("-" if r["throughput_min"] is None else
                  f"{r['throughput_min']:.0%}..{r['throughput_max']:.0%}")
        out.append(
            f"| {r['system']} | {r['workload']} | {r['interval']} "
            f"| {fmt(r['throughput_ratio'], '.1%')} | {spread} "
            f"| {r['checkpoints_per_s']:.1f} "
            f"| {fmt(r['pause_median_ms'])} | {fmt(r['pause_p99_ms'])} "
            f"| {fmt(r['pause_max_ms'])} | {r['stalls']} "
            f"| {fmt(bpc and bpc / 1e6, '.3f')} | {fmt(stop and stop / 1e3, '.1f')} "
            f"| {fmt(r['bound_ms'], '.4f')} | {fmt(r['pause_vs_bound'], '.0f')} "
            f"| {r['bandwidth_mb_s']:.1f} | {r['sender_cpu']:.0%} "
            f"| {r['receiver_cpu']:.0%} | {r['receiver_rss_mb']:.0f} "
            f"| {fmt(r.get('clock_ppm'), '+.0f')} |")
    out += ["", "Throughput: the guest's work per host second protected, divided "
            "by the same guest's unprotected throughput in the windows just before "
            "and after (median over the repetitions; min..max of the windows). "
            "Stopped KB: bytes saved while the guest was stopped (median; for "
            "COLO, which sends the whole checkpoint with the guest stopped, the "
            "checkpoint's bytes on the wire); bound: those bytes at memcpy speed. "
            "CPU: share of one host CPU each QEMU used; COLO's secondary runs the "
            "guest too, so its CPU includes guest execution. Guest clock: how "
            "far the sender's guest's CLOCK_MONOTONIC ran ahead (+) or behind "
            "(-) the host's over the window, in parts per million (median; "
            f"unprotected windows: {fmt(unprotected_ppm, '+.0f')}), read from "
            "guest memory to within about 2 ms at each end of the window.", ""]
    phased = [r for r in rows if "phase_stop_us" in r]
    if phased:
        out += [f"## Where Curling's pause goes ({accel})", "",
                "Medians per checkpoint, from trace event curling_stop_phase: "
                "stopping the vCPUs, saving the RAM still dirty, saving every "
                "device, starting the vCPUs.", "",
                "| workload | interval ms | stop us | RAM us | devices us "
                "| start us | stopped KB | pause median ms |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in phased:
            out.append(
                f"| {r['workload']} | {r['interval']} | {r['phase_stop_us']:.0f} "
                f"| {r['phase_ram_us']:.0f} | {r['phase_devices_us']:.0f} "
                f"| {r['phase_start_us']:.0f} | {r['stop_bytes'] / 1e3:.1f} "
                f"| {fmt(r['pause_median_ms'])} |")
        out.append("")
    if failover:
        out += [f"## Failover time ({accel})", "",
                "Sender signalled -> first guest output line at the receiver.", "",
                "| sender | rounds | median ms | min | max |", "|---|---:|---:|---:|---:|"]
        for kind, times in failover.items():
            ms = [t * 1000 for t in times]
            out.append(f"| {kind} | {len(ms)} | {statistics.median(ms):.0f} "
                       f"| {min(ms):.0f} | {max(ms):.0f} |")
        out.append("")
    out += list(sections)
    systems = {r["system"] for r in rows}
    out += ["## The systems", ""]
    out += [f"- **{name}**: {text}" for name, text in SYSTEM_NOTES.items()
            if name in systems]
    out += [""]
    for note in notes:
        out += [note, ""]
    for plot in plots:
        out += [f"![{plot}]({plot})", ""]
    path.write_text("\n".join(out) + "\n")


def plot(outdir: pathlib.Path, rows: list[dict[str, Any]],
         windows: list[Window]) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    # workloads that count work (idle does not)
    workloads = sorted({r["workload"] for r in rows
                        if r["throughput_ratio"] is not None}) or ["-"]
    systems = sorted({r["system"] for r in rows})
    intervals = sorted({r["interval"] for r in rows})
    fig, axes = plt.subplots(1, len(workloads), figsize=(4 * len(workloads), 3.5),
                             squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        for system in systems:
            pts = sorted((r["interval"], r["throughput_ratio"]) for r in rows
                         if r["workload"] == wl and r["system"] == system
                         and r["throughput_ratio"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=system)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(intervals, [str(i) for i in intervals])
        ax.set_ylim(0, 1.15)
        ax.set_title(wl)
        ax.set_xlabel("checkpoint interval (ms)")
        ax.set_ylabel("throughput vs unprotected")
        ax.axhline(1.0, color="grey", lw=0.5)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(outdir / "overhead.png", dpi=90)
    plt.close(fig)
    names.append("overhead.png")

    fig, ax = plt.subplots(figsize=(12, 4))
    labels, data = [], []
    for w_sys in systems:
        for interval in sorted({w.interval for w in windows if w.system == w_sys}):
            pauses = [p for w in windows if w.system == w_sys
                      and w.interval == interval for p in w.pauses_ms]
            if pauses:
                labels.append(f"{w_sys}\n{interval}")
                data.append(pauses)
    if data:
        ax.boxplot(data, showfliers=True)
        ax.set_xticks(range(1, len(labels) + 1), labels, fontsize="x-small",
                      rotation=60)
        ax.set_yscale("log")
        ax.set_ylabel("guest pause per checkpoint (ms)")
        fig.tight_layout()
        fig.savefig(outdir / "pauses.png", dpi=90)
        names.append("pauses.png")
    plt.close(fig)
    return names


def new_workdir() -> pathlib.Path:
    return pathlib.Path(tempfile.mkdtemp(prefix="curling-bench-"))
