"""Test aids for the event broker's test modules."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from time import monotonic
from typing import Any, cast
from uuid import uuid4

import anyio
import attrs
from apscheduler import Event, JobAdded

from apsched_mongo.datastore import MongoDBDataStore
from apsched_mongo.eventbroker import MongoDBEventBroker

#: The logger both broker test modules hand to brokers (the ``logs`` fixture watches it)
LOGGER = logging.getLogger("apsched_mongo.tests.eventbroker")
TIMEOUT = 10


class Inbox:
    """A subscriber that records events and lets tests wait for them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._arrived = anyio.Event()

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        self._arrived.set()
        self._arrived = anyio.Event()

    async def wait_for(self, count: int) -> list[Event]:
        with anyio.fail_after(TIMEOUT):
            while len(self.events) < count:
                await self._arrived.wait()
        return self.events

    async def wait_for_event(self, kind: type[Event], **fields: Any) -> Any:
        """The first event received of type ``kind`` whose ``fields`` have these values."""
        with anyio.fail_after(TIMEOUT):
            while True:
                for event in self.events:
                    if isinstance(event, kind) and all(
                        getattr(event, key) == value for key, value in fields.items()
                    ):
                        return event
                await self._arrived.wait()


class LogWatch(logging.Handler):
    """Collects the broker's log records; tests can wait for a particular one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._arrived = anyio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._arrived.set()
        self._arrived = anyio.Event()

    def messages(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno == level]

    async def wait_for(self, level: int, text: str = "", count: int = 1) -> None:
        """Until ``count`` records of ``level`` containing ``text`` arrived."""
        with anyio.fail_after(TIMEOUT):
            while sum(text in message for message in self.messages(level)) < count:
                await self._arrived.wait()


@attrs.define
class Node:
    """A started broker and what its subscriber received."""

    broker: MongoDBEventBroker
    inbox: Inbox


StartNode = Callable[..., Awaitable[Node]]


@asynccontextmanager
async def node_starter(make_client: Callable[[], Any],
                       **defaults: Any) -> AsyncIterator[StartNode]:
    """``start = node_starter(...)``; ``await start(**broker_kwargs)``: a started broker on
    a client of its own, with a subscriber recording everything it delivers."""
    async with AsyncExitStack() as stack:

        async def start(**kwargs: Any) -> Node:
            broker = MongoDBEventBroker(make_client(), **{**defaults, **kwargs})
            inbox = Inbox()
            broker.subscribe(inbox)
            await broker.start(stack, LOGGER)
            return Node(broker, inbox)

        yield start


def job_added(task_id: str = "task") -> JobAdded:
    return JobAdded(job_id=uuid4(), task_id=task_id, schedule_id=None)


async def ping_pong(a: Node, b: Node) -> tuple[list[Event], float]:
    """Three events bounced a -> b -> a -> b, each published only after the previous one
    arrived, so an echo or a repeat would arrive before the later event does. Returns what
    was sent, in order, and the first one's publish-to-delivery latency in seconds."""
    first, reply, last = job_added("first"), job_added("reply"), job_added("last")
    published = monotonic()
    await a.broker.publish(first)
    await b.inbox.wait_for(1)
    latency = monotonic() - published
    await b.broker.publish(reply)
    await a.inbox.wait_for(2)
    await a.broker.publish(last)
    await b.inbox.wait_for(3)
    return [first, reply, last], latency


class IdleSignallingStore(MongoDBDataStore):
    """Tells the test when the worker has looked for jobs and found none: from then on only
    an event can make it look again."""

    idle: anyio.Event

    async def acquire_jobs(self, *args: Any, **kwargs: Any) -> Any:
        jobs = await super().acquire_jobs(*args, **kwargs)
        if not jobs:
            self.idle.set()
        return jobs


class UnserializableValue:
    def __getstate__(self) -> Any:
        raise TypeError("this object refuses to be serialized")


def unserializable_event() -> JobAdded:
    return JobAdded(job_id=uuid4(), task_id=cast(Any, UnserializableValue()), schedule_id=None)
