"""The DataStore API called directly, without a scheduler: the floor of each call pattern.

A job's life cycle is add -> acquire -> release, in batches of ``batch`` jobs; a schedule
fire is acquire -> add its job -> release it with the next fire time. Counting only these
calls shows what each store needs per job when nothing else (events, other nodes) interferes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from logging import getLogger

from apscheduler import (
    ConflictPolicy,
    Job,
    JobOutcome,
    JobResult,
    Schedule,
    ScheduleResult,
    Task,
)
from apscheduler.abc import DataStore
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.interval import IntervalTrigger

from ..backends import Backend

LEASE = timedelta(seconds=60)
TASK = Task(id="bench", func="benchmarks.jobs:unlimited_job", job_executor="async",
            max_running_jobs=None)
log = getLogger("benchmarks")


@asynccontextmanager
async def _started(store: DataStore) -> AsyncIterator[DataStore]:
    async with AsyncExitStack() as stack:
        broker = LocalEventBroker()
        await broker.start(stack, log)
        await store.start(stack, broker, log)
        yield store


async def lifecycle_commands_per_job(backend: Backend, kind: str, batch: int,
                                     rounds: int) -> float:
    """Commands per job for ``rounds`` x (add ``batch`` jobs, acquire them, release each)."""
    counter = backend.counter()
    async with _started(backend.store(kind, backend.new_database(), counter)) as store:
        await store.add_task(TASK)
        counter.reset()
        for _ in range(rounds):
            for _ in range(batch):
                await store.add_job(Job(task_id=TASK.id, executor="async"))
            acquired: list[Job] = []
            for _ in range(batch):
                acquired += await store.acquire_jobs("bench-node", LEASE, batch - len(acquired))
                if len(acquired) == batch:
                    break
            if len(acquired) != batch:
                raise RuntimeError(f"{kind}: acquired {len(acquired)} of {batch} jobs")
            for job in acquired:
                await store.release_job("bench-node", job, JobResult.from_job(
                    job, JobOutcome.success, return_value=None))
        return counter.total / (batch * rounds)


async def commands_per_fire(backend: Backend, kind: str, batch: int, rounds: int) -> float:
    """Commands per schedule fire: acquire due schedules, add a job each, release them."""
    counter = backend.counter()
    async with _started(backend.store(kind, backend.new_database(), counter)) as store:
        await store.add_task(TASK)
        interval = timedelta(hours=1)
        fires = commands = 0
        for round_number in range(rounds):
            due = datetime.now(UTC) - timedelta(minutes=1)
            for i in range(batch):
                await store.add_schedule(Schedule(
                    id=f"s{round_number}-{i}", task_id=TASK.id,
                    trigger=IntervalTrigger(hours=1, start_time=due),
                    job_executor="async", next_fire_time=due,
                ), ConflictPolicy.exception)
            before = counter.total  # adding the schedules is setup, not firing
            schedules = await store.acquire_schedules("bench-node", LEASE, 100)
            if len(schedules) != batch:
                raise RuntimeError(f"{kind}: acquired {len(schedules)} of {batch} schedules")
            results = []
            for schedule in schedules:
                assert schedule.next_fire_time is not None
                await store.add_job(Job(
                    task_id=schedule.task_id, schedule_id=schedule.id, executor="async",
                    scheduled_fire_time=schedule.next_fire_time,
                ))
                results.append(ScheduleResult(
                    schedule_id=schedule.id, task_id=schedule.task_id, trigger=schedule.trigger,
                    last_fire_time=schedule.next_fire_time,
                    next_fire_time=schedule.next_fire_time + interval,
                ))
            await store.release_schedules("bench-node", results)
            fires += len(schedules)
            commands += counter.total - before
        return commands / fires
