# SPDX-License-Identifier: GPL-2.0-or-later
"""Base class of the Curling functional tests.

``CurlingTest`` owns everything a test needs around QEMU:

* the binary: ``build/bin/qemu-system-x86_64`` or ``$CURLING_QEMU``;
* the guest: ``build_guest()`` from ``scripts/curlingtool/guest.py``;
* the accelerator: KVM only when a probe guest really boots under it (the
  result is cached in ``build/accel-probe.json``), else TCG;
  ``$CURLING_ACCEL=kvm|tcg`` forces one;
* named VMs (``launch_vm('sender')``) with a QMP monitor on a unix socket,
  QMP events kept for ``wait_event()``, and the serial console captured to
  ``<test logdir>/<name>-console.log`` and parsed into ticks;
* waits with deadlines, and cleanup that kills every process it started.

Guest tests run one at a time even when avocado runs tasks in parallel: a
lock in ``build/`` serialises them, since timing-sensitive guests share the
host's cores.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Optional, TypeVar

import avocado

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from curlingtool.guest import GuestError, GuestImage, build_guest  # noqa: E402

BUILD_DIR = REPO_ROOT / "build"
DEFAULT_QEMU = BUILD_DIR / "bin" / "qemu-system-x86_64"
PROBE_CACHE = BUILD_DIR / "accel-probe.json"
TEST_LOCK = BUILD_DIR / "avocado.lock"

#: Seconds a probe guest gets to print its first tick under KVM.
KVM_PROBE_DEADLINE = 20.0
#: Seconds from QEMU start to the guest's first tick (TCG: ~9 s when idle).
BOOT_TIMEOUT = 120.0
#: Seconds a test waits for another test's guests to finish.
LOCK_TIMEOUT = 3600.0

KERNEL_CMDLINE = "console=ttyS0 quiet panic=-1"

TICK_RE = re.compile(
    r"curling: tick=(?P<n>\d+) work=(?P<work>\d+) pages=(?P<pages>\d+) "
    r"check=(?P<check>\w+)(?: (?P<detail>.*))?")

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


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the test process goes away."""
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
            _die_with_parent()
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
        return self._proc is not None and self._proc.poll() is None

    def _check_alive(self, waiting_for: str) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self.exitcode = self._proc.returncode
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


class CurlingTest(avocado.Test):
    """Base class of every Curling functional test.

    :avocado: disable
    """

    accel: str
    accel_reason: str
    guest: GuestImage
    qemu_bin: pathlib.Path

    def setUp(self) -> None:
        self.vms: dict[str, VM] = {}
        self._lock_file: Optional[Any] = None
        self._tmpdir: Optional[pathlib.Path] = None
        self.logdir_path = pathlib.Path(self.logdir)

        qemu = pathlib.Path(os.environ.get("CURLING_QEMU", DEFAULT_QEMU))
        if not (qemu.is_file() and os.access(qemu, os.X_OK)):
            self.cancel(f"no QEMU binary at {qemu} (run scripts/build.py, "
                        "or set CURLING_QEMU)")
        self.qemu_bin = qemu
        try:
            self.guest = build_guest(REPO_ROOT)
        except GuestError as exc:
            self.cancel(f"no test guest: {exc}")
        self.log.info("QEMU %s; guest %s (kernel %s)", self.qemu_bin,
                      self.guest.directory, self.guest.kernel_version)

        self._tmpdir = pathlib.Path(tempfile.mkdtemp(prefix="curling-"))
        self._acquire_test_lock()
        self.accel, self.accel_reason = self._choose_accel()
        self.log.info("accelerator: %s (%s)", self.accel, self.accel_reason)

    def tearDown(self) -> None:
        for vm in self.vms.values():
            if vm._proc is not None:
                vm.kill()
        for vm in self.vms.values():
            self.log.debug("%s console tail:\n%s", vm.name,
                           "\n".join(vm.console().splitlines()[-5:]))
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- one guest test at a time -----------------------------------------

    def _acquire_test_lock(self) -> None:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        lock = TEST_LOCK.open("w")
        deadline = time.monotonic() + LOCK_TIMEOUT
        logged = False
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not logged:
                    self.log.info("waiting for other guest tests to finish")
                    logged = True
                if time.monotonic() >= deadline:
                    lock.close()
                    raise WaitTimeout(f"{TEST_LOCK} held for {LOCK_TIMEOUT:g} s")
                time.sleep(0.5)
        self._lock_file = lock

    # -- accelerator -------------------------------------------------------

    def _probe_key(self) -> str:
        st = self.qemu_bin.stat()
        try:
            boot_id = pathlib.Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            boot_id = ""
        blob = json.dumps([str(self.qemu_bin.resolve()), st.st_size,
                           st.st_mtime_ns, self.guest.content_hash, boot_id])
        return hashlib.sha256(blob.encode()).hexdigest()

    def _choose_accel(self) -> tuple[str, str]:
        forced = os.environ.get("CURLING_ACCEL")
        if forced:
            return forced, "forced by CURLING_ACCEL"
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            return "tcg", "no usable /dev/kvm"
        key = self._probe_key()
        with (BUILD_DIR / "accel-probe.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                cached = json.loads(PROBE_CACHE.read_text())
                if cached.get("key") == key:
                    return cached["accel"], cached["reason"] + " (cached probe)"
            except (OSError, ValueError, KeyError):
                pass
            accel, reason = self._probe_kvm()
            PROBE_CACHE.write_text(json.dumps(
                {"key": key, "accel": accel, "reason": reason}) + "\n")
            return accel, reason

    def _probe_kvm(self) -> tuple[str, str]:
        """Boot the guest under KVM in a separate QEMU; TCG unless it ticks."""
        self.log.info("probing KVM: booting the guest under it (deadline %g s)",
                      KVM_PROBE_DEADLINE)
        vm = self._make_vm("kvm-probe", accel="kvm", append="curling.mode=idle")
        start = time.monotonic()
        try:
            vm.launch()
            tick = vm.wait_tick(1, timeout=KVM_PROBE_DEADLINE)
            return "kvm", (f"probe guest ticked under KVM after "
                           f"{time.monotonic() - start:.1f} s: {tick.line}")
        except (VMDied, WaitTimeout) as exc:
            return "tcg", f"KVM probe failed: {exc}"
        finally:
            if vm._proc is not None:
                vm.kill()

    # -- VMs ----------------------------------------------------------------

    def _make_vm(self, name: str, *, accel: str, incoming: Optional[str] = None,
                 mem: str = "256M", machine: str = "pc",
                 append: str = "curling.mode=dirty curling.rate=1",
                 extra_args: Iterable[str] = (),
                 cpu_affinity: Optional[Iterable[int]] = None) -> VM:
        stem = name
        n = 2
        while (self.logdir_path / f"{stem}-console.log").exists():
            stem = f"{name}-{n}"
            n += 1
        console = self.logdir_path / f"{stem}-console.log"
        qemu_log = self.logdir_path / f"{stem}-qemu.log"
        assert self._tmpdir is not None
        qmp_path = self._tmpdir / f"{stem}.qmp"
        console.touch()
        args = [
            str(self.qemu_bin),
            "-name", name,
            "-machine", machine,
            "-accel", accel,
            "-m", mem,
            "-smp", "1",
            "-nodefaults",
            "-display", "none",
            "-no-reboot",
            "-nic", "none",
            "-kernel", str(self.guest.kernel),
            "-initrd", str(self.guest.initrd),
            "-append", f"{KERNEL_CMDLINE} {append}".strip(),
            "-chardev", f"file,id=serial0,path={console}",
            "-serial", "chardev:serial0",
            "-chardev", f"socket,id=qmp,path={qmp_path},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            *extra_args,
        ]
        if incoming is not None:
            args += ["-incoming", incoming]
        return VM(name, args, console, qemu_log, qmp_path, self.log,
                  cpu_affinity)

    def launch_vm(self, name: str, incoming: Optional[str] = None,
                  mem: str = "256M", machine: str = "pc",
                  append: str = "curling.mode=dirty curling.rate=1",
                  extra_args: Iterable[str] = (),
                  cpu_affinity: Optional[Iterable[int]] = None) -> VM:
        """Start a QEMU running the test guest; returns once QMP is up.

        Sender and receiver of a migration must be launched with the same
        ``mem``, ``machine``, ``append`` and ``extra_args``; only
        ``incoming`` differs. ``cpu_affinity`` pins the process to host
        CPUs (e.g. ``{0}`` and ``{1}`` to model two hosts).
        """
        if name in self.vms and self.vms[name].is_running():
            raise ValueError(f"a VM called {name} is already running")
        vm = self._make_vm(name, accel=self.accel, incoming=incoming, mem=mem,
                           machine=machine, append=append,
                           extra_args=extra_args, cpu_affinity=cpu_affinity)
        self.vms[name] = vm
        vm.launch()
        return vm

    # -- migration helpers ------------------------------------------------

    def wait_migration(self, vm: VM, timeout: float = 120.0,
                       statuses: Iterable[str] = ("completed",)) -> dict[str, Any]:
        """Poll query-migrate until its status is one of ``statuses``.

        A "failed" or "cancelled" status that was not asked for ends the
        wait with a test failure.
        """
        wanted = set(statuses)

        def done() -> Optional[dict[str, Any]]:
            info = vm.qmp("query-migrate")
            status = info.get("status")
            if status in wanted:
                return info
            if status in ("failed", "cancelled"):
                raise AssertionError(f"migration on {vm.name} ended {status}: "
                                     f"{info.get('error-desc', '')}")
            return None

        return wait_until(done, timeout, f"migration status {sorted(wanted)} "
                                         f"on {vm.name}", 0.2)

    # -- Curling helpers ------------------------------------------------

    #: max-bandwidth for Curling tests: the default (128 MiB/s) would
    #: throttle the first round and every checkpoint.
    BANDWIDTH = 10 * 1024 ** 3

    def launch_pair(self, machine: str = "pc",
                    append: str = "curling.mode=dirty curling.rate=4",
                    extra_args: Iterable[str] = (),
                    unix: bool = False) -> tuple[VM, VM, str]:
        """Start a sender and a receiver listening on ``curling:...``.

        Returns (sender, receiver, uri). The sender is pinned to host CPU
        0 and the receiver to CPU 1 where there are two, to model two
        hosts.
        """
        if unix:
            assert self._tmpdir is not None
            uri = f"curling:unix:{self._tmpdir}/curling.sock"
        else:
            uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
        cpus = sorted(os.sched_getaffinity(0))
        pin = len(cpus) >= 2
        sender = self.launch_vm("sender", machine=machine, append=append,
                                extra_args=extra_args,
                                cpu_affinity={cpus[0]} if pin else None)
        receiver = self.launch_vm("receiver", incoming=uri, machine=machine,
                                  append=append, extra_args=extra_args,
                                  cpu_affinity={cpus[1]} if pin else None)
        return sender, receiver, uri

    def protect(self, sender: VM, receiver: VM, uri: str,
                timeout: float = 120.0, **params: Any) -> None:
        """Start Curling from ``sender`` to ``receiver``; return once both
        report ``protecting``. ``params`` go to migrate-set-parameters
        (``curling_interval=200``)."""
        sender.qmp("migrate-set-parameters", max_bandwidth=self.BANDWIDTH,
                   **params)
        sender.qmp("migrate", uri=uri)
        for vm in (sender, receiver):
            wait_until(lambda vm=vm: curling_info(vm)["status"] == "protecting",
                       timeout, f"{vm.name} protecting", 0.1)

    def wait_checkpoints(self, vm: VM, count: int,
                         timeout: float = 60.0) -> dict[str, Any]:
        """Wait until ``vm`` has committed ``count`` more checkpoints;
        return its query-curling then."""
        start = curling_info(vm)["checkpoints"]

        def done() -> Optional[dict[str, Any]]:
            info = curling_info(vm)
            if info["status"] != "protecting":
                raise AssertionError(f"{vm.name} stopped protecting: {info}")
            return info if info["checkpoints"] >= start + count else None

        return wait_until(done, timeout,
                          f"{count} more checkpoints on {vm.name}", 0.05)


def curling_info(vm: VM) -> dict[str, Any]:
    """query-curling of ``vm``."""
    return vm.qmp("query-curling")
