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
* waits with deadlines, and cleanup that kills every process it started;
* for network tests, a private network namespace (``netlab()``: a bridge,
  one tap per QEMU, clients inside it), deleted on every path;
* for TLS tests, x509 credentials of a test CA (``tls_pki()``) and the
  arguments and parameters that use them (``tls_args()``, ``use_tls()``).

Guest tests run one at a time even when avocado runs tasks in parallel: a
lock in ``build/`` serialises them, since timing-sensitive guests share the
host's cores.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterable, Optional

import avocado

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

from curling_proxy import CurlingProxy  # noqa: E402
from curlingtool import agent, tlscerts  # noqa: E402
from curlingtool.deps import sbin  # noqa: E402
from curlingtool.etcdserver import EtcdMissing, EtcdServer  # noqa: E402
from curlingtool.guest import GuestError, GuestImage, build_guest  # noqa: E402
from curlingtool.netlab import (GUEST_IP, GUEST_MAC, PREFIX,  # noqa: E402
                                NetClient, NetLab, NetLabError,
                                check_available, netdev_args)
from curlingtool.vm import (KERNEL_CMDLINE, VM,  # noqa: E402,F401
                            Bootable, DeviceReport, DiskCheck,
                            Tick, VMDied,
                            WaitTimeout, die_with_parent, free_tcp_port,
                            guest_args,
                            parse_ticks, wait_until)  # noqa: F401

BUILD_DIR = REPO_ROOT / "build"
DEFAULT_QEMU = BUILD_DIR / "bin" / "qemu-system-x86_64"
QEMU_IMG = BUILD_DIR / "bin" / "qemu-img"
PROBE_CACHE = BUILD_DIR / "accel-probe.json"
TEST_LOCK = BUILD_DIR / "avocado.lock"

#: Seconds a probe guest gets to print its first tick under KVM.
KVM_PROBE_DEADLINE = 20.0
#: Seconds from QEMU start to the guest's first tick (TCG: ~9 s when idle).
BOOT_TIMEOUT = 120.0
#: Seconds a test waits for another test's guests to finish.
LOCK_TIMEOUT = 3600.0
#: Seconds from the sender's death to CURLING_FAILOVER on the receiver.
FAILOVER_DEADLINE = 10.0
#: Ticks the failed-over guest must print (1.5 s: a full self-check of
#: every page takes at most 1 s).
TICKS_AFTER_FAILOVER = 15


def held_ticks(interval_ms: int) -> int:
    """Ticks (one each 100 ms) a dead sender's console may be short of:
    the guest's serial output is held until its checkpoint is committed
    and released a moment later, so the receiver may resume past the
    last tick the sender's console shows, by what the checkpoints it had
    committed but not yet released printed: at most two checkpoint
    cycles, each an interval and up to a second of saving."""
    return 2 * (interval_ms + 1000) // 100


#: curling-timeout of managed pairs (ms).
MANAGED_TIMEOUT_MS = 1000
#: Seconds the agents of a pair may take to decide once both sides can
#: know of a loss.
DECISION_DEADLINE = 30.0
#: Kernel command line of a pair's guest off the network.
PAIR_APPEND = "curling.mode=dirty curling.rate=4"

#: Arguments for one side of a pair, by VM name ("sender", "receiver"):
#: what must differ between the sides, e.g. each side's own disk image.
SideArgs = Callable[[str], Iterable[str]]


def numa_args(count: int, size_mb: int) -> tuple[str, ...]:
    """Arguments for ``count`` NUMA nodes of ``size_mb`` MiB each, vCPU n
    in node n, every node's memory a backend (a RAM block) of its own, as
    libvirt builds NUMA guests; ``-m`` must be their sum."""
    args: list[str] = []
    for n in range(count):
        args += ["-object", f"memory-backend-ram,id=m{n},size={size_mb}M",
                 "-numa", f"node,nodeid={n},cpus={n},memdev=m{n}"]
    return tuple(args)


def event_time(event: dict[str, Any]) -> float:
    """Wall-clock time of a QMP event, as QEMU stamped it."""
    stamp = event["timestamp"]
    return stamp["seconds"] + stamp["microseconds"] / 1e6


@dataclasses.dataclass
class RoundResult:
    """What one kill round measured."""

    failover_s: float       # sender's death -> CURLING_FAILOVER timestamp
    sequence: int           # sequence the receiver resumed from
    first_tick: int         # first tick the receiver printed
    window: tuple[int, int]  # allowed range for first_tick


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
        self._procs: list[subprocess.Popen] = []   # agents, links
        self._cleanups: list[Callable[[], None]] = []
        self.proxies: list[CurlingProxy] = []
        self._netlab: Optional[NetLab] = None
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
        for proxy in self.proxies:
            proxy.stop()
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()
        for vm in self.vms.values():
            if vm._proc is not None:
                vm.kill()
        for cleanup in reversed(self._cleanups):
            cleanup()
        if self._netlab is not None:
            self._netlab.down()
            self._netlab = None
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
                 cpu_affinity: Optional[Iterable[int]] = None,
                 smp: int = 1, defaults: bool = False,
                 netns: bool = False,
                 console_chardev: Optional[str] = None,
                 guest: Optional[Bootable] = None,
                 cmdline: str = KERNEL_CMDLINE) -> VM:
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
        args = guest_args(self.qemu_bin, guest or self.guest, name,
                          accel=accel, console=console, qmp_path=qmp_path,
                          incoming=incoming, mem=mem, machine=machine,
                          append=append, extra_args=extra_args,
                          smp=smp, defaults=defaults,
                          console_chardev=console_chardev, cmdline=cmdline)
        if netns:
            args = self.netlab().wrap(args)
        return VM(name, args, console, qemu_log, qmp_path, self.log,
                  cpu_affinity)

    def launch_vm(self, name: str, incoming: Optional[str] = None,
                  mem: str = "256M", machine: str = "pc",
                  append: str = "curling.mode=dirty curling.rate=1",
                  extra_args: Iterable[str] = (),
                  cpu_affinity: Optional[Iterable[int]] = None,
                  smp: int = 1, defaults: bool = False,
                  netns: bool = False,
                  console_chardev: Optional[str] = None,
                  guest: Optional[Bootable] = None,
                  cmdline: str = KERNEL_CMDLINE) -> VM:
        """Start a QEMU running the test guest; returns once QMP is up.

        Sender and receiver of a migration must be launched with the same
        ``mem``, ``machine``, ``append``, ``extra_args``, ``smp`` and
        ``defaults``; only ``incoming`` differs. ``cpu_affinity`` pins the
        process to host CPUs (e.g. ``{0}`` and ``{1}`` to model two hosts).
        ``defaults`` keeps the machine's default devices (see
        ``guest_args``). ``netns`` runs it inside ``netlab()``.
        ``console_chardev`` puts the serial console on that chardev (see
        ``guest_args``). ``guest`` and ``cmdline`` boot another kernel and
        initramfs than the test guest's (the application guest).
        """
        if name in self.vms and self.vms[name].is_running():
            raise ValueError(f"a VM called {name} is already running")
        vm = self._make_vm(name, accel=self.accel, incoming=incoming, mem=mem,
                           machine=machine, append=append,
                           extra_args=extra_args, cpu_affinity=cpu_affinity,
                           smp=smp, defaults=defaults, netns=netns,
                           console_chardev=console_chardev, guest=guest,
                           cmdline=cmdline)
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

    # -- what the guest sees ----------------------------------------------

    def assert_ticks_ok(self, vm: VM, since: int = 0) -> list[Tick]:
        """Every tick ``vm``'s guest printed (from ``since``) passed its
        memory self-check; returns them."""
        ticks = vm.ticks(since)
        bad = [t.line for t in ticks if not t.ok]
        self.assertEqual(bad, [], f"memory self-check failed on {vm.name}")
        return ticks

    def assert_consecutive(self, vm: VM, ticks: list[Tick]) -> None:
        """``ticks`` go up one by one."""
        numbers = [t.n for t in ticks]
        self.assertEqual(numbers,
                         list(range(numbers[0], numbers[0] + len(numbers))),
                         f"ticks on {vm.name} do not go up one by one")

    # -- Curling helpers ------------------------------------------------

    #: max-bandwidth for Curling tests: the default (128 MiB/s) would
    #: throttle the first round and every checkpoint.
    BANDWIDTH = 10 * 1024 ** 3

    def launch_pair(self, machine: str = "pc",
                    append: str = "curling.mode=dirty curling.rate=4",
                    extra_args: Iterable[str] = (),
                    unix: bool = False, mem: str = "256M", smp: int = 1,
                    defaults: bool = False,
                    side_args: Optional[SideArgs] = None,
                    netns: bool = False
                    ) -> tuple[VM, VM, str]:
        """Start a sender and a receiver listening on ``curling:...``.

        Returns (sender, receiver, uri). The sender is pinned to host CPU
        0 and the receiver to CPU 1 where there are two, to model two
        hosts. ``side_args(name)`` adds arguments of one side only after
        ``extra_args`` (each side's own disk images). ``netns`` runs
        both inside ``netlab()``.
        """
        extra_args = tuple(extra_args)

        def args(name: str) -> tuple[str, ...]:
            return extra_args + (tuple(side_args(name)) if side_args else ())

        if unix:
            assert self._tmpdir is not None
            uri = f"curling:unix:{self._tmpdir}/curling.sock"
        else:
            uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
        cpus = sorted(os.sched_getaffinity(0))
        pin = len(cpus) >= 2
        sender = self.launch_vm("sender", machine=machine, append=append,
                                extra_args=args("sender"),
                                cpu_affinity={cpus[0]} if pin else None,
                                mem=mem, smp=smp, defaults=defaults,
                                netns=netns)
        receiver = self.launch_vm("receiver", incoming=uri, machine=machine,
                                  append=append, extra_args=args("receiver"),
                                  cpu_affinity={cpus[1]} if pin else None,
                                  mem=mem, smp=smp, defaults=defaults,
                                  netns=netns)
        return sender, receiver, uri

    def new_receiver(self, name: str, sender: VM, machine: str = "pc",
                     append: str = "curling.mode=dirty curling.rate=4",
                     extra_args: Iterable[str] = (),
                     netns: bool = False, mem: str = "256M", smp: int = 1
                     ) -> tuple[VM, str]:
        """A fresh receiver for ``sender`` (e.g. a failed-over receiver
        that protects its guest again), on the other host CPU; returns it
        and its curling: URI. ``machine``, ``append``, ``extra_args``,
        ``mem`` and ``smp`` must be the sender's."""
        uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
        cpus = sorted(os.sched_getaffinity(0))
        affinity = None
        if len(cpus) >= 2 and sender.cpu_affinity:
            affinity = {next(c for c in cpus if c not in sender.cpu_affinity)}
        receiver = self.launch_vm(name, incoming=uri, machine=machine,
                                  append=append, extra_args=extra_args,
                                  cpu_affinity=affinity, netns=netns,
                                  mem=mem, smp=smp)
        return receiver, uri

    # -- disks ------------------------------------------------------------

    #: Virtual size of the test guests' disks.
    DISK_SIZE = 64 * 1024 ** 2

    def disk_image(self, name: str, junk: bool = False) -> pathlib.Path:
        """A raw image of DISK_SIZE bytes in the test's temporary folder,
        empty, or with ``junk`` (random data in its first and last MiB):
        a receiver's image need not start empty."""
        assert self._tmpdir is not None
        path = self._tmpdir / f"{name}.img"
        subprocess.run([str(QEMU_IMG), "create", "-q", "-f", "raw",
                        str(path), str(self.DISK_SIZE)], check=True)
        if junk:
            with open(path, "r+b") as f:
                f.write(os.urandom(1024 ** 2))
                f.seek(self.DISK_SIZE - 1024 ** 2)
                f.write(os.urandom(1024 ** 2))
        return path

    @staticmethod
    def failing_drive_args(image: pathlib.Path, drive: str = "disk0",
                           sector: int = 65536) -> list[str]:
        """A virtio-blk drive ``drive`` on ``image`` whose data writes at
        ``sector`` (32 MiB by default) fail with EIO (a blkdebug rule);
        zero writes there do not."""
        return ["-drive", f"if=none,id={drive},format=raw,"
                "file.driver=blkdebug,"
                f"file.image.filename={image},"
                "file.inject-error.0.event=write_aio,"
                "file.inject-error.0.iotype=write,"
                f"file.inject-error.0.sector={sector},"
                "file.inject-error.0.errno=5",
                "-device", f"virtio-blk-pci,drive={drive}"]

    def disk_args(self, vm_name: str, drives: Iterable[tuple[str, str]],
                  junk: bool = False, image: Optional[pathlib.Path] = None
                  ) -> list[str]:
        """``-drive``/``-device`` pairs giving the VM ``vm_name`` its own
        image (``<vm_name>-<drive id>.img``) for each (drive id, -device
        argument with ``{drive}`` for the id) of ``drives``; ``image`` puts
        every drive on that one file instead."""
        args: list[str] = []
        for drive, device in drives:
            path = image or self.disk_image(f"{vm_name}-{drive}", junk)
            args += ["-drive", f"if=none,id={drive},file={path},format=raw",
                     "-device", device.format(drive=drive)]
        return args

    def assert_fsck_clean(self, image: pathlib.Path, what: str) -> None:
        """``e2fsck -fn`` finds nothing wrong in the ext4 file system of
        the raw ``image`` (``what`` names it in the failure)."""
        fsck = subprocess.run([sbin("e2fsck"), "-fn", str(image)],
                              capture_output=True, text=True, check=False)
        self.log.info("e2fsck -fn %s: rc %d\n%s%s", image.name,
                      fsck.returncode, fsck.stdout, fsck.stderr)
        self.assertEqual(fsck.returncode, 0,
                         f"e2fsck finds {what} damaged")

    def assert_diskchecks_ok(self, vm: VM, since: int = 0,
                             progress: bool = True) -> list[DiskCheck]:
        """Every disk self-check ``vm``'s guest printed (from ``since``)
        passed; with ``progress``, its writes went on meanwhile."""
        checks = vm.diskchecks(since)
        bad = [c.line for c in checks if not c.ok]
        self.assertEqual(bad, [], f"disk self-check failed on {vm.name}")
        if progress:
            self.assertGreaterEqual(len(checks), 2,
                                    f"{vm.name} printed no disk self-checks")
            self.assertGreater(checks[-1].writes, checks[0].writes,
                               f"the guest on {vm.name} stopped writing")
        return checks

    # -- screen -----------------------------------------------------------

    def screendump(self, vm: VM, name: str) -> bytes:
        """``vm``'s screen as a PPM file, kept as ``name`` in the log dir."""
        path = self.logdir_path / name
        vm.qmp("screendump", filename=str(path))
        return path.read_bytes()

    @staticmethod
    def parse_ppm(data: bytes) -> tuple[str, bytes]:
        """(header, pixel bytes) of a binary PPM (P6) file."""
        fields = []
        pos = 0
        while len(fields) < 4:
            while data[pos:pos + 1].isspace():
                pos += 1
            if data[pos:pos + 1] == b"#":
                pos = data.index(b"\n", pos) + 1
                continue
            end = pos
            while not data[end:end + 1].isspace():
                end += 1
            fields.append(data[pos:end].decode())
            pos = end
        assert fields[0] == "P6", f"not a binary PPM: {fields[0]}"
        return " ".join(fields), data[pos + 1:]

    # -- network ----------------------------------------------------------

    #: Kernel command line of a guest that serves on the lab's network.
    NET_APPEND = (f"curling.mode=dirty curling.rate=4 curling.serve=1 "
                  f"curling.ip={GUEST_IP}/{PREFIX}")

    def netlab(self) -> NetLab:
        """This test's network namespace (bridge 10.0.0.1/24), made on
        first use and deleted, with its taps and clients, in tearDown."""
        if self._netlab is None:
            why = check_available()
            if why:
                self.cancel(f"no network namespace: {why}")
            lab = NetLab(f"curling-{os.getpid()}")
            try:
                lab.up()
            except NetLabError as exc:
                self.cancel(f"no network namespace: {exc}")
            self._netlab = lab
        return self._netlab

    def nic_args(self, name: str, model: str = "virtio-net-pci",
                 netdev_opts: str = "") -> list[str]:
        """The guest's NIC for the VM ``name``: a tap of its own in the
        lab's bridge, the guest's MAC (the same on every side)."""
        tap = self.netlab().add_tap(f"tap-{name}"[:15])
        return netdev_args(tap, model=model, netdev_opts=netdev_opts)

    def launch_net_pair(self, model: str = "virtio-net-pci",
                        append: Optional[str] = None
                        ) -> tuple[VM, VM, str]:
        """A sender and receiver whose guest serves on the lab's network
        through a ``model`` NIC, each QEMU on its own tap."""
        return self.launch_pair(append=append or self.NET_APPEND,
                                side_args=lambda n: self.nic_args(n, model),
                                netns=True)

    def new_net_receiver(self, name: str, sender: VM,
                         model: str = "virtio-net-pci",
                         append: Optional[str] = None) -> tuple[VM, str]:
        """A fresh receiver on a tap of its own for ``sender``."""
        return self.new_receiver(name, sender, append=append or
                                 self.NET_APPEND,
                                 extra_args=self.nic_args(name, model),
                                 netns=True)

    def net_client(self, mode: str, connections: int = 1,
                   rcvbuf: int = 0) -> NetClient:
        """A client of the guest's ``mode`` service, running in the lab
        until ``stop()``; killed in tearDown at the latest."""
        status = self.logdir_path / f"client-{mode}.json"
        return NetClient(self.netlab(), mode, status, connections,
                         rcvbuf=rcvbuf)

    def wait_client(self, client: NetClient, items: int,
                    timeout: float = BOOT_TIMEOUT) -> dict[str, Any]:
        """Wait until ``client`` has received ``items`` more items."""
        start = client.status().get("items", 0)

        def done() -> Optional[dict[str, Any]]:
            st = client.status()
            if st.get("fatal"):
                raise AssertionError(f"{st['mode']} client: {st['fatal']}")
            return st if st.get("items", 0) >= start + items else None

        return wait_until(done, timeout, f"{items} items at the client", 0.1)

    def protect(self, sender: VM, receiver: VM, uri: str,
                timeout: float = 120.0, **params: Any) -> None:
        """Start Curling from ``sender`` to ``receiver``; return once both
        report ``protecting``. ``params`` go to migrate-set-parameters
        (``curling_interval=200``)."""
        sender.qmp("migrate-set-parameters", max_bandwidth=self.BANDWIDTH,
                   **params)
        sender.qmp("migrate", uri=uri)
        self.wait_protecting(sender, receiver, timeout)

    @staticmethod
    def wait_protecting(sender: VM, receiver: VM,
                        timeout: float = 120.0) -> None:
        """Return once both ``sender`` and ``receiver`` report
        ``protecting``."""
        for vm in (sender, receiver):
            wait_until(lambda vm=vm: curling_info(vm)["status"] == "protecting",
                       timeout, f"{vm.name} protecting", 0.1)

    @staticmethod
    def curling_capability(vm: VM) -> bool:
        """Whether ``vm``'s curling capability is on."""
        caps = {c["capability"]: c["state"]
                for c in vm.qmp("query-migrate-capabilities")}
        return bool(caps.get("curling"))

    def check_refused(self, vm: VM, uri: str, message: str,
                      pattern: str) -> None:
        """A ``migrate`` to ``uri`` was refused with ``message``: it says
        what is wrong (``pattern``), and nothing started."""
        self.log.info("migrate %s -> %s", uri, message)
        self.assertTrue(message.strip(), f"migrate {uri}: empty error")
        self.assertRegex(message, pattern,
                         f"migrate {uri}: the error does not say what is "
                         f"wrong")
        status = vm.qmp("query-migrate").get("status", "none")
        self.assertIn(status, ("none",),
                      f"migrate {uri} left a migration {status}")
        info = curling_info(vm)
        self.assertIn(info["status"], ("none",),
                      f"migrate {uri} left Curling {info['status']}")
        self.assertEqual(vm.qmp("query-status")["status"], "running",
                         f"migrate {uri} stopped the guest")

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

    # -- randomness, logs, a man in the middle -----------------------------

    def seeded_rng(self) -> tuple[int, random.Random]:
        """The test's random numbers: seeded by ``CURLING_SEED`` to replay
        a run, else at random; the seed is logged."""
        seed = int(os.environ.get("CURLING_SEED", time.time_ns() % 2**32))
        self.log.info("random seed %d (set CURLING_SEED=%d to replay)", seed,
                      seed)
        return seed, random.Random(seed)

    @staticmethod
    def qemu_log(vm: VM) -> str:
        """What ``vm``'s QEMU wrote to stderr so far."""
        try:
            return vm.qemu_log_path.read_text(errors="replace")
        except OSError:
            return ""

    def proxy_to(self, receiver_uri: str, rng: random.Random,
                 name: str = "proxy") -> CurlingProxy:
        """A running CurlingProxy to ``receiver_uri``'s port, stopped in
        tearDown at the latest."""
        proxy = CurlingProxy(uri_port(receiver_uri), log=self.log, rng=rng,
                             name=name)
        self.proxies.append(proxy)
        return proxy.start()

    # -- what a receiver did -----------------------------------------------

    @staticmethod
    def failovers(vm: VM) -> list[dict[str, Any]]:
        """The CURLING_FAILOVER events ``vm`` emitted so far."""
        vm.qmp("query-status")      # collects pending events
        return [e for e in vm.events if e.get("event") == "CURLING_FAILOVER"]

    def assert_resumed(self, vm: VM, since: int, low: int,
                       high: Optional[int], what: str) -> list[Tick]:
        """``vm``'s guest goes on from a tick in ``low..high`` (``high``
        None: no upper bound) and runs with a clean self-check."""
        ticks = vm.wait_ticks(TICKS_AFTER_FAILOVER, timeout=60, since=since)
        first = ticks[0].n
        self.log.info("%s: %s's first tick %d (allowed %d..%s)", what,
                      vm.name, first, low, high)
        self.assertGreaterEqual(
            first, low, f"{what}: {vm.name} resumed at tick {first}, older "
            f"than tick {low - 1} that its last committed checkpoint had seen")
        if high is not None:
            self.assertLessEqual(
                first, high, f"{what}: {vm.name} resumed at tick {first}, "
                f"newer than the sender's tick {high - 1}")
        self.assert_consecutive(vm, ticks)
        self.assert_ticks_ok(vm, since=since)
        return ticks

    # -- TLS --------------------------------------------------------------

    def tls_pki(self) -> tlscerts.Pki:
        """x509 credentials of a CA made for this test: the receiver's
        (server) and the sender's (client, CN ``tlscerts.SENDER_CN``).
        Cancels the test when certtool is missing."""
        assert self._tmpdir is not None
        try:
            return tlscerts.Pki.create(self._tmpdir / "tls")
        except tlscerts.TlsToolMissing as exc:
            self.cancel(str(exc))
            raise

    @staticmethod
    def tls_args(pki: tlscerts.Pki, role: str, other: bool = False,
                 strangers: Iterable[str] = ()) -> list[str]:
        """QEMU arguments of ``role``'s credentials, object ``tls0``; the
        receiver's authorization ``authz0`` lets in the sender's name
        only.  ``other`` adds the other role's credentials as ``tls1``
        (a receiver that protects its guest again once it took over).
        Each of ``strangers`` (tlscerts.STRANGERS) adds client
        credentials ``tls-<kind>``."""
        args = pki.qemu_args(role, other)
        for kind in strangers:
            args += ["-object", tlscerts.creds_object(
                f"tls-{kind}", pki.stranger(kind), "client")]
        return args

    @staticmethod
    def use_tls(vm: VM, role: str, creds: str = "tls0") -> None:
        """Curling of ``vm`` goes over TLS with the credentials object
        ``creds`` (the receiver also with ``authz0``); ``creds=""``
        turns TLS off."""
        params: dict[str, Any] = {"tls_creds": creds}
        if role == "receiver":
            params["tls_authz"] = "authz0" if creds else ""
        else:
            params["tls_hostname"] = "127.0.0.1" if creds else ""
        vm.qmp("migrate-set-parameters", **params)

    # -- managed protection: witnesses, agents, links ----------------------

    def witness(self, kind: str, netns: bool = False) -> str:
        """A witness for this test's agents, as their ``--witness``: for
        ``etcd`` a throw-away etcd on 127.0.0.1 (``self.etcd``, stopped in
        tearDown; with ``netns``, on the loopback of the lab's namespace),
        for ``file`` a lock-file directory."""
        assert self._tmpdir is not None
        if kind == "file":
            directory = self._tmpdir / "witness"
            directory.mkdir(exist_ok=True)
            return f"file:{directory}"
        server = EtcdServer(self._tmpdir / "etcd",
                            wrap=self.netlab().wrap if netns else None)
        self._cleanups.append(server.stop)
        try:
            server.start()
        except EtcdMissing as exc:
            self.cancel(f"no etcd: {exc}")
        self.etcd = server
        return server.spec

    def agent_monitor_args(self, name: str) -> list[str]:
        """A second QMP monitor of the VM ``name``, for its agent."""
        assert self._tmpdir is not None
        return agent.monitor_args(self._tmpdir / f"{name}-agent.qmp")

    def start_agent(self, name: str, role: str, me: str, witness: str,
                    vm: str = "guest", peer: Optional[str] = None,
                    protect: Optional[str] = None,
                    standby: Optional[str] = None) -> "AgentProc":
        """Run scripts/agent.py beside the VM ``name`` (launched with
        ``agent_monitor_args(name)``); killed in tearDown at the latest."""
        assert self._tmpdir is not None
        log = self.logdir_path / f"agent-{me}.log"
        proc = agent.spawn(self._tmpdir / f"{name}-agent.qmp", role, vm, me,
                           witness, log, peer=peer, protect=protect,
                           standby=standby, preexec_fn=die_with_parent)
        self._procs.append(proc)
        self.log.info("agent %s (%s of %s): pid %d", me, role, name,
                      proc.pid)
        return AgentProc(me, proc, log)

    def start_link(self, target_port: int, netns: bool = False) -> "Link":
        """A link of its own to 127.0.0.1:``target_port`` (in the lab's
        namespace with ``netns``): a proxy process that SIGSTOP
        partitions; killed in tearDown at the latest."""
        args = [sys.executable, str(pathlib.Path(__file__).with_name(
            "curling_proxy.py")), str(target_port)]
        if netns:
            args = self.netlab().wrap(args)
        n = sum(1 for _ in self.logdir_path.glob("link-*.log")) + 1
        with open(self.logdir_path / f"link-{n}.log", "ab") as err:
            proc = subprocess.Popen(args, stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=err,
                                    preexec_fn=die_with_parent)
        self._procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            self.fail(f"the link to port {target_port} did not start "
                      f"(link-{n}.log)")
        return Link(proc, int(line))

    # -- managed pairs --------------------------------------------------

    def launch_side(self, name: str, net: bool, cpu: int,
                    incoming: Optional[str] = None,
                    agent: bool = True, append: str = "",
                    extra_args: Iterable[str] = ()) -> VM:
        """One side of a pair, pinned to host CPU ``cpu``: its guest serves
        on the lab's network with ``net``, it has a monitor for its agent
        with ``agent``; curling-timeout MANAGED_TIMEOUT_MS.  ``append``
        adds to the guest's command line, ``extra_args`` to QEMU's."""
        extra = self.agent_monitor_args(name) if agent else []
        if net:
            extra = self.nic_args(name) + extra
        extra += list(extra_args)
        cpus = sorted(os.sched_getaffinity(0))
        base = self.NET_APPEND if net else PAIR_APPEND
        vm = self.launch_vm(name, incoming=incoming,
                            append=f"{base} {append}".strip(),
                            extra_args=extra,
                            cpu_affinity={cpus[cpu % len(cpus)]},
                            netns=net)
        vm.qmp("migrate-set-parameters", curling_timeout=MANAGED_TIMEOUT_MS,
               max_bandwidth=self.BANDWIDTH)
        return vm

    def managed_pair(self, witness: str, tag: str = "", vm: str = "guest",
                     net: bool = False, link: bool = True,
                     standby: Optional[str] = None) -> "Pair":
        """A sender and a receiver with their agents (ids ``A<tag>`` and
        ``B<tag>``) for the guest ``vm``, the sender's guest ticking; the
        link between them a proxy of its own (or none, without ``link``).
        The sender's agent starts with protect_pair()."""
        port = free_tcp_port()
        sender = self.launch_side(f"sender{tag}", net, 0)
        receiver = self.launch_side(f"receiver{tag}", net, 1,
                                    incoming=f"curling:tcp:127.0.0.1:{port}")
        proxy = self.start_link(port, netns=net) if link else None
        uri = proxy.uri if proxy else f"curling:tcp:127.0.0.1:{port}"
        ragent = self.start_agent(receiver.name, "receiver", f"B{tag}",
                                  witness, vm=vm, peer=f"A{tag}",
                                  standby=standby)
        wait_until(lambda: receiver.qmp("query-migrate-parameters")
                   .get("curling-managed"), 30,
                   f"the agent of {receiver.name} to set the managed mode")
        sender.wait_tick(2, timeout=BOOT_TIMEOUT)
        return Pair(sender, receiver, uri, proxy, ragent)

    def protect_pair(self, pair: "Pair", witness: str, tag: str = "",
                     vm: str = "guest", checkpoints: int = 3) -> None:
        """The sender's agent claims the term and protects; returns once
        the receiver's agent learned the term and ``checkpoints`` more
        checkpoints committed."""
        pair.sender_agent = self.start_agent(pair.sender.name, "sender",
                                             f"A{tag}", witness, vm=vm,
                                             protect=pair.uri)
        for side in (pair.sender, pair.receiver):
            wait_until(lambda side=side: curling_info(side)["status"] ==
                       "protecting", 120, f"{side.name} protecting", 0.1)
        wait_until(lambda: any("decision=armed" in line for line in
                               pair.receiver_agent.decisions()), 30,
                   "the receiver's agent to learn the term", 0.1)
        self.wait_checkpoints(pair.sender, checkpoints)

    def outcome(self, pair: "Pair",
                deadline: float = DECISION_DEADLINE) -> str:
        """Wait until one side acted and the other fenced itself: returns
        "receiver" (took over, the sender quit) or "sender" (runs on
        unprotected, the receiver quit)."""
        def status(vm: VM) -> Optional[str]:
            try:
                return curling_info(vm)["status"] if vm.is_running() else None
            except Exception:       # it went away meanwhile
                return None

        def done() -> Optional[str]:
            s_status, r_status = status(pair.sender), status(pair.receiver)
            if s_status is None and r_status == "failed-over":
                return "receiver"
            # A sender that won ends protection in error, or cancelled
            # when the operator's cancel led to the loss.
            if s_status in ("error", "cancelled") and r_status is None:
                return "sender"
            return None

        return wait_until(done, deadline, "one side to act, the other to "
                          "fence itself", 0.1)

    def assert_one_copy(self, pair: "Pair", winner: str) -> VM:
        """Exactly the ``winner`` runs its guest; returns it."""
        alive = [vm for vm in (pair.sender, pair.receiver) if vm.is_running()]
        self.assertEqual([vm.name for vm in alive],
                         [getattr(pair, winner).name],
                         "not exactly one copy of the guest is left")
        vm = alive[0]
        self.assertEqual(vm.qmp("query-status")["status"], "running")
        return vm

    def log_decisions(self, pair: "Pair") -> None:
        for proc in (pair.sender_agent, pair.receiver_agent):
            if proc is not None:
                for line in proc.decisions():
                    self.log.info("%s: %s", proc.me, line.split(" ", 2)[-1])

    @staticmethod
    def assert_closed(sock: socket.socket, what: str) -> None:
        """The peer of ``sock`` closed it (FIN or reset)."""
        try:
            data = sock.recv(1)
        except ConnectionResetError:
            return
        if data:
            raise AssertionError(f"{what}: the receiver sent {data!r}")

    # -- kill -9 the sender ---------------------------------------------

    def sender_final_tick(self, sender: VM) -> tuple[int, bool]:
        """Last complete tick of a dead sender, and whether its console
        ended in the middle of a line (a tick being printed when it died)."""
        text = sender.console()
        ticks = sender.ticks()
        self.assertTrue(ticks, f"{sender.name} never ticked")
        return ticks[-1].n, not text.endswith("\n")

    def kill_round(self, sender: VM, receiver: VM, hold: float,
                   label: str = "") -> RoundResult:
        """Protect for ``hold`` s after a fresh commit, kill -9 the sender
        and check how the receiver takes over: from a checkpoint no older
        than the last one the sender saw committed, its guest ticking on
        one by one with a clean self-check."""
        before = sender.last_tick()
        self.assertIsNotNone(before, f"{sender.name} has not ticked yet")
        assert before is not None
        t_seen = before.n
        info = self.wait_checkpoints(sender, 2)
        committed = info["sequence"]
        time.sleep(hold)
        info = curling_info(sender)
        self.assertEqual(info["status"], "protecting",
                         f"{sender.name} stopped protecting before the kill")
        committed = max(committed, info["sequence"])
        slack = held_ticks(info["interval"])
        last_before = sender.last_tick()
        assert last_before is not None
        mark = receiver.console_mark()

        t_kill = time.time()
        sender.kill(signal.SIGKILL)
        event = receiver.wait_event("CURLING_FAILOVER",
                                    timeout=FAILOVER_DEADLINE)
        failover_s = event_time(event) - t_kill
        sequence = event["data"]["sequence"]
        names = [e["event"] for e in receiver.events]
        self.assertIn("RESUME", names[:names.index("CURLING_FAILOVER")],
                      f"{receiver.name} reported the failover before its "
                      f"VM ran")

        last, mid_line = self.sender_final_tick(sender)
        self.assertGreaterEqual(last, last_before.n)
        self.log.info("%s: %s killed after %.2f s; committed seq %d, ticks "
                      "%d..%d; %s resumed seq %d after %.3f s", label,
                      sender.name, hold, committed, t_seen, last,
                      receiver.name, sequence, failover_s)
        self.assertGreaterEqual(
            sequence, committed,
            f"{receiver.name} resumed from sequence {sequence}, older than "
            f"the {committed} the sender had seen committed")

        ticks = receiver.wait_ticks(TICKS_AFTER_FAILOVER, timeout=60,
                                    since=mark)
        # What the sender's console shows was committed: the receiver goes
        # on after it, never printing a tick of it again; it may be ahead
        # by what was committed but not yet released (held_ticks).
        low = last + 1
        high = last + 1 + (1 if mid_line else 0) + slack
        first = ticks[0].n
        self.log.info("%s: %s's first tick %d (allowed %d..%d)", label,
                      receiver.name, first, low, high)
        self.assertGreaterEqual(
            first, low,
            f"{receiver.name} resumed at tick {first}, but the sender's "
            f"console had already shown tick {last}: output of a state "
            f"the receiver did not resume from reached the world")
        self.assertLessEqual(
            first, high,
            f"{receiver.name} resumed at tick {first}, beyond the sender's "
            f"last shown tick {last} and what it may have held")
        self.assert_consecutive(receiver, ticks)
        self.assert_ticks_ok(receiver, since=mark)
        self.assert_ticks_ok(sender)

        self.assertEqual(receiver.qmp("query-status")["status"], "running")
        self.assertEqual(curling_info(receiver)["status"], "failed-over")
        return RoundResult(failover_s, sequence, first, (low, high))

    def assert_took_over(self, sender: VM, receiver: VM, before: Tick,
                         since: int = 0) -> list[Tick]:
        """``sender`` went silent (or died) after ``before`` was seen by a
        committed checkpoint: ``receiver``'s guest goes on from a tick after
        it, no later than the sender's last, one by one, and both guests'
        self-checks are clean."""
        ticks = receiver.wait_ticks(TICKS_AFTER_FAILOVER, timeout=60,
                                    since=since)
        last, mid_line = self.sender_final_tick(sender)
        self.log.info("sender's ticks %d..%d, receiver's first %d",
                      before.n, last, ticks[0].n)
        # See kill_round: never a tick the sender's console showed again
        self.assertGreaterEqual(ticks[0].n, max(before.n, last) + 1)
        self.assertLessEqual(ticks[0].n, last + 1 + int(mid_line) +
                             held_ticks(curling_info(receiver)["interval"]))
        self.assert_consecutive(receiver, ticks)
        self.assert_ticks_ok(receiver)
        self.assert_ticks_ok(sender)
        return ticks


@dataclasses.dataclass
class AgentProc:
    """A running scripts/agent.py."""
    me: str
    proc: subprocess.Popen
    log: pathlib.Path

    def decisions(self) -> list[str]:
        """Its decision lines so far (``decision=...``)."""
        return agent.decisions(self.log)


class Link:
    """A proxy process between a sender and its receiver (see
    curling_proxy.py): SIGSTOP partitions it; it holds acknowledgements
    and reports protocol moments on command."""

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc = proc
        self.port = port
        self._events: list[str] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def uri(self) -> str:
        return f"curling:tcp:127.0.0.1:{self.port}"

    def partition(self) -> None:
        """No byte passes either way; both connections stay open."""
        self.proc.send_signal(signal.SIGSTOP)

    def heal(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def command(self, line: str) -> bool:
        """Send a command; False if the link is gone."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(f"{line}\n".encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            return False
        return True

    def wait_event(self, prefix: str, timeout: float) -> str:
        """The first event starting with ``prefix`` (consumed)."""
        with self._cond:
            found = self._cond.wait_for(
                lambda: any(e.startswith(prefix) for e in self._events),
                timeout)
            if not found:
                raise AssertionError(f"the link did not report {prefix!r} "
                                     f"within {timeout:g} s")
            event = next(e for e in self._events if e.startswith(prefix))
            self._events.remove(event)
            return event

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self._events.append(raw.decode(errors="replace").strip())
                self._cond.notify_all()


def uri_port(uri: str) -> int:
    """The port of a ``...:HOST:PORT`` URI."""
    return int(uri.rsplit(":", 1)[1])


def curling_info(vm: VM) -> dict[str, Any]:
    """query-curling of ``vm``."""
    return vm.qmp("query-curling")


@dataclasses.dataclass
class Pair:
    """A managed pair (see CurlingTest.managed_pair)."""
    sender: VM
    receiver: VM
    uri: str                        # what the sender protects to
    link: Optional[Link]
    receiver_agent: AgentProc
    sender_agent: Optional[AgentProc] = None
