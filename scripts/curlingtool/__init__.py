# SPDX-License-Identifier: GPL-2.0-or-later
"""Curling build tooling: one module per concern.

- deps:       Debian packages the build and the tests need
- source:     obtain and verify the pinned upstream QEMU source
- patchqueue: patches/series I/O, apply into build/qemu, export back
- qemubuild:  configure and build QEMU with meson/ninja
- guest:      the test guest image (kernel + initramfs)
- debimage:   the Debian application guest (PostgreSQL, nginx)

Library code raises CurlingError subclasses; only scripts/build.py turns
them into a one-line message and exit code 1.
"""

from __future__ import annotations

import logging
from typing import Optional


class CurlingError(Exception):
    """Base class of every error the tooling reports to the user."""


def setup_logging(logfile: Optional[str] = None) -> None:
    """A command's log: time-stamped lines on stderr (and in ``logfile``);
    the QMP library's own connection errors kept quiet."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if logfile:
        handlers.append(logging.FileHandler(logfile))
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="%(asctime)s %(message)s")
    # the QMP library logs every failed connection try as an error
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
