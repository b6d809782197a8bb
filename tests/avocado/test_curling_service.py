# SPDX-License-Identifier: GPL-2.0-or-later
"""A protected guest run as a service: one description, ``curling.py up``
per host, re-protection and failback by themselves.

Three hosts modelled on this machine: each an address of its own on the
lab's bridge (10.0.0.11-13), its own tap, its own disk image and run
directory, its own ``up`` process; one etcd, in the lab's namespace too.
The test restarts an ``up`` whose QEMU went away, as systemd does with
curling@.service.  What a user sees is checked: which host runs the
guest, that its ticks go on from a committed checkpoint after each
failover, its disk self-check, and a TCP client's stream.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import Any, Optional

from qemu.qmp.legacy import QEMUMonitorProtocol

from curling_test import CurlingTest, NetClient, wait_until
from curlingtool.netlab import GUEST_MAC
from curlingtool.tlscerts import Authority
from curlingtool.vm import (KERNEL_CMDLINE, die_with_parent,
                            parse_diskchecks, parse_ticks)

REPO = pathlib.Path(__file__).resolve().parents[2]
CURLING = REPO / "scripts" / "curling.py"
HOSTS = {"A": "10.0.0.11", "B": "10.0.0.12", "C": "10.0.0.13"}
PORT = 4444
#: Seconds for a host to boot the guest, or to be protected onto.
DEADLINE = 180.0


@dataclasses.dataclass
class HostUp:
    """One host's ``up`` process and what it runs."""
    name: str
    run: pathlib.Path               # its run directory (run/<guest>)
    proc: Optional[subprocess.Popen] = None
    starts: int = 0

    @property
    def console_path(self) -> pathlib.Path:
        return self.run / "console.log"

    def console(self) -> str:
        try:
            return self.console_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_pid(self) -> Optional[int]:
        try:
            pid = int((self.run / "qemu.pid").read_text().split()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def qmp(self, cmd: str, **args: Any) -> Any:
        """One command on its QEMU's monitor (a fresh connection)."""
        mon = QEMUMonitorProtocol(str(self.run / "qmp"))
        try:
            mon.connect()
            return mon.cmd(cmd, **args)
        finally:
            mon.close()

    def state(self) -> tuple[str, str, bool]:
        """(role, curling status, guest running), or gone."""
        try:
            info = self.qmp("query-curling")
            running = self.qmp("query-status")["status"] == "running"
            return info["role"], info["status"], running
        except Exception:
            return "gone", "gone", False


class CurlingService(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,service
    """

    def describe(self, tmp: pathlib.Path, witness: str,
                 tls: bool = False) -> pathlib.Path:
        """The guest's description, the hosts A, B and C in it; ``tls``:
        each host with x509 credentials of its own from one CA (its
        server certificate naming its address)."""
        assert self.guest is not None
        append = f"{KERNEL_CMDLINE} {self.NET_APPEND} curling.diskcheck=vda"
        lines = [
            "[guest]", 'name = "web"', 'memory = "256M"', "vcpus = 1",
            'machine = "pc"',
            "args = [" + ", ".join(json.dumps(a) for a in (
                "-accel", self.accel, "-nodefaults", "-display", "none",
                "-no-reboot", "-kernel", str(self.guest.kernel), "-initrd",
                str(self.guest.initrd), "-append", append, "-chardev",
                "file,id=serial0,path={run}/console.log", "-serial",
                "chardev:serial0")) + "]",
            "", "[[guest.drives]]", 'id = "disk0"',
            'device = "virtio-blk-pci"',
            "", "[[guest.nics]]", 'id = "net0"',
            'device = "virtio-net-pci"', f'mac = "{GUEST_MAC}"',
            "", "[protection]", f'witness = "{witness}"', f"port = {PORT}",
            "interval = 100", "timeout = 1000"]
        ca = Authority.create(tmp / "ca") if tls else None
        for name, address in HOSTS.items():
            image = self.disk_image(f"{name}-disk0")
            lines += ["", f"[hosts.{name}]", f'address = "{address}"',
                      f'drives = {{ disk0 = "{image}" }}',
                      f'nics = {{ net0 = "tap:tap-{name}" }}',
                      f'run = "{tmp / ("run-" + name)}"']
            if ca is not None:
                pki = tmp / f"pki-{name}"
                ca.issue(pki, "server", f"curling-{name}", (address,))
                ca.issue(pki, "client", f"curling-{name}")
                lines.append(f'tls = "{pki}"')
        path = tmp / "web.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_up(self, host: HostUp, desc: pathlib.Path) -> None:
        """Start (again) ``up`` on ``host``, as its service would."""
        host.starts += 1
        log = self.logdir_path / f"up-{host.name}-{host.starts}.log"
        args = self.netlab().wrap([sys.executable, str(CURLING), "up",
                                   str(desc), "--host", host.name,
                                   "--qemu", str(self.qemu_bin)])
        with open(log, "ab") as out:
            host.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out,
                                         preexec_fn=die_with_parent)
        self._procs.append(host.proc)
        self.log.info("up on %s (start %d): pid %d", host.name, host.starts,
                      host.proc.pid)

    def curling(self, command: str, desc: pathlib.Path
                ) -> subprocess.CompletedProcess[str]:
        """``curling.py COMMAND DESC`` in the lab's namespace."""
        return subprocess.run(self.netlab().wrap(
            [sys.executable, str(CURLING), command, str(desc)]),
            capture_output=True, text=True, timeout=60)

    def up_log(self, host: HostUp) -> str:
        return (self.logdir_path /
                f"up-{host.name}-{host.starts}.log").read_text()

    def wait_state(self, host: HostUp, role: str, status: str,
                   running: bool, timeout: float = DEADLINE) -> float:
        """Wait until ``host`` is in that state; returns when it was."""
        return self.wait_state_where(
            host, lambda st: st == (role, status, running), timeout,
            f"{host.name} {role} {status}{' running' if running else ''}")

    def wait_took_over(self, host: HostUp, timeout: float = 60) -> float:
        """Wait until ``host``, a receiver, runs the guest; returns when.
        Its status reads failed-over only until its up protects the guest
        again, a moment later: the agent's take-over line says it."""
        when = self.wait_state_where(host, lambda st: st[2], timeout,
                                     f"{host.name} to run the guest")
        self.assertIn("decision=take-over", self.up_log(host),
                      f"{host.name} runs the guest without taking over")
        return when

    def wait_state_where(self, host: HostUp, ok: Any, timeout: float,
                         what: str) -> float:
        wait_until(lambda: ok(host.state()), timeout, what, 0.1)
        return time.monotonic()

    def kill_qemu(self, host: HostUp) -> float:
        pid = host.qemu_pid()
        assert pid is not None, f"no QEMU on {host.name}"
        self.log.info("kill -9 of %s's QEMU (pid %d)", host.name, pid)
        os.kill(pid, signal.SIGKILL)
        return time.monotonic()

    def wait_up_exit(self, host: HostUp, code: int) -> None:
        assert host.proc is not None
        host.proc.wait(timeout=60)
        self.assertEqual(host.proc.returncode, code,
                         f"up on {host.name}: {self.up_log(host)[-500:]}")

    def check_took_over(self, old: HostUp, new: HostUp,
                        marks: dict[str, int]) -> None:
        """``new`` runs the guest on from a committed checkpoint: its ticks
        start at most one past ``old``'s last one (what ``old`` printed
        after its last commit may come again), go up one by one, and the
        memory and disk checks are clean."""
        since = marks.get(new.name, 0)
        wait_until(lambda: len(parse_ticks(new.console()[since:])) >= 5 and
                   len(parse_diskchecks(new.console()[since:])) >= 2, 60,
                   f"ticks and disk checks on {new.name}", 0.2)
        ticks = parse_ticks(new.console()[since:])
        before = parse_ticks(old.console())
        self.assertTrue(before, f"{old.name} never ticked")
        numbers = [t.n for t in ticks]
        self.assertEqual(numbers, list(range(numbers[0],
                                             numbers[0] + len(numbers))),
                         f"ticks on {new.name} do not go up one by one")
        self.assertLessEqual(numbers[0], before[-1].n + 1,
                             f"{new.name} skipped ticks: it started at "
                             f"{numbers[0]}, {old.name} ended at "
                             f"{before[-1].n}")
        self.assertTrue(all(t.ok for t in ticks),
                        f"memory self-check failed on {new.name}")
        checks = parse_diskchecks(new.console()[since:])
        self.assertTrue(checks and all(c.ok for c in checks),
                        f"disk self-check on {new.name}: {checks}")
        self.log.info("%s took over at tick %d (%s had printed up to %d)",
                      new.name, numbers[0], old.name, before[-1].n)

    def test_up_reprotects_and_fails_back(self) -> None:
        """A and B from one description: A runs, B protects; kill -9 of
        A's QEMU: B takes over, A's ``up`` started again comes back as a
        receiver and B protects onto it by itself (C, down, is skipped);
        kill -9 of B's QEMU: A takes over and, B staying down, protects
        onto C.  The guest goes on from a committed state at each
        failover, the client's stream stays clean, ``status`` says who
        runs and who protects, ``down`` ends protection."""
        assert self._tmpdir is not None
        lab = self.netlab()
        for name, address in HOSTS.items():
            lab.add_address(address)
            lab.add_tap(f"tap-{name}")
        witness = self.witness("etcd", netns=True)
        desc = self.describe(self._tmpdir, witness, tls=True)
        hosts = {name: HostUp(name, self._tmpdir / f"run-{name}" / "web")
                 for name in HOSTS}
        a, b, c = hosts["A"], hosts["B"], hosts["C"]
        times: dict[str, float] = {}

        self.start_up(a, desc)
        self.start_up(b, desc)
        self.wait_state(a, "sender", "protecting", True)
        self.wait_state(b, "receiver", "protecting", False, 30)
        # Over TLS, each side with the credentials of its description
        for host, creds in ((a, "curling-tls-client"),
                            (b, "curling-tls-server")):
            self.assertEqual(host.qmp("query-migrate-parameters")
                             .get("tls-creds"), creds)
        client = NetClient(lab, "stream", self.logdir_path / "client.json",
                           1)
        self._cleanups.append(client.stop)
        self.wait_client(client, 20)
        wait_until(lambda: len(parse_ticks(a.console())) >= 2, 60,
                   "ticks on A", 0.2)

        # 1. A's QEMU dies: B takes over, and protects onto A once A's up
        #    is back (C is down)
        marks = {name: len(h.console()) for name, h in hosts.items()}
        killed = self.kill_qemu(a)
        took = self.wait_took_over(b)
        times["failover to B"] = took - killed
        self.wait_up_exit(a, 1)
        self.check_took_over(a, b, marks)
        restart = time.monotonic()
        self.start_up(a, desc)
        protected = self.wait_state(a, "receiver", "protecting", False)
        times["A restarted until protected"] = protected - restart
        times["failover to B until protected again"] = protected - killed
        self.wait_client(client, 10, timeout=60)

        # 2. B's QEMU dies: A takes over; B stays down and C comes up
        marks = {name: len(h.console()) for name, h in hosts.items()}
        killed = self.kill_qemu(b)
        took = self.wait_took_over(a)
        times["failover to A"] = took - killed
        self.wait_up_exit(b, 1)
        self.check_took_over(b, a, marks)
        self.start_up(c, desc)
        protected = self.wait_state(c, "receiver", "protecting", False)
        times["failover to A until protected by C"] = protected - killed
        self.wait_client(client, 10, timeout=60)
        st = client.status()
        self.assertEqual(st.get("errors", []), [], "the client saw errors")

        # Each up reports once a second: status catches up within a few
        expected = re.compile(r"^guest web: runs on A \(term \d+:A\), "
                              r"protected by C: checkpoint \d+ committed")

        def status_says() -> bool:
            status = self.curling("status", desc)
            self.log.info("curling.py status:\n%s%s", status.stdout,
                          status.stderr)
            self.assertEqual(status.returncode, 0)
            return bool(expected.match(status.stdout))
        wait_until(status_says, 10, "status to name A running, C "
                   "protecting", 1.0)

        down = self.curling("down", desc)
        self.assertEqual(down.returncode, 0, down.stderr)
        self.wait_up_exit(c, 0)
        wait_until(lambda: a.state()[1] == "cancelled", 30,
                   "A to end protection")
        self.assertTrue(a.state()[2], "A's guest stopped at down")
        for what, seconds in times.items():
            self.log.info("%s: %.1f s", what, seconds)
        (self.logdir_path / "times.txt").write_text("".join(
            f"{what}: {seconds:.1f} s\n" for what, seconds in times.items()))
        self.log.info("decisions of up on A:\n%s", "\n".join(
            line for line in self.up_log(a).splitlines()
            if "decision=" in line))

    def test_invalid_descriptions_refused(self) -> None:
        """Bad descriptions are refused before anything starts, with the
        file and the key named."""
        assert self._tmpdir is not None
        desc = self.describe(self._tmpdir, "etcd:http://127.0.0.1:9")
        good = desc.read_text()
        for old, new, message in (
                ('vcpus = 1', 'vcpus = 1\ncolour = "red"',
                 "guest.colour: unknown key"),
                (f'address = "{HOSTS["B"]}"', f'address = "{HOSTS["A"]}"',
                 f"hosts.B.address: {HOSTS['A']} is also hosts.A.address"),
                ('drives = { disk0 = ', 'drivez = { disk0 = ',
                 "hosts.A.drives: no image for drive 'disk0'")):
            desc.write_text(good.replace(old, new, 1))
            self.assert_up_refused(desc, "A", f"{desc}: {message}")
        desc.write_text(good)
        self.assert_up_refused(desc, "D", "no host 'D'")
        missing = self._tmpdir / "missing.img"
        desc.write_text(good.replace(str(self._tmpdir / "A-disk0.img"),
                                     str(missing)))
        self.assert_up_refused(
            desc, "A", f"hosts.A.drives.disk0: {missing} does not exist")
        # TLS credentials without the server's certificate
        pki = self._tmpdir / "pki-A"
        Authority.create(self._tmpdir / "ca").issue(pki, "client", "A")
        desc.write_text(good.replace('[hosts.B]',
                                     f'tls = "{pki}"\n\n[hosts.B]'))
        self.assert_up_refused(
            desc, "A", f"{desc}: hosts.A.tls: {pki} has no server-cert.pem")

    def assert_up_refused(self, desc: pathlib.Path, host: str,
                          message: str) -> None:
        """``curling.py up DESC --host HOST`` ends at once with status 1
        and ``message`` on stderr."""
        res = subprocess.run([sys.executable, str(CURLING), "up", str(desc),
                              "--host", host], capture_output=True, text=True,
                             timeout=60)
        self.assertEqual(res.returncode, 1, res.stdout + res.stderr)
        self.assertIn(message, res.stderr)
