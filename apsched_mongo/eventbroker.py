"""MongoDBEventBroker: APScheduler 4 events between nodes through one MongoDB collection."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta
from logging import Logger
from time import monotonic
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from uuid import uuid4

import anyio
import attrs
from apscheduler import Event, SerializationError, _events
from apscheduler.eventbrokers.base import BaseExternalEventBroker
from attrs.validators import in_
from bson import ObjectId
from bson.errors import InvalidDocument
from pymongo import ASCENDING
from pymongo.errors import CursorNotFound, DuplicateKeyError, OperationFailure, PyMongoError
from tenacity import AsyncRetrying, RetryCallState

from ._client import (
    accept_client_or_uri,
    create_client,
    database_of,
    describe_hosts,
    ping,
    redact_uri,
)
from ._clock import ServerClock, utc_now
from ._indexes import IndexSpec, ensure_indexes
from ._names import check_collection_prefix, check_database_name
from ._retry import is_temporary, retrying
from .errors import ApschedMongoError

if TYPE_CHECKING:
    from pymongo import AsyncMongoClient

    from .memory import MemoryMongoClient

T = TypeVar("T")
Mode = Literal["auto", "change_stream", "polling"]

_NO_CHANGE_STREAMS = 40573  # "$changeStream is only supported on replica sets"
# The resume token is useless: its history left the oplog (286), the server gave up on the
# stream (280) or does not recognise the token (260). Resuming is impossible.
_TOKEN_LOST = frozenset({260, 280, 286})


@asynccontextmanager
async def _closing(stream: Any) -> AsyncIterator[Any]:
    """Close a change stream even when cancelled (shutdown), so the server-side cursor is
    killed now rather than when the server times it out."""
    try:
        yield stream
    finally:
        with anyio.CancelScope(shield=True):
            await stream.close()


def _as_timedelta(value: timedelta | float) -> timedelta:
    return value if isinstance(value, timedelta) else timedelta(seconds=value)


def _check_collection(instance: Any, attribute: Any, value: Any) -> None:
    check_collection_prefix(instance, attribute, value)
    if not value:
        raise ValueError("collection must be a non-empty string")


def _positive(instance: Any, attribute: attrs.Attribute[timedelta], value: timedelta) -> None:
    if value <= timedelta(0):
        raise ValueError(f"{attribute.name} must be positive, not {value}")


@attrs.define(eq=False, repr=False)
class MongoDBEventBroker(BaseExternalEventBroker):
    """Broadcasts events to the other nodes by inserting them into a MongoDB collection.

    Each event is one document (``node``, ``type``, serialized ``payload``, ``created_at``)
    that a TTL index removes after ``retention``. A node delivers its own events locally at
    once and never receives them back. Other nodes receive them by

    * **change stream** (replica sets and sharded clusters): a ``watch()`` on inserts from
      other nodes. The last resume token is kept; after a resumable error (lost connection,
      primary step-down; PyMongo resumes once by itself) the stream is reopened with
      ``startAfter`` that token, so nothing is lost or repeated. Temporary errors are
      retried forever, spaced out by ``retry_settings.wait``. Non-resumable cases:

      - ``invalidate`` (collection dropped or renamed): the TTL index is re-created and the
        stream reopened after the invalidate event (WARNING);
      - resume token unusable (``ChangeStreamHistoryLost`` 286, 280, 260): logged as an
        ERROR saying events may have been missed, then the stream restarts from now;
      - any other error (authorization, ...): logged as an ERROR and the listener stops;
        this node still publishes and still runs on its own timers, but no longer hears
        other nodes.

    * **polling** (standalone servers, the in-memory back end, ``mode="polling"``): every
      ``poll_interval``, a query for other nodes' events in a look-back window, de-duplicated
      by ``_id`` (:meth:`_poll_once` says why). A temporary error is retried at the next
      poll; any other stops the listener, logged as above.

    A foreign or corrupt document is logged as a WARNING and skipped. After ``start()``,
    :attr:`active_mode` tells which of the two this node uses.

    :param client_or_uri: a MongoDB URI, a :class:`pymongo.AsyncMongoClient` or a
        :class:`~apsched_mongo.memory.MemoryMongoClient` (it may be shared with the data
        store; only clients created from a URI are closed by the broker)
    :param database: database name
    :param collection: name of the events collection
    :param retention: how long event documents are kept (the TTL index's lifetime)
    :param poll_interval: time between polls when polling
    :param poll_lookback: how late an event may become visible to a poll and still be
        delivered (must be shorter than ``retention``)
    :param mode: ``"auto"`` (change streams where the server has them, else polling),
        ``"change_stream"`` (fail at start if unavailable) or ``"polling"``
    :param clock_refresh_interval: seconds between re-measurements of the server's clock
    :param local_clock: this node's clock (a testing aid for clock-skew drills)
    """

    client_or_uri: str | AsyncMongoClient[Any] | MemoryMongoClient = attrs.field()
    database: str = attrs.field(default="apscheduler", kw_only=True, validator=check_database_name)
    collection: str = attrs.field(
        default="apsched_events", kw_only=True, validator=_check_collection
    )
    retention: timedelta = attrs.field(
        default=timedelta(minutes=10), kw_only=True, converter=_as_timedelta, validator=_positive
    )
    poll_interval: timedelta = attrs.field(
        default=timedelta(seconds=0.5), kw_only=True, converter=_as_timedelta, validator=_positive
    )
    poll_lookback: timedelta = attrs.field(
        default=timedelta(seconds=10), kw_only=True, converter=_as_timedelta, validator=_positive
    )
    mode: Mode = attrs.field(
        default="auto", kw_only=True, validator=in_(("auto", "change_stream", "polling"))
    )
    clock_refresh_interval: float = attrs.field(default=60.0, kw_only=True)
    local_clock: Callable[[], datetime] = attrs.field(default=utc_now, kw_only=True)

    #: ``"change_stream"`` or ``"polling"`` once started
    active_mode: Literal["change_stream", "polling"] | None = attrs.field(
        init=False, default=None
    )
    _uri: str | None = attrs.field(init=False, default=None)
    _client: Any = attrs.field(init=False, default=None)
    _collection: Any = attrs.field(init=False, default=None)
    _clock: ServerClock = attrs.field(init=False)
    _node_id: str = attrs.field(init=False, factory=lambda: uuid4().hex)
    _token: Any = attrs.field(init=False, default=None)  # last change stream resume token
    _since: datetime | None = attrs.field(init=False, default=None)  # polling window start
    _seen: list[tuple[Any, datetime]] = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self) -> None:
        self._uri, self._client = accept_client_or_uri(self.client_or_uri)
        if self.poll_lookback >= self.retention:
            raise ValueError("poll_lookback must be shorter than retention")
        if self.retention < timedelta(seconds=1):
            raise ValueError("retention must be at least one second (TTL indexes count seconds)")
        self._clock = ServerClock(self.local_clock, self.clock_refresh_interval)

    def __repr__(self) -> str:
        where = redact_uri(self._uri) if self._uri else describe_hosts(self._client)
        return (
            f"{type(self).__name__}({where!r}, database={self.database!r}, "
            f"collection={self.collection!r}, mode={self.mode!r})"
        )

    # --- plumbing ---------------------------------------------------------------------------

    async def _run(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one MongoDB operation, retrying temporary failures only."""
        async for attempt in retrying(self.retry_settings, self._logger, what):
            with attempt:
                return await operation()
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures, per ``retry_settings``."""
        state = RetryCallState(AsyncRetrying(), None, (), {})
        state.attempt_number = failures
        return float(self.retry_settings.wait(state))

    async def _ensure_ttl_index(self) -> None:
        seconds = int(self.retention.total_seconds())
        spec = IndexSpec("apsched_ttl", [("created_at", ASCENDING)], expire_after_seconds=seconds)
        await ensure_indexes(self._collection, [spec])

    # --- life cycle -------------------------------------------------------------------------

    async def start(self, exit_stack: AsyncExitStack, logger: Logger) -> None:
        if self._uri is not None:
            # Created here, not in __init__, so the client belongs to the running event loop
            self._client = create_client(self._uri)
            exit_stack.push_async_callback(self._client.close)  # after the listener is gone

        await super().start(exit_stack, logger)
        # A restarted broker listens from now on, like a new one
        self._token, self._since, self._seen = None, None, []
        database = database_of(self._client, self.database)
        self._collection = database.get_collection(self.collection)
        sent_at, started = self.local_clock(), monotonic()
        hello = await ping(self._client, self._uri)
        self._clock.observe(hello, sent_at, monotonic() - started)
        await self._run("creating the events TTL index", self._ensure_ttl_index)

        stream = await self._open_first_stream(hello)
        if stream is not None:
            self.active_mode = "change_stream"
            self._task_group.start_soon(self._follow_stream, stream, name=self._listener_name)
        else:
            self.active_mode = "polling"
            # Events already in the window predate this node: mark them seen, don't deliver
            await self._run("reading the events collection", lambda: self._poll_once(False))
            self._task_group.start_soon(self._poll_forever, name=self._listener_name)
        exit_stack.callback(self._task_group.cancel_scope.cancel)

    @property
    def _listener_name(self) -> str:
        return f"{type(self).__name__} listener ({self.active_mode}, node {self._node_id})"

    async def publish(self, event: Event) -> None:
        """Deliver ``event`` to local subscribers at once, then store it for the others."""
        payload = self.serializer.serialize(event.marshal())  # SerializationError: no insert
        await self.publish_local(event)
        document = {
            "_id": ObjectId(),  # fixed before the first attempt: a retry cannot duplicate it
            "node": self._node_id,
            "type": type(event).__name__,
            "payload": payload,
        }
        first = True

        async def insert() -> None:
            nonlocal first
            document["created_at"] = await self._clock.now(self._client.admin)
            try:
                await self._collection.insert_one(document)
            except DuplicateKeyError:
                if first:
                    raise
                # a duplicate _id on a retry means the earlier attempt landed
            except InvalidDocument as exc:  # e.g. larger than the 16 MiB BSON limit
                raise SerializationError(f"cannot store {type(event).__name__}: {exc}") from exc
            finally:
                first = False

        await self._run("publishing an event", insert)

    # --- receiving --------------------------------------------------------------------------

    async def _deliver(self, document: Any) -> None:
        try:
            event_class = getattr(_events, document["type"])
            if not (isinstance(event_class, type) and issubclass(event_class, Event)):
                raise TypeError(f"{document['type']!r} is not an event class")
            if not isinstance(document["payload"], bytes):
                raise TypeError("the payload is not binary")
            event = event_class.unmarshal(self.serializer.deserialize(document["payload"]))
        except Exception as exc:
            _id = document.get("_id") if isinstance(document, dict) else None
            self._logger.warning(
                "Skipping a foreign or corrupt document (_id=%r) in %s: %r",
                _id, self._collection.full_name, exc,
            )
            return
        await self.publish_local(event)

    # change streams

    async def _open_first_stream(self, hello: dict[str, Any]) -> Any:
        """The first change stream, or ``None`` when this node must poll instead."""
        if self.mode == "polling":
            return None
        if self.mode == "auto" and not ("setName" in hello or hello.get("msg") == "isdbgrid"):
            self._logger.info(
                "%s: the server is standalone (no change streams); polling %s every %.3g s",
                type(self).__name__, self._collection.full_name,
                self.poll_interval.total_seconds(),
            )
            return None
        try:
            return await self._run("opening the change stream", self._open_stream)
        except OperationFailure as exc:
            if exc.code != _NO_CHANGE_STREAMS:
                raise
            if self.mode == "change_stream":
                raise ApschedMongoError(
                    "mode='change_stream' but the server does not support change streams "
                    "(it is not a replica set or sharded cluster)"
                ) from exc
            self._logger.info(
                "%s: change streams are unavailable (%s); polling %s every %.3g s",
                type(self).__name__, exc, self._collection.full_name,
                self.poll_interval.total_seconds(),
            )
            return None

    async def _open_stream(self) -> Any:
        # The invalidate event passes the $match so that we learn its token. startAfter
        # (unlike resumeAfter) accepts any token, the invalidate's included.
        pipeline = [{"$match": {
            "operationType": {"$in": ["insert", "invalidate"]},
            "fullDocument.node": {"$ne": self._node_id},
        }}]
        stream = await self._collection.watch(pipeline, start_after=self._token)
        self._token = stream.resume_token  # the empty first batch's postBatchResumeToken
        return stream

    async def _follow_stream(self, stream: Any) -> None:
        failures = 0
        while True:
            try:
                if stream is None:
                    stream = await self._open_stream()
                async with _closing(stream):
                    while stream.alive:
                        change = await stream.try_next()
                        failures = 0
                        self._token = stream.resume_token
                        if change is None:
                            continue
                        if change.get("operationType") == "invalidate":
                            self._logger.warning(
                                "%s: %s was dropped or renamed; re-creating its TTL index "
                                "and listening again", type(self).__name__,
                                self._collection.full_name,
                            )
                            self._token = change["_id"]
                            await self._ensure_ttl_index()
                        else:
                            await self._deliver(change.get("fullDocument"))
            except PyMongoError as exc:
                if not self._can_go_on(exc):
                    return
                failures += 1
                if failures > 1:  # the first reopen is immediate
                    await anyio.sleep(self._backoff(failures - 1))
            stream = None

    def _can_go_on(self, exc: PyMongoError) -> bool:
        """Decide what a change stream error means; see the class docstring."""
        name, where = type(self).__name__, self._collection.full_name
        if isinstance(exc, OperationFailure) and exc.code in _TOKEN_LOST:
            self._logger.error(
                "%s: cannot resume the change stream on %s (%s); events published meanwhile "
                "may have been missed; listening from now on", name, where, exc,
            )
            self._token = None
            return True
        if (
            is_temporary(exc)
            or isinstance(exc, CursorNotFound)
            or exc.has_error_label("ResumableChangeStreamError")
        ):
            self._logger.warning(
                "%s: change stream on %s interrupted (%r); resuming", name, where, exc
            )
            return True
        self._logger.error(
            "%s: stopped listening on %s after a non-retryable error; this node no longer "
            "receives other nodes' events", name, where, exc_info=exc,
        )
        return False

    # polling

    async def _poll_forever(self) -> None:
        failures = 0
        while True:
            await anyio.sleep(
                max(self.poll_interval.total_seconds(), self._backoff(failures) if failures else 0)
            )
            try:
                await self._poll_once()
            except PyMongoError as exc:
                if not is_temporary(exc):
                    self._logger.error(
                        "%s: stopped polling %s after a non-retryable error; this node no "
                        "longer receives other nodes' events", type(self).__name__,
                        self._collection.full_name, exc_info=exc,
                    )
                    return
                failures += 1
                self._logger.warning("%s: poll failed (%r)", type(self).__name__, exc)
            else:
                failures = 0

    async def _poll_once(self, deliver: bool = True) -> None:
        """Deliver the events of other nodes that became visible since the last poll.

        Neither ``_id`` nor ``created_at`` can serve as a cursor ("everything after the
        last one seen"): inserts from several nodes become visible out of that order, so a
        late one would be skipped. Instead every poll reads a window, the last
        ``poll_lookback`` of server time, and leaves out the ``_id`` values already
        delivered (``$nin``). An ``_id`` is forgotten once its ``created_at`` leaves the
        window, after which no query can return it again. The window never moves back, even
        if a clock does. ``created_at`` is stamped with the *server's* time (see
        :class:`~apsched_mongo._clock.ServerClock`), so node clock skew does not matter: an
        event is delivered exactly once provided it becomes visible within
        ``poll_lookback - poll_interval`` of being stamped.

        :param deliver: ``False`` at start: what is already there predates this node
        """
        since = await self._clock.now(self._client.admin) - self.poll_lookback
        self._since = since = max(since, self._since or since)
        self._seen = [(_id, at) for _id, at in self._seen if at >= since]
        query: dict[str, Any] = {
            "created_at": {"$gte": since},
            "node": {"$ne": self._node_id},
        }
        if self._seen:
            query["_id"] = {"$nin": [_id for _id, _ in self._seen]}
        cursor = self._collection.find(query, sort=[("created_at", ASCENDING), ("_id", ASCENDING)])
        for document in await cursor.to_list(None):
            self._seen.append((document["_id"], document["created_at"]))
            if deliver:
                await self._deliver(document)
