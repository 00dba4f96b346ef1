"""Does the fake do what MongoDB documents? One test per operator the store relies on.

The same tests run against a real server when APSCHED_MONGO_TEST_URI is set, so a pass on
the fake means the store's queries behave as they would in production. What the fake can't
do faithfully must fail loudly (the last tests).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import pytest
from pymongo import ASCENDING, DESCENDING, IndexModel, ReturnDocument, UpdateMany, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure

from apsched_mongo import UnsupportedByMemoryBackend
from apsched_mongo.memory import MemoryMongoClient, MemoryServer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def coll(backend: Any) -> Any:
    collection = backend.db()["fidelity"]
    await collection.insert_many([
        {"_id": 1, "n": 1, "tag": "a", "acquired_by": None},
        {"_id": 2, "n": 2, "tag": "b", "acquired_by": "s1"},
        {"_id": 3, "n": 3, "tag": "a"},
        {"_id": 4, "n": 4, "tag": "c", "slot": 0},
    ])
    return collection


async def ids(cursor: Any) -> list[Any]:
    return [doc["_id"] for doc in await cursor.to_list(None)]


async def test_null_matches_missing_and_ne_null_excludes_both(coll: Any) -> None:
    assert sorted(await ids(coll.find({"acquired_by": None}))) == [1, 3, 4]
    assert await ids(coll.find({"acquired_by": {"$ne": None}})) == [2]


async def test_comparison_and_set_operators(coll: Any) -> None:
    assert sorted(await ids(coll.find({"n": {"$lt": 3}}))) == [1, 2]
    assert sorted(await ids(coll.find({"n": {"$lte": 3, "$ne": None}}))) == [1, 2, 3]
    assert sorted(await ids(coll.find({"tag": {"$in": ["a", "c"]}}))) == [1, 3, 4]
    assert sorted(await ids(coll.find({"tag": {"$nin": ["a"]}}))) == [2, 4]
    assert await ids(coll.find({"slot": {"$exists": True}})) == [4]
    assert sorted(await ids(coll.find({"$or": [{"n": 1}, {"tag": "c"}]}))) == [1, 4]


async def test_sort_limit_projection(coll: Any) -> None:
    docs = await coll.find({}, projection={"tag": True}, sort=[("n", DESCENDING)],
                           limit=2).to_list(None)
    assert docs == [{"_id": 4, "tag": "c"}, {"_id": 3, "tag": "a"}]
    assert await ids(coll.find({}, sort=[("tag", ASCENDING), ("_id", DESCENDING)])) == [
        3, 1, 2, 4]
    first = await coll.find_one({"n": {"$ne": None}}, sort=[("n", ASCENDING)],
                                projection={"n": True})
    assert first == {"_id": 1, "n": 1}


async def test_update_many_set_unset_counts(coll: Any) -> None:
    result = await coll.update_many({"tag": "a"}, {"$set": {"x": 1}, "$unset": {"n": ""}})
    assert (result.matched_count, result.modified_count) == (2, 2)
    assert await coll.find_one({"_id": 1}) == {"_id": 1, "tag": "a", "acquired_by": None, "x": 1}
    again = await coll.update_many({"tag": "a"}, {"$set": {"x": 1}})
    assert (again.matched_count, again.modified_count) == (2, 0)


async def test_conditional_update_matches_nothing_when_condition_fails(coll: Any) -> None:
    result = await coll.update_one({"_id": 2, "acquired_by": None}, {"$set": {"acquired_by": "x"}})
    assert result.matched_count == 0
    assert (await coll.find_one({"_id": 2}))["acquired_by"] == "s1"


async def test_find_one_and_update_upsert_returns_previous(coll: Any) -> None:
    assert await coll.find_one_and_update({"_id": 9}, {"$set": {"v": 1}}, upsert=True,
                                          projection={"_id": True}) is None
    previous = await coll.find_one_and_update({"_id": 9}, {"$set": {"v": 2}}, upsert=True)
    assert previous == {"_id": 9, "v": 1}
    after = await coll.find_one_and_update({"_id": 9}, {"$set": {"v": 3}},
                                           return_document=ReturnDocument.AFTER)
    assert after == {"_id": 9, "v": 3}


async def test_find_one_and_replace_and_delete(coll: Any) -> None:
    assert await coll.find_one_and_replace({"_id": 1}, {"only": True}, upsert=True) is not None
    assert await coll.find_one({"_id": 1}) == {"_id": 1, "only": True}
    assert await coll.find_one_and_replace({"_id": 7}, {"new": 1}, upsert=True) is None
    assert (await coll.find_one_and_delete({"_id": 7}, projection={"_id": True})) == {"_id": 7}
    assert await coll.find_one_and_delete({"_id": 7}) is None


async def test_delete_counts(coll: Any) -> None:
    assert (await coll.delete_one({"_id": 1, "acquired_by": {"$in": ["s1", None]}})
            ).deleted_count == 1
    assert (await coll.delete_one({"_id": 2, "acquired_by": {"$in": ["s9", None]}})
            ).deleted_count == 0
    assert (await coll.delete_many({"tag": {"$in": ["a", "b"]}})).deleted_count == 2


async def test_duplicate_key_on_insert(coll: Any) -> None:
    with pytest.raises(DuplicateKeyError) as info:
        await coll.insert_one({"_id": 1})
    assert info.value.code == 11000
    with pytest.raises(BulkWriteError) as bulk:
        await coll.insert_many([{"_id": 1}, {"_id": 10}], ordered=False)
    assert [e["code"] for e in bulk.value.details["writeErrors"]] == [11000]
    assert await coll.count_documents({"_id": 10}) == 1  # unordered: the rest went in


async def test_partial_unique_index_and_unordered_bulk(coll: Any) -> None:
    await coll.create_indexes([IndexModel([("tag", ASCENDING), ("slot", ASCENDING)],
                                          unique=True, name="tag_slot",
                                          partialFilterExpression={"slot": {"$exists": True}})])
    with pytest.raises(BulkWriteError) as info:
        await coll.bulk_write([
            UpdateOne({"_id": 1}, {"$set": {"slot": 0}}),
            UpdateOne({"_id": 3}, {"$set": {"slot": 0}}),  # same (tag a, slot 0): rejected
            UpdateMany({"_id": {"$in": [2]}}, {"$set": {"claimed": True}}),
        ], ordered=False)
    details = info.value.details
    assert [(e["index"], e["code"]) for e in details["writeErrors"]] == [(1, 11000)]
    assert details["nModified"] == 2
    assert (await coll.find_one({"_id": 3})).get("slot") is None
    assert (await coll.find_one({"_id": 2}))["claimed"] is True
    # Documents without the field are not constrained by the partial index
    await coll.insert_many([{"_id": 20, "tag": "a"}, {"_id": 21, "tag": "a"}])


async def test_bulk_write_result_counts(coll: Any) -> None:
    result = await coll.bulk_write([
        UpdateOne({"_id": 1}, {"$set": {"z": 1}}),
        UpdateMany({"tag": "a"}, {"$set": {"w": 1}}),
        UpdateOne({"_id": 99}, {"$set": {"z": 1}}),
    ], ordered=False)
    assert (result.matched_count, result.modified_count) == (3, 3)


async def test_dates_are_milliseconds_and_aware_utc(coll: Any) -> None:
    value = datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=2)))
    await coll.insert_one({"_id": "d", "at": value})
    stored = (await coll.find_one({"_id": "d"}))["at"]
    assert stored == value - timedelta(microseconds=901)
    assert stored.utcoffset() == timedelta(0)
    # Query values are truncated the same way, so the original value still matches
    assert await coll.count_documents({"at": value}) == 1


async def test_uuid_ids_round_trip(coll: Any) -> None:
    job_id = uuid4()
    await coll.insert_one({"_id": job_id})
    assert (await coll.find_one({"_id": {"$in": [job_id]}}))["_id"] == job_id


async def test_aggregate_group_count_and_distinct(coll: Any) -> None:
    cursor = await coll.aggregate([{"$match": {"tag": {"$in": ["a", "b"]}}},
                                   {"$group": {"_id": "$tag", "running": {"$sum": 1}}}])
    assert sorted((d["_id"], d["running"]) for d in await cursor.to_list(None)) == [
        ("a", 2), ("b", 1)]
    assert sorted(await coll.distinct("tag", {"n": {"$gt": 1}})) == ["a", "b", "c"]
    assert await coll.count_documents({"tag": "a"}) == 2


async def test_ttl_index_options_are_reported(coll: Any) -> None:
    await coll.create_indexes([IndexModel([("expires_at", ASCENDING)], name="ttl",
                                          expireAfterSeconds=0)])
    info = await coll.index_information()
    assert info["ttl"]["expireAfterSeconds"] == 0
    assert [tuple(k) for k in info["ttl"]["key"]] == [("expires_at", 1)]


async def test_hello_reports_the_server_clock(backend: Any) -> None:
    reply = await backend.client().admin.command("hello")
    assert abs(reply["localTime"].replace(tzinfo=UTC)
               - datetime.now(UTC)) < timedelta(seconds=5)


# --- what the fake cannot do: it must refuse, not guess -------------------------------------

@pytest.fixture
def memory_coll() -> Any:
    return MemoryMongoClient().get_database("fidelity")["loud"]


async def test_fake_refuses_pipeline_updates(memory_coll: Any) -> None:
    await memory_coll.insert_one({"_id": 1})
    with pytest.raises(UnsupportedByMemoryBackend, match="pipeline-style"):
        await memory_coll.update_one({"_id": 1}, [{"$set": {"a": 1}}])
    with pytest.raises(UnsupportedByMemoryBackend, match="pipeline-style"):
        await memory_coll.bulk_write([UpdateOne({"_id": 1}, [{"$set": {"a": 1}}])])


async def test_fake_refuses_server_variables(memory_coll: Any) -> None:
    with pytest.raises(UnsupportedByMemoryBackend, match=r"\$\$NOW"):
        await memory_coll.update_one({"_id": 1}, {"$set": {"at": "$$NOW"}})
    with pytest.raises(UnsupportedByMemoryBackend, match=r"\$\$NOW"):
        await memory_coll.find({"$expr": {"$lt": ["$at", "$$NOW"]}}).to_list(None)


async def test_fake_has_no_change_streams_like_a_standalone(memory_coll: Any) -> None:
    with pytest.raises(OperationFailure) as info:
        await memory_coll.watch()
    assert info.value.code == 40573


async def test_fake_expires_ttl_documents_at_once(memory_coll: Any) -> None:
    """Unlike the server's TTL monitor (about once a minute), the fake expires on read; the
    store never relies on TTL timing (get_job_result and cleanup check expiry themselves)."""
    await memory_coll.create_indexes([IndexModel([("expires_at", ASCENDING)],
                                                 expireAfterSeconds=0)])
    await memory_coll.insert_one({"expires_at": datetime.now(UTC) - timedelta(1)})
    assert await memory_coll.count_documents({}) == 0


async def test_aggregate_sort_limit_lookup_join(backend: Any) -> None:
    """The queue head query: sort, limit, then join each job's task limit."""
    db = backend.db()
    await db["tasks"].insert_many([{"_id": "a", "max_running_jobs": 2, "state": b"x"},
                                   {"_id": "b", "max_running_jobs": None}])
    await db["jobs"].insert_many([
        {"_id": n, "task_id": task, "order": order, "acquired_by": None}
        for n, task, order in [(1, "a", 30), (2, "b", 10), (3, "gone", 20), (4, "a", 40)]
    ])
    cursor = await db["jobs"].aggregate([
        {"$match": {"acquired_by": None}},
        {"$sort": {"order": 1, "_id": 1}},
        {"$limit": 3},
        {"$lookup": {"from": "tasks", "localField": "task_id", "foreignField": "_id",
                     "as": "task"}},
        {"$set": {"max_running_jobs": {"$arrayElemAt": ["$task.max_running_jobs", 0]}}},
        {"$project": {"task": 0}},
    ])
    documents = await cursor.to_list(None)
    assert [(d["_id"], d.get("max_running_jobs")) for d in documents] == [
        (2, None), (3, None), (1, 2)]
    assert "max_running_jobs" in documents[0]  # a task with a null limit gives null...
    assert "max_running_jobs" not in documents[1]  # ...a missing task gives no field
    assert all("task" not in d for d in documents)



async def test_documents_outside_a_partial_unique_index_are_not_checked(backend: Any) -> None:
    """Only documents matching partialFilterExpression are in the index (and unique)."""
    collection = backend.db()["partial"]
    await collection.create_indexes([IndexModel(
        [("t", ASCENDING), ("slot", ASCENDING)], unique=True, name="t_slot",
        partialFilterExpression={"slot": {"$exists": True}},
    )])
    await collection.insert_one({"_id": 1, "t": "a", "slot": None})  # in the index as (a, null)
    await collection.insert_one({"_id": 2, "t": "a"})  # outside the index: not checked
    await collection.insert_one({"_id": 3, "t": "a"})
    with pytest.raises(DuplicateKeyError):
        await collection.insert_one({"_id": 4, "t": "a", "slot": None})


async def test_a_collection_emptied_by_deletes_exists_until_dropped(backend: Any) -> None:
    """mongomock-ng forgets a collection once its last document is deleted; MongoDB keeps
    it (and a change stream on it sees its drop)."""
    db = backend.db()
    await db["emptied"].insert_one({"_id": 1})
    await db["emptied"].delete_one({"_id": 1})
    assert "emptied" in await db.list_collection_names()
    await db.drop_collection("emptied")
    assert "emptied" not in await db.list_collection_names()


@pytest.mark.parametrize("replica_set", [False, True], ids=["standalone", "replica-set"])
async def test_closing_a_synchronous_client_leaves_the_server_alone(replica_set: bool) -> None:
    """mongomock-ng's close() empties the store it was given: every database of the server."""
    client = MemoryMongoClient(MemoryServer(replica_set=replica_set))
    await client["db"]["c"].insert_one({"_id": 1})
    client.sync_client().close()
    assert await client["db"]["c"].count_documents({}) == 1


async def test_lookups_by_id_match_what_a_scan_matches(coll: Any) -> None:
    """The fake looks documents named by ``_id`` up directly (as MongoDB's ``_id`` index
    does) instead of scanning: the answers must be a scan's, for equality and ``$in``, with
    the rest of the filter applied, for reads, updates and deletes alike."""
    ids = [uuid4() for _ in range(4)]
    await coll.insert_many([{"_id": i, "n": n, "tag": "a" if n % 2 else "b"}
                            for n, i in enumerate(ids)])
    await coll.insert_one({"_id": "text", "n": 9})
    await coll.insert_one({"_id": 7, "n": 7})
    scan = {"$and": [{"n": {"$gte": 0}}]}  # forces the plain path
    for query in ({"_id": ids[1]}, {"_id": ids[1], "tag": "b"}, {"_id": "text"},
                  {"_id": 7.0}, {"_id": {"$in": [ids[0], ids[3], "missing", ids[0]]}},
                  {"_id": {"$in": [ids[2]]}, "tag": "b"}, {"_id": uuid4()}):
        looked_up = sorted(d["n"] for d in await coll.find(query).to_list(None))
        scanned = sorted(d["n"] for d in await coll.find({**scan, **query}).to_list(None))
        assert looked_up == scanned, query
    assert (await coll.update_one({"_id": ids[0], "tag": "a"}, {"$set": {"x": 1}})
            ).modified_count == 0
    assert (await coll.update_one({"_id": ids[0], "tag": "b"}, {"$set": {"x": 1}})
            ).modified_count == 1
    assert (await coll.delete_many({"_id": {"$in": ids}, "tag": "a"})).deleted_count == 2
    assert await coll.count_documents({"_id": {"$in": [*ids, "text", 7]}}) == 4
