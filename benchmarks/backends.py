"""Where the benchmarks keep their data, and the stores and brokers that use it.

One :class:`Backend` per run: the in-memory server (``apsched_mongo.memory``, shared by every
client of the run, like several processes connected to one server) or a real server
(``--uri``). Each scenario takes a fresh database on it. Both stores are made here, on the
same data: ours, and APScheduler's built-in ``MongoDBDataStore`` (in memory through
``MemoryMongoClient.sync_client()``). Every store and broker gets a client of its own with
its own :class:`~benchmarks.counting.CommandCounter`, so counts split by node and by role.
"""

from __future__ import annotations

import threading
from contextlib import AsyncExitStack, suppress
from logging import Logger
from typing import Any
from uuid import uuid4

import attrs
from apscheduler import Event
from apscheduler.abc import DataStore, EventBroker
from apscheduler.datastores.mongodb import MongoDBDataStore as BuiltinMongoDBDataStore
from apscheduler.eventbrokers.local import LocalEventBroker
from pymongo import AsyncMongoClient, MongoClient

from apsched_mongo import MongoDBDataStore
from apsched_mongo.eventbroker import MongoDBEventBroker
from apsched_mongo.memory import MemoryMongoClient, MemoryServer

from .counting import CommandCounter, CommandListener, CountingSyncClient, counting_async_client

OURS, BUILTIN = "ours", "builtin"
KINDS = (OURS, BUILTIN)


class Backend:
    """One server for a whole run: in memory, or the real one at ``uri``.

    :param round_trip: in memory, seconds of simulated network round trip per command
        (``--rtt-ms``), the same for both stores
    """

    def __init__(self, uri: str | None = None, round_trip: float = 0.0) -> None:
        self.uri = uri
        self.round_trip = 0.0 if uri else round_trip
        self.server = MemoryServer()
        # The built-in store's worker threads and our event loop must not use mongomock-ng
        # at the same time: take the lock the in-memory client takes
        self._lock = getattr(self.server, "lock", None) or threading.RLock()
        self._sync_clients: list[Any] = []
        self._async_clients: list[Any] = []
        self._databases: list[str] = []

    @property
    def description(self) -> str:
        if self.uri:
            return "a real server (--uri)"
        if self.round_trip:
            return (f"the in-memory back end with a simulated {self.round_trip * 1000:g} ms "
                    "round trip per command")
        return "the in-memory back end"

    def counter(self, extra_round_trip: float = 0.0, record_writes: bool = False
                ) -> CommandCounter:
        """A counter for one client; ``extra_round_trip`` is added to the run's, in memory."""
        round_trip = 0.0 if self.uri else self.round_trip + extra_round_trip
        return CommandCounter(round_trip, record_writes=record_writes)

    def new_database(self) -> str:
        name = f"apsched_bench_{uuid4().hex[:10]}"
        self._databases.append(name)
        return name

    def store(self, kind: str, database: str, counter: CommandCounter) -> DataStore:
        """A data store of ``kind`` (:data:`OURS` or :data:`BUILTIN`) on ``database``."""
        if kind == OURS:
            return MongoDBDataStore(self.async_client(counter), database=database)
        if self.uri:
            client: Any = MongoClient(self.uri, event_listeners=[CommandListener(counter)])
            self._sync_clients.append(client)
        else:
            client = CountingSyncClient(MemoryMongoClient(self.server).sync_client(),
                                        self._lock, counter)
        # The built-in store's attrs validator insists on instance_of((MongoClient, str)); a
        # counting wrapper around mongomock-ng is neither, but provides every method the store
        # calls, so it is constructed with validators disabled (and nothing else bypassed).
        with attrs.validators.disabled():
            return BuiltinMongoDBDataStore(client, database=database)

    def event_broker(self, database: str, counter: CommandCounter,
                     broker_class: type[MongoDBEventBroker] = MongoDBEventBroker,
                     **options: Any) -> MongoDBEventBroker:
        """Our MongoDBEventBroker on ``database``, with a counted client of its own."""
        return broker_class(self.async_client(counter), database=database, **options)

    def async_client(self, counter: CommandCounter) -> Any:
        if self.uri:
            client: Any = AsyncMongoClient(self.uri, event_listeners=[CommandListener(counter)],
                                           tz_aware=True, uuidRepresentation="standard")
            self._async_clients.append(client)
            return client
        return counting_async_client(MemoryMongoClient(self.server), counter)

    async def close(self) -> None:
        if self.uri:
            client: AsyncMongoClient[Any]
            async with AsyncMongoClient(self.uri) as client:
                for name in self._databases:
                    await client.drop_database(name)
        else:
            plain = MemoryMongoClient(self.server)
            for name in self._databases:
                await plain.drop_database(name)
        for async_client in self._async_clients:
            await async_client.close()
        for sync_client in self._sync_clients:
            sync_client.close()
        self._databases.clear()


class FanOutBus:
    """Every event published on any node reaches every node at once, as change streams would
    deliver it: the broker for measuring stores, apart from how events travel."""

    def __init__(self) -> None:
        self.brokers: list[LocalEventBroker] = []

    def broker(self) -> EventBroker:
        bus = self

        class NodeBroker(LocalEventBroker):
            #: it does deliver the other nodes' events, which apsched-mongo's store relies on
            carries_remote_events = True

            async def publish(self, event: Event) -> None:
                for broker in list(bus.brokers):
                    with suppress(RuntimeError):  # that node has already shut down
                        await broker.publish_local(event)

        broker = NodeBroker()
        self.brokers.append(broker)
        return broker


class SharedLocalBroker(LocalEventBroker):
    """One LocalEventBroker for several schedulers in this process: started once by its
    owner, so each scheduler's ``start`` (and its exit) leaves it alone. (Used by the fault
    drills in tests/test_drills.py, imported from :mod:`benchmarks.run`.)"""

    carries_remote_events = True  # every node hears every other node's events

    async def start_shared(self, exit_stack: AsyncExitStack, logger: Logger) -> None:
        await super().start(exit_stack, logger)

    async def start(self, exit_stack: AsyncExitStack, logger: Logger) -> None:
        pass

