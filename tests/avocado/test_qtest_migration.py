# SPDX-License-Identifier: GPL-2.0-or-later
"""QEMU's own migration qtest still passes with the Curling series applied.

Builds ``tests/qtest/migration-test`` and ``qemu-img`` in the QEMU build
tree (``build/qemu-build``, made by ``scripts/build.py``) and runs the
precopy subset, ``migration-test -r /x86_64/migration/precopy``, against
the built ``qemu-system-x86_64``:

* the test always asks for ``-accel kvm -accel tcg``; where ``/dev/kvm``
  exists it is hidden (a private mount namespace binds ``/dev/null`` over
  it) so that every QEMU runs under TCG instead of probing a KVM that may
  not work;
* the build tree's QEMU has no firmware installed beside it: a wrapper
  script called ``qemu-system-x86_64`` passes ``-L`` for the system's
  SeaBIOS, QEMU and iPXE firmware directories.

The TAP output is kept in ``migration-test.log``; the test fails when a
subtest fails or none ran.  ~4.5 min under TCG.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import re
import shutil
import signal
import subprocess
import time
from typing import Optional

import avocado

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
BUILD_DIR = REPO_ROOT / "build"
QEMU_BUILD = BUILD_DIR / "qemu-build"
#: Guest tests take this lock (tests/avocado/curling_test.py); the qtest
#: runs TCG guests too, so it waits for them (avocado runs two tests at
#: a time), but only so long.
TEST_LOCK = BUILD_DIR / "avocado.lock"
LOCK_WAIT = 2700.0

TEST_PATH = "/x86_64/migration/precopy"
RUN_TIMEOUT = 720.0
BUILD_TARGETS = ("tests/qtest/migration-test", "qemu-img")
BUILD_ATTEMPTS = 4
BUILD_RETRY_WAIT = 30.0
FIRMWARE_DIRS = ("/usr/share/seabios", "/usr/share/qemu", "/usr/lib/ipxe/qemu")

TAP_RE = re.compile(r"^(?P<status>ok|not ok)\s+(?P<n>\d+)\s*(?:-\s*)?"
                    r"(?P<name>[^#]*?)\s*(?:#\s*(?P<directive>.*))?$")
PLAN_RE = re.compile(r"^1\.\.(\d+)")


class QtestMigration(avocado.Test):
    """
    :avocado: tags=arch:x86_64,qtest,slow
    """

    timeout = 3600

    def setUp(self) -> None:
        self.logdir_path = pathlib.Path(self.logdir)
        self._lock = None
        qemu = QEMU_BUILD / "qemu-system-x86_64"
        if not (QEMU_BUILD / "build.ninja").is_file():
            self.cancel(f"no QEMU build tree at {QEMU_BUILD} (run "
                        "scripts/build.py)")
        if not os.access(qemu, os.X_OK):
            self.cancel(f"no {qemu} in the build tree (run scripts/build.py)")
        self.ninja = self._find_ninja()
        if self.ninja is None:
            self.cancel("no ninja to build the migration qtest")
        self.hide_kvm = os.path.exists("/dev/kvm")
        if self.hide_kvm and (os.geteuid() != 0 or not shutil.which("unshare")):
            self.cancel("/dev/kvm exists and cannot be hidden (needs root and "
                        "unshare): migration-test would try KVM")

    def tearDown(self) -> None:
        if self._lock is not None:
            self._lock.close()

    @staticmethod
    def _find_ninja() -> Optional[str]:
        venv = REPO_ROOT / ".venv" / "bin" / "ninja"
        if os.access(venv, os.X_OK):
            return str(venv)
        return shutil.which("ninja")

    # -- steps -----------------------------------------------------------

    def _build(self) -> None:
        """Build the qtest and qemu-img; retry while another build may be
        running in the same tree."""
        log = self.logdir_path / "ninja.log"
        cmd = [self.ninja, "-C", str(QEMU_BUILD), *BUILD_TARGETS]
        for attempt in range(1, BUILD_ATTEMPTS + 1):
            self.log.info("build (attempt %d): %s", attempt, " ".join(cmd))
            with log.open("ab") as out:
                proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=600)
            if proc.returncode == 0:
                return
            tail = log.read_text(errors="replace").splitlines()[-15:]
            self.log.warning("ninja failed (%d):\n%s", proc.returncode,
                             "\n".join(tail))
            if attempt < BUILD_ATTEMPTS:
                time.sleep(BUILD_RETRY_WAIT)
        self.fail(f"cannot build {' '.join(BUILD_TARGETS)} in {QEMU_BUILD}; "
                  f"see {log}")

    def _wrapper(self) -> pathlib.Path:
        """A qemu-system-x86_64 that finds the system's firmware."""
        wrapdir = pathlib.Path(self.workdir) / "bin"
        wrapdir.mkdir(parents=True, exist_ok=True)
        wrapper = wrapdir / "qemu-system-x86_64"
        firmware = " ".join(f"-L {d}" for d in FIRMWARE_DIRS
                            if os.path.isdir(d))
        wrapper.write_text("#!/bin/sh\n"
                           f"exec {QEMU_BUILD / 'qemu-system-x86_64'} "
                           f"{firmware} \"$@\"\n")
        wrapper.chmod(0o755)
        return wrapper

    def _take_lock(self) -> None:
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        lock = TEST_LOCK.open("w")
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self._lock = lock
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.log.warning("guest tests still hold %s after %g s; "
                                     "running alongside them", TEST_LOCK,
                                     LOCK_WAIT)
                    lock.close()
                    return
                time.sleep(0.5)

    def _run(self, wrapper: pathlib.Path) -> tuple[int, str]:
        test_bin = QEMU_BUILD / "tests" / "qtest" / "migration-test"
        env = dict(os.environ)
        env.update(QTEST_QEMU_BINARY=str(wrapper),
                   QTEST_QEMU_IMG=str(QEMU_BUILD / "qemu-img"))
        daemon = QEMU_BUILD / "storage-daemon" / "qemu-storage-daemon"
        if os.access(daemon, os.X_OK):
            env["QTEST_QEMU_STORAGE_DAEMON_BINARY"] = str(daemon)
        env.pop("QTEST_LOG", None)
        run = [str(test_bin), "--tap", "-k", "-r", TEST_PATH]
        if self.hide_kvm:
            cmd = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                   'mount --bind /dev/null /dev/kvm && exec "$@"', "sh", *run]
        else:
            cmd = run
        log = self.logdir_path / "migration-test.log"
        self.log.info("running: %s", " ".join(cmd))
        start = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env,
                                    cwd=str(QEMU_BUILD),
                                    start_new_session=True)
            try:
                status = proc.wait(timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                self.fail(f"migration-test still running after "
                          f"{RUN_TIMEOUT:g} s; see {log}")
        self.log.info("migration-test exited with %d after %.0f s", status,
                      time.monotonic() - start)
        return status, log.read_text(errors="replace")

    # -- the test --------------------------------------------------------

    def test_precopy(self) -> None:
        """``migration-test -r /x86_64/migration/precopy`` passes."""
        self._build()
        wrapper = self._wrapper()
        self._take_lock()
        status, output = self._run(wrapper)

        passed, skipped, failed = [], [], []
        plan = None
        for line in output.splitlines():
            line = line.rstrip()
            m = PLAN_RE.match(line)
            if m:
                plan = int(m.group(1))
                continue
            if line.startswith("Bail out!"):
                failed.append(line)
                continue
            m = TAP_RE.match(line)
            if not m:
                continue
            name = m["name"] or f"#{m['n']}"
            directive = (m["directive"] or "").upper()
            if m["status"] == "not ok" and not directive.startswith("TODO"):
                failed.append(name)
            elif directive.startswith("SKIP"):
                skipped.append(f"{name} ({m['directive']})")
            else:
                passed.append(name)
        self.log.info("passed %d: %s", len(passed), ", ".join(passed))
        if skipped:
            self.log.info("skipped %d: %s", len(skipped), ", ".join(skipped))

        self.assertEqual(failed, [], "migration-test subtests failed; see "
                         "migration-test.log")
        self.assertTrue(passed, "migration-test ran no subtest")
        if plan is not None:
            self.assertEqual(len(passed) + len(skipped) + len(failed), plan,
                             "migration-test ended before its plan")
        self.assertEqual(status, 0, "migration-test exited with an error")
