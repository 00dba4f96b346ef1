"""Benchmarks: apsched-mongo's MongoDBDataStore against APScheduler's built-in one.

Both stores run in this one process on the same back end (the in-memory fake by default,
a real server with ``--uri``), each in its own database, and every figure is reported as
ours / built-in:

* MongoDB commands per job life cycle (add -> acquire -> release) at batch sizes 1, 10, 100,
  and per schedule fire (acquire -> job added -> release with the next fire time);
* end-to-end jobs/s through ``AsyncScheduler`` with 1 and 4 schedulers sharing a database;
* wake-up latency: a schedule added on node A until its job starts on node B, with our
  MongoDBEventBroker against the LocalEventBroker (B then only notices on its own timer).

Usage (from the repository root)::

    python -m benchmarks [--quick] [--json FILE] [--uri mongodb://...]
    python benchmarks/run.py ...
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

if __package__ in (None, ""):  # run as ``python benchmarks/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import attrs
from apscheduler import (
    AsyncScheduler,
    ConflictPolicy,
    Job,
    JobOutcome,
    JobResult,
    Schedule,
    ScheduleResult,
    Task,
    task,
)
from apscheduler.abc import DataStore, EventBroker
from apscheduler.datastores.mongodb import MongoDBDataStore as BuiltinMongoDBDataStore
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pymongo import AsyncMongoClient, MongoClient, monitoring

from apsched_mongo import MongoDBDataStore
from apsched_mongo.memory import MemoryMongoClient, MemoryServer

try:
    from apsched_mongo.eventbroker import MongoDBEventBroker
except ImportError:  # pragma: no cover - the broker is optional for these benchmarks
    MongoDBEventBroker = None  # type: ignore[assignment,misc]

OURS, BUILTIN = "ours", "builtin"
KINDS = (OURS, BUILTIN)
LEASE = timedelta(seconds=60)
TASK_ID = "bench"
#: ``cleanup_interval=None`` (documented: no automatic clean-up) is missing from the hints
NO_CLEANUP: Any = None
log = logging.getLogger("benchmarks")

# --- counting MongoDB commands ------------------------------------------------------------

#: Awaited collection methods that are one round trip each (find is counted per to_list)
ASYNC_OPS = frozenset({
    "find_one", "count_documents", "estimated_document_count", "distinct", "aggregate",
    "index_information", "insert_one", "insert_many", "update_one", "update_many",
    "replace_one", "find_one_and_update", "find_one_and_replace", "find_one_and_delete",
    "delete_one", "delete_many", "bulk_write", "create_indexes", "create_index",
    "drop_index", "drop",
})
SYNC_OPS = ASYNC_OPS | {"create_index"}


class CommandCounter:
    """Counts MongoDB commands by name; thread-safe (the built-in store uses threads)."""

    def __init__(self) -> None:
        self.by_name: Counter[str] = Counter()
        self._lock = threading.Lock()

    def hit(self, name: str) -> None:
        with self._lock:
            self.by_name[name] += 1

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    def reset(self) -> None:
        with self._lock:
            self.by_name.clear()


class _CommandListener(monitoring.CommandListener):
    """PyMongo command monitoring, for a real server."""

    def __init__(self, counter: CommandCounter) -> None:
        self.counter = counter

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.counter.hit(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


#: Simulated network round trip per command on the in-memory back end (``--rtt-ms``), in
#: seconds: the same for both stores, spent without blocking (ours awaits, the built-in's
#: worker thread sleeps), so figures reflect how many round trips each store makes.
SIMULATED_RTT = 0.0


async def _async_round_trip() -> None:
    if SIMULATED_RTT:
        await anyio.sleep(SIMULATED_RTT)


def _sync_round_trip() -> None:
    if SIMULATED_RTT:
        time.sleep(SIMULATED_RTT)


class _CountingAsyncCursor:
    """Counts one command per ``to_list`` (a whole result in one batch) or iteration."""

    def __init__(self, cursor: Any, counter: CommandCounter, name: str) -> None:
        self._cursor, self._counter, self._name = cursor, counter, name

    def sort(self, *args: Any, **kwargs: Any) -> _CountingAsyncCursor:
        self._cursor = self._cursor.sort(*args, **kwargs)
        return self

    def limit(self, limit: int) -> _CountingAsyncCursor:
        self._cursor = self._cursor.limit(limit)
        return self

    async def to_list(self, length: int | None = None) -> list[Any]:
        self._counter.hit(self._name)
        await _async_round_trip()
        documents: list[Any] = await self._cursor.to_list(length)
        return documents

    async def __aiter__(self) -> AsyncIterator[Any]:
        for document in await self.to_list():
            yield document


class _CountingAsyncCollection:
    def __init__(self, inner: Any, counter: CommandCounter) -> None:
        self._inner, self._counter = inner, counter

    def with_options(self, *args: Any, **kwargs: Any) -> _CountingAsyncCollection:
        return _CountingAsyncCollection(self._inner.with_options(*args, **kwargs), self._counter)

    def find(self, *args: Any, **kwargs: Any) -> _CountingAsyncCursor:
        return _CountingAsyncCursor(self._inner.find(*args, **kwargs), self._counter, "find")

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in ASYNC_OPS:
            return attribute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self._counter.hit(name)
            await _async_round_trip()
            return await attribute(*args, **kwargs)

        return counted


class _CountingAsyncDatabase:
    def __init__(self, inner: Any, counter: CommandCounter) -> None:
        self._inner, self._counter = inner, counter

    def get_collection(self, *args: Any, **kwargs: Any) -> _CountingAsyncCollection:
        return _CountingAsyncCollection(self._inner.get_collection(*args, **kwargs),
                                        self._counter)

    def __getitem__(self, name: str) -> _CountingAsyncCollection:
        return self.get_collection(name)

    async def command(self, command: Any, **kwargs: Any) -> Any:
        self._counter.hit(command if isinstance(command, str) else next(iter(command)))
        await _async_round_trip()
        return await self._inner.command(command, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CountingAsyncClient:
    """Wraps a MemoryMongoClient: each awaited operation counts as one command."""

    def __init__(self, inner: MemoryMongoClient, counter: CommandCounter) -> None:
        self._inner, self._counter = inner, counter

    def get_database(self, *args: Any, **kwargs: Any) -> _CountingAsyncDatabase:
        return _CountingAsyncDatabase(self._inner.get_database(*args, **kwargs), self._counter)

    @property
    def admin(self) -> _CountingAsyncDatabase:
        return self.get_database("admin")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _CountingSyncCursor:
    """A lazily run mongomock-ng cursor: runs (and counts) once, under the server lock."""

    def __init__(self, run: Callable[[], Any], lock: Any, counter: CommandCounter) -> None:
        self._run, self._lock, self._counter = run, lock, counter
        self._sort: list[Any] = []
        self._limit = 0
        self._documents: Iterator[Any] | None = None

    def sort(self, key: Any, direction: int | None = None) -> _CountingSyncCursor:
        self._sort = [(key, direction or 1)] if isinstance(key, str) else list(key)
        return self

    def limit(self, limit: int) -> _CountingSyncCursor:
        self._limit = limit
        return self

    def __iter__(self) -> _CountingSyncCursor:
        return self

    def __next__(self) -> Any:
        if self._documents is None:
            self._counter.hit("find")
            _sync_round_trip()
            with self._lock:
                cursor = self._run()
                if self._sort:
                    cursor = cursor.sort(self._sort)
                if self._limit:
                    cursor = cursor.limit(self._limit)
                self._documents = iter(list(cursor))
        return next(self._documents)

    def close(self) -> None:
        pass


class _CountingSyncCollection:
    def __init__(self, inner: Any, lock: Any, counter: CommandCounter) -> None:
        self._inner, self._lock, self._counter = inner, lock, counter

    def find(self, *args: Any, **kwargs: Any) -> _CountingSyncCursor:
        return _CountingSyncCursor(lambda: self._inner.find(*args, **kwargs), self._lock,
                                   self._counter)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in SYNC_OPS:
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._counter.hit(name)
            _sync_round_trip()
            with self._lock:  # the async MemoryMongoClient takes the same lock
                return attribute(*args, **kwargs)

        return counted


class _CountingSyncDatabase:
    def __init__(self, inner: Any, lock: Any, counter: CommandCounter) -> None:
        self._inner, self._lock, self._counter = inner, lock, counter

    def __getitem__(self, name: str) -> _CountingSyncCollection:
        return _CountingSyncCollection(self._inner[name], self._lock, self._counter)

    get_collection = __getitem__


class CountingSyncClient:
    """Wraps ``MemoryMongoClient(server).sync_client()`` for the built-in store."""

    def __init__(self, server: MemoryServer, counter: CommandCounter) -> None:
        self._inner = MemoryMongoClient(server).sync_client()
        self._lock, self._counter = server.lock, counter

    def get_database(self, name: str, **kwargs: Any) -> _CountingSyncDatabase:
        return _CountingSyncDatabase(self._inner.get_database(name, **kwargs), self._lock,
                                     self._counter)

    def server_info(self) -> Any:
        self._counter.hit("buildInfo")
        _sync_round_trip()
        with self._lock:
            return self._inner.server_info()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


# --- back ends ------------------------------------------------------------------------------

class Backend:
    """Where both stores keep their data: one in-memory server, or a real one (``uri``)."""

    def __init__(self, uri: str | None = None) -> None:
        self.uri = uri
        self.server = MemoryServer()
        self._sync_clients: list[MongoClient[Any]] = []
        self._async_clients: list[Any] = []
        self._databases: list[str] = []

    def new_database(self) -> str:
        name = f"apsched_bench_{uuid4().hex[:10]}"
        self._databases.append(name)
        return name

    def store(self, kind: str, database: str, counter: CommandCounter | None = None,
              **kwargs: Any) -> DataStore:
        counter = counter or CommandCounter()
        if kind == OURS:
            return MongoDBDataStore(self._async_client(counter), database=database, **kwargs)
        if self.uri:
            client: Any = MongoClient(self.uri, event_listeners=[_CommandListener(counter)])
            self._sync_clients.append(client)
        else:
            client = CountingSyncClient(self.server, counter)
        # The built-in store's attrs validator insists on instance_of((MongoClient, str)); a
        # counting wrapper around mongomock-ng is neither, but provides every method the store
        # calls, so we construct it with validators disabled (and nothing else bypassed).
        with attrs.validators.disabled():
            return BuiltinMongoDBDataStore(client, database=database, **kwargs)

    def broker_client(self) -> Any:
        return self._async_client(CommandCounter())

    def _async_client(self, counter: CommandCounter) -> Any:
        if self.uri:
            client: Any = AsyncMongoClient(self.uri, event_listeners=[_CommandListener(counter)],
                                           tz_aware=True)
            self._async_clients.append(client)
            return client
        return CountingAsyncClient(MemoryMongoClient(self.server), counter)

    async def close(self) -> None:
        if self.uri:
            client: AsyncMongoClient[Any]
            async with AsyncMongoClient(self.uri) as client:
                for name in self._databases:
                    await client.drop_database(name)
        for async_client in self._async_clients:
            await async_client.close()
        for sync_client in self._sync_clients:
            sync_client.close()


class SharedLocalBroker(LocalEventBroker):
    """One LocalEventBroker for several schedulers in this process: started once by us, so
    each scheduler's ``start`` (and its exit) leaves it alone."""

    async def start_shared(self, exit_stack: AsyncExitStack, logger: logging.Logger) -> None:
        await super().start(exit_stack, logger)

    async def start(self, exit_stack: AsyncExitStack, logger: logging.Logger) -> None:
        pass


@asynccontextmanager
async def started(store: DataStore) -> AsyncIterator[DataStore]:
    async with AsyncExitStack() as stack:
        broker = LocalEventBroker()
        await broker.start(stack, log)
        await store.start(stack, broker, log)
        yield store


# --- command counts -------------------------------------------------------------------------

async def commands_per_job(backend: Backend, kind: str, batch: int, rounds: int) -> float:
    """Commands per job for ``rounds`` x (add ``batch`` jobs, acquire them, release each)."""
    counter = CommandCounter()
    async with started(backend.store(kind, backend.new_database(), counter)) as store:
        await store.add_task(Task(id=TASK_ID, func=f"{__name__}:bench_job",
                                  job_executor="async", max_running_jobs=None))
        counter.reset()
        for _ in range(rounds):
            for _ in range(batch):
                await store.add_job(Job(task_id=TASK_ID, executor="async"))
            acquired: list[Job] = []
            for _ in range(batch):
                acquired += await store.acquire_jobs("bench-node", LEASE, batch - len(acquired))
                if len(acquired) == batch:
                    break
            if len(acquired) != batch:
                raise RuntimeError(f"{kind}: acquired {len(acquired)} of {batch} jobs")
            for job in acquired:
                await store.release_job("bench-node", job, JobResult.from_job(
                    job, JobOutcome.success, return_value=None))
        return counter.total / (batch * rounds)


async def commands_per_fire(backend: Backend, kind: str, batch: int, rounds: int) -> float:
    """Commands per schedule fire: acquire due schedules, add a job each, release them."""
    counter = CommandCounter()
    async with started(backend.store(kind, backend.new_database(), counter)) as store:
        await store.add_task(Task(id=TASK_ID, func=f"{__name__}:bench_job",
                                  job_executor="async", max_running_jobs=None))
        interval = timedelta(hours=1)
        fires = commands = 0
        for round_number in range(rounds):
            due = datetime.now(UTC) - timedelta(minutes=1)
            for i in range(batch):
                trigger = IntervalTrigger(hours=1, start_time=due)
                await store.add_schedule(Schedule(
                    id=f"s{round_number}-{i}", task_id=TASK_ID, trigger=trigger,
                    job_executor="async", next_fire_time=due,
                ), ConflictPolicy.exception)
            before = counter.total  # adding the schedules is setup, not firing
            schedules = await store.acquire_schedules("bench-node", LEASE, 100)
            if len(schedules) != batch:
                raise RuntimeError(f"{kind}: acquired {len(schedules)} of {batch} schedules")
            results = []
            for schedule in schedules:
                assert schedule.next_fire_time is not None
                await store.add_job(Job(
                    task_id=schedule.task_id, schedule_id=schedule.id, executor="async",
                    scheduled_fire_time=schedule.next_fire_time,
                ))
                results.append(ScheduleResult(
                    schedule_id=schedule.id, task_id=schedule.task_id, trigger=schedule.trigger,
                    last_fire_time=schedule.next_fire_time,
                    next_fire_time=schedule.next_fire_time + interval,
                ))
            await store.release_schedules("bench-node", results)
            fires += len(schedules)
            commands += counter.total - before
        return commands / fires


# --- end to end -----------------------------------------------------------------------------

_executions: Counter[str] = Counter()
_targets: dict[str, tuple[int, anyio.Event]] = {}


@task(max_running_jobs=None)  # add_job would reset a configure_task() setting to defaults
async def bench_job(run_id: str) -> None:
    """The benchmarked no-op job: counts itself and signals when the run is complete."""
    _executions[run_id] += 1
    target, done = _targets[run_id]
    if _executions[run_id] >= target:
        done.set()


async def bench_heartbeat() -> None:
    """The timer that wakes a node with no cross-node broker."""


_started_at: dict[str, float] = {}
_wakeups: dict[str, anyio.Event] = {}


@task(max_running_jobs=None)
async def wakeup_job(key: str) -> None:
    _started_at[key] = time.perf_counter()
    _wakeups[key].set()


async def jobs_per_second(backend: Backend, kind: str, nodes: int, jobs: int,
                          time_limit: float, *, queued: bool = False) -> float:
    """Jobs/s: ``jobs`` no-op jobs added on node 0, run by ``nodes`` schedulers.

    ``queued=False``: added one by one while the schedulers run (one producer, so the
    add path counts too). ``queued=True``: all queued first, then the schedulers start and
    drain the queue (the job-processing path alone)."""
    run_id = uuid4().hex
    done = anyio.Event()
    _targets[run_id] = (jobs, done)
    database = backend.new_database()
    async with AsyncExitStack() as stack:
        broker = SharedLocalBroker()
        await broker.start_shared(stack, log)
        schedulers = []
        for i in range(nodes):
            scheduler = AsyncScheduler(backend.store(kind, database), broker,
                                       identity=f"{kind}-{i}", cleanup_interval=NO_CLEANUP)
            await stack.enter_async_context(scheduler)
            schedulers.append(scheduler)
        if queued:
            for _ in range(jobs):
                await schedulers[0].add_job(bench_job, args=(run_id,))
        started_at = time.perf_counter()
        for scheduler in schedulers:
            await scheduler.start_in_background()
        with anyio.fail_after(time_limit):
            if not queued:
                for _ in range(jobs):
                    await schedulers[0].add_job(bench_job, args=(run_id,))
            await done.wait()
        elapsed = time.perf_counter() - started_at
        for scheduler in schedulers:
            await scheduler.stop()
    _targets.pop(run_id)
    return jobs / elapsed


def _brokers(backend: Backend, kind: str, database: str) -> tuple[EventBroker, EventBroker]:
    if kind == OURS:
        assert MongoDBEventBroker is not None
        return tuple(  # type: ignore[return-value]
            MongoDBEventBroker(backend.broker_client(), database=database,
                               poll_interval=timedelta(milliseconds=100))
            for _ in range(2)
        )
    return LocalEventBroker(), LocalEventBroker()


async def wakeup_latency(backend: Backend, kind: str, samples: int, heartbeat: float,
                         time_limit: float) -> float:
    """Mean seconds from adding a schedule on node A to its job starting on node B.

    Ours: our store with the MongoDBEventBroker on each node. Built-in: APScheduler's store
    with a LocalEventBroker per node, so B notices only when its own timer (a heartbeat
    schedule every ``heartbeat`` seconds) wakes it.
    """
    database = backend.new_database()
    broker_a, broker_b = _brokers(backend, kind, database)
    latencies = []
    async with AsyncExitStack() as stack:
        node_a = await stack.enter_async_context(AsyncScheduler(
            backend.store(kind, database), broker_a, identity="A", cleanup_interval=NO_CLEANUP))
        node_b = await stack.enter_async_context(AsyncScheduler(
            backend.store(kind, database), broker_b, identity="B", cleanup_interval=NO_CLEANUP))
        await node_b.add_schedule(bench_heartbeat, IntervalTrigger(seconds=heartbeat),
                                  id="heartbeat")
        await node_b.start_in_background()  # A only adds schedules: it is never started
        for sample in range(samples):
            await anyio.sleep(random.uniform(0, heartbeat))  # a random phase, not a wait
            key = f"{kind}-{uuid4().hex}"
            _wakeups[key] = anyio.Event()
            added_at = time.perf_counter()
            await node_a.add_schedule(wakeup_job, DateTrigger(datetime.now(UTC)),
                                      args=(key,), id=f"wake-{sample}")
            with anyio.fail_after(time_limit):
                await _wakeups[key].wait()
            latencies.append(_started_at.pop(key) - added_at)
            del _wakeups[key]
        await node_b.stop()
    return sum(latencies) / len(latencies)


# --- the report -----------------------------------------------------------------------------

@dataclass
class Figure:
    name: str
    unit: str
    ours: float | None
    builtin: float | None
    target: str = ""
    met: bool | None = None
    ratio: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = (self.ours / self.builtin
                      if self.ours is not None and self.builtin else None)


@dataclass
class Config:
    quick: bool
    uri: bool
    lifecycle_rounds: dict[int, int]
    fire_batches: tuple[int, ...]
    fire_rounds: int
    jobs: int
    nodes: tuple[int, ...]
    wakeup_samples: int
    heartbeat: float
    timeout: float
    rtt_ms: float = 0.0

    @classmethod
    def make(cls, quick: bool, uri: bool, rtt_ms: float = 0.0) -> Config:
        return cls(
            quick=quick, uri=uri, rtt_ms=rtt_ms,
            lifecycle_rounds={1: 10, 10: 2, 100: 1} if quick else {1: 50, 10: 10, 100: 2},
            fire_batches=(1, 10), fire_rounds=2 if quick else 5,
            jobs=1000 if quick else 2000, nodes=(1, 4),
            wakeup_samples=3 if quick else 8, heartbeat=1.0, timeout=120.0,
        )


async def collect(backend: Backend, config: Config,
                  progress: Callable[[str], None] = lambda _: None) -> list[Figure]:
    figures: list[Figure] = []

    async def both(name: str, unit: str, measure: Callable[[str], Awaitable[float | None]],
                   target: str = "", check: Callable[[float], bool] | None = None) -> None:
        progress(name)
        values = {kind: await measure(kind) for kind in KINDS}
        figure = Figure(name, unit, values[OURS], values[BUILTIN], target)
        if check and figure.ratio is not None:
            figure.met = check(figure.ratio)
        figures.append(figure)

    for batch, rounds in config.lifecycle_rounds.items():
        await both(
            f"commands per job life cycle, batch {batch}", "commands",
            lambda kind, b=batch, r=rounds: commands_per_job(backend, kind, b, r),  # type: ignore[misc]
            *(("<= 1/3", lambda ratio: ratio <= 1 / 3) if batch == 100 else ()),
        )
    for batch in config.fire_batches:
        await both(
            f"commands per schedule fire, batch {batch}", "commands",
            lambda kind, b=batch: commands_per_fire(backend, kind, b, config.fire_rounds),  # type: ignore[misc]
        )
    for queued in (False, True):
        for nodes in config.nodes:
            how = "queued first, then drained" if queued else "added while running"
            await both(
                f"end-to-end throughput, {nodes} scheduler(s), {config.jobs} jobs {how}",
                "jobs/s",
                lambda kind, n=nodes, q=queued: jobs_per_second(  # type: ignore[misc]
                    backend, kind, n, config.jobs, config.timeout, queued=q),
                ">= 2x", lambda ratio: ratio >= 2,
            )

    async def latency(kind: str) -> float | None:
        if kind == OURS and MongoDBEventBroker is None:
            return None
        return await wakeup_latency(backend, kind, config.wakeup_samples, config.heartbeat,
                                    config.timeout)

    await both(f"wake-up latency A->B (mean of {config.wakeup_samples}; local broker: "
               f"{config.heartbeat:g} s timer)", "s", latency)
    return figures


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def markdown(figures: list[Figure], config: Config, seconds: float) -> str:
    backend = "real server (--uri)" if config.uri else "in-memory back end"
    if config.rtt_ms and not config.uri:
        backend += f" with a simulated {config.rtt_ms:g} ms round trip per command"
    lines = [
        f"Benchmarks on the {backend}{' (--quick)' if config.quick else ''}, "
        f"{seconds:.0f} s. Ratio = ours / built-in.",
        "",
        "| figure | unit | ours | built-in | ratio | target |",
        "|---|---|---:|---:|---:|---|",
    ]
    for f in figures:
        verdict = "" if f.met is None else (" met" if f.met else " NOT met")
        lines.append(f"| {f.name} | {f.unit} | {_fmt(f.ours)} | {_fmt(f.builtin)} | "
                     f"{_fmt(f.ratio)} | {f.target}{verdict} |")
    return "\n".join(lines)


async def run_all(args: argparse.Namespace, config: Config) -> list[Figure]:
    backend = Backend(args.uri)
    try:
        return await collect(backend, config,
                             lambda name: print(f"... {name}", file=sys.stderr))
    finally:
        await backend.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smaller run (< 60 s)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--uri", help="a real MongoDB server (default: in-memory)")
    parser.add_argument("--rtt-ms", type=float, default=0.0,
                        help="in memory: add this network round trip to every command")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    global SIMULATED_RTT
    SIMULATED_RTT = 0.0 if args.uri else args.rtt_ms / 1000
    config = Config.make(args.quick, bool(args.uri), SIMULATED_RTT * 1000)
    started_at = time.perf_counter()
    figures = anyio.run(run_all, args, config)
    seconds = time.perf_counter() - started_at
    print(markdown(figures, config, seconds))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "config": {**asdict(config), "lifecycle_rounds": {
                str(k): v for k, v in config.lifecycle_rounds.items()}},
            "seconds": seconds,
            "figures": [asdict(f) for f in figures],
        }, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
