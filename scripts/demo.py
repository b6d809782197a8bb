#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""One-minute Curling demo: protect a guest, kill its host, watch it go on.

    .venv/bin/python3 scripts/demo.py [--machine q35] [--interval MS]

Starts two QEMUs of build/bin on this machine with the test guest of
build/guest (run scripts/build.py first): a sender that runs the guest and
a receiver listening on curling:tcp:127.0.0.1:PORT. It protects the guest,
prints the guest's ticks and the Curling statistics for a few seconds,
kills the sender with SIGKILL and shows the receiver carrying on from the
last checkpoint. The guest also rewrites blocks of its disk and checks
them against what its memory says it wrote; each QEMU has its own image,
and the receiver's holds the sender's disk as of the checkpoint it
resumes. Everything it starts ends with it.

Run as root (with iproute2), the guest also serves a TCP stream on a
private network (a namespace with a bridge and a tap per QEMU), and a
client there reads it across the failover: its line count goes on, and
no line is lost, repeated or garbled.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from curlingtool import CurlingError  # noqa: E402
from curlingtool.netlab import (GUEST_IP, PREFIX, NetClient,  # noqa: E402
                                NetLab, NetLabError, check_available,
                                netdev_args)
from curlingtool.vm import (VM, WaitTimeout, VMDied,  # noqa: E402
                            built_qemu_and_guest, free_tcp_port,
                            guest_args, wait_until)


def launch(qemu: pathlib.Path, name: str, workdir: pathlib.Path, guest,
           machine: str, incoming: str | None = None,
           lab: NetLab | None = None) -> VM:
    console = workdir / f"{name}-console.log"
    console.touch()
    append = "curling.mode=dirty curling.rate=4 curling.diskcheck=vda"
    # Each side its own disk image: the receiver's starts empty.
    image = workdir / f"{name}-disk0.img"
    subprocess.run([str(qemu.parent / "qemu-img"), "create", "-q", "-f",
                    "raw", str(image), "64M"], check=True)
    extra = ["-drive", f"if=none,id=disk0,file={image},format=raw",
             "-device", "virtio-blk-pci,drive=disk0"]
    if lab is not None:
        append += f" curling.serve=1 curling.ip={GUEST_IP}/{PREFIX}"
        extra += netdev_args(lab.add_tap(f"tap-{name}"))
    args = guest_args(qemu, guest, name, accel=os.environ.get("CURLING_ACCEL", "tcg"),
                      console=console, qmp_path=workdir / f"{name}.qmp",
                      incoming=incoming, machine=machine,
                      append=append, extra_args=extra)
    if lab is not None:
        args = lab.wrap(args)
    vm = VM(name, args, console, workdir / f"{name}-qemu.log",
            workdir / f"{name}.qmp", logging.getLogger(name))
    vm.launch()
    return vm


def show(vm: VM, what: str, client: NetClient | None = None) -> None:
    tick = vm.last_tick()
    info = vm.qmp("query-curling")
    pause = (f", pause {info['last-pause']:.2f} ms" if "last-pause" in info else "")
    size = f", {info['last-bytes'] / 1e6:.2f} MB" if "last-bytes" in info else ""
    print(f"  {what:9} {tick.line if tick else '(no tick yet)':48} "
          f"[{info['status']}, checkpoint {info['sequence']}{size}{pause}]")
    disk = vm.diskchecks()
    if disk:
        print(f"  {'disk':9} {disk[-1].line}")
    if client is not None:
        st = client.status()
        print(f"  {'client':9} TCP stream from the guest: {st.get('items', 0)} "
              f"lines, longest gap {st.get('max_gap', 0) * 1000:.0f} ms, "
              f"{st.get('error_count', 0)} bad lines")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--machine", default="pc", help="pc or q35")
    parser.add_argument("--interval", type=int, default=100,
                        help="curling-interval in ms (default 100)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        qemu, guest = built_qemu_and_guest(REPO)
    except CurlingError as exc:
        print(f"error: {exc}")
        return 1

    why = check_available()
    lab: NetLab | None = None
    if why:
        print(f"(no network part: {why})")
    else:
        lab = NetLab(f"curling-demo-{os.getpid()}")
    client: NetClient | None = None
    with tempfile.TemporaryDirectory(prefix="curling-demo-") as tmp:
        workdir = pathlib.Path(tmp)
        uri = f"curling:tcp:127.0.0.1:{free_tcp_port()}"
        try:
            if lab is not None:
                lab.up()
                print(f"0. network namespace {lab.name}: a bridge, a tap per "
                      f"QEMU; the guest serves on {GUEST_IP}")
            print(f"1. receiver: qemu ... -incoming {uri}")
            receiver = launch(qemu, "receiver", workdir, guest, args.machine,
                              uri, lab)
            print("2. sender: boots the guest (~10 s under TCG)")
            sender = launch(qemu, "sender", workdir, guest, args.machine,
                            lab=lab)
            sender.wait_tick(10, timeout=120)
            if lab is not None:
                client = NetClient(lab, "stream", workdir / "client.json")
                wait_until(lambda: client.status().get("items", 0) > 0, 60,
                           "the TCP client's first line")
            print(f"3. sender: migrate {uri}  (curling-interval {args.interval} ms)")
            sender.qmp("migrate-set-parameters", max_bandwidth=10 * 1024 ** 3,
                       curling_interval=args.interval)
            sender.qmp("migrate", uri=uri)
            wait_until(lambda: receiver.qmp("query-curling")["status"] == "protecting",
                       60, "protection")
            for _ in range(6):
                time.sleep(0.5)
                show(sender, "sender", client)
            print("4. kill -9 the sender")
            last = sender.last_tick()
            start = time.monotonic()
            sender.kill(signal.SIGKILL)
            event = receiver.wait_event("CURLING_FAILOVER", timeout=30)
            first = receiver.wait_ticks(1, timeout=30)[0]
            print(f"   receiver took over from checkpoint {event['data']['sequence']}; "
                  f"first guest output {time.monotonic() - start:.2f} s after the kill")
            print(f"   sender's last tick {last.n if last else '-'}, "
                  f"receiver's first tick {first.n}")
            for _ in range(4):
                time.sleep(0.5)
                show(receiver, "receiver", client)
            ticks = receiver.ticks()
            bad = [t.line for t in ticks if not t.ok]
            print("5. the guest carries on: "
                  + ("self-check clean" if not bad else f"SELF-CHECK FAILED: {bad[0]}"))
            disk_bad = [c.line for c in receiver.diskchecks() if not c.ok]
            bad += disk_bad
            print("   its disk (the receiver's own image, written only from "
                  "committed checkpoints) holds what its memory says it "
                  "wrote: " + ("yes" if not disk_bad
                              else f"NO: {disk_bad[0]}"))
            if client is not None:
                st = client.stop()
                bad += st.get("errors", []) + st.get("fatal", [])
                print(f"   the TCP client read {st.get('items', 0)} lines "
                      f"across the failover: " +
                      ("none lost, repeated or garbled"
                       if not (st.get("errors") or st.get("fatal"))
                       else f"BROKEN: {(st.get('errors') or st.get('fatal'))[0]}"))
            return 0 if not bad else 1
        except (WaitTimeout, VMDied, NetLabError) as exc:
            print(f"error: {exc}")
            return 1
        finally:
            for name in ("sender", "receiver"):
                vm = locals().get(name)
                if vm is not None:
                    vm.kill()
            if lab is not None:
                lab.down()


if __name__ == "__main__":
    sys.exit(main())
