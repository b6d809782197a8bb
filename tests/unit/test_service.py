# SPDX-License-Identifier: GPL-2.0-or-later
"""One host's part of a protected guest (``curling.py up``) without QEMU:
the role it starts in, its QEMU command line, whom it protects to and
when, ``down``, and what ``status`` prints."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any, Optional

import pytest

from curlingtool import description, service
from curlingtool.arbiter import term_key
from curlingtool.service import Report, Service, ServiceError
from curlingtool.witness import MemoryWitness

from test_description import GOOD

DESC = description.parse(GOOD, "web.toml")


def test_start_role() -> None:
    assert service.start_role(DESC, DESC.host("A"), None)[0] == "sender"
    role, why = service.start_role(DESC, DESC.host("B"), None)
    assert role == "receiver" and "A, the first host, runs it" in why
    assert service.start_role(DESC, DESC.host("B"), "4:B")[0] == "sender"
    assert service.start_role(DESC, DESC.host("A"), "4:B")[0] == "receiver"
    with pytest.raises(ServiceError, match="held by Z, which is no host"):
        service.start_role(DESC, DESC.host("A"), "4:Z")


def test_qemu_args() -> None:
    args = service.qemu_args(DESC, DESC.host("B"), "receiver", "/q")
    line = " ".join(args)
    assert args[0] == "/q"
    assert ("-drive if=none,id=disk0,format=raw,file=/srv/web/disk0.img "
            "-device virtio-blk-pci,drive=disk0") in line
    assert ("-netdev bridge,id=net0,br=br0 -device virtio-net-pci,"
            "netdev=net0,mac=52:54:00:12:34:56") in line
    assert "tls-creds-x509,id=curling-tls-server,dir=/etc/curling/pki," \
           "endpoint=server" in line
    assert "-incoming defer" in line
    assert args[-6:] == ["-kernel", "/srv/web/vmlinuz", "-display", "none",
                         "-serial", "file:/run/curling/web/B.log"]
    sender = " ".join(service.qemu_args(DESC, DESC.host("A"), "sender", "/q"))
    assert "-incoming" not in sender and "tls-creds" not in sender
    assert "-netdev tap,id=net0,ifname=tap-web,script=no" in sender


def test_protect_flag_and_fingerprint() -> None:
    w = MemoryWitness()
    service.set_protect(w, DESC, True)
    assert service.read_service(w, "web") == {
        "fingerprint": DESC.fingerprint(), "protect": True}
    other = description.parse(GOOD.replace('memory = "1G"',
                                           'memory = "2G"'), "other.toml")
    with pytest.raises(ServiceError, match="other.toml: this description "
                       "of web .* differs from the one the other hosts run "
                       "it with"):
        service.set_protect(w, other, True)
    service.down(DESC, w)
    assert service.read_service(w, "web")["protect"] is False
    # Once down, a new description may start
    service.set_protect(w, other, True)
    assert service.read_service(w, "web")["fingerprint"] == \
        other.fingerprint()


class FakeMonitor:
    def __init__(self) -> None:
        self.curling: dict[str, Any] = {"role": "sender", "status": "none"}
        self.running = True
        self.commands: list[tuple[str, Optional[dict[str, Any]]]] = []

    async def execute(self, cmd: str,
                      arguments: Optional[dict[str, Any]] = None) -> Any:
        self.commands.append((cmd, arguments))
        if cmd == "query-curling":
            return dict(self.curling)
        if cmd == "query-status":
            return {"status": "running" if self.running else "paused"}
        return {}


class FakeAgent:
    def __init__(self, witness: MemoryWitness, me: str) -> None:
        self.witness, self.me = witness, me
        self.busy = False
        self.protected: list[str] = []

    def protect(self, uri: str) -> None:
        self.protected.append(uri)
        term = self.witness.read(term_key("web"))
        number = int(term.split(":")[0]) if term else 0
        self.witness.compare_and_swap(term_key("web"), term,
                                      f"{number + 1}:{self.me}")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(host: str, w: MemoryWitness) -> tuple[Service, FakeMonitor,
                                               FakeAgent, Clock]:
    clock = Clock()
    s = Service(DESC, host, w, "/q", clock=clock)
    mon, agent = FakeMonitor(), FakeAgent(w, host)
    s.monitor = mon             # type: ignore[assignment]
    s.agent = agent             # type: ignore[assignment]
    return s, mon, agent, clock


def tick(s: Service) -> Optional[int]:
    return asyncio.run(s._tick())


def test_protects_to_the_next_host_in_turn() -> None:
    w = MemoryWitness()
    s, mon, agent, clock = make("A", w)
    assert tick(s) is None
    assert agent.protected == ["curling:tcp:10.0.0.2:4444"]
    # B does not accept: after RETRY, C
    mon.curling["status"] = "error"
    assert tick(s) is None and len(agent.protected) == 1
    clock.now += service.RETRY
    tick(s)
    assert agent.protected[-1] == "curling:tcp:10.0.0.3:4444"
    # Both refuse: the next round waits twice as long
    clock.now += service.RETRY
    tick(s)
    assert agent.protected[-1] == "curling:tcp:10.0.0.2:4444"
    clock.now += service.RETRY
    tick(s)
    assert agent.protected[-1] == "curling:tcp:10.0.0.2:4444"
    clock.now += service.RETRY
    tick(s)
    assert agent.protected[-1] == "curling:tcp:10.0.0.3:4444"
    # C accepts; later the protection is lost: B first again
    mon.curling["status"] = "protecting"
    tick(s)
    mon.curling["status"] = "error"
    clock.now += service.RETRY
    tick(s)
    assert agent.protected[-1] == "curling:tcp:10.0.0.2:4444"
    report = Report.from_json(w.read(service.host_key("web", "A")) or "")
    assert report is not None and report.status == "error"


def test_a_waiting_receiver_goes_first() -> None:
    w = MemoryWitness()
    s, mon, agent, clock = make("A", w)
    tick(s)
    mon.curling["status"] = "error"
    # B and C refused for a while: the back-off grows ...
    for _ in range(4):
        clock.now += 30
        tick(s)
    assert len(agent.protected) == 5
    clock.now += service.RETRY
    tick(s)
    assert len(agent.protected) == 5
    # ... but C says it waits: tried at once, before B
    w.compare_and_swap(service.host_key("web", "C"), None, Report(
        "C", "receiver", "setup", False, 0, None, clock.now).to_json())
    tick(s)
    assert agent.protected[-1] == "curling:tcp:10.0.0.3:4444"
    # an old report is no news
    s2, mon2, agent2, clock2 = make("A", w)
    clock2.now = clock.now + service.FRESH
    tick(s2)
    assert agent2.protected == ["curling:tcp:10.0.0.2:4444"]


def test_a_host_without_the_term_does_not_protect() -> None:
    w = MemoryWitness({term_key("web"): "5:B"})
    s, mon, agent, clock = make("A", w)
    tick(s)
    assert agent.protected == []


def test_a_busy_agent_is_left_alone() -> None:
    w = MemoryWitness()
    s, mon, agent, clock = make("A", w)
    agent.busy = True
    tick(s)
    assert agent.protected == []


def test_down_cancels_on_the_runner_and_ends_a_receiver() -> None:
    w = MemoryWitness()
    s, mon, agent, clock = make("A", w)
    mon.curling["status"] = "protecting"
    service.down(DESC, w)
    assert tick(s) is None
    assert ("migrate_cancel", None) in mon.commands
    mon.commands.clear()
    assert tick(s) is None
    assert ("migrate_cancel", None) not in mon.commands
    r, rmon, ragent, rclock = make("B", w)
    r.role = "receiver"
    rmon.running = False
    rmon.curling = {"role": "receiver", "status": "protecting"}
    # The receiver waits for its sender to end protection...
    assert tick(r) is None
    rmon.curling["status"] = "cancelled"
    assert tick(r) == 0
    # ... but not for ever
    r2, rmon2, _, rclock2 = make("B", w)
    r2.role = "receiver"
    rmon2.running = False
    rmon2.curling = {"role": "receiver", "status": "protecting"}
    assert tick(r2) is None
    rclock2.now += service.DOWN_WAIT
    assert tick(r2) == 0


def test_a_receiver_whose_protection_ended_starts_again() -> None:
    w = MemoryWitness({term_key("web"): "2:A"})
    r, mon, agent, _ = make("B", w)
    r.role = "receiver"
    mon.running = False
    mon.curling = {"role": "receiver", "status": "protecting"}
    assert tick(r) is None
    mon.curling["status"] = "cancelled"
    assert tick(r) == 1
    # One that took over runs the guest: it protects, to C first
    w2 = MemoryWitness({term_key("web"): "3:B"})
    r2, mon2, agent2, _ = make("B", w2)
    mon2.curling = {"role": "receiver", "status": "failed-over"}
    assert tick(r2) is None
    assert agent2.protected == ["curling:tcp:10.0.0.3:4444"]


def test_status_lines() -> None:
    w = MemoryWitness({term_key("web"): "7:A"})
    service.set_protect(w, DESC, True)
    for host, role, status, running in (("A", "sender", "protecting", True),
                                        ("B", "receiver", "protecting",
                                         False)):
        w.compare_and_swap(service.host_key("web", host), None, Report(
            host, role, status, running, 42, 80, 995.0).to_json())
    lines = service.status_lines(DESC, w, now=lambda: 1000.0)
    assert lines[0] == ("guest web: runs on A (term 7:A), protected by B: "
                        "checkpoint 42 committed, 80 ms before the report")
    assert lines[1].split()[:4] == ["A", "sender", "protecting", "checkpoint"]
    assert "reported 5.0 s ago" in lines[1]
    assert lines[3].split() == ["C", "no", "report"]
    service.down(DESC, w)
    assert service.status_lines(DESC, w)[0].endswith("(protection is down)")
    assert json.loads(w.read(service.service_key("web")) or "")["protect"] \
        is False
    assert service.status_lines(DESC, MemoryWitness())[0] == \
        "guest web: never run (no term on the witness)"


def test_refuses_to_start_beside_a_live_qemu(tmp_path: Any) -> None:
    s = Service(DESC, "A", MemoryWitness(), "/q")
    s._check_no_qemu(tmp_path)                  # no pid file
    (tmp_path / "qemu.pid").write_text(f"{os.getpid()}\n")
    s._check_no_qemu(tmp_path)                  # not a QEMU of web
    proc = subprocess.Popen([sys.executable, "-c",
                             "import time; time.sleep(30)", "web,debug-"
                             "threads=on"])
    try:
        # the child's command line is empty until its exec is done
        cmdline = pathlib.Path(f"/proc/{proc.pid}/cmdline")
        deadline = time.monotonic() + 10
        while b"web," not in cmdline.read_bytes():
            assert time.monotonic() < deadline, "the child never ran"
            time.sleep(0.01)
        (tmp_path / "qemu.pid").write_text(f"{proc.pid}\n")
        with pytest.raises(ServiceError, match=f"a QEMU of web still runs "
                           f"on this host \\(pid {proc.pid}\\)"):
            s._check_no_qemu(tmp_path)
    finally:
        proc.kill()
        proc.wait()
