# SPDX-License-Identifier: GPL-2.0-or-later
"""The functional tests' link (tests/avocado/curling_proxy.py): it holds
the receiver's READY or a COMMIT on command, and reports the moment a
checkpoint went to the receiver, byte-exact, whatever the segments."""

from __future__ import annotations

import importlib.util
import socket
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

PROXY = (Path(__file__).resolve().parents[1] / "avocado" /
         "curling_proxy.py")


def load_proxy() -> ModuleType:
    spec = importlib.util.spec_from_file_location("curling_proxy", PROXY)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("curling_proxy", module)
    spec.loader.exec_module(module)
    return module


cp = load_proxy()


def frame(typ: int, seq: int, payload: bytes) -> bytes:
    head = struct.pack(">IIQQI", cp.FRAME_MAGIC, typ, seq, len(payload),
                       cp.crc32c(payload))
    return head + struct.pack(">I", cp.crc32c(head)) + payload


class Pair:
    """A CurlingProxy between socket pairs standing for the sender and the
    receiver; the test feeds it what each side sends, as its thread would."""

    def __init__(self) -> None:
        self.proxy = cp.CurlingProxy(1)
        self.events: list[str] = []
        self.proxy.on_event = self.events.append
        self.sender, up = socket.socketpair()
        self.receiver, down = socket.socketpair()
        self.proxy._up, self.proxy._down = up, down
        self.socks = [self.sender, self.receiver, up, down]
        for s in self.socks:
            s.settimeout(5)

    def from_receiver(self, data: bytes) -> None:
        self.proxy._from_receiver(data)

    def from_sender(self, data: bytes) -> None:
        self.proxy._from_sender(data)

    @staticmethod
    def recv_exact(sock: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "closed"
            data += chunk
        return data

    @staticmethod
    def nothing_for(sock: socket.socket) -> None:
        sock.setblocking(False)
        with pytest.raises(BlockingIOError):
            sock.recv(1)
        sock.settimeout(5)

    def close(self) -> None:
        self.proxy.stop()
        for s in self.socks:
            s.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    p = Pair()
    yield p
    p.close()


def first_round(pair: Pair) -> None:
    """The first round's bytes go through; READY comes back."""
    pair.from_sender(b"first round")
    assert pair.recv_exact(pair.receiver, 11) == b"first round"


def test_forwards_ready_and_acks(pair: Pair) -> None:
    first_round(pair)
    commit = cp.make_ack(cp.ACK_COMMIT, 1)
    pair.from_receiver(cp.READY_ACK + commit)
    assert pair.recv_exact(pair.sender, 40) == cp.READY_ACK + commit
    assert pair.proxy.acks == [(cp.ACK_COMMIT, 1)]
    assert pair.events == []


def test_holds_ready_until_released(pair: Pair) -> None:
    pair.proxy.hold("ready")
    first_round(pair)
    # READY split across two segments, a byte of something before it
    pair.from_receiver(b"x" + cp.READY_ACK[:7])
    pair.from_receiver(cp.READY_ACK[7:])
    assert pair.events == ["held ready"]
    # What came before the segment that completed it went on: the sender
    # cannot act on part of an acknowledgement
    assert pair.recv_exact(pair.sender, 8) == b"x" + cp.READY_ACK[:7]
    pair.nothing_for(pair.sender)
    pair.proxy.release()
    assert pair.recv_exact(pair.sender, 13) == cp.READY_ACK[7:]


def test_holds_the_next_commit_and_what_follows(pair: Pair) -> None:
    first_round(pair)
    pair.from_receiver(cp.READY_ACK + cp.make_ack(cp.ACK_COMMIT, 1))
    pair.recv_exact(pair.sender, 40)
    pair.proxy.hold("commit")
    second, third = cp.make_ack(cp.ACK_COMMIT, 2), cp.make_ack(cp.ACK_COMMIT,
                                                               3)
    # The acknowledgement before it in the same segment still goes
    pair.from_receiver(cp.make_ack(cp.ACK_CANCEL, 0)[:5])
    pair.from_receiver(cp.make_ack(cp.ACK_CANCEL, 0)[5:] + second)
    assert pair.events == ["held commit 2"]
    assert pair.recv_exact(pair.sender, 20) == cp.make_ack(cp.ACK_CANCEL, 0)
    pair.from_receiver(third)
    pair.nothing_for(pair.sender)
    pair.proxy.release()
    assert pair.recv_exact(pair.sender, 40) == second + third
    assert pair.proxy.acks[-2:] == [(cp.ACK_COMMIT, 2), (cp.ACK_COMMIT, 3)]


def test_reports_a_forwarded_checkpoint(pair: Pair) -> None:
    first_round(pair)
    pair.from_receiver(cp.READY_ACK)
    pair.recv_exact(pair.sender, 20)
    beat = frame(cp.HEARTBEAT, 0, b"")
    pair.from_sender(beat)
    pair.recv_exact(pair.receiver, len(beat))
    pair.proxy.notify_checkpoint()
    checkpoint = frame(cp.CHECKPOINT, 1, bytes(range(256)) * 64)
    pair.from_sender(checkpoint[:1000])
    assert pair.recv_exact(pair.receiver, 1000) == checkpoint[:1000]
    assert pair.events == []
    pair.from_sender(checkpoint[1000:] + beat)
    assert pair.events == ["forwarded checkpoint 1"]
    rest = pair.recv_exact(pair.receiver, len(checkpoint) - 1000 + len(beat))
    assert rest == checkpoint[1000:] + beat
    # Once only
    pair.from_sender(frame(cp.CHECKPOINT, 2, b"x"))
    pair.recv_exact(pair.receiver, cp.FRAME_HDR_SIZE + 1)
    assert pair.events == ["forwarded checkpoint 1"]


def test_page_records_past_disk_and_display_sections() -> None:
    """The RAM part's page records are found past the disk records and the
    display's registers that share it, as the receiver walks them."""
    def section(kind: int, sid: int, data: bytes) -> bytes:
        return (bytes([kind]) + struct.pack(">I", sid) + data +
                bytes([cp.SECTION_FOOTER]) + struct.pack(">I", sid))

    page = struct.pack(">Q", 0x1000 | cp.RAM_PAGE) + b"\x03pc." + bytes(
        cp.PAGE_SIZE)
    zero = struct.pack(">Q", 0x2000 | cp.RAM_ZERO | cp.RAM_CONTINUE) + b"\0"
    eos = struct.pack(">Q", cp.RAM_EOS)
    ram_data = page + zero + eos
    disk = (struct.pack(">Q", 0x10000 | 0x01 | 0x04) + b"\x05disk0" +
            struct.pack(">I", 4) + b"abcd" + struct.pack(">Q", 0x08))
    display = struct.pack(">I", 6) + b"\x7e\0\0\0\x03x"
    ram = (section(cp.SECTION_PART, 2, ram_data) +
           section(cp.SECTION_END, 7, disk) +
           section(cp.SECTION_END, 8, display) +
           section(cp.SECTION_END, 2, ram_data) +
           section(cp.SECTION_END, 8, struct.pack(">I", 0)) +
           bytes([cp.VM_EOF]))
    second = 5 + len(ram_data) + 5 + 5 + len(disk) + 5 + 5 + len(display) + 5
    assert cp.ram_page_records(ram) == [
        5, 5 + len(page), second + 5, second + 5 + len(page)]
