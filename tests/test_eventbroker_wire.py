"""MongoDBEventBroker against a scripted server (mockupdb): what goes over the wire.

mockupdb serves from threads and queues every request that no autoresponder answers; the
test pops them (off the event loop, through ``anyio.to_thread``) and replies, so each test
decides exactly which change events, errors and hang-ups the broker sees.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest
from apscheduler import Event, JobAdded, SerializationError
from apscheduler.serializers.json import JSONSerializer
from bson import ObjectId
from pymongo import AsyncMongoClient

from apsched_mongo.errors import ApschedMongoError
from apsched_mongo.eventbroker import MongoDBEventBroker
from tests.broker_helpers import LOGGER, Inbox, LogWatch, job_added, unserializable_event
from tests.wire import Wire

DB, COLL = "apscheduler", "apsched_events"


@pytest.fixture
def standalone_wire() -> Iterator[Wire]:
    wire = Wire(replica_set=False)
    yield wire
    wire.stop()


@asynccontextmanager
async def running(broker: MongoDBEventBroker) -> AsyncIterator[Inbox]:
    """Start ``broker`` in a host task (its exit stack must be left in the task that entered
    it) while the test scripts the server; stop it on exit."""
    inbox = Inbox()
    stop = anyio.Event()

    async def host() -> None:
        async with AsyncExitStack() as stack:
            await broker.start(stack, LOGGER)
            await stop.wait()

    broker.subscribe(inbox)  # before start: the test may publish as soon as it has answered

    async with anyio.create_task_group() as tg:
        tg.start_soon(host)
        try:
            yield inbox
        finally:
            stop.set()


def event_document(*events: Event, node: str = "other-node", seq: int = 1) -> dict[str, Any]:
    """A document as another node's broker writes it: one or more events."""
    return {
        "_id": ObjectId(), "node": node, "seq": seq, "created_at": datetime.now(UTC),
        "events": [{"type": type(event).__name__,
                    "payload": JSONSerializer().serialize(event.marshal())}
                   for event in events],
    }


def single_event_document(event: Event) -> dict[str, Any]:
    """A document as version 0.1 wrote it: one event, at the top level."""
    return {"_id": ObjectId(), "node": "old-node", "type": type(event).__name__,
            "payload": JSONSerializer().serialize(event.marshal()),
            "created_at": datetime.now(UTC)}


MAJORITY = {"w": "majority", "wtimeout": 10_000}


def token(n: int) -> dict[str, str]:
    return {"_data": f"{n:04d}"}


def change(n: int, document: Any) -> dict[str, Any]:
    return {"_id": token(n), "operationType": "insert", "fullDocument": document,
            "ns": {"db": DB, "coll": COLL}, "documentKey": {"_id": ObjectId()}}


def cursor_reply(batch: list[Any], resume_token: dict[str, str], *, first: bool = False,
                 cursor_id: int = 42) -> dict[str, Any]:
    return {"cursor": {"id": cursor_id, "ns": f"{DB}.{COLL}",
                       "firstBatch" if first else "nextBatch": batch,
                       "postBatchResumeToken": resume_token}}


def change_stream_stage(aggregate: Any) -> dict[str, Any]:
    stage: dict[str, Any] = aggregate["pipeline"][0]["$changeStream"]
    return stage


async def open_stream(wire: Wire) -> Any:
    """Answer the broker's change stream ``aggregate`` with an empty first batch."""
    aggregate = await wire.receives("aggregate")
    aggregate.replies(cursor_reply([], token(0), first=True))
    return aggregate


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_opens_an_inserts_only_change_stream_on_a_replica_set(wire: Wire) -> None:
    broker = MongoDBEventBroker(wire.uri)
    async with running(broker):
        aggregate = await open_stream(wire)
        assert aggregate["aggregate"] == COLL
        assert aggregate.namespace == DB
        assert change_stream_stage(aggregate) == {}  # from now: no token yet
        match = aggregate["pipeline"][1]["$match"]
        assert match["operationType"] == {"$in": ["insert", "invalidate"]}
        assert match["fullDocument.node"] == {"$ne": broker._node_id}
        await wire.receives("getMore")
        assert broker.active_mode == "change_stream"
        create = next(r for r in wire.index_requests if r.command_name == "createIndexes")
        assert create["indexes"] == [
            {"key": {"created_at": 1}, "name": "apsched_ttl", "expireAfterSeconds": 600},
            {"key": {"node": 1, "seq": 1}, "name": "apsched_node_seq"},
        ]
        assert create["writeConcern"] == MAJORITY


@pytest.mark.anyio
async def test_scripted_events_reach_the_subscriber_decoded_in_order(wire: Wire) -> None:
    first, second, third = job_added("1"), job_added("2"), job_added("3")
    async with running(MongoDBEventBroker(wire.uri)) as inbox:
        await open_stream(wire)
        (await wire.receives("getMore")).replies(cursor_reply(
            [change(1, event_document(first, second)), change(2, single_event_document(third))],
            token(2),
        ))
        assert await inbox.wait_for(3) == [first, second, third]


@pytest.mark.anyio
async def test_resumes_after_resumable_errors_without_loss_or_duplicates(
    wire: Wire, logs: LogWatch
) -> None:
    first, second, third = job_added("first"), job_added("second"), job_added("third")
    broker = MongoDBEventBroker(wire.uri)
    async with running(broker) as inbox:
        await open_stream(wire)
        (await wire.receives("getMore")).replies(
            cursor_reply([change(1, event_document(first))], token(1))
        )
        await inbox.wait_for(1)

        # A step-down. PyMongo resumes once by itself and retries that read once; both
        # attempts lose their connection
        (await wire.receives("getMore")).replies(
            ok=0, code=10107, errmsg="not primary", errorLabels=["ResumableChangeStreamError"]
        )
        for _ in range(2):
            driver_resume = await wire.receives("aggregate")
            assert change_stream_stage(driver_resume) == {"resumeAfter": token(1)}
            driver_resume.hangup()

        # ...so the broker reopens the stream itself, after the last event it delivered
        ours = await wire.receives("aggregate")
        assert change_stream_stage(ours) == {"startAfter": token(1)}
        assert ours["pipeline"][1:] == driver_resume["pipeline"][1:]
        ours.replies(cursor_reply([change(2, event_document(second))], token(2), first=True))
        await inbox.wait_for(2)
        (await wire.receives("getMore")).replies(
            cursor_reply([change(3, event_document(third))], token(3))
        )
        assert await inbox.wait_for(3) == [first, second, third]
        assert any("interrupted" in m for m in logs.messages(logging.WARNING))


@pytest.mark.anyio
async def test_lost_history_is_reported_and_the_stream_restarts_from_now(
    wire: Wire, logs: LogWatch
) -> None:
    before, after = job_added("before"), job_added("after")
    async with running(MongoDBEventBroker(wire.uri)) as inbox:
        await open_stream(wire)
        (await wire.receives("getMore")).replies(
            cursor_reply([change(1, event_document(before))], token(1))
        )
        await inbox.wait_for(1)
        (await wire.receives("getMore")).hangup()
        driver_resume = await wire.receives("aggregate")
        assert change_stream_stage(driver_resume) == {"resumeAfter": token(1)}
        driver_resume.replies(ok=0, code=286, errmsg="Resume of change stream was not possible")

        await logs.wait_for(logging.ERROR, "may have been missed")
        restart = await wire.receives("aggregate")
        assert change_stream_stage(restart) == {}  # from now on
        restart.replies(cursor_reply([], token(7), first=True))
        (await wire.receives("getMore")).replies(
            cursor_reply([change(8, event_document(after))], token(8))
        )
        assert await inbox.wait_for(2) == [before, after]


@pytest.mark.anyio
async def test_invalidate_recreates_the_ttl_index_and_starts_after_it(
    wire: Wire, logs: LogWatch
) -> None:
    event = job_added()
    async with running(MongoDBEventBroker(wire.uri)) as inbox:
        await open_stream(wire)
        indexes_at_start = len(wire.index_requests)
        invalidate = {"_id": token(5), "operationType": "invalidate"}
        (await wire.receives("getMore")).replies(
            cursor_reply([invalidate], token(5), cursor_id=0)
        )
        reopened = await wire.receives("aggregate")
        assert change_stream_stage(reopened) == {"startAfter": token(5)}
        assert [r.command_name for r in wire.index_requests[indexes_at_start:]] == [
            "listIndexes", "createIndexes"
        ]
        assert any("dropped or renamed" in m for m in logs.messages(logging.WARNING))
        reopened.replies(cursor_reply([change(6, event_document(event))], token(6), first=True))
        assert await inbox.wait_for(1) == [event]


@pytest.mark.anyio
async def test_authorization_error_stops_the_listener_but_not_publishing(
    wire: Wire, logs: LogWatch
) -> None:
    broker = MongoDBEventBroker(wire.uri)
    local = job_added("local")
    async with running(broker) as inbox:
        await open_stream(wire)
        (await wire.receives("getMore")).replies(ok=0, code=13, errmsg="not authorized")
        await logs.wait_for(logging.ERROR, "stopped listening")
        await anyio.wait_all_tasks_blocked()
        assert not [t for t in asyncio.all_tasks()
                    if broker._node_id in t.get_name() and "listener" in t.get_name()]
        assert "aggregate" not in wire.pending_commands()

        await broker.publish(local)
        (await wire.receives("insert")).replies(n=1)
        assert inbox.events == [local]


@pytest.mark.anyio
async def test_corrupt_documents_in_change_events_are_skipped(
    wire: Wire, logs: LogWatch
) -> None:
    event = job_added()
    corrupt = dict(event_document(event), events=[{"type": "JobAdded", "payload": b"{not"}])
    foreign = {"_id": ObjectId(), "name": "somebody else's document"}
    unknown_type = dict(event_document(event), events=[{"type": "NoSuchEvent", "payload": b""}])
    async with running(MongoDBEventBroker(wire.uri)) as inbox:
        await open_stream(wire)
        batch = [change(1, corrupt), change(2, foreign), change(3, unknown_type),
                 {"_id": token(4), "operationType": "insert"},  # no fullDocument at all
                 change(5, event_document(event))]
        (await wire.receives("getMore")).replies(cursor_reply(batch, token(5)))
        assert await inbox.wait_for(1) == [event]
        skipped = [m for m in logs.messages(logging.WARNING) if "foreign or corrupt" in m]
        assert len(skipped) == 4


@pytest.mark.anyio
async def test_unserializable_event_inserts_nothing(wire: Wire) -> None:
    broker = MongoDBEventBroker(wire.uri)
    good = job_added("good")
    async with running(broker) as inbox:
        await open_stream(wire)
        with pytest.raises(SerializationError):
            await broker.publish(unserializable_event())
        await broker.publish(good)
        insert = await wire.receives("insert")  # the first insert on the wire
        insert.replies(n=1)
        (document,) = insert["documents"]
        assert document["node"] == broker._node_id
        assert document["seq"] == 1
        assert isinstance(document["created_at"], datetime)
        [item] = document["events"]
        assert item["type"] == "JobAdded"
        assert JobAdded.unmarshal(JSONSerializer().deserialize(item["payload"])) == good
        assert inbox.events == [good]


@pytest.mark.anyio
async def test_events_published_together_share_one_majority_insert(wire: Wire) -> None:
    """While one document is being written, later events wait and go in the next one, in
    publish order; every insert waits for a majority, whatever the URI says."""
    broker = MongoDBEventBroker(wire.uri + "&w=1", publish_delay=0)
    events = [job_added(str(n)) for n in range(5)]
    async with running(broker):
        await open_stream(wire)
        await broker.publish(events[0])
        first = await wire.receives("insert")  # in flight: the next events accumulate
        for event in events[1:]:
            await broker.publish(event)
        first.replies(n=1)
        second = await wire.receives("insert")
        second.replies(n=1)
        await broker.flush()
    documents = [*first["documents"], *second["documents"]]
    assert [document["seq"] for document in documents] == [1, 2]
    assert [len(document["events"]) for document in documents] == [1, 4]
    payloads = [item["payload"] for document in documents for item in document["events"]]
    assert [JobAdded.unmarshal(JSONSerializer().deserialize(p)) for p in payloads] == events
    assert first["writeConcern"] == second["writeConcern"] == MAJORITY


def poll_clauses(find: Any) -> list[dict[str, Any]]:
    query = find["filter"]
    query = query["$and"][0] if "$and" in query else query
    return list(query.get("$or", [query]))


@pytest.mark.anyio
async def test_standalone_server_is_polled_per_node_after_the_last_seq(
    standalone_wire: Wire, logs: LogWatch
) -> None:
    """The poll asks each known node for what follows its last seq, and other nodes for
    recent documents: its size follows the number of nodes, not the event rate."""
    wire = standalone_wire
    first, second = job_added("first"), job_added("second")
    broker = MongoDBEventBroker(wire.uri, poll_interval=0.01)
    async with running(broker) as inbox:
        priming = await wire.receives("aggregate")  # where each node's documents end now
        assert priming["pipeline"][1]["$group"]["seq"] == {"$first": "$seq"}
        priming.replies(cursor={"id": 0, "ns": f"{DB}.{COLL}", "firstBatch": [
            {"_id": "old-node", "seq": 7, "created_at": datetime.now(UTC)}]})
        poll = await wire.receives("find")
        assert poll_clauses(poll)[0] == {"node": "old-node", "seq": {"$gt": 7}}
        assert poll_clauses(poll)[1]["node"] == {"$nin": ["old-node", broker._node_id]}
        assert "$gte" in poll_clauses(poll)[1]["created_at"]
        poll.replies(cursor={"id": 0, "ns": f"{DB}.{COLL}", "firstBatch": [
            event_document(first, node="old-node", seq=8)]})
        assert await inbox.wait_for(1) == [first]

        poll = await wire.receives("find")
        assert poll_clauses(poll)[0] == {"node": "old-node", "seq": {"$gt": 8}}
        poll.replies(cursor={"id": 0, "ns": f"{DB}.{COLL}", "firstBatch": [
            event_document(second, node="new-node", seq=1)]})
        assert await inbox.wait_for(2) == [first, second]

        poll = await wire.receives("find")
        assert [clause["node"] for clause in poll_clauses(poll)] == [
            "new-node", "old-node", {"$nin": ["new-node", "old-node", broker._node_id]}]
        poll.replies(cursor={"id": 0, "ns": f"{DB}.{COLL}", "firstBatch": []})
        assert broker.active_mode == "polling"
        assert "$changeStream" not in str(wire.pending_commands())
        assert any("polling" in m for m in logs.messages(logging.INFO))


async def answer_priming(wire: Wire) -> None:
    (await wire.receives("aggregate")).replies(cursor={"id": 0, "ns": f"{DB}.{COLL}",
                                                       "firstBatch": []})


@pytest.mark.anyio
async def test_polling_can_be_forced_on_a_replica_set(wire: Wire) -> None:
    broker = MongoDBEventBroker(wire.uri, mode="polling")
    async with running(broker):
        await answer_priming(wire)
        (await wire.receives("find")).replies(cursor={"id": 0, "ns": f"{DB}.{COLL}",
                                                      "firstBatch": []})
        assert broker.active_mode == "polling"


@pytest.mark.anyio
async def test_replica_set_without_change_streams_falls_back_to_polling(wire: Wire) -> None:
    broker = MongoDBEventBroker(wire.uri)
    async with running(broker):
        change_stream = await wire.receives("aggregate")
        assert "$changeStream" in change_stream["pipeline"][0]
        change_stream.replies(
            ok=0, code=40573, errmsg="The $changeStream stage is only supported on replica sets"
        )
        await answer_priming(wire)
        (await wire.receives("find")).replies(cursor={"id": 0, "ns": f"{DB}.{COLL}",
                                                      "firstBatch": []})
        assert broker.active_mode == "polling"


@pytest.mark.anyio
async def test_forced_change_stream_fails_at_start_without_change_streams(wire: Wire) -> None:
    broker = MongoDBEventBroker(wire.uri, mode="change_stream")
    async with anyio.create_task_group() as tg, AsyncExitStack() as stack:
        async def refuse() -> None:
            (await wire.receives("aggregate")).replies(ok=0, code=40573, errmsg="standalone")

        tg.start_soon(refuse)
        with pytest.raises(ApschedMongoError, match="change streams"):
            await broker.start(stack, LOGGER)


@pytest.mark.anyio
async def test_closes_only_the_client_it_created(wire: Wire) -> None:
    shared: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(wire.uri)
    try:
        async with running(MongoDBEventBroker(shared)):
            await open_stream(wire)
        assert (await shared.admin.command("hello"))["setName"] == "rs"  # still usable
        assert not wire.end_sessions.is_set()

        async with running(MongoDBEventBroker(wire.uri)):
            await open_stream(wire)
        assert wire.end_sessions.is_set()  # the broker's own client said goodbye
    finally:
        await shared.close()
