# SPDX-License-Identifier: GPL-2.0-or-later
"""appbench: what pgbench and ab print, and the application targets."""

from __future__ import annotations

import pathlib

import pytest

from curlingtool import appbench

PGBENCH_OUT = """\
transaction type: <builtin: TPC-B (sort of)>
scaling factor: 8
number of clients: 8
number of threads: 2
duration: 20 s
number of transactions actually processed: 2826
latency average = 56.617 ms
initial connection time = 12.019 ms
tps = 141.300712 (without initial connection time)
"""

AB_OUT = """\
Concurrency Level:      8
Time taken for tests:   20.000 seconds
Complete requests:      67916
Failed requests:        0
Keep-Alive requests:    67916
Requests per second:    3395.80 [#/sec] (mean)
Percentage of the requests served within a certain time (ms)
  50%      2
  66%      2
  90%      4
  99%      5
 100%     41 (longest request)
"""


def test_pgbench_tps_and_latencies(tmp_path: pathlib.Path) -> None:
    assert appbench.pgbench_tps(PGBENCH_OUT) == pytest.approx(141.300712)
    with pytest.raises(appbench.AppBenchError):
        appbench.pgbench_tps("connection to server failed\n")
    (tmp_path / "tx.1").write_text("0 0 53930 0 1765000000 1\n"
                                   "1 0 120000 0 1765000000 2\n")
    (tmp_path / "tx.1.1").write_text("4 7 2500 0 1765000001 3\n")
    assert sorted(appbench.pgbench_latencies_ms(tmp_path.glob("tx.*"))) == \
        [2.5, 53.93, 120.0]


def test_ab_result() -> None:
    assert appbench.ab_result(AB_OUT) == (3395.80, 2.0, 5.0)
    with pytest.raises(appbench.AppBenchError, match="3 failed requests"):
        appbench.ab_result(AB_OUT.replace("Failed requests:        0",
                                          "Failed requests:        3"))
    with pytest.raises(appbench.AppBenchError, match="non-2xx"):
        appbench.ab_result(AB_OUT + "Non-2xx responses:      12\n")
    with pytest.raises(appbench.AppBenchError):
        appbench.ab_result("apr_socket_recv: Connection reset by peer\n")


def point(workload: str, system: str, interval, per_s: float) -> dict:
    return {"workload": workload, "system": system, "interval": interval,
            "per_s": per_s, "median_ms": 1.0, "p99_ms": 2.0}


def test_targets_and_report() -> None:
    points = [point("pgbench", "none", None, 140.0),
              point("http", "none", None, 3000.0),
              point("pgbench", "curling", 100, 98.0),
              point("http", "curling", 100, 900.0)]
    pg, http = appbench.app_targets(points)
    assert pg["verdict"] == "met" and "70%" in pg["detail"]
    assert http["verdict"] == "**missed**" and "30%" in http["detail"]
    assert all(t["verdict"] == "not measured"
               for t in appbench.app_targets(points[:2]))
    lines = appbench.app_report(points)
    assert lines[0].startswith("## Real applications")
    assert any("| pgbench | Curling | 100 | 98.0 | 70% |" in line
               for line in lines)
    assert appbench.app_report([]) == []
