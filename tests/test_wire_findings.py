"""What running the real driver and separate processes against the wire front found in the
data store, pinned as deterministic tests through the public API. Each failed before its
fix (named in its docstring) and guards it now."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta

import anyio
import pytest
from apscheduler import (
    AsyncScheduler,
    ConflictPolicy,
    Job,
    JobOutcome,
    JobReleased,
    JobResult,
    RetrySettings,
    Schedule,
    SchedulerRole,
    ScheduleUpdated,
    Task,
)
from apscheduler.triggers.interval import IntervalTrigger
from tenacity import stop_after_attempt, wait_fixed

from apsched_mongo import MongoDBDataStore
from apsched_mongo.memory import MemoryServer
from apsched_mongo.memory_wire import MemoryWireServer
from tests.conftest import RecordingBroker

pytestmark = pytest.mark.anyio
log = logging.getLogger(__name__)
FAST_RETRY = RetrySettings(stop=stop_after_attempt(5), wait=wait_fixed(0.01))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def add_and_acquire_a_job(store: MongoDBDataStore, scheduler_id: str) -> Job:
    """A job of a fresh task, acquired by ``scheduler_id`` with a five-minute lease, whose
    result is kept: the starting point of a release racing something else."""
    await store.add_task(Task(id="t", func="tests.helpers:noop", job_executor="async"))
    await store.add_job(Job(task_id="t", executor="async",
                            result_expiration_time=timedelta(minutes=5)))
    [job] = await store.acquire_jobs(scheduler_id, timedelta(minutes=5), 1)
    return job


async def test_a_retried_release_racing_a_takeover_is_published_once() -> None:
    """Found by the multi-process fault drill: a release retried after both of the driver's
    attempts were lost concluded "no job and no marker: our first attempt deleted it" while
    another node had taken the job over but not yet written its marker, and both published
    JobReleased (success, then abandoned).

    Node A runs job J. A node restarted under A's identity reaps A's jobs: it takes J over
    (its lease replaces A's) and is about to write J's release marker (held here). Now A
    finishes J; both of the driver's attempts of A's delete are dropped (connection
    resets), so the store retries: its delete finds no job of A's lease, and no marker."""
    memory = MemoryServer(replica_set=True)
    with MemoryWireServer(memory) as a_front, MemoryWireServer(memory) as b_front:
        async with AsyncExitStack() as stack:
            brokers = [RecordingBroker(), RecordingBroker()]
            stores = []
            for broker, front in zip(brokers, (a_front, b_front), strict=True):
                await broker.start(stack, log)
                store = MongoDBDataStore(front.uri, database="race", retry_settings=FAST_RETRY)
                await store.start(stack, broker, log)
                stores.append(store)
            a, reaper = stores
            job = await add_and_acquire_a_job(a, "node-a")

            marker = b_front.inject("hold", command="insert", namespace="*_job_results",
                                    seconds=30)
            async with anyio.create_task_group() as group:
                group.start_soon(reaper.reap_abandoned_jobs, "node-a")
                assert await anyio.to_thread.run_sync(lambda: marker.wait(1, 10))
                a_front.inject("hangup", command="delete", times=2)
                await a.release_job("node-a", job, JobResult.from_job(
                    job, JobOutcome.success, return_value=None))
                marker.release()
        released = [(e.outcome, e.scheduler_id) for broker in brokers
                    for e in broker.of_type(JobReleased) if e.job_id == job.id]
    assert len(released) == 1, released  # one winner, whichever it is


async def test_a_release_cancelled_after_its_commit_point_is_still_published() -> None:
    """Found by the rolling-restart drill: a scheduler stopping (which cancels its running
    jobs' tasks) after a release's delete but before its publish left the job released with
    no JobReleased event (and often no result) for anyone."""
    with MemoryWireServer(MemoryServer(replica_set=True)) as front:
        async with AsyncExitStack() as stack:
            broker = RecordingBroker()
            await broker.start(stack, log)
            store = MongoDBDataStore(front.uri, database="cancel", retry_settings=FAST_RETRY)
            await store.start(stack, broker, log)
            job = await add_and_acquire_a_job(store, "node")

            result = front.inject("stall", command="insert", namespace="*_job_results",
                                  seconds=1)
            async with anyio.create_task_group() as group:
                group.start_soon(store.release_job, "node", job, JobResult.from_job(
                    job, JobOutcome.success, return_value=1))
                assert await anyio.to_thread.run_sync(lambda: result.wait(1, 10))
                group.cancel_scope.cancel()  # what AsyncScheduler.stop() does to running jobs
            assert await store.get_jobs() == []  # released: its delete went through
        released = [e for e in broker.of_type(JobReleased) if e.job_id == job.id]
    assert len(released) == 1


@pytest.mark.parametrize("first_job_ran", [False, True])
async def test_a_fire_time_interrupted_by_a_stop_is_not_fired_twice_after_a_restart(
        first_job_ran: bool) -> None:
    """Found by the rolling-restart drill: a scheduler stopped while firing a schedule (its
    job added, the schedule not yet released) left the schedule leased to its identity;
    restarted under that identity it re-acquired it and added a second job for the same
    fire time. Fixed while that first job waits (``apsched_fire``), and once it has run
    (the fire-time marker its release leaves)."""
    with MemoryWireServer(MemoryServer(replica_set=True)) as front:
        async with AsyncExitStack() as stack:
            setup = MongoDBDataStore(front.uri, database="refire", retry_settings=FAST_RETRY)
            broker = RecordingBroker()
            await broker.start(stack, log)
            await setup.start(stack, broker, log)
            await setup.add_task(Task(id="t", func="tests.helpers:noop", job_executor="async"))
            trigger = IntervalTrigger(hours=1, start_time=datetime.now(UTC) - timedelta(
                seconds=1))
            await setup.add_schedule(Schedule(id="s", task_id="t", trigger=trigger,
                                              job_executor="async",
                                              next_fire_time=trigger.next()),
                                     ConflictPolicy.exception)
            # the schedule's claim goes through; its release (the next update) is held
            release = front.inject("hold", command="update", namespace="*_schedules", skip=1,
                                   seconds=30)
            first = AsyncScheduler(
                MongoDBDataStore(front.uri, database="refire", retry_settings=FAST_RETRY),
                identity="node-a", role=SchedulerRole.scheduler, cleanup_interval=None)
            async with first:
                await first.start_in_background()
                assert await anyio.to_thread.run_sync(lambda: release.wait(1, 10))
                await first.stop()  # the held release's connection is dropped: not applied
            if first_job_ran:  # a worker runs the fire time's job before the restart
                [job] = await setup.acquire_jobs("worker", timedelta(minutes=1), 1)
                await setup.release_job("worker", job, JobResult.from_job(
                    job, JobOutcome.success, return_value=None))
            async with AsyncScheduler(
                MongoDBDataStore(front.uri, database="refire", retry_settings=FAST_RETRY),
                identity="node-a", role=SchedulerRole.scheduler, cleanup_interval=None,
            ) as second:
                released = anyio.Event()
                second.subscribe(lambda event: released.set(), {ScheduleUpdated})
                await second.start_in_background()
                with anyio.fail_after(10):
                    await released.wait()  # the restarted node has fired the schedule
                await second.stop()
            fired = [job.scheduled_fire_time for job in await setup.get_jobs()]
    assert fired == ([] if first_job_ran else [trigger.start_time]), fired
