"""Fault drills: lost replies, crashes, clock skew, permanent failures and secret hygiene."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import anyio
import pytest
from apscheduler import (
    AsyncScheduler,
    ConflictPolicy,
    Event,
    Job,
    JobOutcome,
    JobReleased,
    JobResult,
    RetrySettings,
    Schedule,
    current_job,
    task,
)
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.interval import IntervalTrigger
from pymongo.errors import NotPrimaryError, OperationFailure
from tenacity import stop_after_attempt, wait_fixed

from apsched_mongo import MongoDBDataStore, ServerUnreachableError
from apsched_mongo import _clock as clock_module
from tests.conftest import Backend
from tests.faults import FaultPlan, FaultyClient, LoseFirstReply
from tests.helpers import FakeClock, SharedBroker

try:
    from apsched_mongo.eventbroker import MongoDBEventBroker
except ImportError:  # pragma: no cover - written concurrently; the drills don't need it
    MongoDBEventBroker = None  # type: ignore[assignment,misc]

pytestmark = pytest.mark.anyio

FAST_RETRY = RetrySettings(stop=stop_after_attempt(20), wait=wait_fixed(0))
#: ``cleanup_interval=None`` (no automatic clean-up) is documented but not in the hints
NO_CLEANUP: Any = None
quiet = logging.getLogger("apsched_mongo.tests.drills")
quiet.setLevel(logging.ERROR)  # hundreds of "temporary error, retrying" warnings otherwise

executions: Counter[UUID] = Counter()
running: defaultdict[UUID, anyio.Event] = defaultdict(anyio.Event)


@task(max_running_jobs=10)  # (add_job resets what configure_task set to the task defaults)
async def drill_job() -> None:
    """Counts its executions per job id."""
    executions[current_job.get().id] += 1


@task(max_running_jobs=None)
async def blocking_job() -> None:
    """Runs until cancelled (the node crashes under it)."""
    running[current_job.get().id].set()
    await anyio.sleep_forever()


def on(broker: LocalEventBroker, event_type: type[Any],
       callback: Callable[[Any], None]) -> None:
    def deliver(event: Event) -> None:
        callback(event)

    broker.subscribe(deliver, {event_type})


@asynccontextmanager
async def nodes(backend: Backend, count: int, broker: LocalEventBroker,
                plan: FaultPlan | None = None, **store_kwargs: Any
                ) -> AsyncIterator[list[AsyncScheduler]]:
    """``count`` schedulers, each with its own store (and client) on one database."""
    async with AsyncExitStack() as stack:
        schedulers = []
        for i in range(count):
            client = backend.client()
            store = MongoDBDataStore(FaultyClient(client, plan) if plan else client,
                                     database=backend.database, retry_settings=FAST_RETRY,
                                     **store_kwargs)
            scheduler = AsyncScheduler(store, broker, identity=f"node{i}",
                                       cleanup_interval=NO_CLEANUP, logger=quiet)
            await stack.enter_async_context(scheduler)
            schedulers.append(scheduler)
        yield schedulers
        for scheduler in schedulers:
            await scheduler.stop()


# --- lost replies and failovers ---------------------------------------------------------------

async def run_fault_drill(backend: Backend, jobs: int, node_count: int, seed: int,
                          time_limit: float) -> dict[str, Any]:
    executions.clear()
    plan = FaultPlan(seed=seed, rate=0.1)
    released: list[JobReleased] = []
    all_released = anyio.Event()
    # Keep the queue short: mongomock-ng scans every document on each query, so a backlog
    # of a thousand jobs would make the drill quadratic (and no more faithful)
    in_flight = anyio.Semaphore(40)

    def count_release(event: JobReleased) -> None:
        released.append(event)
        in_flight.release()
        if len(released) >= jobs:
            all_released.set()

    job_ids: list[UUID] = []
    async with AsyncExitStack() as stack:
        broker = SharedBroker()
        await broker.start_shared(stack, quiet)
        on(broker, JobReleased, count_release)
        schedulers = await stack.enter_async_context(nodes(backend, node_count, broker, plan))
        for scheduler in schedulers:
            await scheduler.start_in_background()

        async def produce(scheduler: AsyncScheduler, count: int) -> None:
            for _ in range(count):
                await in_flight.acquire()
                job_ids.append(await scheduler.add_job(drill_job))

        plan.enable()
        with anyio.fail_after(time_limit):
            async with anyio.create_task_group() as tg:
                for scheduler in schedulers:
                    tg.start_soon(produce, scheduler, jobs // node_count)
            await all_released.wait()
        plan.disable()

    jobs_collection = backend.db()["apsched_jobs"]
    return {
        "job_ids": job_ids,
        "released": released,
        "plan": plan,
        "jobs_left": await jobs_collection.count_documents({}),
        "leases_left": await jobs_collection.count_documents({"acquired_by": {"$ne": None}}),
    }


def check_exactly_once(outcome: dict[str, Any], jobs: int) -> None:
    job_ids, released, plan = outcome["job_ids"], outcome["released"], outcome["plan"]
    duplicates = sum(count - 1 for count in executions.values() if count > 1)
    print(f"\nfault drill: {jobs} jobs, {plan.operations} operations, "
          f"{plan.total_injected} faults injected ({dict(plan.injected)}), "
          f"{duplicates} duplicate executions, {len(released)} JobReleased events")
    assert len(job_ids) == len(set(job_ids)) == jobs
    assert set(executions) == set(job_ids), "a job was lost or an unknown job ran"
    assert duplicates == 0, [job for job, count in executions.items() if count > 1]
    assert sorted(event.job_id for event in released) == sorted(job_ids)
    assert {event.outcome for event in released} == {JobOutcome.success}
    assert (outcome["jobs_left"], outcome["leases_left"]) == (0, 0)
    assert plan.injected["before"] > 0 and plan.injected["after"] > 0
    assert plan.total_injected >= plan.operations * 0.05


async def test_every_job_runs_exactly_once_under_injected_faults(backend: Backend) -> None:
    outcome = await run_fault_drill(backend, jobs=1000, node_count=4, seed=4, time_limit=60)
    check_exactly_once(outcome, 1000)


@pytest.mark.soak
@pytest.mark.parametrize("seed", range(5))
async def test_exactly_once_soak(backend: Backend, seed: int) -> None:
    outcome = await run_fault_drill(backend, jobs=5000, node_count=4, seed=seed,
                                    time_limit=600)
    check_exactly_once(outcome, 5000)


# --- a node crashes mid-job -------------------------------------------------------------------

async def test_crashed_nodes_leases_expire_and_survivor_takes_over(backend: Backend) -> None:
    executions.clear()
    running.clear()
    lease = timedelta(seconds=30)
    jobs = backend.db()["apsched_jobs"]
    schedules = backend.db()["apsched_schedules"]

    # Node A dies the moment it tries to add the job of a schedule it has acquired: its
    # connection goes dead, so it can neither add that job nor release anything it holds.
    plan = FaultPlan(seed=0, rate=0)
    plan.kill_when = lambda what, args, kwargs: (
        what == "apsched_jobs.insert_one" and args[0].get("schedule_id") is not None
    )
    crashed = anyio.Event()
    blocked: list[UUID] = []

    async def run_node_a() -> None:
        store = MongoDBDataStore(FaultyClient(backend.client(), plan),
                                 database=backend.database, retry_settings=FAST_RETRY)
        try:
            async with AsyncScheduler(store, LocalEventBroker(), identity="A",
                                      lease_duration=lease, cleanup_interval=NO_CLEANUP,
                                      logger=quiet) as node_a:
                await node_a.start_in_background()
                for _ in range(3):
                    blocked.append(await node_a.add_job(blocking_job))
                for job_id in blocked:
                    await running[job_id].wait()
                await node_a.add_schedule(drill_job, IntervalTrigger(hours=1), id="sched")
                await anyio.sleep_forever()  # until the crash cancels us
        except Exception as exc:  # the crash: an ExceptionGroup of AutoReconnects
            assert plan.dead, exc
            crashed.set()

    with anyio.fail_after(15):
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_node_a)
            await crashed.wait()

        # A left its jobs and its schedule leased
        assert {doc["_id"] for doc in await jobs.find({"acquired_by": "A"}).to_list(None)} \
            == set(blocked)
        assert (await schedules.find_one({"_id": "sched"}))["acquired_by"] == "A"

        # The survivor's clock is moved instead of waiting out the 30 s lease (its server
        # clock offset was measured at start, so its "server now" moves with it)
        clock = FakeClock()
        store_b = MongoDBDataStore(backend.client(), database=backend.database,
                                   local_clock=clock, monotonic_clock=clock.monotonic,
                                   retry_settings=FAST_RETRY)
        broker_b = LocalEventBroker()
        released: list[JobReleased] = []
        abandoned = anyio.Event()
        schedule_ran = anyio.Event()

        def on_release(event: JobReleased) -> None:
            released.append(event)
            if event.schedule_id == "sched":
                schedule_ran.set()
            elif len(released) == len(blocked):
                abandoned.set()

        on(broker_b, JobReleased, on_release)
        async with nodes_b(store_b, broker_b, lease) as node_b:
            await node_b.cleanup()  # leases still valid: nothing released
            await anyio.wait_all_tasks_blocked()
            assert released == []
            assert await jobs.count_documents({"acquired_by": "A"}) == 3

            clock.advance(lease + timedelta(seconds=1))
            await node_b.cleanup()
            await abandoned.wait()
            assert sorted(event.job_id for event in released) == sorted(blocked)
            assert {(event.outcome, event.scheduler_id) for event in released} == {
                (JobOutcome.abandoned, "A")}

            await node_b.start_in_background()  # picks up A's expired schedule lease
            await schedule_ran.wait()

        [sched] = await schedules.find({"_id": "sched"}).to_list(None)
        assert sched.get("acquired_by") is None
        assert sched["next_fire_time"] > datetime.now(UTC) + timedelta(minutes=50)
        assert list(executions.values()) == [1]
        assert await jobs.count_documents({}) == 0


@asynccontextmanager
async def nodes_b(store: MongoDBDataStore, broker: LocalEventBroker, lease: timedelta
                  ) -> AsyncIterator[AsyncScheduler]:
    async with AsyncScheduler(store, broker, identity="B", lease_duration=lease,
                              cleanup_interval=NO_CLEANUP, logger=quiet) as scheduler:
        yield scheduler
        await scheduler.stop()


# --- several nodes cleaning up the same crashed node's jobs, through faults -------------------

class EveryOperationFails(FaultPlan):
    """Each operation, by name: the first call is applied but its reply lost, the second
    fails before reaching the server (a step-down), the third goes through."""

    def __init__(self) -> None:
        super().__init__(seed=0, enabled=True)
        self.calls: Counter[str] = Counter()
        self.failed: set[str] = set()

    def check_before(self, what: str, args: tuple[Any, ...] = (),
                     kwargs: dict[str, Any] | None = None) -> str | None:
        self.attempts[what] += 1
        if not self.enabled:
            return None
        self.calls[what] += 1
        if self.calls[what] % 3 == 1:
            self.failed.add(what)
            return "after"
        if self.calls[what] % 3 == 2:
            self.injected["before"] += 1
            raise NotPrimaryError(f"injected: {what} refused", {"code": 10107})
        return None


async def test_racing_cleanups_release_each_abandoned_job_once_through_faults(
    backend: Backend,
) -> None:
    """Cleanup on several nodes races, by design, for the same expired leases. With lost
    replies and step-downs injected into every operation, each abandoned job must still be
    released exactly once: one JobReleased, one result, across all nodes."""
    jobs_count, lease = 60, timedelta(seconds=30)
    clock = FakeClock()
    released: list[JobReleased] = []
    async with AsyncExitStack() as stack:
        broker = SharedBroker()
        await broker.start_shared(stack, quiet)
        on(broker, JobReleased, released.append)
        crashed = MongoDBDataStore(backend.client(), database=backend.database,
                                   retry_settings=FAST_RETRY)
        await crashed.start(stack, broker, quiet)
        await crashed.add_task(make_task(max_running_jobs=None))
        for _ in range(jobs_count):
            await crashed.add_job(Job(task_id="drill", executor="async",
                                      result_expiration_time=timedelta(minutes=5)))
        held = await crashed.acquire_jobs("crashed", lease, jobs_count)
        assert len(held) == jobs_count

        plans = [EveryOperationFails() for _ in range(3)]
        # Line the nodes up for the worst interleaving: the first node takes the jobs over
        # and reads what it won; only then do the others try to take the same jobs over;
        # and nobody deletes before they all have
        first_read, all_took_over = anyio.Event(), anyio.Event()
        reached_find: set[int] = set()

        def make_gate(number: int) -> Any:
            async def gate(what: str) -> None:
                if what == "apsched_jobs.find":  # its takeover is done
                    reached_find.add(number)
                    if len(reached_find) == len(plans):
                        all_took_over.set()
                if number == 0 and what == "apsched_job_results.insert_many":
                    first_read.set()  # the first node has read what it won
                if number and what == "apsched_jobs.update_many":
                    await first_read.wait()
                if what == "apsched_jobs.delete_many":
                    await all_took_over.wait()
            return gate

        for number, plan in enumerate(plans):
            plan.gate = make_gate(number)
        cleaners = []
        for plan in plans:
            store = MongoDBDataStore(FaultyClient(backend.client(), plan),
                                     database=backend.database, retry_settings=FAST_RETRY,
                                     local_clock=clock, monotonic_clock=clock.monotonic,
                                     clock_refresh_interval=float("inf"))
            plan.disable()
            await store.start(stack, broker, quiet)
            plan.enable()
            cleaners.append(store)
        clock.advance(lease + timedelta(seconds=1))
        with anyio.fail_after(30):
            async with anyio.create_task_group() as tg:
                for store in cleaners:
                    tg.start_soon(store.cleanup)
        for plan in plans:
            plan.disable()

    # Every node's takeover lost its first reply; the winner's writes did too
    assert all("apsched_jobs.update_many" in plan.failed for plan in plans)
    assert {"apsched_jobs.delete_many", "apsched_job_results.insert_many"} <= set.union(
        *(plan.failed for plan in plans))
    assert sorted(event.job_id for event in released) == sorted(job.id for job in held)
    assert {(event.outcome, event.scheduler_id) for event in released} == {
        (JobOutcome.abandoned, "crashed")}
    db = backend.db()
    assert await db["apsched_jobs"].count_documents({}) == 0
    results = await db["apsched_job_results"].count_documents({"outcome": {"$exists": True}})
    assert results == jobs_count


# --- clock skew -------------------------------------------------------------------------------

SKEW_LEASE = timedelta(seconds=10)


async def skewed_pair(started: Any) -> tuple[Any, ...]:
    """A slow-clock and a fast-clock node, lease/2 behind and ahead of the server."""
    slow_clock, fast_clock = FakeClock(-SKEW_LEASE / 2), FakeClock(SKEW_LEASE / 2)
    slow, _ = await started(local_clock=slow_clock, retry_settings=FAST_RETRY)
    fast, fast_broker = await started(local_clock=fast_clock, retry_settings=FAST_RETRY)
    await slow.add_task(make_task())
    due = datetime.now(UTC) - timedelta(minutes=1)
    await slow.add_schedule(Schedule(id="s", task_id="drill", trigger=IntervalTrigger(hours=1),
                                     job_executor="async", next_fire_time=due),
                            ConflictPolicy.exception)
    await slow.add_job(Job(task_id="drill", executor="async"))
    assert len(await slow.acquire_schedules("slow", SKEW_LEASE, 10)) == 1
    assert len(await slow.acquire_jobs("slow", SKEW_LEASE, 10)) == 1
    for clock in (slow_clock, fast_clock):
        clock.advance(timedelta(seconds=1))  # a second passes: the lease has 9 s to go
    return slow, fast, fast_broker, slow_clock, fast_clock


def make_task(**kwargs: Any) -> Any:
    from apscheduler import Task

    return Task(id="drill", func=f"{__name__}:drill_job", job_executor="async", **kwargs)


async def test_skewed_clocks_never_steal_a_live_lease(started: Any) -> None:
    _, fast, fast_broker, slow_clock, fast_clock = await skewed_pair(started)
    assert await fast.acquire_schedules("fast", SKEW_LEASE, 10) == []
    await fast.cleanup()
    assert fast_broker.of_type(JobReleased) == []
    assert [job.acquired_by for job in await fast.get_jobs()] == ["slow"]

    # Sensitivity: once the lease really is over, the fast node does take over
    for clock in (slow_clock, fast_clock):
        clock.advance(SKEW_LEASE + timedelta(seconds=1))
    assert [s.id for s in await fast.acquire_schedules("fast", SKEW_LEASE, 10)] == ["s"]
    await fast.cleanup()
    assert [e.outcome for e in fast_broker.of_type(JobReleased)] == [JobOutcome.abandoned]


async def test_control_without_server_clock_the_fast_node_steals(
    started: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: the test above can fail. With each node trusting its own clock,
    the fast node sees the slow node's fresh lease as long expired."""
    monkeypatch.setattr(clock_module.ServerClock, "observe",
                        lambda self, hello, round_trip: None)
    _, fast, fast_broker, _, _ = await skewed_pair(started)
    assert [s.id for s in await fast.acquire_schedules("fast", SKEW_LEASE, 10)] == ["s"]
    await fast.cleanup()
    assert [e.outcome for e in fast_broker.of_type(JobReleased)] == [JobOutcome.abandoned]


async def test_skewed_schedulers_run_each_job_once(backend: Backend) -> None:
    """Two schedulers whose clocks are lease/2 apart share schedules and jobs."""
    executions.clear()
    done = anyio.Event()
    expected = 60
    finished: list[JobReleased] = []

    def on_release(event: JobReleased) -> None:
        finished.append(event)
        if len(finished) == expected:
            done.set()

    async with AsyncExitStack() as stack:
        broker = SharedBroker()
        await broker.start_shared(stack, quiet)
        on(broker, JobReleased, on_release)
        schedulers = []
        for name, skew in (("slow", -SKEW_LEASE / 2), ("fast", SKEW_LEASE / 2)):
            clock = FakeClock(skew)
            store = MongoDBDataStore(backend.client(), database=backend.database,
                                     local_clock=clock, monotonic_clock=clock.monotonic,
                                     retry_settings=FAST_RETRY)
            schedulers.append(await stack.enter_async_context(AsyncScheduler(
                store, broker, identity=name, lease_duration=SKEW_LEASE,
                cleanup_interval=NO_CLEANUP, logger=quiet)))
        for scheduler in schedulers:
            await scheduler.start_in_background()
        with anyio.fail_after(15):
            for i in range(expected // 2):
                await schedulers[i % 2].add_job(drill_job)
                await schedulers[i % 2].add_schedule(
                    drill_job, IntervalTrigger(hours=1, start_time=datetime.now(UTC)),
                    id=f"s{i}")
            await done.wait()
        for scheduler in schedulers:
            await scheduler.stop()
    assert len(executions) == expected
    assert set(executions.values()) == {1}


# --- permanent failures -----------------------------------------------------------------------

def auth_failure(what: str) -> Exception | None:
    return OperationFailure("Authentication failed.", code=18,
                            details={"ok": 0, "code": 18, "codeName": "AuthenticationFailed"})


async def test_authentication_failure_is_not_retried(backend: Backend) -> None:
    plan = FaultPlan(seed=0, rate=0)
    store = MongoDBDataStore(FaultyClient(backend.client(), plan), database=backend.database,
                             retry_settings=FAST_RETRY)
    async with AsyncExitStack() as stack:
        broker = LocalEventBroker()
        await broker.start(stack, quiet)
        await store.start(stack, broker, quiet)
        plan.attempts.clear()
        plan.forced = auth_failure
        with pytest.raises(OperationFailure) as info:
            await store.add_job(Job(task_id="t", executor="async"))
        assert info.value.code == 18
        with pytest.raises(OperationFailure):
            await store.get_jobs()
        assert plan.attempts == {"apsched_jobs.insert_one": 1, "apsched_jobs.find": 1}


async def test_authentication_failure_at_start_surfaces_at_once(backend: Backend) -> None:
    plan = FaultPlan(seed=0, rate=0)
    plan.forced = auth_failure
    store = MongoDBDataStore(FaultyClient(backend.client(), plan), database=backend.database,
                             retry_settings=FAST_RETRY)
    async with AsyncExitStack() as stack:
        broker = LocalEventBroker()
        await broker.start(stack, quiet)
        with pytest.raises((OperationFailure, ServerUnreachableError),
                           match="Authentication failed"):
            await store.start(stack, broker, quiet)
    assert sum(plan.attempts.values()) == 1


@pytest.mark.parametrize("name", ["bad/name", "bad.name", "has space", "", "x" * 64, "a$b"])
async def test_invalid_database_name_fails_at_construction(backend: Backend, name: str) -> None:
    plan = FaultPlan(seed=0, rate=0)
    with pytest.raises(ValueError, match="database"):
        MongoDBDataStore(FaultyClient(backend.client(), plan), database=name)
    assert sum(plan.attempts.values()) == 0


# --- secrets ----------------------------------------------------------------------------------

SECRET = "s3cret"
UNREACHABLE = f"mongodb://user:{SECRET}@127.0.0.1:1/?serverSelectionTimeoutMS=300"


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, text


def exception_text(exc: BaseException) -> str:
    import traceback

    return "".join(traceback.format_exception(exc)) + repr(exc)


async def test_password_never_leaks_from_an_unreachable_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    store = MongoDBDataStore(UNREACHABLE, database="apsched_secret_test")
    texts = [repr(store), str(store)]
    with anyio.fail_after(10):
        async with AsyncExitStack() as stack:
            broker = LocalEventBroker()
            await broker.start(stack, logging.getLogger("apsched_mongo.tests"))
            with pytest.raises(ServerUnreachableError) as info:
                await store.start(stack, broker, logging.getLogger("apsched_mongo.tests"))
    texts.append(exception_text(info.value))
    assert "127.0.0.1:1" in str(info.value)
    if MongoDBEventBroker is not None:
        event_broker = MongoDBEventBroker(UNREACHABLE, database="apsched_secret_test")
        texts += [repr(event_broker), str(event_broker)]
        with anyio.fail_after(10):
            async with AsyncExitStack() as stack:
                with pytest.raises(ServerUnreachableError) as broker_info:
                    await event_broker.start(stack, logging.getLogger("apsched_mongo.tests"))
        texts.append(exception_text(broker_info.value))
    texts += [record.getMessage() for record in caplog.records]
    texts += [exception_text(record.exc_info[1]) for record in caplog.records
              if record.exc_info and record.exc_info[1]]
    assert_no_secret(*texts)


@pytest.mark.parametrize("uri", [
    f"mongodb://user:{SECRET}@host:notaport/",
    f"mongodb://us@er:{SECRET}@host/",  # unescaped "@" in the user name
    f"mongodb://user:{SECRET}/x@host/",  # unescaped "/" in the password
    f"mongodb://user:ab@{SECRET}@host/",  # unescaped "@" in the password
    f"mongodb://user:{SECRET}@host/?w=-5&wtimeoutMS=nope",
    f"mongodb://user:{SECRET}@",
    f"mongodb://user:{SECRET}@host/?authMechanism=NOPE",
    f"mongodb://user:{SECRET}@host/?tls=maybe",
])
def test_password_never_leaks_from_an_invalid_uri(uri: str) -> None:
    with pytest.raises(ValueError) as info:
        MongoDBDataStore(uri)
    assert_no_secret(exception_text(info.value))
    if MongoDBEventBroker is not None:
        with pytest.raises(ValueError) as broker_info:
            MongoDBEventBroker(uri)
        assert_no_secret(exception_text(broker_info.value))


async def test_a_release_retried_while_a_reaper_takes_the_job_over_is_published_once(
    backend: Backend,
) -> None:
    """Node A's lease on a job is taken over by a reaper (a node restarted under A's name)
    which has not yet written the job's release marker; A's own release then loses its
    reply and retries. The job must be released once: by the reaper, whose takeover came
    first (A's delete, filtered on A's lease, matched nothing)."""
    released: list[JobReleased] = []
    async with AsyncExitStack() as stack:
        broker = SharedBroker()
        await broker.start_shared(stack, quiet)
        on(broker, JobReleased, released.append)
        a_plan, reaper_plan = LoseFirstReply("apsched_jobs.delete_one"), FaultPlan(seed=0, rate=0)
        stores = []
        for plan in (a_plan, reaper_plan):
            store = MongoDBDataStore(FaultyClient(backend.client(), plan),
                                     database=backend.database, retry_settings=FAST_RETRY)
            await store.start(stack, broker, quiet)
            stores.append(store)
        node_a, reaper = stores
        await node_a.add_task(make_task(max_running_jobs=None))
        await node_a.add_job(Job(task_id="drill", executor="async"))
        [job] = await node_a.acquire_jobs("node-a", timedelta(minutes=5), 1)

        taken_over, a_done = anyio.Event(), anyio.Event()

        async def reaper_gate(what: str) -> None:
            if what == "apsched_jobs.find":  # its takeover is done: A may release now
                taken_over.set()
            if what == "apsched_job_results.insert_many":  # the marker waits for A
                await a_done.wait()

        reaper_plan.gate = reaper_gate
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(reaper.reap_abandoned_jobs, "node-a")
                await taken_over.wait()
                await node_a.release_job("node-a", job, JobResult.from_job(
                    job, JobOutcome.success))
                a_done.set()
    assert not a_plan.pending  # A's delete did lose its reply
    assert [(e.job_id, e.outcome) for e in released] == [(job.id, JobOutcome.abandoned)]


async def _held_store(backend: Backend, stack: AsyncExitStack, hold: str
                      ) -> tuple[MongoDBDataStore, Any, anyio.Event, anyio.Event]:
    """A store whose operation ``hold`` waits, once, until the test lets it go."""
    from tests.conftest import RecordingBroker

    plan = FaultPlan(seed=0, rate=0)
    held, go = anyio.Event(), anyio.Event()

    async def gate(what: str) -> None:
        if what == hold and not go.is_set():
            held.set()
            await go.wait()

    broker = RecordingBroker()
    await broker.start(stack, quiet)
    store = MongoDBDataStore(FaultyClient(backend.client(), plan), database=backend.database,
                             retry_settings=FAST_RETRY)
    await store.start(stack, broker, quiet)
    await store.add_task(make_task(max_running_jobs=None))
    plan.gate = gate
    return store, broker, held, go


async def test_a_release_cancelled_after_its_commit_point_still_publishes(
    backend: Backend,
) -> None:
    """APScheduler cancels running jobs when it stops; a release already past its delete
    must still store the result and publish JobReleased."""
    async with AsyncExitStack() as stack:
        store, broker, held, go = await _held_store(backend, stack,
                                                    "apsched_job_results.insert_many")
        await store.add_job(Job(task_id="drill", executor="async",
                                result_expiration_time=timedelta(minutes=5)))
        [job] = await store.acquire_jobs("node", timedelta(minutes=5), 1)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(store.release_job, "node", job,
                              JobResult.from_job(job, JobOutcome.success, return_value=7))
                await held.wait()  # deleted; the result is being stored
                tg.cancel_scope.cancel()
                go.set()
        assert [e.job_id for e in broker.of_type(JobReleased)] == [job.id]
        result = await store.get_job_result(job.id)
        assert result is not None and result.return_value == 7


async def test_jobs_claimed_by_a_cancelled_acquire_are_returned_when_the_store_stops(
    backend: Backend,
) -> None:
    """A scheduler stopping while its claim is on the wire: the claim lands, the caller
    is gone. The jobs are not left claimed until their lease expires; they are unclaimed
    and announced again when the store stops, so another node runs them."""
    from apscheduler import JobAcquired, JobAdded

    async with AsyncExitStack() as outer:
        async with AsyncExitStack() as stack:
            store, broker, held, go = await _held_store(backend, stack,
                                                        "apsched_jobs.find_one_and_update")
            job = Job(task_id="drill", executor="async")
            await store.add_job(job)
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(store.acquire_jobs, "node", timedelta(minutes=5), 1)
                    await held.wait()  # the claim is about to reach the server
                    tg.cancel_scope.cancel()
                    go.set()
        jobs = backend.db()["apsched_jobs"]
        [document] = await jobs.find({}).to_list(None)
        assert document.get("acquired_by") is None
        assert [type(e) for e in broker.events if hasattr(e, "job_id")] == [JobAdded, JobAdded]
        assert broker.of_type(JobAcquired) == []
        other = backend.store()
        from tests.conftest import RecordingBroker

        other_broker = RecordingBroker()
        await other_broker.start(outer, quiet)
        await other.start(outer, other_broker, quiet)
        assert [j.id for j in await other.acquire_jobs("other", timedelta(minutes=5), 1)] == [
            job.id]
