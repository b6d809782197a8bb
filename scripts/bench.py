#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Benchmark the cost of protection and the failover time.

    .venv/bin/python3 scripts/bench.py            full run (about 30 minutes)
    .venv/bin/python3 scripts/bench.py --quick    smoke run (a few minutes)

Compares, on this machine, in one run: the guest unprotected, protected by
Curling, and protected by QEMU's COLO in periodic mode (with and without
TCP_NODELAY on its socket), over checkpoint intervals and guest workloads;
then a network service, disks, TLS, and real applications (pgbench and an
HTTP load generator in the Debian application guest).
Writes raw samples (bench.json), a markdown report (README.md) and plots
to --out (default docs/benchmarks/, where the committed full report lives;
build/bench-quick/ for --quick, so that a smoke run never overwrites it).
It asserts nothing: read the report.
See scripts/curlingtool/bench.py for what is measured and how.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import os
import pathlib
import shlex
import shutil
import signal
import sys
import time
from typing import Callable

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from curlingtool import CurlingError  # noqa: E402
from curlingtool import appbench, bench, diskbench, netbench  # noqa: E402
from curlingtool.debimage import find_image  # noqa: E402
from curlingtool.vm import built_qemu_and_guest  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="few intervals, workloads and rounds: a smoke run")
    p.add_argument("--systems", default=None,
                   help=f"comma-separated, from {','.join(bench.SYSTEMS)}")
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated, from {','.join(bench.WORKLOADS)}")
    p.add_argument("--intervals", default=None,
                   help="comma-separated checkpoint intervals in ms")
    p.add_argument("--window", type=float, default=None,
                   help="seconds measured per point")
    p.add_argument("--reps", type=int, default=None,
                   help="Curling repetitions (interleaved with unprotected)")
    p.add_argument("--failover-rounds", type=int, default=None,
                   help="rounds of each kind of failover; 0 skips them")
    p.add_argument("--net-intervals", default=None,
                   help="intervals (ms) of the network service rows; 'none' "
                   "skips them (they need root and iproute2)")
    p.add_argument("--tls-intervals", default=None,
                   help="intervals (ms) of the Curling-over-TLS rows, for "
                   f"the workloads among {','.join(bench.TLS_WORKLOADS)}; "
                   "'none' skips them")
    p.add_argument("--disk-intervals", default=None,
                   help="intervals (ms) of the disk rows (COLO's too when "
                   "colo-nodelay is in --systems); 'none' skips them")
    p.add_argument("--app-intervals", default=None,
                   help="intervals (ms) of the application rows (pgbench and "
                   "HTTP in the Debian guest); 'none' skips them")
    p.add_argument("--app-window", type=float, default=None,
                   help="seconds each application workload runs")
    p.add_argument("--out", default=None,
                   help="report folder (default docs/benchmarks/; "
                   "build/bench-quick/ with --quick)")
    p.add_argument("--accel", default=os.environ.get("CURLING_ACCEL", "tcg"),
                   help="tcg (default here) or kvm")
    p.add_argument("--from-json", metavar="BENCH_JSON",
                   help="measure nothing: write the report and plots to --out "
                   "again from the raw samples of an earlier run")
    args = p.parse_args(argv)
    quick = args.quick
    args.out = args.out or str(REPO / ("build/bench-quick" if quick
                                       else "docs/benchmarks"))
    args.systems = (args.systems or ("curling,colo-nodelay" if quick
                                     else ",".join(bench.SYSTEMS))).split(",")
    args.workloads = (args.workloads or ("counter,dirty-10" if quick
                                         else ",".join(bench.WORKLOADS))).split(",")
    args.intervals = [int(i) for i in (args.intervals or (
        "50,200" if quick else ",".join(map(str, bench.INTERVALS)))).split(",")]
    args.window = args.window or (3.0 if quick else 5.0)
    args.reps = args.reps or (1 if quick else 3)
    if args.failover_rounds is None:
        args.failover_rounds = 3 if quick else 10
    disk = args.disk_intervals or ("100" if quick else "25,100,500")
    args.disk_intervals = ([] if disk == "none"
                           else [int(i) for i in disk.split(",")])
    tls = args.tls_intervals or ("100" if quick else ",".join(
        map(str, bench.TLS_INTERVALS)))
    args.tls_intervals = ([] if tls == "none"
                          else [int(i) for i in tls.split(",")])
    app = args.app_intervals or ("100" if quick else "25,100")
    args.app_intervals = ([] if app == "none"
                          else [int(i) for i in app.split(",")])
    args.app_window = args.app_window or (10.0 if quick else 30.0)
    net = args.net_intervals or ("100" if quick else "25,50,100,200")
    args.net_intervals = ([] if net == "none"
                          else [int(i) for i in net.split(",")])
    for name in args.systems:
        if name not in bench.SYSTEMS:
            p.error(f"unknown system {name!r}")
    for name in args.workloads:
        if name not in bench.WORKLOADS:
            p.error(f"unknown workload {name!r}")
    return args


def report(out: pathlib.Path, meta: dict, windows: list[bench.Window],
           failover: dict[str, list[float]],
           progress: Callable[[str], None],
           net: list[dict] | None = None,
           disk: list[dict] | None = None,
           app: list[dict] | None = None) -> None:
    """Summary, targets, JSON, plots and the markdown report, into out."""
    net = net or []
    disk = disk or []
    app = app or []
    rows = bench.summarise(windows, meta["memcpy_gb_s"] * 1e9)
    meta["noise"] = bench.noise_floor(windows)
    meta["unprotected_clock_ppm"] = bench.unprotected_clock_ppm(windows)
    colo_pauses = [r["pause_median_ms"] for r in rows
                   if r["system"].startswith("colo") and
                   r["interval"] == diskbench.TARGET_INTERVAL and
                   r["pause_median_ms"]]
    extra = (bench.tls_targets(rows) +
             (netbench.net_targets(net) if net else []) +
             (diskbench.disk_targets(disk, min(colo_pauses, default=None))
              if disk else []) +
             (appbench.app_targets(app) if app else []))
    targets = bench.check_targets(rows, failover, meta["mem"]) + extra
    bench.write_json(out / "bench.json", meta, windows, failover, targets,
                     net, disk, app)
    plots = bench.plot(out, rows, windows)
    bench.write_report(out / "README.md", meta, rows, failover, plots,
                       extra_targets=extra,
                       sections=(bench.tls_report(rows) +
                                 netbench.net_report(net) +
                                 diskbench.disk_report(disk) +
                                 appbench.app_report(app)))
    for t in targets:
        progress(f"target {t['verdict'].strip('*')}: {t['target']}: {t['detail']}")
    progress(f"report: {out / 'README.md'}")


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = pathlib.Path(args.out)
    if args.from_json:
        try:
            meta, windows, failover = bench.read_json(pathlib.Path(args.from_json))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"error: {args.from_json}: not a benchmark result ({exc})")
            return 1
        out.mkdir(parents=True, exist_ok=True)
        report(out, meta, windows, failover, print,
               bench.read_net_json(pathlib.Path(args.from_json)),
               bench.read_disk_json(pathlib.Path(args.from_json)),
               bench.read_app_json(pathlib.Path(args.from_json)))
        return 0
    try:
        qemu, guest = built_qemu_and_guest(REPO)
    except CurlingError as exc:
        print(f"error: {exc}")
        return 1
    image = find_image(REPO) if args.app_intervals else None
    if args.app_intervals and image is None:
        print("error: no Debian application guest for the application rows "
              "(run scripts/build.py image, or --app-intervals none)")
        return 1
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - start:6.0f} s] {line}", flush=True)

    workdir = bench.new_workdir()
    runner = bench.Bench(qemu, guest, workdir, args.accel, args.window, progress)
    runner.steps = bench.Bench.count_steps(args.systems, args.workloads,
                                           len(args.intervals), args.reps,
                                           args.failover_rounds)
    if "curling" in args.systems and args.tls_intervals:
        runner.steps += bench.Bench.count_steps(
            [bench.TLS_SYSTEM],
            [w for w in args.workloads if w in bench.TLS_WORKLOADS],
            len(args.tls_intervals), args.reps, 0)
    ncpus = len(os.sched_getaffinity(0))
    # Keep this process off the sender's CPU: it would steal guest time.
    os.sched_setaffinity(0, {runner.cpus[1]})
    progress("measuring memcpy bandwidth")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "accel": args.accel, "cpus": ncpus,
        "pin": list(runner.cpus), "mem": bench.MEM,
        "kernel": guest.kernel_version, "window": args.window,
        "memcpy_gb_s": bench.memcpy_bandwidth() / 1e9,
        "command": "scripts/bench.py " + shlex.join(argv),
        "qemu": str(qemu),
    }
    windows: list[bench.Window] = []
    failover: dict[str, list[float]] = {}
    net: list[dict] = []
    disk: list[dict] = []
    app: list[dict] = []
    try:
        for system in args.systems:
            for workload in args.workloads:
                windows += runner.run(system, workload, args.intervals, args.reps)
                # TLS right after plain Curling, on the same workload
                if (system == "curling" and args.tls_intervals and
                        workload in bench.TLS_WORKLOADS):
                    windows += runner.run(bench.TLS_SYSTEM, workload,
                                          args.tls_intervals, args.reps)
                # raw samples so far: a later failure loses nothing measured
                bench.write_json(out / "bench.json", meta, windows, failover)
        if "curling" in args.systems and args.failover_rounds:
            failover["SIGKILL (broken connection)"] = runner.failover(
                signal.SIGKILL, args.failover_rounds)
            failover["SIGSTOP (silent, curling-timeout "
                     f"{bench.FAILOVER_TIMEOUT_MS} ms)"] = runner.failover(
                signal.SIGSTOP, args.failover_rounds)
            with bench.witness_for(workdir, progress) as (kind, spec):
                w = bench.WITNESS_PREFIX
                failover[f"{w}SIGKILL ({kind})"] = runner.failover(
                    signal.SIGKILL, args.failover_rounds, witness=spec)
                failover[f"{w}SIGSTOP ({kind}, curling-timeout "
                         f"{bench.FAILOVER_TIMEOUT_MS} ms)"] = runner.failover(
                    signal.SIGSTOP, args.failover_rounds, witness=spec)
        if args.net_intervals:
            bench.write_json(out / "bench.json", meta, windows, failover)
            nb = netbench.NetBench(qemu, guest, workdir, args.accel,
                                   max(args.window, 5.0), bench.MEM,
                                   runner.cpus, progress)
            net = [dataclasses.asdict(p)
                   for p in nb.run(args.net_intervals)]
        if args.disk_intervals:
            bench.write_json(out / "bench.json", meta, windows, failover,
                             net=net)
            db = diskbench.DiskBench(qemu, qemu.parent / "qemu-img", guest,
                                     workdir, args.accel,
                                     max(args.window, 5.0) * 2, bench.MEM,
                                     runner.cpus, progress)
            disk = [dataclasses.asdict(p) for p in db.run(
                args.disk_intervals,
                colo=diskbench.COLO_SYSTEM in args.systems)]
        if args.app_intervals:
            assert image is not None
            bench.write_json(out / "bench.json", meta, windows, failover,
                             net=net, disk=disk)
            ab = appbench.AppBench(image, qemu, guest, workdir, args.accel,
                                   args.app_window, bench.MEM, runner.cpus,
                                   progress)
            app = [dataclasses.asdict(p) for p in ab.run(args.app_intervals)]
    except (CurlingError, AssertionError) as exc:
        print(f"error: {exc} (QEMU logs kept in {workdir}; samples measured "
              f"so far in {out / 'bench.json'}: --from-json reports them)")
        return 1
    except KeyboardInterrupt:
        print(f"interrupted (QEMU logs in {workdir})")
        return 130
    report(out, meta, windows, failover, progress, net, disk, app)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
