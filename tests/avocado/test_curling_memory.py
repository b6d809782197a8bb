# SPDX-License-Identifier: GPL-2.0-or-later
"""Curling protects every RAM block of the guest, not only the first.

A guest's memory is one RAM block only in the simplest layout: every NUMA
node given a memory backend (as libvirt builds each NUMA guest), a DIMM,
a file-backed memory are blocks of their own, at RAM addresses other than
0.  For each layout of the matrix the guest runs one worker per vCPU, each
filling and then rewriting and checking its own buffer from its own CPU,
so that on a NUMA guest every node holds pages the guest keeps changing
(the guest says which node each buffer is in, and the test checks it).
A guest with RAM above 4 GiB is in the matrix too (one RAM block, mapped
in two places), and a guest that switches its std VGA to a graphics mode
and keeps rewriting and checking its framebuffer (the video RAM is a RAM
block of its own): after every failover the framebuffer the resumed guest
reads back must be the one its committed memory expects, and its screen
must still be in that mode.  The sender is killed with SIGKILL in chained rounds;
after every failover the resumed guest must go on from the last
committed checkpoint with a clean self-check on every vCPU, and stay
alive: no kernel oops, no reboot, its ticks going on for ``ALIVE_S``
seconds after the last one.

``CURLING_MEMORY_LAYOUTS=numa2,dimm`` runs only some rows,
``CURLING_MEMORY_ALIVE=S`` watches the last failover longer.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Optional

from curling_test import VM, CurlingTest, numa_args

#: Seconds from QEMU start to a ticking guest (TCG, up to 4 vCPUs).
BOOT_DEADLINE = 180.0

#: What a guest kernel in trouble prints on its console, and a second
#: start of the workload (a reboot).
TROUBLE_RE = re.compile(r"general protection fault|Oops|BUG:|Kernel panic|"
                        r"invalid opcode|segfault|curling: start ")

FBCHECK_RE = re.compile(r"curling: fbcheck writes=(\d+) checks=(\d+) "
                        r"check=(ok|FAIL)(.*)")

#: The graphics mode the framebuffer self-check sets.
FB_MODE = "640x480x32"

WORKER_RE = re.compile(r"curling: worker=(\d+) cpu=(-?\d+) node=(-?\d+) "
                       r"high=(-?\d+)")


@dataclasses.dataclass
class Layout:
    """One row of the matrix: a guest memory layout."""
    name: str
    machine: str
    mem: str
    smp: int
    #: Arguments of both sides.
    args: tuple[str, ...]
    #: NUMA node each worker's buffer must be in (None: not checked).
    nodes: Optional[tuple[int, ...]]
    #: Arguments of one side only, from the side's name and a folder.
    side: Optional[Callable[[str, str], list[str]]] = None
    append: str = ""
    #: Some worker's buffer must reach this guest-physical address (MiB).
    reach_mib: int = 0
    #: The guest runs the framebuffer self-check (curling.fb=1).
    fb: bool = False


def file_backend(name: str, folder: str) -> list[str]:
    """Guest RAM in a file of this side's own, shared (as for vhost-user)."""
    return ["-object", f"memory-backend-file,id=ram0,size=256M,share=on,"
            f"mem-path={folder}/{name}-ram"]


LAYOUTS = [
    Layout("numa2", "q35", "256M", 2, numa_args(2, 128), (0, 1)),
    Layout("numa4", "q35", "256M", 4, numa_args(4, 64), (0, 1, 2, 3)),
    Layout("file", "q35,memory-backend=ram0", "256M", 2, (), None,
           side=file_backend),
    # Node 1 has no memory but the DIMM's: worker 1's buffer is in it.
    Layout("dimm", "q35", "256M,slots=2,maxmem=1G", 2,
           ("-object", "memory-backend-ram,id=m0,size=256M",
            "-numa", "node,nodeid=0,cpus=0,memdev=m0",
            "-numa", "node,nodeid=1,cpus=1",
            "-object", "memory-backend-ram,id=d0,size=128M",
            "-device", "pc-dimm,id=dimm0,memdev=d0,node=1"),
           (0, 1), append="memhp_default_state=online"),
    # 4.5 GiB: pc puts the last 1.5 GiB above 4 GiB, where the kernel
    # takes the workers' pages from first.
    Layout("above4g", "pc", "4608M", 2, (), None, reach_mib=4096),
    Layout("vga", "q35", "256M", 2, ("-device", "VGA"), None,
           append="curling.fb=1", fb=True),
]


class CurlingMemoryLayouts(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,failover,memory
    """

    APPEND = "curling.mode=dirty curling.rate=4 curling.mb=8"
    ROUNDS = 2
    #: Seconds the guest must stay alive after every failover but the
    #: last, and after the last one.
    ALIVE_BETWEEN_S = 10.0
    #: (CI's length: 15 s, 150 self-checked ticks per vCPU; a soak sets
    #: CURLING_MEMORY_ALIVE)
    ALIVE_S = 15.0

    def test_layouts(self) -> None:
        """Every layout of the matrix survives chained kill -9 rounds."""
        wanted = os.environ.get("CURLING_MEMORY_LAYOUTS")
        rows = [lay for lay in LAYOUTS
                if not wanted or lay.name in wanted.split(",")]
        self.assertTrue(rows, f"CURLING_MEMORY_LAYOUTS={wanted}: no such row")
        alive = float(os.environ.get("CURLING_MEMORY_ALIVE", self.ALIVE_S))
        seed, rng = self.seeded_rng()
        for layout in rows:
            self.log.info("layout %s (seed %d)", layout.name, seed)
            self.run_layout(layout, rng, alive)

    def run_layout(self, layout: Layout, rng, alive: float) -> None:
        append = f"{self.APPEND} {layout.append}".strip()
        assert self._tmpdir is not None
        folder = str(self._tmpdir)
        side = ((lambda name: layout.side(name, folder)) if layout.side
                else None)
        sender, receiver, uri = self.launch_pair(
            machine=layout.machine, append=append, extra_args=layout.args,
            mem=layout.mem, smp=layout.smp, side_args=side)
        sender.wait_tick(5, timeout=BOOT_DEADLINE)
        self.check_placement(sender, layout)
        if layout.fb:
            sender.wait_console(f"curling: fb mode={FB_MODE}", timeout=60)
        for rnd in range(1, self.ROUNDS + 1):
            label = f"{layout.name} round {rnd}/{self.ROUNDS}"
            self.protect(sender, receiver, uri)
            self.wait_checkpoints(sender, 5)
            mark = receiver.console_mark()
            self.kill_round(sender, receiver, rng.uniform(0.3, 2.0), label)
            self.assert_alive(receiver, mark, alive if rnd == self.ROUNDS
                              else self.ALIVE_BETWEEN_S, label)
            if layout.fb:
                self.assert_framebuffer(receiver, mark, label)
            if rnd < self.ROUNDS:
                sender = receiver
                name = f"{layout.name}-receiver{rnd + 1}"
                receiver, uri = self.new_receiver(
                    name, sender, layout.machine, append,
                    tuple(layout.args) + tuple(side(name) if side else ()),
                    mem=layout.mem, smp=layout.smp)
        receiver.kill()

    def check_placement(self, vm: VM, layout: Layout) -> None:
        """Each worker's buffer is in the node the layout puts it in."""
        found = {int(w): (int(cpu), int(node), int(high))
                 for w, cpu, node, high in WORKER_RE.findall(vm.console())}
        self.log.info("%s: workers (cpu, node, highest MiB): %s",
                      layout.name, found)
        self.assertEqual(sorted(found), list(range(layout.smp)),
                         f"{layout.name}: not one worker per vCPU")
        if layout.nodes is not None:
            nodes = tuple(found[w][1] for w in sorted(found))
            self.assertEqual(nodes, layout.nodes,
                             f"{layout.name}: the workers' buffers are not "
                             f"in the nodes of their CPUs")
        if layout.reach_mib:
            self.assertGreaterEqual(
                max(high for _c, _n, high in found.values()),
                layout.reach_mib,
                f"{layout.name}: no worker's buffer reaches "
                f"{layout.reach_mib} MiB")

    def assert_framebuffer(self, vm: VM, mark: int, label: str) -> None:
        """The framebuffer self-check of ``vm``'s guest passed since the
        console position ``mark`` while its rows went on being rewritten,
        and its screen is in the guest's graphics mode."""
        checks = [FBCHECK_RE.search(line) for line in
                  vm.console()[mark:].splitlines()]
        checks = [m for m in checks if m]
        bad = [m.group(0) for m in checks if m.group(3) != "ok"]
        self.assertEqual(bad, [], f"{label}: the framebuffer on {vm.name} "
                         f"is not the one its memory expects")
        self.assertGreaterEqual(len(checks), 2, f"{label}: {vm.name} "
                                f"printed no framebuffer self-checks")
        writes = [int(m.group(1)) for m in checks]
        self.assertGreater(writes[-1], writes[0], f"{label}: the guest on "
                           f"{vm.name} stopped rewriting its framebuffer")
        header, _ = self.parse_ppm(self.screendump(
            vm, f"{vm.name}-{label.replace(' ', '-').replace('/', 'of')}.ppm"))
        width, height = FB_MODE.split("x")[:2]
        self.assertTrue(header.startswith(f"P6 {width} {height} "),
                        f"{label}: {vm.name}'s screen is {header}, not the "
                        f"guest's {FB_MODE} mode")
        self.log.info("%s: framebuffer on %s checked %d times, rows "
                      "rewritten %d..%d", label, vm.name, len(checks),
                      writes[0], writes[-1])

    def assert_alive(self, vm: VM, mark: int, seconds: float,
                     label: str) -> None:
        """``vm``'s guest goes on ticking with a clean self-check for
        ``seconds`` after the console position ``mark``, and its kernel
        reports no trouble."""
        ticks = vm.wait_ticks(int(seconds * 10), timeout=seconds * 4 + 60,
                              since=mark)
        self.assertTrue(vm.is_running(), f"{label}: {vm.name} died")
        trouble = [line for line in vm.console()[mark:].splitlines()
                   if TROUBLE_RE.search(line)]
        self.assertEqual(trouble, [], f"{label}: {vm.name}'s guest kernel "
                         f"is in trouble after failover")
        self.assert_consecutive(vm, ticks)
        self.assert_ticks_ok(vm, since=mark)
        self.log.info("%s: %s alive for %d ticks after failover, ticks "
                      "%d..%d", label, vm.name, len(ticks), ticks[0].n,
                      ticks[-1].n)
