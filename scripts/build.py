#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Build Curling: pinned upstream QEMU + patches/ -> build/bin/qemu-system-x86_64.

    python3 scripts/build.py            everything: deps, fetch, apply,
                                        configure, build, guest, image
    python3 scripts/build.py COMMAND    one stage (see --help)

Runs with a bare system python3: the standard library is enough to set
up .venv/ from pyproject.toml (again whenever that file changes), after
which the script runs itself again inside .venv/ and uses the
curlingtool package next to it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
VENV = REPO / ".venv"
VENV_BIN = VENV / "bin"
VENV_PYTHON = VENV_BIN / "python3"
VENV_STAMP = VENV / ".curling-deps.sha256"
PYPROJECT = REPO / "pyproject.toml"
BUILD = REPO / "build"
PATCHES = REPO / "patches"
QEMU_SRC = BUILD / "qemu"
QEMU_BUILD = BUILD / "qemu-build"
BIN = BUILD / "bin"
LOGS = BUILD / "logs"

log = logging.getLogger("build")


class Fatal(Exception):
    """An error of the bootstrap itself (before curlingtool can be imported)."""


# ---------------------------------------------------------------------------
# bootstrap: standard library only

def _deps_digest() -> str:
    digest = hashlib.sha256(PYPROJECT.read_bytes())
    digest.update(f"{sys.version_info[:2]}".encode())
    return digest.hexdigest()


def _in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def ensure_venv(argv: list[str]) -> None:
    """Create/update .venv from pyproject.toml, then continue inside it."""
    digest = _deps_digest()
    if not VENV_PYTHON.exists():
        log.info("==> venv: creating %s", VENV)
        proc = subprocess.run([sys.executable, "-m", "venv", str(VENV)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, check=False)
        if proc.returncode != 0:
            shutil.rmtree(VENV, ignore_errors=True)
            raise Fatal("python3 -m venv failed (Debian package python3-venv "
                        "missing? apt-get install python3-venv): "
                        + (proc.stdout.strip().splitlines() or ["?"])[-1])
    try:
        current = VENV_STAMP.read_text().strip()
    except OSError:
        current = ""
    if current != digest:
        with open(PYPROJECT, "rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
        log.info("==> venv: pip install %s", " ".join(deps))
        proc = subprocess.run([str(VENV_PYTHON), "-m", "pip", "install",
                               "--disable-pip-version-check", "--progress-bar=off",
                               "-q", *deps], check=False)
        if proc.returncode != 0:
            raise Fatal(f"pip install into {VENV} failed (exit {proc.returncode})")
        VENV_STAMP.write_text(digest + "\n")
    if _in_venv():
        return
    if os.environ.get("CURLING_BUILD_REEXEC"):
        raise Fatal(f"running inside {VENV} failed (sys.prefix is {sys.prefix})")
    env = dict(os.environ, CURLING_BUILD_REEXEC="1", VIRTUAL_ENV=str(VENV),
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("PYTHONHOME", None)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(str(VENV_PYTHON), [str(VENV_PYTHON), str(Path(__file__).resolve()),
                                 *argv], env)


# ---------------------------------------------------------------------------
# commands: thin dispatchers into curlingtool

def _queue() -> Any:
    from curlingtool.patchqueue import PatchQueue
    return PatchQueue(PATCHES, QEMU_SRC)


def _qemu_build() -> Any:
    from curlingtool.qemubuild import QemuBuild
    return QemuBuild(QEMU_SRC, QEMU_BUILD, BIN, VENV_BIN, LOGS)


def cmd_deps(args: argparse.Namespace) -> None:
    from curlingtool import deps
    deps.ensure(install=not args.no_system_deps)


def cmd_fetch(args: argparse.Namespace) -> Any:
    from curlingtool import qemubuild, source
    qemubuild.check_disk_space(BUILD, 0.5, "downloading QEMU")
    release = source.get_release(args.qemu_version)
    tarball = Path(args.qemu_tarball).resolve() if args.qemu_tarball else None
    return source.Obtainer(release=release, repo_root=REPO, build_dir=BUILD,
                           qemu_tarball=tarball, sha256=args.sha256,
                           mirror=args.debian_mirror).obtain()


def cmd_apply(args: argparse.Namespace, src: Any = None) -> None:
    from curlingtool import qemubuild
    if src is None:
        src = cmd_fetch(args)
    if not QEMU_SRC.exists():
        qemubuild.check_disk_space(BUILD, qemubuild.SPACE_APPLY_GIB, "build/qemu")
    result = _queue().apply(src, force=getattr(args, "force", False))
    if result.skipped:
        log.info("skipped for %s source: %s", src.kind, " ".join(result.skipped))
    log.info("build/qemu: %s + %d patch(es), HEAD %s", src.kind,
             len(result.applied), result.head[:12])


def _source_kind() -> str:
    return str(_queue().require_state()["kind"])


def cmd_configure(args: argparse.Namespace) -> None:
    cmd_deps(args)
    _qemu_build().configure(_source_kind(), force=getattr(args, "force", False))


def cmd_build(args: argparse.Namespace) -> None:
    from curlingtool import qemubuild
    cmd_deps(args)
    fresh = not (QEMU_BUILD / "build.ninja").exists()
    qemubuild.check_disk_space(BUILD, qemubuild.SPACE_BUILD_GIB if fresh else 0.5,
                               "building QEMU")
    qb = _qemu_build()
    qb.configure(_source_kind())
    qb.build(njobs=args.jobs)


def cmd_export(args: argparse.Namespace) -> None:
    result = _queue().export()
    for name in result.written:
        log.info("wrote patches/%s", name)
    for name in result.removed:
        log.info("removed patches/%s", name)
    if result.series_changed:
        log.info("wrote patches/series")
    if not result.changed:
        log.info("patches/ already matches build/qemu")


def cmd_check(args: argparse.Namespace) -> None:
    from curlingtool import CurlingError
    from curlingtool.patchqueue import bisect_build_points, read_series
    from curlingtool.qemubuild import BuildError
    queue = _queue()
    queue.require_state()
    checkpatch = QEMU_SRC / "scripts" / "checkpatch.pl"
    failed = []
    for entry in read_series(PATCHES):
        proc = subprocess.run(["perl", str(checkpatch), str(PATCHES / entry.name)],
                              cwd=QEMU_SRC, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=False)
        out = proc.stdout.strip()
        summary = next((ln for ln in out.splitlines() if ln.startswith("total:")),
                       out.splitlines()[-1] if out else "")
        clean = proc.returncode == 0 and "WARNING" not in out
        log.info("checkpatch %s: %s %s", entry.name,
                 "ok" if clean else "FAIL", summary)
        if not clean or args.verbose:
            print(out)
        if not clean:
            failed.append(f"checkpatch {entry.name}")
    if args.bisect:
        cmd_deps(args)
        qb = _qemu_build()
        qb.configure(_source_kind())
        _repo, _upstream, commits = queue.commits()
        points = bisect_build_points(read_series(PATCHES), _source_kind())
        if len(points) != len(commits):     # not exported yet: build each
            points = [True] * len(commits)
        with contextlib.closing(queue.bisect_steps(commits)) as steps:
            for commit, point in zip(steps, points):
                subject = commit.message.splitlines()[0]
                if not point:
                    log.info("==> bisect: %s %s (not built: its source kind's "
                             "fix-ups build together)", str(commit.id)[:12], subject)
                    continue
                log.info("==> bisect: %s %s", str(commit.id)[:12], subject)
                try:
                    qb.build(njobs=args.jobs)
                except BuildError as exc:
                    log.error("bisect: does not build after %r: %s", subject, exc)
                    failed.append(f"build after {subject!r}")
    if failed:
        raise CurlingError(f"check failed: {'; '.join(failed)}")
    log.info("check: all patches clean%s", " and bisectable" if args.bisect else "")


def cmd_guest(args: argparse.Namespace) -> None:
    from curlingtool import CurlingError
    try:
        from curlingtool import guest
    except ImportError as exc:
        raise CurlingError(f"test guest builder unavailable "
                           f"(scripts/curlingtool/guest.py): {exc}") from None
    errors = getattr(guest, "GuestError", ())
    try:
        image = guest.build_guest(REPO)
    except errors as exc:
        raise CurlingError(f"guest: {exc}") from None
    log.info("guest: kernel %s, initrd %s", image.kernel, image.initrd)


def cmd_image(args: argparse.Namespace) -> None:
    from curlingtool import CurlingError
    from curlingtool import debimage
    try:
        image = debimage.build_image(REPO, args.debian_mirror)
    except debimage.GuestError as exc:
        raise CurlingError(f"image: {exc}") from None
    log.info("image: %s (kernel %s)", image.disk, image.kernel)


def cmd_clean(args: argparse.Namespace) -> None:
    from curlingtool import CurlingError
    doomed = [QEMU_BUILD, BIN, LOGS]
    if args.all:
        if QEMU_SRC.exists() and not args.force:
            reason = _queue().unsaved_work()
            if reason:
                raise CurlingError(f"not removing build/qemu: {reason} "
                                   "(export first, or clean --all --force)")
        doomed += [p for p in BUILD.iterdir() if p.name != "downloads"] \
            if BUILD.exists() else []
    for path in dict.fromkeys(doomed):
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
        else:
            continue
        log.info("removed %s", path.relative_to(REPO))


def cmd_all(args: argparse.Namespace) -> None:
    log.info("==> deps")
    cmd_deps(args)
    log.info("==> fetch")
    src = cmd_fetch(args)
    log.info("==> apply")
    cmd_apply(args, src)
    log.info("==> configure + build")
    cmd_build(args)
    log.info("==> guest")
    cmd_guest(args)
    log.info("==> image")
    cmd_image(args)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], Any], str]] = {
    "all": (cmd_all, "everything: deps, fetch, apply, configure, build, guest, image "
                     "(default)"),
    "deps": (cmd_deps, "install missing Debian packages (check only with --no-system-deps)"),
    "fetch": (cmd_fetch, "obtain and verify the pinned QEMU source"),
    "apply": (cmd_apply, "create/update build/qemu: upstream commit + one commit per patch"),
    "configure": (cmd_configure, "configure build/qemu-build (only when options changed)"),
    "build": (cmd_build, "ninja, then build/bin/qemu-system-x86_64 and qemu-img"),
    "export": (cmd_export, "write the commits of build/qemu back to patches/ and series"),
    "check": (cmd_check, "scripts/checkpatch.pl on every patch (--bisect: build each step)"),
    "guest": (cmd_guest, "build the test guest (kernel + initramfs) under build/guest"),
    "image": (cmd_image, "build the Debian application guest (PostgreSQL, nginx) "
                         "under build/debian"),
    "clean": (cmd_clean, "remove build outputs (--all: all of build/ but downloads/)"),
}


def _common_options(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted both before and after the command name."""
    p = argparse.ArgumentParser(add_help=False)

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    p.add_argument("--qemu-version", metavar="X.Y.Z", default=default("10.2.2"),
                   help="upstream QEMU version from the version table (default 10.2.2)")
    p.add_argument("--qemu-tarball", metavar="PATH", default=default(None),
                   help="use this QEMU source tarball (sha256 checked)")
    p.add_argument("--sha256", metavar="HEX", default=default(None),
                   help="expected sha256 of --qemu-tarball when the table has none")
    p.add_argument("--debian-mirror", metavar="URL",
                   default=default("http://deb.debian.org/debian"),
                   help="Debian mirror for the source package")
    p.add_argument("--no-system-deps", action="store_true", default=default(False),
                   help="do not apt-get install; print the command instead")
    p.add_argument("-j", "--jobs", type=int, default=default(None),
                   help="parallel build jobs (default: number of CPUs)")
    p.add_argument("-v", "--verbose", action="store_true", default=default(False))
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="build.py", parents=[_common_options(False)],
        description="Build QEMU with the Curling patch queue.",
        epilog="Without a command, runs all stages.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _common_options(True)
    cmds = {name: sub.add_parser(name, parents=[common], help=text)
            for name, (_fn, text) in COMMANDS.items()}
    cmds["apply"].add_argument("--force", action="store_true",
                               help="discard commits and changes in build/qemu")
    cmds["configure"].add_argument("--force", action="store_true",
                                   help="configure even if options are unchanged")
    cmds["check"].add_argument("--bisect", action="store_true",
                               help="also build after each patch")
    cmds["clean"].add_argument("--all", action="store_true",
                               help="also build/qemu, build/guest, apt state")
    cmds["clean"].add_argument("--force", action="store_true",
                               help="with --all: even if build/qemu has unexported work")
    args = parser.parse_args(argv)
    args.command = args.command or "all"
    return args


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {msg}"
        if record.levelno >= logging.WARNING:
            return f"warning: {msg}"
        return msg


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[handler])
    start = time.monotonic()
    try:
        ensure_venv(argv)
    except Fatal as exc:
        log.error("%s", exc)
        return 1
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from curlingtool import CurlingError
    try:
        COMMANDS[args.command][0](args)
    except CurlingError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    log.info("%s: done in %.1f s", args.command, time.monotonic() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
