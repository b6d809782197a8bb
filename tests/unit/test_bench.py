# SPDX-License-Identifier: GPL-2.0-or-later
"""The benchmark's arithmetic: pauses from events, percentiles, summary."""

from __future__ import annotations

import pytest

from curlingtool import bench


def event(name: str, t: float) -> dict:
    return {"event": name, "timestamp": {"seconds": int(t),
                                         "microseconds": round(t % 1 * 1e6)}}


def test_pauses_pair_stop_with_resume() -> None:
    events = [event("RESUME", 0.5), event("STOP", 1.0), event("RESUME", 1.002),
              event("SHUTDOWN", 1.5), event("STOP", 2.0), event("RESUME", 2.25),
              event("STOP", 3.0)]
    assert bench.Bench._pauses(events) == pytest.approx([2.0, 250.0])


def test_percentile() -> None:
    assert bench.percentile([], 0.5) is None
    assert bench.percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert bench.percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert bench.percentile([1.0, 100.0], 0.99) == pytest.approx(99.01)


def window(system: str, interval, work: float, pauses=(), cps=0) -> bench.Window:
    return bench.Window(system=system, workload="counter", interval=interval,
                        seconds=2.0, work_per_s=work, pages_per_s=0.0,
                        pauses_ms=list(pauses), checkpoints=cps,
                        sender_bytes=4_000_000, sender_cpu_s=1.0,
                        receiver_cpu_s=0.5, receiver_rss=300_000_000)


def test_summarise_ratios_against_interleaved_unprotected() -> None:
    rows = bench.summarise([
        window("none", None, 100.0), window("none", None, 120.0),
        window("none", None, 110.0),
        window("curling", 100, 99.0, pauses=[0.5, 0.7, 1500.0], cps=20),
        window("curling", 100, 88.0, pauses=[0.6], cps=20),
    ])
    assert len(rows) == 1
    row = rows[0]
    assert (row["system"], row["workload"], row["interval"]) == ("curling", "counter", 100)
    assert row["throughput_ratio"] == pytest.approx(((99 / 110) + (88 / 110)) / 2)
    assert row["throughput_spread"] == pytest.approx(11 / 110)
    assert row["checkpoints_per_s"] == pytest.approx(10.0)
    assert row["pause_median_ms"] == pytest.approx(0.65)
    assert row["pause_max_ms"] == 1500.0
    assert row["stalls"] == 1
    assert row["bytes_per_checkpoint"] == pytest.approx(200_000)
    assert row["receiver_rss_mb"] == pytest.approx(300.0)
