# SPDX-License-Identifier: GPL-2.0-or-later
"""Never two copies: faults x moments x modes, generated from a seed.

Each cell protects a fresh pair whose guest serves a TCP stream on the
lab's network and checks a disk of its own (virtio-blk, each side its
image), through a link of its own (a proxy process), in the automatic
mode or in the managed mode (an agent per side, one etcd witness for the
whole run).  It injects one fault at one moment, heals
what can heal, then samples both sides for SAMPLE_S seconds.  After each
cell, what a user would check:

* at most one copy of the guest is seen by the world at any sample (two
  only in the cells where the automatic mode runs two by design: a
  partition).  A sender that protects holds its guest's output until a
  checkpoint commits, which cannot happen once the receiver took over,
  and one waiting for a decision (``peer-lost``) holds all of it: its
  guest runs, but nobody sees it, and it quits if it lost;
* the copy that runs on goes on from a committed state: its ticks are
  consecutive, its memory and disk self-checks are clean, and the
  client's stream has no bad or repeated line;
* a copy the fault must leave alone is the one that runs: the receiver
  never starts a guest that its sender ended (cancel, quit, the guest's
  power-off), that its sender still runs after an error (out of memory,
  settings, the receiver's own write error), or when it was killed;
* the fault happened (the guest powered off, memory ran out, the
  receiver's image failed);
* no QEMU crashed (killed by a signal the test did not send, or an
  assertion in its log).

The CI run covers every fault and every moment at least once, in an
order and with timings drawn from ``CURLING_SEED``.  A soak runs
``CURLING_MATRIX_CELLS`` random cells instead, and
``CURLING_MATRIX_ONLY`` the cells it lists (``fault@moment/mode``, comma
separated: a cell of a table replayed).  The table of outcomes goes to
the log and to ``matrix.txt`` in the test's log directory.

Moments the link makes exact: it holds the receiver's READY (the sender
waits for it, the receiver has loaded the first round), holds a COMMIT
(the receiver committed a checkpoint the sender does not know of), or
reports that the last byte of a checkpoint went to the receiver, which
applies it then.  The live and the stop phase of a checkpoint are not
targeted one by one: with checkpoints back to back a fault falls in
either, at random; the stop phase lasts under a millisecond, and a QMP
command (cancel, quit, settings) waits for the BQL it holds.

Faults covered elsewhere, with set-ups of their own: a failed stop
(test_curling_control), the witness down during a partition
(test_curling_arbitration).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import random
import resource
import signal
import threading
import time
from typing import Callable, Optional

from curling_test import MANAGED_TIMEOUT_MS as TIMEOUT_MS
from curling_test import (VM, AgentProc, CurlingTest, Link, NetClient,
                          curling_info, free_tcp_port, wait_until)

#: Seconds from QEMU start to a ticking guest.
BOOT_DEADLINE = 120.0
#: Seconds both sides are sampled after the fault (and its healing).
SAMPLE_S = 10.0
#: Items a client must receive to count the service as flowing.
FLOWING = 20

FAULTS = ("kill-sender", "kill-receiver", "kill-agent", "stop-sender",
          "stop-receiver", "freeze-link", "cut-link", "cancel", "quit",
          "power-off", "oom", "disk-error", "settings", "witness-down")
#: first-round: the first round is under way; ready: the sender waits for
#: READY (the link holds it); between: a quiet time between two
#: checkpoints (curling-interval 3000 ms); checkpointing: checkpoints back
#: to back (curling-interval 0), the fault falling while one is saved,
#: sent, applied or acknowledged; ack: the sender waits for the COMMIT of
#: a checkpoint the receiver committed (the link holds it); applying: the
#: last byte of a checkpoint just reached the receiver; partitioned: the
#: link froze between two checkpoints, up to twice curling-timeout ago
#: (it heals after the fault).
MOMENTS = ("first-round", "ready", "between", "checkpointing", "ack",
           "applying", "partitioned")
#: curling-interval (and output delay) for each moment.
MOMENT_PARAMS = {"first-round": {"curling_interval": 100},
                 "ready": {"curling_interval": 100},
                 "between": {"curling_interval": 3000,
                             "curling_output_delay": 3000},
                 "checkpointing": {"curling_interval": 0},
                 "ack": {"curling_interval": 100},
                 "applying": {"curling_interval": 500},
                 "partitioned": {"curling_interval": 3000,
                                 "curling_output_delay": 3000}}
MODES = ("automatic", "managed")
#: Faults that need agents and a witness.
MANAGED_ONLY = ("kill-agent", "witness-down")
#: The automatic mode runs two copies when the sender lives on but the
#: receiver loses it: a partition (frozen or cut link, or any fault at the
#: partitioned moment) or a sender stopped past curling-timeout.  Expected
#: outcomes, not failures.
TWO_BY_DESIGN = ("stop-sender", "freeze-link", "cut-link")
#: Faults after which the receiver must not run the guest: its sender
#: ended protection, or runs on after an error, or the receiver is dead.
#: (During a partition the receiver cannot know: it may take over.)
NOT_RECEIVER = ("kill-receiver", "cancel", "quit", "power-off", "oom",
                "disk-error", "settings")
#: Faults that act through checkpoints (they show at the next one), which
#: stop during a partition: not drawn at that moment.
NEED_CHECKPOINTS = ("oom", "disk-error")
#: Faults after which the sender's guest is gone for good.
NOBODY = ("quit", "power-off")
#: The out-of-memory fault: the sender's address space is limited to what
#: it uses plus OOM_MARGIN, and checkpoints are made OOM_INTERVAL_MS
#: apart, so that the next one needs a buffer larger than any before.
#: The margin leaves room for the threads QEMU starts meanwhile (a stack
#: each): QEMU aborts when it cannot start a thread.
OOM_MARGIN = 48 * 1024 ** 2
OOM_INTERVAL_MS = 12000
#: ...of a guest that dirties 8 MiB/s of a 96 MiB working set.
OOM_APPEND = "curling.rate=8 curling.mb=96"
#: The guest's disk, and the one place where the receiver's image fails:
#: blkdebug fails data writes at 32 MiB (sector 65536), which the guest's
#: self-check never touches and the first round writes only as zeroes.
DISK = (("disk0", "virtio-blk-pci,drive={drive}"),)
DISK_APPEND = "curling.diskcheck=vda"
BAD_OFFSET = "32M"
SYSRQ_POWEROFF = [{"type": "qcode", "data": key}
                  for key in ("alt", "sysrq", "o")]


#: The fault table's words for each fault (docs/curling.txt).
FAULT_NAMES = {
    "kill-sender": "kill -9 of the sender",
    "kill-receiver": "kill -9 of the receiver",
    "kill-agent": "kill -9 of an agent",
    "stop-sender": "SIGSTOP of the sender, 2-3 s",
    "stop-receiver": "SIGSTOP of the receiver, 2-3 s",
    "freeze-link": "link frozen, 2-3 s",
    "cut-link": "link cut",
    "cancel": "``migrate_cancel``",
    "quit": "``quit`` on the sender",
    "power-off": "the guest powers off",
    "oom": "the sender out of memory",
    "disk-error": "receiver's image fails a write",
    "settings": "a setting typed on one side",
    "witness-down": "witness down, 2-3 s",
}


@dataclasses.dataclass
class Cell:
    fault: str
    moment: str
    mode: str

    def __str__(self) -> str:
        return f"{self.fault}@{self.moment}/{self.mode}"


@dataclasses.dataclass
class Side:
    vm: VM
    agent: Optional[AgentProc] = None
    stopped: bool = False           # SIGSTOP sent, no SIGCONT yet
    killed: bool = False            # the test killed it


@dataclasses.dataclass
class Result:
    cell: Cell
    outcome: str                    # what ran on, for the table
    copies: int                     # most copies seen running at once
    ok: bool
    why: str = ""


def applicable(fault: str, moment: str, mode: str) -> bool:
    if fault in MANAGED_ONLY and mode != "managed":
        return False
    return not (fault in NEED_CHECKPOINTS and moment == "partitioned")


def ci_sample(rng: random.Random) -> list[Cell]:
    """Every fault once and every moment at least twice, each cell in a
    mode the fault has."""
    moments = [MOMENTS[i % len(MOMENTS)] for i in range(len(FAULTS))]
    while True:
        rng.shuffle(moments)
        if all(applicable(f, m, "managed") for f, m in zip(FAULTS, moments)):
            break
    cells: list[Cell] = []
    for i, fault in enumerate(FAULTS):
        mode = "managed" if fault in MANAGED_ONLY else rng.choice(MODES)
        cells.append(Cell(fault, moments[i], mode))
    rng.shuffle(cells)
    return cells


def parse_cell(text: str) -> Cell:
    """A cell as the table names it: ``fault@moment/mode``."""
    fault, _, rest = text.strip().partition("@")
    moment, _, mode = rest.partition("/")
    if fault not in FAULTS or moment not in MOMENTS or mode not in MODES:
        raise ValueError(f"not a cell: {text!r} (fault@moment/mode)")
    return Cell(fault, moment, mode)


def random_cells(rng: random.Random, count: int) -> list[Cell]:
    cells: list[Cell] = []
    while len(cells) < count:
        cell = Cell(rng.choice(FAULTS), rng.choice(MOMENTS),
                    rng.choice(MODES))
        if applicable(cell.fault, cell.moment, cell.mode):
            cells.append(cell)
    return cells


class CurlingMatrix(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,matrix
    """

    #: The effect of the fault the sampling waits for (see until()).
    pending: Optional[tuple[Callable[[], bool], float, str]] = None
    #: Why the fault of the cell under way did not happen, if it did not.
    fault_missed = ""

    # -- one cell -----------------------------------------------------------

    @staticmethod
    def guest_state(side: Side) -> tuple[bool, bool]:
        """Whether ``side``'s QEMU runs its guest now, and whether the
        world sees that guest: not a sender that holds its output until a
        checkpoint commits (protecting: no commit can come once the
        receiver took over) or until a decision (peer-lost)."""
        if side.stopped or not side.vm.is_running():
            return False, False
        try:
            if side.vm.qmp("query-status")["status"] != "running":
                return False, False
            info = curling_info(side.vm)
        except Exception:           # it went away meanwhile
            return False, False
        held = (info["role"] == "sender" and
                info["status"] in ("protecting", "peer-lost"))
        return True, not held

    def runs_guest(self, side: Side) -> bool:
        return self.guest_state(side)[0]

    @staticmethod
    def side_status(side: Side) -> str:
        if not side.vm.is_running():
            return "gone"
        if side.stopped:
            return "stopped"
        try:
            return curling_info(side.vm)["status"]
        except Exception:
            return "gone"

    def wait_moment(self, cell: Cell, sender: VM, link: Link,
                    rng: random.Random) -> str:
        """Return at ``cell.moment``; says what the sender was doing."""
        if cell.moment == "first-round":
            wait_until(lambda: curling_info(sender)["status"] in
                       ("initial-sync", "protecting"), 60,
                       "the first round to start", 0.02)
            time.sleep(rng.uniform(0, 0.15))
        elif cell.moment == "ready":
            # The link was told to hold READY before the sender connected
            event = link.wait_event("held ready", 120)
            time.sleep(rng.uniform(0, 0.5))
            return f"the link {event}"
        else:
            wait_until(lambda: curling_info(sender)["checkpoints"] >= 2, 120,
                       "two committed checkpoints", 0.05)
            if cell.moment == "between":
                seq = curling_info(sender)["sequence"]
                wait_until(lambda: curling_info(sender)["sequence"] > seq,
                           30, "a fresh commit", 0.02)
                time.sleep(rng.uniform(0.1, 2.0))
            elif cell.moment == "partitioned":
                # Between two checkpoints, as "between" does
                time.sleep(rng.uniform(0.1, 1.0))
                link.partition()
                wait = rng.uniform(0, 2) * TIMEOUT_MS / 1000
                time.sleep(wait)
                return (f"the link frozen {wait * 1000:.0f} ms ago, sender "
                        f"{self.side_status(Side(sender))}")
            elif cell.moment == "ack":
                link.command("hold commit")
                event = link.wait_event("held commit", 30)
                # Less than the sender waits for it (curling-timeout)
                time.sleep(rng.uniform(0, 0.3) * TIMEOUT_MS / 1000)
                return f"the link {event}"
            elif cell.moment == "applying":
                link.command("notify checkpoint")
                return "the link " + link.wait_event("forwarded checkpoint",
                                                     30)
            else:
                time.sleep(rng.uniform(0, 1.0))
        info = curling_info(sender)
        return (f"sender {info['status']}, checkpoint {info['sequence']}, "
                f"{info.get('since-commit', '-')} ms after its commit")

    def inject(self, cell: Cell, sender: Side, receiver: Side, link: Link,
               rng: random.Random) -> Optional[Callable[[], None]]:
        """Inject ``cell.fault``; returns how to heal it, if it heals."""
        fault = cell.fault
        hold = rng.uniform(2, 3) * TIMEOUT_MS / 1000

        def cont(side: Side) -> Callable[[], None]:
            def heal() -> None:
                time.sleep(hold)
                os.kill(side.vm.pid, signal.SIGCONT)
                side.stopped = False
            return heal

        if fault in ("kill-sender", "kill-receiver"):
            side = sender if fault == "kill-sender" else receiver
            side.killed = True
            side.vm.kill(signal.SIGKILL)
        elif fault == "kill-agent":
            side = rng.choice((sender, receiver))
            assert side.agent is not None
            self.log.info("killing the agent of %s", side.vm.name)
            side.agent.proc.kill()
        elif fault in ("stop-sender", "stop-receiver"):
            side = sender if fault == "stop-sender" else receiver
            os.kill(side.vm.pid, signal.SIGSTOP)
            side.stopped = True
            return cont(side)
        elif fault == "freeze-link":
            link.partition()

            def heal_link() -> None:
                time.sleep(hold)
                link.heal()
            return heal_link
        elif fault == "cut-link":
            link.proc.kill()
        elif fault == "cancel":
            sender.vm.qmp("migrate_cancel")
        elif fault == "quit":
            try:
                sender.vm.qmp("quit")
            except Exception:       # it quits before it answers
                pass
        elif fault == "power-off":
            # SysRq o: the guest's kernel powers off, QEMU exits.
            sender.killed = True
            sender.vm.qmp("send-key", keys=SYSRQ_POWEROFF)
            self.until(
                lambda: not sender.vm.is_running() or
                sender.vm.qmp("query-status")["status"] == "shutdown",
                60, "the guest to power off")
        elif fault == "oom":
            with open(f"/proc/{sender.vm.pid}/status") as f:
                vm_size = next(int(line.split()[1]) * 1024 for line in f
                               if line.startswith("VmSize:"))
            limit = vm_size + OOM_MARGIN
            resource.prlimit(sender.vm.pid, resource.RLIMIT_AS,
                             (limit, limit))
            sender.vm.qmp("migrate-set-parameters",
                          curling_interval=OOM_INTERVAL_MS,
                          curling_output_delay=OOM_INTERVAL_MS)
            self.until(
                lambda: "cannot allocate" in
                sender.vm.qmp("query-migrate").get("error-desc", ""),
                3 * OOM_INTERVAL_MS / 1000 + 30,
                "the sender to run out of memory for a checkpoint")
        elif fault == "disk-error":
            sender.vm.qmp("human-monitor-command",
                          command_line=f'qemu-io disk0 "write -P 0x11 '
                                       f'{BAD_OFFSET} 4k"')
            self.until(
                lambda: "Input/output error" in self.qemu_log(receiver.vm),
                60, "the receiver's image to fail a write")
        elif fault == "settings" and rng.random() < 0.5:
            # Typed on the sender alone: longer than the receiver's own
            # curling-timeout between two checkpoints
            self.log.info("settings on the sender only")
            sender.vm.qmp("migrate-set-parameters", curling_timeout=5000,
                          curling_interval=2000)
        elif fault == "settings":
            # Typed on the receiver alone: shorter than its sender paces
            # its heartbeats for
            try:
                receiver.vm.qmp("migrate-set-parameters",
                                curling_timeout=200)
                self.log.info("receiver took curling-timeout 200 (no "
                              "settings from its sender in force)")
            except Exception as exc:
                self.log.info("receiver refused: %s", exc)
        elif fault == "witness-down":
            self.etcd.stop()

            def heal_witness() -> None:
                time.sleep(hold)
                self.on_main_thread(self.etcd.start)
            return heal_witness
        else:
            raise ValueError(fault)
        return None

    @staticmethod
    def then_heal_link(heal: Optional[Callable[[], None]], link: Link,
                       rng: random.Random) -> Callable[[], None]:
        """``heal``, or a while as long as a partition lasts, then the
        link's partition heals."""
        hold = rng.uniform(2, 3) * TIMEOUT_MS / 1000

        def heal_all() -> None:
            if heal is not None:
                heal()
            else:
                time.sleep(hold)
            link.heal()
        return heal_all

    def until(self, done: Callable[[], bool], timeout: float,
              what: str) -> None:
        """The fault takes effect once ``done()``: the sampling polls it
        (the monitors are the sampling thread's) and goes on SAMPLE_S
        after it, or counts the fault missed after ``timeout``."""
        self.pending = (done, time.monotonic() + timeout, what)

    def on_main_thread(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the test's thread, from a healing thread,
        and wait for it.  A process started by a thread gets its parent
        death signal (``die_with_parent``) when that thread ends: an etcd
        started by the healing thread died with it, right after it came
        back, and left the agents without a witness."""
        done = threading.Event()
        errors: list[BaseException] = []

        def call() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        self.main_calls.put(call)
        done.wait()
        if errors:
            raise errors[0]

    def run_main_calls(self) -> None:
        """What healing threads asked the test's thread to do."""
        while True:
            try:
                call = self.main_calls.get_nowait()
            except queue.Empty:
                return
            call()

    def poll_pending(self) -> None:
        if self.pending is None:
            return
        done, until, what = self.pending
        try:
            happened = done()
        except Exception:           # the QEMU went away meanwhile
            happened = False
        if happened:
            self.pending = None
        elif time.monotonic() > until:
            self.fault_missed = f"no sign of {what}"
            self.pending = None

    def crashed(self, side: Side) -> Optional[str]:
        vm = side.vm
        log = self.qemu_log(vm)
        for needle in ("Assertion", "Aborted", "core dumped",
                       "Segmentation fault"):
            if needle in log:
                return f"{vm.name}: {needle} in its log"
        if not vm.is_running() and vm._proc is not None:
            code = vm._proc.returncode
            if code is not None and code < 0 and not (
                    side.killed and code == -signal.SIGKILL):
                return f"{vm.name} died of signal {-code}"
        return None

    def run_cell(self, n: int, cell: Cell, rng: random.Random,
                 witness: Optional[str]) -> Result:
        managed = cell.mode == "managed"
        port = free_tcp_port()
        append = DISK_APPEND
        if cell.fault == "oom":
            append += " " + OOM_APPEND
        theirs = self.disk_args(f"r{n}", DISK)
        if cell.fault == "disk-error":
            target = self.disk_image(f"r{n}-bad")
            theirs = self.failing_drive_args(target)
        sender = Side(self.launch_side(
            f"s{n}", True, 0, agent=managed, append=append,
            extra_args=self.disk_args(f"s{n}", DISK)))
        receiver = Side(self.launch_side(
            f"r{n}", True, 1, incoming=f"curling:tcp:127.0.0.1:{port}",
            agent=managed, append=append, extra_args=theirs))
        link = self.start_link(port, netns=True)
        client = NetClient(self.netlab(), "stream",
                           self.logdir_path / f"client-{n}.json", 1)
        try:
            return self._run_cell(n, cell, rng, witness, sender, receiver,
                                  link, client)
        finally:
            client.stop()
            for side in (sender, receiver):
                if side.stopped:
                    os.kill(side.vm.pid, signal.SIGCONT)
                if side.agent is not None:
                    side.agent.proc.kill()
                    side.agent.proc.wait()
                side.vm.kill()
            link.heal()
            link.proc.kill()
            link.proc.wait()
            for side in (sender, receiver):
                assert self._tmpdir is not None
                for image in self._tmpdir.glob(f"{side.vm.name}-*.img"):
                    image.unlink()
            if self.etcd is not None and not self.etcd.running():
                self.etcd.start()

    def _run_cell(self, n: int, cell: Cell, rng: random.Random,
                  witness: Optional[str], sender: Side, receiver: Side,
                  link: Link, client: NetClient) -> Result:
        sender.vm.qmp("migrate-set-parameters", **MOMENT_PARAMS[cell.moment])
        if cell.moment == "ready":
            link.command("hold ready")
        if witness is not None:
            receiver.agent = self.start_agent(
                receiver.vm.name, "receiver", f"B{n}", witness,
                vm=f"guest-{n}", peer=f"A{n}")
            wait_until(lambda: receiver.vm.qmp("query-migrate-parameters")
                       .get("curling-managed"), 30,
                       "the receiver's agent to set the managed mode")
        sender.vm.wait_tick(2, timeout=BOOT_DEADLINE)
        self.wait_client(client, FLOWING)
        if witness is not None:
            sender.agent = self.start_agent(
                sender.vm.name, "sender", f"A{n}", witness,
                vm=f"guest-{n}", protect=link.uri)
        else:
            sender.vm.qmp("migrate", uri=link.uri)
        if witness is not None and cell.moment not in ("first-round",
                                                       "ready"):
            wait_until(lambda: receiver.agent is not None and any(
                "decision=armed" in line
                for line in receiver.agent.decisions()), 60,
                "the receiver's agent to learn the term", 0.1)
        at = self.wait_moment(cell, sender.vm, link, rng)
        mark = {id(s): s.vm.console_mark() for s in (sender, receiver)}
        items = client.status().get("items", 0)
        self.fault_missed = ""
        self.pending = None
        heal = self.inject(cell, sender, receiver, link, rng)
        if cell.moment in ("ready", "ack"):
            link.command("release")     # after the heal, for a partition
        if cell.moment == "partitioned":
            heal = self.then_heal_link(heal, link, rng)
        self.log.info("cell %d %s: injected at: %s", n, cell, at)

        # Sample while the fault lasts, and SAMPLE_S once it healed
        healed: list[str] = []

        def run_heal() -> None:
            try:
                if heal is not None:
                    heal()
            except Exception as exc:    # reported as the cell's failure
                self.log.error("cell %d: healing failed: %s", n, exc)
                healed.append(f"{type(exc).__name__}: {exc}")

        healer = threading.Thread(target=run_heal)
        healer.start()
        copies = 0
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            self.run_main_calls()
            self.poll_pending()
            if (deadline is None and not healer.is_alive() and
                    self.pending is None):
                deadline = time.monotonic() + SAMPLE_S
            seen = [self.guest_state(side)[1]
                    for side in (sender, receiver)]
            if sum(seen) > copies:
                copies = sum(seen)
                self.log.info("cell %d: %d cop%s seen (sender %s, receiver "
                              "%s)", n, copies, "y" if copies == 1 else "ies",
                              self.side_status(sender),
                              self.side_status(receiver))
            time.sleep(0.2)
        healer.join()

        runners = [s for s in (sender, receiver) if self.runs_guest(s)]
        for _ in range(5):
            # A guest caught paused by a checkpoint still runs
            if runners or not any(self.side_status(s) in (
                    "initial-sync", "protecting") for s in (sender, receiver)):
                break
            time.sleep(0.5)
            runners = [s for s in (sender, receiver) if self.runs_guest(s)]
        if len(runners) == 2:
            # One of them may hold all its output (peer-lost: its agent
            # is gone, or waits for the witness): nobody sees it
            visible = [s for s in runners if self.guest_state(s)[1]]
            if len(visible) == 1:
                runners = visible
        if len(runners) == 1:
            outcome = ("sender" if runners[0] is sender
                       else "receiver") + " runs"
            if runners[0] is receiver and self.runs_guest(sender):
                outcome += " (the sender's copy holds its output)"
        else:
            outcome = "two copies run" if runners else "none runs"
        states = (f"sender {self.side_status(sender)}, receiver "
                  f"{self.side_status(receiver)}")
        result = Result(cell, f"{outcome} ({states})", copies, True)

        for side in (sender, receiver):
            crash = self.crashed(side)
            if crash:
                return dataclasses.replace(result, ok=False, why=crash)
        if self.fault_missed:
            return dataclasses.replace(
                result, ok=False,
                why=f"the fault did not happen: {self.fault_missed}")
        if healed:
            return dataclasses.replace(
                result, ok=False, why=f"the fault did not heal: {healed[0]}")
        partitioned = cell.moment == "partitioned"
        two_ok = cell.mode == "automatic" and (
            cell.fault in TWO_BY_DESIGN or partitioned)
        if copies > (2 if two_ok else 1):
            return dataclasses.replace(
                result, ok=False, why=f"{copies} copies ran at once")
        if (receiver in runners and cell.fault in NOT_RECEIVER and
                not partitioned):
            return dataclasses.replace(
                result, ok=False, why=f"the receiver runs after {cell.fault}")
        if runners and cell.fault in NOBODY and not partitioned:
            return dataclasses.replace(
                result, ok=False,
                why=f"a guest runs after {cell.fault} ended it")
        if len(runners) == 1:
            runner = runners[0]
            since = mark[id(runner)]
            try:
                ticks = runner.vm.ticks(since=since)
                self.assertTrue(ticks, f"{runner.vm.name} does not tick")
                self.assert_consecutive(runner.vm, ticks)
                self.assert_ticks_ok(runner.vm)
                self.assert_diskchecks_ok(runner.vm, since=since)
                if not two_ok:
                    # (after two copies the client's connection may have
                    # been the other copy's)
                    self.wait_client(client, 5, timeout=30)
            except AssertionError as exc:
                return dataclasses.replace(result, ok=False, why=str(exc))
            st = client.status()
            if st.get("errors") and not two_ok:
                return dataclasses.replace(
                    result, ok=False,
                    why=f"client: {st['errors'][:3]}")
            self.log.info("cell %d: %s ticks on (%d..%d); client %d -> %d "
                          "lines", n, runner.vm.name, ticks[0].n,
                          ticks[-1].n, items, st.get("items", 0))
        return result

    # -- the matrix ---------------------------------------------------------

    def test_matrix(self) -> None:
        """Every fault at every moment in both modes (a seeded sample in
        CI, ``CURLING_MATRIX_CELLS`` random cells in a soak): at most one
        copy runs unless the automatic mode runs two by design, the copy
        that runs on is a committed state, and no QEMU crashed."""
        seed, rng = self.seeded_rng()
        count = int(os.environ.get("CURLING_MATRIX_CELLS", "0"))
        only = os.environ.get("CURLING_MATRIX_ONLY", "")
        if only:
            cells = [parse_cell(text) for text in only.split(",")]
        elif count:
            cells = random_cells(rng, count)
        else:
            cells = ci_sample(rng)
        if not count and not only:
            self.assertEqual({c.fault for c in cells}, set(FAULTS))
            self.assertEqual({c.moment for c in cells}, set(MOMENTS))
        self.etcd = None
        self.main_calls: queue.Queue[Callable[[], None]] = queue.Queue()
        self.fault_missed = ""
        witness = None
        if any(c.mode == "managed" for c in cells):
            witness = self.witness("etcd")
        results = []
        for n, cell in enumerate(cells, 1):
            t0 = time.monotonic()
            result = self.run_cell(n, cell, rng,
                                   witness if cell.mode == "managed"
                                   else None)
            results.append(result)
            self.log.info("cell %d/%d %s: %s, %d cop%s at most%s (%.0f s)",
                          n, len(cells), cell, result.outcome, result.copies,
                          "y" if result.copies == 1 else "ies",
                          "" if result.ok else f"; FAILED: {result.why}",
                          time.monotonic() - t0)
        table = self.table(seed, results)
        (self.logdir_path / "matrix.txt").write_text(table)
        (self.logdir_path / "matrix.rst").write_text(summary(seed, results))
        self.log.info("fault matrix (seed %d):\n%s", seed, table)
        failed = [r for r in results if not r.ok]
        self.assertEqual(failed, [], f"{len(failed)} of {len(results)} "
                         f"cells failed (seed {seed})")

    @staticmethod
    def table(seed: int, results: list[Result]) -> str:
        width = max(len(str(r.cell)) for r in results)
        lines = [f"seed {seed}, {len(results)} cells"]
        for r in results:
            verdict = "ok" if r.ok else f"FAILED: {r.why}"
            if r.ok and r.copies == 2:
                verdict = "ok (two copies: the automatic mode's partition)"
            lines.append(f"{str(r.cell):<{width}}  {r.outcome}: {verdict}")
        return "\n".join(lines) + "\n"


def summary(seed: int, results: list[Result]) -> str:
    """The outcomes by fault and mode, as docs/curling.txt's table: how
    many cells ended with the sender running, the receiver, none or two
    (bold: the automatic mode's partition), and any failed cell."""
    def outcome(r: Result) -> str:
        if not r.ok:
            return "FAILED"
        first = r.outcome.split()[0]
        return {"two": "**two**"}.get(first, first)

    rows: list[tuple[str, ...]] = [("Fault", "Automatic mode",
                                    "Managed mode")]
    for fault in FAULTS:
        cols = []
        for mode in MODES:
            if fault in MANAGED_ONLY and mode == "automatic":
                cols.append("(managed mode only)")
                continue
            counts: dict[str, int] = {}
            for r in results:
                if r.cell.fault == fault and r.cell.mode == mode:
                    counts[outcome(r)] = counts.get(outcome(r), 0) + 1
            cols.append(", ".join(f"{k} {v}" for k, v in sorted(
                counts.items(), key=lambda kv: -kv[1])) or "(not drawn)")
        rows.append((FAULT_NAMES[fault], *cols))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    rule = "  ".join("=" * w for w in widths)
    lines = [rule, "  ".join(c.ljust(w) for c, w in zip(rows[0], widths)),
             rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
              for row in rows[1:]]
    lines.append(rule)
    moments = ", ".join(f"{m} {sum(r.cell.moment == m for r in results)}"
                        for m in MOMENTS)
    return (f"{len(results)} cells, seed {seed}; moments: {moments}\n\n" +
            "\n".join(lines) + "\n")
