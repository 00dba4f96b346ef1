"""Our MongoDBEventBroker under load: writes per job, and what batching adds to latency.

Jobs of a task without a limit are added on the first of ``nodes`` schedulers at a steady
``rate`` (jobs/s) while all run, each node with our broker on a counted client of its own.
Each broker records when ``publish()`` is called; its client records when each write starts.
An event's *added latency* is the time from its ``publish()`` call to the start of the first
write its broker sends after that: zero for a broker that inserts each event as it comes,
the batching delay for one that gathers events. (A write that began gathering just before
the call may carry the event in the next write instead, so this is a lower bound when
writes overlap.) Another node checks that it hears the first node's events, all of them and
in publish order.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import anyio
import attrs
from apscheduler import Event

from apsched_mongo.eventbroker import MongoDBEventBroker

from ..backends import OURS, Backend
from ..cluster import cluster
from ..jobs import unlimited_job


def _key(event: Event) -> Hashable | None:
    job_id = getattr(event, "job_id", None)
    return None if job_id is None else (type(event).__name__, job_id)


@attrs.define(eq=False, repr=False)
class TimedEventBroker(MongoDBEventBroker):
    """Our broker, noting when each event is handed to ``publish()`` (with its job, if any)."""

    published: list[tuple[float, Hashable | None]] = attrs.field(init=False, factory=list)

    async def publish(self, event: Event) -> None:
        self.published.append((time.perf_counter(), _key(event)))
        await super().publish(event)


class _Heard:
    """The events with a job id one node hears, in order."""

    def __init__(self) -> None:
        self.keys: list[Hashable] = []
        self._missing: set[Hashable] | None = None
        self._complete = anyio.Event()

    def add(self, event: Event) -> None:
        if (key := _key(event)) is not None:
            self.keys.append(key)
            if self._missing is not None:
                self._missing.discard(key)
                if not self._missing:
                    self._complete.set()

    async def all_of(self, keys: list[Hashable]) -> None:
        self._missing = set(keys) - set(self.keys)
        if self._missing:
            await self._complete.wait()


@dataclass
class Publishing:
    jobs: int
    seconds: float
    events: int  # handed to publish() on all nodes
    writes: int  # write commands of all brokers
    added_latency: list[float]  # seconds, one per event that was written
    unwritten: int  # events not followed by any write of their broker
    lost: int  # events of the first node another node never heard
    out_of_order: int  # ... heard after an event the first node published later

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds

    @property
    def writes_per_job(self) -> float:
        return self.writes / self.jobs


def _added_latency(published: list[float], write_starts: list[float]) -> tuple[list[float], int]:
    latencies, unwritten = [], 0
    for at in published:
        index = bisect.bisect_left(write_starts, at)
        if index == len(write_starts):
            unwritten += 1
        else:
            latencies.append(write_starts[index] - at)
    return latencies, unwritten


def _late(positions: list[int]) -> int:
    """How many of ``positions`` come after a greater one (heard out of publish order)."""
    late, highest = 0, -1
    for position in positions:
        if position < highest:
            late += 1
        highest = max(highest, position)
    return late


async def publishing(backend: Backend, nodes: int, jobs: int, rate: float,
                     hearing_timeout: float = 5.0) -> Publishing:
    async with cluster(backend, OURS, max(nodes, 2), broker="mongo",
                       broker_class=TimedEventBroker, record_writes=True) as nodes_:
        brokers: list[Any] = [node.broker for node in nodes_.nodes]
        heard = _Heard()
        nodes_.nodes[1].scheduler.subscribe(heard.add)
        await nodes_.first.configure_task(unlimited_job)
        await nodes_.start()
        releases = nodes_.watch_releases()
        await nodes_.settle()
        nodes_.reset()
        for broker in brokers:
            broker.published.clear()
        heard.keys.clear()

        started = time.perf_counter()
        for number in range(jobs):
            await anyio.sleep(max(0.0, started + number / rate - time.perf_counter()))
            await nodes_.first.add_job(unlimited_job)
        await releases.wait_for(jobs)
        seconds = time.perf_counter() - started
        await nodes_.settle()

        sent = [key for _, key in brokers[0].published if key is not None]
        with anyio.move_on_after(hearing_timeout):
            await heard.all_of(sent)
        latencies: list[float] = []
        unwritten = events = writes = 0
        for node, broker in zip(nodes_.nodes, brokers, strict=True):
            assert node.broker_counter is not None
            times = [at for at, _ in broker.published]
            added, missing = _added_latency(times, sorted(node.broker_counter.write_starts))
            latencies += added
            unwritten += missing
            events += len(times)
            writes += node.broker_counter.writes
        position = {key: number for number, key in enumerate(sent)}
        heard_positions = [position[key] for key in heard.keys if key in position]
        return Publishing(
            jobs=jobs, seconds=seconds, events=events, writes=writes,
            added_latency=latencies, unwritten=unwritten,
            lost=len(position.keys() - set(heard.keys)),
            out_of_order=_late(heard_positions),
        )
