"""Counting MongoDB commands: every awaited operation on a client is one command.

On the in-memory back end the clients are wrapped: each awaited method of a client,
database or collection (and each ``to_list`` or iteration of a ``find`` cursor) counts as one
command, whatever its name, so new operations in the store are counted without changes here.
The built-in store drives a synchronous client from worker threads; its wrapper counts the
same way and takes the in-memory server's lock. On a real server (``--uri``) PyMongo's
command monitoring counts what goes over the wire instead.

A :class:`CommandCounter` may also simulate a network round trip per command
(``round_trip`` seconds, spent without blocking the event loop), so timings reflect how many
round trips a store makes one after the other.
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anyio
from pymongo import monitoring

#: Collection-level method names (in memory) and wire command names (real server) that write
WRITE_COMMANDS = frozenset({
    "insert_one", "insert_many", "update_one", "update_many", "replace_one", "bulk_write",
    "delete_one", "delete_many", "find_one_and_update", "find_one_and_replace",
    "find_one_and_delete",
    "insert", "update", "delete", "findAndModify", "bulkWrite",
})
#: Awaitable methods that are not commands
NOT_COMMANDS = frozenset({"close", "aclose", "__aexit__", "__aenter__"})


class CommandCounter:
    """Counts commands by name (thread-safe: the built-in store works in threads).

    :param round_trip: seconds of simulated network round trip per command (in memory only)
    :param record_writes: also keep the start time (``time.perf_counter``) of each write
    """

    def __init__(self, round_trip: float = 0.0, record_writes: bool = False) -> None:
        self.round_trip = round_trip
        self.record_writes = record_writes
        self.by_name: Counter[str] = Counter()
        self.write_starts: list[float] = []
        #: start of each simulated round trip
        self.round_trip_starts: list[float] = []
        self._lock = threading.Lock()

    def hit(self, name: str) -> None:
        with self._lock:
            self.by_name[name] += 1
            if self.record_writes and name in WRITE_COMMANDS:
                self.write_starts.append(time.perf_counter())

    @property
    def total(self) -> int:
        return sum(self.by_name.values())

    @property
    def writes(self) -> int:
        return sum(n for name, n in self.by_name.items() if name in WRITE_COMMANDS)

    def reset(self) -> None:
        with self._lock:
            self.by_name.clear()
            self.write_starts.clear()
            self.round_trip_starts.clear()

    async def round_trip_async(self) -> None:
        if self.round_trip:
            self.round_trip_starts.append(time.perf_counter())
            await anyio.sleep(self.round_trip)

    def round_trip_sync(self) -> None:
        if self.round_trip:
            with self._lock:
                self.round_trip_starts.append(time.perf_counter())
            time.sleep(self.round_trip)


def total(counters: list[CommandCounter]) -> Counter[str]:
    """The commands of several counters, by name."""
    by_name: Counter[str] = Counter()
    for counter in counters:
        by_name.update(counter.by_name)
    return by_name


def time_in_round_trips(counters: list[CommandCounter]) -> float:
    """Seconds during which at least one simulated round trip of these counters was under
    way: round trips made one after another add up, those made at the same time count once.
    Each lasts its nominal length from its start (a busy event loop resuming the caller late
    is not the network's doing)."""
    spans = sorted((start, start + counter.round_trip)
                   for counter in counters for start in counter.round_trip_starts)
    covered, reached = 0.0, float("-inf")
    for start, end in spans:
        if end > reached:
            covered += end - max(start, reached)
            reached = end
    return covered


class CommandListener(monitoring.CommandListener):
    """PyMongo command monitoring, for a real server."""

    def __init__(self, counter: CommandCounter) -> None:
        self.counter = counter

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.counter.hit(event.command_name)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


# --- the async in-memory client (our store and broker) ---------------------------------------

class _Counted:
    """A proxy that counts each awaited method call as one command and wraps the objects
    (databases, collections, cursors) that lead to further commands."""

    def __init__(self, inner: Any, counter: CommandCounter) -> None:
        self._inner, self._counter = inner, counter

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name in ("get_database", "get_collection", "with_options"):
            return lambda *args, **kwargs: _Counted(attribute(*args, **kwargs), self._counter)
        if name in ("admin", "database", "client") and not callable(attribute):
            return _Counted(attribute, self._counter)
        if name == "find":
            return lambda *args, **kwargs: _CountedCursor(attribute(*args, **kwargs),
                                                          self._counter)
        if name in NOT_COMMANDS or not inspect.iscoroutinefunction(attribute):
            return attribute

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self._counter.hit(_command_name(name, args))
            await self._counter.round_trip_async()
            return await attribute(*args, **kwargs)

        return counted

    def __getitem__(self, name: str) -> _Counted:
        return _Counted(self._inner[name], self._counter)

    def __repr__(self) -> str:
        return f"Counted({self._inner!r})"


def _command_name(method: str, args: tuple[Any, ...]) -> str:
    """``database.command("hello")`` counts as ``hello``, anything else by method name."""
    if method == "command" and args:
        return args[0] if isinstance(args[0], str) else next(iter(args[0]))
    return method


class _CountedCursor:
    """One command per ``to_list`` (a whole result in one batch) or iteration, and per any
    other awaited call (``next``, ...)."""

    def __init__(self, cursor: Any, counter: CommandCounter) -> None:
        self._cursor, self._counter = cursor, counter

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._cursor, name)
        if name in NOT_COMMANDS or not callable(attribute):
            return attribute

        def chained(*args: Any, **kwargs: Any) -> Any:  # sort, limit, skip, ...
            result = attribute(*args, **kwargs)
            if inspect.isawaitable(result):
                return self._counted(name, result)
            self._cursor = result
            return self

        return chained

    async def _counted(self, name: str, awaitable: Awaitable[Any]) -> Any:
        self._counter.hit(name)
        await self._counter.round_trip_async()
        return await awaitable

    async def to_list(self, length: int | None = None) -> list[Any]:
        self._counter.hit("find")
        await self._counter.round_trip_async()
        documents: list[Any] = await self._cursor.to_list(length)
        return documents

    async def __aiter__(self) -> AsyncIterator[Any]:
        for document in await self.to_list():
            yield document


def counting_async_client(client: Any, counter: CommandCounter) -> Any:
    """``client`` (a MemoryMongoClient) with every awaited operation counted."""
    return _Counted(client, counter)


# --- the sync in-memory client (APScheduler's built-in store) ---------------------------------

class _CountedSyncCursor:
    """A lazily run mongomock-ng cursor: runs (and counts) once, under the server lock."""

    def __init__(self, run: Callable[[], Any], lock: Any, counter: CommandCounter) -> None:
        self._run, self._lock, self._counter = run, lock, counter
        self._sort: list[Any] = []
        self._limit = 0
        self._documents: Iterator[Any] | None = None

    def sort(self, key: Any, direction: int | None = None) -> _CountedSyncCursor:
        self._sort = [(key, direction or 1)] if isinstance(key, str) else list(key)
        return self

    def limit(self, limit: int) -> _CountedSyncCursor:
        self._limit = limit
        return self

    def __iter__(self) -> _CountedSyncCursor:
        return self

    def __next__(self) -> Any:
        if self._documents is None:
            self._counter.hit("find")
            self._counter.round_trip_sync()
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


#: Synchronous collection methods the built-in store calls that are one command each
_SYNC_COMMANDS = WRITE_COMMANDS | {
    "find_one", "count_documents", "estimated_document_count", "distinct", "aggregate",
    "create_index", "create_indexes", "drop_index", "drop", "index_information",
}


class _CountedSyncCollection:
    def __init__(self, inner: Any, lock: Any, counter: CommandCounter) -> None:
        self._inner, self._lock, self._counter = inner, lock, counter

    def find(self, *args: Any, **kwargs: Any) -> _CountedSyncCursor:
        return _CountedSyncCursor(lambda: self._inner.find(*args, **kwargs), self._lock,
                                  self._counter)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in _SYNC_COMMANDS:
            return attribute

        def counted(*args: Any, **kwargs: Any) -> Any:
            self._counter.hit(name)
            self._counter.round_trip_sync()
            with self._lock:  # the async in-memory client takes the same lock
                return attribute(*args, **kwargs)

        return counted


class _CountedSyncDatabase:
    def __init__(self, inner: Any, lock: Any, counter: CommandCounter) -> None:
        self._inner, self._lock, self._counter = inner, lock, counter

    def __getitem__(self, name: str) -> _CountedSyncCollection:
        return _CountedSyncCollection(self._inner[name], self._lock, self._counter)

    get_collection = __getitem__


class CountingSyncClient:
    """A synchronous client on the in-memory data (``MemoryMongoClient.sync_client()``) for
    APScheduler's built-in store, counting the way the async wrapper does."""

    def __init__(self, sync_client: Any, lock: Any, counter: CommandCounter) -> None:
        self._inner, self._lock, self._counter = sync_client, lock, counter

    def get_database(self, name: str, **kwargs: Any) -> _CountedSyncDatabase:
        return _CountedSyncDatabase(self._inner.get_database(name, **kwargs), self._lock,
                                    self._counter)

    def server_info(self) -> Any:
        self._counter.hit("buildInfo")
        self._counter.round_trip_sync()
        with self._lock:
            return self._inner.server_info()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
