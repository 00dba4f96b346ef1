"""The store under APScheduler's own schedulers: sync and async, coalescing, crash recovery."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from apscheduler import (
    AsyncScheduler,
    CoalescePolicy,
    ConflictPolicy,
    Job,
    JobAdded,
    JobOutcome,
    JobReleased,
    Schedule,
    Scheduler,
    SchedulerRole,
    Task,
)
from apscheduler.triggers.interval import IntervalTrigger

from apsched_mongo import MongoDBDataStore
from apsched_mongo.memory import MemoryMongoClient
from tests.helpers import ClusterBus, FakeClock

pytestmark = pytest.mark.anyio


def add(x: int, y: int) -> int:
    return x + y


def test_sync_scheduler_runs_jobs_and_schedules() -> None:
    store = MongoDBDataStore(MemoryMongoClient(), database="sync")
    with Scheduler(store) as scheduler:
        scheduler.start_in_background()
        assert scheduler.run_job(add, args=(2, 3)) == 5
        scheduler.add_schedule(add, IntervalTrigger(hours=1), id="hourly", args=(1, 1))
        [schedule] = scheduler.get_schedules()
        assert schedule.id == "hourly" and schedule.next_fire_time is not None


@pytest.mark.parametrize("policy, expected_jobs", [
    (CoalescePolicy.all, 11), (CoalescePolicy.latest, 1), (CoalescePolicy.earliest, 1),
])
async def test_coalescing_of_missed_fire_times(
    backend: Any, policy: CoalescePolicy, expected_jobs: int
) -> None:
    start = datetime.now(UTC) - timedelta(seconds=10.5)
    added = anyio.Event()
    async with AsyncScheduler(backend.store(), role=SchedulerRole.scheduler) as scheduler:
        count = 0

        def on_added(event: JobAdded) -> None:
            nonlocal count
            count += 1
            if count == expected_jobs:
                added.set()

        scheduler.subscribe(on_added, {JobAdded})
        await scheduler.add_schedule(add, IntervalTrigger(seconds=1, start_time=start), id="s",
                                     args=(1, 2), coalesce=policy)
        await scheduler.start_in_background()
        with anyio.fail_after(10):
            await added.wait()
        jobs = await scheduler.get_jobs()
        await scheduler.stop()
    assert len(jobs) == expected_jobs
    fire_times = sorted(job.scheduled_fire_time for job in jobs)
    if policy is CoalescePolicy.earliest:
        assert fire_times == [start]
    elif policy is CoalescePolicy.latest:
        assert fire_times == [start + timedelta(seconds=10)]
    else:
        assert fire_times == [start + timedelta(seconds=n) for n in range(11)]


async def test_crashed_schedulers_jobs_and_schedules_are_taken_over(backend: Any) -> None:
    """Node A claims a job and a schedule, then dies without releasing anything. After the
    lease runs out, node B releases A's job as abandoned and fires A's schedule itself."""
    lease = timedelta(seconds=30)
    clock = FakeClock()
    crashed_store = backend.store(local_clock=clock)
    survivor_store = backend.store(local_clock=clock)
    bus = ClusterBus()
    async with AsyncExitStack() as stack:
        # A's claims, made through its store as its scheduler would, then never released
        a_broker = bus.broker()
        await a_broker.start(stack, _logger())
        await crashed_store.start(stack, a_broker, _logger())
        await crashed_store.add_task(_task("tests.test_scheduler:add"))
        job = Job(task_id="add", executor="async", args=(1, 2),
                  result_expiration_time=timedelta(minutes=5))
        await crashed_store.add_job(job)
        [claimed] = await crashed_store.acquire_jobs("node-a", lease, 10)
        trigger = IntervalTrigger(hours=1, start_time=clock() - timedelta(seconds=1))
        await crashed_store.add_schedule(
            Schedule(id="hourly", task_id="add", trigger=trigger, job_executor="async",
                     args=(20, 22), next_fire_time=trigger.next()),
            ConflictPolicy.exception,
        )
        [leased] = await crashed_store.acquire_schedules("node-a", lease, 10)
        assert (claimed.id, leased.id) == (job.id, "hourly")

        released: list[JobReleased] = []
        schedule_job_done = anyio.Event()

        def on_release(event: JobReleased) -> None:
            released.append(event)
            if event.schedule_id == "hourly":
                schedule_job_done.set()

        survivor = await stack.enter_async_context(AsyncScheduler(
            survivor_store, event_broker=bus.broker(), identity="node-b",
            lease_duration=lease, cleanup_interval=None,
        ))
        survivor.subscribe(on_release, {JobReleased})
        await survivor.start_in_background()
        # Within the lease, B can take neither
        assert await survivor_store.acquire_schedules("probe", lease, 10) == []
        assert await survivor_store.get_next_schedule_run_time() > clock()

        clock.advance(lease + timedelta(seconds=1))
        await survivor.cleanup()
        [abandoned] = [event for event in released if event.job_id == job.id]
        assert (abandoned.outcome, abandoned.scheduler_id) == (JobOutcome.abandoned, "node-a")
        result = await survivor_store.get_job_result(job.id)
        assert result is not None and result.outcome is JobOutcome.abandoned

        # B sleeps by the real clock until A's lease would end; adding a schedule wakes it
        await survivor.add_schedule(add, IntervalTrigger(days=1), id="nudge", args=(0, 0))
        with anyio.fail_after(10):
            await schedule_job_done.wait()
        [fired] = [event for event in released if event.schedule_id == "hourly"]
        assert (fired.scheduler_id, fired.outcome) == ("node-b", JobOutcome.success)
        [schedule] = await survivor_store.get_schedules({"hourly"})
        assert schedule.acquired_by is None
        assert schedule.next_fire_time > leased.next_fire_time
        await survivor.stop()


def _task(func: str) -> Task:
    return Task(id="add", func=func, job_executor="async")


def _logger() -> logging.Logger:
    return logging.getLogger(__name__)
