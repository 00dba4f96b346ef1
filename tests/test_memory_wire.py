"""The in-memory server's wire front (apsched_mongo.memory_wire) through the real driver:
commands answered as mongod answers them, real batching, retryable writes, injected faults
and role checks."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from bson import Int64
from pymongo import MongoClient, ReturnDocument, monitoring
from pymongo.errors import (
    AutoReconnect,
    BulkWriteError,
    DuplicateKeyError,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    WriteConcernError,
)
from pymongo.write_concern import WriteConcern

from apsched_mongo.memory import MemoryMongoClient, MemoryServer
from apsched_mongo.memory_wire import Fault, FaultPlan, MemoryWireServer, parse_fault
from apsched_mongo.memory_wire._sessions import RetryableWrites

TIMEOUT_MS = 5000


class Failures(monitoring.CommandListener):
    """Keeps every failed command's reply, as the driver saw it."""

    def __init__(self) -> None:
        self.events: list[monitoring.CommandFailedEvent] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        pass

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.events.append(event)


@pytest.fixture
def front() -> Iterator[MemoryWireServer]:
    with MemoryWireServer() as server:
        yield server


@pytest.fixture
def rs_front() -> Iterator[MemoryWireServer]:
    with MemoryWireServer(replica_set=True) as server:
        yield server


def connect(front: MemoryWireServer, **options: Any) -> MongoClient[dict[str, Any]]:
    client: MongoClient[dict[str, Any]] = MongoClient(
        front.uri, serverSelectionTimeoutMS=TIMEOUT_MS, **options)
    return client


@pytest.fixture
def client(front: MemoryWireServer) -> Iterator[MongoClient[dict[str, Any]]]:
    with connect(front) as client:
        yield client


# --- commands --------------------------------------------------------------------------------


def test_documents_round_trip_exactly(client: MongoClient[dict[str, Any]]) -> None:
    from datetime import UTC, datetime
    from uuid import uuid4

    document = {"_id": uuid4(), "at": datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=UTC),
                "n": Int64(2**40), "nested": {"list": [1, "two", None]}, "blob": b"\x00\x01"}
    collection = client.get_database("d", codec_options=client.codec_options.with_options(
        tz_aware=True, uuid_representation=4)).c
    collection.insert_one(document)
    assert collection.find_one({"_id": document["_id"]}) == document


def test_data_is_shared_with_in_process_clients() -> None:
    memory = MemoryServer()
    MemoryMongoClient(memory).sync_client().d.c.insert_one({"_id": 1, "from": "memory"})
    with MemoryWireServer(memory) as front, connect(front) as client:
        assert client.d.c.find_one() == {"_id": 1, "from": "memory"}
        client.d.c.insert_one({"_id": 2, "from": "wire"})
    assert MemoryMongoClient(memory).sync_client().d.c.count_documents({}) == 2


def test_find_batches_like_mongod(front: MemoryWireServer,
                                  client: MongoClient[dict[str, Any]]) -> None:
    client.d.c.insert_many([{"_id": n} for n in range(25)])
    front.commands.clear()
    assert [d["_id"] for d in client.d.c.find(batch_size=10).sort("_id", 1)] == list(range(25))
    assert front.commands["getMore"] == 2  # 10 + 10 + 5
    assert len(client.d.c.find(limit=12, batch_size=5).to_list()) == 12
    assert front.commands["getMore"] == 4  # 5 + 5 + 2, closed with the last batch
    assert front.commands["killCursors"] == 0 and front.open_cursors == 0

    cursor = client.d.c.find(batch_size=5)
    next(cursor)
    assert front.open_cursors == 1
    cursor.close()  # the driver kills what it leaves unread
    assert front.commands["killCursors"] == 1 and front.open_cursors == 0


def test_batches_stop_at_16_mib(front: MemoryWireServer,
                                client: MongoClient[dict[str, Any]]) -> None:
    client.d.big.insert_many([{"_id": n, "pad": "x" * 1_000_000} for n in range(20)])
    front.commands.clear()
    assert len(client.d.big.find().to_list()) == 20
    assert front.commands["getMore"] == 1  # 16 documents, then the other 4


def test_unknown_commands_fields_and_cursors_get_the_servers_errors(
        client: MongoClient[dict[str, Any]]) -> None:
    with pytest.raises(OperationFailure) as unknown:
        client.d.command("frobnicate")
    assert unknown.value.details == {"ok": 0.0, "errmsg": "no such command: 'frobnicate'",
                                     "code": 59, "codeName": "CommandNotFound"}
    with pytest.raises(OperationFailure) as field:
        client.d.command({"find": "c", "bogus": 1})
    assert field.value.code == 40415
    with pytest.raises(OperationFailure) as cursor:
        client.d.command("getMore", Int64(12345), collection="c")
    assert cursor.value.code == 43


def test_duplicate_keys_are_reported_as_mongod_does(client: MongoClient[dict[str, Any]]) -> None:
    jobs = client.d.jobs
    jobs.create_index([("task", 1), ("slot", 1)], unique=True, name="task_slot")
    jobs.insert_one({"_id": 1, "task": "t", "slot": 0})
    with pytest.raises(DuplicateKeyError) as single:
        jobs.insert_one({"_id": 2, "task": "t", "slot": 0})
    assert single.value.details is not None
    assert single.value.details["keyPattern"] == {"task": 1, "slot": 1}
    assert single.value.details["keyValue"] == {"task": "t", "slot": 0}
    assert "index: task_slot" in single.value.details["errmsg"]

    with pytest.raises(BulkWriteError) as bulk:  # unordered: the others are still written
        jobs.insert_many([{"_id": 3, "task": "t", "slot": 0}, {"_id": 4, "task": "u"}],
                         ordered=False)
    assert [e["code"] for e in bulk.value.details["writeErrors"]] == [11000]
    assert bulk.value.details["nInserted"] == 1

    jobs.insert_one({"_id": 5, "task": "v", "slot": 1})
    with pytest.raises(DuplicateKeyError):  # a command error for findAndModify
        jobs.find_one_and_update({"_id": 5}, {"$set": {"task": "t", "slot": 0}})


def test_find_and_modify(client: MongoClient[dict[str, Any]]) -> None:
    c = client.d.c
    c.insert_many([{"_id": n, "n": n} for n in range(3)])
    assert c.find_one_and_update({}, {"$inc": {"n": 10}}, sort=[("n", -1)],
                                 projection={"n": True}) == {"_id": 2, "n": 2}
    assert c.find_one_and_update({"_id": 2}, {"$inc": {"n": 1}},
                                 return_document=ReturnDocument.AFTER) == {"_id": 2, "n": 13}
    assert c.find_one_and_update({"_id": 9}, {"$set": {"n": 9}}, upsert=True) is None
    assert c.find_one_and_replace({"_id": 9}, {"x": 1}, return_document=ReturnDocument.AFTER
                                  ) == {"_id": 9, "x": 1}
    assert c.find_one_and_delete({"_id": 9}) == {"_id": 9, "x": 1}
    assert c.find_one_and_delete({"_id": 9}) is None
    result = c.update_one({"_id": 7}, {"$set": {"n": 7}}, upsert=True)
    assert (result.upserted_id, result.matched_count) == (7, 0)


def test_counts_distinct_and_the_catalog(client: MongoClient[dict[str, Any]]) -> None:
    from pymongo.errors import CollectionInvalid

    c = client.d.c
    c.insert_many([{"_id": n, "k": n % 3} for n in range(10)])
    assert c.count_documents({"k": 1}) == 3  # an aggregate with $group, as the driver sends
    assert c.count_documents({}, skip=2, limit=5) == 5
    assert c.estimated_document_count() == 10  # the count command
    assert sorted(c.distinct("k", {"_id": {"$lt": 5}})) == [0, 1, 2]
    client.d.create_collection("made")
    with pytest.raises(CollectionInvalid):
        client.d.create_collection("made")  # NamespaceExists (48)
    assert set(client.d.list_collection_names()) == {"c", "made"}
    assert [c["name"] for c in client.d.list_collections(filter={"name": "made"})] == ["made"]
    assert "d" in client.list_database_names()
    client.drop_database("d")
    assert "d" not in client.list_database_names()


def test_index_conflicts_are_refused_as_mongod_refuses_them(
        client: MongoClient[dict[str, Any]]) -> None:
    c = client.d.c
    c.create_index("a", name="a_1")
    c.create_index("a", name="a_1")  # identical: nothing to do
    with pytest.raises(OperationFailure) as same_name:
        c.create_index("b", name="a_1")
    assert same_name.value.code == 86  # IndexKeySpecsConflict
    with pytest.raises(OperationFailure) as other_name:
        c.create_index("a", name="another")
    assert other_name.value.code == 85  # IndexOptionsConflict
    with pytest.raises(OperationFailure) as options:
        c.create_index("a", name="a_1", unique=True)
    assert options.value.code == 85
    assert set(c.index_information()) == {"_id_", "a_1"}
    c.drop_index("a_1")
    assert client.d.missing.index_information() == {}  # NamespaceNotFound, as the driver expects


def test_what_the_fake_cannot_do_is_refused(client: MongoClient[dict[str, Any]]) -> None:
    c = client.d.c
    c.insert_one({"_id": 1})
    for attempt in (lambda: c.update_one({"_id": 1}, [{"$set": {"a": 1}}]),
                    lambda: c.update_one({"_id": 1}, {"$set": {"at": "$$NOW"}}),
                    lambda: c.find({}, collation={"locale": "fr"}).to_list()):
        with pytest.raises(OperationFailure) as refused:
            attempt()
        assert refused.value.code == 238
        assert "in-memory back end" in str(refused.value)
    assert c.find_one() == {"_id": 1}


def test_change_streams_answer_as_a_standalone_server(
        client: MongoClient[dict[str, Any]]) -> None:
    with pytest.raises(OperationFailure) as refused:
        client.d.c.watch()
    assert refused.value.code == 40573


def test_write_concerns_a_single_node_cannot_meet(client: MongoClient[dict[str, Any]]) -> None:
    c = client.d.get_collection("c", write_concern=WriteConcern(w=3, wtimeout=100))
    with pytest.raises(WriteConcernError) as unmet:
        c.insert_one({"_id": 1})
    assert unmet.value.code == 100
    majority = client.d.get_collection("c", write_concern=WriteConcern(w="majority"))
    majority.insert_one({"_id": 2})
    assert client.d.c.count_documents({}) == 2


def test_unacknowledged_writes_get_no_reply(front: MemoryWireServer,
                                            client: MongoClient[dict[str, Any]]) -> None:
    client.d.get_collection("c", write_concern=WriteConcern(w=0)).insert_one({"_id": 1})
    assert client.d.c.find_one() == {"_id": 1}  # same connection: after the insert


def test_transaction_numbers_need_a_replica_set(client: MongoClient[dict[str, Any]]) -> None:
    with pytest.raises(OperationFailure) as refused:
        client.d.command({"insert": "c", "documents": [{"_id": 1}], "txnNumber": Int64(1)})
    assert refused.value.code == 20


# --- retryable writes and faults -------------------------------------------------------------


def test_a_lost_reply_is_retried_and_answered_from_the_first_execution(
        rs_front: MemoryWireServer) -> None:
    fault = rs_front.inject("lose-reply", command="findAndModify", namespace="*_jobs")
    with connect(rs_front) as client:
        jobs = client.d.apsched_jobs
        jobs.insert_one({"_id": 1, "runs": 0})
        after = jobs.find_one_and_update({"_id": 1}, {"$inc": {"runs": 1}},
                                         return_document=ReturnDocument.AFTER)
        assert after == {"_id": 1, "runs": 1}
        assert jobs.find_one() == {"_id": 1, "runs": 1}  # executed once
    assert fault.hits == 1
    assert rs_front.commands["findAndModify"] == 2
    assert rs_front.retryable_writes.replayed == 1


def test_without_retryable_writes_a_lost_reply_reaches_the_caller(
        front: MemoryWireServer, client: MongoClient[dict[str, Any]]) -> None:
    front.inject("lose-reply", command="findAndModify")
    client.d.c.insert_one({"_id": 1, "runs": 0})
    with pytest.raises(AutoReconnect):  # a standalone server: the driver cannot retry
        client.d.c.find_one_and_update({"_id": 1}, {"$inc": {"runs": 1}})
    assert client.d.c.find_one() == {"_id": 1, "runs": 1}  # ...but the write landed


def test_a_dropped_connection_before_executing_is_retried_once(
        rs_front: MemoryWireServer) -> None:
    rs_front.inject("hangup", command="insert")
    with connect(rs_front) as client:
        client.d.c.insert_one({"_id": 1})
        assert client.d.c.count_documents({}) == 1
    assert rs_front.commands["insert"] == 2
    assert rs_front.retryable_writes.replayed == 0


@pytest.mark.parametrize("code", [10107, 189])
def test_a_step_down_is_labelled_retryable_and_the_primary_returns(
        rs_front: MemoryWireServer, code: int) -> None:
    failures = Failures()
    rs_front.inject("step-down", command="insert", seconds=0.3, code=code)
    with connect(rs_front, event_listeners=[failures]) as client:
        client.d.c.insert_one({"_id": 1})
        assert client.d.c.count_documents({}) == 1
    assert [(e.failure["code"], e.failure.get("errorLabels")) for e in failures.events] == [
        (code, ["RetryableWriteError"])]
    assert rs_front.commands["insert"] == 2
    assert rs_front.is_primary


def test_while_stepped_down_writes_and_primary_reads_are_refused(
        front: MemoryWireServer, client: MongoClient[dict[str, Any]]) -> None:
    client.d.c.insert_one({"_id": 1})
    front.step_down(60)
    with pytest.raises(NotPrimaryError) as write:
        client.d.c.insert_one({"_id": 2})
    assert write.value.details is not None and write.value.details["code"] == 10107
    assert "errorLabels" not in write.value.details  # no txnNumber: no label
    with pytest.raises(NotPrimaryError) as read:
        client.d.c.find_one()
    assert read.value.details is not None and read.value.details["code"] == 13435


def test_a_stalled_reply_times_out_after_the_write(front: MemoryWireServer) -> None:
    fault = front.inject("stall", command="insert", seconds=5)
    with connect(front, socketTimeoutMS=200) as client:
        with pytest.raises(NetworkTimeout):
            client.d.c.insert_one({"_id": 1})
        assert fault.hits == 1
        assert client.d.c.count_documents({}) == 1


def test_a_held_request_is_dropped_when_its_client_goes_away(front: MemoryWireServer) -> None:
    front.inject("hold", command="insert", seconds=60)
    with connect(front, socketTimeoutMS=200) as client:
        with pytest.raises(NetworkTimeout):  # the driver then closes the connection...
            client.d.c.insert_one({"_id": 1})
        assert client.d.c.count_documents({}) == 0  # ...and the held insert never runs
    front.inject("hold", command="insert", seconds=0.1)
    with connect(front) as client:
        client.d.c.insert_one({"_id": 2})  # held a moment, then executed
        assert client.d.c.count_documents({}) == 1


def test_faults_pick_commands_by_name_namespace_and_count() -> None:
    plan = FaultPlan(seed=1)
    fault = plan.add(Fault("lose-reply", command="FINDANDMODIFY", namespace="*_jobs", skip=1,
                           times=2))
    picks = [plan.pick(name, ns) for name, ns in [
        ("findAndModify", "d.apsched_jobs"),  # skipped
        ("findAndModify", "d.apsched_tasks"),  # other collection
        ("update", "d.apsched_jobs"),  # other command
        ("findAndModify", "e.x_jobs"),
        ("findAndModify", "d.apsched_jobs"),
        ("findAndModify", "d.apsched_jobs"),  # times exhausted
    ]]
    assert picks == [None, None, None, fault, fault, None]
    assert fault.hits == 2 and fault.wait(2, timeout=0)
    full = plan.add(Fault("stall", namespace="d.*", times=None, probability=0.5))
    hits = sum(plan.pick("find", "d.c") is full for _ in range(1000))
    assert 400 < hits < 600


def test_fault_specs_from_the_command_line() -> None:
    fault = parse_fault("lose-reply:command=findAndModify,namespace=*_jobs,times=inf")
    assert (fault.kind, fault.command, fault.namespace, fault.times) == (
        "lose-reply", "findAndModify", "*_jobs", None)
    fault = parse_fault("step-down:seconds=2,code=189,probability=0.01")
    assert (fault.seconds, fault.code, fault.probability) == (2.0, 189, 0.01)
    for bad, problem in [("explode", "unknown fault kind"), ("stall:sconds=1", "unknown fault"),
                         ("stall:seconds=soon", "bad value"), ("stall:seconds", "key=value"),
                         ("step-down:code=11000", "10107 or 189")]:
        with pytest.raises(ValueError, match=problem):
            parse_fault(bad)


def test_retryable_writes_run_once_per_transaction_number() -> None:
    from uuid import uuid4

    from apsched_mongo.memory_wire._errors import CommandError

    memory = RetryableWrites(max_sessions=2)
    runs: list[int] = []

    def execute(reply: dict[str, Any]) -> Any:
        return lambda: runs.append(1) or reply

    ok = lambda reply: reply["ok"] == 1  # noqa: E731
    session = {"id": uuid4()}
    assert memory.run(session, 1, execute({"ok": 1, "n": 1}), ok) == {"ok": 1, "n": 1}
    assert memory.run(session, 1, execute({"ok": 1, "n": 99}), ok) == {"ok": 1, "n": 1}
    assert len(runs) == 1 and memory.replayed == 1
    with pytest.raises(CommandError) as too_old:
        memory.run(session, 0, execute({"ok": 1}), ok)
    assert too_old.value.code == 225
    memory.run(session, 2, execute({"ok": 0}), ok)  # a failure is not remembered...
    memory.run(session, 2, execute({"ok": 1}), ok)  # ...so its retry runs
    assert len(runs) == 3
    for _ in range(3):
        memory.run({"id": uuid4()}, 1, execute({"ok": 1}), ok)
    assert len(memory) == 2  # bounded: the least recently used sessions go first


# --- roles -----------------------------------------------------------------------------------


def test_a_role_is_enforced_in_the_servers_shape() -> None:
    memory = MemoryServer()
    MemoryMongoClient(memory).sync_client().d.c.insert_one({"_id": 1})
    role = [{"resource": {"db": "d", "collection": "c"}, "actions": ["find"]}]
    with MemoryWireServer(memory, privileges=role) as front, connect(front) as client:
        assert client.d.c.find_one() == {"_id": 1}
        with pytest.raises(OperationFailure) as denied:
            client.d.c.insert_one({"_id": 2})
        assert denied.value.code == 13
        assert denied.value.details is not None
        assert denied.value.details["codeName"] == "Unauthorized"
        assert denied.value.details["errmsg"].startswith("not authorized on d to execute")
        with pytest.raises(OperationFailure):
            client.d.list_collection_names()  # listCollections on the database: not granted
        assert client.d.list_collection_names(authorizedCollections=True) == ["c"]
        with pytest.raises(OperationFailure):
            client.d.c.update_one({"_id": 1}, {"$set": {"a": 1}})
    assert front.denied == [("insert", "d.c", ["insert on d.c"]),
                            ("listCollections", "d.$cmd", ["listCollections on d"]),
                            ("update", "d.c", ["update on d.c"])]
    assert front.grants_used[(0, "find")] >= 1


# --- the command line ------------------------------------------------------------------------


def test_the_command_line_serves_until_stopped() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "apsched_mongo.memory_wire", "--replica-set", "rs0",
         "--fault", "lose-reply:command=insert"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        uri = process.stdout.readline().strip()
        assert uri.startswith("mongodb://127.0.0.1:") and uri.endswith("/?replicaSet=rs0")
        with MongoClient(uri, serverSelectionTimeoutMS=TIMEOUT_MS) as client:
            client.d.c.insert_one({"_id": 1})  # reply lost, retried, answered from memory
            assert client.d.c.count_documents({}) == 1
    finally:
        process.terminate()
        _, errors = process.communicate(timeout=10)
    assert process.returncode == 0, errors


def test_the_command_line_enforces_a_role_from_a_file(tmp_path: Any) -> None:
    role = tmp_path / "role.json"
    role.write_text('[{"resource": {"db": "d", "collection": "c"}, "actions": ["find"]}]')
    process = subprocess.Popen(
        [sys.executable, "-m", "apsched_mongo.memory_wire", "--privileges", str(role)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert process.stdout is not None
        with MongoClient(process.stdout.readline().strip(),
                         serverSelectionTimeoutMS=TIMEOUT_MS) as client:
            assert client.d.c.find_one() is None
            with pytest.raises(OperationFailure) as denied:
                client.d.c.insert_one({"_id": 1})
            assert denied.value.code == 13
    finally:
        process.terminate()
        process.wait(timeout=10)
    role.write_text('{"not": "a list"}')
    result = subprocess.run(
        [sys.executable, "-m", "apsched_mongo.memory_wire", "--privileges", str(role)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2 and "must hold a JSON array" in result.stderr


def test_the_command_line_names_a_bad_fault() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "apsched_mongo.memory_wire", "--fault", "explode"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "unknown fault kind 'explode'" in result.stderr


def test_the_package_never_imports_the_front_unless_asked() -> None:
    code = (
        "import sys, apsched_mongo, apsched_mongo.memory, apsched_mongo.doctor, "
        "apsched_mongo.migrate, apsched_mongo.demo, apsched_mongo.__main__\n"
        "loaded = [m for m in sys.modules if m.startswith('apsched_mongo.memory_wire')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- change streams (replica-set mode) -------------------------------------------------------


def test_change_streams_carry_events_and_resume_tokens(rs_front: MemoryWireServer) -> None:
    with connect(rs_front) as client:
        events = client.d.events
        with events.watch(max_await_time_ms=50) as stream:
            assert stream.try_next() is None
            token = stream.resume_token  # the postBatchResumeToken of an empty batch
            assert token is not None
            events.insert_one({"_id": 1})
            events.update_one({"_id": 1}, {"$set": {"n": 1}})
            first = stream.next()
            assert (first["operationType"], first["documentKey"]) == ("insert", {"_id": 1})
        with events.watch(resume_after=first["_id"], max_await_time_ms=50) as resumed:
            change = resumed.next()
            assert change["operationType"] == "update"
            assert change["updateDescription"]["updatedFields"] == {"n": 1}
    assert rs_front.open_cursors == 0  # closed streams are killed


def test_a_step_down_ends_streams_with_a_resumable_error_and_pymongo_resumes(
        rs_front: MemoryWireServer) -> None:
    failures = Failures()
    with connect(rs_front, event_listeners=[failures]) as client:
        events = client.d.events
        with events.watch(max_await_time_ms=50) as stream:
            assert stream.try_next() is None
            rs_front.step_down(0.3)  # the open stream's getMore fails; the resume waits
            events.insert_one({"_id": 1})  # for the new primary, then retries
            assert stream.next()["documentKey"] == {"_id": 1}
    labelled = [e.failure for e in failures.events if e.command_name in ("getMore", "aggregate")]
    assert labelled and all("ResumableChangeStreamError" in f["errorLabels"] for f in labelled)
