# SPDX-License-Identifier: GPL-2.0-or-later
"""Run QEMU with the test guest and drive it: QMP, serial console, lifetime.

Shared by the functional tests (tests/avocado/curling_test.py), the demo
and the benchmark. ``guest_args()`` builds the command line of a QEMU
running the test guest; ``VM`` starts it, talks QMP to it, reads the
ticks its workload prints on the serial console and makes sure that it
does not outlive the Python process that started it.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import dataclasses
import logging
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import time
from typing import Any, Callable, Iterable, Optional, Protocol, TypeVar

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from . import CurlingError
from .guest import GuestError, GuestImage, build_guest

KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"


class Bootable(Protocol):
    """A guest QEMU boots with -kernel and -initrd (GuestImage,
    DebianImage)."""

    @property
    def kernel(self) -> pathlib.Path: ...

    @property
    def initrd(self) -> pathlib.Path: ...


TICK_RE = re.compile(
    r"curling: tick=(?P<n>\d+) work=(?P<work>\d+) pages=(?P<pages>\d+) "
    r"check=(?P<check>\w+)(?: (?P<detail>.*))?")

#: A line of the guest's device load (curling.devices=1), e.g.
#: ``curling: devices disk=12 rng=40 ... err=0 vda=12 eth0=30/28``.
DEVICES_RE = re.compile(r"curling: devices((?: [\w.-]+=\d+(?:/\d+)*)+)\s*$")

#: A line of the guest's disk self-check (curling.diskcheck=DEV), e.g.
#: ``curling: diskcheck dev=vda writes=120 checks=9 check=ok``.
DISKCHECK_RE = re.compile(
    r"curling: diskcheck dev=(?P<dev>\w+) writes=(?P<writes>\d+) "
    r"checks=(?P<checks>\d+) check=(?P<check>\w+)(?: (?P<detail>.*))?")

#: Where the guest publishes its clock (curling.clock=1), e.g.
#: ``curling: clock phys=0x3a2f000``.
CLOCK_PAGE_RE = re.compile(r"curling: clock phys=0x(?P<phys>[0-9a-f]+)")

#: What HMP ``xp /1gx ADDR`` prints, e.g.
#: ``000000003a2f000: 0x000000123456789a``.
XP_RE = re.compile(r"^\s*[0-9a-f]+:\s+0x(?P<value>[0-9a-f]+)\s*$", re.M)

T = TypeVar("T")

# Every QEMU started by this module, so that nothing outlives the test.
_PROCESSES: set[subprocess.Popen] = set()


def _kill_all_processes() -> None:
    for proc in list(_PROCESSES):
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        _PROCESSES.discard(proc)


atexit.register(_kill_all_processes)


def die_with_parent() -> None:
    """In the child: get SIGKILL when the test process goes away.

    The signal follows the thread that started the child, not the
    process: start such children from a thread that lives as long as
    they should (the test's own thread)."""
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


class WaitTimeout(AssertionError):
    """A wait ran past its deadline: the guest or QEMU did not do it in time."""


class VMDied(AssertionError):
    """A QEMU process exited while a test was waiting on it."""


def wait_until(predicate: Callable[[], Optional[T]], timeout: float,
               what: str, interval: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something truthy, or time out."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Tick:
    """One ``curling: tick=...`` line of the guest workload."""

    n: int
    work: int
    pages: int
    check: str
    detail: str
    line: str

    @property
    def ok(self) -> bool:
        return self.check in ("ok", "skip")


def parse_ticks(text: str) -> list[Tick]:
    ticks = []
    for line in text.splitlines():
        m = TICK_RE.search(line)
        if m:
            ticks.append(Tick(n=int(m["n"]), work=int(m["work"]),
                              pages=int(m["pages"]), check=m["check"],
                              detail=m["detail"] or "", line=line.strip()))
    return ticks


@dataclasses.dataclass(frozen=True)
class DiskCheck:
    """One ``curling: diskcheck ...`` line: the blocks the guest rewrote
    and the read-backs it compared with its version table so far."""

    dev: str
    writes: int
    checks: int
    check: str
    line: str

    @property
    def ok(self) -> bool:
        return self.check == "ok"


def parse_diskchecks(text: str) -> list[DiskCheck]:
    checks = []
    for line in text.splitlines():
        m = DISKCHECK_RE.search(line)
        if m:
            checks.append(DiskCheck(dev=m["dev"], writes=int(m["writes"]),
                                    checks=int(m["checks"]),
                                    check=m["check"], line=line.strip()))
    return checks


def parse_clock_page(text: str) -> Optional[int]:
    """The guest-physical address of the guest's clock page, as it last
    said (None before it said)."""
    found = CLOCK_PAGE_RE.findall(text)
    return int(found[-1], 16) if found else None


def freshest_clock_reading(readings: list[tuple[int, float]]
                           ) -> tuple[int, float]:
    """Of clock readings (guest ns, host s at the end of the read), the one
    whose guest clock is furthest ahead of the host's: the least stale."""
    return max(readings, key=lambda r: r[0] / 1e9 - r[1])


def parse_xp_u64(text: str) -> int:
    """The value HMP ``xp /1gx`` printed."""
    m = XP_RE.search(text)
    if not m:
        raise ValueError(f"not an xp /1gx answer: {text!r}")
    return int(m["value"], 16)


@dataclasses.dataclass(frozen=True)
class DeviceReport:
    """One ``curling: devices ...`` line of the guest workload: a counter
    per device class (``disk``, ``rng``, ``net``, ``netrx``, ``tty``,
    ``input``), ``err`` and one per disk and NIC (a NIC's is tx/rx)."""

    counters: dict[str, tuple[int, ...]]
    line: str

    def total(self, key: str) -> int:
        return sum(self.counters.get(key, (0,)))


def parse_device_reports(text: str) -> list[DeviceReport]:
    reports = []
    for line in text.splitlines():
        m = DEVICES_RE.search(line)
        if m:
            counters = {}
            for item in m[1].split():
                key, value = item.split("=", 1)
                counters[key] = tuple(int(v) for v in value.split("/"))
            reports.append(DeviceReport(counters=counters, line=line.strip()))
    return reports


class VM:
    """One QEMU process: QMP monitor, serial console, lifetime."""

    def __init__(self, name: str, args: list[str], console: pathlib.Path,
                 qemu_log: pathlib.Path, qmp_path: pathlib.Path,
                 log: logging.Logger,
                 cpu_affinity: Optional[Iterable[int]] = None) -> None:
        self.name = name
        self.cpu_affinity = set(cpu_affinity) if cpu_affinity is not None else None
        self.args = args
        self.console_path = console
        self.qemu_log_path = qemu_log
        self.qmp_path = qmp_path
        self.log = log
        self.events: list[dict[str, Any]] = []   # every event seen, in order
        self._unclaimed: list[dict[str, Any]] = []  # not yet returned by wait_event
        self._proc: Optional[subprocess.Popen] = None
        self._qmp: Optional[QEMUMonitorProtocol] = None
        self.exitcode: Optional[int] = None

    # -- lifetime --------------------------------------------------------

    def launch(self, timeout: float = 30.0) -> None:
        self.log.info("%s: %s", self.name, shlex.join(self.args))
        affinity = self.cpu_affinity

        def child_setup() -> None:
            die_with_parent()
            if affinity:
                os.sched_setaffinity(0, affinity)

        with self.qemu_log_path.open("ab") as out:
            self._proc = subprocess.Popen(
                self.args, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, preexec_fn=child_setup)
        _PROCESSES.add(self._proc)

        def connected() -> bool:
            self._check_alive("its QMP socket")
            if not self.qmp_path.exists():
                return False
            qmp = QEMUMonitorProtocol(str(self.qmp_path), nickname=self.name)
            try:
                qmp.connect()
            except (QMPError, OSError):
                qmp.close()
                return False
            self._qmp = qmp
            return True

        wait_until(connected, timeout, f"{self.name}'s QMP socket")
        self.log.info("%s: pid %d, QMP on %s", self.name, self.pid,
                      self.qmp_path)

    @property
    def pid(self) -> int:
        assert self._proc is not None, f"{self.name} was never launched"
        return self._proc.pid

    def is_running(self) -> bool:
        """Whether QEMU still runs; once it ended, ``exitcode`` says how."""
        if self._proc is None:
            return False
        if self._proc.poll() is None:
            return True
        self.exitcode = self._proc.returncode
        return False

    def _check_alive(self, waiting_for: str) -> None:
        if self._proc is not None and not self.is_running():
            raise VMDied(f"{self.name} (pid {self._proc.pid}) exited with "
                         f"{self.exitcode} while waiting for {waiting_for}; "
                         f"last output: {self.qemu_output_tail()!r}")

    def qemu_output_tail(self, lines: int = 5) -> str:
        try:
            text = self.qemu_log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _close_qmp(self) -> None:
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:  # the peer may be gone already
                pass
            self._qmp = None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send ``sig`` and wait for the process to end; returns its exit code."""
        assert self._proc is not None, f"{self.name} was never launched"
        if self._proc.poll() is None:
            self.log.info("%s: sending signal %d to pid %d", self.name, sig,
                          self._proc.pid)
            os.kill(self._proc.pid, sig)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._close_qmp()
        self.exitcode = self._proc.returncode
        _PROCESSES.discard(self._proc)
        return self.exitcode

    def shutdown(self, timeout: float = 10.0) -> None:
        """Quit through QMP; kill when that does not work in time."""
        if self.is_running() and self._qmp is not None:
            try:
                self._qmp.cmd("quit")
            except Exception:
                pass
            try:
                assert self._proc is not None
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        if self._proc is not None:
            self.kill()

    # -- QMP -------------------------------------------------------------

    def qmp(self, cmd: str, args: Optional[dict[str, Any]] = None,
            **kwargs: Any) -> Any:
        """Run a QMP command and return its "return" value.

        Keyword arguments have ``_`` turned into ``-`` (``max_bandwidth`` is
        sent as ``max-bandwidth``); a dict in ``args`` is sent as it is.
        Raises ``qemu.qmp.ExecuteError`` (``.error_class``, ``str()`` is the
        description) when QEMU answers with an error.
        """
        if self._qmp is None:
            raise VMDied(f"{self.name} has no QMP connection")
        arguments = dict(args or {})
        arguments.update({k.replace("_", "-"): v for k, v in kwargs.items()})
        result = self._qmp.cmd(cmd, **arguments)
        self._collect_events()
        return result

    def _collect_events(self, wait: float = 0.0) -> None:
        if self._qmp is None:
            return
        try:
            while True:
                event = self._qmp.pull_event(wait=float(wait) if wait else False)
                if event is None:
                    return
                self.events.append(event)
                self._unclaimed.append(event)
                wait = 0.0
        except (TimeoutError, asyncio.TimeoutError, QMPError, OSError):
            return

    def wait_event(self, name: str, timeout: float = 30.0,
                   match: Optional[Callable[[dict[str, Any]], bool]] = None
                   ) -> dict[str, Any]:
        """Return the oldest not yet claimed event called ``name``.

        Events that arrived before the call count, so there is no race with
        the command that triggers them. ``match`` narrows by data, e.g.
        ``lambda e: e["data"]["status"] == "completed"``.
        """
        deadline = time.monotonic() + timeout
        while True:
            for event in self._unclaimed:
                if event.get("event") == name and (match is None or match(event)):
                    self._unclaimed.remove(event)
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"timed out after {timeout:g} s waiting for "
                                  f"event {name} on {self.name}")
            self._check_alive(f"event {name}")
            self._collect_events(wait=min(remaining, 0.5))

    # -- serial console --------------------------------------------------

    def console(self) -> str:
        """Everything the guest printed on its serial console so far."""
        try:
            return self.console_path.read_text(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def console_mark(self) -> int:
        """Position in the console output, for ``since=`` of the waits."""
        return len(self.console())

    def wait_console(self, regex: str, timeout: float = 30.0,
                     since: int = 0) -> re.Match[str]:
        """Wait until the console (from offset ``since``) matches ``regex``."""
        pattern = re.compile(regex)

        def found() -> Optional[re.Match[str]]:
            m = pattern.search(self.console(), since)
            if m is None:
                self._check_alive(f"console output /{regex}/")
            return m

        return wait_until(found, timeout, f"/{regex}/ on {self.name}'s console")

    def ticks(self, since: int = 0) -> list[Tick]:
        """Tick lines printed so far (from console offset ``since``)."""
        return parse_ticks(self.console()[since:])

    def device_reports(self, since: int = 0) -> list[DeviceReport]:
        """Device load lines printed so far (from console offset ``since``)."""
        return parse_device_reports(self.console()[since:])

    def diskchecks(self, since: int = 0) -> list[DiskCheck]:
        """Disk self-check lines printed so far (from offset ``since``)."""
        return parse_diskchecks(self.console()[since:])

    def guest_clock_ns(self, phys: Optional[int] = None, samples: int = 16
                       ) -> Optional[tuple[int, float]]:
        """(the guest's CLOCK_MONOTONIC in ns, this host's monotonic clock
        in s at that moment), read from guest memory; None until a guest
        with curling.clock=1 said where its clock is.  ``phys`` is the
        clock page's address when this VM's console does not say it (a
        receiver that took over the guest).

        The page is at most as new as the moment its read ends: a reading
        paired with that moment puts the guest's clock behind by how stale
        the page was (up to its 2 ms update period, more while the guest
        does not run) plus the monitor's round trip.  Of ``samples``
        readings in a row the one furthest ahead is the least stale, so
        a host that is busy for a moment does not pass for drift."""
        phys = phys if phys is not None else parse_clock_page(self.console())
        if phys is None:
            return None
        readings = []
        for _ in range(max(1, samples)):
            text = self.qmp("human-monitor-command",
                            command_line=f"xp /1gx {phys:#x}")
            readings.append((parse_xp_u64(text), time.monotonic()))
            time.sleep(0.0005)
        return freshest_clock_reading(readings)

    def last_tick(self) -> Optional[Tick]:
        ticks = self.ticks()
        return ticks[-1] if ticks else None

    def wait_tick(self, n: int = 1, timeout: float = 30.0,
                  since: int = 0) -> Tick:
        """Wait for a tick line numbered ``n`` or more; return the first one."""
        def found() -> Optional[Tick]:
            for tick in self.ticks(since):
                if tick.n >= n:
                    return tick
            self._check_alive(f"tick {n}")
            return None

        return wait_until(found, timeout, f"tick {n} on {self.name}", 0.2)

    def wait_ticks(self, count: int, timeout: float = 30.0,
                   since: int = 0) -> list[Tick]:
        """Wait until ``count`` tick lines appeared after offset ``since``."""
        def found() -> Optional[list[Tick]]:
            ticks = self.ticks(since)
            if len(ticks) >= count:
                return ticks
            self._check_alive(f"{count} ticks")
            return None

        return wait_until(found, timeout, f"{count} ticks on {self.name}", 0.2)


def guest_args(qemu: os.PathLike[str] | str, guest: Bootable, name: str, *,
               accel: str, console: pathlib.Path, qmp_path: pathlib.Path,
               incoming: Optional[str] = None, mem: str = "256M",
               machine: str = "pc",
               append: str = "curling.mode=dirty curling.rate=1",
               extra_args: Iterable[str] = (),
               smp: int = 1, defaults: bool = False,
               console_chardev: Optional[str] = None,
               cmdline: str = KERNEL_CMDLINE) -> list[str]:
    """Command line of a QEMU running the test guest (or another
    ``guest``'s kernel and initramfs, with ``cmdline`` before ``append``:
    the application guest).

    The serial console goes to the file ``console`` (or to the chardev
    ``console_chardev``, e.g. ``socket,host=...,server=on,wait=off``,
    with ``console`` as its log file), QMP listens on the unix socket
    ``qmp_path``. A migration's two sides must have the same
    arguments but ``incoming``. The machine has ``smp`` vCPUs and no
    device but the serial port unless ``defaults`` keeps the machine's
    default devices (VGA, NIC, CD-ROM, parallel port...: no
    ``-nodefaults``, no ``-nic none``).
    """
    if smp < 1:
        raise ValueError(f"smp must be at least 1, not {smp}")
    args = [
        str(qemu),
        # thread names (CPU 0/TCG, mig/src/main...) for per-thread CPU
        "-name", f"{name},debug-threads=on",
        "-machine", machine,
        "-accel", accel,
        "-m", mem,
        "-smp", str(smp),
        *(() if defaults else ("-nodefaults",)),
        "-display", "none",
        "-no-reboot",
        *(() if defaults else ("-nic", "none")),
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", f"{cmdline} {append}".strip(),
        "-chardev", (f"{console_chardev},id=serial0,logfile={console}"
                     if console_chardev else
                     f"file,id=serial0,path={console}"),
        "-serial", "chardev:serial0",
        "-chardev", f"socket,id=qmp,path={qmp_path},server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        *extra_args,
    ]
    if incoming is not None:
        args += ["-incoming", incoming]
    return args


def built_qemu_and_guest(repo: pathlib.Path) -> tuple[pathlib.Path, GuestImage]:
    """build/bin/qemu-system-x86_64 (or ``$CURLING_QEMU``, as for the tests)
    and the test guest of ``repo``.

    Raises CurlingError saying what to run when either is missing.
    """
    qemu = pathlib.Path(os.environ.get(
        "CURLING_QEMU", repo / "build" / "bin" / "qemu-system-x86_64"))
    if not qemu.is_file():
        raise CurlingError(f"{qemu} not found: run python3 scripts/build.py first")
    try:
        return qemu, build_guest(repo)
    except GuestError as exc:
        raise CurlingError(f"no test guest: {exc}") from None
