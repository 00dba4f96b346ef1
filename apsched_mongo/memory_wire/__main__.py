"""``python -m apsched_mongo.memory_wire``: serve an empty in-memory MongoDB on a local port.

Prints the URI on the first line of stdout, then serves until interrupted (Ctrl-C or
SIGTERM). A test and demo server, not a database: data lives in this process only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..memory import MemoryServer
from ._faults import DESCRIPTIONS, Fault, parse_fault
from ._server import MemoryWireServer


def _fault(text: str) -> Fault:
    try:
        return parse_fault(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _privileges(path: str) -> list[dict[str, Any]]:
    try:
        privileges = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read privileges from {path}: {exc}") from None
    if not isinstance(privileges, list) or not all(isinstance(p, dict) for p in privileges):
        raise argparse.ArgumentTypeError(
            f"{path} must hold a JSON array of privilege documents "
            '({"resource": {"db": ..., "collection": ...}, "actions": [...]})')
    return privileges


def build_parser() -> argparse.ArgumentParser:
    kinds = "; ".join(f"{kind}: {text}" for kind, text in DESCRIPTIONS.items())
    parser = argparse.ArgumentParser(
        prog="python -m apsched_mongo.memory_wire",
        description="Serve the in-memory back end over MongoDB's wire protocol (a test and "
                    "demo server, not a database). Prints the URI, then serves until "
                    "interrupted.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    parser.add_argument("--replica-set", metavar="NAME",
                        help="be the primary of a one-node replica set of this name "
                             "(drivers then send retryable writes; change streams work)")
    parser.add_argument("--fault", type=_fault, action="append", default=[],
                        metavar="KIND[:key=value,...]",
                        help=f"inject a fault; repeatable. Kinds: {kinds}. Keys: command, "
                             "namespace (glob; without a dot, the collection name), skip, "
                             "times (a number or inf), probability, seconds, code")
    parser.add_argument("--seed", type=int, default=0, help="seed of the faults' random draws")
    parser.add_argument("--privileges", type=_privileges, metavar="FILE",
                        help="enforce a role: a JSON array of MongoDB privilege documents")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    memory = MemoryServer(replica_set=True, set_name=args.replica_set) if args.replica_set \
        else MemoryServer()
    front = MemoryWireServer(memory, host=args.host, port=args.port,
                             privileges=args.privileges, seed=args.seed)
    for fault in args.fault:
        front.faults.add(fault)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with front:
        print(front.uri, flush=True)
        print("in-memory test server (not a database); Ctrl-C stops it", file=sys.stderr,
              flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    hits = ", ".join(f"{fault!r}" for fault in front.faults.faults)
    print(f"served {sum(front.commands.values())} commands"
          + (f"; faults: {hits}" if hits else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
