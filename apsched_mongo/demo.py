"""``python -m apsched_mongo demo``: schedulers sharing one MongoDB, printing every job run."""

from __future__ import annotations

import argparse
import logging
from collections import Counter
from contextlib import AsyncExitStack
from datetime import datetime
from typing import Any

import anyio
from apscheduler import AsyncScheduler, ConflictPolicy, current_async_scheduler, current_job
from apscheduler.abc import EventBroker
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pymongo.errors import PyMongoError

from ._cli import (
    CommandLineError,
    add_verbose_argument,
    database_argument,
    describe_unreachable,
    find_error,
    positive_float,
    positive_int,
    uri_argument,
)
from ._client import redact
from .dashboard import FreeLocalPort
from .datastore import MongoDBDataStore
from .errors import ApschedMongoError, ServerUnreachableError
from .eventbroker import MongoDBEventBroker

runs: Counter[str] = Counter()
running_slow = 0
max_running_slow = 0


def _report(name: str) -> None:
    scheduler = current_async_scheduler.get()
    node = scheduler.identity if scheduler else "?"
    job = current_job.get()
    runs[node] += 1
    print(f"{datetime.now():%H:%M:%S.%f}"[:-3], f"{node:<7} {name:<8} job {str(job.id)[:8]}",
          flush=True)


async def tick() -> None:
    """Runs every second (interval trigger)."""
    _report("tick")


async def cron() -> None:
    """Runs every third second (cron trigger)."""
    _report("cron")


async def slow() -> None:
    """Takes 1.5 s and fires twice a second; max_running_jobs=1 keeps one at a time."""
    global running_slow, max_running_slow
    running_slow += 1
    max_running_slow = max(max_running_slow, running_slow)
    _report("slow")
    try:
        await anyio.sleep(1.5)
    finally:
        running_slow -= 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uri", type=uri_argument,
                        help="MongoDB URI (default: an in-memory MongoDB)")
    parser.add_argument("--database", type=database_argument, default="apsched_demo",
                        help="database to use; its scheduler data is erased at start "
                             "(default: apsched_demo)")
    parser.add_argument("--seconds", type=positive_float, default=10.0,
                        help="how long to run (default: 10)")
    parser.add_argument("--nodes", type=positive_int, default=1,
                        help="schedulers sharing the database (default: 1)")
    parser.add_argument("--broker", choices=["mongodb", "local"], default="mongodb",
                        help="event broker: MongoDB (default) or local only")
    add_verbose_argument(parser)
    parser.add_argument("--standalone", action="store_true",
                        help="make the in-memory MongoDB a standalone server (the broker "
                             "polls) instead of a replica set (change streams)")
    parser.add_argument("--dashboard", nargs="?", action=FreeLocalPort, const="8800",
                        metavar="PORT",
                        help="also serve the operator dashboard on 127.0.0.1:PORT (8800) and "
                             "run until Ctrl-C instead of --seconds")


def _make_broker(kind: str, client: Any, database: str) -> EventBroker | None:
    if kind == "mongodb":
        return MongoDBEventBroker(client, database=database, poll_interval=0.2)
    return None


async def _main(args: argparse.Namespace) -> None:
    if args.uri:
        from ._client import create_client

        make_client: Any = lambda: create_client(args.uri)  # noqa: E731
    else:
        from .memory import MemoryMongoClient, MemoryServer

        server = MemoryServer(replica_set=not args.standalone)
        make_client = lambda: MemoryMongoClient(server)  # noqa: E731
        kind = "standalone server" if args.standalone else "replica set"
        print(f"Using an in-memory MongoDB {kind} (pass --uri to use a real server)")

    async with AsyncExitStack() as stack:
        schedulers, modes = [], set()
        for number in range(1, args.nodes + 1):
            client = make_client()
            stack.push_async_callback(client.close)
            store = MongoDBDataStore(client, database=args.database,
                                     start_from_scratch=number == 1)
            kwargs: dict[str, Any] = {"identity": f"node-{number}"}
            if broker := _make_broker(args.broker, client, args.database):
                kwargs["event_broker"] = broker
            scheduler = await stack.enter_async_context(AsyncScheduler(store, **kwargs))
            schedulers.append(scheduler)
            modes.add(getattr(broker, "active_mode", None))
        for mode in sorted(filter(None, modes)):
            print(f"MongoDB event broker mode: {mode}")

        first = schedulers[0]
        await first.configure_task("slow", func=slow, max_running_jobs=1)
        await first.add_schedule(tick, IntervalTrigger(seconds=1), id="tick",
                                 conflict_policy=ConflictPolicy.replace)
        await first.add_schedule(cron, CronTrigger(second="*/3"), id="cron",
                                 conflict_policy=ConflictPolicy.replace)
        await first.add_schedule("slow", IntervalTrigger(seconds=0.5), id="slow",
                                 conflict_policy=ConflictPolicy.replace)
        for scheduler in schedulers:
            await scheduler.start_in_background()
        if args.dashboard is not None:
            from .dashboard.server import serve_beside_demo

            print(f"{args.nodes} scheduler(s) running ...", flush=True)
            await serve_beside_demo(make_client(), args.database, args.dashboard)
        else:
            print(f"{args.nodes} scheduler(s) running for {args.seconds:g} s ...", flush=True)
            await anyio.sleep(args.seconds)
        for scheduler in schedulers:
            await scheduler.stop()

    print("job runs per node:", dict(sorted(runs.items())))
    print(f"most 'slow' jobs running at once: {max_running_slow} (max_running_jobs=1)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING)
    try:
        anyio.run(_main, args)
    except (Exception, BaseExceptionGroup) as exc:  # schedulers raise in exception groups
        if (error := find_error(exc, ServerUnreachableError)) is not None:
            raise CommandLineError(describe_unreachable(error, args.verbose)) from None
        if (error := find_error(exc, PyMongoError, ApschedMongoError)) is not None:
            text = redact(str(error), args.uri) if args.uri else str(error)
            raise CommandLineError(f"MongoDB refused the demo: {text}") from None
        raise
    return 0
