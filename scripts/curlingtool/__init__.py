# SPDX-License-Identifier: GPL-2.0-or-later
"""Curling build tooling: one module per concern.

- deps:       Debian packages the build and the tests need
- source:     obtain and verify the pinned upstream QEMU source
- patchqueue: patches/series I/O, apply into build/qemu, export back
- qemubuild:  configure and build QEMU with meson/ninja
- guest:      the test guest image (kernel + initramfs)

Library code raises CurlingError subclasses; only scripts/build.py turns
them into a one-line message and exit code 1.
"""

from __future__ import annotations


class CurlingError(Exception):
    """Base class of every error the tooling reports to the user."""
