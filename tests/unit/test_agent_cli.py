# SPDX-License-Identifier: GPL-2.0-or-later
"""scripts/agent.py: its arguments and its one-line errors."""

from __future__ import annotations

import asyncio
import logging
from types import ModuleType

import pytest

from conftest import load_script
from qemu.qmp import QMPClient

from curlingtool.agent import QMPMonitor

BASE = ["--qmp", "/run/q.sock", "--vm", "demo", "--id", "B",
        "--witness", "etcd:http://127.0.0.1:2379"]


@pytest.fixture
def agent_script() -> ModuleType:
    return load_script("agent")


def test_receiver_arguments(agent_script: ModuleType) -> None:
    args = agent_script.parse_args(BASE + [
        "--role", "receiver", "--peer", "A", "--standby",
        "curling:tcp:10.0.0.3:4444", "--retry", "0.5", "--log", "/tmp/a.log"])
    assert (args.qmp, args.role, args.vm, args.me, args.peer) == (
        "/run/q.sock", "receiver", "demo", "B", "A")
    assert args.standby == "curling:tcp:10.0.0.3:4444"
    assert args.retry == 0.5 and args.log == "/tmp/a.log"


def test_tls_creds(agent_script: ModuleType) -> None:
    args = agent_script.parse_args(BASE + ["--role", "sender",
                                           "--tls-creds", "tls1"])
    assert args.tls_creds == "tls1"
    assert agent_script.parse_args(BASE + ["--role", "sender"]).tls_creds \
        is None


def test_defaults(agent_script: ModuleType) -> None:
    args = agent_script.parse_args(BASE + ["--role", "sender"])
    assert args.retry == 0.2
    assert args.protect is None and args.peer is None and args.log is None


@pytest.mark.parametrize("extra", [
    ["--role", "receiver"],
    ["--role", "receiver", "--peer", "A", "--protect", "curling:tcp:h:1"],
    ["--role", "sender", "--standby", "curling:tcp:h:1"],
    ["--role", "sender", "--retry", "0"],
    ["--role", "witness"],
])
def test_wrong_arguments(agent_script: ModuleType, extra: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        agent_script.parse_args(BASE + extra)
    assert info.value.code == 2


def test_fatal_error_is_one_line_and_exit_1(
        agent_script: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    argv = ["--qmp", "/run/q.sock", "--vm", "demo", "--id", "A",
            "--role", "sender", "--witness", "zk:host:2181"]
    assert agent_script.main(argv) == 1
    errors = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0]
    assert errors[0].startswith("curling-agent vm=demo error: witness "
                                "'zk:host:2181': use etcd:")


def test_monitor_hands_out_queued_events_then_none() -> None:
    async def main() -> list[object]:
        client = QMPClient("test")   # never connected: as after QEMU quit
        await client.events.put({"event": "CURLING_FAILOVER",   # type: ignore
                                 "data": {"sequence": 3}})
        monitor = QMPMonitor(client)
        return [await monitor.next_event(), await monitor.next_event()]

    assert asyncio.run(main()) == [
        {"event": "CURLING_FAILOVER", "data": {"sequence": 3}}, None]
