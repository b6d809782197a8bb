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
