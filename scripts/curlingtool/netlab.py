# SPDX-License-Identifier: GPL-2.0-or-later
"""A private network for guests and their clients: a network namespace
holding a bridge (10.0.0.1/24) and one tap per QEMU, the way two hosts on
one LAN see a guest that moves between them.

Needs root and iproute2. ``NetLab`` is a context manager: leaving it (on
every path) kills what it started and deletes the namespace, which takes
the bridge and taps with it.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Optional, Sequence

log = logging.getLogger(__name__)

BRIDGE = "br0"
HOST_IP = "10.0.0.1"
GUEST_IP = "10.0.0.2"
PREFIX = 24
#: The bridge's own MAC, fixed (see NetLab.up()).
BRIDGE_MAC = "02:00:0a:00:00:01"
#: The guest's MAC, the same on every QEMU that runs it.
GUEST_MAC = "52:54:00:c0:11:01"


class NetLabError(Exception):
    """The namespace could not be set up."""


def _ip(*args: str, netns: Optional[str] = None) -> str:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    try:
        res = subprocess.run(argv, capture_output=True, text=True,
                             check=False)
    except FileNotFoundError:
        raise NetLabError("the 'ip' command is missing (install iproute2)") \
            from None
    if res.returncode:
        raise NetLabError(f"{' '.join(argv)}: {res.stderr.strip()}")
    return res.stdout


def check_available() -> Optional[str]:
    """Why a NetLab cannot be built here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "the 'ip' command is missing (install iproute2)"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


class NetLab:
    """A namespace ``name`` with a bridge and taps."""

    def __init__(self, name: Optional[str] = None) -> None:
        self.name = name or f"curling-{os.getpid()}"
        self.taps: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._up = False

    def __enter__(self) -> "NetLab":
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        if self.name in _ip("netns", "list"):
            _ip("netns", "del", self.name)
        _ip("netns", "add", self.name)
        self._up = True
        try:
            _ip("link", "set", "lo", "up", netns=self.name)
            # A bridge with no address of its own takes the lowest MAC of
            # its ports, so adding a tap for the next receiver would give
            # the guest's only neighbour a new MAC that the guest's ARP
            # entry does not know: its packets then go nowhere until that
            # entry is probed again (tens of seconds). A real LAN's
            # gateway keeps its address.
            _ip("link", "add", BRIDGE, "address", BRIDGE_MAC, "type",
                "bridge", netns=self.name)
            _ip("addr", "add", f"{HOST_IP}/{PREFIX}", "dev", BRIDGE,
                netns=self.name)
            _ip("link", "set", BRIDGE, "up", netns=self.name)
        except NetLabError:
            self.down()
            raise
        log.info("network namespace %s: bridge %s %s/%d", self.name, BRIDGE,
                 HOST_IP, PREFIX)

    def add_tap(self, tap: str, multi_queue: bool = False) -> str:
        """A tap in the bridge, for one QEMU (``-netdev tap,ifname=``);
        ``multi_queue`` for a netdev with ``queues=``."""
        _ip("tuntap", "add", "dev", tap, "mode", "tap",
            *(("multi_queue",) if multi_queue else ()), netns=self.name)
        _ip("link", "set", tap, "master", BRIDGE, netns=self.name)
        _ip("link", "set", tap, "up", netns=self.name)
        self.taps.append(tap)
        return tap

    def add_address(self, address: str) -> str:
        """Another address of the bridge (``address``/PREFIX): one more
        host on the LAN, for processes that listen on it."""
        _ip("addr", "add", f"{address}/{PREFIX}", "dev", BRIDGE,
            netns=self.name)
        return address

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace (same process: ``ip netns
        exec`` execs it)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def start(self, argv: Sequence[str], **kwargs: object
              ) -> subprocess.Popen:
        """Start ``argv`` in the namespace; it is killed on ``down()``."""
        proc = subprocess.Popen(self.wrap(argv), **kwargs)  # type: ignore
        self._procs.append(proc)
        return proc

    def fdb_port(self, mac: str) -> Optional[str]:
        """The bridge port (tap) where the bridge last saw ``mac``."""
        res = subprocess.run(["bridge", "-n", self.name, "-j", "fdb", "show",
                              "br", BRIDGE], capture_output=True, text=True,
                             check=False)
        if res.returncode:
            raise NetLabError(f"bridge fdb show: {res.stderr.strip()}")
        for entry in json.loads(res.stdout or "[]"):
            if entry.get("mac", "").lower() == mac.lower() and \
                    "permanent" not in entry.get("state", ""):
                return entry.get("ifname")
        return None

    def down(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._procs.clear()
        if self._up:
            try:
                _ip("netns", "del", self.name)
            except NetLabError as exc:
                log.warning("%s", exc)
            self._up = False


def netdev_args(tap: str, model: str = "virtio-net-pci",
                mac: str = GUEST_MAC, netdev_opts: str = "") -> list[str]:
    """QEMU arguments of the guest's NIC on ``tap``."""
    opts = f",{netdev_opts}" if netdev_opts else ""
    return ["-netdev", f"tap,id=net0,ifname={tap},script=no,downscript=no"
            f"{opts}", "-device", f"{model},netdev=net0,mac={mac},id=nic0"]


class NetClient:
    """A ``curlingtool.netclient`` (or another ``module`` with its command
    line and status file, ``curlingtool.appclient``) running in ``lab``'s
    namespace; ``extra`` are more of its options."""

    def __init__(self, lab: NetLab, mode: str, status: pathlib.Path,
                 connections: int = 1, seconds: float = 0.0,
                 rcvbuf: int = 0, module: str = "curlingtool.netclient",
                 extra: tuple[str, ...] = ()) -> None:
        self.status_path = status
        scripts = pathlib.Path(__file__).resolve().parent.parent
        argv = [sys.executable, "-m", module,
                "--host", GUEST_IP, "--mode", mode, "--status", str(status),
                "--connections", str(connections), *extra]
        if seconds:
            argv += ["--seconds", str(seconds)]
        if rcvbuf:
            argv += ["--rcvbuf", str(rcvbuf)]
        env = dict(os.environ, PYTHONPATH=str(scripts))
        self.proc = lab.start(argv, stdin=subprocess.PIPE, env=env)

    def status(self) -> dict:
        """The client's last status (``{}`` before its first)."""
        try:
            return json.loads(self.status_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def stop(self, timeout: float = 15.0) -> dict:
        """Stop the client; returns its final status."""
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.status()
