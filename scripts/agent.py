#!/usr/bin/env python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""The Curling agent: never two live copies of a protected VM.

    .venv/bin/python3 scripts/agent.py --qmp SOCKET --role sender \\
        --vm demo --id A --witness etcd:http://WITNESS:2379 \\
        --protect curling:tcp:RECEIVER:4444
    .venv/bin/python3 scripts/agent.py --qmp SOCKET --role receiver \\
        --vm demo --id B --peer A --witness etcd:http://WITNESS:2379 \\
        [--standby curling:tcp:STANDBY:4444]

Runs beside one QEMU (on a QMP monitor of its own), turns on its managed
mode and, when the sender and the receiver lost each other, lets the
witness decide which side acts: the first to win the VM's term acts (the
receiver takes over, the sender continues unprotected), the other quits
its QEMU. While the witness does not answer, neither acts. Every decision
is one log line with its reason. See scripts/curlingtool/agent.py.

Exits 0 when its QEMU goes away, 1 with one line on a fatal error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from curlingtool import CurlingError, setup_logging  # noqa: E402
from curlingtool.agent import DEFAULT_RETRY, AgentConfig, serve  # noqa: E402
from curlingtool.witness import open_witness  # noqa: E402

log = logging.getLogger("curling-agent")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--qmp", required=True, metavar="PATH",
                   help="unix socket of a QMP monitor of its QEMU")
    p.add_argument("--role", required=True, choices=("sender", "receiver"),
                   help="the side its QEMU is on when the agent starts")
    p.add_argument("--vm", required=True, metavar="NAME",
                   help="name of the protected VM (its witness key)")
    p.add_argument("--id", required=True, metavar="ME", dest="me",
                   help="this agent's id, the holder of the terms it wins")
    p.add_argument("--peer", metavar="ID",
                   help="id of the sender's agent (receiver: required)")
    p.add_argument("--witness", required=True, metavar="SPEC",
                   help="etcd:http://HOST:PORT[,...] or file:DIR (one host "
                   "only)")
    p.add_argument("--protect", metavar="URI",
                   help="sender: claim the next term, then migrate to URI "
                   "(curling:tcp:HOST:PORT)")
    p.add_argument("--standby", metavar="URI",
                   help="receiver: after taking over, protect again to URI")
    p.add_argument("--tls-creds", metavar="ID",
                   help="its QEMU's client TLS credentials object, set as "
                   "tls-creds before each migrate of the agent (a receiver "
                   "listening with server credentials needs it for "
                   "--standby)")
    p.add_argument("--retry", type=float, default=DEFAULT_RETRY,
                   metavar="SECONDS",
                   help=f"between tries of the witness (default "
                   f"{DEFAULT_RETRY:g})")
    p.add_argument("--log", metavar="FILE", help="log to FILE too")
    args = p.parse_args(argv)
    if args.role == "receiver" and not args.peer:
        p.error("--role receiver needs --peer")
    if args.protect and args.role != "sender":
        p.error("--protect is for --role sender")
    if args.standby and args.role != "receiver":
        p.error("--standby is for --role receiver")
    if not args.retry > 0:
        p.error("--retry must be positive")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    setup_logging(args.log)
    try:
        config = AgentConfig(vm=args.vm, me=args.me, role=args.role,
                             peer=args.peer, protect=args.protect,
                             standby=args.standby, retry=args.retry,
                             tls_creds=args.tls_creds)
        witness = open_witness(args.witness)
        asyncio.run(serve(config, args.qmp, witness))
    except CurlingError as exc:
        log.error("curling-agent vm=%s error: %s", args.vm, exc)
        return 1
    except KeyboardInterrupt:
        log.error("curling-agent vm=%s: interrupted", args.vm)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
