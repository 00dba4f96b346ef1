"""A known cluster state for the dashboard tests, built through the stores' own API, and
client wrappers that count commands or simulate an outage."""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import attrs
from apscheduler import ConflictPolicy, Job, Schedule, Task
from apscheduler.triggers.interval import IntervalTrigger
from pymongo.errors import ServerSelectionTimeoutError

from tests.conftest import Backend, RecordingBroker
from tests.helpers import FakeClock

LOGGER = logging.getLogger("apsched_mongo.tests.dashboard")
LEASE = timedelta(seconds=30)


@attrs.define
class KnownCluster:
    """Three nodes on one database:

    * tasks ``limited`` (max_running_jobs=2) and ``free`` (no limit);
    * schedules ``active`` (next fire in an hour), ``paused``, ``finished`` (no next fire
      time) and ``stuck`` (due two hours ago, leased by node-3 whose lease has run out);
    * jobs queued in this order: L1 L2 L3 (limited), F1..F5 (free). node-1 runs L1 and L2
      (the task's two slots), node-2 runs F1 and F2 (L3 must wait for a slot), node-3 ran
      F3 and crashed: its lease has run out. Queued: L3, F4, F5. All jobs were created
      within one millisecond.
    """

    jobs: dict[str, Job] = attrs.field(factory=dict)
    stores: dict[str, Any] = attrs.field(factory=dict)


async def build_known_cluster(backend: Backend, stack: AsyncExitStack) -> KnownCluster:
    cluster = KnownCluster()
    # node-3's clock runs an hour behind after it started: its leases end an hour before
    # the server's now, as if it had crashed an hour ago
    node3_clock = FakeClock()
    for name, kwargs in (("node-1", {}), ("node-2", {}), ("node-3", {"local_clock": node3_clock})):
        broker = RecordingBroker()
        await broker.start(stack, LOGGER)
        store = backend.store(**kwargs)
        await store.start(stack, broker, LOGGER)
        cluster.stores[name] = store
    node3_clock.advance(-timedelta(hours=1))
    first = cluster.stores["node-1"]

    await first.add_task(Task(id="limited", func="tests.helpers:noop", job_executor="async",
                              max_running_jobs=2))
    await first.add_task(Task(id="free", func="tests.helpers:noop", job_executor="async"))
    now = datetime.now(UTC)
    for schedule in (
        Schedule(id="active", task_id="free", trigger=IntervalTrigger(minutes=5),
                 job_executor="async", next_fire_time=now + timedelta(hours=1)),
        Schedule(id="paused", task_id="free", trigger=IntervalTrigger(hours=1),
                 job_executor="async", next_fire_time=now + timedelta(minutes=30), paused=True),
        Schedule(id="finished", task_id="limited", trigger=IntervalTrigger(hours=1),
                 job_executor="async", next_fire_time=None),
        Schedule(id="stuck", task_id="limited", trigger=IntervalTrigger(hours=2),
                 job_executor="async", next_fire_time=now - timedelta(hours=2)),
    ):
        await first.add_schedule(schedule, ConflictPolicy.exception)

    # All created within one millisecond (what BSON dates hold), a microsecond apart: only
    # the queue order tells them apart
    created = now.replace(microsecond=now.microsecond // 1000 * 1000)
    for number, (name, task_id) in enumerate([
        ("L1", "limited"), ("L2", "limited"), ("L3", "limited"),
        *((f"F{n}", "free") for n in range(1, 6)),
    ]):
        job = Job(task_id=task_id, executor="async", args=(name,),
                  created_at=created + timedelta(microseconds=number))
        cluster.jobs[name] = job
        await first.add_job(job)

    assert {job.args[0] for job in await cluster.stores["node-1"].acquire_jobs(
        "node-1", LEASE, 2)} == {"L1", "L2"}
    assert {job.args[0] for job in await cluster.stores["node-2"].acquire_jobs(
        "node-2", LEASE, 2)} == {"F1", "F2"}
    assert [job.args[0] for job in await cluster.stores["node-3"].acquire_jobs(
        "node-3", LEASE, 1)] == ["F3"]
    assert [schedule.id for schedule in await cluster.stores["node-3"].acquire_schedules(
        "node-3", LEASE, 10)] == ["stuck"]
    return cluster


async def snapshot(db: Any) -> dict[str, list[Any]]:
    """Every document of the store's collections, for "nothing changed" comparisons. The
    broker's events collection is left out: the test's own nodes write their events to it
    in batches, on their own schedule."""
    names = sorted(name for name in await db.list_collection_names()
                   if name != "apsched_events")
    return {name: await db.get_collection(name).find({}, sort=[("_id", 1)]).to_list(None)
            for name in names}


class CommandLog:
    """Names of the database commands sent through a :class:`CountingClient`."""

    def __init__(self) -> None:
        self.commands: list[tuple[str, str, Any]] = []

    def add(self, collection: str, name: str, detail: Any) -> None:
        self.commands.append((collection, name, detail))

    def clear(self) -> None:
        self.commands.clear()

    def __len__(self) -> int:
        return len(self.commands)


class _Cursor:
    def __init__(self, inner: Any, log: CommandLog, collection: str, detail: Any) -> None:
        self._inner, self._log, self._collection, self._detail = inner, log, collection, detail

    async def to_list(self, length: int | None = None) -> list[Any]:
        self._log.add(self._collection, "find", self._detail)
        result: list[Any] = await self._inner.to_list(length)
        return result


class _Collection:
    def __init__(self, inner: Any, client: CountingClient) -> None:
        self._inner, self._client = inner, client

    def find(self, *args: Any, **kwargs: Any) -> Any:
        self._client.check()
        return _Cursor(self._inner.find(*args, **kwargs), self._client.log, self._inner.name,
                       {"filter": args[0] if args else kwargs.get("filter"), **kwargs})

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self._client.check()
            self._client.log.add(self._inner.name, name, args[0] if args else None)
            return await attribute(*args, **kwargs)

        return counted


class _Database:
    def __init__(self, inner: Any, client: CountingClient) -> None:
        self._inner, self._client = inner, client

    def get_collection(self, *args: Any, **kwargs: Any) -> _Collection:
        return _Collection(self._inner.get_collection(*args, **kwargs), self._client)

    async def command(self, command: Any, **kwargs: Any) -> Any:
        self._client.check()
        self._client.log.add("admin", str(command), None)
        return await self._inner.command(command, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CountingClient:
    """Wraps a client: logs every command, and fails every one while ``down`` is set, the
    way PyMongo does when no server answers."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.log = CommandLog()
        self.down = False
        self.refused = anyio.Event()  # set once a command failed for being down

    def check(self) -> None:
        if self.down:
            self.refused.set()
            raise ServerSelectionTimeoutError(
                "db.example:27017: [Errno 111] Connection refused (configured timeouts: "
                "socketTimeoutMS: 20000.0ms, connectTimeoutMS: 20000.0ms), Timeout: 5.0s, "
                "Topology Description: <TopologyDescription id: 1, topology_type: Unknown>"
            )

    def get_database(self, *args: Any, **kwargs: Any) -> _Database:
        return _Database(self._inner.get_database(*args, **kwargs), self)

    @property
    def admin(self) -> _Database:
        return _Database(self._inner.admin, self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
