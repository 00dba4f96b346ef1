"""Change streams of the in-memory back end in replica-set mode, against MongoDB's manual.

Each test cites what it checks: the change events pages (insert, update, replace, delete,
drop, rename, dropDatabase, invalidate), "Resume a Change Stream" (resumeAfter, startAfter,
startAtOperationTime, postBatchResumeToken), ChangeStreamHistoryLost (286), and PyMongo's
``AsyncChangeStream`` (automatic resume once after a resumable error). Where
tests/test_eventbroker_wire.py scripts a real server's replies, the last tests check that
the server-level API produces the same shapes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from bson import Timestamp
from pymongo import DeleteOne, InsertOne, ReplaceOne, UpdateOne
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    CursorNotFound,
    DuplicateKeyError,
    NotPrimaryError,
    OperationFailure,
)

from apsched_mongo import UnsupportedByMemoryBackend
from apsched_mongo.memory import MemoryMongoClient, MemoryServer

pytestmark = pytest.mark.anyio
TIMEOUT = 10
QUICK = 50  # max_await_time_ms when a test expects nothing more


@pytest.fixture
def server() -> MemoryServer:
    return MemoryServer(replica_set=True)


@pytest.fixture
def client(server: MemoryServer) -> MemoryMongoClient:
    return MemoryMongoClient(server)


@pytest.fixture
def coll(client: MemoryMongoClient) -> Any:
    return client["shop"]["orders"]


async def take(stream: Any, count: int) -> list[dict[str, Any]]:
    """The next ``count`` changes, failing after TIMEOUT."""
    with anyio.fail_after(TIMEOUT):
        return [await stream.next() for _ in range(count)]


async def nothing_more(stream: Any) -> None:
    assert await stream.try_next() is None


async def raised_while_waiting(wait: Callable[[], Awaitable[Any]],
                               trigger: Callable[[], Any]) -> BaseException:
    """What ``wait()`` raises when ``trigger()`` runs while it waits; well before any await
    time of 10 s runs out, so a missed wake-up fails the test."""
    raised: list[BaseException] = []

    async def waiting() -> None:
        try:
            await wait()
        except Exception as exc:
            raised.append(exc)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(waiting)
            await anyio.wait_all_tasks_blocked()
            trigger()
    assert raised, "nothing was raised"
    return raised[0]


def keys(events: list[dict[str, Any]]) -> list[Any]:
    return [event["documentKey"]["_id"] for event in events]


def types(events: list[dict[str, Any]]) -> list[str]:
    return [event["operationType"] for event in events]


# --- topology ---------------------------------------------------------------------------------


async def test_hello_answers_as_a_replica_set_primary(client: MemoryMongoClient) -> None:
    reply = await client.admin.command("hello")
    assert reply["setName"] == "rs0"
    assert reply["hosts"] == [reply["me"]] == [reply["primary"]]
    assert reply["isWritablePrimary"] is True and reply["secondary"] is False
    assert reply["logicalSessionTimeoutMinutes"] == 30
    assert reply["maxWireVersion"] >= 8  # change streams with startAfter (4.2)
    assert abs(reply["localTime"] - datetime.now(UTC)) < timedelta(seconds=5)
    assert isinstance(reply["operationTime"], Timestamp)


async def test_a_standalone_server_has_neither_change_streams_nor_fault_hooks() -> None:
    server = MemoryServer()
    with pytest.raises(OperationFailure) as info:
        server.open_change_stream(database="db", collection="c")
    assert info.value.code == 40573
    with pytest.raises(OperationFailure):
        await MemoryMongoClient(server).watch()
    assert "setName" not in server.hello()
    for hook in (server.interrupt_change_streams, server.drop_change_history, server.step_down):
        with pytest.raises(ValueError, match="standalone"):
            hook()


# --- change events ------------------------------------------------------------------------------


async def test_insert_event_as_the_manual_shows_it(coll: Any) -> None:
    stream = await coll.watch()
    await coll.insert_one({"_id": 1, "item": "pen", "at": datetime(2030, 1, 2, tzinfo=UTC)})
    (event,) = await take(stream, 1)
    assert list(event) == ["_id", "operationType", "clusterTime", "wallTime", "fullDocument",
                           "ns", "documentKey"]
    assert set(event["_id"]) == {"_data"} and isinstance(event["_id"]["_data"], str)
    assert event["operationType"] == "insert"
    assert isinstance(event["clusterTime"], Timestamp)
    assert abs(event["wallTime"] - datetime.now(UTC)) < timedelta(seconds=5)
    # decoded with the collection's codec options: aware UTC dates
    assert event["fullDocument"] == {"_id": 1, "item": "pen",
                                     "at": datetime(2030, 1, 2, tzinfo=UTC)}
    assert event["ns"] == {"db": "shop", "coll": "orders"}
    assert event["documentKey"] == {"_id": 1}


async def test_update_event_names_dotted_paths_without_a_full_document(coll: Any) -> None:
    await coll.insert_one({"_id": 1, "a": {"b": 1, "c": 2}, "n": 1, "phone": "x"})
    stream = await coll.watch()
    await coll.update_one({"_id": 1}, {"$set": {"a.b": 5}, "$unset": {"a.c": "", "phone": ""},
                                       "$inc": {"n": 2}})
    (event,) = await take(stream, 1)
    assert event["operationType"] == "update"
    assert "fullDocument" not in event
    assert event["documentKey"] == {"_id": 1}
    description = event["updateDescription"]
    assert description["updatedFields"] == {"a.b": 5, "n": 3}
    assert sorted(description["removedFields"]) == ["a.c", "phone"]
    assert description["truncatedArrays"] == []


async def test_update_reports_the_paths_its_operators_name(coll: Any) -> None:
    """Setting a whole subdocument reports the field; creating a path reports its first new
    component; a rename removes one field and sets another; a positional path resolves to
    the element it changed."""
    await coll.insert_one({"_id": 1, "a": {"b": 0, "c": 1}, "old": 7,
                           "items": [{"sku": "x", "qty": 1}, {"sku": "y", "qty": 1}]})
    stream = await coll.watch()
    await coll.update_one({"_id": 1}, {"$set": {"a": {"b": 1, "c": 1}}})
    await coll.update_one({"_id": 1}, {"$set": {"new.deep": True}})
    await coll.update_one({"_id": 1}, {"$rename": {"old": "renamed"}})
    await coll.update_one({"_id": 1, "items.sku": "y"}, {"$set": {"items.$.qty": 5}})
    descriptions = [e["updateDescription"] for e in await take(stream, 4)]
    assert [(d["updatedFields"], d["removedFields"]) for d in descriptions] == [
        ({"a": {"b": 1, "c": 1}}, []),
        ({"new": {"deep": True}}, []),
        ({"renamed": 7}, ["old"]),
        ({"items.1.qty": 5}, []),
    ]


async def test_array_updates_as_the_manual_shows_them(coll: Any) -> None:
    """The manual's students example: $push on an empty array reports the whole array, on a
    non-empty one the new element's index; $pull reports the whole remaining array."""
    await coll.insert_one({"_id": 1, "student_id": 1, "scores": []})
    stream = await coll.watch()
    await coll.update_one({"student_id": 1}, {"$push": {"scores": 0.85}})
    await coll.update_one({"student_id": 1}, {"$push": {"scores": 0.94}})
    await coll.update_one({"student_id": 1}, {"$pull": {"scores": 0.94}})
    assert [e["updateDescription"]["updatedFields"] for e in await take(stream, 3)] == [
        {"scores": [0.85]}, {"scores.1": 0.94}, {"scores": [0.85]},
    ]


async def test_an_update_that_changes_nothing_has_no_event(coll: Any) -> None:
    await coll.insert_one({"_id": 1, "n": 1})
    stream = await coll.watch()
    assert (await coll.update_one({"_id": 1}, {"$set": {"n": 1}})).modified_count == 0
    await coll.update_one({"_id": 1}, {"$set": {"n": 2}})
    (event,) = await take(stream, 1)
    assert event["updateDescription"]["updatedFields"] == {"n": 2}


async def test_replace_and_delete_events(coll: Any) -> None:
    await coll.insert_one({"_id": 1, "a": 1})
    stream = await coll.watch()
    await coll.replace_one({"_id": 1}, {"b": 2})
    await coll.delete_one({"_id": 1})
    replace, delete = await take(stream, 2)
    assert replace["operationType"] == "replace"
    assert replace["fullDocument"] == {"_id": 1, "b": 2}
    assert "updateDescription" not in replace
    assert delete["operationType"] == "delete"
    assert delete["documentKey"] == {"_id": 1}
    assert "fullDocument" not in delete


async def test_update_lookup_returns_the_current_version_or_null(coll: Any) -> None:
    """fullDocument "represents the most current majority-committed version": it may differ
    from the document right after the update, and is null once the document is deleted."""
    await coll.insert_many([{"_id": 1, "v": 0}, {"_id": 2, "v": 0}])
    stream = await coll.watch(full_document="updateLookup")
    await coll.update_one({"_id": 1}, {"$set": {"v": 1}})
    await coll.update_one({"_id": 1}, {"$set": {"v": 2}})
    await coll.update_one({"_id": 2}, {"$set": {"v": 1}})
    await coll.delete_one({"_id": 2})
    first, second, third, delete = await take(stream, 4)
    assert first["fullDocument"] == second["fullDocument"] == {"_id": 1, "v": 2}
    assert first["updateDescription"]["updatedFields"] == {"v": 1}
    assert third["fullDocument"] is None
    assert "fullDocument" not in delete


async def test_upserts_and_find_and_modify_give_the_matching_events(coll: Any) -> None:
    stream = await coll.watch()
    await coll.update_one({"_id": 1}, {"$set": {"v": 1}}, upsert=True)
    await coll.find_one_and_update({"_id": 1}, {"$set": {"v": 2}})
    await coll.find_one_and_replace({"_id": 1}, {"v": 3})
    await coll.find_one_and_delete({"_id": 1})
    events = await take(stream, 4)
    assert types(events) == ["insert", "update", "replace", "delete"]
    assert events[0]["fullDocument"] == {"_id": 1, "v": 1}


async def test_each_document_written_is_its_own_event_in_order(coll: Any) -> None:
    stream = await coll.watch()
    await coll.insert_many([{"_id": n} for n in range(3)])
    await coll.bulk_write([UpdateOne({"_id": 0}, {"$set": {"x": 1}}),
                           UpdateOne({"_id": 0}, {"$set": {"x": 2}}),
                           ReplaceOne({"_id": 1}, {"y": 1}), DeleteOne({"_id": 2}),
                           InsertOne({"_id": 3})])
    await coll.update_many({}, {"$set": {"z": 1}})
    events = await take(stream, 10)
    assert [(e["operationType"], e["documentKey"]["_id"]) for e in events] == [
        ("insert", 0), ("insert", 1), ("insert", 2), ("update", 0), ("update", 0),
        ("replace", 1), ("delete", 2), ("insert", 3), ("update", 0), ("update", 1),
    ]
    tokens = [e["_id"]["_data"] for e in events]
    times = [e["clusterTime"] for e in events]
    assert tokens == sorted(set(tokens)) and times == sorted(set(times))


async def test_failed_writes_have_no_events(coll: Any) -> None:
    await coll.insert_one({"_id": 1})
    stream = await coll.watch(max_await_time_ms=QUICK)
    with pytest.raises(DuplicateKeyError):
        await coll.insert_one({"_id": 1})
    with pytest.raises(BulkWriteError):
        await coll.insert_many([{"_id": 2}, {"_id": 1}, {"_id": 3}], ordered=False)
    assert keys(await take(stream, 2)) == [2, 3]
    await nothing_more(stream)


async def test_writes_through_a_synchronous_client_are_events_too(
    client: MemoryMongoClient, coll: Any
) -> None:
    """Changes are recorded below the async look-alike: any mongomock-ng client on the
    server's store (APScheduler's built-in store, a wire front) produces events."""
    stream = await coll.watch()
    sync = client.sync_client()
    await anyio.to_thread.run_sync(lambda: sync["shop"]["orders"].insert_one({"_id": "sync"}))
    await anyio.to_thread.run_sync(lambda: sync["shop"]["orders"].delete_many({}))
    assert [(e["operationType"], e["documentKey"]["_id"]) for e in await take(stream, 2)] == [
        ("insert", "sync"), ("delete", "sync")]
    sync.close()  # closes that client only: the server keeps its data
    await coll.insert_one({"_id": "after"})
    assert await coll.count_documents({}) == 1


async def test_documents_expired_by_a_ttl_index_are_delete_events(coll: Any) -> None:
    await coll.create_index("at", expireAfterSeconds=0)
    stream = await coll.watch()
    await coll.insert_one({"_id": 1, "at": datetime.now(UTC) - timedelta(minutes=1)})
    assert await coll.count_documents({}) == 0
    assert types(await take(stream, 2)) == ["insert", "delete"]


# --- invalidate -------------------------------------------------------------------------------


async def test_drop_ends_a_collection_stream_with_drop_then_invalidate(coll: Any) -> None:
    await coll.insert_one({"_id": 1})
    await coll.delete_one({"_id": 1})  # an emptied collection still exists, as in MongoDB
    stream = await coll.watch()
    await coll.drop()
    drop, invalidate = await take(stream, 2)
    assert drop["operationType"] == "drop" and drop["ns"] == {"db": "shop", "coll": "orders"}
    assert list(invalidate) == ["_id", "operationType", "clusterTime", "wallTime"]
    assert invalidate["operationType"] == "invalidate"
    assert invalidate["clusterTime"] == drop["clusterTime"]
    assert invalidate["_id"]["_data"] > drop["_id"]["_data"]
    assert not stream.alive
    assert stream.resume_token == invalidate["_id"]
    with pytest.raises(StopAsyncIteration):
        await stream.next()


async def test_drop_of_a_collection_that_does_not_exist_has_no_event(
    client: MemoryMongoClient,
) -> None:
    stream = await client["shop"].watch(max_await_time_ms=QUICK)
    await client["shop"].drop_collection("never")
    await nothing_more(stream)


async def test_rename_invalidates_streams_on_source_and_target(client: MemoryMongoClient) -> None:
    source, target = client["shop"]["a"], client["shop"]["b"]
    await source.insert_one({"_id": 1})
    await target.insert_one({"_id": 2})
    on_source, on_target = await source.watch(), await target.watch()
    database = await client["shop"].watch()
    await source.rename("b", dropTarget=True)
    for stream in (on_source, on_target):
        rename, invalidate = await take(stream, 2)
        assert rename["operationType"] == "rename"
        assert rename["ns"] == {"db": "shop", "coll": "a"}
        assert rename["to"] == {"db": "shop", "coll": "b"}
        assert invalidate["operationType"] == "invalidate"
    (rename,) = await take(database, 1)
    assert rename["operationType"] == "rename"  # no separate drop of the replaced target
    assert database.alive


async def test_drop_database_as_each_kind_of_stream_sees_it(client: MemoryMongoClient) -> None:
    """Collection streams: drop, invalidate. Database streams: a drop per collection, then
    dropDatabase and invalidate. Deployment-wide streams are not invalidated."""
    await client["shop"]["a"].insert_one({"_id": 1})
    await client["shop"]["b"].insert_one({"_id": 1})
    on_a = await client["shop"]["a"].watch()
    on_shop = await client["shop"].watch()
    everything = await client.watch()
    await client.drop_database("shop")
    await client["other"]["c"].insert_one({"_id": "later"})

    assert types(await take(on_a, 2)) == ["drop", "invalidate"]
    shop = await take(on_shop, 4)
    assert types(shop) == ["drop", "drop", "dropDatabase", "invalidate"]
    assert {e["ns"]["coll"] for e in shop[:2]} == {"a", "b"}
    assert shop[2]["ns"] == {"db": "shop"}
    assert types(await take(everything, 4)) == ["drop", "drop", "dropDatabase", "insert"]
    assert everything.alive


async def test_database_and_deployment_streams_cover_what_they_watch(
    client: MemoryMongoClient,
) -> None:
    on_shop = await client["shop"].watch()
    everything = await client.watch()
    await client["shop"]["a"].insert_one({"_id": "shop.a"})
    await client["other"]["b"].insert_one({"_id": "other.b"})
    await client["shop"]["c"].insert_one({"_id": "shop.c"})
    assert keys(await take(on_shop, 2)) == ["shop.a", "shop.c"]
    assert keys(await take(everything, 3)) == ["shop.a", "other.b", "shop.c"]
    with pytest.raises(OperationFailure) as info:
        await client["admin"].watch()
    assert info.value.code == 73


async def test_start_after_an_invalidate_works_and_resume_after_it_fails(coll: Any) -> None:
    """"You cannot use resumeAfter to resume a change stream after an invalidate event ...
    you can use startAfter to start a new change stream after an invalidate event.\""""
    stream = await coll.watch()
    await coll.insert_one({"_id": 1})
    await coll.drop()
    *_, invalidate = await take(stream, 3)
    await coll.insert_one({"_id": "recreated"})
    with pytest.raises(OperationFailure) as info:
        await coll.watch(resume_after=invalidate["_id"])
    assert info.value.code == 260
    after = await coll.watch(start_after=invalidate["_id"])
    (event,) = await take(after, 1)
    assert event["documentKey"] == {"_id": "recreated"}


async def test_an_invalidate_filtered_out_still_ends_the_stream_with_its_token(coll: Any) -> None:
    stream = await coll.watch([{"$match": {"operationType": "insert"}}])
    await coll.insert_one({"_id": 1})
    await take(stream, 1)
    await coll.drop()
    assert await stream.try_next() is None
    assert not stream.alive
    await coll.insert_one({"_id": 2})
    after = await coll.watch([{"$match": {"operationType": "insert"}}],
                             start_after=stream.resume_token)
    assert keys(await take(after, 1)) == [2]


# --- resume tokens ----------------------------------------------------------------------------


async def test_resuming_after_any_event_gives_exactly_the_events_after_it(coll: Any) -> None:
    stream = await coll.watch()
    for n in range(5):
        await coll.insert_one({"_id": n})
    events = await take(stream, 5)
    for index, event in enumerate(events):
        resumed = await coll.watch(resume_after=event["_id"], max_await_time_ms=QUICK)
        assert keys(await take(resumed, 4 - index)) == list(range(index + 1, 5))
        await nothing_more(resumed)


async def test_start_at_operation_time_includes_changes_at_that_time(coll: Any) -> None:
    stream = await coll.watch()
    for n in range(4):
        await coll.insert_one({"_id": n})
    events = await take(stream, 4)
    started = await coll.watch(start_at_operation_time=events[2]["clusterTime"])
    assert keys(await take(started, 2)) == [2, 3]


async def test_post_batch_resume_token_follows_the_history(
    client: MemoryMongoClient, coll: Any
) -> None:
    """From report_post_batch_resume_token.js: a token even for batchSize 0; equal to the
    last event's when that is the latest change; advancing past other collections' writes
    on empty batches; never past a startAtOperationTime in the future."""
    stream = await coll.watch(batch_size=0, max_await_time_ms=QUICK)
    initial = stream.resume_token
    assert initial is not None
    await coll.insert_one({"_id": 1})
    (event,) = await take(stream, 1)
    assert stream.resume_token == event["_id"] and event["_id"]["_data"] > initial["_data"]

    await client["shop"]["unrelated"].insert_one({"_id": 1})
    before = stream.resume_token
    assert await stream.try_next() is None
    assert stream.resume_token["_data"] > before["_data"]

    future = await coll.watch(start_at_operation_time=Timestamp(4102444800, 1),
                              max_await_time_ms=QUICK)
    token = future.resume_token
    for n in range(2, 4):
        await coll.insert_one({"_id": n})
        assert await future.try_next() is None
        assert future.resume_token == token


async def test_tokens_are_opaque_and_malformed_or_conflicting_ones_refused(
    server: MemoryServer, coll: Any
) -> None:
    stream = await coll.watch()
    await coll.insert_one({"_id": 1})
    (event,) = await take(stream, 1)
    int(event["_id"]["_data"], 16)  # a hex string, as MongoDB's
    for token, code in (({"_data": "zz"}, 9), ({"data": "82"}, 9), ("82", 14)):
        with pytest.raises(OperationFailure) as info:
            await coll.watch(resume_after=token)
        assert info.value.code == code
    # PyMongo sends only the token when given a start time too; a server refuses both
    assert (await coll.watch(resume_after=event["_id"],
                             start_at_operation_time=Timestamp(1, 1))).alive
    for options, code in (({"resume_after": event["_id"], "start_after": event["_id"]}, 50865),
                          ({"resume_after": event["_id"],
                            "start_at_operation_time": Timestamp(1, 1)}, 40674)):
        with pytest.raises(OperationFailure) as info:
            server.open_change_stream(database="shop", **options)
        assert info.value.code == code


async def test_resuming_from_an_event_the_stream_never_had_fails_when_it_moves_on(
    client: MemoryMongoClient,
) -> None:
    """MongoDB checks that the resumed stream contains the token's event, once it meets a
    later event: "cannot resume stream; the resume token was not found" (280)."""
    elsewhere = await client["shop"]["a"].watch()
    await client["shop"]["a"].insert_one({"_id": 1})
    (foreign,) = await take(elsewhere, 1)
    stream = await client["shop"]["b"].watch(resume_after=foreign["_id"])
    await client["shop"]["b"].insert_one({"_id": 2})
    with pytest.raises(OperationFailure) as info:
        await stream.try_next()
    assert info.value.code == 280
    assert info.value.has_error_label("NonResumableChangeStreamError")
    assert not stream.alive


# --- history ----------------------------------------------------------------------------------


async def test_tokens_older_than_the_history_are_lost() -> None:
    coll = MemoryMongoClient(MemoryServer(replica_set=True, history_size=3))["db"]["c"]
    stream = await coll.watch()
    events = []
    for n in range(5):
        await coll.insert_one({"_id": n})
        events += await take(stream, 1)  # keeping up: never behind the history
    with pytest.raises(OperationFailure) as info:
        await coll.watch(resume_after=events[0]["_id"])
    assert info.value.code == 286
    assert info.value.has_error_label("NonResumableChangeStreamError")
    resumed = await coll.watch(resume_after=events[2]["_id"])  # events 2..4 are kept
    assert keys(await take(resumed, 2)) == [3, 4]


async def test_an_open_stream_that_falls_behind_the_history_fails() -> None:
    coll = MemoryMongoClient(MemoryServer(replica_set=True, history_size=3))["db"]["c"]
    stream = await coll.watch()
    for n in range(5):
        await coll.insert_one({"_id": n})
    with pytest.raises(OperationFailure) as info:
        await stream.try_next()
    assert info.value.code == 286
    assert not stream.alive  # not resumable: PyMongo closes the stream


async def test_dropped_history_fails_open_streams_and_old_tokens(
    server: MemoryServer, coll: Any
) -> None:
    stream = await coll.watch(max_await_time_ms=10_000)
    await coll.insert_one({"_id": 1})
    (event,) = await take(stream, 1)
    error = await raised_while_waiting(stream.try_next, server.drop_change_history)
    assert isinstance(error, OperationFailure) and error.code == 286
    with pytest.raises(OperationFailure) as info:
        await coll.watch(resume_after=event["_id"])
    assert info.value.code == 286
    fresh = await coll.watch()
    await coll.insert_one({"_id": 2})
    assert keys(await take(fresh, 1)) == [2]


# --- interruptions: nothing lost, nothing twice ---------------------------------------------


async def test_an_interrupted_stream_resumes_by_itself(server: MemoryServer, coll: Any) -> None:
    """As PyMongo: after a resumable error the stream resumes once, after its resume token,
    without the application noticing."""
    stream = await coll.watch(batch_size=1, max_await_time_ms=QUICK)
    for n in range(3):
        await coll.insert_one({"_id": n})
    assert keys(await take(stream, 1)) == [0]
    assert server.interrupt_change_streams() == 1
    await coll.insert_one({"_id": 3})
    assert keys(await take(stream, 3)) == [1, 2, 3]
    await nothing_more(stream)


async def test_an_interruption_wakes_a_waiting_stream_which_resumes(
    server: MemoryServer, coll: Any
) -> None:
    stream = await coll.watch(max_await_time_ms=5_000)
    received: list[dict[str, Any]] = []
    async with anyio.create_task_group() as tg:
        async def read() -> None:
            received.append(await stream.next())

        tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()
        assert await anyio.to_thread.run_sync(server.interrupt_change_streams) == 1
        await anyio.wait_all_tasks_blocked()  # resumed, waiting again
        await coll.insert_one({"_id": 1})
    assert keys(received) == [1]


async def test_a_lost_connection_is_resumed_too(server: MemoryServer, coll: Any) -> None:
    stream = await coll.watch(max_await_time_ms=QUICK)
    await coll.insert_one({"_id": 1})
    server.interrupt_change_streams(AutoReconnect("connection reset by peer"))
    await coll.insert_one({"_id": 2})
    assert keys(await take(stream, 2)) == [1, 2]


async def test_a_non_resumable_error_reaches_the_application_and_closes_the_stream(
    server: MemoryServer, coll: Any
) -> None:
    stream = await coll.watch()
    server.interrupt_change_streams(OperationFailure("not authorized", 13))
    with pytest.raises(OperationFailure) as info:
        await stream.try_next()
    assert info.value.code == 13
    assert not stream.alive


async def test_a_step_down_fails_writes_reads_and_streams_until_the_election(
    server: MemoryServer, client: MemoryMongoClient, coll: Any
) -> None:
    stream = await coll.watch(max_await_time_ms=QUICK)
    await coll.insert_one({"_id": 1})
    server.step_down(election_after=None)

    with pytest.raises(NotPrimaryError) as write:
        await coll.insert_one({"_id": 2})
    assert write.value.details["code"] == 10107
    assert write.value.has_error_label("RetryableWriteError")
    with pytest.raises(NotPrimaryError) as multi:
        await coll.update_many({}, {"$set": {"x": 1}})
    assert not multi.value.has_error_label("RetryableWriteError")  # not a retryable write
    for read in (coll.find_one({}), coll.count_documents({}), coll.find({}).to_list(None)):
        with pytest.raises(NotPrimaryError) as failed_read:
            await read
        assert failed_read.value.details["code"] == 13435
    hello = await client.admin.command("hello")
    assert (hello["isWritablePrimary"], hello["secondary"], "primary" in hello) == (
        False, True, False)
    # The stream was interrupted; its automatic resume finds no primary: the error
    # reaches the application, but the stream stays usable (as PyMongo's)
    with pytest.raises(NotPrimaryError):
        await stream.try_next()
    assert stream.alive

    server.elect()
    await coll.insert_one({"_id": 3})
    assert keys(await take(stream, 2)) == [1, 3]  # nothing lost, nothing twice
    assert (await client.admin.command("hello"))["primary"] == hello["me"]


async def test_a_new_primary_is_elected_after_the_delay(
    server: MemoryServer, client: MemoryMongoClient, coll: Any
) -> None:
    before = (await client.admin.command("hello"))["electionId"]
    stepped_down = time.monotonic()
    server.step_down(election_after=0.1)
    with anyio.fail_after(TIMEOUT):
        while True:
            try:
                await coll.insert_one({"_id": 1})
                break
            except NotPrimaryError:
                await anyio.sleep(0.01)
    assert time.monotonic() - stepped_down >= 0.1
    assert (await client.admin.command("hello"))["electionId"] != before


async def test_no_kind_of_interruption_loses_or_repeats_an_event(
    server: MemoryServer, coll: Any
) -> None:
    """A writer inserts 300 documents while every kind of fault hits the stream; a reader
    that reopens after its last resume token whenever an error reaches it gets each exactly
    once, in order."""
    await interruption_drill(server, coll, total=300)


@pytest.mark.soak
@pytest.mark.parametrize("batch_size", [1, 7, 101])
async def test_interruption_soak(server: MemoryServer, coll: Any, batch_size: int) -> None:
    await interruption_drill(server, coll, total=3000, batch_size=batch_size)


async def interruption_drill(server: MemoryServer, coll: Any, total: int,
                             batch_size: int = 7) -> None:
    faults = [
        lambda: server.interrupt_change_streams(),
        lambda: server.interrupt_change_streams(AutoReconnect("connection reset")),
        lambda: server.step_down(election_after=0.01),
        lambda: server.step_down(election_after=0),
    ]
    received: list[int] = []
    errors_seen = 0

    async def write() -> None:
        for n in range(total):
            while True:
                try:
                    await coll.insert_one({"_id": n})
                    break
                except NotPrimaryError:
                    await anyio.sleep(0.005)
            if n % 25 == 10:
                faults[(n // 25) % len(faults)]()

    async def read() -> None:
        nonlocal errors_seen
        token = None
        while len(received) < total:
            try:
                async with await coll.watch(resume_after=token, batch_size=batch_size,
                                            max_await_time_ms=QUICK) as stream:
                    while len(received) < total:
                        change = await stream.try_next()
                        token = stream.resume_token
                        if change is not None:
                            received.append(change["documentKey"]["_id"])
            except NotPrimaryError:
                errors_seen += 1
                await anyio.sleep(0.005)

    with anyio.fail_after(30 + total / 50):
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            tg.start_soon(write)
    assert received == list(range(total))
    assert errors_seen  # some interruptions reached the reader, others were resumed silently


# --- order across clients ---------------------------------------------------------------------


async def test_events_come_in_commit_order_across_clients_and_threads(
    server: MemoryServer,
) -> None:
    per_writer = 40
    async_writers = [MemoryMongoClient(server) for _ in range(3)]
    sync_writers = [MemoryMongoClient(server).sync_client() for _ in range(2)]
    watchers = [await MemoryMongoClient(server).watch() for _ in range(2)]

    async def write_async(number: int, client: MemoryMongoClient) -> None:
        for seq in range(per_writer):
            await client["db"][f"c{number % 2}"].insert_one({"writer": number, "seq": seq})

    def write_sync(number: int, client: Any) -> None:
        for seq in range(per_writer):
            client["db"]["c9"].insert_one({"writer": number, "seq": seq})

    async with anyio.create_task_group() as tg:
        for number, client in enumerate(async_writers):
            tg.start_soon(write_async, number, client)
        for number, sync in enumerate(sync_writers, start=10):
            tg.start_soon(anyio.to_thread.run_sync, write_sync, number, sync)

    total = per_writer * 5
    seen = [await take(watcher, total) for watcher in watchers]
    assert [e["_id"] for e in seen[0]] == [e["_id"] for e in seen[1]]  # the same sequence
    times = [e["clusterTime"] for e in seen[0]]
    assert times == sorted(set(times))
    by_writer: dict[int, list[int]] = {}
    for event in seen[0]:
        by_writer.setdefault(event["fullDocument"]["writer"], []).append(
            event["fullDocument"]["seq"])
    assert by_writer == {w: list(range(per_writer)) for w in (0, 1, 2, 10, 11)}


# --- waiting ------------------------------------------------------------------------------------


async def test_a_waiting_stream_sleeps_until_a_write_from_another_thread(coll: Any,
                                                                       client: Any) -> None:
    stream = await coll.watch(max_await_time_ms=10_000)
    sync = client.sync_client()
    written = threading.Event()

    def write_later() -> None:
        time.sleep(0.3)  # the writer's own pace, not synchronisation
        sync["shop"]["orders"].insert_one({"_id": 1})
        written.set()

    thread = threading.Thread(target=write_later)
    cpu, started = time.process_time(), time.monotonic()
    thread.start()
    change = await stream.try_next()
    waited, used = time.monotonic() - started, time.process_time() - cpu
    thread.join()
    assert written.is_set() and change is not None and change["documentKey"] == {"_id": 1}
    assert 0.25 < waited < 5
    assert used < 0.15  # slept, did not spin


async def test_an_idle_stream_returns_after_the_await_time_without_spinning(coll: Any) -> None:
    stream = await coll.watch(max_await_time_ms=300)
    cpu, started = time.process_time(), time.monotonic()
    assert await stream.try_next() is None
    waited, used = time.monotonic() - started, time.process_time() - cpu
    assert 0.29 < waited < 3
    assert used < 0.1


async def test_writes_from_another_event_loop_wake_the_stream(
    server: MemoryServer, coll: Any
) -> None:
    """The sync Scheduler runs its own event loop in another thread: its writes must wake
    streams waiting in this loop, and the other way round."""
    stream = await coll.watch(max_await_time_ms=10_000)
    other_loop_saw: list[Any] = []

    def other_loop() -> None:
        async def main() -> None:
            there = MemoryMongoClient(server)["shop"]["orders"]
            other_stream = await there.watch(max_await_time_ms=10_000)
            await there.insert_one({"_id": "from the other loop"})
            other_loop_saw.extend(await take(other_stream, 2))

        anyio.run(main)

    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, other_loop)
        (first,) = await take(stream, 1)
        assert first["documentKey"] == {"_id": "from the other loop"}
        await coll.insert_one({"_id": "from this loop"})
    assert keys(other_loop_saw) == ["from the other loop", "from this loop"]


# --- the server-level API (used by the look-alike and by a wire front) -----------------------


async def test_server_streams_serve_threads_with_batches_and_tokens(server: MemoryServer,
                                                                    coll: Any) -> None:
    stream = server.open_change_stream(database="shop", collection="orders")
    assert stream.next_batch(0, 0) == ([], stream.post_batch_resume_token)
    for n in range(5):
        await coll.insert_one({"_id": n})
    batch, token = stream.next_batch(0, 2)
    assert keys(batch) == [0, 1] and token == batch[-1]["_id"]
    batch, token = stream.next_batch(0, None)
    assert keys(batch) == [2, 3, 4] and token == batch[-1]["_id"]

    waited = await anyio.to_thread.run_sync(stream.next_batch, 0.1)  # times out
    assert waited == ([], token)
    got: list[Any] = []

    async def wait_in_a_thread() -> None:
        got.append(await anyio.to_thread.run_sync(stream.next_batch, 10.0))

    with anyio.fail_after(5):  # woken by the write, not by the end of the await time
        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_in_a_thread)
            await coll.insert_one({"_id": 5})
    assert keys(got[0][0]) == [5]


async def test_closing_a_server_stream_ends_a_waiting_batch(server: MemoryServer) -> None:
    stream = server.open_change_stream(database="shop")
    error = await raised_while_waiting(lambda: stream.next_batch_async(10.0),
                                       lambda: threading.Thread(target=stream.close).start())
    assert isinstance(error, OperationFailure) and error.code == 237  # CursorKilled
    with pytest.raises(CursorNotFound):
        stream.next_batch()


async def test_server_streams_give_the_shapes_the_scripted_server_sends(
    server: MemoryServer, client: MemoryMongoClient
) -> None:
    """tests/test_eventbroker_wire.py scripts a replica set answering the broker's stream:
    an empty first batch with a postBatchResumeToken, inserts carrying fullDocument, ns and
    documentKey, and an invalidate that closes the cursor (id 0) with its own token as the
    postBatchResumeToken. The server-level API gives a wire front the same."""
    events = client["apscheduler"]["apsched_events"]
    match = {"$match": {"operationType": {"$in": ["insert", "invalidate"]},
                        "fullDocument.node": {"$ne": "this-node"}}}
    stream = server.open_change_stream(database="apscheduler", collection="apsched_events",
                                       pipeline=[match])
    assert stream.namespace == "apscheduler.apsched_events"
    first, token = stream.next_batch(0, 101)
    assert first == [] and set(token) == {"_data"}
    await events.insert_one({"_id": 1, "node": "this-node"})  # filtered out
    await events.insert_one({"_id": 2, "node": "other-node"})
    (change,), _ = stream.next_batch(0)
    assert {"_id", "operationType", "fullDocument", "ns", "documentKey"} <= set(change)
    assert change["ns"] == {"db": "apscheduler", "coll": "apsched_events"}
    assert change["fullDocument"]["node"] == "other-node"
    await events.drop()
    (invalidate,), token = stream.next_batch(0)
    assert invalidate["operationType"] == "invalidate" and token == invalidate["_id"]
    assert not stream.alive


# --- pipelines and options --------------------------------------------------------------------


async def test_match_on_operation_type_and_document_fields(coll: Any) -> None:
    stream = await coll.watch([{"$match": {"operationType": {"$in": ["insert", "update"]},
                                           "fullDocument.kind": {"$ne": "noise"}}}],
                              full_document="updateLookup")
    await coll.insert_many([{"_id": 1, "kind": "noise"}, {"_id": 2, "kind": "signal"}])
    await coll.update_one({"_id": 2}, {"$set": {"v": 1}})
    await coll.delete_one({"_id": 2})
    await coll.insert_one({"_id": 3, "kind": "signal"})
    assert [(e["operationType"], e["documentKey"]["_id"]) for e in await take(stream, 3)] == [
        ("insert", 2), ("update", 2), ("insert", 3)]
    on_fields = await coll.watch([{"$match": {"updateDescription.updatedFields.v": 2}}])
    await coll.update_one({"_id": 3}, {"$set": {"v": 1}})
    await coll.update_one({"_id": 3}, {"$set": {"v": 2}})
    (event,) = await take(on_fields, 1)
    assert event["updateDescription"]["updatedFields"] == {"v": 2}


async def test_project_works_while_the_token_stays(coll: Any) -> None:
    stream = await coll.watch([{"$project": {"operationType": 1, "fullDocument.a": 1}}])
    await coll.insert_one({"_id": 1, "a": 1, "b": 2})
    (event,) = await take(stream, 1)
    assert event == {"_id": event["_id"], "operationType": "insert", "fullDocument": {"a": 1}}
    hidden = await coll.watch([{"$project": {"_id": 0}}])
    await coll.insert_one({"_id": 2})
    with pytest.raises(OperationFailure) as info:
        await hidden.try_next()
    assert info.value.code == 280  # "...the _id field ... was modified by the pipeline"


@pytest.mark.parametrize("arguments", [
    {"pipeline": [{"$addFields": {"x": 1}}]},
    {"pipeline": [{"$group": {"_id": "$operationType"}}]},
    {"full_document": "whenAvailable"},
    {"full_document": "required"},
    {"full_document_before_change": "whenAvailable"},
    {"show_expanded_events": True},
    {"collation": {"locale": "fr"}},
])
async def test_what_the_fake_cannot_do_faithfully_is_refused(coll: Any,
                                                             arguments: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedByMemoryBackend):
        await coll.watch(**arguments)


async def test_invalid_options_fail_as_on_a_server(coll: Any) -> None:
    with pytest.raises(OperationFailure) as info:
        await coll.watch(full_document="sometimes")
    assert info.value.code == 2
    with pytest.raises(TypeError):
        await coll.watch({"$match": {}})
    with pytest.raises(ValueError):
        await coll.watch(batch_size=-1)


async def test_unfaithful_writes_are_refused_in_replica_set_mode(client: MemoryMongoClient,
                                                                 coll: Any) -> None:
    sync = client.sync_client()
    with (pytest.raises(UnsupportedByMemoryBackend, match="transactions"),
          sync.start_session() as session, session.start_transaction()):
        sync["shop"]["orders"].insert_one({"_id": 1}, session=session)
    await coll.insert_one({"_id": 2})
    with pytest.raises(UnsupportedByMemoryBackend, match=r"\$out"):
        await coll.aggregate([{"$match": {}}, {"$out": "copy"}])
    with pytest.raises(UnsupportedByMemoryBackend, match="pipeline-style"):
        sync["shop"]["orders"].update_one({"_id": 2}, [{"$set": {"a": 1}}])
