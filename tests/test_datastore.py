"""The DataStore contract: every method, its events and its errors, on every back end."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import anyio
import pytest
from apscheduler import (
    CoalescePolicy,
    ConflictingIdError,
    ConflictPolicy,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
    Schedule,
    ScheduleAdded,
    ScheduleRemoved,
    ScheduleResult,
    ScheduleUpdated,
    Task,
    TaskAdded,
    TaskLookupError,
    TaskRemoved,
    TaskUpdated,
)
from apscheduler.serializers.cbor import CBORSerializer
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from apsched_mongo import MongoDBDataStore
from tests.helpers import FakeClock

pytestmark = pytest.mark.anyio
LEASE = timedelta(seconds=30)
IST = timezone(timedelta(hours=5, minutes=30))


def make_task(task_id: str = "task", **kwargs: Any) -> Task:
    return Task(id=task_id, func="tests.helpers:noop", job_executor="async", **kwargs)


def make_schedule(schedule_id: str, next_fire_time: datetime | None, **kwargs: Any) -> Schedule:
    kwargs.setdefault("task_id", "task")
    return Schedule(id=schedule_id, trigger=DateTrigger(next_fire_time or datetime.now(IST)),
                    job_executor="async", next_fire_time=next_fire_time, **kwargs)


def make_job(task_id: str = "task", **kwargs: Any) -> Job:
    return Job(task_id=task_id, executor="async", **kwargs)


# --- tasks -----------------------------------------------------------------------------------

async def test_add_get_replace_remove_task(started: Any) -> None:
    store, broker = await started()
    await store.add_task(make_task(max_running_jobs=3, metadata={"team": "ops"}))
    await store.add_task(make_task("other"))
    task = await store.get_task("task")
    assert (task.id, task.func, task.max_running_jobs, task.metadata, task.running_jobs) == (
        "task", "tests.helpers:noop", 3, {"team": "ops"}, 0
    )
    assert [t.id for t in await store.get_tasks()] == ["other", "task"]

    await store.add_task(make_task(max_running_jobs=1, misfire_grace_time=timedelta(seconds=5)))
    replaced = await store.get_task("task")
    assert replaced.max_running_jobs == 1
    assert replaced.misfire_grace_time == timedelta(seconds=5)

    await store.remove_task("task")
    with pytest.raises(TaskLookupError):
        await store.get_task("task")
    with pytest.raises(TaskLookupError):
        await store.remove_task("task")
    assert [(type(e), e.task_id) for e in broker.events] == [
        (TaskAdded, "task"), (TaskAdded, "other"), (TaskUpdated, "task"), (TaskRemoved, "task")
    ]


async def test_running_jobs_counts_every_claimed_job(started: Any) -> None:
    store, _ = await started()
    await store.add_task(make_task(max_running_jobs=5))
    await store.add_task(make_task("unlimited"))
    for task_id in ("unlimited", "task", "task", "task"):
        await store.add_job(make_job(task_id))
    await store.acquire_jobs("s1", LEASE, 3)
    assert (await store.get_task("task")).running_jobs == 2
    assert [(t.id, t.running_jobs) for t in await store.get_tasks()] == [
        ("task", 2), ("unlimited", 1)]


# --- schedules -------------------------------------------------------------------------------

@pytest.mark.parametrize("serializer", [PickleSerializer(), JSONSerializer(), CBORSerializer()],
                         ids=["pickle", "json", "cbor"])
async def test_schedule_round_trips_exactly(started: Any, serializer: Any) -> None:
    store, _ = await started(serializer=serializer)
    fire_time = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=IST)
    schedule = Schedule(
        id="s", task_id="task", trigger=CronTrigger(hour="*/2", timezone="Europe/Helsinki"),
        args=(1, "two"), kwargs={"x": [3]}, coalesce=CoalescePolicy.all,
        misfire_grace_time=timedelta(seconds=7, microseconds=5), max_jitter=timedelta(seconds=2),
        job_executor="threadpool", job_result_expiration_time=timedelta(minutes=3),
        metadata={"k": "v"}, next_fire_time=fire_time,
        last_fire_time=datetime(2031, 5, 6, 5, 8, 9, 999999, tzinfo=IST),
    )
    await store.add_schedule(schedule, ConflictPolicy.exception)
    [loaded] = await store.get_schedules()
    for field in ("id", "task_id", "args", "kwargs", "coalesce", "misfire_grace_time",
                  "max_jitter", "job_executor", "job_result_expiration_time", "metadata",
                  "paused", "acquired_by", "acquired_until"):
        assert getattr(loaded, field) == getattr(schedule, field), field
    assert loaded.next_fire_time == fire_time
    assert loaded.next_fire_time.utcoffset() == fire_time.utcoffset()
    assert loaded.last_fire_time == schedule.last_fire_time
    assert loaded.trigger.__getstate__() == schedule.trigger.__getstate__()
    assert await store.get_next_schedule_run_time() == fire_time


@pytest.mark.parametrize("policy", list(ConflictPolicy))
async def test_add_schedule_conflict_policies(started: Any, policy: ConflictPolicy) -> None:
    store, broker = await started()
    first = make_schedule("s", datetime(2030, 1, 1, tzinfo=UTC))
    second = make_schedule("s", datetime(2031, 1, 1, tzinfo=UTC), task_id="other")
    await store.add_schedule(first, ConflictPolicy.exception)
    if policy is ConflictPolicy.exception:
        with pytest.raises(ConflictingIdError):
            await store.add_schedule(second, policy)
    else:
        await store.add_schedule(second, policy)

    [stored] = await store.get_schedules()
    expected = second if policy is ConflictPolicy.replace else first
    assert (stored.task_id, stored.next_fire_time) == (expected.task_id, expected.next_fire_time)
    kinds = [type(event) for event in broker.events]
    assert kinds == ([ScheduleAdded, ScheduleUpdated] if policy is ConflictPolicy.replace
                     else [ScheduleAdded])


async def test_get_and_remove_schedules_by_id(started: Any) -> None:
    store, broker = await started()
    for name in "abc":
        await store.add_schedule(make_schedule(name, None), ConflictPolicy.exception)
    assert {s.id for s in await store.get_schedules({"a", "c", "zzz"})} == {"a", "c"}
    await store.remove_schedules(["a", "zzz"])
    assert {s.id for s in await store.get_schedules()} == {"b", "c"}
    removed = broker.of_type(ScheduleRemoved)
    assert [(e.schedule_id, e.task_id, e.finished) for e in removed] == [("a", "task", False)]


async def test_acquire_schedules_due_unpaused_in_order_with_limit(started: Any) -> None:
    clock = FakeClock()
    store, _ = await started(local_clock=clock)
    now = clock()
    for name, offset, paused in [("late", -1, False), ("early", -3, False), ("paused", -5, True),
                                 ("future", 60, False), ("middle", -2, False)]:
        schedule = make_schedule(name, now + timedelta(seconds=offset), paused=paused)
        await store.add_schedule(schedule, ConflictPolicy.exception)
    await store.add_schedule(make_schedule("done", None), ConflictPolicy.exception)

    acquired = await store.acquire_schedules("s1", LEASE, 2)
    assert [s.id for s in acquired] == ["early", "middle"]
    assert all(s.acquired_by == "s1" and s.acquired_until is not None for s in acquired)
    # Another scheduler gets only what is left; the lease holder can re-acquire its own
    assert [s.id for s in await store.acquire_schedules("s2", LEASE, 10)] == ["late"]
    assert [s.id for s in await store.acquire_schedules("s1", LEASE, 10)] == ["early", "middle"]
    assert await store.acquire_schedules("s3", LEASE, 10) == []
    # Once the leases expire, anyone may take them
    clock.advance(LEASE + timedelta(seconds=1))
    assert {s.id for s in await store.acquire_schedules("s3", LEASE, 10)} == {
        "early", "middle", "late"}


async def test_extend_schedule_leases(started: Any) -> None:
    clock = FakeClock()
    store, _ = await started(local_clock=clock)
    await store.add_schedule(make_schedule("s", clock() - timedelta(seconds=1)),
                             ConflictPolicy.exception)
    [schedule] = await store.acquire_schedules("s1", LEASE, 10)
    clock.advance(LEASE / 2)
    await store.extend_acquired_schedule_leases("s1", {"s"}, LEASE)
    await store.extend_acquired_schedule_leases("intruder", {"s"}, timedelta(days=1))
    clock.advance(LEASE * 3 / 4)  # past the first lease, within the extended one
    assert await store.acquire_schedules("s2", LEASE, 10) == []
    [extended] = await store.get_schedules()
    assert extended.acquired_until > schedule.acquired_until
    assert extended.acquired_until < schedule.acquired_until + timedelta(days=1)


async def test_release_schedules_updates_progress_and_lease(started: Any) -> None:
    clock = FakeClock()
    store, broker = await started(local_clock=clock)
    due = clock() - timedelta(seconds=1)
    trigger = IntervalTrigger(seconds=10, start_time=due)
    await store.add_schedule(Schedule(id="s", task_id="task", trigger=trigger, job_executor="async",
                                      next_fire_time=trigger.next()), ConflictPolicy.exception)
    [schedule] = await store.acquire_schedules("s1", LEASE, 10)
    next_time = schedule.trigger.next()
    await store.release_schedules("s1", [ScheduleResult(
        schedule_id="s", task_id="task", trigger=schedule.trigger, last_fire_time=due,
        next_fire_time=next_time)])
    [released] = await store.get_schedules()
    assert (released.last_fire_time, released.next_fire_time) == (due, next_time)
    assert (released.acquired_by, released.acquired_until) == (None, None)
    assert released.trigger.next() == next_time + timedelta(seconds=10)
    assert broker.of_type(ScheduleUpdated)[-1].next_fire_time == next_time
    assert await store.get_next_schedule_run_time() == next_time


async def test_release_by_non_holder_changes_nothing(started: Any) -> None:
    clock = FakeClock()
    store, _ = await started(local_clock=clock)
    await store.add_schedule(make_schedule("s", clock() - timedelta(seconds=1)),
                             ConflictPolicy.exception)
    [schedule] = await store.acquire_schedules("s1", LEASE, 10)
    await store.release_schedules("s2", [ScheduleResult(
        schedule_id="s", task_id="task", trigger=schedule.trigger,
        last_fire_time=clock(), next_fire_time=None)])
    [stored] = await store.get_schedules()
    assert stored.acquired_by == "s1"
    assert stored.next_fire_time == schedule.next_fire_time


async def test_next_schedule_run_time(started: Any) -> None:
    store, _ = await started()
    assert await store.get_next_schedule_run_time() is None
    base = datetime(2030, 1, 1, 0, 0, 0, 500, tzinfo=UTC)
    await store.add_schedule(make_schedule("paused", base, paused=True), ConflictPolicy.exception)
    await store.add_schedule(make_schedule("b", base + timedelta(microseconds=1)),
                             ConflictPolicy.exception)
    await store.add_schedule(make_schedule("c", base + timedelta(hours=1)),
                             ConflictPolicy.exception)
    assert await store.get_next_schedule_run_time() == base + timedelta(microseconds=1)


# --- jobs ------------------------------------------------------------------------------------

async def test_add_and_get_jobs_in_queue_order(started: Any) -> None:
    store, broker = await started()
    base = datetime(2030, 1, 1, tzinfo=UTC)
    jobs = [make_job(created_at=base + timedelta(seconds=s), args=(s,), kwargs={"k": s},
                     schedule_id="sched", scheduled_fire_time=base + timedelta(minutes=s),
                     metadata={"n": s})
            for s in (3, 1, 2)]
    for job in jobs:
        await store.add_job(job)
    loaded = await store.get_jobs()
    assert [job.args for job in loaded] == [(1,), (2,), (3,)]
    assert {job.id for job in await store.get_jobs([jobs[0].id])} == {jobs[0].id}
    first = next(job for job in loaded if job.id == jobs[1].id)
    for field in ("id", "task_id", "args", "kwargs", "schedule_id", "scheduled_fire_time",
                  "executor", "jitter", "start_deadline", "result_expiration_time", "metadata",
                  "created_at"):
        assert getattr(first, field) == getattr(jobs[1], field), field
    assert [(type(e), e.job_id, e.schedule_id) for e in broker.events] == [
        (JobAdded, job.id, "sched") for job in jobs
    ]


async def test_acquire_jobs_claims_each_job_once(started: Any) -> None:
    store, broker = await started()
    await store.add_task(make_task())
    jobs = [make_job() for _ in range(5)]
    for job in jobs:
        await store.add_job(job)
    first = await store.acquire_jobs("s1", LEASE, 3)
    second = await store.acquire_jobs("s2", LEASE, 10)
    assert [j.id for j in first] == [j.id for j in jobs[:3]]
    assert [j.id for j in second] == [j.id for j in jobs[3:]]
    assert await store.acquire_jobs("s3", LEASE, 10) == []
    assert all(j.acquired_by == "s1" and j.acquired_until for j in first)
    acquired_events = broker.of_type(JobAcquired)
    assert [(e.job_id, e.scheduler_id) for e in acquired_events] == (
        [(j.id, "s1") for j in first] + [(j.id, "s2") for j in second]
    )


async def test_max_running_jobs_is_respected(started: Any) -> None:
    store, _ = await started()
    await store.add_task(make_task(max_running_jobs=2))
    await store.add_task(make_task("free"))
    for _ in range(4):
        await store.add_job(make_job())
    await store.add_job(make_job("free"))
    first = await store.acquire_jobs("s1", LEASE, 10)
    assert sorted(j.task_id for j in first) == ["free", "task", "task"]
    assert await store.acquire_jobs("s2", LEASE, 10) == []
    done = next(j for j in first if j.task_id == "task")
    await store.release_job("s1", done, JobResult.from_job(done, JobOutcome.success))
    [third] = await store.acquire_jobs("s2", LEASE, 10)
    assert third.task_id == "task"
    assert (await store.get_task("task")).running_jobs == 2


async def test_jobs_behind_a_saturated_task_are_not_starved(started: Any) -> None:
    store, _ = await started()
    await store.add_task(make_task(max_running_jobs=1))
    await store.add_task(make_task("free"))
    for _ in range(10):
        await store.add_job(make_job())
    later = make_job("free")
    await store.add_job(later)
    acquired = await store.acquire_jobs("s1", LEASE, 5)
    assert sorted(job.task_id for job in acquired) == ["free", "task"]
    assert later.id in {job.id for job in acquired}
    assert [job.task_id for job in await store.acquire_jobs("s2", LEASE, 5)] == []


async def test_missed_start_deadline_is_released(started: Any) -> None:
    clock = FakeClock()
    store, broker = await started(local_clock=clock)
    await store.add_task(make_task())
    late = make_job(start_deadline=clock() - timedelta(seconds=1),
                    result_expiration_time=timedelta(minutes=1))
    ok = make_job(start_deadline=clock() + timedelta(seconds=60))
    await store.add_job(late)
    await store.add_job(ok)
    assert [j.id for j in await store.acquire_jobs("s1", LEASE, 10)] == [ok.id]
    [released] = broker.of_type(JobReleased)
    assert (released.job_id, released.outcome) == (late.id, JobOutcome.missed_start_deadline)
    result = await store.get_job_result(late.id)
    assert result is not None and result.outcome is JobOutcome.missed_start_deadline
    assert [j.id for j in await store.get_jobs()] == [ok.id]


async def test_release_job_records_result_once(started: Any) -> None:
    store, broker = await started()
    await store.add_task(make_task())
    job = make_job(result_expiration_time=timedelta(minutes=5), schedule_id="sch",
                   scheduled_fire_time=datetime(2030, 1, 1, 0, 0, 0, 7, tzinfo=IST))
    await store.add_job(job)
    [acquired] = await store.acquire_jobs("s1", LEASE, 1)
    result = JobResult.from_job(acquired, JobOutcome.success, return_value={"answer": 42})
    await store.release_job("s1", acquired, result)

    assert await store.get_jobs() == []
    [event] = broker.of_type(JobReleased)
    assert (event.job_id, event.scheduler_id, event.task_id, event.schedule_id,
            event.scheduled_start, event.outcome) == (
        job.id, "s1", "task", "sch", job.scheduled_fire_time, JobOutcome.success)
    fetched = await store.get_job_result(job.id)
    assert fetched is not None
    assert (fetched.outcome, fetched.return_value, fetched.finished_at, fetched.expires_at) == (
        JobOutcome.success, {"answer": 42}, result.finished_at, result.expires_at)
    assert await store.get_job_result(job.id) is None  # fetched results are removed


async def test_error_result_keeps_exception(started: Any) -> None:
    store, _ = await started()
    await store.add_task(make_task())
    await store.add_job(make_job(result_expiration_time=timedelta(minutes=5)))
    [job] = await store.acquire_jobs("s1", LEASE, 1)
    await store.release_job("s1", job, JobResult.from_job(
        job, JobOutcome.error, exception=ValueError("boom")))
    result = await store.get_job_result(job.id)
    assert result is not None and isinstance(result.exception, ValueError)
    assert str(result.exception) == "boom"


async def test_result_without_expiration_is_not_stored(started: Any, backend: Any) -> None:
    store, broker = await started()
    await store.add_task(make_task())
    await store.add_job(make_job())
    [job] = await store.acquire_jobs("s1", LEASE, 1)
    await store.release_job("s1", job, JobResult.from_job(job, JobOutcome.success))
    assert len(broker.of_type(JobReleased)) == 1
    assert await store.get_job_result(job.id) is None
    assert await backend.db()["apsched_job_results"].count_documents({}) == 0


async def test_expired_results_vanish_and_ttl_index_exists(started: Any, backend: Any) -> None:
    clock = FakeClock()
    store, _ = await started(local_clock=clock)
    await store.add_task(make_task())
    await store.add_job(make_job(result_expiration_time=timedelta(seconds=10)))
    [job] = await store.acquire_jobs("s1", LEASE, 1)
    await store.release_job("s1", job, JobResult.from_job(job, JobOutcome.success,
                                                          finished_at=clock()))
    results = backend.db()["apsched_job_results"]
    document = await results.find_one({"_id": job.id})
    assert isinstance(document["expires_at"], datetime)  # a BSON date, so TTL applies
    indexes = await results.index_information()
    assert any(info.get("expireAfterSeconds") == 0 and info["key"] == [("expires_at", 1)]
               for info in indexes.values())
    clock.advance(timedelta(seconds=11))
    await store.cleanup()
    assert await results.count_documents({"_id": job.id}) == 0


async def test_extend_job_leases(started: Any) -> None:
    clock = FakeClock()
    store, _ = await started(local_clock=clock)
    await store.add_task(make_task())
    await store.add_job(make_job())
    [job] = await store.acquire_jobs("s1", LEASE, 1)
    clock.advance(LEASE / 2)
    await store.extend_acquired_job_leases("s1", {job.id}, LEASE)
    clock.advance(LEASE * 3 / 4)
    await store.cleanup()  # the lease was extended, so the job is still running
    [still] = await store.get_jobs()
    assert still.acquired_by == "s1" and still.acquired_until > job.acquired_until


async def test_reap_abandoned_jobs(started: Any) -> None:
    store, broker = await started()
    await store.add_task(make_task(max_running_jobs=10))
    for _ in range(2):
        await store.add_job(make_job(result_expiration_time=timedelta(minutes=1)))
    await store.add_job(make_job())
    mine = await store.acquire_jobs("s1", LEASE, 2)
    [theirs] = await store.acquire_jobs("s2", LEASE, 2)
    await store.reap_abandoned_jobs("s1")
    released = broker.of_type(JobReleased)
    assert {(e.job_id, e.outcome, e.scheduler_id) for e in released} == {
        (job.id, JobOutcome.abandoned, "s1") for job in mine}
    assert [j.id for j in await store.get_jobs()] == [theirs.id]
    result = await store.get_job_result(mine[0].id)
    assert result is not None and result.outcome is JobOutcome.abandoned
    assert (await store.get_task("task")).running_jobs == 1


async def test_cleanup_releases_expired_leases_and_finished_schedules(started: Any) -> None:
    clock = FakeClock()
    store, broker = await started(local_clock=clock)
    await store.add_task(make_task(max_running_jobs=1))
    await store.add_schedule(make_schedule("finished", None), ConflictPolicy.exception)
    await store.add_schedule(make_schedule("busy", None), ConflictPolicy.exception)
    await store.add_schedule(make_schedule("active", clock() + timedelta(days=1)),
                             ConflictPolicy.exception)
    await store.add_job(make_job(schedule_id="busy"))
    await store.add_job(make_job())
    [job] = await store.acquire_jobs("crashed", LEASE, 5)
    assert await store.acquire_jobs("s2", LEASE, 5) == []  # the slot is held

    await store.cleanup()
    assert {s.id for s in await store.get_schedules()} == {"busy", "active"}
    assert [e.schedule_id for e in broker.of_type(ScheduleRemoved)] == ["finished"]
    assert broker.of_type(ScheduleRemoved)[0].finished

    clock.advance(LEASE + timedelta(seconds=1))
    await store.cleanup()
    [released] = broker.of_type(JobReleased)
    assert (released.job_id, released.outcome, released.scheduler_id) == (
        job.id, JobOutcome.abandoned, "crashed")
    # The crashed scheduler's slot is free again
    assert len(await store.acquire_jobs("s2", LEASE, 5)) == 1


async def test_start_from_scratch_and_reuse_of_existing_data(backend: Any, started: Any) -> None:
    store, _ = await started()
    await store.add_task(make_task())
    reused, _ = await started()
    assert [t.id for t in await reused.get_tasks()] == ["task"]
    fresh, _ = await started(start_from_scratch=True)
    assert await fresh.get_tasks() == []


async def test_a_schedule_changed_between_read_and_claim_is_not_claimed_stale(
    started: Any,
) -> None:
    """A claim only wins on the document exactly as read, so no scheduler fires old args."""
    clock = FakeClock()
    store, _ = await started(local_clock=clock)
    other, _ = await started(local_clock=clock)
    due = clock() - timedelta(seconds=1)
    await store.add_schedule(make_schedule("s", due, args=("old",)), ConflictPolicy.exception)

    schedules = store._schedules  # interleave another node's write between our read and claim
    original_bulk_write = schedules.bulk_write

    async def replace_first(*args: Any, **kwargs: Any) -> Any:
        schedules.bulk_write = original_bulk_write
        await other.add_schedule(make_schedule("s", due, args=("new",)), ConflictPolicy.replace)
        return await original_bulk_write(*args, **kwargs)

    schedules.bulk_write = replace_first
    acquired = await store.acquire_schedules("s1", LEASE, 10)
    acquired += await store.acquire_schedules("s1", LEASE, 10)
    assert [schedule.args for schedule in acquired] == [("new",)]


async def test_claimed_jobs_tasks_are_served_without_a_round_trip(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """APScheduler calls get_task for every claimed job; the definition came with the claim.
    A change made through any store is seen at once (its event); without events, within
    TASK_CACHE_SECONDS."""
    import logging
    from contextlib import AsyncExitStack

    import apsched_mongo.datastore as datastore_module
    from tests.conftest import RecordingBroker
    from tests.faults import FaultPlan, FaultyClient
    from tests.helpers import ClusterBus

    plan = FaultPlan(seed=0)
    log = logging.getLogger(__name__)
    now = [1000.0]
    monkeypatch.setattr(datastore_module, "monotonic", lambda: now[0])
    async with AsyncExitStack() as stack:
        bus = ClusterBus()
        stores = []
        brokers = []
        for client in (FaultyClient(backend.client(), plan), backend.client()):
            broker = bus.broker()
            await broker.start(stack, log)
            store = MongoDBDataStore(client, database=backend.database)
            await store.start(stack, broker, log)
            stores.append(store)
            brokers.append(broker)
        mine, other = stores
        await other.add_task(make_task(metadata={"v": 1}))
        await other.add_job(make_job())
        [job] = await mine.acquire_jobs("s1", LEASE, 10)
        before = plan.attempts.total()
        assert (await mine.get_task(job.task_id)).metadata == {"v": 1}
        assert plan.attempts.total() == before  # no round trip

        delivered = anyio.Event()
        brokers[0].subscribe(lambda event: delivered.set(), {TaskUpdated}, one_shot=True)
        await other.add_task(make_task(metadata={"v": 2}))  # TaskUpdated reaches `mine`
        with anyio.fail_after(5):
            await delivered.wait()  # delivered after the store's own subscription
        assert (await mine.get_task("task")).metadata == {"v": 2}

        # Without the event (a store on its own broker), the copy lives TASK_CACHE_SECONDS
        lonely_broker = RecordingBroker()
        await lonely_broker.start(stack, log)
        lonely = MongoDBDataStore(backend.client(), database=backend.database)
        await lonely.start(stack, lonely_broker, log)
        await other.add_job(make_job())
        await lonely.acquire_jobs("s2", LEASE, 10)
        await other.add_task(make_task(metadata={"v": 3}))
        assert (await lonely.get_task("task")).metadata == {"v": 2}
        now[0] += datastore_module.TASK_CACHE_SECONDS
        assert (await lonely.get_task("task")).metadata == {"v": 3}


# --- removals and releases in O(1) round trips -----------------------------------------------

async def _counting_store(backend: Any, stack: Any) -> tuple[Any, Any, Any]:
    import logging

    from tests.conftest import RecordingBroker
    from tests.faults import FaultPlan, FaultyClient

    plan = FaultPlan(seed=0, rate=0)
    broker = RecordingBroker()
    log = logging.getLogger(__name__)
    await broker.start(stack, log)
    store = MongoDBDataStore(FaultyClient(backend.client(), plan), database=backend.database)
    await store.start(stack, broker, log)
    return store, broker, plan


async def test_removed_schedules_are_announced_in_the_order_given_at_a_fixed_cost(
    backend: Any,
) -> None:
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        store, broker, plan = await _counting_store(backend, stack)
        names = [f"s{n:02}" for n in range(40)]
        for name in names:
            await store.add_schedule(make_schedule(name, None), ConflictPolicy.exception)
        order = [*reversed(names[20:]), "missing", *names[:20:2]]
        plan.attempts.clear()
        await store.remove_schedules(order)
        assert plan.attempts.total() <= 4  # mark, read, delete (and maybe the clock)
    removed = [e.schedule_id for e in broker.of_type(ScheduleRemoved)]
    assert removed == [name for name in order if name != "missing"]
    assert {s.id for s in await store.get_schedules()} == set(names[1:20:2])


async def test_abandoned_jobs_are_released_in_a_fixed_number_of_round_trips(
    backend: Any,
) -> None:
    from contextlib import AsyncExitStack

    async with AsyncExitStack() as stack:
        store, broker, plan = await _counting_store(backend, stack)
        await store.add_task(make_task())
        for _ in range(30):
            await store.add_job(make_job(result_expiration_time=timedelta(minutes=1)))
        held = await store.acquire_jobs("gone", LEASE, 30)
        assert len(held) == 30
        plan.attempts.clear()
        await store.reap_abandoned_jobs("gone")
        assert plan.attempts.total() <= 5  # take over, read, results, delete (and clock)
    assert sorted(e.job_id for e in broker.of_type(JobReleased)) == sorted(j.id for j in held)


async def test_discard_job_drops_only_unclaimed_jobs_and_says_so(started: Any) -> None:
    store, broker = await started()
    await store.add_task(make_task())
    queued, running = make_job(result_expiration_time=timedelta(minutes=1)), make_job()
    await store.add_job(running)
    [claimed] = await store.acquire_jobs("s1", LEASE, 1)
    assert claimed.id == running.id
    await store.add_job(queued)
    assert not await store.discard_job(running.id)
    assert await store.discard_job(queued.id, by="dashboard")
    assert not await store.discard_job(queued.id)  # gone now
    [event] = broker.of_type(JobReleased)
    assert (event.job_id, event.outcome, event.scheduler_id) == (
        queued.id, JobOutcome.cancelled, "dashboard")
    result = await store.get_job_result(queued.id)
    assert result is not None and result.outcome is JobOutcome.cancelled
    assert [job.id for job in await store.get_jobs()] == [running.id]


async def test_a_job_claimed_on_insert_by_a_stopping_node_goes_to_another(
    backend: Any,
) -> None:
    """A node whose scheduler has room claims the job it adds in the insert itself; if the
    node stops before its scheduler takes the job, the job is unclaimed and announced again,
    and another node runs it now rather than as abandoned after the lease."""
    import logging
    from contextlib import AsyncExitStack

    from tests.helpers import SharedBroker

    log = logging.getLogger(__name__)
    async with AsyncExitStack() as outer:
        bus = SharedBroker()
        await bus.start_shared(outer, log)
        heard: list[Any] = []
        bus.subscribe(heard.append, {JobAdded, JobAcquired})
        survivor = backend.store()
        await survivor.start(outer, bus, log)
        async with AsyncExitStack() as stack:
            stopping = backend.store()
            await stopping.start(stack, bus, log)
            await stopping.add_task(make_task())
            await stopping.get_task("task")  # as APScheduler's configure_task does
            assert await stopping.acquire_jobs("stopping", LEASE, 10) == []  # has room
            job = make_job()
            await stopping.add_job(job)
            [held] = await backend.db()["apsched_jobs"].find({}).to_list(None)
            assert held["acquired_by"] == "stopping"  # claimed by the insert itself
        [document] = await backend.db()["apsched_jobs"].find({}).to_list(None)
        assert document.get("acquired_by") is None
        with anyio.fail_after(5):
            [taken] = await survivor.acquire_jobs("survivor", LEASE, 10)
        assert taken.id == job.id
    assert [(type(e), e.job_id) for e in heard] == [
        (JobAdded, job.id), (JobAdded, job.id), (JobAcquired, job.id)]


async def test_a_fire_time_gets_one_job_even_when_fired_twice(
    started: Any, caplog_warnings: Any
) -> None:
    """A node that fires a schedule and stops before recording it leaves the fire time to
    be fired again by whoever takes the schedule over: its job is not added twice."""
    store, broker = await started()
    fire_time = datetime(2030, 1, 1, tzinfo=UTC)
    first = make_job(schedule_id="s", scheduled_fire_time=fire_time)
    again = make_job(schedule_id="s", scheduled_fire_time=fire_time)
    other_time = make_job(schedule_id="s", scheduled_fire_time=fire_time + timedelta(hours=1))
    run_now = [make_job(schedule_id="s"), make_job(schedule_id="s")]  # no fire time
    for job in (first, again, other_time, *run_now):
        await store.add_job(job)
    assert {job.id for job in await store.get_jobs()} == {
        first.id, other_time.id, *(job.id for job in run_now)}
    assert again.id not in {event.job_id for event in broker.of_type(JobAdded)}
    assert "one exists already" in caplog_warnings.text


async def test_fire_times_stored_twice_by_an_older_version_do_not_stop_the_store(
    started: Any, backend: Any, caplog_warnings: Any
) -> None:
    jobs = backend.db()["apsched_jobs"]
    fire_time = datetime(2030, 1, 1, tzinfo=UTC)
    await jobs.insert_many([{"_id": n, "task_id": "task", "schedule_id": "s",
                             "scheduled_fire_time": fire_time, "queue_order": n}
                            for n in range(2)])
    await started()
    assert "apsched_fire will be created" in caplog_warnings.text
    assert "apsched_fire" not in await jobs.index_information()
    assert "apsched_queue" in await jobs.index_information()


async def test_a_fire_time_whose_job_ran_is_not_fired_again_by_a_takeover(
    started: Any, caplog_warnings: Any
) -> None:
    """A node fires a schedule (adds the job) and stops before recording it; the job runs
    and is gone. The node restarted under the same name takes the schedule again and fires
    the same time: the marker the job's release left says it ran, so nothing is added."""
    firing, _ = await started()
    await firing.add_task(make_task())
    due = datetime.now(UTC) - timedelta(seconds=1)
    await firing.add_schedule(make_schedule("s", due), ConflictPolicy.exception)
    [schedule] = await firing.acquire_schedules("node-a", LEASE, 10)
    fire = make_job(schedule_id="s", scheduled_fire_time=schedule.next_fire_time)
    await firing.add_job(fire)  # ... and the node stops: no release_schedules

    worker, _ = await started()
    [job] = await worker.acquire_jobs("worker", LEASE, 1)
    await worker.release_job("worker", job, JobResult.from_job(job, JobOutcome.success))

    restarted, broker = await started()
    [again] = await restarted.acquire_schedules("node-a", LEASE, 10)
    assert again.next_fire_time == schedule.next_fire_time  # unrecorded: fired again
    await restarted.add_job(make_job(schedule_id="s", scheduled_fire_time=again.next_fire_time))
    assert await restarted.get_jobs() == []
    assert broker.of_type(JobAdded) == []
    assert "it ran already" in caplog_warnings.text
    # A fire time never fired before is added as usual
    later = make_job(schedule_id="s", scheduled_fire_time=due + timedelta(hours=1))
    await restarted.add_job(later)
    assert [j.id for j in await restarted.get_jobs()] == [later.id]
