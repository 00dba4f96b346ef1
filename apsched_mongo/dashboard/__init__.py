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
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import Settings

URI_ENV = "APSCHED_DASHBOARD_URI"
TOKEN_ENV = "APSCHED_DASHBOARD_TOKEN"
SERIALIZERS = ("pickle", "json", "cbor")


def port_argument(text: str) -> int:
    """A TCP port: 0 (any free one) to 65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be between 0 and 65535, not {port}")
    return port


def free_local_port_argument(text: str) -> int:
    """A port free on 127.0.0.1 now (the demo binds it only after its schedulers start)."""
    port = port_argument(text)
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
    except OSError as exc:
        raise argparse.ArgumentTypeError(
            f"cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}") from None
    return port


class FreeLocalPort(argparse.Action):
    """``--dashboard [PORT]`` of the demo: the port, its default included, checked free."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        try:
            setattr(namespace, self.dest, free_local_port_argument(str(values)))
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument {option_string}: {exc}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .._cli import database_argument, positive_float, uri_argument

    parser.add_argument("--uri", type=uri_argument, default=os.environ.get(URI_ENV),
                        help=f"MongoDB URI (default: ${URI_ENV}, which keeps a password off "
                             "the process list)")
    parser.add_argument("--database", type=database_argument, default="apscheduler",
                        help="the cluster's database (default: apscheduler)")
    parser.add_argument("--collection-prefix", default="apsched_",
                        help="the store's collection prefix (default: apsched_)")
    parser.add_argument("--events-collection", default="apsched_events",
                        help="the event broker's collection (default: apsched_events)")
    parser.add_argument("--serializer", choices=SERIALIZERS, default="pickle",
                        help="the serializer the cluster's store uses (default: pickle)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=port_argument, default=8800,
                        help="port (default: 8800; 0 picks a free one)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="another Host name the page is reached by (repeatable); "
                             "other Host headers are refused")
    parser.add_argument("--allow-actions", action="store_true",
                        help="enable pause/resume/run/remove/drop (needs the token printed "
                             f"at start, or ${TOKEN_ENV})")
    parser.add_argument("--refresh", type=positive_float, default=2.0, metavar="SECONDS",
                        help="how often open pages refresh (default: 2, at least 0.5)")
    parser.add_argument("--timeout", type=positive_float, default=5.0, metavar="SECONDS",
                        help="how long a page waits for MongoDB before saying it is "
                             "unreachable (default: 5)")


def _settings(args: argparse.Namespace) -> tuple[Settings, str | None]:
    """Validated settings and the token to print (None when it came from the environment)."""
    from apscheduler.abc import Serializer

    from .._cli import CommandLineError
    from .._client import hosts_of, redact_uri
    from .app import Settings
    from .guards import MIN_TOKEN_LENGTH
    from .server import new_token

    if not args.uri:
        raise CommandLineError(f"--uri is required (or set ${URI_ENV})")
    if args.refresh < 0.5:
        raise CommandLineError(f"--refresh must be at least 0.5 seconds, not {args.refresh:g}")
    token, printed = None, None
    if args.allow_actions:
        token = os.environ.get(TOKEN_ENV)
        if token is not None and len(token) < MIN_TOKEN_LENGTH:
            raise CommandLineError(f"${TOKEN_ENV} is shorter than {MIN_TOKEN_LENGTH} characters")
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
    try:
        settings = Settings(
            database=args.database, collection_prefix=args.collection_prefix,
            events_collection=args.events_collection, serializer=serializer,
            allow_actions=args.allow_actions, token=token,
            allowed_hosts=tuple(dict.fromkeys(hosts)), refresh_seconds=args.refresh,
            timeout=args.timeout, where=", ".join(hosts_of(args.uri)) or redact_uri(args.uri),
            uri=args.uri,
        )
    except ValueError as exc:
        raise CommandLineError(str(exc)) from None
    return settings, printed


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args: argparse.Namespace) -> int:
    from .._cli import CommandLineError

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise CommandLineError(
            "the dashboard needs its extra: pip install 'apsched-mongo[dashboard]'") from None
    import anyio

    from .._client import create_client
    from .app import Dashboard
    from .server import listening_socket, serve

    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings, printed_token = _settings(args)
    try:
        client = create_client(args.uri)
    except ValueError as exc:  # one line, password removed
        raise CommandLineError(str(exc)) from None
    try:
        sock = listening_socket(args.host, args.port)
    except OSError as exc:
        raise CommandLineError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None

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
