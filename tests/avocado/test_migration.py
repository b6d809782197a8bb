# SPDX-License-Identifier: GPL-2.0-or-later
"""A stock live migration between two built QEMUs continues the guest."""

from curling_test import CurlingTest, free_tcp_port


class Migration(CurlingTest):
    """
    :avocado: tags=arch:x86_64,migration
    """

    APPEND = "curling.mode=dirty curling.rate=4"

    def test_tcp_migration_continues_guest(self) -> None:
        """After a tcp: migration the receiver's guest goes on where it was."""
        self.migrate_and_check(machine="pc")

    def test_tcp_migration_continues_guest_q35(self) -> None:
        """The same on -machine q35."""
        self.migrate_and_check(machine="q35")

    def migrate_and_check(self, machine: str) -> None:
        port = free_tcp_port()
        uri = f"tcp:127.0.0.1:{port}"
        sender = self.launch_vm("sender", machine=machine, append=self.APPEND)
        receiver = self.launch_vm("receiver", incoming=uri, machine=machine,
                                  append=self.APPEND)

        sender.wait_tick(20, timeout=120)
        sender.qmp("migrate", uri=uri)
        info = self.wait_migration(sender, timeout=120)
        self.assertEqual(info["status"], "completed")
        receiver.wait_event("RESUME", timeout=30)
        self.assertEqual(receiver.qmp("query-status")["status"], "running")
        self.assertEqual(sender.qmp("query-status")["status"], "postmigrate")

        sender_ticks = sender.ticks()
        self.assertEqual([t.line for t in sender_ticks if t.check != "ok"], [],
                         "self-check failed on the sender")
        last_on_sender = sender_ticks[-1]

        ticks = receiver.wait_ticks(10, timeout=60)
        self.log.info("sender's last tick %d, receiver's first %d",
                      last_on_sender.n, ticks[0].n)
        self.assertGreaterEqual(ticks[0].n, last_on_sender.n,
                                "the guest's counter went back after migration")
        self.assertLessEqual(ticks[0].n, last_on_sender.n + 10,
                             "the receiver's counter jumped ahead")
        numbers = [t.n for t in ticks]
        self.assertEqual(numbers, sorted(set(numbers)),
                         "ticks on the receiver must increase")
        self.assertGreater(ticks[-1].pages, last_on_sender.pages,
                           "the guest does not dirty memory on the receiver")
        self.assertEqual([t.line for t in ticks if t.check != "ok"], [],
                         "self-check failed on the receiver")
