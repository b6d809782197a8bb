# SPDX-License-Identifier: GPL-2.0-or-later
"""The agent against a fake managed-mode QEMU and an in-memory witness."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Coroutine, Optional

import pytest

from curlingtool.agent import (Agent, AgentConfig, AgentError, CommandFailed,
                               MonitorClosed)
from curlingtool.witness import MemoryWitness, WitnessUnreachable

KEY = "curling/demo/term"
RECEIVER_URI = "curling:tcp:10.0.0.2:4444"
STANDBY_URI = "curling:tcp:10.0.0.3:4444"


class FakeQemu:
    """A QEMU in managed mode as its QMP monitor shows it: it answers the
    agent's commands, checks they are valid in its status, and sends the
    events a test makes it send."""

    def __init__(self, role: str = "none", status: str = "none",
                 running: bool = False) -> None:
        self.role = role
        self.status = status
        self.running = running
        self.runs_after_take_over = True
        self.sequence = 0
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self.gone = False
        self.hooks: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._events: asyncio.Queue[Optional[dict[str, Any]]] = asyncio.Queue()

    def names(self) -> list[str]:
        return [name for name, _ in self.commands]

    def emit(self, event: str, **data: Any) -> None:
        self._events.put_nowait({"event": event, "data": data,
                                 "timestamp": {"seconds": 0,
                                               "microseconds": 0}})

    def set_status(self, status: str) -> None:
        self.status = status
        self.emit("CURLING_STATE", role=self.role, status=status)

    def lose_peer(self, reason: str = "nothing received for 1000 ms",
                  sequence: int = 412) -> None:
        self.sequence = sequence
        self.set_status("peer-lost")
        self.emit("CURLING_PEER_LOST", role=self.role, reason=reason,
                  sequence=sequence)

    def go_away(self) -> None:
        self.gone = True
        self._events.put_nowait(None)

    async def execute(self, cmd: str,
                      arguments: Optional[dict[str, Any]] = None) -> Any:
        if self.gone:
            raise MonitorClosed("gone")
        args = dict(arguments or {})
        self.commands.append((cmd, args))
        if cmd in self.hooks:
            self.hooks[cmd](args)
        if cmd == "query-curling":
            return {"role": self.role, "status": self.status,
                    "sequence": self.sequence}
        if cmd == "query-status":
            return {"status": "running" if self.running else "paused",
                    "running": self.running}
        if cmd == "quit":
            self.go_away()
        elif cmd == "curling-take-over":
            self._check("receiver", "peer-lost", cmd)
            self.running = self.runs_after_take_over
            self.set_status("failed-over")
            self.emit("CURLING_FAILOVER", sequence=self.sequence)
        elif cmd == "curling-continue":
            self._check("sender", "peer-lost", cmd)
            self.set_status("none")
        elif cmd == "migrate":
            assert args["uri"].startswith("curling:tcp:")
            self.role = "sender"
            self.set_status("setup")
            self.set_status("initial-sync")
            self.set_status("protecting")
        return {}

    def _check(self, role: str, status: str, cmd: str) -> None:
        if (self.role, self.status) != (role, status):
            raise CommandFailed(f"{cmd}: not a {role} in {status} "
                                f"({self.role} in {self.status})")

    async def next_event(self) -> Optional[dict[str, Any]]:
        if self.gone and self._events.empty():
            return None
        return await self._events.get()


class FlakyWitness(MemoryWitness):
    """An in-memory witness that can be taken down; counts the tries."""

    def __init__(self, values: Optional[dict[str, str]] = None) -> None:
        super().__init__(values)
        self.down = False
        self.tries = 0

    def _answer(self) -> None:
        self.tries += 1
        if self.down:
            raise WitnessUnreachable("etcd http://127.0.0.1:2379: "
                                     "connection refused")

    def read(self, key: str) -> Optional[str]:
        self._answer()
        return super().read(key)

    def compare_and_swap(self, key: str, expected: Optional[str],
                         new: str) -> bool:
        self._answer()
        return super().compare_and_swap(key, expected, new)


def receiver_config(**kw: Any) -> AgentConfig:
    return AgentConfig(vm="demo", me="B", role="receiver", peer="A",
                       retry=0.01, **kw)


def sender_config(**kw: Any) -> AgentConfig:
    return AgentConfig(vm="demo", me="A", role="sender", retry=0.01, **kw)


async def until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.002)


Scenario = Callable[[Agent, FakeQemu], Coroutine[Any, Any, None]]


def run(config: AgentConfig, witness: MemoryWitness, scenario: Scenario,
        role: str = "none", status: str = "none") -> tuple[Agent, FakeQemu]:
    """Run the agent while ``scenario`` drives its QEMU; the agent must
    be done once the scenario is."""
    async def main() -> tuple[Agent, FakeQemu]:
        qemu = FakeQemu(role, status)
        agent = Agent(qemu, witness, config)
        task = asyncio.create_task(agent.run())
        try:
            await scenario(agent, qemu)
            await asyncio.wait_for(task, 5)
        finally:
            task.cancel()
        return agent, qemu
    return asyncio.run(main())


def decisions(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if "decision=" in r.getMessage()]


@pytest.fixture(autouse=True)
def info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="curlingtool.agent")


async def arm_and_lose(agent: Agent, qemu: FakeQemu) -> None:
    await until(lambda: agent.expected is not None)
    qemu.lose_peer()


# -- receiver --------------------------------------------------------------

def test_receiver_takes_over_when_it_wins(
        caplog: pytest.LogCaptureFixture) -> None:
    witness = FlakyWitness({KEY: "1:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await arm_and_lose(agent, qemu)
        await until(lambda: "curling-take-over" in qemu.names())
        qemu.go_away()

    agent, qemu = run(receiver_config(), witness, scenario,
                      "receiver", "protecting")
    assert qemu.commands[0] == ("migrate-set-parameters",
                                {"curling-managed": True})
    assert qemu.names().count("curling-take-over") == 1
    assert "quit" not in qemu.names() and "migrate" not in qemu.names()
    assert witness.read(KEY) == "2:B"
    assert decisions(caplog) == [
        "curling-agent vm=demo role=receiver decision=armed term 1:A learned "
        "from the memory witness",
        "curling-agent vm=demo role=receiver decision=take-over term 2:B won "
        "(peer lost: nothing received for 1000 ms, checkpoint 412)"]


def test_receiver_learns_once_protecting() -> None:
    witness = FlakyWitness({KEY: "1:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await asyncio.sleep(0.05)
        assert agent.expected is None   # still in initial sync
        qemu.set_status("protecting")
        await arm_and_lose(agent, qemu)
        await until(lambda: "curling-take-over" in qemu.names())
        qemu.go_away()

    agent, _qemu = run(receiver_config(), witness, scenario,
                       "receiver", "initial-sync")
    assert witness.read(KEY) == "2:B"


def test_receiver_fences_when_the_sender_won(
        caplog: pytest.LogCaptureFixture) -> None:
    witness = FlakyWitness({KEY: "1:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await until(lambda: agent.expected is not None)
        witness.values[KEY] = "2:A"   # the sender decided first
        qemu.lose_peer()

    _agent, qemu = run(receiver_config(), witness, scenario,
                       "receiver", "protecting")
    assert qemu.names()[-1] == "quit"
    assert "curling-take-over" not in qemu.names()
    assert witness.read(KEY) == "2:A"
    assert decisions(caplog)[-1].startswith(
        "curling-agent vm=demo role=receiver decision=fence term 2:B lost: "
        "the witness holds 2:A, not 1:A (peer lost:")


def test_no_action_while_the_witness_is_unreachable(
        caplog: pytest.LogCaptureFixture) -> None:
    witness = FlakyWitness({KEY: "1:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await until(lambda: agent.expected is not None)
        witness.down = True
        tries = witness.tries
        qemu.lose_peer()
        await until(lambda: witness.tries >= tries + 5)
        assert "curling-take-over" not in qemu.names()
        assert "quit" not in qemu.names()
        witness.down = False
        await until(lambda: "curling-take-over" in qemu.names())
        qemu.go_away()

    _agent, qemu = run(receiver_config(), witness, scenario,
                       "receiver", "protecting")
    assert qemu.names().count("curling-take-over") == 1
    assert witness.read(KEY) == "2:B"
    lines = decisions(caplog)
    waits = [line for line in lines if "decision=wait" in line]
    assert waits == [
        "curling-agent vm=demo role=receiver decision=wait witness "
        "unreachable, claim 2:B pending: etcd http://127.0.0.1:2379: "
        "connection refused (peer lost: nothing received for 1000 ms, "
        "checkpoint 412)"]
    assert "decision=take-over term 2:B won" in lines[-1]


def test_receiver_refuses_a_term_of_another_host() -> None:
    witness = FlakyWitness({KEY: "1:C"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        pass

    with pytest.raises(AgentError, match="refusing to arbitrate: term 1:C is "
                       "held by C, not by A"):
        run(receiver_config(), witness, scenario, "receiver", "protecting")


def test_receiver_that_never_learned_the_term_fences() -> None:
    witness = FlakyWitness({KEY: "1:A"})
    witness.down = True

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await until(lambda: witness.tries >= 3)
        qemu.lose_peer()
        await until(lambda: qemu.gone)

    agent, qemu = run(receiver_config(), witness, scenario,
                      "receiver", "protecting")
    assert qemu.names()[-1] == "quit"
    assert agent.decided is not None
    assert agent.decided.reason.startswith("term of this protection unknown")


class LateReadWitness(FlakyWitness):
    """Its first read answers what the sender claimed, but by then the
    sender lost the receiver and won: the value read is its win."""

    qemu: FakeQemu

    def read(self, key: str) -> Optional[str]:
        value = super().read(key)
        if self.qemu.status == "protecting":
            self.values[KEY] = value = "2:A"
            self.qemu.lose_peer()
        return value


def test_receiver_takes_no_term_read_after_losing_its_sender() -> None:
    witness = LateReadWitness({KEY: "1:A"})

    async def main() -> FakeQemu:
        qemu = witness.qemu = FakeQemu("receiver", "protecting")
        await asyncio.wait_for(Agent(qemu, witness, receiver_config()).run(), 5)
        return qemu

    qemu = asyncio.run(main())
    assert qemu.names()[-1] == "quit"
    assert "curling-take-over" not in qemu.names()
    assert witness.values[KEY] == "2:A"


def test_a_second_peer_lost_changes_nothing() -> None:
    witness = FlakyWitness({KEY: "1:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await arm_and_lose(agent, qemu)
        await until(lambda: "curling-take-over" in qemu.names())
        qemu.emit("CURLING_PEER_LOST", role="receiver", reason="again",
                  sequence=412)
        await asyncio.sleep(0.05)
        qemu.go_away()

    _agent, qemu = run(receiver_config(), witness, scenario,
                       "receiver", "protecting")
    assert "quit" not in qemu.names()
    assert qemu.names().count("curling-take-over") == 1
    assert witness.read(KEY) == "2:B"


def test_receiver_already_lost_at_start_fences() -> None:
    witness = FlakyWitness({KEY: "1:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        pass

    agent, qemu = run(receiver_config(), witness, scenario,
                      "receiver", "peer-lost")
    assert qemu.names()[-1] == "quit"
    assert witness.read(KEY) == "1:A"


# -- sender ----------------------------------------------------------------

def test_sender_claims_the_term_before_it_migrates(
        caplog: pytest.LogCaptureFixture) -> None:
    witness = FlakyWitness()
    at_migrate: list[Optional[str]] = []

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        qemu.hooks["migrate"] = lambda _args: at_migrate.append(
            witness.values.get(KEY))
        await until(lambda: qemu.status == "protecting")
        qemu.go_away()

    _agent, qemu = run(sender_config(protect=RECEIVER_URI), witness, scenario)
    assert at_migrate == ["1:A"]
    assert ("migrate", {"uri": RECEIVER_URI}) in qemu.commands
    assert decisions(caplog) == [
        "curling-agent vm=demo role=sender decision=protect term 1:A claimed "
        f"(was absent), migrating to {RECEIVER_URI}"]


def test_protect_from_outside_wakes_an_idle_agent() -> None:
    """protect() called while the agent waits for QEMU's next event (none
    comes) claims and migrates at once."""
    witness = FlakyWitness()

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await until(lambda: "query-curling" in qemu.names())
        await asyncio.sleep(0.05)       # the agent waits for an event
        agent.protect(RECEIVER_URI)
        await until(lambda: "migrate" in qemu.names(), timeout=0.2)
        qemu.go_away()

    _agent, qemu = run(sender_config(), witness, scenario)
    assert ("migrate", {"uri": RECEIVER_URI}) in qemu.commands
    assert witness.values.get(KEY) == "1:A"


def test_tls_credentials_are_set_before_each_migrate() -> None:
    witness = FlakyWitness({KEY: "1:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await arm_and_lose(agent, qemu)                  # A is gone
        await until(lambda: "migrate" in qemu.names())   # B protects to C
        qemu.go_away()

    _agent, qemu = run(receiver_config(standby=STANDBY_URI,
                                       tls_creds="tls-client"),
                       witness, scenario, "receiver", "protecting")
    at = qemu.commands.index(("migrate", {"uri": STANDBY_URI}))
    assert qemu.commands[at - 1] == ("migrate-set-parameters",
                                     {"tls-creds": "tls-client"})


def test_sender_claims_the_next_of_its_own_terms() -> None:
    witness = FlakyWitness({KEY: "3:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await until(lambda: "migrate" in qemu.names())
        assert agent.expected == "4:A"
        qemu.go_away()

    run(sender_config(protect=RECEIVER_URI), witness, scenario)
    assert witness.read(KEY) == "4:A"


def test_sender_refuses_to_protect_a_vm_of_another_host() -> None:
    witness = FlakyWitness({KEY: "3:C"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        pass

    with pytest.raises(AgentError, match="refusing to protect: term 3:C is "
                       "held by C: another host holds this VM"):
        run(sender_config(protect=RECEIVER_URI), witness, scenario)
    assert witness.read(KEY) == "3:C"


def test_sender_waits_for_the_witness_before_protecting() -> None:
    witness = FlakyWitness()
    witness.down = True

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await until(lambda: witness.tries >= 3)
        assert "migrate" not in qemu.names()
        witness.down = False
        await until(lambda: "migrate" in qemu.names())
        qemu.go_away()

    run(sender_config(protect=RECEIVER_URI), witness, scenario)
    assert witness.read(KEY) == "1:A"


@pytest.mark.parametrize("receiver_won", [False, True])
def test_sender_continues_or_fences(receiver_won: bool) -> None:
    witness = FlakyWitness()

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await until(lambda: qemu.status == "protecting"
                    and agent.expected is not None)
        if receiver_won:
            witness.values[KEY] = "2:B"
        qemu.lose_peer("no acknowledgement for 1000 ms", 7)
        if not receiver_won:
            await until(lambda: "curling-continue" in qemu.names())
            qemu.go_away()

    agent, qemu = run(sender_config(protect=RECEIVER_URI), witness, scenario)
    if receiver_won:
        assert qemu.names()[-1] == "quit"
        assert "curling-continue" not in qemu.names()
        assert witness.read(KEY) == "2:B"
    else:
        assert qemu.names().count("curling-continue") == 1
        assert "quit" not in qemu.names()
        assert witness.read(KEY) == "2:A"
        assert agent.decided is not None
        assert agent.decided.reason == ("term 2:A won (peer lost: no "
                                        "acknowledgement for 1000 ms, "
                                        "checkpoint 7)")


def test_sender_agent_started_late_learns_its_term() -> None:
    witness = FlakyWitness({KEY: "5:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await until(lambda: "curling-continue" in qemu.names())
        qemu.go_away()

    _agent, qemu = run(sender_config(protect=RECEIVER_URI), witness,
                       scenario, "sender", "peer-lost")
    assert "migrate" not in qemu.names()   # already protecting: no new claim
    assert witness.read(KEY) == "6:A"


def test_sender_agent_started_late_waits_for_the_witness() -> None:
    witness = FlakyWitness({KEY: "5:A"})
    witness.down = True

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await until(lambda: witness.tries >= 3)
        assert qemu.names()[-1] == "query-curling"   # neither acted
        witness.down = False
        await until(lambda: "curling-continue" in qemu.names())
        qemu.go_away()

    run(sender_config(), witness, scenario, "sender", "peer-lost")
    assert witness.read(KEY) == "6:A"


def test_sender_agent_started_late_fences_when_the_receiver_won() -> None:
    witness = FlakyWitness({KEY: "6:B"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        pass

    agent, qemu = run(sender_config(), witness, scenario, "sender",
                      "peer-lost")
    assert qemu.names()[-1] == "quit"
    assert agent.decided is not None
    assert agent.decided.reason.startswith("term 6:B is held by B, not by A")


# -- two failovers in a row ------------------------------------------------

@pytest.mark.parametrize("standby_won", [False, True])
def test_reprotect_after_take_over(standby_won: bool) -> None:
    witness = FlakyWitness({KEY: "1:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await arm_and_lose(agent, qemu)                  # A is gone
        await until(lambda: "migrate" in qemu.names())   # B protects to C
        assert witness.read(KEY) == "3:B"
        assert agent.role == "sender" and agent.expected == "3:B"
        await until(lambda: qemu.status == "protecting")
        if standby_won:
            witness.values[KEY] = "4:C"
        qemu.lose_peer("no acknowledgement for 1000 ms", 900)   # C is gone
        if not standby_won:
            await until(lambda: "curling-continue" in qemu.names())
            qemu.go_away()

    agent, qemu = run(receiver_config(standby=STANDBY_URI), witness,
                      scenario, "receiver", "protecting")
    names = qemu.names()
    assert names.index("curling-take-over") < names.index("query-status") \
        < names.index("migrate")
    assert ("migrate", {"uri": STANDBY_URI}) in qemu.commands
    if standby_won:
        assert names[-1] == "quit"
        assert witness.read(KEY) == "4:C"
    else:
        assert names[-1] == "curling-continue"
        assert witness.read(KEY) == "4:B"


def test_reprotect_waits_for_the_vm_to_run() -> None:
    witness = FlakyWitness({KEY: "1:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        qemu.runs_after_take_over = False
        await arm_and_lose(agent, qemu)
        await until(lambda: qemu.names().count("query-status") >= 3)
        assert "migrate" not in qemu.names()
        qemu.running = True
        await until(lambda: "migrate" in qemu.names())
        qemu.go_away()

    run(receiver_config(standby=STANDBY_URI), witness, scenario,
        "receiver", "protecting")
    assert witness.read(KEY) == "3:B"


# -- set-up ----------------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    (dict(role="receiver"), "needs the id of its sender"),
    (dict(role="observer"), "sender or receiver"),
    (dict(role="sender", protect="curling:tcp:h:1", peer="A"), "same id"),
    (dict(role="receiver", peer="B", protect="curling:tcp:h:1"),
     "only a sender agent protects"),
    (dict(role="sender", standby="curling:tcp:h:1"),
     "only a receiver agent re-protects"),
    (dict(role="sender", retry=0), "must be positive"),
    (dict(role="sender", me="a b"), "agent id 'a b'"),
    (dict(role="sender", vm="x/y"), "VM name 'x/y'"),
])
def test_config_is_checked(kw: dict[str, Any], message: str) -> None:
    args: dict[str, Any] = dict(vm="demo", me="A")
    args.update(kw)
    with pytest.raises(AgentError, match=message):
        AgentConfig(**args)


def test_qemu_refusing_the_take_over_is_fatal() -> None:
    witness = FlakyWitness({KEY: "1:A"})

    async def scenario(agent: Agent, qemu: FakeQemu) -> None:
        await until(lambda: agent.expected is not None)
        qemu.role = "sender"   # wrong side: QEMU will refuse
        qemu.emit("CURLING_PEER_LOST", role="receiver", reason="x",
                  sequence=1)

    with pytest.raises(AgentError, match="QEMU refused curling-take-over"):
        run(receiver_config(), witness, scenario, "receiver", "protecting")
