# SPDX-License-Identifier: GPL-2.0-or-later
"""A TCP man-in-the-middle between a Curling sender and its receiver.

``CurlingProxy`` listens on 127.0.0.1, accepts one connection (the
sender's ``migrate`` to ``curling:tcp:127.0.0.1:<proxy.port>``), connects
to the receiver's port and forwards both directions.  It watches the
receiver-to-sender direction for the READY acknowledgement; the sender
sends nothing after the first round until READY arrives, so every byte
from the sender after it belongs to a Curling frame, and the proxy parses
them as frames (a 32-byte header, then the payload)::

  u32 magic "CURL", u32 type, u64 sequence, u64 payload length,
  u32 CRC32C(payload), u32 CRC32C(first 28 header bytes)

On command (``arm_*``) it spoils one frame on the way:

* ``arm_corrupt``: flip one byte in the payload of a checkpoint (its
  checksum no longer matches);
* ``arm_garbage``: replace a whole frame by random bytes of its length;
* ``arm_cut``: close both connections after a chosen number of bytes of a
  frame: none of it (between frames), part of the header, part of the
  payload, or all of it;
* ``arm_rewrite``: hold a whole checkpoint, pass its payload through a
  function of the test and forward the result with a header and
  checksums that match it: a frame the receiver can verify but whose
  contents are wrong.

Everything runs in one thread; every wait is bounded and ``stop()`` ends
it.  Only 127.0.0.1 is ever used.

It can also stop at a moment of the protocol and tell the test:

* ``hold``: keep back, from the next READY or COMMIT acknowledgement on,
  everything the receiver sends, until ``release``: the sender waits for
  that acknowledgement as long as the test likes;
* ``notify_checkpoint``: report the moment the last byte of the next
  checkpoint went to the receiver, which then applies it.

Run as a program (``curling_proxy.py TARGET_PORT [PORT]``), it forwards
one connection and prints the port it listens on: a link of its own
between two QEMUs, in whatever network namespace it was started.  Stopping
that process (SIGSTOP) partitions the link, no byte passing either way and
both connections left open; SIGCONT heals it.  It reads commands on its
standard input, one a line (``hold ready``, ``hold commit``, ``release``,
``notify checkpoint``), and prints what happened, one event a line
(``held ready``, ``held commit N``, ``forwarded checkpoint N``).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import selectors
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Optional

FRAME_MAGIC = 0x4355524C     # "CURL"
ACK_MAGIC = 0x4341434B       # "CACK"
FRAME_HDR_SIZE = 32
ACK_SIZE = 20

CHECKPOINT, HEARTBEAT, CANCEL, SETTINGS = 1, 2, 3, 4
ACK_READY, ACK_COMMIT, ACK_CANCEL = 1, 2, 3
FRAME_TYPES = {CHECKPOINT: "checkpoint", HEARTBEAT: "heartbeat",
               CANCEL: "cancel", SETTINGS: "settings"}

HOST = "127.0.0.1"
#: Seconds the proxy waits for the sender to connect.
ACCEPT_TIMEOUT = 120.0
#: Seconds a blocked send to either side may take.
SEND_TIMEOUT = 30.0


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0xFFFFFFFF) -> int:
    """QEMU's ``crc32c(0xffffffff, data, len)`` (util/crc32c.c)."""
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def make_ack(ack_type: int, sequence: int) -> bytes:
    head = struct.pack(">IIQ", ACK_MAGIC, ack_type, sequence)
    return head + struct.pack(">I", crc32c(head))


READY_ACK = make_ack(ACK_READY, 0)

# A checkpoint's payload: u64 length of the RAM part, the RAM part (RAM
# sections of a migration stream, then QEMU_VM_EOF), the device part (the
# other devices' sections, then QEMU_VM_EOF).
VM_EOF, SECTION_PART, SECTION_END, SECTION_FULL = 0x00, 0x02, 0x03, 0x04
SECTION_FOOTER = 0x7E
RAM_ZERO, RAM_PAGE, RAM_EOS, RAM_CONTINUE = 0x02, 0x08, 0x10, 0x20
PAGE_SIZE = 4096


def split_checkpoint(payload: bytes) -> tuple[bytes, bytes]:
    """(RAM part, device part) of a checkpoint's payload."""
    ram_len = struct.unpack_from(">Q", payload)[0]
    return payload[8:8 + ram_len], payload[8 + ram_len:]


# Disk records of the "curling-disk" section, which follows RAM in the
# RAM part: a 64-bit offset and flags word, then a counted drive name
# (DRIVE), a 64-bit size (SIZE), or a 32-bit length and the data (DATA).
DISK_DATA, DISK_DRIVE, DISK_EOS, DISK_SIZE = 0x01, 0x04, 0x08, 0x20
DISK_FLAG_MASK = 0xffff


def skip_disk_records(ram: bytes, pos: int) -> int:
    """Offset in ``ram`` just past the disk records starting at ``pos``."""
    while True:
        flags = struct.unpack_from(">Q", ram, pos)[0] & DISK_FLAG_MASK
        pos += 8
        if flags & DISK_DRIVE:
            pos += 1 + ram[pos]
        if flags & DISK_SIZE:
            pos += 8
            continue
        if flags & DISK_EOS:
            return pos
        length = struct.unpack_from(">I", ram, pos)[0]
        pos += 4 + (length if flags & DISK_DATA else 0)


def skip_section_data(ram: bytes, pos: int, section: int) -> int:
    """Offset in ``ram`` just past the data, starting at ``pos``, of the
    section ``section`` of the RAM part that is not RAM: the display's
    registers (a 32-bit length and that many bytes, then the section's
    footer) or disk records."""
    length = struct.unpack_from(">I", ram, pos)[0]
    end = pos + 4 + length
    if ram[end:end + 5] == bytes([SECTION_FOOTER]) + struct.pack(">I",
                                                                 section):
        return end
    return skip_disk_records(ram, pos)


def ram_page_records(ram: bytes) -> list[int]:
    """Offsets in ``ram`` of every page record (its 64-bit address and
    flags word), parsed as the receiver parses them.  The RAM section is
    the first of the part; the others are disk or display sections."""
    records = []
    pos = 0
    ram_section = struct.unpack_from(">I", ram, 1)[0]
    while ram[pos] != VM_EOF:
        assert ram[pos] in (SECTION_PART, SECTION_END), ram[pos]
        section = struct.unpack_from(">I", ram, pos + 1)[0]
        pos += 5                            # section type and id
        if section != ram_section:
            pos = skip_section_data(ram, pos, section) + 5  # and footer
            continue
        while True:
            flags = struct.unpack_from(">Q", ram, pos)[0] & (PAGE_SIZE - 1)
            if flags & ~RAM_CONTINUE == RAM_EOS:
                pos += 8
                break
            records.append(pos)
            pos += 8
            if not flags & RAM_CONTINUE:
                pos += 1 + ram[pos]         # the RAM block's name
            pos += 1 if flags & RAM_ZERO else PAGE_SIZE
        pos += 5                            # section footer
    return records


def break_ram_record(payload: bytes) -> bytes:
    """The payload with the page record in the middle of its RAM part made
    invalid (both zero and whole page): the pages before it are fine."""
    ram, devices = split_checkpoint(payload)
    records = ram_page_records(ram)
    assert len(records) >= 2, f"only {len(records)} RAM pages"
    at = 8 + records[len(records) // 2] + 7     # the word's last byte
    out = bytearray(payload)
    out[at] |= RAM_ZERO | RAM_PAGE
    return bytes(out)


_SECTION_RE = re.compile(
    rb"\x7e[\x00-\xff]{4}\x04[\x00-\xff]{4}([\x01-\x7f])")


def break_device_section(payload: bytes) -> bytes:
    """The payload with the device section nearest the middle of its
    device part claiming a version no QEMU supports: loading the device
    part fails half-way."""
    ram, devices = split_checkpoint(payload)
    starts = []
    for m in _SECTION_RE.finditer(devices):
        name = devices[m.end():m.end() + m[1][0]]
        if len(name) == m[1][0] and re.fullmatch(rb"[\w/:.,-]+", name):
            starts.append(m.end() + len(name) + 4)   # its version_id
    assert len(starts) >= 2, "no device section in the middle"
    at = 8 + len(ram) + min(starts,
                            key=lambda x: abs(x - len(devices) // 2))
    return payload[:at] + b"\xff\xff\x00\x01" + payload[at + 4:]


@dataclasses.dataclass
class Frame:
    """A frame header the proxy has seen from the sender."""

    type: int
    sequence: int
    length: int
    offset: int                 # of its first byte in the frame stream
    time: float                 # time.monotonic() when its header was whole

    @property
    def type_name(self) -> str:
        return FRAME_TYPES.get(self.type, f"type {self.type}")

    @property
    def size(self) -> int:
        return FRAME_HDR_SIZE + self.length


@dataclasses.dataclass
class Action:
    """A spoiling action the test armed; ``result`` once it was done."""

    kind: str                   # corrupt | garbage | cut | rewrite
    frame_type: int = CHECKPOINT
    min_sequence: int = 0
    cut: str = ""               # before | header | payload | after
    rst: bool = False           # close with a reset instead of a FIN
    rewrite: Optional[Callable[[bytes], bytes]] = None
    result: Optional[dict[str, Any]] = None


class CurlingProxy:
    """One sender-to-receiver connection through 127.0.0.1."""

    def __init__(self, target_port: int, log: Optional[logging.Logger] = None,
                 rng: Optional[random.Random] = None,
                 name: str = "proxy", port: int = 0) -> None:
        self.target_port = target_port
        self.log = log or logging.getLogger("curling_proxy")
        self.rng = rng or random.Random()
        self.name = name
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((HOST, port))
        self._listener.listen(1)
        self.port: int = self._listener.getsockname()[1]

        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.ready = threading.Event()       # READY seen from the receiver
        self.closed = threading.Event()      # both connections are gone
        self.action_done = threading.Event()
        self.error: Optional[str] = None     # what went wrong in the proxy
        self.close_reason = ""

        self._thread: Optional[threading.Thread] = None
        self._up: Optional[socket.socket] = None    # from the sender
        self._down: Optional[socket.socket] = None  # to the receiver

        # sender -> receiver
        self.first_round_bytes = 0
        self.frame_bytes = 0                 # frame stream forwarded
        self.frames: list[Frame] = []        # every header completed
        self.last_checkpoint = 0             # last checkpoint forwarded whole
        self._hdr = bytearray()
        self._frame: Optional[Frame] = None
        self._pos = 0                        # position in the current frame
        self._flip: Optional[tuple[int, int]] = None  # (payload offset, mask)
        self._garbage = False
        self._cut_at: Optional[int] = None
        self._held: Optional[bytearray] = None  # frame held for a rewrite
        self._passthrough = False            # lost track of frames
        # receiver -> sender
        self._acks = bytearray()
        self._ack_stream = bytearray()
        self.acks: list[tuple[int, int]] = []  # (type, sequence) after READY
        # Held back from the sender: ordered with the pump's forwarding
        self._up_lock = threading.Lock()
        self._hold: Optional[int] = None      # hold from the next such ack
        self._held_up: Optional[bytearray] = None
        self._notify = False                  # report the next checkpoint
        self._notified: Optional[int] = None  # ... which was just ended
        #: Called with each event (``held ready``...), in the proxy thread.
        self.on_event: Callable[[str], None] = self._log_event

        self._action: Optional[Action] = None
        # a stream the proxy cannot parse (TLS): a sample, a cut by count
        self.sample_limit = 0
        self.sample = bytearray()            # the sender's first bytes
        self._raw_cut: Optional[tuple[int, bool]] = None  # (bytes, rst)

    # -- lifetime --------------------------------------------------------

    def start(self) -> "CurlingProxy":
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"{self.name}-{self.port}")
        self._thread.start()
        self.log.info("%s: 127.0.0.1:%d -> 127.0.0.1:%d", self.name,
                      self.port, self.target_port)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._close_all("stopped", rst=False)
        try:
            self._listener.close()
        except OSError:
            pass

    def __enter__(self) -> "CurlingProxy":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def uri(self) -> str:
        return f"curling:tcp:{HOST}:{self.port}"

    # -- commands from the test -------------------------------------------

    def arm_corrupt(self, min_sequence: int = 0) -> Action:
        """Flip one payload byte of the first checkpoint numbered
        ``min_sequence`` or more."""
        return self._arm(Action("corrupt", CHECKPOINT, min_sequence))

    def arm_garbage(self, min_sequence: int = 0,
                    frame_type: int = CHECKPOINT) -> Action:
        """Replace the first matching frame, header and payload, by random
        bytes of the same length."""
        return self._arm(Action("garbage", frame_type, min_sequence))

    def arm_cut(self, cut: str, min_sequence: int = 0,
                frame_type: int = CHECKPOINT, rst: bool = False) -> Action:
        """Close both connections inside the first matching frame.

        ``cut`` says how much of the frame the receiver gets: ``before``
        none of it, ``header`` 1..31 bytes, ``payload`` the header and
        part of the payload, ``after`` all of it.  ``rst`` closes with a
        TCP reset rather than a FIN.
        """
        assert cut in ("before", "header", "payload", "after"), cut
        return self._arm(Action("cut", frame_type, min_sequence, cut, rst))

    def arm_rewrite(self, rewrite: Callable[[bytes], bytes],
                    min_sequence: int = 0) -> Action:
        """Replace the payload of the first checkpoint numbered
        ``min_sequence`` or more by ``rewrite(payload)``, with a header
        and checksums that match the new payload."""
        return self._arm(Action("rewrite", CHECKPOINT, min_sequence,
                                rewrite=rewrite))

    def arm_raw_cut(self, after: int, rst: bool = False) -> Action:
        """Close both connections once ``after`` more bytes came from the
        sender, whatever they are: for a stream the proxy cannot parse
        (TLS).  The result gives the sender's bytes forwarded."""
        action = self._arm(Action("raw-cut", rst=rst))
        with self._lock:
            self._raw_cut = (self.first_round_bytes + self.frame_bytes +
                             after, rst)
        return action

    def hold(self, what: str) -> None:
        """Hold back everything the receiver sends from its next READY
        (``ready``, before it came) or COMMIT (``commit``) on: from its
        first byte, or from the first byte of the segment that completes
        it if it began in one forwarded already."""
        kind = {"ready": ACK_READY, "commit": ACK_COMMIT}[what]
        with self._up_lock:
            self._hold = kind

    def release(self) -> None:
        """Forward what was held back, and hold nothing more."""
        with self._up_lock:
            self._hold = None
            held, self._held_up = self._held_up, None
            if held:
                self._send(self._up, bytes(held))
        self.log.info("%s: released %d bytes", self.name,
                      len(held) if held else 0)

    def notify_checkpoint(self) -> None:
        """Report (``forwarded checkpoint N``) once the last byte of the
        next checkpoint went to the receiver."""
        self._notify = True

    def _log_event(self, event: str) -> None:
        self.log.info("%s: %s", self.name, event)

    def _arm(self, action: Action) -> Action:
        with self._lock:
            if self._action is not None and self._action.result is None:
                raise RuntimeError(f"{self.name}: an action is armed already")
            self.action_done.clear()
            self._action = action
        self.log.info("%s: armed %s", self.name, action)
        return action

    def wait_action(self, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until the armed action was carried out; its result."""
        if not self.action_done.wait(timeout):
            raise AssertionError(
                f"{self.name}: the armed action did not happen within "
                f"{timeout:g} s (frames seen: {len(self.frames)}, "
                f"closed: {self.close_reason or 'no'}, error: {self.error})")
        assert self._action is not None and self._action.result is not None
        return self._action.result

    def wait_ready(self, timeout: float = 120.0) -> None:
        if not self.ready.wait(timeout):
            raise AssertionError(f"{self.name}: no READY from the receiver "
                                 f"within {timeout:g} s")

    def wait_closed(self, timeout: float = 30.0) -> str:
        if not self.closed.wait(timeout):
            raise AssertionError(f"{self.name}: connections still open after "
                                 f"{timeout:g} s")
        return self.close_reason

    # -- the proxy thread ------------------------------------------------

    def _run(self) -> None:
        try:
            self._accept()
            if self._up is not None and self._down is not None:
                self._pump()
        except Exception as exc:  # reported, not raised, in a thread
            self.error = f"{type(exc).__name__}: {exc}"
            self.log.exception("%s failed", self.name)
        finally:
            self._close_all(self.close_reason or "proxy thread ended",
                            rst=False)

    def _accept(self) -> None:
        deadline = time.monotonic() + ACCEPT_TIMEOUT
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                up, peer = self._listener.accept()
                break
            except socket.timeout:
                if time.monotonic() > deadline:
                    self.close_reason = "nobody connected"
                    return
        else:
            return
        assert peer[0] == HOST, peer
        self._listener.close()       # one connection only
        down = socket.create_connection((HOST, self.target_port), timeout=10)
        for s in (up, down):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(SEND_TIMEOUT)
        with self._lock:
            self._up, self._down = up, down
        self.log.info("%s: sender %s:%d connected, receiver connected",
                      self.name, *peer)

    def _pump(self) -> None:
        sel = selectors.DefaultSelector()
        assert self._up is not None and self._down is not None
        sel.register(self._up, selectors.EVENT_READ, "up")
        sel.register(self._down, selectors.EVENT_READ, "down")
        try:
            while not self._stop.is_set() and not self.closed.is_set():
                for key, _ in sel.select(timeout=0.2):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        data = sock.recv(256 * 1024)
                    except OSError as exc:
                        self._close_all(f"{key.data}: {exc}", rst=False)
                        return
                    if not data:
                        side = "sender" if key.data == "up" else "receiver"
                        self._close_all(f"{side} closed the connection",
                                        rst=False)
                        return
                    if key.data == "up":
                        self._from_sender(data)
                    else:
                        self._from_receiver(data)
                    if self.closed.is_set():
                        return
        finally:
            sel.close()

    def _send(self, sock: Optional[socket.socket], data: bytes) -> None:
        if not data or sock is None or self.closed.is_set():
            return
        try:
            sock.sendall(data)
        except OSError as exc:
            self._close_all(f"sending: {exc}", rst=False)

    def _close_all(self, reason: str, rst: bool) -> None:
        with self._lock:
            socks = [s for s in (self._up, self._down) if s is not None]
            self._up = self._down = None
            if not self.close_reason:
                self.close_reason = reason
        for s in socks:
            try:
                if rst:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, 0))
                s.close()
            except OSError:
                pass
        if socks:
            self.log.info("%s: closed (%s%s)", self.name, reason,
                          ", reset" if rst else "")
        self.closed.set()

    # -- receiver -> sender: find READY, then read acknowledgements -------

    def _from_receiver(self, data: bytes) -> None:
        with self._up_lock:
            at = self._scan_acks(data)
            if self._held_up is not None:
                self._held_up += data
                return
            if at is not None:
                self._held_up = bytearray(data[at:])
                data = data[:at]
            self._send(self._up, data)

    def _scan_acks(self, data: bytes) -> Optional[int]:
        """Record the acknowledgements in ``data``; the offset in it where
        the one to hold starts, if it is there."""
        at = None
        if not self.ready.is_set():
            self._ack_stream += data
            i = self._ack_stream.find(READY_ACK)
            if i < 0:
                del self._ack_stream[:-ACK_SIZE]
                return None
            # Nothing of the sender's can be in flight: it waits for
            # this READY, which is not forwarded yet.
            self.ready.set()
            self.log.info("%s: READY after %d bytes of first round",
                          self.name, self.first_round_bytes)
            if self._hold == ACK_READY:
                self._hold = None
                at = max(0, i - (len(self._ack_stream) - len(data)))
                self.on_event("held ready")
            self._acks += self._ack_stream[i + ACK_SIZE:]
            self._ack_stream.clear()
            skip = len(data) - len(self._acks)
        else:
            skip = -len(self._acks)
            self._acks += data
        pos = 0
        while len(self._acks) - pos >= ACK_SIZE:
            magic, typ, seq, _crc = struct.unpack_from(">IIQI", self._acks,
                                                       pos)
            if magic == ACK_MAGIC:
                self.acks.append((typ, seq))
                if typ == self._hold and at is None:
                    self._hold = None
                    at = max(0, skip + pos)
                    self.on_event(f"held commit {seq}")
            pos += ACK_SIZE
        del self._acks[:pos]
        return at

    # -- sender -> receiver: frames ---------------------------------------

    def _from_sender(self, data: bytes) -> None:
        if len(self.sample) < self.sample_limit:
            self.sample += data[:self.sample_limit - len(self.sample)]
        if self._raw_cut is not None:
            limit, rst = self._raw_cut
            total = self.first_round_bytes + self.frame_bytes
            if total + len(data) >= limit:
                self._raw_cut = None
                self._send(self._down, data[:limit - total])
                self.first_round_bytes += limit - total
                assert self._action is not None
                self._action.result = {"forwarded": limit, "rst": rst}
                self._close_all("raw cut", rst=rst)
                self.action_done.set()
                return
        if not self.ready.is_set() or self._passthrough:
            if not self.ready.is_set():
                self.first_round_bytes += len(data)
            else:
                self.frame_bytes += len(data)
            self._send(self._down, data)
            return
        out = bytearray()
        view = memoryview(data)
        while len(view) and not self.closed.is_set():
            if self._frame is None:
                take = min(FRAME_HDR_SIZE - len(self._hdr), len(view))
                self._hdr += view[:take]
                view = view[take:]
                if len(self._hdr) < FRAME_HDR_SIZE:
                    break
                if not self._new_frame(out):
                    out += view
                    break
                continue
            frame = self._frame
            take = min(frame.size - self._pos, len(view))
            chunk = bytearray(view[:take])
            view = view[take:]
            start = self._pos
            if self._held is not None:
                self._held += chunk
                self._pos += len(chunk)
                if self._pos == frame.size:
                    out += self._rewritten(frame)
                    self._end_frame()
                continue
            if self._garbage:
                chunk = bytearray(self.rng.randbytes(len(chunk)))
            if self._flip is not None:
                off, mask = self._flip
                rel = FRAME_HDR_SIZE + off - start
                if 0 <= rel < len(chunk):
                    chunk[rel] ^= mask
            if self._cut_at is not None and start + len(chunk) >= self._cut_at:
                out += chunk[:self._cut_at - start]
                self._pos = self._cut_at
                self._do_cut(out)
                return
            out += chunk
            self._pos += len(chunk)
            if self._pos == frame.size:
                self._end_frame()
        if self.closed.is_set():
            return
        self.frame_bytes += len(out)
        self._send(self._down, bytes(out))
        if self._notified is not None and not self.closed.is_set():
            self.on_event(f"forwarded checkpoint {self._notified}")
            self._notified = None

    def _new_frame(self, out: bytearray) -> bool:
        """A frame header is whole in ``self._hdr``: record it, apply any
        armed action to it, and put what is forwarded of it in ``out``.
        False when the stream is not made of frames after all."""
        hdr = bytes(self._hdr)
        self._hdr.clear()
        magic, typ, seq, length, _pcrc, hcrc = struct.unpack(">IIQQII", hdr)
        if magic != FRAME_MAGIC or hcrc != crc32c(hdr[:28]):
            self.error = (f"not a frame header after {self.frame_bytes} bytes "
                          f"of frames: {hdr.hex()}")
            self.log.error("%s: %s; forwarding as is", self.name, self.error)
            self._passthrough = True
            out += hdr
            return False
        frame = Frame(typ, seq, length, self.frame_bytes + len(out),
                      time.monotonic())
        self.frames.append(frame)
        self._frame = frame
        self._pos = 0
        self._flip = None
        self._garbage = False
        self._cut_at = None

        with self._lock:
            action = self._action
            if action is not None and (action.result is not None or
                                       frame.type != action.frame_type or
                                       frame.sequence < action.min_sequence):
                action = None
        result: dict[str, Any] = {}
        if action is not None and action.kind == "corrupt" and length > 0:
            off = self.rng.randrange(length)
            mask = self.rng.randrange(1, 256)
            self._flip = (off, mask)
            result = {"payload_offset": off, "mask": mask}
        elif action is not None and action.kind == "garbage":
            self._garbage = True
            hdr = self.rng.randbytes(FRAME_HDR_SIZE)
            if hdr[:4] == struct.pack(">I", FRAME_MAGIC):
                hdr = b"\0" + hdr[1:]
            result = {"garbage_bytes": frame.size}
        elif action is not None and action.kind == "rewrite":
            self._held = bytearray()
            result = {"rewrite": True}
        elif action is not None and action.kind == "cut":
            if action.cut == "before":
                self._cut_at = 0
            elif action.cut == "header":
                self._cut_at = self.rng.randrange(1, FRAME_HDR_SIZE)
            elif action.cut == "payload" and length > 0:
                self._cut_at = FRAME_HDR_SIZE + self.rng.randrange(length)
            elif action.cut == "after":
                self._cut_at = frame.size
            if self._cut_at is not None:
                result = {"cut_at": self._cut_at, "cut": action.cut,
                          "rst": action.rst}
        if result:
            assert action is not None
            # The last checkpoint the receiver will have whole.
            whole = frame.type == CHECKPOINT and (
                action.kind == "cut" and self._cut_at == frame.size)
            result.update(kind=action.kind, frame_type=frame.type_name,
                          sequence=frame.sequence, length=frame.length,
                          committed=frame.sequence if whole
                          else self.last_checkpoint,
                          stream_offset=frame.offset,
                          frames_before=len(self.frames) - 1)
            self.log.info("%s: %s on %s %d (%d bytes): %s", self.name,
                          action.kind, frame.type_name, frame.sequence,
                          frame.length, result)
            with self._lock:
                action.result = result
            if action.kind != "cut":
                self.action_done.set()
        if self._cut_at is not None and self._cut_at <= FRAME_HDR_SIZE:
            out += hdr[:self._cut_at]
            self._pos = self._cut_at
            self._do_cut(out)
            return True
        self._pos = FRAME_HDR_SIZE
        if self._held is not None:
            if self._pos == frame.size:
                out += self._rewritten(frame)
                self._end_frame()
            return True
        out += hdr
        if self._pos == frame.size:
            self._end_frame()
        return True

    def _rewritten(self, frame: Frame) -> bytes:
        """The held frame, its payload rewritten, with a matching header."""
        assert self._held is not None and self._action is not None
        assert self._action.rewrite is not None
        payload = self._action.rewrite(bytes(self._held))
        head = struct.pack(">IIQQI", FRAME_MAGIC, frame.type, frame.sequence,
                           len(payload), crc32c(payload))
        self.log.info("%s: rewrote %s %d: %d -> %d bytes", self.name,
                      frame.type_name, frame.sequence, frame.length,
                      len(payload))
        return head + struct.pack(">I", crc32c(head)) + payload

    def _end_frame(self) -> None:
        assert self._frame is not None
        if (self._frame.type == CHECKPOINT and not self._garbage and
                self._flip is None and self._held is None):
            self.last_checkpoint = self._frame.sequence
            if self._notify:
                self._notify = False
                self._notified = self._frame.sequence
        self._frame = None
        self._held = None
        self._pos = 0

    def _do_cut(self, out: bytearray) -> None:
        """Forward ``out``, then close both sides at once."""
        assert self._frame is not None and self._action is not None
        self.frame_bytes += len(out)
        self._send(self._down, bytes(out))
        reason = (f"cut after {self._pos} of the {self._frame.size} bytes of "
                  f"{self._frame.type_name} {self._frame.sequence}")
        if self._pos == self._frame.size:
            self._end_frame()
        self._close_all(reason, rst=self._action.rst)
        self.action_done.set()


def main(argv: list[str]) -> int:
    """Forward one connection to 127.0.0.1:TARGET_PORT until either side
    closes it; print the listening port first."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(message)s")
    proxy = CurlingProxy(int(argv[0]), port=int(argv[1]) if argv[1:] else 0,
                         name="link")
    printing = threading.Lock()

    def say(event: str) -> None:
        proxy.log.info("link: %s", event)
        with printing:
            print(event, flush=True)

    def commands() -> None:
        for line in sys.stdin:
            words = line.split()
            proxy.log.info("link: command %s", words)
            if words[:1] == ["hold"] and len(words) == 2:
                proxy.hold(words[1])
            elif words == ["release"]:
                proxy.release()
            elif words == ["notify", "checkpoint"]:
                proxy.notify_checkpoint()
            else:
                proxy.log.error("link: unknown command %r", line)

    proxy.on_event = say
    print(proxy.port, flush=True)
    threading.Thread(target=commands, daemon=True).start()
    proxy.start()
    try:
        while not proxy.closed.wait(0.5):
            if proxy._thread is not None and not proxy._thread.is_alive():
                break
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
