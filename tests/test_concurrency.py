"""Several schedulers, each with its own store instance, sharing one database."""

from __future__ import annotations

import logging
from collections import Counter
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from apscheduler import AsyncScheduler, CoalescePolicy, JobReleased, current_job
from apscheduler.triggers.interval import IntervalTrigger

from tests.helpers import ClusterBus

pytestmark = pytest.mark.anyio
_logger = logging.getLogger(__name__)

NODES = 4
LIMITED_JOBS = 250
FREE_JOBS = 250
SCHEDULES = 20
FIRES_PER_SCHEDULE = 5
MAX_RUNNING = 3


class Tally:
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.runs: Counter[Any] = Counter()
        self.running = 0
        self.max_running = 0
        self.done = anyio.Event()

    def record(self, key: Any) -> None:
        self.runs[key] += 1
        if sum(self.runs.values()) >= self.expected:
            self.done.set()


tally = Tally(0)


async def limited() -> None:
    tally.running += 1
    tally.max_running = max(tally.max_running, tally.running)
    try:
        await anyio.sleep(0.002)
        tally.record(current_job.get().id)
    finally:
        tally.running -= 1


async def free() -> None:
    tally.record(current_job.get().id)


async def scheduled() -> None:
    job = current_job.get()
    tally.record((job.schedule_id, job.scheduled_fire_time))


async def test_four_schedulers_run_every_job_exactly_once(backend: Any) -> None:
    global tally
    tally = Tally(LIMITED_JOBS + FREE_JOBS + SCHEDULES * FIRES_PER_SCHEDULE)
    bus = ClusterBus()
    async with AsyncExitStack() as stack:
        schedulers = [
            await stack.enter_async_context(AsyncScheduler(
                backend.store(), event_broker=bus.broker(), identity=f"node-{n}",
                max_concurrent_jobs=20,
            ))
            for n in range(NODES)
        ]
        await schedulers[0].configure_task("limited", func=limited, max_running_jobs=MAX_RUNNING)
        await schedulers[0].configure_task("free", func=free)
        await schedulers[0].configure_task("scheduled", func=scheduled)
        released = anyio.Event()
        release_count = 0

        def count_release(event: JobReleased) -> None:
            nonlocal release_count
            release_count += 1
            if release_count == tally.expected:
                released.set()

        schedulers[0].subscribe(count_release, {JobReleased})
        for scheduler in schedulers:
            await scheduler.start_in_background()

        start = datetime.now(UTC) + timedelta(milliseconds=200)
        for n in range(SCHEDULES):
            await schedulers[n % NODES].add_schedule(
                "scheduled", IntervalTrigger(seconds=0.2, start_time=start,
                                             end_time=start + timedelta(seconds=0.8)),
                id=f"schedule-{n}", coalesce=CoalescePolicy.all,
            )
        for n in range(LIMITED_JOBS):
            await schedulers[n % NODES].add_job("limited")
        for n in range(FREE_JOBS):
            await schedulers[n % NODES].add_job("free")

        with anyio.fail_after(90):
            await tally.done.wait()
            await released.wait()
        for scheduler in schedulers:
            await scheduler.stop()
        for scheduler in schedulers:
            await scheduler.wait_until_stopped()

        assert len(tally.runs) == tally.expected
        assert set(tally.runs.values()) == {1}, "some job ran more than once"
        fires = Counter(key[0] for key in tally.runs if isinstance(key, tuple))
        assert fires == {f"schedule-{n}": FIRES_PER_SCHEDULE for n in range(SCHEDULES)}
        assert tally.max_running <= MAX_RUNNING
        assert tally.max_running == MAX_RUNNING  # the limit was actually reached, not dodged
        jobs = backend.db()["apsched_jobs"]
        assert await jobs.count_documents({}) == 0


async def test_racing_acquirers_never_share_a_job(backend: Any) -> None:
    """Store-level race: many stores claim from one queue at once, in small batches."""
    from apscheduler import Job, Task

    from tests.helpers import noop

    stores = []
    async with AsyncExitStack() as stack:
        bus = ClusterBus()
        for _ in range(NODES):
            broker = bus.broker()
            await broker.start(stack, _logger)
            store = backend.store()
            await store.start(stack, broker, _logger)
            stores.append(store)
        await stores[0].add_task(Task(id="free", func=f"{noop.__module__}:noop",
                                      job_executor="async"))
        await stores[0].add_task(Task(id="limited", func=f"{noop.__module__}:noop",
                                      job_executor="async", max_running_jobs=MAX_RUNNING))
        for n in range(200):
            await stores[0].add_job(Job(task_id="free" if n % 2 else "limited", executor="async"))

        claims: Counter[Any] = Counter()
        held_limited: list[int] = []

        async def worker(number: int, store: Any) -> None:
            while True:
                jobs = await store.acquire_jobs(f"node-{number}", timedelta(seconds=30), 5)
                if not jobs:
                    if await store.get_jobs() == [] or claims.total() == 200:
                        return
                    await anyio.lowlevel.checkpoint()
                    continue
                claims.update(job.id for job in jobs)
                held_limited.append(sum(job.task_id == "limited" for job in jobs))
                running = sum(1 for job in await store.get_jobs() if job.acquired_by
                              and job.task_id == "limited")
                assert running <= MAX_RUNNING
                for job in jobs:
                    from apscheduler import JobOutcome, JobResult

                    await store.release_job(f"node-{number}", job,
                                            JobResult.from_job(job, JobOutcome.success))

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for number, store in enumerate(stores):
                    tg.start_soon(worker, number, store)
        assert len(claims) == 200
        assert set(claims.values()) == {1}, "a job was claimed by two stores"
