# SPDX-License-Identifier: GPL-2.0-or-later
"""The benchmark's arithmetic: pauses from events, percentiles, summary."""

from __future__ import annotations

import os

import pytest

from curlingtool import bench


def event(name: str, t: float) -> dict:
    return {"event": name, "timestamp": {"seconds": int(t),
                                         "microseconds": round(t % 1 * 1e6)}}


def test_pauses_pair_stop_with_resume() -> None:
    events = [event("RESUME", 0.5), event("STOP", 1.0), event("RESUME", 1.002),
              event("SHUTDOWN", 1.5), event("STOP", 2.0), event("RESUME", 2.25),
              event("STOP", 3.0)]
    assert bench.event_pauses(events) == pytest.approx([2.0, 250.0])


def test_curling_pauses_from_stop_phases() -> None:
    log = ("curling_stop_phase VM stopped: stop 120 us, RAM 300 us, "
           "devices 80 us, start 20 us; 4096 bytes saved\n"
           "curling_stop_phase VM stopped: stop 1000 us, RAM 0 us, "
           "devices 0 us, start 500 us; 0 bytes saved\n")
    phases = bench.stop_phases(log)
    assert bench.phase_pauses(phases) == pytest.approx([0.52, 1.5])


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


def test_each_protected_window_compares_with_its_neighbours() -> None:
    seq = [window("none", None, 100.0), window("curling", 25, 95.0),
           window("none", None, 110.0), window("curling", 50, 100.0),
           window("curling", 100, 90.0)]
    bench.set_baselines(seq)
    assert seq[0].baseline_work_per_s is None
    assert seq[1].baseline_work_per_s == pytest.approx(105.0)
    # no unprotected window after: the one before alone
    assert seq[3].baseline_work_per_s == pytest.approx(110.0)
    assert seq[4].baseline_work_per_s == pytest.approx(110.0)
    rows = bench.summarise(seq)
    ratio = {r["interval"]: r["throughput_ratio"] for r in rows}
    assert ratio == pytest.approx({25: 95 / 105, 50: 100 / 110, 100: 90 / 110})


def test_stop_phases_parsed_from_the_trace_and_give_the_bound() -> None:
    log = ("curling_stop_phase VM stopped: stop 90 us, RAM 40 us, devices 200 us,"
           " start 60 us; 13000 bytes saved\n"
           "noise\n"
           "curling_stop_phase VM stopped: stop 110 us, RAM 60 us, devices 220 us,"
           " start 70 us; 15000 bytes saved\n")
    phases = bench.stop_phases(log)
    assert phases == [(90, 40, 200, 60, 13000), (110, 60, 220, 70, 15000)]
    w = window("curling", 100, 99.0, pauses=[0.4, 0.5], cps=2)
    w.stop_phases = phases
    w.baseline_work_per_s = 100.0
    row = bench.summarise([w], memcpy_bw=10e9)[0]
    assert row["stop_bytes"] == 14000
    assert row["phase_devices_us"] == 210
    assert row["bound_ms"] == pytest.approx(14000 / 10e9 * 1000)
    assert row["pause_vs_bound"] == pytest.approx(0.45 / row["bound_ms"])
    # COLO stops the guest for the whole checkpoint: bound from wire bytes
    colo = bench.summarise([window("colo", 100, 50.0, pauses=[5.0], cps=20)],
                           memcpy_bw=10e9)[0]
    assert colo["bound_ms"] == pytest.approx(200_000 / 10e9 * 1000)


def row(system: str, workload: str, interval: int, ratio: float, pause: float,
        bound: float = 0.1, stalls: int = 0, rss_mb: float = 200.0) -> dict:
    return {"system": system, "workload": workload, "interval": interval,
            "throughput_ratio": ratio, "throughput_min": ratio,
            "throughput_max": ratio, "pause_median_ms": pause,
            "pause_vs_bound": pause / bound, "stalls": stalls,
            "pause_max_ms": pause * 3, "receiver_rss_mb": rss_mb,
            "bytes_per_checkpoint": 1e6}


def verdicts(targets: list[dict]) -> dict[str, str]:
    return {t["target"]: t["verdict"] for t in targets}


def test_targets_met_and_missed() -> None:
    rows = [row("curling", "counter", 100, 0.97, 0.25),
            row("curling", "dirty-10", 100, 0.93, 0.4),
            row("curling", "counter", 25, 0.85, 0.25),
            row("curling", "dirty-10", 25, 0.79, 0.3),
            row("colo-nodelay", "counter", 100, 0.5, 5.0),
            row("colo-nodelay", "dirty-10", 25, 0.5, 0.2)]
    failover = {"SIGKILL (x)": [0.1] * 10, "SIGSTOP (y)": [1.6, 1.4, 1.45]}
    v = verdicts(bench.check_targets(rows, failover, "512M"))
    assert v["throughput >= 95% at 100 ms, counter"] == "met"
    assert v["throughput >= 95% at 100 ms, dirty-10"] == "**missed**"
    assert v["throughput >= 80% at 25 ms, counter"] == "met"
    assert v["throughput >= 80% at 25 ms, dirty-10"] == "**missed**"
    assert v["median pause below COLO's (with TCP_NODELAY) at every interval"] \
        == "**missed**"
    assert v["median pause within 3x of the physical bound"] == "**missed**"
    assert v["no stall over 1 s"] == "met"
    assert v["failover <= 0.5 s after a broken connection (kill -9)"] == "met"
    assert v["failover <= curling-timeout + 0.5 s = 1.5 s for a silent sender "
             "(SIGSTOP)"] == "met"
    assert v["receiver memory <= guest RAM + one checkpoint"] == "met"

    rows = [row("curling", "counter", 100, 0.97, 0.25, bound=0.1, stalls=1,
                rss_mb=600.0)]
    v = verdicts(bench.check_targets(rows, {"SIGKILL": [0.6] * 3}, "512M"))
    assert v["no stall over 1 s"] == "**missed**"
    assert v["receiver memory <= guest RAM + one checkpoint"] == "**missed**"
    assert v["failover <= 0.5 s after a broken connection (kill -9)"] == "**missed**"
    assert v["median pause within 3x of the physical bound"] == "met"
    assert v["throughput >= 95% at 100 ms, dirty-10"] == "not measured"


def test_count_steps() -> None:
    # four kinds of failover rounds: kill -9, SIGSTOP, each with and without
    # a witness
    assert bench.Bench.count_steps(["curling"], ["counter"], 5, 3, 10) == 1 + 30 + 40
    assert bench.Bench.count_steps(["colo"], ["counter", "idle"], 5, 3, 10) == 14


def test_noise_floor_from_unprotected_windows_around_a_protected_one() -> None:
    seq = [window("none", None, 100.0), window("curling", 25, 95.0),
           window("none", None, 104.0), window("curling", 50, 95.0),
           window("none", None, 101.92), window("colo", 25, 50.0),
           window("colo", 50, 50.0), window("none", None, 200.0)]
    noise = bench.noise_floor(seq)
    assert noise["pairs"] == 2
    assert noise["median"] == pytest.approx(0.03)
    assert noise["max"] == pytest.approx(0.04)
    assert bench.noise_floor(seq[:2]) is None


def test_json_round_trip(tmp_path) -> None:
    w = window("curling", 100, 99.0, pauses=[0.4], cps=2)
    w.stop_phases = [(90, 40, 200, 60, 13000)]
    w.baseline_work_per_s = 100.0
    path = tmp_path / "bench.json"
    bench.write_json(path, {"mem": "512M"}, [window("none", None, 100.0), w],
                     {"SIGKILL": [0.1]})
    meta, windows, failover = bench.read_json(path)
    assert meta == {"mem": "512M"} and failover == {"SIGKILL": [0.1]}
    assert windows[1] == w


def test_least_squares_slope() -> None:
    assert bench.least_squares_slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2)
    assert bench.least_squares_slope([(0, 5), (1, 4), (2, 6), (3, 5)]) == \
        pytest.approx(0.2)
    with pytest.raises(ValueError):
        bench.least_squares_slope([(1, 1)])
    with pytest.raises(ValueError):
        bench.least_squares_slope([(1, 1), (1, 2)])


SMAPS = """\
5614b8029000-5614b8365000 r--p 00000000 fe:00 5341268    /usr/bin/qemu-system-x86_64
Size:               3312 kB
Rss:                3312 kB
5614e043f000-5614e1304000 rw-p 00000000 00:00 0          [heap]
Size:              15124 kB
Rss:                4616 kB
7fbbabe00000-7fbc2be00000 rw-p 00000000 00:00 0
Size:            2097152 kB
KernelPageSize:        4 kB
Rss:              163840 kB
7fbc2c000000-7fbc6bfff000 rwxp 00000000 00:00 0
Size:            1048572 kB
Rss:               49152 kB
7fbc70000000-7fbc70400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                1024 kB
"""


def test_rss_split_tells_guest_ram_from_qemu() -> None:
    total, guest = bench.rss_split(SMAPS, 2 << 30)
    assert total == (3312 + 4616 + 163840 + 49152 + 1024) * 1024
    assert guest == 163840 * 1024
    # a smaller guest: still only the large read-write anonymous mapping
    assert bench.rss_split(SMAPS, 512 << 20)[1] == 163840 * 1024
    assert bench.rss_split(SMAPS, 4 << 30)[1] == 0


def test_witness_failover_targets() -> None:
    """The failover rounds with a witness are checked against
    curling-timeout + 0.5 s, apart from the automatic mode's rows."""
    failover = {
        "SIGKILL (broken connection)": [0.07, 0.08],
        "SIGSTOP (silent, curling-timeout 1000 ms)": [1.02, 1.03],
        bench.WITNESS_PREFIX + "SIGKILL (etcd)": [0.09, 1.6],
        bench.WITNESS_PREFIX + "SIGSTOP (etcd, curling-timeout 1000 ms)":
            [1.6, 1.7],
    }
    targets = {t["target"]: t for t in bench.check_targets([], failover, "512M")}
    kill = targets["with agents and a witness: failover <= curling-timeout "
                   "+ 0.5 s after kill -9"]
    assert kill["verdict"] == "met"
    assert "max 1600 ms" in kill["detail"]
    stop = targets["with agents and a witness: failover <= curling-timeout "
                   "+ 0.5 s for a silent sender"]
    assert stop["verdict"] == "**missed**"
    assert targets["failover <= 0.5 s after a broken connection (kill -9)"][
        "detail"].startswith("median 75 ms")


def tls_row(system: str, interval: int, ratio: float, pause: float,
            cps: float = 9.0, vcpu: float = 0.95) -> dict:
    r = row(system, "counter", interval, ratio, pause)
    r.update(pause_p99_ms=pause * 2, checkpoints_per_s=cps, ack_ms=1.5,
             bandwidth_mb_s=3.0, sender_cpu=0.9, receiver_cpu=0.1,
             vcpu_share=vcpu, migration_share=0.03)
    return r


def test_tls_rows_side_by_side_and_their_targets() -> None:
    rows = [tls_row(bench.TLS_TWIN, 25, 0.90, 0.30, cps=30.0),
            tls_row(bench.TLS_TWIN, 100, 0.98, 0.30),
            tls_row("curling", 100, 0.50, 0.90),
            tls_row(bench.TLS_SYSTEM, 25, 0.86, 0.35, cps=28.0, vcpu=0.92),
            tls_row(bench.TLS_SYSTEM, 100, 0.97, 0.30)]
    pairs = bench.tls_pairs(rows)
    assert [(p["interval"], t["interval"]) for p, t in pairs] == \
        [(25, 25), (100, 100)]
    v = verdicts(bench.tls_targets(rows))
    assert v == {"TLS: median pause at most 25% (+0.05 ms) above plain "
                 "Curling's": "met",
                 "TLS: the guest's share of its core at most 5 points below "
                 "plain Curling's": "met"}
    report = "\n".join(bench.tls_report(rows))
    assert "| counter | 25 | 90.0% | 86.0% | 0.30 | 0.35 |" in report
    assert "| 33.3 | 35.7 |" in report          # cycle ms

    rows[3] = tls_row(bench.TLS_SYSTEM, 25, 0.80, 0.50, vcpu=0.85)
    v = verdicts(bench.tls_targets(rows))
    assert set(v.values()) == {"**missed**"}
    assert bench.tls_targets([r for r in rows if r["system"] !=
                              bench.TLS_SYSTEM]) == []
    assert bench.tls_report(rows[:3]) == []


def test_tls_system_counts_as_curling() -> None:
    assert all(map(bench.is_curling, ("curling", bench.TLS_SYSTEM,
                                      bench.TLS_TWIN)))
    assert not bench.is_curling("colo-nodelay")
    assert bench.TLS_SYSTEM in bench.SYSTEM_NOTES
    assert bench.TLS_TWIN in bench.SYSTEM_NOTES
    # unprotected first, then TLS and plain for each rep and interval
    assert bench.Bench.count_steps([bench.TLS_SYSTEM], ["counter"], 2, 3,
                                   0) == 1 + 24


def test_thread_kinds_and_shares() -> None:
    assert bench.thread_kind("CPU 0/TCG") == "vcpu"
    assert bench.thread_kind("CPU 1/KVM") == "vcpu"
    assert bench.thread_kind("mig/src/main") == "migration"
    assert bench.thread_kind("mig/src/curling-hb") == "migration"
    assert bench.thread_kind("qemu-system-x86") == "other"
    ws = [window("curling", 25, 1.0), window("curling", 25, 1.0)]
    assert bench.thread_share(ws, "vcpu") is None
    ws[0].seconds = ws[1].seconds = 5.0
    ws[0].sender_threads = {"vcpu": 4.5, "migration": 0.5}
    ws[1].sender_threads = {"vcpu": 4.0, "migration": 1.0}
    assert bench.thread_share(ws, "vcpu") == pytest.approx(0.85)
    assert bench.thread_share(ws, "migration") == pytest.approx(0.15)
    assert set(bench.thread_cpu(os.getpid())) == {"vcpu", "migration",
                                                  "other"}


def test_clock_drift_ppm() -> None:
    # 10 s of host time, 9.95 s of guest time: 0.5% behind.
    assert bench.clock_drift_ppm((1_000_000_000, 100.0),
                                 (10_950_000_000, 110.0)) == \
        pytest.approx(-5000.0)
    assert bench.clock_drift_ppm(None, (1, 2.0)) is None
    assert bench.clock_drift_ppm((1, 2.0), (5, 2.0)) is None


def test_clock_ppm_in_rows() -> None:
    ws = [window("none", None, 100.0), window("curling", 100, 90.0),
          window("curling", 100, 92.0), window("none", None, 100.0)]
    ws[0].clock_ppm, ws[3].clock_ppm = 20.0, 40.0
    ws[1].clock_ppm, ws[2].clock_ppm = -13000.0, -11000.0
    assert bench.unprotected_clock_ppm(ws) == 30.0
    rows = bench.summarise(ws)
    assert rows[0]["clock_ppm"] == -12000.0
    assert bench.unprotected_clock_ppm(ws[1:3]) is None
