"""One scheduler node of the multi-process drills (tests/test_process_drills.py):

    python -m tests._drill_node URI DATABASE IDENTITY [--lease S] [--cleanup S]

It runs an AsyncScheduler with a MongoDBDataStore and a MongoDBEventBroker on URI, prints
``ready`` once started, and stops gracefully on SIGTERM. Its job functions record every
execution as a file of their own (``<runs>/<job id>.<node>.<random>``), written before they
return, so what a node ran survives the node being killed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from datetime import timedelta
from pathlib import Path
from uuid import uuid4

import anyio
from apscheduler import AsyncScheduler, RetrySettings, current_job
from tenacity import stop_after_delay, wait_exponential

from apsched_mongo import MongoDBDataStore, MongoDBEventBroker

NODE = "?"


def record(runs: str, kind: str) -> None:
    """One execution of the current job, as a file (renamed into place: never partial)."""
    job = current_job.get()
    fire_time = job.scheduled_fire_time.isoformat() if job.scheduled_fire_time else None
    name = f"{job.id}.{NODE}.{uuid4().hex}"
    temporary = Path(runs) / f".{name}"
    temporary.write_text(json.dumps({"kind": kind, "node": NODE, "schedule": job.schedule_id,
                                     "fire_time": fire_time}))
    os.replace(temporary, Path(runs) / name)


def quick(runs: str) -> None:
    record(runs, "quick")


async def slow(runs: str) -> None:
    """Runs until the drill creates ``<runs>/../release``; marks its start first."""
    job = current_job.get()
    (Path(runs).parent / "started" / f"{job.id}.{NODE}").touch()
    release = Path(runs).parent / "release"
    while not release.exists():  # noqa: ASYNC110 - a file another process creates
        await anyio.sleep(0.05)
    record(runs, "slow")


async def main(args: argparse.Namespace) -> None:
    from tests import _drill_node  # the module the job functions are imported from

    _drill_node.NODE = args.identity
    retry = RetrySettings(stop=stop_after_delay(60), wait=wait_exponential(min=0.02, max=0.5))
    store = MongoDBDataStore(args.uri, database=args.database, retry_settings=retry)
    broker = MongoDBEventBroker(args.uri, database=args.database, poll_interval=0.05)
    async with AsyncScheduler(
        store, broker, identity=args.identity, max_concurrent_jobs=args.concurrency,
        lease_duration=timedelta(seconds=args.lease),
        cleanup_interval=timedelta(seconds=args.cleanup),
    ) as scheduler, anyio.create_task_group() as group:

        async def stop_on_sigterm() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM) as signals:
                async for _ in signals:
                    await scheduler.stop()
                    return

        group.start_soon(stop_on_sigterm)
        await scheduler.start_in_background()
        print("ready", flush=True)
        await scheduler.wait_until_stopped()
        group.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("database")
    parser.add_argument("identity")
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--cleanup", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=20)
    anyio.run(main, parser.parse_args())
    sys.exit(0)
