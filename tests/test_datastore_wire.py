"""The data store against a scripted server: step-downs, lost replies and permanent errors
as a real server reports them on the wire (what the in-memory fake cannot produce)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import anyio
import pytest
from apscheduler import (
    ConflictingIdError,
    ConflictPolicy,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobResult,
    RetrySettings,
    Schedule,
    TaskRemoved,
)
from apscheduler.serializers.pickle import PickleSerializer
from apscheduler.triggers.interval import IntervalTrigger
from bson import Binary
from pymongo.errors import OperationFailure, WriteConcernError
from tenacity import stop_after_attempt, wait_fixed

from apsched_mongo import MongoDBDataStore, _codec
from tests.conftest import RecordingBroker
from tests.wire import Wire

pytestmark = pytest.mark.anyio
log = logging.getLogger(__name__)


async def started_store(uri: str) -> AsyncIterator[tuple[MongoDBDataStore, RecordingBroker]]:
    store = MongoDBDataStore(
        uri, database="apscheduler",
        retry_settings=RetrySettings(stop=stop_after_attempt(3), wait=wait_fixed(0)),
    )
    async with AsyncExitStack() as stack:
        broker = RecordingBroker()
        await broker.start(stack, log)
        with anyio.fail_after(20):
            await store.start(stack, broker, log)
        yield store, broker


@pytest.fixture
async def store(wire: Wire) -> AsyncIterator[tuple[MongoDBDataStore, RecordingBroker]]:
    # retryWrites=false: the driver's own single retry would hide ours
    async for started in started_store(wire.uri + "&retryWrites=false"):
        yield started


async def _add_job_while(store: MongoDBDataStore, script: Any) -> Job:
    """Add a job while ``script`` answers the server's side; return the job."""
    job = Job(task_id="t", executor="async")
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(script)
            await store.add_job(job)
    return job


async def test_a_step_down_is_retried(wire: Wire, store: Any) -> None:
    data_store, broker = store

    async def script() -> None:
        first = await wire.receives("insert")
        await anyio.to_thread.run_sync(lambda: first.replies(
            {"ok": 0, "code": 10107, "codeName": "NotWritablePrimary", "errmsg": "not primary"}
        ))
        await reply(await wire.receives("find"), cursor={  # not there: insert it again
            "id": 0, "ns": "apscheduler.apsched_jobs", "firstBatch": []})
        second = await wire.receives("insert")
        assert second["documents"][0]["_id"] == first["documents"][0]["_id"]
        await anyio.to_thread.run_sync(lambda: second.replies({"ok": 1, "n": 1}))

    job = await _add_job_while(data_store, script)
    assert [e.job_id for e in broker.of_type(JobAdded)] == [job.id]


async def reply(request: Any, *args: Any, **kwargs: Any) -> None:
    await anyio.to_thread.run_sync(lambda: request.replies(*args, **kwargs))


async def test_after_a_lost_reply_the_stored_token_says_the_insert_landed(
    wire: Wire, store: Any
) -> None:
    """The insert landed but the connection dropped before the reply: the retry first
    looks, and the stored document's token says it is our own: no second insert."""
    data_store, broker = store

    async def script() -> None:
        first = await wire.receives("insert")
        await anyio.to_thread.run_sync(first.hangup)
        lookup = await wire.receives("find")
        assert lookup["filter"] == {"_id": first["documents"][0]["_id"]}
        await reply(lookup, cursor={"id": 0, "ns": "apscheduler.apsched_jobs", "firstBatch": [
            {"_id": first["documents"][0]["_id"],
             "insert_token": first["documents"][0]["insert_token"]}]})

    job = await _add_job_while(data_store, script)
    assert [e.job_id for e in broker.of_type(JobAdded)] == [job.id]
    assert "insert" not in wire.pending_commands()


async def test_another_nodes_document_after_a_lost_reply_is_a_conflict(
    wire: Wire, store: Any
) -> None:
    """Another node added a schedule with the same id while our reply was lost: that is
    not success, whatever the attempt count says."""
    data_store, broker = store
    schedule = Schedule(id="s", task_id="t", trigger=IntervalTrigger(hours=1),
                        job_executor="async")

    async def script() -> None:
        first = await wire.receives("insert")
        await anyio.to_thread.run_sync(first.hangup)
        await reply(await wire.receives("find"), cursor={
            "id": 0, "ns": "apscheduler.apsched_schedules",
            "firstBatch": [{"_id": "s", "insert_token": "somebody else's"}]})

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(script)
            with pytest.raises(ConflictingIdError):
                await data_store.add_schedule(schedule, ConflictPolicy.exception)
    assert broker.events == []


async def test_remove_task_after_a_lost_reply_is_not_a_lookup_error(
    wire: Wire, store: Any
) -> None:
    data_store, broker = store

    async def script() -> None:
        first = await wire.receives("findAndModify")
        assert first["remove"] is True
        await anyio.to_thread.run_sync(first.hangup)
        await reply(await wire.receives("findAndModify"), value=None)  # gone: we removed it

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(script)
            await data_store.remove_task("t")
    assert [type(e) for e in broker.events] == [TaskRemoved]


async def test_an_authorization_error_is_not_retried(wire: Wire, store: Any) -> None:
    data_store, broker = store

    async def script() -> None:
        request = await wire.receives("insert")
        await anyio.to_thread.run_sync(lambda: request.replies(
            {"ok": 0, "code": 13, "codeName": "Unauthorized", "errmsg": "not authorized"}
        ))

    with anyio.fail_after(20):  # a retry would wait here for a reply that never comes
        async with anyio.create_task_group() as tg:
            tg.start_soon(script)
            with pytest.raises(OperationFailure, match="not authorized"):
                await data_store.add_job(Job(task_id="t", executor="async"))
    assert "insert" not in wire.pending_commands()
    assert broker.of_type(JobAdded) == []


# --- what every write carries, and how write errors are read -----------------------------

MAJORITY = {"w": "majority", "wtimeout": 10_000}


@pytest.fixture
async def retrying_store(wire: Wire) -> AsyncIterator[tuple[MongoDBDataStore, RecordingBroker]]:
    """A store as users run it: the driver's retryable writes on, and ``w=1`` in the URI,
    which the store must override."""
    async for started in started_store(wire.uri + "&w=1"):
        yield started


def on_the_wire(value: Any) -> Any:
    """``value`` as a server would send it: UUIDs as BSON binary subtype 4 (mockupdb
    encodes replies without a UUID representation)."""
    if isinstance(value, UUID):
        return Binary.from_uuid(value)
    if isinstance(value, dict):
        return {key: on_the_wire(item) for key, item in value.items()}
    if isinstance(value, list):
        return [on_the_wire(item) for item in value]
    return value


def job_document(job: Job, **fields: Any) -> dict[str, Any]:
    return on_the_wire({**_codec.encode_job(job, PickleSerializer()), **fields})  # type: ignore[no-any-return]


def queue_group(task_id: str, limit: int | None, *jobs: Job) -> dict[str, Any]:
    """One group of the queue-head aggregation, as the server computes it."""
    task = {"_id": task_id, "max_running_jobs": limit, "state": b""}
    return {"_id": task_id, "jobs": [job_document(job) for job in jobs], "task": [task],
            "max_running_jobs": limit, "running": []}


async def test_a_single_claim_is_a_retryable_majority_find_and_modify(
    wire: Wire, retrying_store: Any
) -> None:
    data_store, broker = retrying_store
    job = Job(task_id="t", executor="async")
    requests: dict[str, Any] = {}

    async def script() -> None:
        head = await wire.receives("aggregate")
        requests["head"] = head
        await reply(head, cursor={"id": 0, "ns": "apscheduler.apsched_jobs",
                                  "firstBatch": [queue_group("t", 1, job)]})
        claim = requests["claim"] = await wire.receives("findAndModify")
        await reply(claim, value=job_document(job, **claim["update"]["$set"]))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(script)
            [acquired] = await data_store.acquire_jobs("s1", timedelta(seconds=30), 10)
    claim = requests["claim"]
    assert acquired.id == job.id and acquired.acquired_by == "s1"
    # task_id: the shard key where jobs are sharded, so a claim goes to one shard
    assert claim["query"] == on_the_wire({"_id": job.id, "task_id": "t", "acquired_by": None})
    assert claim["update"]["$set"]["slot"] == 0
    assert claim["new"] is True
    assert claim["writeConcern"] == MAJORITY
    assert "txnNumber" in claim.doc  # the driver may retry it with the same number
    assert "writeConcern" not in requests["head"].doc  # a read
    assert [type(e) for e in broker.events] == [JobAcquired]


async def test_a_step_down_inside_a_claim_batch_is_retried(
    wire: Wire, retrying_store: Any
) -> None:
    """A bulk of per-document claims (no UpdateMany, so it carries a txnNumber) whose
    statements fail with NotWritablePrimary is retried as a whole; what the lease token
    won is then read back."""
    data_store, _ = retrying_store
    jobs = [Job(task_id="u", executor="async") for _ in range(2)]
    updates: list[Any] = []

    async def script() -> None:
        await reply(await wire.receives("aggregate"), cursor={
            "id": 0, "ns": "apscheduler.apsched_jobs",
            "firstBatch": [queue_group("u", None, *jobs)]})
        first = await wire.receives("update")
        updates.append(first)
        await reply(first, {"ok": 1, "n": 1, "nModified": 1, "writeErrors": [
            {"index": 1, "code": 10107, "codeName": "NotWritablePrimary",
             "errmsg": "not primary"}]})
        second = await wire.receives("update")
        updates.append(second)
        await reply(second, {"ok": 1, "n": 2, "nModified": 1})
        readback = await wire.receives("find")
        lease = first["updates"][0]["u"]["$set"]["lease"]
        assert readback["filter"] == {"lease": lease}
        fields = first["updates"][0]["u"]["$set"]
        await reply(readback, cursor={"id": 0, "ns": "apscheduler.apsched_jobs", "firstBatch": [
            job_document(job, **fields) for job in jobs]})

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(script)
            acquired = await data_store.acquire_jobs("s1", timedelta(seconds=30), 10)
    assert [job.id for job in acquired] == [job.id for job in jobs]
    for update in updates:
        assert [statement.get("multi", False) for statement in update["updates"]] == [False] * 2
        assert [statement["q"] for statement in update["updates"]] == [
            on_the_wire({"_id": job.id, "task_id": "u", "acquired_by": None}) for job in jobs]
        assert update["writeConcern"] == MAJORITY
        assert "txnNumber" in update.doc


@pytest.mark.parametrize("concern_error, retried", [
    ({"code": 64, "codeName": "WriteConcernFailed", "errmsg": "waiting for replication timed out",
      "errInfo": {"wtimeout": True}}, True),
    ({"code": 100, "codeName": "UnsatisfiableWriteConcern", "errmsg": "Not enough data-bearing "
      "nodes"}, False),
])
async def test_a_write_concern_error_on_results_is_never_ignored(
    wire: Wire, retrying_store: Any, concern_error: dict[str, Any], retried: bool
) -> None:
    """The result insert met a duplicate (stored by an earlier attempt) and a write-concern
    error: the duplicate is fine, the write-concern error is not. A timeout is retried
    (the write may still be rolled back); an unsatisfiable write concern is raised."""
    data_store, _ = retrying_store
    result = JobResult(job_id=uuid4(), outcome=JobOutcome.success,
                       finished_at=datetime.now(UTC),
                       expires_at=datetime.now(UTC) + timedelta(minutes=1))

    async def script() -> None:
        first = await wire.receives("insert")
        assert first["writeConcern"] == MAJORITY
        await reply(first, {"ok": 1, "n": 0, "writeErrors": [
            {"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}],
            "writeConcernError": concern_error})
        if retried:
            await reply(await wire.receives("insert"), {"ok": 1, "n": 1})

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(script)
            if retried:
                await data_store._store_results([result])
            else:
                with pytest.raises(WriteConcernError, match="Not enough"):
                    await data_store._store_results([result])
    assert "insert" not in wire.pending_commands()
