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

Each subtest runs in a process of its own, in two lanes at a time: the
subtests spend most of their time waiting for a migration held to 3 MB/s,
so two lanes take about 60% of the time of one.  Every subtest's TAP
output is kept in ``migration-test.log``; the test fails when a subtest
fails or none ran.  ~2.5 min under TCG.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import re
import shutil
import signal
import subprocess
import threading
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
LANES = 2
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

    def _command(self, *args: str) -> list[str]:
        """migration-test with ``args``, unable to see /dev/kvm."""
        run = [str(QEMU_BUILD / "tests" / "qtest" / "migration-test"), *args]
        if not self.hide_kvm:
            return run
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                'mount --bind /dev/null /dev/kvm && exec "$@"', "sh", *run]

    def _env(self, wrapper: pathlib.Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(QTEST_QEMU_BINARY=str(wrapper),
                   QTEST_QEMU_IMG=str(QEMU_BUILD / "qemu-img"))
        daemon = QEMU_BUILD / "storage-daemon" / "qemu-storage-daemon"
        if os.access(daemon, os.X_OK):
            env["QTEST_QEMU_STORAGE_DAEMON_BINARY"] = str(daemon)
        env.pop("QTEST_LOG", None)
        return env

    def _list(self, env: dict[str, str]) -> list[str]:
        """The subtests below TEST_PATH."""
        proc = subprocess.run(self._command("-l", "-r", TEST_PATH), env=env,
                              cwd=str(QEMU_BUILD), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
        names = [line.strip() for line in proc.stdout.splitlines()
                 if line.startswith(TEST_PATH + "/")]
        self.assertEqual(proc.returncode, 0, f"migration-test -l failed: "
                         f"{proc.stderr.strip()}")
        self.assertTrue(names, f"migration-test lists nothing below "
                        f"{TEST_PATH}")
        return names

    def _run_one(self, name: str, env: dict[str, str],
                 deadline: float) -> tuple[Optional[int], str]:
        """Run the subtest ``name``: (exit status or None when it ran out of
        time, its output)."""
        proc = subprocess.Popen(self._command("--tap", "-k", "-r", name),
                                stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env,
                                cwd=str(QEMU_BUILD), start_new_session=True)
        try:
            out, _ = proc.communicate(
                timeout=max(1.0, deadline - time.monotonic()))
            status: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            status = None
        return status, out.decode(errors="replace")

    def _run(self, wrapper: pathlib.Path
             ) -> list[tuple[str, Optional[int], str]]:
        """Run every subtest, LANES at a time: (name, exit status, output)
        in the listed order."""
        env = self._env(wrapper)
        names = self._list(env)
        results: dict[str, tuple[Optional[int], str]] = {}
        deadline = time.monotonic() + RUN_TIMEOUT

        def lane(mine: list[str]) -> None:
            for name in mine:
                results[name] = self._run_one(name, env, deadline)

        self.log.info("running %d subtests in %d lanes: %s", len(names),
                      LANES, " ".join(self._command("--tap", "-k", "-r",
                                                    "NAME")))
        start = time.monotonic()
        threads = [threading.Thread(target=lane, args=(names[i::LANES],))
                   for i in range(LANES)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.log.info("migration-test's subtests ended after %.0f s",
                      time.monotonic() - start)
        runs = [(name, *results[name]) for name in names]
        with (self.logdir_path / "migration-test.log").open("w") as log:
            for name, status, output in runs:
                log.write(f"### {name}: exit status {status}\n{output}\n")
        return runs

    @staticmethod
    def _parse(output: str) -> tuple[Optional[int], list[str], list[str],
                                     list[str]]:
        """(plan, passed, skipped, failed) of one TAP output."""
        passed: list[str] = []
        skipped: list[str] = []
        failed: list[str] = []
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
        return plan, passed, skipped, failed

    # -- the test --------------------------------------------------------

    def test_precopy(self) -> None:
        """Every subtest of ``migration-test -r /x86_64/migration/precopy``
        passes."""
        self._build()
        wrapper = self._wrapper()
        self._take_lock()
        passed, skipped, failed = [], [], []
        for name, status, output in self._run(wrapper):
            plan, ok, skip, bad = self._parse(output)
            passed += ok
            skipped += skip
            failed += bad
            if status is None:
                failed.append(f"{name} (still running after {RUN_TIMEOUT:g} "
                              "s)")
            elif status != 0 and not bad:
                failed.append(f"{name} (exit status {status})")
            elif plan is None or len(ok) + len(skip) + len(bad) != plan:
                failed.append(f"{name} (ended before its plan)")
        self.log.info("passed %d: %s", len(passed), ", ".join(passed))
        if skipped:
            self.log.info("skipped %d: %s", len(skipped), ", ".join(skipped))
        self.assertEqual(failed, [], "migration-test subtests failed; see "
                         "migration-test.log")
        self.assertTrue(passed, "migration-test ran no subtest")
