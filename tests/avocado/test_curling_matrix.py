# SPDX-License-Identifier: GPL-2.0-or-later
"""Never two copies: faults x moments x modes, generated from a seed.

Each cell protects a fresh pair whose guest serves a TCP stream on the
lab's network, through a link of its own (a proxy process), in the
automatic mode or in the managed mode (an agent per side, one etcd
witness for the whole run).  It injects one fault at one moment, heals
what can heal, then samples both sides for SAMPLE_S seconds.  After each
cell, what a user would check:

* at most one copy of the guest is seen by the world at any sample (two
  only in the cells where the automatic mode runs two by design: a
  partition).  A sender that protects holds its guest's output until a
  checkpoint commits, which cannot happen once the receiver took over,
  and one waiting for a decision (``peer-lost``) holds all of it: its
  guest runs, but nobody sees it, and it quits if it lost;
* the copy that runs on goes on from a committed state: its ticks are
  consecutive, its memory self-check is clean, and the client's stream
  has no bad or repeated line;
* no QEMU crashed (killed by a signal the test did not send, or an
  assertion in its log).

The CI run covers every fault and every moment at least once, in an
order and with timings drawn from ``CURLING_SEED``.  A soak runs
``CURLING_MATRIX_CELLS`` random cells instead.  The table of outcomes
goes to the log and to ``matrix.txt`` in the test's log directory.

Faults covered elsewhere, with set-ups of their own: the sender out of
memory and a failed stop (test_curling_control), a write error on the
receiver's image (test_curling_disk), a guest that powers off
(test_curling_control), the witness down during a partition
(test_curling_arbitration).
"""

from __future__ import annotations

import dataclasses
import os
import random
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
          "settings", "witness-down")
#: first-round: the first round is under way; between: a quiet time
#: between two checkpoints (curling-interval 3000 ms); checkpointing:
#: checkpoints back to back (curling-interval 0), so that the fault
#: falls while one is saved, sent, applied or acknowledged.
MOMENTS = ("first-round", "between", "checkpointing")
MODES = ("automatic", "managed")
#: Faults that need agents and a witness.
MANAGED_ONLY = ("kill-agent", "witness-down")
#: The automatic mode runs two copies when the sender lives on but the
#: receiver loses it: a partition (frozen or cut link) or a sender
#: stopped past curling-timeout.  Expected outcomes, not failures.
TWO_BY_DESIGN = ("stop-sender", "freeze-link", "cut-link")


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


def ci_sample(rng: random.Random) -> list[Cell]:
    """Every fault once and every moment at least three times, each cell
    in a mode the fault has."""
    moments = list(MOMENTS) * (len(FAULTS) // len(MOMENTS) + 1)
    rng.shuffle(moments)
    cells: list[Cell] = []
    for i, fault in enumerate(FAULTS):
        mode = "managed" if fault in MANAGED_ONLY else rng.choice(MODES)
        cells.append(Cell(fault, moments[i], mode))
    rng.shuffle(cells)
    return cells


def random_cells(rng: random.Random, count: int) -> list[Cell]:
    cells: list[Cell] = []
    while len(cells) < count:
        cell = Cell(rng.choice(FAULTS), rng.choice(MOMENTS),
                    rng.choice(MODES))
        if cell.fault in MANAGED_ONLY and cell.mode != "managed":
            continue
        cells.append(cell)
    return cells


class CurlingMatrix(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,matrix
    """

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

    def wait_moment(self, cell: Cell, sender: VM, rng: random.Random) -> str:
        """Return at ``cell.moment``; says what the sender was doing."""
        if cell.moment == "first-round":
            wait_until(lambda: curling_info(sender)["status"] in
                       ("initial-sync", "protecting"), 60,
                       "the first round to start", 0.02)
            time.sleep(rng.uniform(0, 0.15))
        else:
            wait_until(lambda: curling_info(sender)["checkpoints"] >= 2, 120,
                       "two committed checkpoints", 0.05)
            if cell.moment == "between":
                seq = curling_info(sender)["sequence"]
                wait_until(lambda: curling_info(sender)["sequence"] > seq,
                           30, "a fresh commit", 0.02)
                time.sleep(rng.uniform(0.1, 2.0))
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
        elif fault == "settings":
            timeout = rng.choice((400, 3000))
            interval = rng.choice((50, 1500))
            sender.vm.qmp("migrate-set-parameters", curling_timeout=timeout,
                          curling_interval=interval)
            try:
                receiver.vm.qmp("migrate-set-parameters",
                                curling_timeout=200)
                self.log.info("receiver took curling-timeout 200 (before "
                              "its sender's settings)")
            except Exception as exc:
                self.log.info("receiver refused: %s", exc)
        elif fault == "witness-down":
            self.etcd.stop()

            def heal_witness() -> None:
                time.sleep(hold)
                self.etcd.start()
            return heal_witness
        else:
            raise ValueError(fault)
        return None

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
        sender = Side(self.launch_side(f"s{n}", True, 0, agent=managed))
        receiver = Side(self.launch_side(
            f"r{n}", True, 1, incoming=f"curling:tcp:127.0.0.1:{port}",
            agent=managed))
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
            if self.etcd is not None and not self.etcd.running():
                self.etcd.start()

    def _run_cell(self, n: int, cell: Cell, rng: random.Random,
                  witness: Optional[str], sender: Side, receiver: Side,
                  link: Link, client: NetClient) -> Result:
        params = {"first-round": {"curling_interval": 100},
                  "between": {"curling_interval": 3000,
                              "curling_output_delay": 3000},
                  "checkpointing": {"curling_interval": 0}}[cell.moment]
        sender.vm.qmp("migrate-set-parameters", **params)
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
        if witness is not None and cell.moment != "first-round":
            wait_until(lambda: receiver.agent is not None and any(
                "decision=armed" in line
                for line in receiver.agent.decisions()), 60,
                "the receiver's agent to learn the term", 0.1)
        at = self.wait_moment(cell, sender.vm, rng)
        mark = {id(s): s.vm.console_mark() for s in (sender, receiver)}
        items = client.status().get("items", 0)
        self.log.info("cell %d %s: injecting at: %s", n, cell, at)
        heal = self.inject(cell, sender, receiver, link, rng)

        # Sample while the fault lasts, and SAMPLE_S once it healed
        healer = threading.Thread(target=heal or (lambda: None))
        healer.start()
        copies = 0
        deadline = None
        while deadline is None or time.monotonic() < deadline:
            if deadline is None and not healer.is_alive():
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
        if len(runners) == 1:
            outcome = ("sender" if runners[0] is sender
                       else "receiver") + " runs"
        else:
            outcome = "two copies run" if runners else "none runs"
        states = (f"sender {self.side_status(sender)}, receiver "
                  f"{self.side_status(receiver)}")
        result = Result(cell, f"{outcome} ({states})", copies, True)

        for side in (sender, receiver):
            crash = self.crashed(side)
            if crash:
                return dataclasses.replace(result, ok=False, why=crash)
        two_ok = cell.mode == "automatic" and cell.fault in TWO_BY_DESIGN
        if copies > (2 if two_ok else 1):
            return dataclasses.replace(
                result, ok=False, why=f"{copies} copies ran at once")
        if len(runners) == 1:
            runner = runners[0]
            try:
                ticks = runner.vm.ticks(since=mark[id(runner)])
                self.assertTrue(ticks, f"{runner.vm.name} does not tick")
                self.assert_consecutive(runner.vm, ticks)
                self.assert_ticks_ok(runner.vm)
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
        cells = random_cells(rng, count) if count else ci_sample(rng)
        if not count:
            self.assertEqual({c.fault for c in cells}, set(FAULTS))
            self.assertEqual({c.moment for c in cells}, set(MOMENTS))
        self.etcd = None
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
