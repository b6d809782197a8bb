# SPDX-License-Identifier: GPL-2.0-or-later
"""Clients of the application guest's services (``debimage``): PostgreSQL
transactions and an HTTP download, with what they saw acknowledged.

``pg`` runs one thread per connection.  Each keeps its one connection for
its whole life and commits, in a loop, transaction number ``seq`` of its
client: insert ``(client, seq)`` into ``curling_tx`` and add one to its row
of ``curling_counter``.  A transaction whose COMMIT returned is
*acknowledged*; one under way when the client stops or its connection fails
is *in doubt*.  ``check_table`` later tells whether the database holds
exactly what it must: every acknowledged transaction, at most the one in
doubt beyond it, nothing else, and counters equal to the rows.

``http`` downloads a file at a bounded rate (so that it spans a failover)
and reports its SHA256 and length.

``python3 -m curlingtool.appclient`` runs one client inside a test's network
namespace and writes its status as JSON to a file every 0.2 s (``"done":
true`` once it stopped), like ``netclient``; it stops when its stdin closes
or after ``--seconds``.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from .netclient import stop_when_stdin_closes, write_status_file

PG_PORT = 5432
PG_USER = "postgres"
PG_DATABASE = "postgres"
HTTP_PORT = 80
HTTP_CHUNK = 64 << 10

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS curling_tx (client int NOT NULL, "
    "seq int NOT NULL, at timestamptz NOT NULL DEFAULT now(), "
    "PRIMARY KEY (client, seq))",
    "CREATE TABLE IF NOT EXISTS curling_counter (client int PRIMARY KEY, "
    "n int NOT NULL)",
)


@dataclass
class TxState:
    """What one transaction client knows of its own transactions."""
    client: int
    acked: int = 0              # highest acknowledged seq (all below too)
    in_doubt: Optional[int] = None
    backend_pid: Optional[int] = None
    # pg_postmaster_start_time() when the connection began and ended
    postmaster_start: Optional[str] = None
    postmaster_end: Optional[str] = None
    errors: list[str] = field(default_factory=list)
    max_gap: float = 0.0
    last_ack: Optional[float] = None
    latencies: list[float] = field(default_factory=list)

    def ack(self, seq: int, now: float, latency: float) -> None:
        self.acked = seq
        self.in_doubt = None
        if self.last_ack is not None:
            self.max_gap = max(self.max_gap, now - self.last_ack)
        self.last_ack = now
        self.latencies.append(latency)

    def status(self) -> dict[str, Any]:
        return {"client": self.client, "acked": self.acked,
                "in_doubt": self.in_doubt, "backend_pid": self.backend_pid,
                "postmaster_start": self.postmaster_start,
                "postmaster_end": self.postmaster_end,
                "errors": list(self.errors),
                "max_gap": round(self.max_gap, 3)}


def check_table(states: Iterable[dict[str, Any]],
                rows: dict[int, tuple[int, int, int]],
                counters: dict[int, int]) -> list[str]:
    """What is wrong with the database after the clients' work.

    ``states`` are the clients' final statuses; ``rows`` maps a client to
    (count, min seq, max seq) of its rows; ``counters`` a client to its
    counter.  Returns the problems found (none when all is well)."""
    problems = []
    for st in states:
        client, acked = st["client"], st["acked"]
        in_doubt = st.get("in_doubt")
        count, low, high = rows.get(client, (0, 0, 0))
        allowed = acked + 1 if in_doubt == acked + 1 else acked
        if high < acked:
            problems.append(f"client {client}: acknowledged {acked} "
                            f"transactions, the database has up to {high}")
        elif high > allowed:
            problems.append(f"client {client}: the database has transaction "
                            f"{high}, never attempted or acknowledged "
                            f"(acknowledged {acked}, in doubt {in_doubt})")
        if count != high or (count and low != 1):
            problems.append(f"client {client}: {count} rows for seq "
                            f"{low}..{high}: some are missing")
        if counters.get(client, 0) != count:
            problems.append(f"client {client}: counter "
                            f"{counters.get(client, 0)}, rows {count}")
    return problems


def connect(host: str, timeout: float = 30.0, wait: float = 0.0) -> Any:
    """A connection to the guest's PostgreSQL; tries again for ``wait``
    seconds while the guest is still starting."""
    import pg8000.native
    deadline = time.monotonic() + wait
    while True:
        try:
            return pg8000.native.Connection(PG_USER, host=host, port=PG_PORT,
                                            database=PG_DATABASE,
                                            timeout=timeout)
        except (OSError, pg8000.native.InterfaceError,
                pg8000.native.DatabaseError):
            if time.monotonic() >= deadline:
                raise
            time.sleep(1)


def read_table(conn: Any) -> tuple[dict[int, tuple[int, int, int]],
                                   dict[int, int]]:
    """(rows, counters) as ``check_table`` takes them."""
    rows = {c: (n, lo, hi) for c, n, lo, hi in conn.run(
        "SELECT client, count(*), min(seq), max(seq) FROM curling_tx "
        "GROUP BY client")}
    counters = {c: n for c, n in conn.run(
        "SELECT client, n FROM curling_counter")}
    return rows, counters


def _pg(host: str, state: TxState, stop: threading.Event,
        lock: threading.Lock) -> None:
    try:
        conn = connect(host)
        pid, postmaster = conn.run(
            "SELECT pg_backend_pid(), pg_postmaster_start_time()::text")[0]
        with lock:
            state.backend_pid, state.postmaster_start = pid, postmaster
        conn.run("INSERT INTO curling_counter VALUES (:c, 0) "
                 "ON CONFLICT DO NOTHING", c=state.client)
        seq = state.acked
        while not stop.is_set():
            seq += 1
            with lock:
                state.in_doubt = seq
            started = time.monotonic()
            conn.run("START TRANSACTION")
            conn.run("INSERT INTO curling_tx (client, seq) VALUES (:c, :s)",
                     c=state.client, s=seq)
            conn.run("UPDATE curling_counter SET n = n + 1 "
                     "WHERE client = :c", c=state.client)
            conn.run("COMMIT")
            now = time.monotonic()
            with lock:
                state.ack(seq, now, now - started)
        postmaster = conn.run("SELECT pg_postmaster_start_time()::text")[0][0]
        with lock:
            state.postmaster_end = postmaster
        conn.close()
    except Exception as exc:  # any failure ends this connection: report it
        with lock:
            state.errors.append(f"{type(exc).__name__}: {exc}")


def _http(host: str, path: str, rate: float, result: dict[str, Any],
          stop: threading.Event, lock: threading.Lock) -> None:
    digest = hashlib.sha256()
    try:
        conn = http.client.HTTPConnection(host, HTTP_PORT, timeout=60)
        conn.request("GET", path)
        resp = conn.getresponse()
        with lock:
            result["status"] = resp.status
            result["length"] = int(resp.getheader("Content-Length", "0"))
        started = time.monotonic()
        got = 0
        while not stop.is_set():
            chunk = resp.read(HTTP_CHUNK)
            if not chunk:
                break
            digest.update(chunk)
            got += len(chunk)
            with lock:
                result["bytes"] = got
            ahead = got / rate - (time.monotonic() - started)
            if ahead > 0:
                stop.wait(ahead)
        with lock:
            result["sha256"] = digest.hexdigest()
            result["complete"] = got == result["length"]
    except Exception as exc:  # the download failed: report it
        with lock:
            result.setdefault("errors", []).append(
                f"{type(exc).__name__}: {exc}")


def check(host: str, states: list[dict[str, Any]], wait: float
          ) -> dict[str, Any]:
    """Read the tables and ``check_table`` them against the clients'
    ``states``: {"problems": [...], "rows": total rows}."""
    conn = connect(host, wait=wait)
    try:
        rows, counters = read_table(conn)
    finally:
        conn.close()
    return {"problems": check_table(states, rows, counters),
            "rows": sum(n for n, _lo, _hi in rows.values())}


def run(host: str, mode: str, status_path: str, seconds: float,
        connections: int = 1, path: str = "/big.bin",
        rate: float = 4e6, wait: float = 0.0,
        states_path: str = "") -> int:
    """Run one client of ``mode`` until stdin closes or ``seconds`` pass;
    returns 0, or 1 when a client saw an error."""
    stop = threading.Event()
    lock = threading.Lock()
    fatal: list[str] = []
    threads: list[threading.Thread] = []
    states: list[TxState] = []
    result: dict[str, Any] = {}
    if mode == "check":
        with open(states_path, encoding="utf-8") as f:
            states_in = json.load(f)
        try:
            result.update(check(host, states_in, wait))
        except Exception as exc:  # no database to check: report it
            fatal.append(f"check: {type(exc).__name__}: {exc}")
    elif mode == "pg":
        try:
            conn = connect(host, wait=wait)
            for statement in SCHEMA:
                conn.run(statement)
            conn.close()
        except Exception as exc:  # cannot even set up: nothing to run
            fatal.append(f"schema: {type(exc).__name__}: {exc}")
        else:
            for client in range(connections):
                state = TxState(client)
                states.append(state)
                threads.append(threading.Thread(
                    target=_pg, args=(host, state, stop, lock)))
    elif mode == "http":
        threads.append(threading.Thread(
            target=_http, args=(host, path, rate, result, stop, lock)))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    for t in threads:
        t.daemon = True
        t.start()

    stop_when_stdin_closes(stop)
    started = time.monotonic()

    def write_status(done: bool) -> None:
        with lock:
            st: dict[str, Any] = {"mode": mode, "done": done,
                                  "fatal": list(fatal),
                                  "elapsed": round(time.monotonic() - started,
                                                   3)}
            if mode == "pg":
                st["clients"] = [s.status() for s in states]
                st["acked"] = sum(s.acked for s in states)
                lat = sorted(x for s in states for x in s.latencies)
                if lat:
                    st["latency_median"] = lat[len(lat) // 2]
                    st["latency_max"] = lat[-1]
                st["errors"] = [e for s in states for e in s.errors]
            else:
                st.update(result)
                st["errors"] = list(result.get("errors", []))
                st["errors"] += list(result.get("problems", []))
        write_status_file(status_path, st)

    while not stop.is_set():
        if seconds and time.monotonic() - started >= seconds:
            break
        if mode != "pg" and not any(t.is_alive() for t in threads):
            break
        write_status(False)
        stop.wait(0.2)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    write_status(True)
    failed = (fatal or any(s.errors for s in states) or
              result.get("errors") or result.get("problems"))
    return 1 if failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--mode", required=True, choices=("pg", "http", "check"))
    ap.add_argument("--status", required=True, help="JSON status file")
    ap.add_argument("--seconds", type=float, default=0.0,
                    help="stop after this long (default: when stdin closes)")
    ap.add_argument("--connections", type=int, default=1)
    ap.add_argument("--path", default="/big.bin", help="http: what to get")
    ap.add_argument("--rate", type=float, default=4e6,
                    help="http: bytes/s at most")
    ap.add_argument("--wait", type=float, default=0.0,
                    help="pg, check: seconds to retry connecting")
    ap.add_argument("--states", default="",
                    help="check: the pg client's final status (JSON list "
                    "of its clients)")
    args = ap.parse_args(argv)
    return run(args.host, args.mode, args.status, args.seconds,
               args.connections, args.path, args.rate, args.wait,
               args.states)


if __name__ == "__main__":
    sys.exit(main())
