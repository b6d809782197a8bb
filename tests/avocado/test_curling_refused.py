# SPDX-License-Identifier: GPL-2.0-or-later
"""Configurations Curling cannot protect are refused before anything
starts: migration capabilities whose machinery cannot run forever or would
leave memory out of the checkpoints, the cpr modes, and devices whose state
cannot be checkpointed again and again.

Each refusal must say what is wrong, start no migration, leave the curling
capability as it was, and leave the guest running.  (VFIO devices, also
refused, cannot be created on these machines.)
"""

from __future__ import annotations

import subprocess

from qemu.qmp import ExecuteError

from curling_test import VM, CurlingTest, free_tcp_port

#: Seconds from QEMU start to a ticking guest.
BOOT_DEADLINE = 120.0

APPEND = "curling.mode=dirty curling.rate=1"

#: Capabilities Curling refuses; the ones not settable at all on this
#: accelerator (dirty-limit needs KVM's dirty ring) are refused anyway.
INCOMPATIBLE = ("postcopy-ram", "multifd", "auto-converge", "dirty-limit",
                "x-ignore-shared", "dirty-bitmaps", "background-snapshot")
#: Of those, the ones every accelerator lets a user set without Curling.
SETTABLE = {"postcopy-ram", "multifd", "auto-converge", "x-ignore-shared",
            "dirty-bitmaps"}

#: Migration modes other than normal.
CPR_MODES = ("cpr-reboot", "cpr-transfer", "cpr-exec")


class CurlingRefused(CurlingTest):
    """
    :avocado: tags=arch:x86_64,curling,refused
    """

    def booted(self, name: str = "sender", **kwargs) -> VM:
        vm = self.launch_vm(name, append=APPEND, **kwargs)
        vm.wait_tick(2, timeout=BOOT_DEADLINE)
        vm.qmp("migrate-set-parameters", max_bandwidth=self.BANDWIDTH)
        return vm

    @staticmethod
    def set_capability(vm: VM, name: str, state: bool) -> None:
        vm.qmp("migrate-set-capabilities",
               capabilities=[{"capability": name, "state": state}])

    def refused_migrate(self, vm: VM, what: str, pattern: str) -> None:
        """``migrate curling:tcp:...`` is refused for ``what``; the port has
        no listener, so a migration that started would fail later, not
        at once."""
        uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
        with self.assertRaises(ExecuteError,
                               msg=f"migrate with {what} was accepted") as cm:
            vm.qmp("migrate", uri=uri)
        self.check_refused(vm, f"{uri} with {what}", str(cm.exception),
                           pattern)
        self.assertFalse(self.curling_capability(vm),
                         f"a refused migrate with {what} left the curling "
                         f"capability on")

    def test_incompatible_capabilities(self) -> None:
        """Each incompatible capability is refused, whether it is set
        before ``migrate curling:...`` or after the curling capability."""
        vm = self.booted()
        tested = set()
        for cap in INCOMPATIBLE:
            try:
                self.set_capability(vm, cap, True)
            except ExecuteError as exc:
                self.log.info("%s cannot be set here: %s", cap, exc)
                continue
            self.refused_migrate(vm, cap, rf"Curling is not compatible "
                                 rf"with {cap}")
            self.set_capability(vm, cap, False)

            self.set_capability(vm, "curling", True)
            with self.assertRaises(ExecuteError,
                                   msg=f"{cap} accepted with curling") as cm:
                self.set_capability(vm, cap, True)
            self.assertRegex(str(cm.exception),
                             rf"Curling is not compatible with {cap}")
            self.set_capability(vm, "curling", False)
            tested.add(cap)
        self.log.info("refused: %s", ", ".join(sorted(tested)))
        self.assertLessEqual(SETTABLE, tested,
                             "a capability settable everywhere was not "
                             "tested")
        self.assert_ticks_ok(vm)

    def test_cpr_modes(self) -> None:
        """The cpr modes are refused; back in normal mode Curling is not."""
        vm = self.booted()
        for mode in CPR_MODES:
            try:
                vm.qmp("migrate-set-parameters", mode=mode)
            except ExecuteError as exc:
                self.log.info("mode %s cannot be set here: %s", mode, exc)
                continue
            self.refused_migrate(vm, f"mode {mode}",
                                 rf"Curling needs migration mode 'normal', "
                                 rf"not '{mode}'")
        vm.qmp("migrate-set-parameters", mode="normal")
        self.assertEqual(vm.qmp("query-migrate-parameters")["mode"], "normal")
        self.assert_ticks_ok(vm)

    def test_virtio_mem(self) -> None:
        """virtio-mem, whose state is loaded before RAM, is refused."""
        vm = self.booted(mem="256M,maxmem=1G", extra_args=(
            "-object", "memory-backend-ram,id=vmem0,size=128M",
            "-device", "virtio-mem-pci,id=vmem,memdev=vmem0"))
        self.refused_migrate(vm, "virtio-mem",
                             r"Curling cannot protect a VM with '.*virtio-mem"
                             r".*': its state must be loaded before RAM")
        self.assert_ticks_ok(vm)

    def test_migration_blocker(self) -> None:
        """A device that blocks migration (a disk in the vdi format)
        blocks Curling with the blocker's own reason."""
        assert self._tmpdir is not None
        image = self._tmpdir / "disk.vdi"
        subprocess.run([str(self.qemu_bin.parent / "qemu-img"), "create",
                        "-q", "-f", "vdi", str(image), "16M"], check=True)
        vm = self.booted(extra_args=(
            "-drive", f"if=none,id=vdi0,format=vdi,file={image}",
            "-device", "virtio-blk-pci,drive=vdi0"))
        self.refused_migrate(vm, "a vdi disk",
                             r"vdi format .* does not support live "
                             r"migration")
        self.assert_ticks_ok(vm)

    def test_unholdable_chardev_output_refused(self) -> None:
        """A device that sends to a chardev what Curling cannot hold (an
        external IPMI BMC's link) is refused at ``migrate``, by name; the
        virtio-serial port beside it, whose output Curling holds, is
        not what is refused."""
        vm = self.booted(extra_args=(
            "-chardev", "null,id=bmclink",
            "-device", "ipmi-bmc-extern,id=bmc0,chardev=bmclink",
            "-device", "isa-ipmi-kcs,bmc=bmc0",
            "-device", "virtio-serial-pci",
            "-chardev", "null,id=port0",
            "-device", "virtserialport,chardev=port0,name=org.curling.0"))
        self.refused_migrate(vm, "an ipmi-bmc-extern",
                             r"Curling cannot hold what device 'bmc0' "
                             r"\(ipmi-bmc-extern\) sends to chardev "
                             r"'bmclink'; remove the device or its chardev")
        self.assert_ticks_ok(vm)

    def test_filters_sending_output_early(self) -> None:
        """A netfilter that would send the guest's output on before its
        checkpoint is committed (filter-mirror, filter-redirector,
        filter-rewriter on the guest's output) is refused at ``migrate``
        and, while protecting, at ``object-add``; filters that only pass
        the output on (filter-buffer, filter-dump) or see only what the
        guest receives (queue=tx) are accepted."""
        assert self._tmpdir is not None
        tmp = self._tmpdir
        net = ("-netdev", "user,id=n0,restrict=on",
               "-device", "virtio-net-pci,netdev=n0")
        sender = self.booted(extra_args=net)
        sender.qmp("chardev-add", id="out0", backend={
            "type": "file", "data": {"out": str(tmp / "mirror.out")}})
        sender.qmp("object-add", {"qom-type": "filter-mirror", "id": "fm0",
                                  "netdev": "n0", "outdev": "out0"})
        self.refused_migrate(sender, "a filter-mirror on the guest's output",
                             r"Curling would hold the guest's output on "
                             r"netdev 'n0' .* filter-mirror 'fm0' "
                             r".*queue=tx.*object-del")
        sender.qmp("object-del", id="fm0")

        uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
        receiver = self.launch_vm("receiver", incoming=uri, append=APPEND,
                                  extra_args=net)
        self.protect(sender, receiver, uri)
        refused = [
            {"qom-type": "filter-mirror", "id": "fm1", "netdev": "n0",
             "outdev": "out0"},
            {"qom-type": "filter-redirector", "id": "fr1", "netdev": "n0",
             "queue": "rx", "outdev": "out0"},
            {"qom-type": "filter-rewriter", "id": "fw1", "netdev": "n0"},
        ]
        for args in refused:
            with self.assertRaises(ExecuteError,
                                   msg=f"{args['qom-type']} accepted on a "
                                       f"protected NIC") as cm:
                sender.qmp("object-add", args)
            self.log.info("%s refused: %s", args["qom-type"], cm.exception)
            self.assertRegex(str(cm.exception),
                             rf"Curling holds the guest's output on netdev "
                             rf"'n0' .* {args['qom-type']} '{args['id']}' "
                             rf".*migrate_cancel")
        objects = {o["name"] for o in sender.qmp("qom-list", path="/objects")}
        self.assertFalse(objects & {"fm1", "fr1", "fw1"},
                         f"a refused filter was left behind: {objects}")
        accepted = [
            {"qom-type": "filter-mirror", "id": "fm2", "netdev": "n0",
             "queue": "tx", "outdev": "out0"},
            {"qom-type": "filter-buffer", "id": "fb2", "netdev": "n0",
             "interval": 1000},
            {"qom-type": "filter-dump", "id": "fd2", "netdev": "n0",
             "file": str(tmp / "dump.pcap")},
        ]
        for args in accepted:
            sender.qmp("object-add", args)
        for args in accepted:
            sender.qmp("object-del", id=args["id"])
        self.wait_checkpoints(sender, 3)
        self.assert_ticks_ok(sender)
