"""The examples of docs/testing.rst ("Testing your application"), run with the suite.

The page includes this file between the ``[...]`` markers, so what it shows is tested.
"""

from __future__ import annotations

# [fixture]
from collections.abc import AsyncIterator

import pytest
from apscheduler import AsyncScheduler

from apsched_mongo import MongoDBDataStore, MongoDBEventBroker
from apsched_mongo.memory import MemoryMongoClient, MemoryServer

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # PyMongo's async API, and so the fake's, runs on asyncio


@pytest.fixture(params=[False, True], ids=["standalone", "replica-set"])
def mongodb(request: pytest.FixtureRequest) -> MemoryServer:
    """A fresh in-memory MongoDB per test: standalone (the event broker polls) or the
    primary of a replica set (the event broker follows a change stream)."""
    return MemoryServer(replica_set=request.param)


@pytest.fixture
async def scheduler(mongodb: MemoryServer) -> AsyncIterator[AsyncScheduler]:
    client = MemoryMongoClient(mongodb)
    data_store = MongoDBDataStore(client, database="myapp")
    event_broker = MongoDBEventBroker(client, database="myapp")
    async with AsyncScheduler(data_store, event_broker) as scheduler:
        await scheduler.start_in_background()
        yield scheduler
# [/fixture]


# [test]
async def add(x: int, y: int) -> int:
    return x + y


async def test_jobs_run(scheduler: AsyncScheduler) -> None:
    assert await scheduler.run_job(add, args=(2, 3)) == 5
# [/test]


# [failover]
async def test_jobs_still_run_when_the_primary_steps_down(
    mongodb: MemoryServer, scheduler: AsyncScheduler
) -> None:
    if mongodb.replica_set:
        # Writes fail with NotWritablePrimary until a new primary is elected 0.2 s later;
        # the data store retries them, the event broker resumes its change stream.
        mongodb.step_down(election_after=0.2)
    assert await scheduler.run_job(add, args=(1, 1)) == 2
# [/failover]


# [watch]
async def test_a_change_stream_consumer_misses_nothing() -> None:
    server = MemoryServer(replica_set=True)
    orders = MemoryMongoClient(server)["shop"]["orders"]
    async with await orders.watch() as stream:
        await orders.insert_one({"_id": 1})
        server.interrupt_change_streams()  # the driver resumes by itself
        await orders.insert_one({"_id": 2})
        changes = [await stream.next() for _ in range(2)]
    assert [change["documentKey"]["_id"] for change in changes] == [1, 2]
# [/watch]
