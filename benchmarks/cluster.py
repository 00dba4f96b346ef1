"""Several AsyncSchedulers on one database, each with its own counted store and broker."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

import anyio
from apscheduler import AsyncScheduler, Event, JobReleased
from apscheduler.abc import EventBroker

from apsched_mongo.eventbroker import MongoDBEventBroker

from .backends import Backend, FanOutBus
from .counting import CommandCounter, time_in_round_trips, total

#: ``"fanout"``: every node hears each event at once (:class:`~benchmarks.backends.FanOutBus`);
#: ``"mongo"``: each node has our MongoDBEventBroker with a counted client of its own
BrokerKind = Literal["fanout", "mongo"]
#: ``cleanup_interval=None`` (documented: no automatic clean-up) is missing from the hints
NO_CLEANUP: Any = None


@dataclass
class Node:
    scheduler: AsyncScheduler
    broker: EventBroker
    store_counter: CommandCounter
    broker_counter: CommandCounter | None = None


@dataclass
class Cluster:
    nodes: list[Node] = field(default_factory=list)

    @property
    def first(self) -> AsyncScheduler:
        return self.nodes[0].scheduler

    def store_commands(self) -> Counter[str]:
        return total([node.store_counter for node in self.nodes])

    def store_round_trip_seconds(self) -> float:
        """Seconds spent in simulated store round trips, overlapping ones counted once."""
        return time_in_round_trips([node.store_counter for node in self.nodes])

    def broker_commands(self) -> Counter[str]:
        return total([node.broker_counter for node in self.nodes if node.broker_counter])

    def reset(self) -> None:
        for node in self.nodes:
            node.store_counter.reset()
            if node.broker_counter:
                node.broker_counter.reset()

    async def start(self) -> None:
        for node in self.nodes:
            await node.scheduler.start_in_background()

    async def settle(self, quiet: float = 0.05, at_most: float = 2.0) -> None:
        """Wait until the stores have sent no command for ``quiet`` seconds: the work set off
        by the last event is done (brokers that poll are never quiet, so they are ignored)."""
        deadline = time.perf_counter() + at_most
        last = -1
        while time.perf_counter() < deadline:
            now = sum(self.store_commands().values())
            if now == last:
                return
            last = now
            await anyio.sleep(quiet)

    def watch_releases(self) -> Releases:
        """Count each job released on any node, once."""
        releases = Releases()
        for node in self.nodes:
            node.scheduler.subscribe(releases.seen, {JobReleased})
        return releases


class Releases:
    """The ids of the jobs released so far, and a way to wait for a number of them."""

    def __init__(self) -> None:
        self.job_ids: set[UUID] = set()
        self._wanted = 0
        self._enough = anyio.Event()

    def seen(self, event: Event) -> None:
        assert isinstance(event, JobReleased)
        self.job_ids.add(event.job_id)
        if self._wanted and len(self.job_ids) >= self._wanted:
            self._enough.set()

    async def wait_for(self, count: int) -> None:
        self._wanted = count
        if len(self.job_ids) < count:
            await self._enough.wait()


@asynccontextmanager
async def cluster(
    backend: Backend, kind: str, nodes: int, database: str | None = None, *,
    broker: BrokerKind = "fanout", extra_round_trip: float = 0.0,
    broker_class: type[MongoDBEventBroker] = MongoDBEventBroker,
    broker_options: dict[str, Any] | None = None, record_writes: bool = False,
    names: Iterable[str] | None = None,
) -> AsyncIterator[Cluster]:
    """``nodes`` schedulers with stores of ``kind`` on one database, initialised but not yet
    started (see :meth:`Cluster.start`); stopped on exit. ``extra_round_trip`` seconds are
    added to the run's simulated round trip (in memory)."""
    database = database or backend.new_database()
    bus = FanOutBus()
    identities = list(names) if names else [f"{kind}-{i}" for i in range(nodes)]
    result = Cluster()
    async with AsyncExitStack() as stack:
        for identity in identities[:nodes]:
            store_counter = backend.counter(extra_round_trip)
            broker_counter = None
            if broker == "mongo":
                broker_counter = backend.counter(extra_round_trip, record_writes)
                node_broker: EventBroker = backend.event_broker(
                    database, broker_counter, broker_class, **(broker_options or {}))
            else:
                node_broker = bus.broker()
            scheduler = AsyncScheduler(backend.store(kind, database, store_counter), node_broker,
                                       identity=identity, cleanup_interval=NO_CLEANUP)
            await stack.enter_async_context(scheduler)
            result.nodes.append(Node(scheduler, node_broker, store_counter, broker_counter))
        try:
            yield result
        finally:
            for node in result.nodes:
                await node.scheduler.stop()
