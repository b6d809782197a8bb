# SPDX-License-Identifier: GPL-2.0-or-later
"""The disk benchmark's parsing, targets and report."""

from __future__ import annotations

import dataclasses

import pytest

from curlingtool import diskbench

CONSOLE = """curling: tick=1 work=0 pages=0 check=skip
curling: diskload mode=fsync ops=100 bytes=409600 lat_us=200000 max_us=5000
curling: diskload mode=fsync ops=300 bytes=1228800 lat_us=600000 max_us=9000
curling: diskload mode=fsync ops=500 bytes=2048000 lat_us=1000000 max_us=4000
"""


def test_window_sample() -> None:
    lines = diskbench.parse_diskload(CONSOLE)
    assert len(lines) == 3
    s = diskbench.window_sample(lines, 2.0)
    assert s.ops_s == 200
    assert s.mib_s == pytest.approx(1638400 / 1024 ** 2 / 2)
    assert s.latency_ms == pytest.approx(2.0)
    # the first line's max belongs to the second before the window
    assert s.latency_max_ms == 9.0


def test_window_sample_needs_two_lines() -> None:
    with pytest.raises(AssertionError):
        diskbench.window_sample(diskbench.parse_diskload(CONSOLE)[:1], 1.0)


def point(load: str, system: str, interval, mib_s: float,
          latency_ms: float, pause_ms=None) -> dict:
    return dataclasses.asdict(diskbench.DiskPoint(
        load, system, interval, mib_s, mib_s * 16, latency_ms, 10.0,
        checkpoints_per_s=None if interval is None else 9.5,
        mean_bytes=None if interval is None else 900000,
        disk_mean_bytes=None if interval is None else 600000,
        pause_ms=pause_ms, receiver_rss_mb=None))


def test_targets_met_and_missed() -> None:
    points = [point("seq-10", "none", None, 10.0, 1.0),
              point("seq-10", "curling", 100, 9.5, 1.0, 0.4),
              point("seq-10", "none", None, 10.0, 1.0),
              point("fsync-4k", "none", None, 1.0, 2.0),
              point("fsync-4k", "curling", 100, 0.9, 2.6, 0.5),
              point("fsync-4k", "none", None, 1.0, 2.2)]
    t = {x["target"].split(" ")[0]: x for x in
         diskbench.disk_targets(points, colo_pause_ms=2.8)}
    assert t["seq-10"]["verdict"] == "met"
    # 2.6 vs 2.1 ms is +24%, the noise 10%: missed
    assert t["fsync-4k"]["verdict"] == "**missed**"
    assert t["pause"]["verdict"] == "met"
    t = diskbench.disk_targets(points, colo_pause_ms=None)
    assert t[2]["verdict"] == "not measured"


def test_targets_without_points() -> None:
    assert {x["verdict"] for x in diskbench.disk_targets([], None)} == {
        "not measured"}


def test_report_rows() -> None:
    points = [point("seq-10", "none", None, 10.0, 1.0),
              point("seq-10", "curling", 100, 9.0, 1.0, 0.4)]
    lines = diskbench.disk_report(points)
    assert lines[0] == "## Disks (replication)"
    rows = [x for x in lines if x.startswith("| seq-10")]
    assert len(rows) == 2
    assert "| 90% |" in rows[1] and "| 600000 |" in rows[1]
    assert diskbench.disk_report([]) == []


def test_pause_target_against_colo_disk_rows() -> None:
    """With COLO disk rows, Curling's pause is compared with COLO's under
    the same load, not with the memory rows'."""
    colo = diskbench.COLO_SYSTEM
    points = [point("seq-10", "none", None, 10.0, 1.0),
              point("seq-10", "curling", 100, 9.5, 1.0, 3.0),
              point("seq-10", colo, 100, 1.0, 9.0, 5.0),
              point("fsync-4k", "curling", 100, 0.9, 2.6, 0.5),
              point("fsync-4k", colo, 100, 0.1, 20.0, 0.4)]
    pause = diskbench.disk_targets(points, colo_pause_ms=50.0)[2]
    assert pause["verdict"] == "**missed**"
    assert "fsync-4k 0.50 vs 0.40 ms" in pause["detail"]
    points[-1] = point("fsync-4k", colo, 100, 0.1, 20.0, 0.6)
    assert diskbench.disk_targets(points, None)[2]["verdict"] == "met"


def test_report_labels_colo_rows() -> None:
    points = [point("seq-10", "none", None, 10.0, 1.0),
              point("seq-10", diskbench.COLO_SYSTEM, 100, 1.0, 9.0, 5.0)]
    rows = [x for x in diskbench.disk_report(points)
            if x.startswith("| seq-10")]
    assert rows[1].startswith("| seq-10 | COLO | 100 |")
    assert "| 10% |" in rows[1]
