"""Wake-up latency: a schedule added on node A until its job starts on node B.

Ours: our store with our MongoDBEventBroker on each node (B hears A's ScheduleAdded).
Built-in: APScheduler's store with a LocalEventBroker per node, so B notices only when its
own timer (a heartbeat schedule every ``heartbeat`` seconds) wakes it.
"""

from __future__ import annotations

import random
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from uuid import uuid4

import anyio
from apscheduler import AsyncScheduler, task
from apscheduler.abc import EventBroker
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from ..backends import OURS, Backend
from ..cluster import NO_CLEANUP

_started_at: dict[str, float] = {}
_wakeups: dict[str, anyio.Event] = {}


async def heartbeat() -> None:
    """The timer that wakes a node with no cross-node broker."""


@task(max_running_jobs=None)
async def wakeup_job(key: str) -> None:
    _started_at[key] = time.perf_counter()
    _wakeups[key].set()


def _brokers(backend: Backend, kind: str, database: str) -> tuple[EventBroker, EventBroker]:
    if kind == OURS:
        return (backend.event_broker(database, backend.counter(), poll_interval=0.1),
                backend.event_broker(database, backend.counter(), poll_interval=0.1))
    return LocalEventBroker(), LocalEventBroker()


async def wakeup_latency(backend: Backend, kind: str, samples: int, every: float) -> float:
    """Mean seconds from ``add_schedule`` on A to the job starting on B."""
    database = backend.new_database()
    broker_a, broker_b = _brokers(backend, kind, database)
    latencies = []
    async with AsyncExitStack() as stack:
        node_a = await stack.enter_async_context(AsyncScheduler(
            backend.store(kind, database, backend.counter()), broker_a, identity="A",
            cleanup_interval=NO_CLEANUP))
        node_b = await stack.enter_async_context(AsyncScheduler(
            backend.store(kind, database, backend.counter()), broker_b, identity="B",
            cleanup_interval=NO_CLEANUP))
        await node_b.add_schedule(heartbeat, IntervalTrigger(seconds=every), id="heartbeat")
        await node_b.start_in_background()  # A only adds schedules: it is never started
        for sample in range(samples):
            await anyio.sleep(random.uniform(0, every))  # a random phase, not a wait
            key = f"{kind}-{uuid4().hex}"
            _wakeups[key] = anyio.Event()
            added_at = time.perf_counter()
            await node_a.add_schedule(wakeup_job, DateTrigger(datetime.now(UTC)),
                                      args=(key,), id=f"wake-{sample}")
            await _wakeups[key].wait()
            del _wakeups[key]
            latencies.append(_started_at.pop(key) - added_at)
        await node_b.stop()
    return sum(latencies) / len(latencies)


