# SPDX-License-Identifier: GPL-2.0-or-later
"""scripts/bench.py: where its report goes."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from conftest import load_script

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench_script() -> ModuleType:
    return load_script("bench")


def test_full_run_writes_the_committed_report(bench_script: ModuleType) -> None:
    assert Path(bench_script.parse_args([]).out) == REPO / "docs" / "benchmarks"


def test_quick_run_never_writes_over_it(bench_script: ModuleType) -> None:
    out = Path(bench_script.parse_args(["--quick"]).out)
    assert out == REPO / "build" / "bench-quick"


def test_out_wins(bench_script: ModuleType, tmp_path: Path) -> None:
    args = bench_script.parse_args(["--quick", "--out", str(tmp_path)])
    assert Path(args.out) == tmp_path


def test_tls_intervals(bench_script: ModuleType) -> None:
    assert bench_script.parse_args([]).tls_intervals == [25, 100]
    assert bench_script.parse_args(["--quick"]).tls_intervals == [100]
    assert bench_script.parse_args(["--tls-intervals", "none"]) \
        .tls_intervals == []
    assert bench_script.parse_args(["--tls-intervals", "50"]) \
        .tls_intervals == [50]


def test_failover_rounds(bench_script: ModuleType) -> None:
    assert bench_script.parse_args([]).failover_rounds == 10
    assert bench_script.parse_args(["--quick"]).failover_rounds == 3
    assert bench_script.parse_args(["--failover-rounds", "0"]) \
        .failover_rounds == 0
