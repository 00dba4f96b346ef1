"""ServerChangeStream: one change stream cursor on a replica-set :class:`MemoryServer`."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING, Any

from bson import Timestamp
from mongomock_ng.filtering import filter_applies
from pymongo.errors import PyMongoError

from ..errors import UnsupportedByMemoryBackend
from ._errors import NON_RESUMABLE, cursor_not_found, history_lost, server_error
from ._oplog import Change, ChangeHistory
from ._refusals import refuse_unfaithful
from ._tokens import Position, next_after
from ._untyped import clone_document, project, stored_dates

if TYPE_CHECKING:
    from ._server import MemoryServer

_INTERNAL_DATABASES = frozenset({"admin", "config", "local"})
_FULL_DOCUMENT = ("default", "updateLookup")
_IMAGES = ("whenAvailable", "required")
_cursor_ids = itertools.count(7_000_000_001)


def _is_system(collection: str | None) -> bool:
    return bool(collection and collection.startswith("system."))


@dataclass(frozen=True)
class Scope:
    """What a stream watches: one collection, one database or (both ``None``) everything."""

    database: str | None
    collection: str | None

    def covers(self, change: Change) -> bool:
        if self.database is None:
            return change.db not in _INTERNAL_DATABASES and not _is_system(change.coll)
        if self.collection is None:
            return change.db == self.database and not _is_system(change.coll)
        ours = (self.database, self.collection)
        return change.operation != "dropDatabase" and (
            (change.db, change.coll) == ours or change.to == ours
        )

    def invalidated_by(self, change: Change) -> bool:
        """Whether ``change`` (which this scope covers) ends streams on it."""
        if self.collection is not None:
            return change.operation in ("drop", "rename")
        return self.database is not None and change.operation == "dropDatabase"

    @property
    def namespace(self) -> str:
        """The cursor's namespace, as a server reports it."""
        if self.database is None:
            return "admin.$cmd.aggregate"
        return f"{self.database}.{self.collection or '$cmd.aggregate'}"


class ServerChangeStream:
    """One change stream cursor on a replica-set :class:`MemoryServer`.

    Made by :meth:`MemoryServer.open_change_stream`, which returns at once without reading
    anything. Then, as a server would:

    * an ``aggregate`` with ``$changeStream`` answers its first batch with
      ``next_batch(0, batch_size)`` (``batch_size`` 101 by default; for ``batchSize: 0``,
      an empty first batch, report :attr:`post_batch_resume_token` without calling it);
    * each ``getMore`` is ``next_batch(max_await_seconds, batch_size)`` (MongoDB waits one
      second when ``maxAwaitTimeMS`` is not given; ``batchSize`` absent or 0 is ``None``);
    * after each batch the cursor id to report is :attr:`id` while :attr:`alive`, else 0
      (the stream ended with an ``invalidate``), with :attr:`namespace` as its ``ns``;
    * ``killCursors`` is :meth:`close` (a batch waiting meanwhile raises ``CursorKilled``).

    Never hold :attr:`MemoryServer.lock` while asking for a batch: writers need it to commit
    the changes a waiting batch is waiting for (and ``updateLookup`` reads under it).

    :meth:`next_batch` blocks the calling thread; :meth:`next_batch_async` is its twin for
    an asyncio event loop. Both sleep until a change this stream watches is committed (by
    any client, in any thread or loop), the stream is interrupted, or the time is up. A
    stream is meant for one consumer at a time; :meth:`close` may come from anywhere.

    Errors are raised as the exception PyMongo raises for the same server reply, whose
    ``details`` is that reply: ``ChangeStreamHistoryLost`` (286) when the stream fell out
    of the history, ``ChangeStreamFatalError`` (280) when the token it resumed from is not
    in its history or a pipeline altered ``_id``, the error of
    :meth:`MemoryServer.interrupt_change_streams` or of a step-down, and ``CursorNotFound``
    (43) once closed or ended.
    """

    def __init__(self, server: MemoryServer, history: ChangeHistory, scope: Scope,
                 stages: list[tuple[str, Any]], full_document: str | None,
                 position: Position) -> None:
        self.id = next(_cursor_ids)
        self.scope = scope
        self._server = server
        self._history = history
        self._stages = stages
        self._lookup = full_document == "updateLookup"
        self._position = position
        self._unverified = False  # resumed from a token whose event was not found
        self._invalidate_of: Change | None = None  # the invalidate still to be returned
        self._error: PyMongoError | None = None
        self._closed = False
        self._closed_while_waiting = False
        self._ended = False  # returned its invalidate
        self._waker: Callable[[], None] | None = None

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, server: MemoryServer, history: ChangeHistory, *,
             database: str | None = None, collection: str | None = None,
             pipeline: Sequence[Mapping[str, Any]] | None = None,
             full_document: str | None = None, full_document_before_change: str | None = None,
             resume_after: Mapping[str, Any] | None = None,
             start_after: Mapping[str, Any] | None = None,
             start_at_operation_time: Timestamp | None = None,
             show_expanded_events: bool = False) -> ServerChangeStream:
        scope = _scope(database, collection)
        _check_option("fullDocument", full_document, _FULL_DOCUMENT)
        _check_option("fullDocumentBeforeChange", full_document_before_change, ("off",))
        if show_expanded_events:
            raise UnsupportedByMemoryBackend(
                "showExpandedEvents: the in-memory back end records no DDL events besides "
                "drop, rename and dropDatabase"
            )
        stages = _compile(pipeline)
        if resume_after is not None and start_after is not None:
            raise server_error(50865, "Location50865", "Do not specify both 'resumeAfter' and "
                               "'startAfter' in a $changeStream stage")
        token = resume_after if resume_after is not None else start_after
        if token is not None and start_at_operation_time is not None:
            raise server_error(40674, "Location40674",
                               "Only one type of resume option is allowed, but multiple were found")
        with history.lock:
            if token is not None:
                option = "resumeAfter" if resume_after is not None else "startAfter"
                position = Position.from_token(token, option)
                if position.from_invalidate and resume_after is not None:
                    raise server_error(260, "InvalidResumeToken",
                                       "Attempting to resume a change stream using "
                                       "'resumeAfter' is not allowed from an invalidate "
                                       "notification.")
            elif start_at_operation_time is not None:
                if not isinstance(start_at_operation_time, Timestamp):
                    raise server_error(14, "TypeMismatch",
                                       "BSON field '$changeStream.startAtOperationTime' is "
                                       "the wrong type, expected type 'timestamp'")
                position = Position.high_water_mark(start_at_operation_time)
            else:
                position = Position.high_water_mark(next_after(history.cluster_time))
            stream = cls(server, history, scope, stages, full_document, position)
            stream._raise_if_lost()
            if position.is_event:
                stream._find_resumed_event()
        return stream

    def _find_resumed_event(self) -> None:
        """Check the event of the token resumed from. MongoDB fails a resume whose event it
        does not find (280), but only once it meets a later event of the stream."""
        change = self._history.find_locked(self._position.timestamp)
        if change is None or not self.scope.covers(change):
            self._unverified = True
        elif self.scope.invalidated_by(change):
            if not self._position.from_invalidate:
                self._invalidate_of = change  # resumed between the event and its invalidate
        elif self._position.from_invalidate:
            self._unverified = True  # an invalidate of some other stream

    # --- state --------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """``False`` once closed or ended by an ``invalidate`` (report cursor id 0)."""
        return not (self._closed or self._ended)

    @property
    def namespace(self) -> str:
        """The cursor's ``ns`` in replies (``db.coll``, ``db.$cmd.aggregate`` or
        ``admin.$cmd.aggregate``)."""
        return self.scope.namespace

    @property
    def post_batch_resume_token(self) -> dict[str, str]:
        """The resume token after the last batch (``postBatchResumeToken``)."""
        return self._position.token()

    def close(self) -> None:
        """Kill the cursor; a waiting :meth:`next_batch` returns at once."""
        with self._history.lock:
            self._closed = True
            self._closed_while_waiting = self._waker is not None
            self._wake_locked()
        self._server._forget_stream(self)

    def kill(self, error: PyMongoError) -> bool:
        """End the stream with ``error``: the next (or the waiting) batch raises it.
        ``False`` if the stream had already ended."""
        with self._history.lock:
            if not self.alive or self._error is not None:
                return False
            self._error = error
            self._wake_locked()
            return True

    # --- batches ------------------------------------------------------------------------------

    def next_batch(self, max_await_seconds: float = 0.0,
                   batch_size: int | None = None) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """The next events (at most ``batch_size``; ``None``: no limit) and the
        ``postBatchResumeToken``, waiting up to ``max_await_seconds`` for the first one.

        The events are fresh dicts of BSON values (dates naive UTC) the caller may keep.
        """
        deadline = monotonic() + max(0.0, max_await_seconds)
        while True:
            woken = threading.Event() if deadline > monotonic() else None
            batch = self._attempt(batch_size, woken.set if woken else None)
            if batch is not None:
                return batch, self.post_batch_resume_token
            if woken is None:
                return [], self.post_batch_resume_token
            try:
                woken.wait(deadline - monotonic())
            finally:
                self._stop_waiting()

    async def next_batch_async(self, max_await_seconds: float = 0.0, batch_size: int | None = None
                               ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """:meth:`next_batch` for an asyncio event loop: waits without blocking the loop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, max_await_seconds)
        while True:
            woken = loop.create_future() if deadline > loop.time() else None
            batch = self._attempt(batch_size, _future_waker(loop, woken) if woken else None)
            if batch is not None:
                return batch, self.post_batch_resume_token
            if woken is None:
                return [], self.post_batch_resume_token
            try:
                await asyncio.wait_for(woken, deadline - loop.time())
            except TimeoutError:
                pass
            finally:
                self._stop_waiting()

    def _attempt(self, batch_size: int | None,
                 waker: Callable[[], None] | None) -> list[dict[str, Any]] | None:
        """A batch, or ``None`` when there is nothing new (``waker`` then watches for it)."""
        while True:
            with self._history.lock:
                self._raise_if_unusable()
                if batch_size == 0:
                    return []
                changes = self._history.after_locked(self._position)
                if self._invalidate_of is None and not any(map(self.scope.covers, changes)):
                    if changes:  # others' changes: the resume token moves past them
                        self._position = Position.high_water_mark(next_after(changes[-1].ts))
                    if waker is not None:
                        self._waker = waker
                        self._history.watch_locked(self, self._notify)
                    return None
            batch = self._collect(changes, batch_size)  # outside the lock: lookups read data
            if batch or not self.alive:
                return batch

    def _collect(self, changes: list[Change], batch_size: int | None) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []

        def full() -> bool:
            return batch_size is not None and len(batch) >= batch_size

        for change in [None, *changes]:
            if change is not None:
                if not self.scope.covers(change):
                    self._position = Position.high_water_mark(next_after(change.ts))
                    continue
                if self._unverified:
                    self._fail(server_error(280, "ChangeStreamFatalError",
                                            "cannot resume stream; the resume token was not "
                                            f"found. {self._position.token()}", [NON_RESUMABLE]))
                if full():
                    return batch
                event = self._pipeline(self._event(change))
                if event is not None:
                    batch.append(event)
                    self._position = change.position
                else:
                    self._position = Position.high_water_mark(next_after(change.ts))
                if self.scope.invalidated_by(change):
                    self._invalidate_of = change
            if self._invalidate_of is not None:
                if full():
                    return batch
                ts = self._invalidate_of.ts
                self._position = Position.event(ts, invalidate=True)
                invalidate = self._pipeline({"_id": self._position.token(),
                                             "operationType": "invalidate", "clusterTime": ts,
                                             "wallTime": self._invalidate_of.wall_time})
                with self._history.lock:
                    self._ended = True
                    self._invalidate_of = None
                self._server._forget_stream(self)
                return [*batch, invalidate] if invalidate is not None else batch
        return batch

    def _event(self, change: Change) -> dict[str, Any]:
        """The change event, as MongoDB's manual shows it for ``change.operation``."""
        event: dict[str, Any] = {"_id": change.position.token(),
                                 "operationType": change.operation,
                                 "clusterTime": change.ts, "wallTime": change.wall_time}
        if change.full_document is not None:
            event["fullDocument"] = clone_document(change.full_document)
        elif self._lookup and change.operation == "update":
            event["fullDocument"] = self._server._lookup(
                change.db, change.coll, change.document_key)
        event["ns"] = {"db": change.db} if change.coll is None else {"db": change.db,
                                                                      "coll": change.coll}
        if change.to is not None:
            event["to"] = {"db": change.to[0], "coll": change.to[1]}
        if change.document_key is not None:
            event["documentKey"] = clone_document(change.document_key)
        if change.update_description is not None:
            event["updateDescription"] = clone_document(change.update_description)
        return event

    def _pipeline(self, event: dict[str, Any]) -> dict[str, Any] | None:
        token = event["_id"]
        for name, spec in self._stages:
            try:
                if name == "$match":
                    if not filter_applies(spec, event):  # type: ignore[no-untyped-call]
                        return None
                else:
                    event = project([event], None, spec, None)[0]
            except NotImplementedError as exc:  # mongomock-ng's own "can't do that"
                self._fail(UnsupportedByMemoryBackend(f"{name} in a change stream: {exc}"))
        if event.get("_id") != token:
            self._fail(server_error(
                280, "ChangeStreamFatalError",
                "Encountered an event whose _id field, which contains the resume token, was "
                "modified by the pipeline. Modifying the _id field of an event makes it "
                "impossible to resume the stream from that point. Only transformations that "
                "retain the unmodified _id field are allowed.", [NON_RESUMABLE]))
        return event

    # --- ending -------------------------------------------------------------------------------

    def _raise_if_unusable(self) -> None:
        """(History lock held.) Raise what this stream must raise instead of a batch."""
        if self._error is not None:
            error, self._error = self._error, None
            self._closed = True
            self._server._forget_stream(self)
            raise copy.copy(error)
        if self._closed_while_waiting:
            self._closed_while_waiting = False
            raise server_error(237, "CursorKilled", f"cursor id {self.id} was killed")
        if not self.alive:
            raise cursor_not_found(self.id)
        self._raise_if_lost()

    def _raise_if_lost(self) -> None:
        if self._position < Position.high_water_mark(self._history.start):
            self._closed = True
            self._server._forget_stream(self)
            raise history_lost()

    def _fail(self, error: Exception) -> None:
        with self._history.lock:
            self._closed = True
        self._server._forget_stream(self)
        raise error

    def _notify(self, changes: list[Change] | None) -> None:
        """(History lock held.) Wake the waiting batch if ``changes`` concern it."""
        if changes is None or any(map(self.scope.covers, changes)):
            self._wake_locked()

    def _wake_locked(self) -> None:
        if self._waker is not None:
            self._waker()

    def _stop_waiting(self) -> None:
        with self._history.lock:
            self._waker = None
        self._history.unwatch(self)


def _future_waker(loop: asyncio.AbstractEventLoop, future: asyncio.Future[None]
                  ) -> Callable[[], None]:
    def resolve() -> None:
        if not future.done():
            future.set_result(None)

    def wake() -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            loop.call_soon_threadsafe(resolve)

    return wake


def _scope(database: str | None, collection: str | None) -> Scope:
    if collection is not None and database is None:
        raise ValueError("a collection's change stream needs its database")
    if database in _INTERNAL_DATABASES or _is_system(collection):
        raise server_error(73, "InvalidNamespace",
                           f"$changeStream may not be opened on the internal "
                           f"{database}{'.' + collection if collection else ''} namespace")
    return Scope(database, collection)


def _check_option(name: str, value: str | None, faithful: tuple[str, ...]) -> None:
    if value is None or value in faithful:
        return
    if value in _IMAGES:
        raise UnsupportedByMemoryBackend(
            f"{name}={value!r}: the in-memory back end keeps no pre- or post-images "
            "(changeStreamPreAndPostImages)"
        )
    raise server_error(2, "BadValue",
                       f"Enumeration value '{value}' for field '{name}' is not a valid value.")


def _compile(pipeline: Sequence[Mapping[str, Any]] | None) -> list[tuple[str, Any]]:
    """The stages after ``$changeStream``: ``$match`` and ``$project`` only."""
    if pipeline is None:
        return []
    if not isinstance(pipeline, list | tuple):
        raise TypeError(f"pipeline must be a list, not {type(pipeline).__name__}")
    stages: list[tuple[str, Any]] = []
    for stage in pipeline:
        if not isinstance(stage, Mapping) or len(stage) != 1:
            raise server_error(40323, "Location40323", "A pipeline stage specification "
                               "object must contain exactly one field.")
        ((name, spec),) = stage.items()
        if name not in ("$match", "$project"):
            raise UnsupportedByMemoryBackend(
                f"{name} in a change stream pipeline: the in-memory back end runs only "
                "$match and $project there"
            )
        if not isinstance(spec, Mapping):
            raise server_error(15959 if name == "$match" else 15969, "FailedToParse",
                               f"the {name} specification must be an object")
        refuse_unfaithful(spec, f"{name} in a change stream")
        if name == "$match":
            spec = stored_dates(spec)
        stages.append((name, spec))
    return stages
