# SPDX-License-Identifier: GPL-2.0-or-later
"""The Curling agent: beside each QEMU, it decides who acts when the
sender and the receiver lost each other.

It turns on managed mode (``curling-managed``), in which a QEMU that lost
its peer reports CURLING_PEER_LOST and waits instead of acting alone. The
agent then asks the witness (scripts/curlingtool/witness.py) following the
rules of scripts/curlingtool/arbiter.py: the side that wins the swap of
the VM's term acts (receiver ``curling-take-over``, sender
``curling-continue``), the other quits its QEMU; while the witness does
not answer, nobody acts and the agent asks again every ``retry`` seconds.

A sender agent given ``protect`` claims the next term, then starts the
protection (``migrate`` to that URI). A receiver agent learns the term
from the witness once its QEMU is protecting. A receiver agent given
``standby`` protects the VM again after it took over: it claims the next
term and migrates to the standby receiver, and is a sender agent from
then on.

The agent needs a QMP monitor of its own on its QEMU (a second ``-mon``
when something else already uses the first). Every decision is one log
line: ``curling-agent vm=VM role=ROLE decision=DECISION REASON``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pathlib
import subprocess
import sys
from typing import Any, Awaitable, Callable, Optional, Protocol

from qemu.qmp import (ConnectError, ExecInterruptedError, ExecuteError,
                      QMPClient, QMPError, Runstate, StateError)

from . import CurlingError
from .arbiter import (ROLES, Action, ArbiterError, Decision, HeldElsewhere,
                      PeerLost, Role, Swap, check_id, claim_after_loss,
                      claim_for_protect, decide, decision_line,
                      learn_expected, term_key)
from .witness import Witness, WitnessError

log = logging.getLogger(__name__)

DEFAULT_RETRY = 0.2
CONNECT_TIMEOUT = 30.0

#: query-curling statuses of a protection under way.
PROTECTION_UNDER_WAY = ("setup", "initial-sync", "protecting", "peer-lost")


class AgentError(CurlingError):
    """The agent cannot go on: wrong set-up, or QEMU refused an action."""


class MonitorClosed(CurlingError):
    """QEMU closed its monitor: it went away."""


class CommandFailed(CurlingError):
    """QEMU answered a command with an error."""


class Monitor(Protocol):
    """What the agent needs of its QEMU (``QMPMonitor``, or a test fake)."""

    async def execute(self, cmd: str,
                      arguments: Optional[dict[str, Any]] = None) -> Any:
        """The command's return value; raises ``CommandFailed`` when QEMU
        refuses it, ``MonitorClosed`` when QEMU went away."""

    async def next_event(self) -> Optional[dict[str, Any]]:
        """The next QMP event; None once QEMU went away."""


class QMPMonitor:
    """``Monitor`` over a ``qemu.qmp.QMPClient``."""

    def __init__(self, client: QMPClient) -> None:
        self.client = client

    @classmethod
    async def connect(cls, path: os.PathLike[str] | str,
                      timeout: float = CONNECT_TIMEOUT) -> QMPMonitor:
        """Connect to the QMP unix socket ``path``, waiting for it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            client = QMPClient("curling-agent")
            try:
                # QEMU serves one client per monitor and leaves others
                # waiting for a greeting: never wait past the deadline.
                await asyncio.wait_for(client.connect(os.fspath(path)),
                                       max(0.1, deadline - loop.time()))
                return cls(client)
            except (ConnectError, asyncio.TimeoutError) as exc:
                # (the client is back to IDLE: it cleans up after itself)
                if loop.time() >= deadline:
                    raise AgentError(f"no QMP monitor on {path} after "
                                     f"{timeout:g} s: {exc or 'no greeting'}"
                                     ) from None
            await asyncio.sleep(0.2)

    async def execute(self, cmd: str,
                      arguments: Optional[dict[str, Any]] = None) -> Any:
        try:
            return await self.client.execute(cmd, arguments)
        except ExecuteError as exc:
            raise CommandFailed(str(exc)) from None
        except (ExecInterruptedError, StateError, EOFError,
                ConnectionError) as exc:
            raise MonitorClosed(f"QEMU went away during {cmd}: {exc}") from None

    async def next_event(self) -> Optional[dict[str, Any]]:
        events = self.client.events
        while True:
            if not events.empty():
                return dict(await events.get())
            if self.client.runstate != Runstate.RUNNING:
                return None
            get = asyncio.ensure_future(events.get())
            changed = asyncio.ensure_future(self.client.runstate_changed())
            try:
                # A change of runstate before ``changed`` waits goes
                # unnoticed: let both start waiting, look again, and look
                # again now and then anyway.
                await asyncio.sleep(0)
                if self.client.runstate == Runstate.RUNNING:
                    await asyncio.wait({get, changed}, timeout=0.5,
                                       return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    return dict(get.result())
            finally:
                get.cancel()
                changed.cancel()

    async def close(self) -> None:
        try:
            await self.client.disconnect()
        except (QMPError, OSError, EOFError):
            pass   # QEMU already went away


@dataclasses.dataclass(frozen=True)
class AgentConfig:
    """What one agent protects, as whom, and how."""

    vm: str                        # name of the protected VM (its term key)
    me: str                        # this agent's id: the holder it writes
    role: Role                     # its QEMU's side when it starts
    peer: Optional[str] = None     # receiver: the id of the sender agent
    #: receiver: the ids of the agents that may protect to it, if several
    #: may (instead of ``peer``)
    peers: tuple[str, ...] = ()
    protect: Optional[str] = None  # sender: migrate URI to protect to
    standby: Optional[str] = None  # receiver: protect again to this URI
    #: id of its QEMU's client TLS credentials, set as tls-creds before
    #: each migrate of the agent's (--protect, --standby)
    tls_creds: Optional[str] = None
    retry: float = DEFAULT_RETRY   # seconds between tries of the witness

    @property
    def senders(self) -> tuple[str, ...]:
        """receiver: the ids that may hold the term it learns."""
        return self.peers or ((self.peer,) if self.peer else ())

    def __post_init__(self) -> None:
        try:
            term_key(self.vm)
            check_id(self.me)
            for peer in self.senders:
                check_id(peer, "peer id")
        except ArbiterError as exc:
            raise AgentError(str(exc)) from None
        if self.role not in ROLES:
            raise AgentError(f"role {self.role!r}: sender or receiver")
        if self.role == "receiver" and not self.senders:
            raise AgentError("a receiver agent needs the id of its sender "
                             "(--peer)")
        if self.me in self.senders:
            raise AgentError(f"peer and agent have the same id {self.me!r}")
        if self.protect and self.role != "sender":
            raise AgentError("only a sender agent protects (--protect)")
        if self.standby and self.role != "receiver":
            raise AgentError("only a receiver agent re-protects (--standby)")
        if not self.retry > 0:
            raise AgentError(f"retry {self.retry!r}: must be positive")


Step = Callable[[], Awaitable[bool]]


class Agent:
    """The agent of one QEMU; ``run()`` until that QEMU goes away."""

    def __init__(self, monitor: Monitor, witness: Witness,
                 config: AgentConfig) -> None:
        self.monitor = monitor
        self.witness = witness
        self.config = config
        self.key = term_key(config.vm)
        self.role: Role = config.role
        #: The term of the protection under way, as this side knows it.
        self.expected: Optional[str] = None
        #: Set once this side decided about its lost peer.
        self.decided: Optional[Decision] = None
        self._step: Optional[Step] = None   # the pending work, tried again
        self._due = 0.0                     # ... not before this loop time
        self._said: set[str] = set()        # ... and its retries' lines
        self._awaiting_failover = False
        self._wake = asyncio.Event()        # work was scheduled

    # -- log -------------------------------------------------------------

    def _say(self, decision: str, reason: str) -> None:
        log.info("%s", decision_line(self.config.vm, self.role, decision,
                                     reason))

    def _say_once(self, decision: str, reason: str) -> None:
        """Log a retry's line once per pending work and distinct reason."""
        if reason not in self._said:
            self._said.add(reason)
            self._say(decision, reason)

    # -- QEMU and witness ------------------------------------------------

    async def _qmp(self, cmd: str,
                   arguments: Optional[dict[str, Any]] = None) -> Any:
        try:
            return await self.monitor.execute(cmd, arguments)
        except CommandFailed as exc:
            raise AgentError(f"QEMU refused {cmd}: {exc}") from None

    async def _read(self) -> Optional[str]:
        return await asyncio.to_thread(self.witness.read, self.key)

    async def _swap(self, expected: Optional[str], new: str) -> bool:
        return await asyncio.to_thread(self.witness.compare_and_swap,
                                       self.key, expected, new)

    # -- main loop -------------------------------------------------------

    def _schedule(self, step: Optional[Step]) -> None:
        self._step = step
        self._due = 0.0
        self._said = set()
        if step is not None:
            self._wake.set()

    async def run(self) -> None:
        """Serve until QEMU goes away; AgentError when it cannot."""
        try:
            await self._start()
            await self._loop()
        except MonitorClosed as exc:
            log.debug("%s", exc)
        log.info("curling-agent vm=%s role=%s: QEMU went away",
                 self.config.vm, self.role)

    async def _start(self) -> None:
        await self._qmp("migrate-set-parameters", {"curling-managed": True})
        state = await self._qmp("query-curling")
        status = state.get("status", "none")
        if state.get("role") in ROLES:
            self.role = state["role"]
        log.info("curling-agent vm=%s role=%s: id %s, witness %s, QEMU "
                 "status %s", self.config.vm, self.role, self.config.me,
                 self.witness, status)
        if status == "peer-lost":
            self._peer_lost(PeerLost("already lost when the agent started",
                                     state.get("sequence")))
        elif status == "protecting":
            self._schedule(self._learn)
        elif status in PROTECTION_UNDER_WAY:
            pass   # learn the term once it is protecting
        elif self.config.protect:
            uri = self.config.protect
            self._schedule(lambda: self._claim(uri))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        # The wait for the next event outlives a timeout: cancelling it
        # could lose the event it was taking.
        waiting: Optional[asyncio.Future[Optional[dict[str, Any]]]] = None
        try:
            while True:
                step = self._step
                if step is not None and loop.time() >= self._due:
                    done = await step()
                    if self._step is step:
                        if done:
                            self._schedule(None)
                        else:
                            self._due = loop.time() + self.config.retry
                    continue
                timeout = (None if step is None
                           else max(0.0, self._due - loop.time()))
                if waiting is None:
                    waiting = asyncio.ensure_future(self.monitor.next_event())
                # Work scheduled from outside (protect()) wakes the wait
                self._wake.clear()
                wake = asyncio.ensure_future(self._wake.wait())
                futures: set[asyncio.Future[Any]] = {waiting, wake}
                await asyncio.wait(futures, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
                wake.cancel()
                if not waiting.done():
                    continue
                event, waiting = waiting.result(), None
                if event is None:
                    return
                self._on_event(event)
        finally:
            if waiting is not None:
                waiting.cancel()

    def _on_event(self, event: dict[str, Any]) -> None:
        name = event.get("event")
        data = event.get("data") or {}
        if name == "CURLING_STATE":
            log.info("curling-agent vm=%s role=%s: QEMU %s %s",
                     self.config.vm, self.role, data.get("role"),
                     data.get("status"))
            status = data.get("status")
            if (status == "protecting" and self.expected is None
                    and self._step is None):
                self._schedule(self._learn)
            elif status == "failed-over":
                self._failed_over()
        elif name == "CURLING_PEER_LOST":
            if data.get("role") in ROLES and data["role"] != self.role:
                log.warning("curling-agent vm=%s role=%s: QEMU says it is "
                            "the %s", self.config.vm, self.role, data["role"])
                self.role = data["role"]
            self._peer_lost(PeerLost(str(data.get("reason", "?")),
                                     data.get("sequence")))
        elif name == "CURLING_FAILOVER":
            self._failed_over()

    # -- the work --------------------------------------------------------

    async def _claim(self, uri: str) -> bool:
        """Claim the next term for protecting to ``uri``, then migrate."""
        try:
            current = await self._read()
            claim = claim_for_protect(current, self.config.me)
            written = await self._swap(current, claim)
        except ArbiterError as exc:
            raise AgentError(f"refusing to protect: {exc}") from None
        except WitnessError as exc:
            self._say_once("wait", f"witness unreachable, not protecting "
                           f"yet: {exc}")
            return False
        if not written:
            self._say_once("wait", f"term {current or 'absent'} changed "
                           f"while claiming {claim}; trying again")
            return False
        self.expected = claim
        self.decided = None
        self.role = "sender"
        self._say("protect", f"term {claim} claimed (was "
                  f"{current or 'absent'}), migrating to {uri}")
        if self.config.tls_creds:
            await self._qmp("migrate-set-parameters",
                            {"tls-creds": self.config.tls_creds})
        await self._qmp("migrate", {"uri": uri})
        return True

    async def _learn(self) -> bool:
        """Learn the term of the protection under way from the witness."""
        if self.expected is not None:
            return True
        holder = ((self.config.me,) if self.role == "sender"
                  else self.config.senders)
        try:
            current = await self._read()
        except WitnessError as exc:
            self._say_once("wait", f"witness unreachable, term not learned "
                           f"yet: {exc}")
            return False
        try:
            expected = learn_expected(current, holder)
        except ArbiterError as exc:
            raise AgentError(f"refusing to arbitrate: {exc}") from None
        if self.role == "receiver":
            # A receiver that lost its sender meanwhile cannot tell the
            # sender's claim from the sender's win: trust only a value
            # read while it still is protecting.
            state = await self._qmp("query-curling")
            if state.get("status") != "protecting":
                log.info("curling-agent vm=%s role=%s: no longer protecting "
                         "(%s), term %s not taken", self.config.vm, self.role,
                         state.get("status"), expected)
                return True
        self.expected = expected
        self.decided = None
        self._say("armed", f"term {expected} learned from the {self.witness}")
        return True

    def _peer_lost(self, lost: PeerLost) -> None:
        if self.decided is not None:
            log.info("curling-agent vm=%s role=%s: %s, already decided %s",
                     self.config.vm, self.role, lost,
                     self.decided.action.value)
            return
        self._schedule(lambda: self._arbitrate(lost))

    async def _arbitrate(self, lost: PeerLost) -> bool:
        """Ask the witness whether this side acts; act when it answered."""
        current = None
        error = ""
        try:
            if self.expected is None and self.role == "sender":
                # Only the sender writes terms held by itself, before or
                # instead of protecting: it may learn its term late.
                self.expected = learn_expected(await self._read(),
                                               self.config.me)
            if self.expected is None:
                swap = Swap.REFUSED
            else:
                claim = claim_after_loss(self.expected, self.config.me)
                if await self._swap(self.expected, claim):
                    swap = Swap.DONE
                else:
                    swap = Swap.REFUSED
                    current = await self._read()
        except HeldElsewhere as exc:
            return await self._act(Decision(Action.FENCE, f"{exc} ({lost})"))
        except ArbiterError as exc:
            raise AgentError(f"cannot arbitrate: {exc}") from None
        except WitnessError as exc:
            swap, error = Swap.UNREACHABLE, str(exc)
        decision = decide(self.role, self.config.me, self.expected, swap,
                          lost, current, error)
        if not decision.final:
            self._say_once(decision.action.value, decision.reason)
            return False
        return await self._act(decision)

    async def _act(self, decision: Decision) -> bool:
        self.decided = decision
        log.info("%s", decision.line(self.config.vm, self.role))
        if decision.action is Action.FENCE:
            try:
                await self.monitor.execute("quit")
            except (CommandFailed, MonitorClosed):
                pass   # on its way out anyway
        elif decision.action is Action.TAKE_OVER:
            await self._qmp("curling-take-over")
            self._awaiting_failover = self.config.standby is not None
        elif decision.action is Action.CONTINUE:
            await self._qmp("curling-continue")
        self.expected = None
        return True

    def protect(self, uri: str) -> None:
        """Claim the next term and protect to ``uri`` (tried again while the
        witness does not answer)."""
        self._schedule(lambda: self._claim(uri))

    @property
    def busy(self) -> bool:
        """Work pending: a claim, a decision, learning the term."""
        return self._step is not None

    def _failed_over(self) -> None:
        if self._awaiting_failover:
            self._awaiting_failover = False
            self._schedule(self._reprotect)

    async def _reprotect(self) -> bool:
        """After a take-over: protect again to the standby, as the sender."""
        status = await self._qmp("query-status")
        if status.get("status") != "running":
            self._say_once("wait", "VM not running yet "
                           f"({status.get('status')}), not re-protecting")
            return False
        assert self.config.standby is not None
        return await self._claim(self.config.standby)


async def serve(config: AgentConfig, qmp_path: os.PathLike[str] | str,
                witness: Witness,
                connect_timeout: float = CONNECT_TIMEOUT) -> None:
    """Connect to QEMU's monitor at ``qmp_path`` and run its agent until
    QEMU goes away."""
    monitor = await QMPMonitor.connect(qmp_path, connect_timeout)
    try:
        await Agent(monitor, witness, config).run()
    finally:
        await monitor.close()


# -- running agents (tests, benchmark) ----------------------------------------

#: The agent's command.
AGENT_SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "agent.py"


def monitor_args(qmp_path: os.PathLike[str] | str) -> list[str]:
    """QEMU options of a QMP monitor of its own for the agent."""
    return ["-chardev", f"socket,id=agentqmp,path={qmp_path},server=on,"
            f"wait=off", "-mon", "chardev=agentqmp,mode=control"]


def spawn(qmp_path: os.PathLike[str] | str, role: str, vm: str, me: str,
          witness: str, log_path: os.PathLike[str] | str, *,
          peer: Optional[str] = None, protect: Optional[str] = None,
          standby: Optional[str] = None, tls_creds: Optional[str] = None,
          preexec_fn: Optional[Callable[[], None]] = None
          ) -> subprocess.Popen:
    """Start scripts/agent.py with this Python; its log (and anything it
    prints) goes to ``log_path``. The caller stops it."""
    args = [sys.executable, str(AGENT_SCRIPT), "--qmp", str(qmp_path),
            "--role", role, "--vm", vm, "--id", me, "--witness", witness,
            "--log", str(log_path)]
    for option, value in (("--peer", peer), ("--protect", protect),
                          ("--standby", standby), ("--tls-creds", tls_creds)):
        if value:
            args += [option, value]
    err_path = pathlib.Path(log_path).with_suffix(".err")
    with open(err_path, "ab") as err:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err,
                                preexec_fn=preexec_fn)


def decisions(log_path: os.PathLike[str] | str) -> list[str]:
    """The decision lines an agent logged so far."""
    path = pathlib.Path(log_path)
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines()
            if " decision=" in line]
