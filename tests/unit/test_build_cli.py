# SPDX-License-Identifier: GPL-2.0-or-later
"""scripts/build.py: argument parsing and one-line errors."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import ModuleType

import pytest

from conftest import load_script



@pytest.fixture
def build() -> ModuleType:
    return load_script("build")


def test_default_command_is_all(build: ModuleType) -> None:
    args = build.parse_args([])
    assert args.command == "all" and args.qemu_version == "10.2.2"
    assert args.no_system_deps is False


def test_options_before_and_after_command(build: ModuleType) -> None:
    assert build.parse_args(["--no-system-deps", "build"]).no_system_deps
    args = build.parse_args(["build", "--no-system-deps", "-j", "3"])
    assert args.no_system_deps and args.jobs == 3
    assert build.parse_args(["check", "--bisect"]).bisect
    assert build.parse_args(["fetch", "--qemu-version", "10.0.13"]).qemu_version == "10.0.13"


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def test_error_is_one_line_and_exit_1(build: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(build, "ensure_venv", lambda argv: None)
    assert build.main(["fetch", "--qemu-version", "1.2.3"]) == 1
    assert errors(caplog) == ["unknown QEMU version '1.2.3' (known: 10.0.13, 10.2.2)"]


def test_error_prefix() -> None:
    module = load_script("build")
    record = logging.LogRecord("build", logging.ERROR, "", 0, "boom", None, None)
    assert module._Formatter("%(message)s").format(record) == "error: boom"


def test_guest_builder_missing_is_clear(build: ModuleType, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(build, "ensure_venv", lambda argv: None)
    monkeypatch.setitem(sys.modules, "curlingtool.guest", None)
    # an earlier import of curlingtool.guest leaves it on the package too
    import curlingtool
    monkeypatch.delattr(curlingtool, "guest", raising=False)
    assert build.main(["guest"]) == 1
    (line,) = errors(caplog)
    assert line.startswith("test guest builder unavailable (scripts/curlingtool/guest.py)")


def test_venv_stamp_follows_pyproject(build: ModuleType) -> None:
    assert len(build._deps_digest()) == 64
