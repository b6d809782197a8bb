# SPDX-License-Identifier: GPL-2.0-or-later
"""The test guest boots on the built QEMU and its workload runs cleanly."""

from curling_test import CurlingTest


class Boot(CurlingTest):
    """
    :avocado: tags=arch:x86_64,guest,boot
    """

    def test_ticks_with_clean_self_check(self) -> None:
        """The dirty workload ticks steadily and its memory self-check passes."""
        vm = self.launch_vm("guest", append="curling.mode=dirty curling.rate=1")
        start = vm.wait_console(r"curling: start mode=dirty mb=16 rate=1 ",
                                timeout=120)
        ticks = vm.wait_ticks(12, timeout=60, since=start.end())

        numbers = [t.n for t in ticks]
        self.assertEqual(numbers, list(range(numbers[0], numbers[0] + len(numbers))),
                         "tick numbers must increase by one per line")
        self.assertEqual(numbers[0], 1, "the first tick must be tick 1")
        bad = [t.line for t in ticks if t.check != "ok"]
        self.assertEqual(bad, [], "self-check failed")
        self.assertGreater(ticks[-1].work, ticks[0].work, "no CPU work done")
        self.assertGreater(ticks[-1].pages, ticks[0].pages, "no pages rewritten")

    def test_counter_mode_on_q35(self) -> None:
        """On q35 the counter workload does CPU work and rewrites no pages."""
        vm = self.launch_vm("guest", machine="q35", append="curling.mode=counter")
        start = vm.wait_console(r"curling: start mode=counter ", timeout=120)
        ticks = vm.wait_ticks(10, timeout=60, since=start.end())

        self.assertEqual([t.line for t in ticks if t.check != "ok"], [],
                         "self-check failed")
        self.assertTrue(all(a.work < b.work for a, b in zip(ticks, ticks[1:])),
                        "work must grow every tick")
        self.assertEqual({t.pages for t in ticks}, {0},
                         "counter mode must not rewrite buffer pages")

    def test_idle_mode(self) -> None:
        """The idle workload only ticks: no work, no pages, no self-check."""
        vm = self.launch_vm("guest", append="curling.mode=idle")
        start = vm.wait_console(r"curling: start mode=idle ", timeout=120)
        ticks = vm.wait_ticks(10, timeout=60, since=start.end())

        self.assertEqual([t.n for t in ticks], list(range(1, len(ticks) + 1)))
        self.assertEqual({(t.work, t.pages, t.check) for t in ticks},
                         {(0, 0, "skip")})
