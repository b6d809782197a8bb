# SPDX-License-Identifier: GPL-2.0-or-later
"""The test network: a namespace, a bridge and taps (needs root)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from curlingtool import netlab

needs_lab = pytest.mark.skipif(netlab.check_available() is not None,
                               reason=f"{netlab.check_available()}")


def link_mac(lab: netlab.NetLab, dev: str) -> str:
    res = subprocess.run(["ip", "-n", lab.name, "-j", "link", "show", dev],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout)[0]["address"]


@needs_lab
def test_bridge_keeps_its_mac_when_taps_come_and_go() -> None:
    """The guest's only neighbour is the bridge: a guest that moves to a
    new QEMU keeps its ARP entry, so the bridge's MAC must not follow its
    ports (Linux gives a bridge the lowest MAC of its ports unless one was
    set), or the resumed guest sends to an address nobody answers."""
    with netlab.NetLab(f"curling-unit-{os.getpid()}") as lab:
        before = link_mac(lab, netlab.BRIDGE)
        tap = lab.add_tap("tap-low")
        subprocess.run(["ip", "-n", lab.name, "link", "set", tap, "address",
                        "00:00:00:00:00:01"], check=True)
        lab.add_tap("tap-other")
        assert link_mac(lab, netlab.BRIDGE) == before
        subprocess.run(["ip", "-n", lab.name, "link", "del", tap],
                       check=True)
        assert link_mac(lab, netlab.BRIDGE) == before
        assert before == netlab.BRIDGE_MAC
