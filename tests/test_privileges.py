"""The documented least-privilege role (apsched_mongo._privileges) is enough, and all of it
is needed: the data store, the event broker, ``doctor`` and ``migrate --from-builtin
--apply`` run against the in-memory server's wire front enforcing exactly that role, through
the real driver. The privileges come from what the real code paths send, not from a list of
commands kept here."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from apscheduler import (
    ConflictingIdError,
    ConflictPolicy,
    Job,
    JobAdded,
    JobOutcome,
    JobResult,
    Schedule,
    ScheduleResult,
    Task,
)
from apscheduler.datastores.mongodb import MongoDBDataStore as BuiltinStore
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.interval import IntervalTrigger
from pymongo import AsyncMongoClient, MongoClient
from pymongo.errors import OperationFailure

from apsched_mongo import MongoDBDataStore, MongoDBEventBroker
from apsched_mongo.__main__ import main as command_line
from apsched_mongo._privileges import scheduler_privileges
from apsched_mongo.memory import MemoryServer
from apsched_mongo.memory_wire import MemoryWireServer
from apsched_mongo.memory_wire._access import Need, grants
from tests.broker_helpers import Inbox

# What docs/deployment.rst's example shows: database "scheduler", the default prefix and
# events collection, migrating from the built-in store's default database
DATABASE, SOURCE = "scheduler", "apscheduler"
DOCUMENTED = {"database": DATABASE, "doctor": True, "migrate_source": SOURCE}
LEASE = timedelta(seconds=30)
log = logging.getLogger(__name__)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def memory() -> MemoryServer:
    """A replica set: the broker follows change streams and writes carry transaction
    numbers, as in production."""
    return MemoryServer(replica_set=True)


def enforcing(memory: MemoryServer, role: list[dict[str, Any]]) -> MemoryWireServer:
    """The front over ``memory`` enforcing ``role``."""
    return MemoryWireServer(memory, privileges=role)


@pytest.fixture
def role_front(memory: MemoryServer) -> Iterator[MemoryWireServer]:
    """The front over ``memory``, enforcing the documented role."""
    with enforcing(memory, scheduler_privileges(**DOCUMENTED)) as front:
        yield front


def connect(front: MemoryWireServer) -> AsyncMongoClient[dict[str, Any]]:
    return AsyncMongoClient(front.uri, serverSelectionTimeoutMS=5000, tz_aware=True,
                            uuidRepresentation="standard")


async def exercise_store_and_broker(front: MemoryWireServer) -> None:
    """Every DataStore and EventBroker operation, each node with its own client."""
    async with AsyncExitStack() as stack:
        clients = [connect(front) for _ in range(2)]
        for client in clients:
            stack.push_async_callback(client.close)
        brokers = [MongoDBEventBroker(client, database=DATABASE, poll_interval=0.02)
                   for client in clients]
        inbox = Inbox()
        brokers[1].subscribe(inbox, {JobAdded})
        for broker in brokers:
            await broker.start(stack, log)
        store = MongoDBDataStore(clients[0], database=DATABASE)
        await store.start(stack, brokers[0], log)

        await store.add_task(Task(id="t", func="tests.helpers:noop", job_executor="async"))
        await store.add_task(Task(id="t", func="tests.helpers:noop", job_executor="async",
                                  max_running_jobs=2))  # replaced
        await store.add_task(Task(id="gone", func="tests.helpers:noop", job_executor="async"))
        await store.remove_task("gone")
        assert [task.id for task in await store.get_tasks()] == ["t"]
        assert (await store.get_task("t")).max_running_jobs == 2

        due = datetime.now(UTC) - timedelta(seconds=1)
        trigger = IntervalTrigger(seconds=10, start_time=due)
        schedule = Schedule(id="s", task_id="t", trigger=trigger, job_executor="async",
                            next_fire_time=trigger.next())
        for policy in (ConflictPolicy.exception, ConflictPolicy.do_nothing,
                       ConflictPolicy.replace):
            await store.add_schedule(schedule, policy)
        with pytest.raises(ConflictingIdError):
            await store.add_schedule(schedule, ConflictPolicy.exception)
        [acquired] = await store.acquire_schedules("node", LEASE, 10)
        await store.extend_acquired_schedule_leases("node", {"s"}, LEASE)
        await store.release_schedules("node", [ScheduleResult(
            schedule_id="s", task_id="t", trigger=acquired.trigger, last_fire_time=due,
            next_fire_time=acquired.trigger.next())])
        assert await store.get_next_schedule_run_time() is not None
        await store.add_schedule(attrs.evolve(schedule, id="ends", next_fire_time=None),
                                 ConflictPolicy.exception)
        assert {s.id for s in await store.get_schedules()} == {"s", "ends"}

        jobs = [Job(task_id="t", executor="async", result_expiration_time=timedelta(minutes=1))
                for _ in range(4)]
        for job in jobs:
            await store.add_job(job)
        assert [job.id for job in await store.get_jobs()] == [job.id for job in jobs]
        first, _abandoned = await store.acquire_jobs("node", LEASE, 10)  # two slots
        await store.extend_acquired_job_leases("node", {first.id}, LEASE)
        await store.release_job("node", first, JobResult.from_job(
            first, JobOutcome.success, return_value=42))
        result = await store.get_job_result(first.id)
        assert result is not None and result.return_value == 42
        await store.reap_abandoned_jobs("node")  # releases the other one
        [crashed] = await store.acquire_jobs("crashed", LEASE, 1)
        await store.reap_abandoned_jobs("crashed")
        abandoned = await store.get_job_result(crashed.id)
        assert abandoned is not None and abandoned.outcome is JobOutcome.abandoned
        await store.cleanup()
        assert [job.id for job in await store.get_jobs()] == [jobs[3].id]
        await store.remove_schedules(["s"])

        await inbox.wait_for(4)  # the other node heard of every job through the events
        assert crashed.id in {event.job_id for event in inbox.events}


def run_doctor(front: MemoryWireServer, capsys: pytest.CaptureFixture[str]) -> str:
    command_line(["doctor", "--uri", front.uri, "--database", DATABASE])
    return capsys.readouterr().out


def fill_builtin_store(memory: MemoryServer) -> None:
    """Data written by APScheduler's own store, in SOURCE (as its owner, not as our role),
    through the wire: its BSON codec turns enums into numbers, which mongomock-ng, called
    directly, would store as Python objects no server could hold."""

    async def fill() -> None:
        builtin = BuiltinStore(sync, database=SOURCE)
        async with AsyncExitStack() as stack:
            broker = LocalEventBroker()
            await broker.start(stack, log)
            await builtin.start(stack, broker, log)
            await builtin.add_task(Task(id="t", func="tests.helpers:noop",
                                        job_executor="async"))
            start = datetime.now(UTC) + timedelta(days=1)
            await builtin.add_schedule(Schedule(
                id="s", task_id="t", trigger=IntervalTrigger(hours=1, start_time=start),
                job_executor="async", next_fire_time=start), ConflictPolicy.exception)
            await builtin.add_job(Job(task_id="t", executor="async"))

    with MemoryWireServer(memory) as owner, MongoClient(owner.uri) as sync:
        anyio.run(fill)


def run_migrate(front: MemoryWireServer, capsys: pytest.CaptureFixture[str]) -> int:
    code = command_line(["migrate", "--from-builtin", "--apply", "--uri", front.uri,
                         "--source-database", SOURCE, "--database", DATABASE])
    print(capsys.readouterr().out)
    return code


def unused_grants(front: MemoryWireServer) -> list[str]:
    assert front.privileges is not None
    return [f"{action} on {privilege['resource']}"
            for index, privilege in enumerate(front.privileges)
            for action in privilege["actions"] if not front.grants_used[(index, action)]]


# --- the documented role is enough, and all of it is used ----------------------------------


def test_the_documented_role_is_enough_and_every_action_in_it_is_used(
        memory: MemoryServer, role_front: MemoryWireServer,
        capsys: pytest.CaptureFixture[str]) -> None:
    anyio.run(exercise_store_and_broker, role_front)
    assert role_front.denied == []
    run_doctor(role_front, capsys)
    assert role_front.denied == []
    fill_builtin_store(memory)
    assert run_migrate(role_front, capsys) == 0
    assert role_front.denied == []
    assert unused_grants(role_front) == []


def test_no_action_is_granted_twice() -> None:
    """So that every used action above is needed: without it, its command is refused."""
    role = scheduler_privileges(**DOCUMENTED)
    for privilege in role:
        resource = privilege["resource"]
        for action in privilege["actions"]:
            need = Need(action, None) if resource.get("cluster") else Need(
                action, resource["db"], resource["collection"] or None)
            assert len(grants(role, need)) == 1, need


def test_the_store_and_broker_need_no_more_than_the_base_role(memory: MemoryServer) -> None:
    with enforcing(memory, scheduler_privileges(DATABASE)) as front:
        anyio.run(exercise_store_and_broker, front)
    assert front.denied == []


def test_doctor_and_migrate_need_no_more_than_their_variants(
        memory: MemoryServer, capsys: pytest.CaptureFixture[str]) -> None:
    with enforcing(memory, scheduler_privileges(DATABASE, doctor=True)) as front:
        anyio.run(exercise_store_and_broker, front)  # something for doctor to look at
        assert "PROBLEM" not in run_doctor(front, capsys)
    assert front.denied == []
    fill_builtin_store(memory)
    with enforcing(memory, scheduler_privileges(DATABASE, migrate_source=SOURCE)) as front:
        assert run_migrate(front, capsys) == 0
    assert front.denied == []


# --- ...and a role missing one action fails ------------------------------------------------


def without(role: list[dict[str, Any]], collection: str, action: str) -> list[dict[str, Any]]:
    return [{**p, "actions": [a for a in p["actions"]
                              if not (p["resource"].get("collection") == collection
                                      and a == action)]} for p in role]


def test_without_upserting_the_meta_document_the_store_cannot_start(
        memory: MemoryServer) -> None:
    role = without(scheduler_privileges(DATABASE), "apsched_meta", "update")
    with enforcing(memory, role) as front, pytest.raises(BaseException) as failed:
        anyio.run(exercise_store_and_broker, front)
    assert _has_unauthorized(failed.value)
    assert front.denied and front.denied[0][:2] == ("findAndModify",
                                                    f"{DATABASE}.apsched_meta")


def _has_unauthorized(exc: BaseException) -> bool:
    if isinstance(exc, OperationFailure):
        return exc.code == 13
    return any(_has_unauthorized(inner) for inner in getattr(exc, "exceptions", ()))


def test_without_the_ledger_insert_migrate_stops(
        memory: MemoryServer, capsys: pytest.CaptureFixture[str]) -> None:
    fill_builtin_store(memory)
    role = without(scheduler_privileges(DATABASE, migrate_source=SOURCE),
                   "apsched_migrated_from_builtin", "insert")
    with enforcing(memory, role) as front:
        assert run_migrate(front, capsys) == 2  # "migration stopped: not authorized..."
    assert [(name, namespace) for name, namespace, _ in front.denied] == [
        ("insert", f"{DATABASE}.apsched_migrated_from_builtin")]


# --- the docs show the same role -----------------------------------------------------------


def documented_role() -> list[dict[str, Any]]:
    """The privileges in docs/deployment.rst's createRole example (JavaScript -> JSON)."""
    text = (Path(__file__).parents[1] / "docs" / "deployment.rst").read_text()
    block = text[text.index("createRole({"):]
    block = block[:block.index("\n   })") + len("\n   })")]
    script = re.sub(r"//[^\n]*", "", block[len("createRole("):-1])
    script = re.sub(r"([{,]\s*)([A-Za-z_]\w*)\s*:", r'\1"\2":', script)
    script = re.sub(r",(\s*[}\]])", r"\1", script)
    privileges: list[dict[str, Any]] = json.loads(script)["privileges"]
    return privileges


def test_the_docs_show_exactly_this_role() -> None:
    assert documented_role() == scheduler_privileges(**DOCUMENTED)
