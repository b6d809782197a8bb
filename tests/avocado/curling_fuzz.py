# SPDX-License-Identifier: GPL-2.0-or-later
"""Frame-level fuzzing of a Curling receiver.

``record()`` protects a small VM (firmware only, no guest kernel: its
checkpoints are small, its device state is a real PC's) through a
``CurlingProxy`` and keeps what the sender sent: the first round and the
frames after it.  ``Fuzzer`` then replays that stream to fresh receivers,
one session each: the first round, ``k`` good checkpoints (each waited
for by its acknowledgement), then one spoiled frame, and watches what the
receiver makes of it.

Spoiled frames, by kind (``MUTATIONS``):

* damaged: bits flipped anywhere in the frame, checksums left as they
  were; or a header field (magic, type, sequence, length, either
  checksum) set to another value, the header checksum made to match,
  so that the receiver must catch it by meaning: an error, no failover,
  the last good checkpoint ``k`` kept;
* truncated: the frame cut at a random byte, then the connection closed
  (FIN or reset) or left silent: failover from checkpoint ``k``, or
  ``k + 1`` when the cut fell after the last byte;
* forged: bytes of the RAM part (or of its length) changed, and both
  checksums made to match, as only someone who can write to the
  connection could (which is what TLS prevents).  Curling walks the RAM
  part before it applies any of it: the receiver must not crash or
  hang; it applies the forged checkpoint ``k + 1`` and fails over from
  it, reports an error, or exits with an error when nothing whole is
  left to resume.  Forging the device part (``DEVICE_MUTATIONS``) is
  left out unless asked for: it reaches each device's own migration
  code at failover, as any incoming migration's stream does.

A session fails when QEMU is killed by a signal, does not decide within
its deadline, or ends in a state its kind does not allow.

Run as a program it records once and fuzzes
(``curling_fuzz.py QEMU SESSIONS [SEED] [--devices]``).
"""

from __future__ import annotations

import collections
import dataclasses
import fcntl
import json
import logging
import pathlib
import random
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from typing import Any, Callable, Optional

from curling_proxy import (ACK_SIZE, CANCEL, CHECKPOINT, FRAME_HDR_SIZE,
                           FRAME_MAGIC, HEARTBEAT, READY_ACK, SETTINGS,
                           CurlingProxy, crc32c)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] /
                       "scripts"))
from curlingtool.vm import free_tcp_port  # noqa: E402

#: The fuzzed VM: a PC with firmware only.  Both sides use these.
VM_ARGS = ("-machine", "pc", "-accel", "tcg", "-m", "32M", "-nodefaults",
           "-display", "none", "-no-reboot")
#: curling-timeout of the fuzzed receivers (its minimum), in ms.
RECEIVER_TIMEOUT_MS = 200
#: Seconds a receiver gets to decide about a spoiled frame.
DECIDE_DEADLINE = 10.0
#: Seconds a receiver gets to listen, and to load the first round.
START_DEADLINE = 20.0

HOST = "127.0.0.1"


class FuzzError(AssertionError):
    """A session ended in a way its mutation does not allow."""


@dataclasses.dataclass
class Recording:
    """What a sender sent: its first round, then whole frames."""

    first_round: bytes
    frames: list[bytes]

    @property
    def checkpoints(self) -> list[bytes]:
        return [f for f in self.frames if frame_type(f) == CHECKPOINT]


def frame_type(frame: bytes) -> int:
    return struct.unpack_from(">I", frame, 4)[0]


def split_frames(stream: bytes) -> list[bytes]:
    """Whole frames of a frame stream (a cut last one is dropped)."""
    frames = []
    pos = 0
    while pos + FRAME_HDR_SIZE <= len(stream):
        magic, _t, _s, length = struct.unpack_from(">IIQQ", stream, pos)
        assert magic == FRAME_MAGIC, f"no frame at {pos}"
        end = pos + FRAME_HDR_SIZE + length
        if end > len(stream):
            break
        frames.append(stream[pos:end])
        pos = end
    return frames


def make_header(ftype: int, sequence: int, payload: bytes,
                length: Optional[int] = None,
                payload_crc: Optional[int] = None,
                magic: int = FRAME_MAGIC) -> bytes:
    """A frame header whose own checksum matches."""
    head = struct.pack(">IIQQI", magic, ftype, sequence,
                       len(payload) if length is None else length,
                       crc32c(payload) if payload_crc is None
                       else payload_crc)
    return head + struct.pack(">I", crc32c(head))


def renumber(frame: bytes, sequence: int) -> bytes:
    """``frame`` as checkpoint number ``sequence``."""
    payload = frame[FRAME_HDR_SIZE:]
    return make_header(frame_type(frame), sequence, payload,
                       payload_crc=struct.unpack_from(">I", frame, 24)[0]) \
        + payload


def record(qemu: str, workdir: pathlib.Path, seconds: float = 3.0,
           interval_ms: int = 50,
           log: Optional[logging.Logger] = None) -> Recording:
    """Protect a firmware-only VM for ``seconds`` through a proxy and
    return what its sender sent."""
    log = log or logging.getLogger("curling_fuzz")
    port = _free_port()
    receiver = subprocess.Popen(
        [qemu, *VM_ARGS, "-incoming", f"curling:tcp:{HOST}:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    qmp_path = workdir / "record-sender.qmp"
    sender = subprocess.Popen(
        [qemu, *VM_ARGS, "-qmp", f"unix:{qmp_path},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    proxy = CurlingProxy(port, log=log, name="recorder")
    proxy.sample_limit = 1 << 30
    try:
        _wait_listening(port, receiver)
        proxy.start()
        qmp = Qmp(qmp_path, sender)
        qmp.cmd("migrate-set-parameters", {"curling-interval": interval_ms})
        qmp.cmd("migrate", {"uri": proxy.uri})
        proxy.wait_ready(START_DEADLINE)
        time.sleep(seconds)
        qmp.cmd("migrate_cancel")
        proxy.wait_closed(10)
        qmp.close()
    finally:
        proxy.stop()
        for proc in (sender, receiver):
            proc.kill()
            proc.wait()
    stream = bytes(proxy.sample)
    first = proxy.first_round_bytes
    rec = Recording(stream[:first], split_frames(stream[first:]))
    log.info("recorded a first round of %d bytes and %d frames (%d "
             "checkpoints, %d..%d bytes)", len(rec.first_round),
             len(rec.frames), len(rec.checkpoints),
             min(map(len, rec.checkpoints), default=0),
             max(map(len, rec.checkpoints), default=0))
    if len(rec.checkpoints) < 4:
        raise FuzzError(f"only {len(rec.checkpoints)} checkpoints recorded")
    return rec


# -- mutations: (bytes to send, what the receiver may end in) -------------

#: Outcomes: "error" (protection ended, no failover, checkpoint k kept),
#: "failover-k" and "failover-k1" (from checkpoint k or k + 1),
#: "cancelled", "exit" (QEMU exited with an error status), "guest-exit"
#: (status 0: never expected, the receivers do not run their guest).
Expected = frozenset[str]
Mutation = Callable[[random.Random, bytes, int], tuple[bytes, str, Expected]]

DAMAGED = frozenset({"error"})


def _flip_bits(rng: random.Random, frame: bytes, k: int):
    out = bytearray(frame)
    for _ in range(rng.choice((1, 1, 2, 8))):
        at = rng.randrange(len(out))
        out[at] ^= 1 << rng.randrange(8)
    return bytes(out), "close", DAMAGED


def _header_field(rng: random.Random, frame: bytes, k: int):
    payload = frame[FRAME_HDR_SIZE:]
    ftype, length = CHECKPOINT, len(payload)
    sequence, magic, pcrc = k + 1, FRAME_MAGIC, crc32c(payload)
    field = rng.choice(("magic", "type", "sequence", "length-short",
                        "length-huge", "payload-crc", "header-crc"))
    if field == "magic":
        magic ^= 1 << rng.randrange(32)
    elif field == "type":
        ftype = rng.choice([t for t in (0, HEARTBEAT, CANCEL, SETTINGS, 5,
                                        255, rng.getrandbits(32))
                            if t != CHECKPOINT])
        if ftype == CANCEL and length == 0:
            ftype = 5
    elif field == "sequence":
        sequence = rng.choice((0, k, k + 2, k + 1 + rng.randrange(1, 1000),
                               2 ** 64 - 1, rng.getrandbits(64)))
        if sequence == k + 1:
            sequence = k + 2
    elif field == "length-short":
        length = rng.randrange(length)
    elif field == "length-huge":
        length = rng.choice((2 ** 64 - 1, 2 ** 63, 1 << 40))
    elif field == "payload-crc":
        pcrc ^= 1 << rng.randrange(32)
    hdr = make_header(ftype, sequence, payload, length, pcrc, magic)
    if field == "header-crc":
        hdr = hdr[:28] + struct.pack(">I", struct.unpack_from(">I", hdr, 28)[0]
                                     ^ (1 << rng.randrange(32)))
    if field == "type" and ftype in (HEARTBEAT, CANCEL):
        # A heartbeat or cancel frame with a payload is unknown.
        pass
    return hdr + payload, "close", DAMAGED


def _truncated(rng: random.Random, frame: bytes, k: int):
    cut = rng.choice((0, rng.randrange(1, FRAME_HDR_SIZE),
                      rng.randrange(FRAME_HDR_SIZE, len(frame) + 1),
                      len(frame)))
    end = rng.choice(("close", "reset", "silent"))
    expected = frozenset({"failover-k1" if cut == len(frame)
                          else "failover-k"})
    return frame[:cut], end, expected


def _forge(rng: random.Random, frame: bytes, k: int, lo: int, hi: int):
    """``frame`` with bytes ``lo..hi`` of its payload changed (and maybe
    the payload cut there), both checksums made to match."""
    payload = bytearray(frame[FRAME_HDR_SIZE:])
    for _ in range(rng.choice((1, 1, 4, 32))):
        payload[rng.randrange(lo, hi)] = rng.randrange(256)
    if rng.random() < 0.2:
        del payload[rng.randrange(lo, hi):]
    return make_header(CHECKPOINT, k + 1, bytes(payload)) + bytes(payload)


def _forged_ram(rng: random.Random, frame: bytes, k: int):
    # The RAM part and its length: what Curling itself checks before it
    # applies anything.
    ram_len = struct.unpack_from(">Q", frame, FRAME_HDR_SIZE)[0]
    return (_forge(rng, frame, k, 0, 8 + ram_len), "close",
            frozenset({"error", "failover-k1", "exit"}))


def _forged_devices(rng: random.Random, frame: bytes, k: int):
    # The device part: loaded by each device's own migration code at
    # failover, as any incoming migration's.
    ram_len = struct.unpack_from(">Q", frame, FRAME_HDR_SIZE)[0]
    return (_forge(rng, frame, k, 8 + ram_len, len(frame) - FRAME_HDR_SIZE),
            "close", frozenset({"error", "failover-k1", "exit"}))


MUTATIONS: dict[str, tuple[str, Mutation, float]] = {
    # name: (kind, function, weight)
    "bit-flips": ("damaged", _flip_bits, 3.0),
    "header-field": ("damaged", _header_field, 3.0),
    "truncated": ("truncated", _truncated, 2.0),
    "forged-ram": ("forged", _forged_ram, 2.0),
}

#: Not in MUTATIONS unless asked for (``Fuzzer(devices=True)``, the
#: program's ``--devices``): a forged device state reaches QEMU's device
#: loaders, which trust a migration stream's contents; only TLS keeps a
#: forger off the connection.
DEVICE_MUTATIONS: dict[str, tuple[str, Mutation, float]] = {
    "forged-devices": ("forged", _forged_devices, 2.0),
}


# -- one session --------------------------------------------------------

@dataclasses.dataclass
class Session:
    number: int
    mutation: str
    k: int
    end: str
    sent: int
    outcome: str = ""
    detail: str = ""
    seconds: float = 0.0


#: Sessions at a time.  A session waits for its receiver as much as it
#: computes: on 2 cores, 600 sessions took 18.8 s two at a time, 13.2 s
#: three at a time and 12.6 s four at a time.
WORKERS = 3


class Fuzzer:
    """Sessions against fresh receivers, ``workers`` at a time."""

    def __init__(self, qemu: str, recording: Recording, workdir: pathlib.Path,
                 seed: int, log: Optional[logging.Logger] = None,
                 workers: int = WORKERS, devices: bool = False) -> None:
        self.qemu = qemu
        self.rec = recording
        self.workdir = workdir
        self.seed = seed
        self.log = log or logging.getLogger("curling_fuzz")
        self.workers = workers
        self.mutations = dict(MUTATIONS)
        if devices:
            self.mutations.update(DEVICE_MUTATIONS)
        self.sessions: list[Session] = []
        self.failures: list[Session] = []
        self._lock = threading.Lock()

    def plan(self, count: int) -> list[tuple[int, str, int, random.Random]]:
        rng = random.Random(self.seed)
        names = list(self.mutations)
        weights = [self.mutations[n][2] for n in names]
        cps = len(self.rec.checkpoints)
        return [(i, rng.choices(names, weights)[0], rng.randrange(cps - 1),
                 random.Random(rng.getrandbits(64))) for i in range(count)]

    def run(self, count: int, stop_after_failures: int = 5) -> None:
        jobs = collections.deque(self.plan(count))
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not jobs or len(self.failures) >= stop_after_failures:
                        return
                    job = jobs.popleft()
                session = self.session(*job)
                with self._lock:
                    self.sessions.append(session)
                    if session.outcome.startswith("FAIL"):
                        self.failures.append(session)
                        self.log.error("session %d failed: %s", session.number,
                                       session)

        threads = [threading.Thread(target=worker, daemon=True)
                   for _ in range(self.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def counts(self) -> dict[str, int]:
        c: collections.Counter[str] = collections.Counter()
        for s in self.sessions:
            c[f"{s.mutation}/{s.outcome}"] += 1
        return dict(sorted(c.items()))

    def session(self, number: int, mutation: str, k: int,
                rng: random.Random) -> Session:
        start = time.monotonic()
        checkpoints = self.rec.checkpoints
        good = [renumber(f, i + 1) for i, f in enumerate(checkpoints[:k])]
        original = renumber(checkpoints[k], k + 1)
        data, end, expected = self.mutations[mutation][1](rng, original, k)
        if k == 0:
            # Nothing committed yet: nothing to fail over to, and an
            # incoming migration that cannot complete makes QEMU exit.
            expected = expected - {"failover-k", "error"} | {"exit"}
        s = Session(number, mutation, k, end, len(data))
        try:
            outcome, detail = self._run(good, data, end, k)
        except FuzzError as exc:
            outcome, detail = "FAIL", str(exc)
        if not outcome.startswith("FAIL") and outcome not in expected:
            detail = (f"ended {outcome} ({detail}); a {mutation} frame may "
                      f"only end in {sorted(expected)}")
            outcome = "FAIL"
        s.outcome, s.detail = outcome, detail
        s.seconds = time.monotonic() - start
        return s

    def _run(self, good: list[bytes], data: bytes, end: str,
             k: int) -> tuple[str, str]:
        port = _free_port()
        qmp_path = pathlib.Path(tempfile.mktemp(prefix="fuzz-", suffix=".qmp",
                                                dir=self.workdir))
        proc = subprocess.Popen(
            # -S: a failover loads the devices but runs no guest code.
            # What a guest whose memory was forged does is the guest's
            # business, not the receiver's.
            [self.qemu, *VM_ARGS, "-S",
             "-global", f"migration.curling-timeout={RECEIVER_TIMEOUT_MS}",
             "-qmp", f"unix:{qmp_path},server=on,wait=off",
             "-incoming", f"curling:tcp:{HOST}:{port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE)
        sock: Optional[socket.socket] = None
        try:
            sock = _wait_listening(port, proc)
            sock.settimeout(START_DEADLINE)
            sock.sendall(self.rec.first_round)
            _expect_ready(sock)
            for i, frame in enumerate(good, 1):
                sock.sendall(frame)
                _expect_ack(sock, i)
            try:
                sock.sendall(data)
                if end == "reset":
                    # A reset throws away what this side has not sent
                    # yet: wait until the receiver's kernel has every
                    # byte, so that the frame is cut where it was meant.
                    _wait_sent(sock)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                if end != "silent":
                    sock.close()
                    sock = None
            except OSError:
                pass            # the receiver closed first: fine
            return self._outcome(proc, qmp_path, k)
        finally:
            if sock is not None:
                sock.close()
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            assert proc.stderr is not None
            proc.stderr.close()
            try:
                qmp_path.unlink()
            except OSError:
                pass

    def _outcome(self, proc: subprocess.Popen, qmp_path: pathlib.Path,
                 k: int) -> tuple[str, str]:
        deadline = time.monotonic() + DECIDE_DEADLINE
        qmp: Optional[Qmp] = None
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return self._exited(proc)
                try:
                    if qmp is None:
                        qmp = Qmp(qmp_path, proc)
                    info = qmp.cmd("query-curling")
                except (OSError, ValueError):
                    if proc.poll() is not None:
                        return self._exited(proc)
                    time.sleep(0.01)
                    continue
                status, seq = info["status"], info["sequence"]
                if status not in ("failed-over", "error", "cancelled"):
                    time.sleep(0.01)
                    continue
                if status == "failed-over":
                    if seq not in (k, k + 1):
                        raise FuzzError(f"failed over from {seq}, k = {k}")
                    return ("failover-k" if seq == k else "failover-k1",
                            f"sequence {seq}")
                if status in ("error", "cancelled"):
                    if seq != k:
                        return "FAIL", f"{status} at {seq}, k = {k}"
                    running = qmp.cmd("query-status")["status"]
                    if running == "running":
                        return "FAIL", f"{status} but the VM runs"
                    return status, f"VM {running}"
            raise FuzzError(f"no decision within {DECIDE_DEADLINE:g} s "
                            f"(hang)")
        finally:
            if qmp is not None:
                qmp.close()

    @staticmethod
    def _exited(proc: subprocess.Popen) -> tuple[str, str]:
        rc = proc.wait()
        assert proc.stderr is not None
        text = proc.stderr.read().decode(errors="replace").strip()
        if rc < 0:
            return "FAIL", f"killed by signal {-rc}: {text[-500:]}"
        if rc == 0:
            # The guest shut itself down (or reset: -no-reboot)
            return "guest-exit", text[-200:]
        if rc != 1:
            return "FAIL", f"exit status {rc}: {text[-500:]}"
        return "exit", text[-200:]


# -- plumbing -------------------------------------------------------------

class Qmp:
    """A minimal synchronous QMP client on a unix socket."""

    def __init__(self, path: pathlib.Path, proc: subprocess.Popen,
                 timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.settimeout(timeout)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self.file = self.sock.makefile("rb")
        self._read()                        # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise OSError("QMP closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name: str, args: Optional[dict[str, Any]] = None) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        reply = self._read()
        if "error" in reply:
            raise ValueError(f"{name}: {reply['error']}")
        return reply["return"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


_ports_lock = threading.Lock()
_ports_taken: set[int] = set()


def _free_port() -> int:
    """A free TCP port on HOST, not handed out before by this process:
    two sessions must not pick the same one before their QEMUs bind."""
    with _ports_lock:
        while True:
            port = free_tcp_port()
            if port not in _ports_taken:
                _ports_taken.add(port)
                return port


def _wait_sent(sock: socket.socket, timeout: float = START_DEADLINE) -> None:
    """Wait until the peer has acknowledged every byte written to
    ``sock`` (its send queue, SIOCOUTQ, is empty)."""
    deadline = time.monotonic() + timeout
    queued = struct.pack("i", 0)
    while struct.unpack("i", fcntl.ioctl(sock, termios.TIOCOUTQ, queued))[0]:
        if time.monotonic() > deadline:
            raise FuzzError("the receiver does not read what was sent")
        time.sleep(0.001)


def _wait_listening(port: int, proc: subprocess.Popen) -> socket.socket:
    deadline = time.monotonic() + START_DEADLINE
    while True:
        try:
            return socket.create_connection((HOST, port), timeout=1)
        except OSError:
            if proc.poll() is not None:
                raise FuzzError(f"the receiver exited with {proc.returncode} "
                                f"before listening")
            if time.monotonic() > deadline:
                raise FuzzError("the receiver does not listen")
            time.sleep(0.002)


def _recv_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = b""
    while len(buf) < n:
        try:
            chunk = sock.recv(n - len(buf))
        except OSError as exc:
            raise FuzzError(f"{what}: {exc}") from exc
        if not chunk:
            raise FuzzError(f"{what}: the receiver closed the connection")
        buf += chunk
    return buf


def _expect_ready(sock: socket.socket) -> None:
    """Read the receiver's answers to the first round (the disk answer)
    up to its READY."""
    got = b""
    while not got.endswith(READY_ACK):
        if len(got) > 1 << 20:
            raise FuzzError("no READY after 1 MiB of answers")
        try:
            chunk = sock.recv(ACK_SIZE)
        except OSError as exc:
            raise FuzzError(f"waiting for READY: {exc}") from exc
        if not chunk:
            raise FuzzError("waiting for READY: the receiver closed the "
                            "connection")
        got += chunk


def _expect_ack(sock: socket.socket, sequence: int) -> None:
    ack = _recv_exact(sock, ACK_SIZE, f"waiting for the ack of {sequence}")
    _magic, _typ, seq, _crc = struct.unpack(">IIQI", ack)
    if seq != sequence:
        raise FuzzError(f"ack of {seq}, not {sequence}")


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    devices = "--devices" in argv
    argv = [a for a in argv if a != "--devices"]
    qemu, count = argv[1], int(argv[2])
    seed = int(argv[3]) if len(argv) > 3 else random.getrandbits(32)
    with tempfile.TemporaryDirectory(prefix="curling-fuzz-") as tmp:
        work = pathlib.Path(tmp)
        rec = record(qemu, work)
        fuzzer = Fuzzer(qemu, rec, work, seed, devices=devices)
        start = time.monotonic()
        fuzzer.run(count, stop_after_failures=count if devices else 5)
        took = time.monotonic() - start
    print(json.dumps({"seed": seed, "sessions": len(fuzzer.sessions),
                      "seconds": round(took, 1),
                      "counts": fuzzer.counts(),
                      "failures": [dataclasses.asdict(s)
                                   for s in fuzzer.failures]}, indent=1))
    return 1 if fuzzer.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
