# SPDX-License-Identifier: GPL-2.0-or-later
"""Clients of the test guest's network services (``curling-netserve``),
and the checks that tell whether a guest's output escaped before its
checkpoint was committed.

The checkers are pure: they are fed what a client received and keep a
list of errors, so that unit tests drive them without a guest. ``run()``
connects them to the guest and is what ``python3 -m curlingtool.netclient``
runs inside a test's network namespace: it writes its status as JSON to a
file every 0.2 s (``"done": true`` once it stopped), and stops when its
stdin closes or after ``--seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

STREAM_PORT = 7001
RR_PORT = 7002
UDP_PORT = 7003
BULK_PORT = 7004

#: Errors a checker keeps in full; more are only counted.
MAX_ERRORS = 20

_TICK_RE = re.compile(rb"TICK (\d+) counter=(\d+) pad=(x{0,63})")
_REP_RE = re.compile(rb"REP (\d+) conn=(\d+) global=(\d+)")
_UDP_RE = re.compile(rb"UDP (\d+) (\d+)")
#: The bulk stream's bytes, from offset 0, long enough for any one read.
_BULK_PATTERN = bytes((i * 7) & 0xFF for i in range(256)) * (4097 + 1)
_BULK_READ = 1 << 20


@dataclass
class Checker:
    """Errors and counts common to every checker."""
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    items: int = 0
    #: Longest time between two items (s): how long the service stalled.
    max_gap: float = 0.0
    _last_time: Optional[float] = None

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(text)

    def tick(self, now: float) -> None:
        self.items += 1
        if self._last_time is not None:
            self.max_gap = max(self.max_gap, now - self._last_time)
        self._last_time = now

    def status(self) -> dict[str, Any]:
        return {"items": self.items, "errors": self.errors,
                "error_count": self.error_count,
                "max_gap": round(self.max_gap, 4)}


@dataclass
class StreamChecker(Checker):
    """The TCP stream: every line parses and its counter follows the
    previous one. A guest resumed from a state older than what the client
    saw writes other bytes at the same offsets; the client then reads a
    line that does not parse or a counter that does not follow."""
    counter: int = 0
    _partial: bytes = b""

    def feed(self, data: bytes, now: float) -> None:
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            m = _TICK_RE.fullmatch(line)
            if not m:
                self.error(f"after counter {self.counter}: garbled line "
                           f"{line[:80]!r}")
                continue
            counter = int(m.group(2))
            if counter != self.counter + 1:
                self.error(f"counter {counter} after {self.counter}")
            self.counter = counter
            self.tick(now)


@dataclass
class RRChecker(Checker):
    """Request/response: each reply answers its request, counts the
    connection's requests one by one and carries a guest-wide number that
    no other reply had. A reply from a lost state would repeat a number
    or skip one."""
    seen_global: set[int] = field(default_factory=set)
    latencies: list[float] = field(default_factory=list)

    def reply(self, conn: int, request: int, expected_conn: int,
              line: bytes, latency: float, now: float) -> None:
        m = _REP_RE.fullmatch(line)
        if not m:
            self.error(f"connection {conn}: garbled reply {line[:80]!r}")
            return
        req, k, g = (int(x) for x in m.groups())
        if req != request:
            self.error(f"connection {conn}: reply to {req}, asked {request}")
        if k != expected_conn:
            self.error(f"connection {conn}: request {request} counted {k}, "
                       f"expected {expected_conn}")
        if g in self.seen_global:
            self.error(f"connection {conn}: guest-wide number {g} repeated")
        self.seen_global.add(g)
        self.latencies.append(latency)
        self.tick(now)

    def status(self) -> dict[str, Any]:
        st = super().status()
        st["latency"] = latency_summary(self.latencies)
        return st


@dataclass
class UDPChecker(Checker):
    """UDP: sequence numbers only go up (a datagram may be lost, never
    repeated: a repeated number was sent by a state that was lost)."""
    last: int = 0
    lost: int = 0

    def datagram(self, data: bytes, now: float) -> None:
        m = _UDP_RE.fullmatch(data.rstrip(b"\n"))
        if not m:
            self.error(f"garbled datagram {data[:80]!r}")
            return
        seq = int(m.group(1))
        if seq <= self.last:
            self.error(f"datagram {seq} after {self.last}")
        else:
            self.lost += seq - self.last - 1
            self.last = seq
        self.tick(now)

    def status(self) -> dict[str, Any]:
        st = super().status()
        st["lost"] = self.lost
        return st


@dataclass
class BulkChecker(Checker):
    """Bulk TCP: byte i of the stream is (i * 7) & 0xff."""
    offset: int = 0
    started: Optional[float] = None
    last_time: Optional[float] = None

    def feed(self, data: bytes, now: float) -> None:
        if self.started is None:
            self.started = now
        self.last_time = now
        start = self.offset % 256
        if len(data) > _BULK_READ:
            raise ValueError("feed at most 1 MiB at a time")
        if (data != _BULK_PATTERN[start:start + len(data)] and
                not self.errors):
            self.error(f"byte pattern broken near offset {self.offset}")
        self.offset += len(data)
        self.tick(now)

    def status(self) -> dict[str, Any]:
        st = super().status()
        st["bytes"] = self.offset
        span = ((self.last_time or 0.0) - (self.started or 0.0))
        st["mbit_per_s"] = round(self.offset * 8 / span / 1e6, 2) \
            if span > 0 else 0.0
        return st


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """Median, p99 and max of ``latencies`` in milliseconds."""
    if not latencies:
        return {}
    values = sorted(latencies)

    def pick(q: float) -> float:
        return round(values[min(len(values) - 1,
                                int(q * (len(values) - 1) + 0.5))] * 1e3, 3)

    return {"count": len(values), "median_ms": pick(0.5),
            "p99_ms": pick(0.99), "max_ms": round(values[-1] * 1e3, 3)}


# -- running against a guest ------------------------------------------------

class _Stop:
    def __init__(self) -> None:
        self.event = threading.Event()
        self.fatal: list[str] = []


def _connect(host: str, port: int, stop: _Stop, deadline: float,
             rcvbuf: int = 0) -> Optional[socket.socket]:
    """Connect, retrying while the guest boots, until ``deadline``;
    ``rcvbuf`` sets SO_RCVBUF first (it bounds the TCP window)."""
    while not stop.event.is_set():
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            s.settimeout(2)
            try:
                s.connect((host, port))
            except OSError:
                s.close()
                raise
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(0.5)
            return s
        except OSError as exc:
            if time.monotonic() > deadline:
                stop.fatal.append(f"cannot connect to {host}:{port}: {exc}")
                return None
            time.sleep(0.2)
    return None


def _read(host: str, port: int, what: str,
          checker: StreamChecker | BulkChecker, stop: _Stop,
          deadline: float, rcvbuf: int = 0) -> None:
    """Feed ``checker`` what a TCP connection to ``port`` receives."""
    s = _connect(host, port, stop, deadline, rcvbuf)
    while s is not None and not stop.event.is_set():
        try:
            data = s.recv(_BULK_READ)
        except socket.timeout:
            continue
        except OSError as exc:
            stop.fatal.append(f"{what} connection failed: {exc}")
            return
        if not data:
            stop.fatal.append(f"{what} connection closed by the guest")
            return
        checker.feed(data, time.monotonic())


def _rr(host: str, conn: int, checker: RRChecker, stop: _Stop,
        deadline: float, lock: threading.Lock) -> None:
    s = _connect(host, RR_PORT, stop, deadline)
    request = 0
    buf = b""
    while s is not None and not stop.event.is_set():
        request += 1
        sent = time.monotonic()
        try:
            s.sendall(b"REQ %d\n" % request)
            while b"\n" not in buf:
                try:
                    data = s.recv(4096)
                except socket.timeout:
                    if stop.event.is_set():
                        return
                    continue
                if not data:
                    stop.fatal.append(f"connection {conn} closed by the guest")
                    return
                buf += data
        except OSError as exc:
            stop.fatal.append(f"connection {conn} failed: {exc}")
            return
        line, buf = buf.split(b"\n", 1)
        now = time.monotonic()
        with lock:
            checker.reply(conn, request, request, line, now - sent, now)


def _udp(host: str, checker: UDPChecker, stop: _Stop) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(0.5)
    s.sendto(b"hello\n", (host, UDP_PORT))
    while not stop.event.is_set():
        try:
            data = s.recv(2048)
        except socket.timeout:
            if not checker.items:
                s.sendto(b"hello\n", (host, UDP_PORT))
            continue
        checker.datagram(data, time.monotonic())


def stop_when_stdin_closes(stop: threading.Event) -> None:
    """Set ``stop`` once stdin closes: the test that started the client
    (``NetClient.stop()``) or the test process itself is gone."""
    def watch() -> None:
        try:
            sys.stdin.read()
        finally:
            stop.set()

    threading.Thread(target=watch, daemon=True).start()


def write_status_file(path: str, status: dict[str, Any]) -> None:
    """Replace the status file at once: a reader sees the old or the new."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(status, f)
    os.replace(tmp, path)


def run(host: str, mode: str, status_path: str, seconds: float,
        connections: int = 1, connect_timeout: float = 120.0,
        rcvbuf: int = 0) -> int:
    """Run one client of ``mode`` against ``host`` until stdin closes or
    ``seconds`` pass; returns 0, or 1 when a check failed."""
    stop = _Stop()
    deadline = time.monotonic() + connect_timeout
    lock = threading.Lock()
    checker: Checker
    threads: list[threading.Thread] = []
    if mode == "stream":
        checker = StreamChecker()
        threads.append(threading.Thread(
            target=_read,
            args=(host, STREAM_PORT, "stream", checker, stop, deadline)))
    elif mode == "rr":
        checker = RRChecker()
        for conn in range(connections):
            threads.append(threading.Thread(
                target=_rr, args=(host, conn, checker, stop, deadline, lock)))
    elif mode == "udp":
        checker = UDPChecker()
        threads.append(threading.Thread(target=_udp,
                                        args=(host, checker, stop)))
    elif mode == "bulk":
        checker = BulkChecker()
        threads.append(threading.Thread(
            target=_read, args=(host, BULK_PORT, "bulk", checker, stop,
                                deadline, rcvbuf)))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    for t in threads:
        t.daemon = True
        t.start()

    stop_when_stdin_closes(stop.event)
    started = time.monotonic()

    def write_status(done: bool) -> None:
        with lock:
            st = checker.status()
        st.update(mode=mode, done=done, fatal=list(stop.fatal),
                  elapsed=round(time.monotonic() - started, 3))
        write_status_file(status_path, st)

    while not stop.event.is_set():
        if seconds and time.monotonic() - started >= seconds:
            break
        write_status(False)
        stop.event.wait(0.2)
    stop.event.set()
    for t in threads:
        t.join(timeout=2)
    write_status(True)
    return 1 if (checker.error_count or stop.fatal) else 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--mode", required=True,
                    choices=("stream", "rr", "udp", "bulk"))
    ap.add_argument("--status", required=True, help="JSON status file")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="stop after this long (default: when stdin closes)")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--rcvbuf", type=int, default=0,
                    help="SO_RCVBUF of the bulk connection (bytes)")
    args = ap.parse_args(argv)
    return run(args.host, args.mode, args.status, args.seconds,
               args.connections, rcvbuf=args.rcvbuf)


if __name__ == "__main__":
    sys.exit(main())
