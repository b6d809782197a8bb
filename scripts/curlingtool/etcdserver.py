# SPDX-License-Identifier: GPL-2.0-or-later
"""A throw-away etcd on loopback: the witness of the arbitration tests.

    with EtcdServer(tmpdir) as etcd:      # started, /health answered
        witness = open_witness(etcd.spec) # "etcd:http://127.0.0.1:PORT"
        etcd.stop()                       # the witness is down ...
        etcd.start()                      # ... and back, same data

``EtcdServer(workdir, binary="etcd", timeout=30.0, attempts=3)``: one single-member
cluster listening on free 127.0.0.1 ports only, its data in
``workdir/etcd-data`` and its output in ``workdir/etcd.log`` (kept for
the test's logs). ``url`` is its client URL, ``spec`` the witness spec
of it. ``start()`` waits until ``/health`` answers (``EtcdFailed`` when it
does not in time, or when etcd exits before it, ``attempts`` times in a
row; ``EtcdMissing`` when there is no etcd binary: Debian package
etcd-server). ``stop()`` kills it; ``start()``
again brings it back on the same ports and data. Leaving the ``with``
block, by return or exception, kills it; so does the end of the Python
process, and etcd also dies with its parent.

``wrap`` runs etcd, and the probe of its health, through a command
prefix: ``NetLab.wrap`` puts it on the loopback of a network namespace,
for clients that run there.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.error
from typing import Any, Callable, Optional, Sequence

from . import CurlingError
from .vm import die_with_parent, free_tcp_port
from .witness import DIRECT

log = logging.getLogger(__name__)

_SERVERS: set[EtcdServer] = set()


class EtcdMissing(CurlingError):
    """There is no etcd binary to run."""


class EtcdFailed(CurlingError):
    """etcd exited or did not become healthy in time."""


class EtcdExited(EtcdFailed):
    """etcd exited before it was healthy."""


#: The folder of the tooling package, for a probe run in a namespace.
_SCRIPTS = pathlib.Path(__file__).resolve().parent.parent


def healthy(url: str) -> bool:
    """Whether the etcd at ``url`` answers /health with true."""
    try:
        with DIRECT.open(url + "/health", timeout=1.0) as response:
            answer = json.load(response)
    except (OSError, ValueError, urllib.error.URLError):
        return False
    return isinstance(answer, dict) and answer.get("health") == "true"


class EtcdServer:
    """One single-member etcd cluster on loopback (see the module doc)."""

    def __init__(self, workdir: os.PathLike[str] | str, binary: str = "etcd",
                 timeout: float = 30.0,
                 wrap: Optional[Callable[[Sequence[str]], list[str]]] = None,
                 attempts: int = 3) -> None:
        self.workdir = pathlib.Path(workdir)
        self.attempts = attempts
        self.wrap = wrap
        self.binary = binary
        self.timeout = timeout
        self.data_dir = self.workdir / "etcd-data"
        self.log_path = self.workdir / "etcd.log"
        client, peer = free_tcp_port(), free_tcp_port()
        while peer == client:
            peer = free_tcp_port()
        self.url = f"http://127.0.0.1:{client}"
        self.peer_url = f"http://127.0.0.1:{peer}"
        self._proc: Optional[subprocess.Popen] = None

    @property
    def spec(self) -> str:
        """The witness spec of this server, for ``open_witness``."""
        return f"etcd:{self.url}"

    def args(self, executable: str) -> list[str]:
        return [executable, "--name", "curling-witness",
                "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.url,
                "--advertise-client-urls", self.url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", f"curling-witness={self.peer_url}"]

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    #: Seconds between an etcd that exited early and the next attempt
    RETRY_DELAY = 1.0

    def start(self) -> None:
        """Start etcd and wait until it is healthy; a no-op if it runs.
        An etcd that exits before it is healthy (a port taken for a
        moment, a restart right after a kill) is started again, up to
        ``attempts`` times; its log's last lines say why.  etcd dies with
        the thread that starts it (``die_with_parent``): start it from one
        that outlives it."""
        if self.running():
            return
        executable = shutil.which(self.binary)
        if executable is None:
            raise EtcdMissing(f"{self.binary} not found: install the Debian "
                              "package etcd-server")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, self.attempts + 1):
            log.info("etcd: starting on %s (data %s)", self.url,
                     self.data_dir)
            with self.log_path.open("ab") as out:
                args = self.args(executable)
                if self.wrap is not None:
                    args = self.wrap(args)
                self._proc = subprocess.Popen(
                    args, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            _SERVERS.add(self)
            try:
                self._wait_healthy()
                return
            except EtcdExited as exc:
                self.stop()
                if attempt == self.attempts:
                    raise
                log.warning("etcd: %s; starting it again (%d of %d)", exc,
                            attempt + 1, self.attempts)
                time.sleep(self.RETRY_DELAY)
            except BaseException:
                self.stop()
                raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self._healthy():
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise EtcdExited(f"etcd exited with {self._proc.returncode} "
                                 f"before it was healthy: {self._tail()}")
            if time.monotonic() >= deadline:
                raise EtcdFailed(f"etcd not healthy on {self.url} after "
                                 f"{self.timeout:g} s: {self._tail()}")
            time.sleep(0.1)

    def _healthy(self) -> bool:
        if self.wrap is None:
            return healthy(self.url)
        # The same check, run where etcd listens
        probe = (f"import sys; sys.path.insert(0, {str(_SCRIPTS)!r}); "
                 "from curlingtool.etcdserver import healthy; "
                 "sys.exit(not healthy(sys.argv[1]))")
        try:
            return subprocess.run(
                self.wrap([sys.executable, "-c", probe, self.url]),
                capture_output=True, timeout=5).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no output)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(no output)"

    def stop(self) -> None:
        """Kill etcd (its data stays for ``start()``); a no-op if stopped."""
        proc, self._proc = self._proc, None
        _SERVERS.discard(self)
        if proc is None:
            return
        if proc.poll() is None:
            log.info("etcd: stopping pid %d", proc.pid)
            proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.warning("etcd: pid %d did not exit after SIGKILL", proc.pid)

    def __enter__(self) -> EtcdServer:
        self.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.stop()


def _stop_all() -> None:
    for server in list(_SERVERS):
        server.stop()


atexit.register(_stop_all)
