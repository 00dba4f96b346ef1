"""Bad input gets a clear error naming the problem, and nothing stored is lost."""

from __future__ import annotations

import logging
import re
import time
from contextlib import AsyncExitStack
from datetime import timedelta
from typing import Any

import pytest
from apscheduler import (
    ConflictPolicy,
    Job,
    JobOutcome,
    JobReleased,
    Schedule,
    SerializationError,
    Task,
)
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.interval import IntervalTrigger
from pymongo import ASCENDING, IndexModel

from apsched_mongo import (
    IncompatibleDataError,
    IndexConflictError,
    MongoDBDataStore,
    ServerUnreachableError,
)

pytestmark = pytest.mark.anyio
LEASE = timedelta(seconds=30)
log = logging.getLogger(__name__)


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("not today")


@pytest.mark.parametrize("uri, problem", [
    ("http://user:hunter2@localhost", "mongodb://"),
    ("mongodb://user:hunter2@", "host"),
    ("mongodb://user:hunter2@localhost:99999", "port"),
])
def test_invalid_uri_fails_at_construction_without_the_password(uri: str, problem: str) -> None:
    with pytest.raises(ValueError, match="invalid MongoDB URI") as info:
        MongoDBDataStore(uri)
    assert problem in str(info.value).lower()
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("name", ["", "has space", "dotted.name", "a/b", "x" * 64])
def test_invalid_database_name(name: str) -> None:
    with pytest.raises(ValueError, match="database"):
        MongoDBDataStore("mongodb://localhost", database=name)


def test_wrong_client_type() -> None:
    with pytest.raises(TypeError, match="client_or_uri"):
        MongoDBDataStore(42)


async def test_unreachable_server_is_named_within_the_selection_timeout() -> None:
    store = MongoDBDataStore(
        "mongodb://app:hunter2@127.0.0.1:1/?serverSelectionTimeoutMS=300"
    )
    assert "hunter2" not in repr(store)
    started = time.monotonic()
    async with AsyncExitStack() as stack:
        broker = LocalEventBroker()
        await broker.start(stack, log)
        with pytest.raises(ServerUnreachableError) as info:
            await store.start(stack, broker, log)
    assert time.monotonic() - started < 5  # not retried for a minute
    assert "127.0.0.1:1" in str(info.value)
    assert "hunter2" not in str(info.value)


async def test_conflicting_index_is_named(backend: Any, started: Any) -> None:
    results = backend.db()["apsched_job_results"]
    await results.create_indexes([IndexModel([("expires_at", ASCENDING)], name="mine")])
    await results.insert_one({"_id": "keep me"})
    with pytest.raises(IndexConflictError, match=r"'mine'.*expireAfterSeconds") as info:
        await started()
    assert "apsched_job_results" in str(info.value)
    assert await results.count_documents({"_id": "keep me"}) == 1
    assert "mine" in await results.index_information()  # we never drop a user's index


async def test_unserializable_job_args_write_nothing(started: Any, backend: Any) -> None:
    store, broker = await started()
    with pytest.raises(SerializationError):
        await store.add_job(Job(task_id="t", executor="async", args=(Unpicklable(),)))
    with pytest.raises(SerializationError):
        await store.add_schedule(Schedule(id="s", task_id="t", trigger=IntervalTrigger(seconds=1),
                                          job_executor="async", kwargs={"x": Unpicklable()}),
                                 ConflictPolicy.exception)
    assert await backend.db()["apsched_jobs"].count_documents({}) == 0
    assert await backend.db()["apsched_schedules"].count_documents({}) == 0
    assert broker.events == []


async def test_corrupt_job_is_released_and_the_rest_carry_on(
    started: Any, backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store, broker = await started()
    await store.add_task(Task(id="t", func="tests.helpers:noop", job_executor="async"))
    good_before = Job(task_id="t", executor="async")
    await store.add_job(good_before)
    jobs = backend.db()["apsched_jobs"]
    corrupt = Job(task_id="t", executor="async", result_expiration_time=timedelta(minutes=1))
    await store.add_job(corrupt)
    await jobs.update_one({"_id": corrupt.id}, {"$set": {"state": b"\x80garbage"}})
    good_after = Job(task_id="t", executor="async")
    await store.add_job(good_after)

    acquired = await store.acquire_jobs("s1", LEASE, 10)
    assert [job.id for job in acquired] == [good_before.id, good_after.id]
    [released] = broker.of_type(JobReleased)
    assert (released.job_id, released.outcome) == (corrupt.id, JobOutcome.deserialization_failed)
    result = await store.get_job_result(corrupt.id)
    assert result is not None and result.outcome is JobOutcome.deserialization_failed
    assert await jobs.count_documents({"_id": corrupt.id}) == 0
    assert any(str(corrupt.id) in record.getMessage() for record in caplog.records)


async def test_corrupt_schedule_is_skipped_with_a_warning(
    started: Any, backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    store, _ = await started()
    for name in ("ok", "bad"):
        await store.add_schedule(Schedule(id=name, task_id="t", trigger=IntervalTrigger(seconds=1),
                                          job_executor="async"), ConflictPolicy.exception)
    await backend.db()["apsched_schedules"].update_one({"_id": "bad"},
                                                       {"$set": {"state": b"\x80garbage"}})
    assert [s.id for s in await store.get_schedules()] == ["ok"]
    assert any("'bad'" in record.getMessage() for record in caplog.records)
    assert await backend.db()["apsched_schedules"].count_documents({}) == 2  # nothing deleted


async def test_existing_hashed_indexes_are_accepted(backend: Any, started: Any) -> None:
    """Users shard on {_id: "hashed"}: such an index must not trip the index checks."""
    from apsched_mongo import MongoDBEventBroker
    from apsched_mongo.doctor import diagnose

    db = backend.db()
    for name in ("apsched_schedules", "apsched_job_results", "apsched_events"):
        await db[name].create_indexes([IndexModel([("_id", "hashed")])])
    await started()
    async with AsyncExitStack() as stack:
        broker = MongoDBEventBroker(backend.client(), database=backend.database)
        await broker.start(stack, log)
    report = await diagnose(backend.client(), backend.database)
    assert report.problems == []


def test_unacknowledged_writes_are_refused() -> None:
    from pymongo import AsyncMongoClient

    with pytest.raises(ValueError, match="acknowledged writes"):
        MongoDBDataStore("mongodb://localhost/?w=0")
    with pytest.raises(ValueError, match="acknowledged writes"):
        MongoDBDataStore(AsyncMongoClient("mongodb://localhost", w=0, connect=False))


def test_reads_go_to_the_primary_whatever_the_client_prefers() -> None:
    """A claim re-reads what it just wrote; a lagging secondary would not have it."""
    from pymongo import AsyncMongoClient, ReadPreference

    client: Any = AsyncMongoClient("mongodb://localhost", readPreference="secondaryPreferred",
                                   connect=False)
    store = MongoDBDataStore(client)
    for collection in (store._tasks, store._schedules, store._jobs, store._results):
        assert collection.read_preference == ReadPreference.PRIMARY


async def test_data_in_a_newer_format_is_refused_and_left_alone(
    backend: Any, started: Any
) -> None:
    store, _ = await started()
    await store.add_task(Task(id="t", func="tests.helpers:noop", job_executor="async"))
    meta = backend.db()["apsched_meta"]
    assert (await meta.find_one({"_id": "format"}))["version"] == 1
    await meta.update_one({"_id": "format"}, {"$set": {"version": 2}})
    with pytest.raises(IncompatibleDataError, match="format 2, newer than this version's 1"):
        await started()
    assert await backend.db()["apsched_tasks"].count_documents({}) == 1
    assert (await meta.find_one({"_id": "format"}))["version"] == 2


def test_a_synchronous_client_is_refused_with_what_to_pass_instead() -> None:
    from pymongo import MongoClient

    from apsched_mongo import MongoDBEventBroker

    client: Any = MongoClient("mongodb://localhost", connect=False)
    try:
        for cls in (MongoDBDataStore, MongoDBEventBroker):
            with pytest.raises(TypeError, match="synchronous client") as info:
                cls(client)
            assert "pymongo.AsyncMongoClient(...)" in str(info.value)
            assert len(str(info.value).splitlines()) == 1
    finally:
        client.close()


def _foreign_client(module: str, name: str) -> Any:
    """An instance of a class that lives in ``module`` (as Motor's and mongomock-motor's
    clients do), without importing that library: the check goes by module name."""
    cls = type(name, (), {"__module__": module, "get_database": lambda self, *a, **k: None})
    return cls()


@pytest.mark.parametrize(("module", "name", "instead"), [
    ("motor.motor_asyncio", "AsyncIOMotorClient", "pymongo.AsyncMongoClient(...)"),
    ("motor.motor_tornado", "MotorClient", "pymongo.AsyncMongoClient(...)"),
    ("mongomock_motor", "AsyncMongoMockClient", "apsched_mongo.memory.MemoryMongoClient()"),
    ("mongomock.mongo_client", "MongoClient", "apsched_mongo.memory.MemoryMongoClient()"),
])
def test_motor_and_mongomock_clients_are_refused_with_the_one_line_change(
    module: str, name: str, instead: str
) -> None:
    with pytest.raises(TypeError) as info:
        MongoDBDataStore(_foreign_client(module, name))
    message = str(info.value)
    assert instead in message
    assert ("end of life" in message) == module.startswith(("motor", "mongomock_motor"))
    assert len(message.splitlines()) == 1


def test_a_subclass_of_motor_is_refused_too() -> None:
    base = type(_foreign_client("motor.motor_asyncio", "AsyncIOMotorClient"))
    sub = type("MyClient", (base,), {"__module__": "myapp.db"})
    with pytest.raises(TypeError, match="Motor client"):
        MongoDBDataStore(sub())


def test_unreachable_server_message_is_one_line_with_the_details_apart() -> None:
    import anyio
    from pymongo import AsyncMongoClient

    from apsched_mongo._client import ping

    async def attempt() -> ServerUnreachableError:
        client: Any = AsyncMongoClient("mongodb://127.0.0.1:1/?serverSelectionTimeoutMS=200")
        try:
            with pytest.raises(ServerUnreachableError) as info:
                await ping(client, "mongodb://u:hunter2@127.0.0.1:1/")
        finally:
            await client.close()
        return info.value

    error = anyio.run(attempt)
    assert str(error) == ("cannot reach MongoDB at 127.0.0.1:1 within 0.2 s: connection refused "
                          "(nothing listens there: is mongod running, is the port right?)")
    assert "Topology Description" in error.details


@pytest.mark.parametrize(("driver_says", "cause"), [
    ("db.example:27017: [Errno -2] Name or service not known", "host name not found"),
    ("db.example:27017: timed out (configured timeouts: ...)", "no answer"),
    ("db.example:27017: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed",
     "TLS handshake failed"),
    ("No replica set members match selector \"Primary()\", Timeout: 30s, Topology "
     "Description: <TopologyDescription id: x, topology_type: ReplicaSetNoPrimary, servers: []>",
     "no primary"),
    ("db.example:27017: Message length (1347703880) is larger than server max message size",
     "something other than MongoDB"),
])
def test_likely_causes(driver_says: str, cause: str) -> None:
    from apsched_mongo._client import likely_cause

    assert likely_cause(driver_says).startswith(cause)


@pytest.mark.parametrize("kwargs, problem", [
    ({"clock_refresh_interval": -5}, "clock_refresh_interval must be positive"),
    ({"clock_refresh_interval": 0}, "clock_refresh_interval must be positive"),
    ({"claim_grace": -0.1}, "claim_grace must be zero or positive"),
    ({"write_timeout": 0}, "write_timeout must be positive"),
    ({"clock_refresh_interval": "60"}, "clock_refresh_interval must be a number"),
    ({"claim_grace": float("nan")}, "claim_grace must be a number of seconds, not NaN"),
])
def test_every_numeric_store_option_is_validated_at_construction(
    kwargs: dict[str, Any], problem: str
) -> None:
    from apsched_mongo.memory import MemoryMongoClient

    with pytest.raises((ValueError, TypeError), match=problem):
        MongoDBDataStore(MemoryMongoClient(), **kwargs)


@pytest.mark.parametrize("kwargs, problem", [
    ({"mode": "sometimes"},
     "mode must be one of 'auto', 'change_stream', 'polling', not 'sometimes'"),
    ({"publish_delay": -1}, "publish_delay must be zero or positive"),
    ({"poll_interval": -1}, "poll_interval must be positive"),
    ({"retention": timedelta(0)}, "retention must be positive"),
    ({"clock_refresh_interval": -5}, "clock_refresh_interval must be positive"),
    ({"write_timeout": -1}, "write_timeout must be positive"),
    ({"poll_interval": "fast"}, "poll_interval must be a number of seconds"),
])
def test_every_broker_option_fails_in_one_sentence(kwargs: dict[str, Any], problem: str) -> None:
    from apsched_mongo import MongoDBEventBroker
    from apsched_mongo.memory import MemoryMongoClient

    with pytest.raises((ValueError, TypeError), match=re.escape(problem)) as info:
        MongoDBEventBroker(MemoryMongoClient(), **kwargs)
    assert "\n" not in str(info.value) and "Attribute" not in str(info.value)
