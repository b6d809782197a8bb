# SPDX-License-Identifier: GPL-2.0-or-later
"""One host's part of a protected guest: ``curling.py up``.

A host of a description (scripts/curlingtool/description.py) starts its
QEMU in the role the witness gives it: the holder of the guest's term
runs the guest, every other host waits as a receiver (with no term yet,
the first host of the description runs it).  It runs the agent
(scripts/curlingtool/agent.py) on that QEMU, in the managed mode, and
keeps the guest protected:

- a host that runs the guest and holds its term, with no protection
  under way, protects it to the next host of the description, trying the
  others in turn until one accepts (a receiver that took over does the
  same: re-protection; a host that comes back after a failure starts as
  a receiver and is protected onto: failback);
- it publishes what its QEMU does under ``curling/<guest>/host/<id>`` on
  the witness, for ``curling.py status``;
- ``curling.py down`` clears the guest's ``protect`` flag on the witness:
  the host that runs the guest ends protection and runs on, the
  receivers quit; ``up`` sets it again.

It returns when its QEMU went away (1: a service manager starts it again,
as a receiver once another host took over) or on SIGTERM, after asking
QEMU to quit (0).  The witness also holds each description's
fingerprint: a host whose description differs from the one the others
started with is refused until ``down``.  Every decision is one log line
with its reason, as the agent's are.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import pathlib
import signal
import subprocess
import time
from typing import Any, Callable, Optional

from . import CurlingError
from .agent import (PROTECTION_UNDER_WAY, Agent, AgentConfig, AgentError,
                    CommandFailed, MonitorClosed, QMPMonitor)
from .arbiter import ArbiterError, Role, parse_term, term_key
from .description import Description, Host
from .vm import die_with_parent
from .witness import Witness, WitnessError

log = logging.getLogger(__name__)

#: Seconds between two looks at QEMU and the witness.
TICK = 1.0
#: Seconds between two tries to protect the guest; doubled after each
#: round of the other hosts that all refused, up to RETRY_MAX.
RETRY = 3.0
RETRY_MAX = 30.0
#: Seconds a report on the witness stays news: a receiver that reported
#: it waits within that time is tried without the back-off.
FRESH = 10.0
#: Seconds a receiver waits, after ``down``, for its sender to end
#: protection before it quits anyway.
DOWN_WAIT = 10.0
#: Seconds QEMU has to quit when asked.
QUIT_TIMEOUT = 30.0
#: The QEMU of this checkout's build.
DEFAULT_QEMU = (pathlib.Path(__file__).resolve().parents[2] / "build" /
                "bin" / "qemu-system-x86_64")

TLS_SERVER, TLS_CLIENT = "curling-tls-server", "curling-tls-client"


class ServiceError(CurlingError):
    """This host cannot take its part: says why."""


def service_key(guest: str) -> str:
    return f"curling/{guest}/service"


def host_key(guest: str, host_id: str) -> str:
    return f"curling/{guest}/host/{host_id}"


def decision_line(guest: str, host: str, decision: str, reason: str) -> str:
    """``curling-up guest=G host=H decision=D REASON``."""
    return f"curling-up guest={guest} host={host} decision={decision} {reason}"


def incoming_uri(desc: Description, host: Host) -> str:
    return f"curling:tcp:{host.address}:{desc.protection.port}"


def run_dir(desc: Description, host: Host) -> pathlib.Path:
    return pathlib.Path(host.run) / desc.guest.name


def qemu_args(desc: Description, host: Host, role: Role,
              qemu: os.PathLike[str] | str) -> list[str]:
    """This host's QEMU command line: the guest, its drives on this host's
    images, its NICs on this host's attachments, Curling's monitors; a
    receiver waits for ``migrate-incoming``."""
    g = desc.guest
    rd = run_dir(desc, host)
    args = [os.fspath(qemu), "-name", f"{g.name},debug-threads=on",
            "-machine", g.machine, "-m", g.memory, "-smp", str(g.vcpus),
            "-pidfile", os.fspath(rd / "qemu.pid")]
    for drive in g.drives:
        args += ["-drive", f"if=none,id={drive.id},format={drive.format},"
                 f"file={host.drives[drive.id]}",
                 "-device", f"{drive.device},drive={drive.id}"]
    for nic in g.nics:
        kind, name = host.nics[nic.id].split(":", 1)
        if kind == "tap":
            netdev = f"tap,id={nic.id},ifname={name},script=no,downscript=no"
        else:
            netdev = f"bridge,id={nic.id},br={name}"
        args += ["-netdev", netdev,
                 "-device", f"{nic.device},netdev={nic.id},mac={nic.mac}"]
    if host.tls:
        for obj, endpoint in ((TLS_SERVER, "server"), (TLS_CLIENT, "client")):
            args += ["-object", f"tls-creds-x509,id={obj},dir={host.tls},"
                     f"endpoint={endpoint}"]
    args += ["-chardev", f"socket,id=curling-up,path={rd / 'up.qmp'},"
             "server=on,wait=off", "-mon", "chardev=curling-up,mode=control",
             "-qmp", f"unix:{rd / 'qmp'},server=on,wait=off"]
    if role == "receiver":
        args += ["-incoming", "defer"]
    # {run} and {host} in the guest's arguments: this host's run directory
    # (a console log of its own) and id
    return args + [arg.replace("{run}", os.fspath(rd)).replace(
        "{host}", host.id) for arg in g.args]


@dataclasses.dataclass
class Report:
    """What a host published about its QEMU."""
    host: str
    role: str
    status: str
    running: bool
    sequence: int = 0
    since_commit: Optional[int] = None
    time: float = 0.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Optional[Report]:
        try:
            data = json.loads(text)
            return cls(**data)
        except (ValueError, TypeError):
            return None


def write(witness: Witness, key: str, value: str, tries: int = 5) -> None:
    """Set ``key`` whatever it holds (a swap from what was read)."""
    for _ in range(tries):
        current = witness.read(key)
        if current == value or witness.compare_and_swap(key, current, value):
            return
    raise WitnessError(f"{key}: changed {tries} times while writing it")


def parse_service(text: Optional[str]) -> dict[str, Any]:
    """The guest's service record (protect flag, fingerprint), or {}."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def read_service(witness: Witness, guest: str) -> dict[str, Any]:
    return parse_service(witness.read(service_key(guest)))


def read_report(witness: Witness, guest: str,
                host_id: str) -> Optional[Report]:
    """What ``host_id`` last published about its QEMU, if anything."""
    text = witness.read(host_key(guest, host_id))
    return Report.from_json(text) if text else None


def term_holder(term: Optional[str]) -> Optional[str]:
    """The holder of a term record; None when absent or malformed."""
    if term is None:
        return None
    try:
        return parse_term(term).holder
    except ArbiterError:
        return None


def set_protect(witness: Witness, desc: Description, protect: bool) -> None:
    """Set the guest's protect flag, with this description's fingerprint
    (``up``); refuse a fingerprint that differs from the one in force
    while protection is on."""
    key = service_key(desc.guest.name)
    mine = desc.fingerprint()
    for _ in range(5):
        text = witness.read(key)
        current = parse_service(text)
        theirs = current.get("fingerprint")
        if protect and current.get("protect") and theirs not in (None, mine):
            raise ServiceError(
                f"{desc.path}: this description of {desc.guest.name} "
                f"(fingerprint {mine}) differs from the one the other hosts "
                f"run it with ({theirs}): give every host the same file, or "
                f"end protection first (curling.py down)")
        new = json.dumps({"fingerprint": mine if protect or not theirs
                          else theirs, "protect": protect}, sort_keys=True)
        if text == new or witness.compare_and_swap(key, text, new):
            return
    raise ServiceError(f"{key}: changed while writing it")


def start_role(desc: Description, host: Host,
               term: Optional[str]) -> tuple[Role, str]:
    """The role this host starts in, and why."""
    if term is None:
        first = desc.hosts[0]
        if host.id == first.id:
            return "sender", "no term yet and this is the first host"
        return "receiver", f"no term yet: {first.id}, the first host, runs it"
    holder = parse_term(term).holder
    if holder == host.id:
        return "sender", f"this host holds term {term}"
    if holder not in [h.id for h in desc.hosts]:
        raise ServiceError(f"term {term} of {desc.guest.name} is held by "
                           f"{holder}, which is no host of {desc.path}")
    return "receiver", f"{holder} holds term {term}"


class Service:
    """This host's part of one protected guest; ``run()`` it."""

    def __init__(self, desc: Description, host_id: str, witness: Witness,
                 qemu: os.PathLike[str] | str = DEFAULT_QEMU,
                 clock: Callable[[], float] = time.time) -> None:
        self.desc = desc
        self.host = desc.host(host_id)
        self.witness = witness
        self.qemu = qemu
        self.clock = clock
        self.guest = desc.guest.name
        self.role: Role = "receiver"
        self.proc: Optional[subprocess.Popen] = None
        self.monitor: Optional[QMPMonitor] = None
        self.agent: Optional[Agent] = None
        self._stop = asyncio.Event()
        self._candidates = list(desc.others(host_id))
        self._next = 0                  # candidate to try next
        self._tried_at = 0.0
        self._trying: Optional[Host] = None
        self._protected_by: Optional[str] = None
        self._failures = 0              # tries refused in a row
        self._cancelled = False
        self._down_since: Optional[float] = None

    # -- log ---------------------------------------------------------------

    def say(self, decision: str, reason: str) -> None:
        log.info("%s", decision_line(self.guest, self.host.id, decision,
                                     reason))

    # -- before anything starts ---------------------------------------------

    def check(self) -> None:
        """Refuse, before starting anything, what cannot work here."""
        for drive, path in self.host.drives.items():
            if not os.path.exists(path):
                raise ServiceError(f"{self.desc.path}: hosts.{self.host.id}."
                                   f"drives.{drive}: {path} does not exist")
        if not os.access(self.qemu, os.X_OK):
            raise ServiceError(f"QEMU {self.qemu} is not there (build it "
                               "with scripts/build.py)")
        if self.host.tls:
            for name in ("ca-cert.pem", "server-cert.pem", "server-key.pem",
                         "client-cert.pem", "client-key.pem"):
                if not os.path.exists(os.path.join(self.host.tls, name)):
                    raise ServiceError(
                        f"{self.desc.path}: hosts.{self.host.id}.tls: "
                        f"{self.host.tls} has no {name}")

    # -- run ---------------------------------------------------------------

    async def run(self) -> int:
        """Start this host's QEMU and keep the guest protected; 1 when
        QEMU went away, 0 after SIGTERM or ``down`` on a receiver."""
        self.check()
        rd = run_dir(self.desc, self.host)
        self._check_no_qemu(rd)
        term = await self._witness(self.witness.read, term_key(self.guest))
        await self._witness(set_protect, self.witness, self.desc, True)
        self.role, why = start_role(self.desc, self.host, term)
        self.say(f"start-{self.role}", why)
        rd.mkdir(parents=True, exist_ok=True)
        for sock in ("up.qmp", "qmp"):
            with contextlib.suppress(FileNotFoundError):
                (rd / sock).unlink()
        args = qemu_args(self.desc, self.host, self.role, self.qemu)
        with open(rd / "qemu.log", "ab") as out:
            # Its QEMU dies with it: an up started again must never find
            # the guest still running here and start a second copy.
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=out,
                                         start_new_session=True,
                                         preexec_fn=die_with_parent)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            self.monitor = await QMPMonitor.connect(rd / "up.qmp")
            await self._prepare()
            self.agent = Agent(self.monitor, self.witness, AgentConfig(
                vm=self.guest, me=self.host.id, role=self.role,
                peers=tuple(h.id for h in self._candidates)))
            agent_task = asyncio.ensure_future(self.agent.run())
            code = await self._supervise(agent_task)
        except (AgentError, CommandFailed) as exc:
            self.say("stop", f"QEMU refused: {exc}")
            code = 1
        except MonitorClosed:
            code = 1
        finally:
            await self._end()
        return code

    def _check_no_qemu(self, rd: pathlib.Path) -> None:
        """Refuse to start while the QEMU an earlier ``up`` started here
        still runs (its pid file names a live QEMU)."""
        try:
            pid = int((rd / "qemu.pid").read_text().split()[0])
            cmdline = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            return
        if f"{self.guest},debug-threads=on".encode() in cmdline:
            raise ServiceError(f"a QEMU of {self.guest} still runs on this "
                               f"host (pid {pid}): stop it first")

    async def _witness(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the witness, retried while it does not answer."""
        said = False
        while True:
            try:
                return await asyncio.to_thread(fn, *args)
            except WitnessError as exc:
                if not said:
                    self.say("wait", f"witness unreachable: {exc}")
                    said = True
            await asyncio.sleep(RETRY)

    async def _qmp(self, cmd: str, args: Optional[dict[str, Any]] = None
                   ) -> Any:
        assert self.monitor is not None
        return await self.monitor.execute(cmd, args)

    async def _prepare(self) -> None:
        p = self.desc.protection
        await self._qmp("migrate-set-parameters", {
            "curling-interval": p.interval, "curling-timeout": p.timeout})
        if self.role == "receiver":
            if self.host.tls:
                await self._qmp("migrate-set-parameters",
                                {"tls-creds": TLS_SERVER})
            uri = incoming_uri(self.desc, self.host)
            await self._qmp("migrate-incoming", {"uri": uri})
            self.say("listen", f"waiting for the guest's sender on {uri}")

    async def _supervise(self, agent_task: asyncio.Future[None]) -> int:
        while True:
            stop = asyncio.ensure_future(self._stop.wait())
            waits: set[asyncio.Future[Any]] = {agent_task, stop}
            done, _ = await asyncio.wait(waits, timeout=TICK,
                                         return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if agent_task in done:
                agent_task.result()     # AgentError: QEMU refused
                self.say("stop", "QEMU went away")
                return 1
            if self._stop.is_set():
                self.say("stop", "asked to stop: QEMU quits")
                agent_task.cancel()
                return 0
            try:
                code = await self._tick()
                if code is not None:
                    agent_task.cancel()
                    return code
            except MonitorClosed:
                continue                # the agent task ends next
            except WitnessError as exc:
                log.info("curling-up guest=%s host=%s: witness: %s",
                         self.guest, self.host.id, exc)

    async def _tick(self) -> Optional[int]:
        """One look at QEMU and the witness; an exit code to end with."""
        state = await self._qmp("query-curling")
        run = await self._qmp("query-status")
        status = state.get("status", "none")
        running = run.get("status") == "running"
        role = state.get("role") or self.role
        report = Report(self.host.id, role, status, running,
                        state.get("sequence", 0), state.get("since-commit"),
                        self.clock())
        await asyncio.to_thread(write, self.witness,
                                host_key(self.guest, self.host.id),
                                report.to_json())
        service = await asyncio.to_thread(read_service, self.witness,
                                          self.guest)
        protect = service.get("protect", True)
        if not protect:
            return await self._down(status, running)
        self._cancelled = False
        self._down_since = None
        if status == "protecting":
            self._protected_by_now()
        if (role == "receiver" and not running and
                status in ("cancelled", "error")):
            # Its sender ended protection: nothing to take over any more.
            # Started again, it waits for a sender afresh.
            self.say("stop", f"protection ended ({status}): this receiver "
                     "starts again")
            return 1
        if running and status not in PROTECTION_UNDER_WAY:
            await self._protect_next(status)
        return None

    def _protected_by_now(self) -> None:
        if self._trying is not None:
            self.say("protected", f"by {self._trying.id}")
            self._protected_by = self._trying.id
            self._trying = None
            self._next = 0
            self._failures = 0

    def _waiting(self) -> list[Host]:
        """The other hosts whose receiver reported lately that it waits."""
        hosts = []
        for host in self._candidates:
            r = read_report(self.witness, self.guest, host.id)
            if (r is not None and self.clock() - r.time < FRESH and
                    r.role in ("receiver", "none") and not r.running and
                    r.status in ("none", "setup")):
                hosts.append(host)
        return hosts

    async def _protect_next(self, status: str) -> None:
        """The guest runs here unprotected: protect it to the next host,
        first to one whose receiver said it waits."""
        assert self.agent is not None
        if self.agent.busy or self.clock() < self._tried_at + RETRY:
            return
        rounds = self._failures // len(self._candidates)
        delay = min(RETRY * 2 ** rounds, RETRY_MAX)
        waiting = await asyncio.to_thread(self._waiting)
        if not waiting and self.clock() < self._tried_at + delay:
            return
        term = await asyncio.to_thread(self.witness.read,
                                       term_key(self.guest))
        if term is not None and term_holder(term) != self.host.id:
            return                      # the agent fences this QEMU
        if self._trying is not None:
            self._failures += 1
            self.say("skip", f"{self._trying.id} did not accept ({status})")
            self._next = (self._next + 1) % len(self._candidates)
        elif self._protected_by is not None:
            self.say("lost", f"protection by {self._protected_by} ended "
                     f"({status})")
            self._protected_by = None
            self._next = 0
        order = (self._candidates[self._next:] +
                 self._candidates[:self._next])
        target = next((h for h in order if h in waiting), order[0])
        self._next = self._candidates.index(target)
        self._trying = target
        self._tried_at = self.clock()
        if self.host.tls:
            await self._qmp("migrate-set-parameters", {
                "tls-creds": TLS_CLIENT, "tls-hostname": target.address})
        self.say("protect", f"to {target.id} at "
                 f"{incoming_uri(self.desc, target)}")
        self.agent.protect(incoming_uri(self.desc, target))

    async def _down(self, status: str, running: bool) -> Optional[int]:
        if running or self.role == "sender":
            if status in PROTECTION_UNDER_WAY and not self._cancelled:
                self.say("down", "protection ends: migrate_cancel")
                with contextlib.suppress(CommandFailed):
                    await self._qmp("migrate_cancel")
                self._cancelled = True
            self._trying = self._protected_by = None
            return None
        if self._down_since is None:
            self._down_since = self.clock()
        if (status in PROTECTION_UNDER_WAY and
                self.clock() < self._down_since + DOWN_WAIT):
            return None                 # its sender ends it first
        self.say("down", f"protection ended ({status}): this receiver quits")
        return 0

    async def _end(self) -> None:
        """Have QEMU quit (if it still runs) and wait for it."""
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp("quit"), 5)
            await self.monitor.close()
        if self.proc is not None:
            try:
                await asyncio.to_thread(self.proc.wait, QUIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)


def status_lines(desc: Description, witness: Witness,
                 now: Callable[[], float] = time.time) -> list[str]:
    """What ``curling.py status`` prints: who runs the guest, who
    protects it, the last committed checkpoint and the time since."""
    guest = desc.guest.name
    term = witness.read(term_key(guest))
    service = read_service(witness, guest)
    holder = term_holder(term)
    reports = {host.id: read_report(witness, guest, host.id)
               for host in desc.hosts}
    runner = reports.get(holder) if holder else None
    head = f"guest {guest}: "
    if holder is None:
        head += "never run (no term on the witness)"
    else:
        head += f"runs on {holder} (term {term})"
        if runner is not None and runner.status == "protecting":
            protector = next((h for h, r in reports.items() if r and h !=
                              holder and r.role == "receiver" and
                              r.status == "protecting"), "?")
            since = ("" if runner.since_commit is None
                     else f", {runner.since_commit} ms before the report")
            head += (f", protected by {protector}: checkpoint "
                     f"{runner.sequence} committed{since}")
        else:
            head += ", not protected"
    if service and not service.get("protect", True):
        head += " (protection is down)"
    lines = [head]
    for host in desc.hosts:
        r = reports[host.id]
        if r is None:
            lines.append(f"  {host.id:<8} no report")
            continue
        age = now() - r.time
        guest_state = "guest running" if r.running else "guest not running"
        lines.append(f"  {host.id:<8} {r.role:<8} {r.status:<12} "
                     f"checkpoint {r.sequence:<8} {guest_state}, "
                     f"reported {age:.1f} s ago")
    return lines


def down(desc: Description, witness: Witness) -> None:
    """Clear the guest's protect flag: protection ends on every host."""
    set_protect(witness, desc, False)
