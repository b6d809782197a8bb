# SPDX-License-Identifier: GPL-2.0-or-later
"""The description of one protected guest: a small TOML file, the same on
every host that may run the guest.

::

  [guest]
  name = "web"                      # the guest's name, its witness key
  memory = "1G"
  vcpus = 2
  machine = "q35"                   # default q35
  args = ["-kernel", "/srv/web/vmlinuz", "-append", "root=/dev/vda",
          "-serial", "file:{run}/console.log"]   # {run}: the host's own

  [[guest.drives]]
  id = "disk0"
  device = "virtio-blk-pci"         # -device DEVICE,drive=ID
  format = "raw"                    # default raw

  [[guest.nics]]
  id = "net0"
  device = "virtio-net-pci"         # -device DEVICE,netdev=ID,mac=MAC
  mac = "52:54:00:12:34:56"

  [protection]
  witness = "etcd:http://10.0.0.9:2379"
  port = 4444                       # each host's receiver listens there
  interval = 100                    # curling-interval, ms
  timeout = 1000                    # curling-timeout, ms

  [hosts.A]
  address = "10.0.0.1"              # where the others reach its receiver
  drives = { disk0 = "/srv/web/disk0.img" }
  nics = { net0 = "tap:tap-web" }   # or "bridge:br0"
  tls = "/etc/curling/pki"          # optional: x509 credentials
  run = "/run/curling"              # default; {run} is RUN/GUEST-NAME

  [hosts.B]
  ...

Hosts are listed in the order they are preferred: with no term on the
witness yet the first one runs the guest, and a host that runs it
protects it to the first other host that accepts.  ``load()`` refuses
anything else, naming the file and the key: an unknown key, a value of
the wrong kind, a host without an image for a drive or an attachment for
a NIC, two hosts with the same address, fewer than two hosts or more
than three.  Pure: no I/O beyond reading the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import tomllib
from typing import Any, Optional

from . import CurlingError
from .arbiter import ArbiterError, check_id

#: curling-interval and curling-timeout bounds (QEMU's own checks).
MAX_INTERVAL_MS = 600000
MIN_TIMEOUT_MS, MAX_TIMEOUT_MS = 200, 600000
DEFAULT_PORT = 4444
DEFAULT_RUN_DIR = "/run/curling"

_MEMORY_RE = re.compile(r"[1-9][0-9]*[MG]")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_ATTACH_RE = re.compile(r"(tap|bridge):[A-Za-z0-9_.-]{1,15}")
_OPTION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class DescriptionError(CurlingError):
    """The description cannot be used: says which file and which key."""


@dataclasses.dataclass(frozen=True)
class Drive:
    id: str
    device: str
    format: str = "raw"


@dataclasses.dataclass(frozen=True)
class Nic:
    id: str
    device: str
    mac: str


@dataclasses.dataclass(frozen=True)
class Guest:
    name: str
    memory: str
    vcpus: int
    machine: str
    args: tuple[str, ...]
    drives: tuple[Drive, ...]
    nics: tuple[Nic, ...]


@dataclasses.dataclass(frozen=True)
class Host:
    id: str
    address: str
    drives: dict[str, str]           # drive id -> image path on this host
    nics: dict[str, str]             # NIC id -> "tap:NAME" | "bridge:NAME"
    tls: Optional[str] = None        # x509 credentials directory
    run: str = DEFAULT_RUN_DIR       # monitor sockets, logs


@dataclasses.dataclass(frozen=True)
class Protection:
    witness: str
    port: int = DEFAULT_PORT
    interval: int = 100
    timeout: int = 1000


@dataclasses.dataclass(frozen=True)
class Description:
    path: str
    guest: Guest
    protection: Protection
    hosts: tuple[Host, ...]

    def host(self, host_id: str) -> Host:
        for host in self.hosts:
            if host.id == host_id:
                return host
        raise DescriptionError(
            f"{self.path}: no host {host_id!r} in [hosts] (it has "
            f"{', '.join(h.id for h in self.hosts)})")

    def others(self, host_id: str) -> tuple[Host, ...]:
        """The other hosts, in the order this one protects to them: those
        after it in the file, then those before it."""
        i = [h.id for h in self.hosts].index(self.host(host_id).id)
        return self.hosts[i + 1:] + self.hosts[:i]

    def fingerprint(self) -> str:
        """A hash of what every host must agree on: the guest and the
        protection settings (not a host's own paths)."""
        shared = {"guest": dataclasses.asdict(self.guest),
                  "protection": dataclasses.asdict(self.protection),
                  "hosts": [[h.id, h.address] for h in self.hosts]}
        text = json.dumps(shared, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


class _Table:
    """One TOML table being read: every key must be taken."""

    def __init__(self, path: str, where: str, data: Any) -> None:
        self.path = path
        self.where = where
        if not isinstance(data, dict):
            self.fail(where, "must be a table")
        self.data: dict[str, Any] = data
        self.taken: set[str] = set()

    def fail(self, key: str, why: str) -> None:
        raise DescriptionError(f"{self.path}: {key}: {why}")

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: type, default: Any = None,
            required: bool = False) -> Any:
        self.taken.add(name)
        if name not in self.data:
            if required:
                self.fail(self.key(name), "missing")
            return default
        value = self.data[name]
        if kind is int and isinstance(value, bool) or \
                not isinstance(value, kind):
            self.fail(self.key(name), f"must be {_KINDS[kind]}, not "
                      f"{type(value).__name__} {value!r}")
        return value

    def table(self, name: str, required: bool = False) -> _Table:
        value = self.get(name, dict, {}, required)
        return _Table(self.path, self.key(name), value)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.taken)
        if unknown:
            self.fail(self.key(unknown[0]), "unknown key")


_KINDS = {str: "a string", int: "an integer", dict: "a table",
          list: "an array"}


def _id(table: _Table, key: str, value: str, what: str) -> str:
    try:
        return check_id(value, what)
    except ArbiterError as exc:
        table.fail(key, str(exc))
        raise AssertionError("unreachable")


def _guest(t: _Table) -> Guest:
    name = _id(t, t.key("name"), t.get("name", str, required=True),
               "guest name")
    memory = t.get("memory", str, required=True)
    if not _MEMORY_RE.fullmatch(memory):
        t.fail(t.key("memory"), f"{memory!r}: a size such as 512M or 2G")
    vcpus = t.get("vcpus", int, 1)
    if not 1 <= vcpus <= 64:
        t.fail(t.key("vcpus"), f"{vcpus}: from 1 to 64")
    machine = t.get("machine", str, "q35")
    args = t.get("args", list, [])
    for i, arg in enumerate(args):
        if not isinstance(arg, str):
            t.fail(f"{t.key('args')}[{i}]", f"must be a string, not {arg!r}")
    for forbidden in ("-incoming", "-drive", "-netdev", "-nic", "-mon",
                      "-qmp", "-daemonize"):
        if forbidden in args:
            t.fail(t.key("args"), f"{forbidden} is Curling's to set (drives "
                   "and NICs go in [[guest.drives]] and [[guest.nics]])")
    drives = tuple(_device(t, "drives", i, d, Drive)
                   for i, d in enumerate(t.get("drives", list, [])))
    nics = tuple(_device(t, "nics", i, d, Nic)
                 for i, d in enumerate(t.get("nics", list, [])))
    ids = [d.id for d in drives] + [n.id for n in nics]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        t.fail(t.key("drives"), f"id {dup!r} used twice")
    t.done()
    return Guest(name, memory, vcpus, machine, tuple(args), drives, nics)


def _device(parent: _Table, kind: str, i: int, data: Any,
            cls: type) -> Any:
    t = _Table(parent.path, f"{parent.key(kind)}[{i}]", data)
    dev_id = _id(t, t.key("id"), t.get("id", str, required=True),
                 f"{kind[:-1]} id")
    device = t.get("device", str, required=True)
    if not _OPTION_RE.fullmatch(device):
        t.fail(t.key("device"), f"{device!r}: a -device driver name, "
               "options go in guest.args")
    if cls is Drive:
        fmt = t.get("format", str, "raw")
        if fmt not in ("raw", "qcow2"):
            t.fail(t.key("format"), f"{fmt!r}: raw or qcow2")
        t.done()
        return Drive(dev_id, device, fmt)
    mac = t.get("mac", str, required=True).lower()
    if not _MAC_RE.fullmatch(mac):
        t.fail(t.key("mac"), f"{mac!r}: six hexadecimal bytes, "
               "52:54:00:12:34:56")
    t.done()
    return Nic(dev_id, device, mac)


def _protection(t: _Table) -> Protection:
    witness = t.get("witness", str, required=True)
    if not witness.startswith(("etcd:", "file:")):
        t.fail(t.key("witness"), f"{witness!r}: etcd:http://HOST:PORT[,...] "
               "or file:/DIR")
    port = t.get("port", int, DEFAULT_PORT)
    if not 1 <= port <= 65535:
        t.fail(t.key("port"), f"{port}: a TCP port")
    interval = t.get("interval", int, 100)
    if not 0 <= interval <= MAX_INTERVAL_MS:
        t.fail(t.key("interval"), f"{interval}: from 0 to {MAX_INTERVAL_MS}")
    timeout = t.get("timeout", int, 1000)
    if not MIN_TIMEOUT_MS <= timeout <= MAX_TIMEOUT_MS:
        t.fail(t.key("timeout"), f"{timeout}: from {MIN_TIMEOUT_MS} to "
               f"{MAX_TIMEOUT_MS}")
    t.done()
    return Protection(witness, port, interval, timeout)


def _host(t: _Table, host_id: str, guest: Guest) -> Host:
    address = t.get("address", str, required=True)
    if not re.fullmatch(r"[A-Za-z0-9.:-]+", address):
        t.fail(t.key("address"), f"{address!r}: an IP address or host name")
    drives_t = t.table("drives")
    drives = {}
    for drive in guest.drives:
        path = drives_t.get(drive.id, str)
        if path is None:
            t.fail(t.key("drives"), f"no image for drive {drive.id!r}")
        if not os.path.isabs(path):
            t.fail(drives_t.key(drive.id), f"{path!r}: an absolute path")
        drives[drive.id] = path
    drives_t.done()
    nics_t = t.table("nics")
    nics = {}
    for nic in guest.nics:
        attach = nics_t.get(nic.id, str)
        if attach is None:
            t.fail(t.key("nics"), f"no attachment for NIC {nic.id!r}")
        if not _ATTACH_RE.fullmatch(attach):
            t.fail(nics_t.key(nic.id), f"{attach!r}: tap:NAME or "
                   "bridge:NAME")
        nics[nic.id] = attach
    nics_t.done()
    tls = t.get("tls", str)
    run = t.get("run", str, DEFAULT_RUN_DIR)
    for key, value in (("tls", tls), ("run", run)):
        if value is not None and not os.path.isabs(value):
            t.fail(t.key(key), f"{value!r}: an absolute path")
    t.done()
    return Host(host_id, address, drives, nics, tls, run)


def parse(text: str, path: str = "<description>") -> Description:
    """The description in ``text`` (read from ``path``, for messages)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise DescriptionError(f"{path}: not TOML: {exc}") from None
    top = _Table(path, "", data)
    guest = _guest(top.table("guest", required=True))
    protection = _protection(top.table("protection", required=True))
    hosts_t = top.table("hosts", required=True)
    hosts = []
    for host_id in list(hosts_t.data):
        _id(hosts_t, hosts_t.key(host_id), host_id, "host id")
        hosts.append(_host(hosts_t.table(host_id), host_id, guest))
    hosts_t.done()
    top.done()
    if not 2 <= len(hosts) <= 3:
        top.fail("hosts", f"{len(hosts)} host(s): two or three")
    seen: dict[str, str] = {}
    for host in hosts:
        where = f"hosts.{host.id}.address"
        if host.address in seen:
            other = seen[host.address]
            top.fail(where, f"{host.address} is also hosts.{other}.address: "
                     "each host needs its own")
        seen[host.address] = host.id
    return Description(path, guest, protection, tuple(hosts))


def load(path: os.PathLike[str] | str) -> Description:
    """Read and check the description file ``path``."""
    try:
        text = pathlib.Path(path).read_text()
    except OSError as exc:
        raise DescriptionError(f"{path}: {exc.strerror}") from None
    return parse(text, os.fspath(path))
