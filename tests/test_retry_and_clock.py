"""Which failures are retried, and whose clock leases follow."""

from __future__ import annotations

import logging
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler import (
    ConflictPolicy,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
    RetrySettings,
    Schedule,
    ScheduleAdded,
    ScheduleRemoved,
    Task,
    TaskAdded,
)
from apscheduler.triggers.interval import IntervalTrigger
from pymongo.errors import (
    AutoReconnect,
    ConfigurationError,
    DuplicateKeyError,
    InvalidName,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteError,
)
from tenacity import stop_after_attempt, wait_fixed

from apsched_mongo import MongoDBDataStore
from apsched_mongo._retry import is_temporary
from tests.conftest import RecordingBroker
from tests.faults import FaultPlan, FaultyClient, LoseFirstReply
from tests.helpers import FakeClock

pytestmark = pytest.mark.anyio
_log = logging.getLogger(__name__)


@pytest.mark.parametrize("exc", [
    AutoReconnect("connection reset"),
    NotPrimaryError("not primary", {"code": 10107}),
    NetworkTimeout("timed out"),
    ServerSelectionTimeoutError("no primary"),
    OperationFailure("stepped down", code=189),
    OperationFailure("shutting down", code=91),
    OperationFailure("interrupted", code=11602),
    OperationFailure("labelled", code=1, details={"errorLabels": ["RetryableWriteError"]}),
], ids=type)
def test_temporary_failures_are_retried(exc: Exception) -> None:
    assert is_temporary(exc)


@pytest.mark.parametrize("exc", [
    OperationFailure("Authentication failed.", code=18),
    OperationFailure("not authorized", code=13),
    DuplicateKeyError("E11000", code=11000),
    WriteError("Document failed validation", code=121),
    ConfigurationError("bad option"),
    InvalidName("bad name"),
    ValueError("not ours"),
], ids=lambda exc: f"{type(exc).__name__}-{getattr(exc, 'code', '')}")
def test_permanent_failures_are_not_retried(exc: Exception) -> None:
    assert not is_temporary(exc)


async def assert_a_lease_ends_30_s_from_now(store: Any) -> None:
    """A 30-second lease taken now ends 30 s from now on the real (server's) time line."""
    await store.add_task(Task(id="t", func="tests.helpers:noop", job_executor="async"))
    await store.add_job(Job(task_id="t", executor="async"))
    [job] = await store.acquire_jobs("node", timedelta(seconds=30), 1)
    expected = datetime.now(UTC) + timedelta(seconds=30)
    assert job.acquired_until is not None
    assert abs(job.acquired_until - expected) < timedelta(seconds=5)


async def test_leases_follow_the_server_clock_not_a_skewed_node(started: Any) -> None:
    """A node whose clock is an hour fast still writes leases on the server's time line."""
    store, _ = await started(local_clock=FakeClock(skew=timedelta(hours=1)))
    await assert_a_lease_ends_30_s_from_now(store)


async def _faulty_store(backend: Any, plan: FaultPlan, stack: AsyncExitStack) -> Any:
    broker = RecordingBroker()
    await broker.start(stack, _log)
    store = MongoDBDataStore(
        FaultyClient(backend.client(), plan), database=backend.database,
        retry_settings=RetrySettings(stop=stop_after_attempt(5), wait=wait_fixed(0)),
    )
    await store.start(stack, broker, _log)
    return store, broker


async def test_lost_replies_lose_no_result_and_no_event(backend: Any) -> None:
    plan = LoseFirstReply("apsched_jobs.insert_one", "apsched_jobs.find_one_and_update",
                          "apsched_jobs.delete_one", "apsched_job_results.insert_many",
                          "apsched_job_results.find_one", "apsched_job_results.delete_one",
                          "apsched_schedules.insert_one", "apsched_schedules.update_many",
                          "apsched_schedules.delete_many", "apsched_tasks.find_one_and_update")
    async with AsyncExitStack() as stack:
        store, broker = await _faulty_store(backend, plan, stack)
        await store.add_task(Task(id="t", func="tests.helpers:noop", job_executor="async"))
        await store.add_job(Job(task_id="t", executor="async",
                                result_expiration_time=timedelta(minutes=1)))
        [job] = await store.acquire_jobs("s1", timedelta(seconds=30), 1)
        await store.release_job("s1", job, JobResult.from_job(job, JobOutcome.success,
                                                              return_value=42))
        result = await store.get_job_result(job.id)
        await store.add_schedule(Schedule(id="s", task_id="t", trigger=IntervalTrigger(hours=1),
                                          job_executor="async"), ConflictPolicy.exception)
        await store.remove_schedules(["s"])

    assert plan.pending == set()  # every reply above was lost once
    assert result is not None and result.return_value == 42
    assert [type(e) for e in broker.events] == [
        TaskAdded, JobAdded, JobAcquired, JobReleased, ScheduleAdded, ScheduleRemoved]
    assert [e.job_id for e in broker.of_type(JobReleased)] == [job.id]
    assert [e.schedule_id for e in broker.of_type(ScheduleRemoved)] == ["s"]


def test_a_wall_clock_step_does_not_move_server_time() -> None:
    """Server time is anchored to the monotonic clock: NTP stepping this node's clock (or a
    VM resuming) changes nothing until the next measurement."""
    from apsched_mongo._clock import ServerClock

    wall = [datetime(2030, 1, 1, tzinfo=UTC)]
    ticks = [100.0]
    clock = ServerClock(lambda: wall[0], refresh_interval=60, monotonic=lambda: ticks[0])
    clock.observe({"localTime": datetime(2030, 1, 1, 0, 0, 5, tzinfo=UTC)}, round_trip=0.002)
    anchored = clock.current()
    assert anchored == datetime(2030, 1, 1, 0, 0, 5, 1000, tzinfo=UTC)  # + half the trip
    wall[0] += timedelta(hours=1)
    assert clock.current() == anchored
    ticks[0] += 2.5
    assert clock.current() == anchored + timedelta(seconds=2.5)
    assert clock.offset == anchored + timedelta(seconds=2.5) - wall[0]
    assert not clock.stale
    ticks[0] += 60
    assert clock.stale


async def test_leases_ignore_a_wall_clock_step_after_start(started: Any) -> None:
    clock = FakeClock()
    store, _ = await started(local_clock=clock, monotonic_clock=time.monotonic)
    clock.offset += timedelta(hours=1)  # the wall clock steps; the monotonic one does not
    await assert_a_lease_ends_30_s_from_now(store)
