"""Back ends for the behavioural suite.

Every test that takes ``backend`` runs on the in-memory fake twice, as a standalone server
(``memory``: the broker polls) and as a replica-set primary (``memory-rs``: change
streams), and also on a real server when ``APSCHED_MONGO_TEST_URI`` is set (each test then
gets a fresh database, dropped afterwards). ``--mongod`` starts a throwaway single-node
replica set from a ``mongod`` found on PATH and uses it as that real server.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any
from uuid import uuid4

import pytest
from apscheduler import Event
from apscheduler.eventbrokers.local import LocalEventBroker
from pymongo import AsyncMongoClient

from apsched_mongo import MongoDBDataStore
from apsched_mongo._client import CODEC_OPTIONS
from apsched_mongo.memory import MemoryMongoClient, MemoryServer
from tests.broker_helpers import LOGGER, LogWatch
from tests.wire import Wire

REAL_URI_ENV = "APSCHED_MONGO_TEST_URI"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--mongod", action="store_true",
                     help="start a throwaway replica set from the mongod on PATH for the "
                          "real-server tier")
    parser.addoption("--soak", action="store_true", help="also run long soak tests")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--mongod") and not os.environ.get(REAL_URI_ENV):
        from tests._mongod import start_replica_set

        os.environ[REAL_URI_ENV] = start_replica_set(config)


def backend_names() -> list[str]:
    memory = ["memory", "memory-rs"]
    return [*memory, "real"] if os.environ.get(REAL_URI_ENV) else memory


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests are long variants of drills that always run; they run only with --soak.
    Tests of what only a real server has (a query planner) run only in the real tier."""
    unwanted = set()
    if not config.getoption("--soak"):
        unwanted.add("soak")
    if not os.environ.get(REAL_URI_ENV):
        unwanted.add("real_server")
    deselected = [item for item in items
                  if any(item.get_closest_marker(name) for name in unwanted)]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Backend:
    """One database on one server; ``client()`` gives each simulated node its own client."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.database = f"apsched_test_{uuid4().hex[:12]}"
        #: The in-memory server (for its fault hooks); ``None`` for a real server
        self.server = None if name == "real" else MemoryServer(replica_set=name == "memory-rs")
        self._clients: list[Any] = []

    @property
    def is_real(self) -> bool:
        return self.name == "real"

    def client(self) -> Any:
        if self.is_real:
            client: Any = AsyncMongoClient(
                os.environ[REAL_URI_ENV], serverSelectionTimeoutMS=10_000, tz_aware=True,
                uuidRepresentation="standard",
            )
        else:
            client = MemoryMongoClient(self.server)
        self._clients.append(client)
        return client

    def store(self, **kwargs: Any) -> MongoDBDataStore:
        kwargs.setdefault("database", self.database)
        if "local_clock" in kwargs:
            # A test moving a FakeClock: re-measuring the server clock would undo the move
            kwargs.setdefault("clock_refresh_interval", float("inf"))
            if monotonic := getattr(kwargs["local_clock"], "monotonic", None):
                kwargs.setdefault("monotonic_clock", monotonic)
        return MongoDBDataStore(self.client(), **kwargs)

    def db(self) -> Any:
        """The test database as the store sees it (aware UTC datetimes, standard UUIDs)."""
        return self.client().get_database(self.database, codec_options=CODEC_OPTIONS)

    async def close(self) -> None:
        if self.is_real and self._clients:
            await self._clients[0].drop_database(self.database)
        for client in self._clients:
            await client.close()


@pytest.fixture(params=backend_names())
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    backend = Backend(request.param)
    try:
        yield backend
    finally:
        await backend.close()


class RecordingBroker(LocalEventBroker):
    """A local broker that also keeps every event published, for assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    async def publish(self, event: Event) -> None:
        self.events.append(event)
        await super().publish(event)

    def of_type(self, event_type: type[Any]) -> list[Any]:
        return [event for event in self.events if isinstance(event, event_type)]


@pytest.fixture
def logger() -> logging.Logger:
    return logging.getLogger("apsched_mongo.tests")


@pytest.fixture
async def started(backend: Backend, logger: logging.Logger) -> AsyncIterator[
    Callable[..., Any]
]:
    """Start stores on ``backend``: ``store, broker = await started(**store_kwargs)``."""
    async with AsyncExitStack() as stack:

        async def start(**kwargs: Any) -> tuple[MongoDBDataStore, RecordingBroker]:
            broker = RecordingBroker()
            await broker.start(stack, logger)
            store = backend.store(**kwargs)
            await store.start(stack, broker, logger)
            return store, broker

        yield start


@pytest.fixture
def caplog_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.WARNING)
    yield caplog


@pytest.fixture
def logs() -> Iterator[LogWatch]:
    """Watches the log records of the brokers started by the broker tests."""
    handler = LogWatch()
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG)
    yield handler
    LOGGER.removeHandler(handler)


@pytest.fixture
def wire() -> Iterator[Wire]:
    """A scripted replica-set primary (mockupdb) for wire-level tests."""
    wire = Wire(replica_set=True)
    yield wire
    wire.stop()
