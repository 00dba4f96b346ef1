"""MongoDBEventBroker on a replica-set MemoryServer: its change-stream mode, end to end.

Only the broker's public behaviour is used: events published on one node's broker arrive
at the subscribers of another's. Faults come from the server's hooks, as the scripted
transcripts of tests/test_eventbroker_wire.py come from a server: an interrupted stream,
a step-down and election, a dropped events collection (invalidate) and a lost history.
Every broker polls only once an hour, so any event that arrives came by change stream.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from time import monotonic
from typing import Any, cast

import anyio
import pytest
from apscheduler import (
    AsyncScheduler,
    JobAdded,
    RetrySettings,
    Scheduler,
    SchedulerRole,
)
from apscheduler.triggers.date import DateTrigger
from tenacity import wait_fixed

from apsched_mongo import MongoDBDataStore
from apsched_mongo.eventbroker import MongoDBEventBroker
from apsched_mongo.memory import MemoryMongoClient, MemoryServer
from tests.broker_helpers import (
    TIMEOUT,
    IdleSignallingStore,
    LogWatch,
    Node,
    StartNode,
    job_added,
    node_starter,
    ping_pong,
)

pytestmark = pytest.mark.anyio

DATABASE = "apscheduler"
HOURLY = 3600  # poll_interval: far longer than any test
FAST_RETRIES = RetrySettings(wait=wait_fixed(0.01))


@pytest.fixture
def server() -> MemoryServer:
    return MemoryServer(replica_set=True)


@pytest.fixture
async def start_node(server: MemoryServer) -> AsyncIterator[StartNode]:
    """``await start_node()``: a started broker on its own client of ``server``, in
    change-stream mode, with a subscriber recording what it delivers."""
    async with node_starter(lambda: MemoryMongoClient(server), database=DATABASE,
                            poll_interval=HOURLY, retry_settings=FAST_RETRIES) as start:

        async def start_streaming(**kwargs: Any) -> Node:
            node = await start(**kwargs)
            assert node.broker.active_mode == "change_stream"
            return node

        yield start_streaming


# --- delivery ---------------------------------------------------------------------------------


async def test_events_travel_by_change_stream_both_ways_once(start_node: StartNode) -> None:
    a, b = await start_node(), await start_node()
    sent, latency = await ping_pong(a, b)
    assert b.inbox.events == sent
    assert a.inbox.events == sent  # its own once, and no echo
    assert latency < 0.5
    print(f"\n[memory-rs, change_stream] publish -> remote delivery: {latency * 1000:.1f} ms")


async def test_events_of_several_nodes_arrive_once_in_commit_order(
    start_node: StartNode,
) -> None:
    writers = [await start_node() for _ in range(2)]
    readers = [await start_node() for _ in range(2)]
    per_writer = 20

    async def publish_all(number: int, node: Node) -> None:
        for seq in range(per_writer):
            await node.broker.publish(job_added(f"{number}-{seq}"))

    async with anyio.create_task_group() as tg:
        for number, node in enumerate(writers):
            tg.start_soon(publish_all, number, node)
    received = [await reader.inbox.wait_for(2 * per_writer) for reader in readers]
    assert received[0] == received[1]  # one commit order for every node
    task_ids = [cast(JobAdded, event).task_id for event in received[0]]
    assert len(task_ids) == len(set(task_ids)) == 2 * per_writer
    for number in range(2):
        assert [t for t in task_ids if t.startswith(f"{number}-")] == [
            f"{number}-{seq}" for seq in range(per_writer)]


# --- the "done when": only the change stream can wake the worker ---------------------


async def test_a_schedule_added_on_node_a_starts_on_node_b_within_half_a_second(
    server: MemoryServer,
) -> None:
    """Both nodes on one MemoryServer(replica_set=True), brokers polling once an hour. B is
    a pure worker (no timer of its own), A only schedules: B starting the job within 0.5 s
    means the change stream woke it."""
    ran = anyio.Event()
    started_at: list[float] = []

    async def job() -> None:
        started_at.append(monotonic())
        ran.set()

    store_b = IdleSignallingStore(MemoryMongoClient(server), database=DATABASE)
    store_b.idle = anyio.Event()
    broker_a, broker_b = (
        MongoDBEventBroker(MemoryMongoClient(server), database=DATABASE, poll_interval=HOURLY)
        for _ in range(2)
    )
    async with AsyncExitStack() as stack:
        node_a = await stack.enter_async_context(AsyncScheduler(
            MongoDBDataStore(MemoryMongoClient(server), database=DATABASE), broker_a,
            role=SchedulerRole.scheduler, identity="node-a",
        ))
        node_b = await stack.enter_async_context(AsyncScheduler(
            store_b, broker_b, role=SchedulerRole.worker, identity="node-b",
        ))
        for node in (node_a, node_b):
            await node.configure_task("ping", func=job, job_executor="async")
        await node_b.start_in_background()
        await node_a.start_in_background()
        assert broker_a.active_mode == broker_b.active_mode == "change_stream"
        with anyio.fail_after(TIMEOUT):
            await store_b.idle.wait()
            added = monotonic()
            await node_a.add_schedule("ping", DateTrigger(datetime.now(UTC)))
            await ran.wait()

    latency = started_at[0] - added
    print(f"\n[memory-rs] add_schedule on A -> job start on B: {latency * 1000:.1f} ms")
    assert latency < 0.5


def test_sync_schedulers_each_on_its_own_event_loop_wake_each_other(
    server: MemoryServer,
) -> None:
    """APScheduler's sync Scheduler runs an event loop in a thread of its own: a write from
    one loop must wake a change stream waiting in another."""
    ran = threading.Event()

    def job() -> None:
        ran.set()

    def node(role: SchedulerRole, identity: str) -> Scheduler:
        client = MemoryMongoClient(server)
        return Scheduler(
            MongoDBDataStore(client, database=DATABASE),
            MongoDBEventBroker(client, database=DATABASE, poll_interval=HOURLY),
            role=role, identity=identity,
        )

    with node(SchedulerRole.worker, "b") as worker, node(SchedulerRole.scheduler, "a") as chief:
        for scheduler in (worker, chief):
            scheduler.configure_task("ping", func=job)
        worker.start_in_background()
        chief.start_in_background()
        added = monotonic()
        chief.add_schedule("ping", DateTrigger(datetime.now(UTC)))
        assert ran.wait(TIMEOUT)
        latency = monotonic() - added
    assert latency < 1.0


# --- faults -----------------------------------------------------------------------------------


async def test_an_interrupted_stream_resumes_without_loss_or_repeat(
    server: MemoryServer, start_node: StartNode
) -> None:
    a, b = await start_node(), await start_node()
    await a.broker.publish(first := job_added("first"))
    await b.inbox.wait_for(1)
    assert server.interrupt_change_streams() == 2  # both nodes' streams
    await a.broker.publish(second := job_added("second"))
    await b.inbox.wait_for(2)  # (a node's own events are delivered to it at once)
    await b.broker.publish(third := job_added("third"))
    assert await a.inbox.wait_for(3) == [first, second, third]
    assert b.inbox.events == [first, second, third]


async def test_a_step_down_and_election_lose_and_repeat_nothing(
    server: MemoryServer, start_node: StartNode, logs: LogWatch
) -> None:
    """The interruption reaches the brokers (their driver's own resume finds no primary):
    each reopens after its last token once a primary is elected. A publish made during the
    election is retried by the publisher until then."""
    a, b = await start_node(), await start_node()
    await a.broker.publish(first := job_added("first"))
    await b.inbox.wait_for(1)
    server.step_down(election_after=None)
    await logs.wait_for(logging.WARNING)  # the interruption reached a broker
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.broker.publish, second := job_added("second"))
        await anyio.wait_all_tasks_blocked()
        server.elect()
    await b.inbox.wait_for(2)
    await b.broker.publish(third := job_added("third"))
    assert await a.inbox.wait_for(3) == [first, second, third]
    assert b.inbox.events == [first, second, third]


async def test_a_dropped_events_collection_invalidates_and_delivery_goes_on(
    server: MemoryServer, start_node: StartNode, logs: LogWatch
) -> None:
    a, b = await start_node(), await start_node()
    await a.broker.publish(first := job_added("first"))
    await b.inbox.wait_for(1)
    events = MemoryMongoClient(server)[DATABASE]["apsched_events"]
    await events.drop()
    await logs.wait_for(logging.WARNING, count=2)  # each node reports the invalidate
    await a.broker.publish(second := job_added("second"))
    await b.inbox.wait_for(2)  # (a node's own events are delivered to it at once)
    await b.broker.publish(third := job_added("third"))
    assert await a.inbox.wait_for(3) == [first, second, third]
    assert b.inbox.events == [first, second, third]
    indexes = await events.index_information()
    assert any("expireAfterSeconds" in index for index in indexes.values())  # re-created


async def test_a_lost_history_is_reported_and_listening_restarts_from_now(
    server: MemoryServer, start_node: StartNode, logs: LogWatch
) -> None:
    a, b = await start_node(), await start_node()
    await a.broker.publish(first := job_added("first"))
    await b.inbox.wait_for(1)
    server.drop_change_history()
    await logs.wait_for(logging.ERROR, count=2)  # each node says events may have been missed
    await anyio.wait_all_tasks_blocked()  # both listening again, from now
    await a.broker.publish(second := job_added("second"))
    assert await b.inbox.wait_for(2) == [first, second]
