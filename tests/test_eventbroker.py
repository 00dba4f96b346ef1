"""MongoDBEventBroker between nodes: on the in-memory back end (polling) and, when
``APSCHED_MONGO_TEST_URI`` is set, also on that real server (change streams on a replica
set). The ``backend`` fixture (tests/conftest.py) only generates the real case when the
variable is set."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from time import monotonic
from typing import Any, cast

import anyio
import pytest
from apscheduler import (
    AsyncScheduler,
    Event,
    JobAdded,
    RetrySettings,
    SchedulerRole,
    SerializationError,
)
from apscheduler.serializers.json import JSONSerializer
from apscheduler.triggers.date import DateTrigger
from pymongo.errors import AutoReconnect, OperationFailure
from tenacity import wait_fixed

from apsched_mongo.errors import ApschedMongoError, IndexConflictError, ServerUnreachableError
from apsched_mongo.eventbroker import MongoDBEventBroker
from apsched_mongo.memory import MemoryMongoClient
from tests.broker_helpers import (
    LOGGER,
    TIMEOUT,
    IdleSignallingStore,
    Inbox,
    LogWatch,
    StartNode,
    job_added,
    node_starter,
    ping_pong,
    unserializable_event,
)
from tests.conftest import Backend

COLLECTION = "apsched_events"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def start_node(backend: Backend) -> AsyncIterator[StartNode]:
    """``await start_node(**broker_kwargs)``: a started broker on its own client, with a
    subscriber recording everything it delivers."""
    async with node_starter(backend.client, database=backend.database,
                            poll_interval=0.02) as start:
        yield start


async def expected_mode(backend: Backend) -> str:
    """What ``mode="auto"`` must choose on this back end."""
    hello = await backend.client().admin.command("hello")
    return "change_stream" if "setName" in hello or hello.get("msg") == "isdbgrid" else "polling"


def events_collection(backend: Backend) -> Any:
    return backend.db().get_collection(COLLECTION)


async def corrupt_documents(backend: Backend) -> list[dict[str, Any]]:
    """Junk in the events collection, stamped with the server's time so that polling
    nodes look at it too."""
    now = (await backend.client().admin.command("hello"))["localTime"]
    payload = JSONSerializer().serialize(job_added().marshal())
    return [
        {"node": "x", "type": "JobAdded", "payload": b"{not json", "created_at": now},
        {"node": "x", "type": "attrs", "payload": payload, "created_at": now},  # not an event
        {"node": "x", "type": "JobAdded", "payload": "text, not binary", "created_at": now},
        {"greeting": "somebody else's document", "created_at": now},
    ]


# --- between nodes ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_event_reaches_the_other_node_once_and_never_echoes(
    backend: Backend, start_node: StartNode
) -> None:
    a, b = await start_node(), await start_node()
    assert a.broker.active_mode == b.broker.active_mode == await expected_mode(backend)

    sent, latency = await ping_pong(a, b)
    assert a.inbox.events == sent
    assert b.inbox.events == sent
    print(f"\n[{backend.name}, {a.broker.active_mode}] publish -> remote delivery: "
          f"{latency * 1000:.1f} ms")


@pytest.mark.anyio
async def test_corrupt_and_foreign_documents_are_skipped(
    backend: Backend, start_node: StartNode, logs: LogWatch
) -> None:
    a, b = await start_node(), await start_node()
    junk = await corrupt_documents(backend)
    await events_collection(backend).insert_many(junk)
    # Events published after the junk: each node must carry on past it to receive them
    await a.broker.publish(first := job_added("first"))
    assert await b.inbox.wait_for(1) == [first]
    await b.broker.publish(second := job_added("second"))
    assert await a.inbox.wait_for(2) == [first, second]
    skipped = [m for m in logs.messages(logging.WARNING) if "foreign or corrupt" in m]
    assert len(skipped) == 2 * len(junk)  # each document, once, on each node


@pytest.mark.anyio
async def test_unserializable_event_raises_and_inserts_nothing(
    backend: Backend, start_node: StartNode
) -> None:
    a = await start_node()
    with pytest.raises(SerializationError):
        await a.broker.publish(unserializable_event())
    assert await events_collection(backend).count_documents({}) == 0
    await a.broker.publish(event := job_added())
    assert await a.inbox.wait_for(1) == [event]


@pytest.mark.anyio
async def test_ttl_index_is_created_idempotently_and_conflicts_are_refused(
    backend: Backend, start_node: StartNode
) -> None:
    await start_node(retention=timedelta(minutes=5))
    await start_node(retention=timedelta(minutes=5))  # same index again: fine
    indexes = await events_collection(backend).index_information()
    ttl = [info for info in indexes.values() if list(info["key"]) == [("created_at", 1)]]
    assert len(ttl) == 1
    assert ttl[0]["expireAfterSeconds"] == 300
    with pytest.raises(IndexConflictError, match="apsched_ttl"):
        await start_node(retention=timedelta(minutes=1))


@pytest.mark.anyio
async def test_a_stopped_broker_can_be_started_again(
    backend: Backend, start_node: StartNode
) -> None:
    other = await start_node()
    broker = MongoDBEventBroker(backend.client(), database=backend.database, poll_interval=0.02)
    inbox = Inbox()
    broker.subscribe(inbox)
    for round_ in range(2):
        async with AsyncExitStack() as stack:
            await broker.start(stack, LOGGER)
            await other.broker.publish(job_added(f"round {round_}"))
            await inbox.wait_for(round_ + 1)
    assert [cast(JobAdded, event).task_id for event in inbox.events] == ["round 0", "round 1"]


# --- polling --------------------------------------------------------------------------------


class GatedCollection:
    """Holds one node's inserts back: the document is stamped (``_id``, ``created_at``)
    but becomes visible only when the test says so, like a slow concurrent write."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.stamped = anyio.Event()
        self.release = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def insert_one(self, document: Any, **kwargs: Any) -> Any:
        self.stamped.set()
        await self.release.wait()
        return await self._inner.insert_one(document, **kwargs)


@pytest.mark.anyio
async def test_polling_delivers_an_event_that_becomes_visible_out_of_order(
    backend: Backend, start_node: StartNode
) -> None:
    """A poll asking for "everything after the last _id seen" fails here: the late event's
    _id (and created_at) sort before those of an event the reader has already had."""
    slow, fast, reader = await start_node(), await start_node(), await start_node(mode="polling")
    gate = GatedCollection(slow.broker._collection)
    slow.broker._collection = gate
    late, early, sentinel = job_added("late"), job_added("early"), job_added("sentinel")

    async with anyio.create_task_group() as tg:
        tg.start_soon(slow.broker.publish, late)
        with anyio.fail_after(TIMEOUT):
            await gate.stamped.wait()
        await fast.broker.publish(early)  # stamped after "late", but visible first
        assert await reader.inbox.wait_for(1) == [early]
        gate.release.set()
    assert await reader.inbox.wait_for(2) == [early, late]
    await fast.broker.publish(sentinel)
    assert await reader.inbox.wait_for(3) == [early, late, sentinel]  # no repeats

    # The premise: "late" sorts before "early" by _id and by created_at
    documents = await events_collection(backend).find({}).to_list(None)
    by_task = {JSONSerializer().deserialize(d["events"][0]["payload"])["task_id"]: d
               for d in documents}
    assert by_task["late"]["_id"] < by_task["early"]["_id"]
    assert by_task["late"]["created_at"] <= by_task["early"]["created_at"]


@pytest.mark.anyio
async def test_polling_is_immune_to_node_clock_skew(start_node: StartNode) -> None:
    """Events are stamped with the server's time, so nodes whose clocks are an hour behind
    or ahead are still heard; stamped with their own clocks, their events would fall
    outside the other nodes' lookback window."""
    behind = await start_node(local_clock=lambda: datetime.now(UTC) - timedelta(hours=1))
    ahead = await start_node(local_clock=lambda: datetime.now(UTC) + timedelta(hours=1))
    reader = await start_node(mode="polling")
    await behind.broker.publish(first := job_added("from behind"))
    assert await reader.inbox.wait_for(1) == [first]
    assert await ahead.inbox.wait_for(1) == [first]
    await ahead.broker.publish(second := job_added("from ahead"))
    assert await reader.inbox.wait_for(2) == [first, second]
    assert await behind.inbox.wait_for(2) == [first, second]


@pytest.mark.anyio
async def test_a_new_node_does_not_replay_earlier_events(start_node: StartNode) -> None:
    a = await start_node()
    await a.broker.publish(job_added("before"))
    await a.broker.flush()  # stored before the late joiner starts
    late_joiner = await start_node(mode="polling")
    await a.broker.publish(after := job_added("after"))
    assert await late_joiner.inbox.wait_for(1) == [after]


class FailingFinds:
    """Makes the next queries fail with the given errors, as a flaky or locked-down
    server would."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.errors: list[Exception] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def find(self, *args: Any, **kwargs: Any) -> Any:
        if not self.errors:
            return self._inner.find(*args, **kwargs)
        error = self.errors.pop(0)

        class FailingCursor:
            async def to_list(self, length: int | None = None) -> list[Any]:
                raise error

        return FailingCursor()


@pytest.mark.anyio
async def test_polling_survives_temporary_errors_and_stops_on_others(
    start_node: StartNode, logs: LogWatch
) -> None:
    fast_retries = RetrySettings(wait=wait_fixed(0.01))
    writer = await start_node()
    reader = await start_node(mode="polling", retry_settings=fast_retries)
    queries = FailingFinds(reader.broker._collection)
    reader.broker._collection = queries

    queries.errors = [AutoReconnect("connection reset"), AutoReconnect("connection reset")]
    await writer.broker.publish(event := job_added())
    assert await reader.inbox.wait_for(1) == [event]
    assert len([m for m in logs.messages(logging.WARNING) if "poll failed" in m]) == 2

    queries.errors = [OperationFailure("not authorized", code=13)]
    await logs.wait_for(logging.ERROR, "stopped polling")
    await anyio.wait_all_tasks_blocked()
    assert listener_tasks(reader.broker) == []
    assert listener_tasks(writer.broker) != []


def listener_tasks(broker: MongoDBEventBroker) -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks()
            if broker._node_id in task.get_name() and "listener" in task.get_name()]


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_forced_change_streams_fail_at_start_on_a_standalone_server() -> None:
    broker = MongoDBEventBroker(MemoryMongoClient(), mode="change_stream")
    async with AsyncExitStack() as stack:
        with pytest.raises(ApschedMongoError, match="change streams"):
            await broker.start(stack, LOGGER)


@pytest.mark.anyio
async def test_unreachable_server_fails_fast_and_by_name() -> None:
    broker = MongoDBEventBroker("mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=200")
    async with AsyncExitStack() as stack:
        with pytest.raises(ServerUnreachableError, match=r"127\.0\.0\.1:9"):
            await broker.start(stack, LOGGER)


def test_repr_and_errors_never_show_the_password() -> None:
    broker = MongoDBEventBroker("mongodb://alice:s3cret@db.example:27017/")
    assert "s3cret" not in repr(broker)
    assert "alice:***@db.example" in repr(broker)
    with pytest.raises(ValueError) as info:
        MongoDBEventBroker("mongodb://alice:s3cret@db.example:notaport/")
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "sometimes"},
        {"retention": timedelta(seconds=5)},  # not longer than the default lookback
        {"poll_interval": 0},
        {"collection": ""},
        {"database": "a.b"},
    ],
)
def test_bad_settings_fail_at_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        MongoDBEventBroker(MemoryMongoClient(), **kwargs)


# --- two schedulers ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_schedule_added_on_one_node_wakes_a_worker_on_another(backend: Backend) -> None:
    """Node B is a pure worker: it has no timer at all and sleeps until an event says a job
    was added. Node A only schedules. So B running the job proves the broker woke it."""
    ran = anyio.Event()
    job_started: list[float] = []

    async def job() -> None:
        job_started.append(monotonic())
        ran.set()

    store_b = IdleSignallingStore(backend.client(), database=backend.database)
    store_b.idle = anyio.Event()
    broker_a, broker_b = (
        MongoDBEventBroker(backend.client(), database=backend.database, poll_interval=0.05)
        for _ in range(2)
    )
    woken_by: list[Event] = []
    broker_b.subscribe(woken_by.append, {JobAdded})
    async with AsyncExitStack() as stack:
        node_a = await stack.enter_async_context(AsyncScheduler(
            backend.store(), broker_a, role=SchedulerRole.scheduler, identity="node-a"
        ))
        node_b = await stack.enter_async_context(AsyncScheduler(
            store_b, broker_b, role=SchedulerRole.worker, identity="node-b"
        ))
        for node in (node_a, node_b):
            await node.configure_task("ping", func=job, job_executor="async")
        await node_b.start_in_background()
        await node_a.start_in_background()
        with anyio.fail_after(TIMEOUT):
            await store_b.idle.wait()

            added = monotonic()
            await node_a.add_schedule("ping", DateTrigger(datetime.now(UTC)))
            await ran.wait()

    assert [cast(JobAdded, event).task_id for event in woken_by] == ["ping"]
    latency = job_started[0] - added
    print(f"\n[{backend.name}, {broker_b.active_mode}] add_schedule on A -> job start on B: "
          f"{latency * 1000:.1f} ms")
    assert latency < 5


@pytest.mark.anyio
async def test_a_steady_stream_of_events_is_sent_within_publish_delay(
    backend: Backend, start_node: StartNode
) -> None:
    """Events published one after another keep waking the sender: each document still
    goes out within publish_delay of its first event, not when the stream stops."""
    writer = await start_node(publish_delay=0.005)
    reader = await start_node()
    await writer.broker.publish(job_added("warm-up"))  # the first write's connection
    await writer.broker.flush()
    assert await reader.inbox.wait_for(1)
    await events_collection(backend).delete_many({})
    reader.inbox.events.clear()
    started = monotonic()
    for n in range(100):
        await writer.broker.publish(job_added(str(n)))
        sum(range(20_000))  # the workload between events: a little work, no sleep
        await anyio.lowlevel.checkpoint()
    elapsed = monotonic() - started
    assert elapsed > 0.03  # long enough for several documents
    await writer.broker.flush()
    documents = await events_collection(backend).find({}).to_list(None)
    assert sum(len(d["events"]) for d in documents) == 100
    # Not one document at the end: several while the stream went on (the writes themselves
    # take time too, so fewer than elapsed / publish_delay)
    assert len(documents) >= 5, (len(documents), elapsed)
    assert len(await reader.inbox.wait_for(100)) == 100
