# SPDX-License-Identifier: GPL-2.0-or-later
"""The network clients' checks: what counts as output that escaped before
its checkpoint was committed, and the network benchmark's targets."""

from __future__ import annotations

from curlingtool import netbench, netclient


def tick(counter: int, pad: int = 3, t: int = 1000) -> bytes:
    return b"TICK %d counter=%d pad=%s\n" % (t, counter, b"x" * pad)


def test_stream_accepts_lines_split_anywhere() -> None:
    data = tick(1) + tick(2, 10) + tick(3, 0)
    c = netclient.StreamChecker()
    for i in range(0, len(data), 7):
        c.feed(data[i:i + 7], float(i))
    assert c.errors == [] and c.items == 3 and c.counter == 3


def test_stream_sees_bytes_rewritten_by_a_resumed_guest() -> None:
    # The client saw the start of line 3 from the lost state; the resumed
    # guest wrote line 3 with another pad length at the same offsets.
    lost = tick(3, 20)
    resumed = tick(3, 5) + tick(4)
    cut = len(lost) - 2
    stream = tick(1) + tick(2) + lost[:cut] + resumed[cut:]
    c = netclient.StreamChecker()
    c.feed(stream, 0.0)
    assert c.error_count >= 1


def test_stream_sees_a_repeated_or_skipped_line() -> None:
    c = netclient.StreamChecker()
    c.feed(tick(1) + tick(2) + tick(2) + tick(4), 0.0)
    assert c.error_count == 2


def test_rr_sees_a_repeated_guest_number() -> None:
    c = netclient.RRChecker()
    c.reply(0, 1, 1, b"REP 1 conn=1 global=1", 0.001, 0.0)
    c.reply(1, 1, 1, b"REP 1 conn=1 global=2", 0.002, 0.0)
    assert c.errors == []
    c.reply(0, 2, 2, b"REP 2 conn=2 global=2", 0.001, 0.0)
    assert c.error_count == 1
    c.reply(0, 3, 3, b"REP 3 conn=2 global=9", 0.001, 0.0)
    assert c.error_count == 2
    assert c.status()["latency"]["count"] == 4


def test_udp_allows_loss_not_repetition() -> None:
    c = netclient.UDPChecker()
    for seq in (1, 2, 5, 6):
        c.datagram(b"UDP %d 7\n" % seq, 0.0)
    assert c.errors == [] and c.lost == 2
    c.datagram(b"UDP 6 8\n", 0.0)
    assert c.error_count == 1


def test_bulk_checks_the_pattern_across_reads() -> None:
    data = bytes((i * 7) & 0xFF for i in range(5000))
    c = netclient.BulkChecker()
    c.feed(data[:1234], 0.0)
    c.feed(data[1234:], 1.0)
    assert c.errors == [] and c.offset == 5000
    c.feed(b"\x00\x00", 2.0)
    assert c.error_count == 1


def test_latency_summary() -> None:
    assert netclient.latency_summary([]) == {}
    s = netclient.latency_summary([0.001 * i for i in range(1, 101)])
    assert s["median_ms"] == 51.0 and s["p99_ms"] == 99.0
    assert s["max_ms"] == 100.0


def point(system: str, interval, output, rate: float, median: float) -> dict:
    return {"system": system, "interval": interval, "output_triggered": output,
            "rr_per_s": rate, "rr_median_ms": median, "rr_p99_ms": median,
            "bulk_mbit_s": 100.0, "cycle_ms": 5.0}


def test_net_targets() -> None:
    pts = [point("none", None, None, 1000.0, 2.0),
           point("curling", 100, True, 600.0, 9.0),
           point("curling", 100, False, 100.0, 105.0)]
    verdicts = [t["verdict"] for t in netbench.net_targets(pts)]
    assert verdicts == ["met", "met"]
    pts[1] = point("curling", 100, True, 400.0, 13.0)
    verdicts = [t["verdict"] for t in netbench.net_targets(pts)]
    assert verdicts == ["**missed**", "**missed**"]
    assert [t["verdict"] for t in netbench.net_targets([])] == \
        ["not measured", "not measured"]
    assert netbench.net_report([]) == []
    assert "| Curling | 100 | no |" in "\n".join(netbench.net_report(pts))
