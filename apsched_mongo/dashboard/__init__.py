"""``python -m apsched_mongo dashboard``: one web page for the whole cluster.

It reads the store's collections directly (every node's schedules, jobs and leases),
listens to the cluster's event broker for job outcomes, and, with ``--allow-actions`` and
a token, pauses, resumes, runs and removes schedules and drops queued jobs through
:class:`~apsched_mongo.MongoDBDataStore`. Needs the ``dashboard`` extra
(``pip install 'apsched-mongo[dashboard]'``); importing this module does not, so the other
sub-commands work without it.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .app import Settings

URI_ENV = "APSCHED_DASHBOARD_URI"
TOKEN_ENV = "APSCHED_DASHBOARD_TOKEN"
SERIALIZERS = ("pickle", "json", "cbor")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uri", default=os.environ.get(URI_ENV),
                        help=f"MongoDB URI (default: ${URI_ENV}, which keeps a password off "
                             "the process list)")
    parser.add_argument("--database", default="apscheduler")
    parser.add_argument("--collection-prefix", default="apsched_",
                        help="the store's collection prefix (default: apsched_)")
    parser.add_argument("--events-collection", default="apsched_events",
                        help="the event broker's collection (default: apsched_events)")
    parser.add_argument("--serializer", choices=SERIALIZERS, default="pickle",
                        help="the serializer the cluster's store uses (default: pickle)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8800, help="port (default: 8800)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="another Host name the page is reached by (repeatable); "
                             "other Host headers are refused")
    parser.add_argument("--allow-actions", action="store_true",
                        help="enable pause/resume/run/remove/drop (needs the token printed "
                             f"at start, or ${TOKEN_ENV})")
    parser.add_argument("--refresh", type=float, default=2.0, metavar="SECONDS",
                        help="how often open pages refresh (default: 2)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="how long a page waits for MongoDB before saying it is "
                             "unreachable (default: 5)")


def _settings(args: argparse.Namespace) -> tuple[Settings, str | None]:
    """Validated settings and the token to print (None when it came from the environment)."""
    from apscheduler.abc import Serializer

    from .._client import hosts_of, redact_uri
    from .app import MIN_TOKEN_LENGTH, Settings
    from .server import new_token

    if not args.uri:
        raise ValueError(f"--uri is required (or set ${URI_ENV})")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be between 0 and 65535, not {args.port}")
    if args.refresh < 0.5:
        raise ValueError(f"--refresh must be at least 0.5 seconds, not {args.refresh:g}")
    if not 0.1 <= args.timeout <= 300:
        raise ValueError(f"--timeout must be between 0.1 and 300 seconds, not {args.timeout:g}")
    token, printed = None, None
    if args.allow_actions:
        token = os.environ.get(TOKEN_ENV)
        if token is not None and len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"${TOKEN_ENV} is shorter than {MIN_TOKEN_LENGTH} characters")
        if token is None:
            token = printed = new_token()
    serializer: Serializer
    if args.serializer == "json":
        from apscheduler.serializers.json import JSONSerializer
        serializer = JSONSerializer()
    elif args.serializer == "cbor":
        from apscheduler.serializers.cbor import CBORSerializer
        serializer = CBORSerializer()
    else:
        from apscheduler.serializers.pickle import PickleSerializer
        serializer = PickleSerializer()
    hosts = ["127.0.0.1", "localhost", *args.allowed_host]
    if args.host not in ("0.0.0.0", "::", ""):
        hosts.append(args.host)
    settings = Settings(
        database=args.database, collection_prefix=args.collection_prefix,
        events_collection=args.events_collection, serializer=serializer,
        allow_actions=args.allow_actions, token=token, allowed_hosts=tuple(dict.fromkeys(hosts)),
        refresh_seconds=args.refresh, timeout=args.timeout,
        where=", ".join(hosts_of(args.uri)) or redact_uri(args.uri), uri=args.uri,
    )
    return settings, printed


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("error: the dashboard needs its extra: pip install 'apsched-mongo[dashboard]'",
              file=sys.stderr)
        return 2
    import anyio

    from .._client import create_client
    from ..eventbroker import MongoDBEventBroker  # noqa: F401  (fail early if broken)
    from .app import Dashboard
    from .server import listening_socket, serve

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings, printed_token = _settings(args)
        client = create_client(args.uri)
        sock = listening_socket(args.host, args.port)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2

    def ready(url: str) -> None:
        print(f"apsched-mongo dashboard for {settings.where} (database {args.database!r}) "
              f"at {url}", flush=True)
        if not args.allow_actions:
            print("read-only: actions are disabled (start with --allow-actions to enable them)")
        elif printed_token:
            print(f"actions enabled; token: {printed_token}")
        else:
            print(f"actions enabled; token from ${TOKEN_ENV}")
        if not _is_loopback(args.host):
            print(f"WARNING: listening on {args.host}: whoever reaches this port sees every "
                  "schedule and job argument (put it behind TLS and authentication)")
        sys.stdout.flush()

    async def main() -> None:
        try:
            await serve(Dashboard(client, settings), sock, ready)
        finally:
            await client.close()

    anyio.run(main)
    return 0
