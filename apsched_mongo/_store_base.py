"""What every part of the data store shares: the collections, the retry loop, inserts
decided by a token, publishing, and the picture of the queue (see :class:`MongoDBDataStore`,
which is assembled from this base, :mod:`._schedule_store` and :mod:`._job_store`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from contextvars import ContextVar
from datetime import datetime, timedelta
from time import monotonic
from typing import Any, TypeVar
from uuid import uuid4

from apscheduler import (
    DeserializationError,
    Event,
)
from apscheduler.abc import Serializer
from apscheduler.datastores.base import BaseExternalDataStore
from pymongo import ASCENDING
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteConcernError

from ._clock import ServerClock
from ._queue_view import QueueView
from ._retry import retrying

T = TypeVar("T")
_DUPLICATE_KEY = 11000
JOB_ORDER = [("queue_order", ASCENDING), ("_id", ASCENDING)]

#: How long a node that took over abandoned jobs, or marked schedules for removal, has to
#: finish before another node may take the work over from it (it crashed meanwhile).
TAKEOVER_WINDOW = timedelta(seconds=60)

#: The store whose publish() call is delivering an event right now (its own events are
#: applied to its queue view directly, with more detail than the event carries)
publishing: ContextVar[object] = ContextVar("apsched_mongo_publishing", default=None)


class StoreBase(BaseExternalDataStore):
    """The state and plumbing the schedule and job parts of the store share."""

    local_clock: Callable[[], datetime]
    _client: Any
    _clock: ServerClock
    _tasks: Any
    _schedules: Any
    _jobs: Any
    _results: Any
    _view: QueueView
    _task_documents: dict[str, tuple[float, dict[str, Any]]]
    _task_grants: dict[str, list[tuple[float, int]]]
    #: schedules this store claimed from a holder that never released them
    _recovering: set[str]

    async def _run(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one MongoDB operation, retrying temporary failures only."""
        async for attempt in retrying(self.retry_settings, self._logger, what):
            with attempt:
                return await operation()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _run_with_retry_flag(
        self, what: str, operation: Callable[[bool], Awaitable[T]]
    ) -> T:
        """Like :meth:`_run`, telling ``operation`` whether an earlier attempt may have
        reached the server (so it must find out what that attempt did)."""
        attempts = 0

        async def attempt() -> T:
            nonlocal attempts
            attempts += 1
            return await operation(attempts > 1)

        return await self._run(what, attempt)

    async def _insert_once(self, what: str, collection: Any, document: dict[str, Any], *,
                           seen: Callable[[], bool] = lambda: False) -> bool:
        """Insert ``document`` (it gets a fresh ``insert_token``); True if this call
        inserted it, False if a document with its ``_id`` existed already.

        After a failed attempt that may have reached the server, the next one first looks
        for the document: it is ours if it carries our token (the server's state decides,
        not the attempt count). If it is absent, our earlier attempt either never landed or
        landed and was already consumed (a job claimed, run and released by another node
        meanwhile); ``seen`` tells the latter from what this node has heard, and only
        otherwise is the document inserted again.
        """
        token = document["insert_token"] = uuid4().hex

        async def insert(retrying: bool) -> bool:
            if retrying:
                existing = await collection.find_one({"_id": document["_id"]},
                                                     projection={"insert_token": True})
                if existing is not None:
                    return bool(existing.get("insert_token") == token)
                if seen():
                    return True
            try:
                await collection.insert_one(document)
            except DuplicateKeyError as exc:
                if not _duplicate_of(exc, "_id"):
                    raise  # another unique index: the caller decides
                return False
            return True

        return await self._run_with_retry_flag(what, insert)

    async def _find(self, what: str, collection: Any, *args: Any, **kwargs: Any) -> list[Any]:
        async def find() -> list[Any]:
            documents: list[Any] = await collection.find(*args, **kwargs).to_list(None)
            return documents

        return await self._run(what, find)

    async def _aggregate(self, what: str, collection: Any,
                         pipeline: list[dict[str, Any]]) -> list[dict[str, Any]]:
        async def aggregate() -> list[dict[str, Any]]:
            documents: list[dict[str, Any]] = await (
                await collection.aggregate(pipeline)
            ).to_list(None)
            return documents

        return await self._run(what, aggregate)

    async def _server_now(self) -> datetime:
        return await self._run("clock", lambda: self._clock.now(self._client.admin))

    def _decode_each(
        self, documents: Iterable[dict[str, Any]],
        decode: Callable[[dict[str, Any], Serializer], T],
    ) -> list[T]:
        """Decode what can be decoded; log and skip corrupt or foreign documents (nothing
        is deleted: an operator can inspect and repair them)."""
        decoded = []
        for document in documents:
            try:
                decoded.append(decode(document, self.serializer))
            except DeserializationError as exc:
                self._logger.warning("Skipping %s", exc)
        return decoded

    async def _publish(self, event: Event) -> None:
        token = publishing.set(self)
        try:
            await self._event_broker.publish(event)
        finally:
            publishing.reset(token)

    async def _publish_all(self, events: Iterable[Event]) -> None:
        for event in events:
            await self._publish(event)

    def _running_lookup(self) -> dict[str, Any]:
        """``$lookup`` of the running (claimed) jobs of each task: ``_id`` and ``slot``."""
        return {"$lookup": {"from": self._jobs.name, "localField": "_id",
                            "foreignField": "task_id",
                            "pipeline": [{"$match": {"acquired_by": {"$ne": None}}},
                                         {"$project": {"slot": True}}],
                            "as": "running"}}

    def _learn_task(self, document: dict[str, Any]) -> None:
        self._task_documents[document["_id"]] = (monotonic(), document)
        self._view.learn_limit(document["_id"], document.get("max_running_jobs"))


def _duplicate_of(exc: DuplicateKeyError, field: str) -> bool:
    """Whether the duplicate key is in the unique index whose last field is ``field``
    (``_id``, ``slot`` of ``apsched_task_slot``, ``scheduled_fire_time`` of
    ``apsched_fire``): from the server's ``keyPattern``, or its message before 4.4."""
    pattern = (exc.details or {}).get("keyPattern")
    if pattern:
        return bool(list(pattern)[-1] == field)
    index = {"_id": "_id_", "slot": "apsched_task_slot",
             "scheduled_fire_time": "apsched_fire"}[field]
    return f"index: {index} " in str(exc)


def _raise_unless_duplicates(exc: BulkWriteError) -> None:
    """Duplicate keys in an unordered bulk are expected where they mean "already there" or
    "slot taken"; anything else, and any write-concern error, is raised (the retry layer
    then decides whether it is temporary)."""
    errors = exc.details.get("writeErrors") or []
    if any(error.get("code") != _DUPLICATE_KEY for error in errors):
        raise exc
    concern_errors = exc.details.get("writeConcernErrors") or []
    if concern_errors:
        last = concern_errors[-1]
        raise WriteConcernError(last.get("errmsg", "write concern error"), last.get("code"),
                                last)

