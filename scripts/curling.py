#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Run a protected guest like a service, from one description.

    .venv/bin/python3 scripts/curling.py check  GUEST.toml
    .venv/bin/python3 scripts/curling.py up     GUEST.toml --host A
    .venv/bin/python3 scripts/curling.py status GUEST.toml
    .venv/bin/python3 scripts/curling.py down   GUEST.toml

``up`` runs this host's part of the guest (scripts/curlingtool/service.py):
its QEMU in the role the witness gives it, with the agent, re-protecting
the guest to the next host that is up after a failover; it returns when
its QEMU went away (exit 1: start it again, as curling@.service does).
``status`` shows who runs the guest and who protects it, from the
witness; ``down`` ends protection on every host (the guest runs on
unprotected); ``check`` only reads the description.  See
scripts/curlingtool/description.py for the file.

Exits 1 with one line on an error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import socket
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from curlingtool import CurlingError, setup_logging  # noqa: E402
from curlingtool import description, service  # noqa: E402
from curlingtool.witness import open_witness  # noqa: E402

log = logging.getLogger("curling")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("check", "check the description only"),
                       ("up", "run this host's part of the guest"),
                       ("status", "who runs the guest, who protects it"),
                       ("down", "end protection on every host")):
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("description", metavar="GUEST.toml")
        if name == "up":
            cmd.add_argument("--host", default=socket.gethostname(),
                             help="this host's id in the description "
                             "(default: the host name)")
            cmd.add_argument("--qemu", default=str(service.DEFAULT_QEMU),
                             metavar="PATH", help="QEMU binary (default: "
                             "this checkout's build)")
            cmd.add_argument("--log", metavar="FILE", help="log to FILE too")
    return p.parse_args(argv)


def cmd_check(args: argparse.Namespace) -> int:
    desc = description.load(args.description)
    print(f"{desc.path}: guest {desc.guest.name}, hosts "
          f"{', '.join(h.id for h in desc.hosts)}, fingerprint "
          f"{desc.fingerprint()}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    setup_logging(args.log)
    desc = description.load(args.description)
    desc.host(args.host)
    witness = open_witness(desc.protection.witness)
    return asyncio.run(service.Service(desc, args.host, witness,
                                       args.qemu).run())


def cmd_status(args: argparse.Namespace) -> int:
    desc = description.load(args.description)
    witness = open_witness(desc.protection.witness)
    print("\n".join(service.status_lines(desc, witness)))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    desc = description.load(args.description)
    witness = open_witness(desc.protection.witness)
    service.down(desc, witness)
    print(f"protection of {desc.guest.name} is down: the host that runs it "
          "ends protection, the receivers quit")
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    commands = {"check": cmd_check, "up": cmd_up, "status": cmd_status,
                "down": cmd_down}
    try:
        return commands[args.command](args)
    except CurlingError as exc:
        print(f"curling {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
