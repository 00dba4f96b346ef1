"""MongoDBEventBroker: APScheduler 4 events between nodes through one MongoDB collection."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta
from logging import Logger
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from uuid import uuid4

import anyio
import attrs
from apscheduler import Event, SerializationError, _events
from apscheduler.eventbrokers.base import BaseExternalEventBroker
from bson import ObjectId
from bson.errors import InvalidDocument
from pymongo import ASCENDING, DESCENDING
from pymongo.errors import CursorNotFound, DuplicateKeyError, OperationFailure, PyMongoError
from tenacity import AsyncRetrying, RetryCallState

from ._client import (
    MAJORITY_TIMEOUT,
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
from ._validators import positive, positive_or_zero
from .errors import ApschedMongoError

if TYPE_CHECKING:
    from pymongo import AsyncMongoClient

    from .memory import MemoryMongoClient

T = TypeVar("T")
Mode = Literal["auto", "change_stream", "polling"]
MODES = ("auto", "change_stream", "polling")

_NO_CHANGE_STREAMS = 40573  # "$changeStream is only supported on replica sets"
# The resume token is useless: its history left the oplog (286), the server gave up on the
# stream (280) or does not recognise the token (260). Resuming is impossible.
_TOKEN_LOST = frozenset({260, 280, 286})

#: Events in one document at most, and their serialized size at most (BSON's limit for a
#: whole document is 16 MiB)
MAX_BATCH_EVENTS = 1000
MAX_BATCH_BYTES = 4 * 1024 * 1024
#: One event larger than this cannot be sent at all
MAX_EVENT_BYTES = 15 * 1024 * 1024
#: Events waiting to be sent at most; publish() waits for room beyond that
MAX_OUTBOX = 10_000


@asynccontextmanager
async def _closing(stream: Any) -> AsyncIterator[Any]:
    """Close a change stream even when cancelled (shutdown), so the server-side cursor is
    killed now rather than when the server times it out."""
    try:
        yield stream
    finally:
        with anyio.CancelScope(shield=True):
            await stream.close()


def _check_collection(instance: Any, attribute: Any, value: Any) -> None:
    check_collection_prefix(instance, attribute, value)
    if not value:
        raise ValueError("collection must be a non-empty string")


def _check_mode(instance: Any, attribute: Any, value: Any) -> None:
    if value not in MODES:
        raise ValueError(
            f"mode must be one of {', '.join(repr(mode) for mode in MODES)}, not {value!r}"
        )


def _timedelta(value: Any) -> Any:
    """Seconds or a timedelta; anything else is left for the validator to name."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    return value


@attrs.define(eq=False, repr=False)
class MongoDBEventBroker(BaseExternalEventBroker):
    """Broadcasts events to the other nodes through a MongoDB collection.

    A node delivers its own events locally at once and never receives them back. Events
    are sent to the server in batches: one document (``node``, ``seq``, ``created_at``,
    ``events``) carries every event published while the previous document was being
    written, or within ``publish_delay`` of the first of them, in publish order. A TTL index
    removes documents after ``retention``. Other nodes receive them by

    * **change stream** (replica sets and sharded clusters): a ``watch()`` on inserts from
      other nodes. The last resume token is kept; after a resumable error (lost connection,
      primary step-down; PyMongo resumes once by itself) the stream is reopened with
      ``startAfter`` that token, so nothing is lost or repeated. Temporary errors are
      retried forever, spaced out by ``retry_settings.wait``. Non-resumable cases:

      - ``invalidate`` (collection dropped or renamed): the indexes are re-created and the
        stream reopened after the invalidate event (WARNING);
      - resume token unusable (``ChangeStreamHistoryLost`` 286, 280, 260): logged as an
        ERROR saying events may have been missed, then the stream restarts from now;
      - any other error (authorization, ...): logged as an ERROR and the listener stops;
        this node still publishes and still runs on its own timers, but no longer hears
        other nodes.

    * **polling** (standalone servers, ``mode="polling"``): every ``poll_interval``, one
      query for the documents after the last ``seq`` seen from each known node, plus any
      document of a node not seen before (stamped within ``poll_lookback``). Each node's
      documents become visible in ``seq`` order (it writes one at a time), so nothing is
      skipped or repeated, and the query's cost follows the number of nodes and of new
      documents, not the event rate. A temporary error is retried at the next poll; any
      other stops the listener, logged as above.

    A foreign or corrupt document is logged as a WARNING and skipped; a batch that cannot
    be sent (after ``retry_settings``) is logged as an ERROR with its event count. After
    ``start()``, :attr:`active_mode` tells which of the two modes this node uses.

    :param client_or_uri: a MongoDB URI, a :class:`pymongo.AsyncMongoClient` or a
        :class:`~apsched_mongo.memory.MemoryMongoClient` (it may be shared with the data
        store; only clients created from a URI are closed by the broker)
    :param database: database name
    :param collection: name of the events collection
    :param retention: how long event documents are kept (the TTL index's lifetime)
    :param poll_interval: time between polls when polling
    :param poll_lookback: how late the first document of a newly started node may become
        visible to a poll and still be delivered (must be shorter than ``retention``)
    :param publish_delay: how long an event may wait for others to share its document
        (seconds; 0 sends at once, batching only what accumulates during a write)
    :param mode: ``"auto"`` (change streams where the server has them, else polling),
        ``"change_stream"`` (fail at start if unavailable) or ``"polling"``
    :param write_timeout: seconds a write may wait for a majority of the replica set
    :param clock_refresh_interval: seconds between re-measurements of the server's clock
    :param local_clock: this node's clock (a testing aid for clock-skew drills)
    """

    client_or_uri: str | AsyncMongoClient[Any] | MemoryMongoClient = attrs.field()
    database: str = attrs.field(default="apscheduler", kw_only=True, validator=check_database_name)
    collection: str = attrs.field(
        default="apsched_events", kw_only=True, validator=_check_collection
    )
    retention: timedelta = attrs.field(
        default=timedelta(minutes=10), kw_only=True, converter=_timedelta, validator=positive
    )
    poll_interval: timedelta = attrs.field(
        default=timedelta(seconds=0.5), kw_only=True, converter=_timedelta, validator=positive
    )
    poll_lookback: timedelta = attrs.field(
        default=timedelta(seconds=10), kw_only=True, converter=_timedelta, validator=positive
    )
    publish_delay: float = attrs.field(default=0.005, kw_only=True, validator=positive_or_zero)
    mode: Mode = attrs.field(default="auto", kw_only=True, validator=_check_mode)
    write_timeout: float = attrs.field(default=MAJORITY_TIMEOUT, kw_only=True,
                                       validator=positive)
    clock_refresh_interval: float = attrs.field(default=60.0, kw_only=True, validator=positive)
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
    _seq: int = attrs.field(init=False, default=0)
    _outbox: list[dict[str, Any]] = attrs.field(init=False, factory=list)
    #: when the oldest event in the outbox was published (anyio's clock)
    _oldest_at: float = attrs.field(init=False, default=0.0)
    _outbox_changed: anyio.Event = attrs.field(init=False, factory=anyio.Event)
    _stopping: bool = attrs.field(init=False, default=False)
    _sending: bool = attrs.field(init=False, default=False)
    _sender_done: anyio.Event = attrs.field(init=False, factory=anyio.Event)
    _token: Any = attrs.field(init=False, default=None)  # last change stream resume token
    #: polling: node -> (last seq delivered, server time of that document)
    _cursors: dict[str, tuple[int, datetime]] = attrs.field(init=False, factory=dict)
    _since: datetime | None = attrs.field(init=False, default=None)
    #: polling: documents without a usable (node, seq), already reported
    _junk: OrderedDict[Any, datetime] = attrs.field(init=False, factory=OrderedDict)

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

    async def _ensure_indexes(self) -> None:
        seconds = int(self.retention.total_seconds())
        await ensure_indexes(self._collection, [
            IndexSpec("apsched_ttl", [("created_at", ASCENDING)],
                      expire_after_seconds=seconds),
            IndexSpec("apsched_node_seq", [("node", ASCENDING), ("seq", ASCENDING)]),
        ])

    # --- life cycle -------------------------------------------------------------------------

    async def start(self, exit_stack: AsyncExitStack, logger: Logger) -> None:
        if self._uri is not None:
            # Created here, not in __init__, so the client belongs to the running event loop
            self._client = create_client(self._uri)
            exit_stack.push_async_callback(self._client.close)  # after the listener is gone

        await super().start(exit_stack, logger)
        # A restarted broker listens from now on, like a new one
        self._token, self._since, self._cursors, self._junk = None, None, {}, OrderedDict()
        self._outbox, self._seq, self._stopping = [], 0, False
        self._sender_done = anyio.Event()
        database = database_of(self._client, self.database, self.write_timeout)
        self._collection = database.get_collection(self.collection)
        started = self._clock.monotonic()
        hello = await ping(self._client, self._uri)
        self._clock.observe(hello, self._clock.monotonic() - started)
        await self._run("creating the events indexes", self._ensure_indexes)

        stream = await self._open_first_stream(hello)
        if stream is not None:
            self.active_mode = "change_stream"
            self._task_group.start_soon(self._follow_stream, stream, name=self._listener_name)
        else:
            self.active_mode = "polling"
            # Documents already there predate this node: start after them
            await self._run("reading the events collection", self._start_polling)
            self._task_group.start_soon(self._poll_forever, name=self._listener_name)
        self._task_group.start_soon(
            self._send_forever, name=f"{type(self).__name__} sender (node {self._node_id})"
        )
        # On exit (last in, first out): send what is still queued, then stop the tasks
        exit_stack.callback(self._task_group.cancel_scope.cancel)
        exit_stack.push_async_callback(self._stop_sending)

    @property
    def _listener_name(self) -> str:
        return f"{type(self).__name__} listener ({self.active_mode}, node {self._node_id})"

    async def publish(self, event: Event) -> None:
        """Deliver ``event`` to local subscribers at once, then queue it for the others."""
        payload = self.serializer.serialize(event.marshal())  # SerializationError: not sent
        if len(payload) > MAX_EVENT_BYTES:
            raise SerializationError(
                f"cannot send {type(event).__name__}: {len(payload)} bytes serialized, over "
                f"the {MAX_EVENT_BYTES} bytes that fit in a MongoDB document"
            )
        await self.publish_local(event)
        while len(self._outbox) >= MAX_OUTBOX:  # the server is unreachable: wait for room
            await self._outbox_changed.wait()
        if not self._outbox:
            self._oldest_at = anyio.current_time()
        self._outbox.append({"type": type(event).__name__, "payload": payload})
        self._signal_outbox()

    def _signal_outbox(self) -> None:
        self._outbox_changed.set()
        self._outbox_changed = anyio.Event()

    async def flush(self) -> None:
        """Wait until every event published so far has been written (or given up on and
        logged): before a planned shutdown, or in tests that need other nodes to be able
        to read what was published."""
        while self._outbox or self._sending:
            await self._outbox_changed.wait()

    # --- sending ----------------------------------------------------------------------------

    async def _send_forever(self) -> None:
        """One document at a time, in publish order (so each node's documents become
        visible in ``seq`` order): the next is built from whatever was published while the
        previous one was being written, or within ``publish_delay`` of its first event."""
        try:
            while True:
                while not self._outbox:
                    if self._stopping:
                        return
                    await self._outbox_changed.wait()
                # Linger for more events, until publish_delay after the oldest one was
                # published (however long the previous write took). The deadline is checked
                # on every wake-up: under a steady stream a timeout alone may never fire
                deadline = self._oldest_at + self.publish_delay
                while (len(self._outbox) < MAX_BATCH_EVENTS and not self._stopping
                       and (left := deadline - anyio.current_time()) > 0):
                    with anyio.move_on_after(left):
                        await self._outbox_changed.wait()
                await self._send_batch()
        finally:
            self._sender_done.set()

    async def _stop_sending(self) -> None:
        """At shutdown, let the sender empty the queue, for at most a few seconds."""
        self._stopping = True
        self._signal_outbox()
        with anyio.move_on_after(5, shield=True):
            await self._sender_done.wait()

    def _take_batch(self) -> list[dict[str, Any]]:
        """The oldest events that fit in one document."""
        count = size = 0
        for event in self._outbox:
            size += len(event["payload"])
            if count and (count >= MAX_BATCH_EVENTS or size > MAX_BATCH_BYTES):
                break
            count += 1
        batch, self._outbox = self._outbox[:count], self._outbox[count:]
        self._oldest_at = anyio.current_time()  # what is left was published by now
        self._signal_outbox()
        return batch

    async def _send_batch(self) -> None:
        self._sending = True
        try:
            await self._send(self._take_batch())
        finally:
            self._sending = False
            self._signal_outbox()

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        self._seq += 1
        document: dict[str, Any] = {
            "_id": ObjectId(),  # fixed before the first attempt: a retry cannot duplicate it
            "node": self._node_id,
            "seq": self._seq,
            "events": batch,
        }

        async def insert() -> None:
            document["created_at"] = await self._clock.now(self._client.admin)
            try:
                await self._collection.insert_one(document)
            except DuplicateKeyError:
                pass  # our own _id: an earlier attempt landed
            except InvalidDocument as exc:  # cannot happen within the size limits above
                raise SerializationError(f"cannot store events: {exc}") from exc

        try:
            await self._run("sending events", insert)
        except (PyMongoError, SerializationError) as exc:
            self._logger.error(
                "%s: %d event(s) could not be sent to other nodes: %r",
                type(self).__name__, len(batch), exc,
            )

    # --- receiving --------------------------------------------------------------------------

    async def _deliver(self, document: Any) -> None:
        """Deliver the events of one document (or of an older version's single event)."""
        try:
            items = document.get("events", [document])
            if not isinstance(items, list):
                raise TypeError("events is not a list")
        except Exception as exc:
            self._report_corrupt(document, exc)
            return
        for item in items:
            try:
                event_class = getattr(_events, item["type"])
                if not (isinstance(event_class, type) and issubclass(event_class, Event)):
                    raise TypeError(f"{item['type']!r} is not an event class")
                if not isinstance(item["payload"], bytes):
                    raise TypeError("the payload is not binary")
                event = event_class.unmarshal(self.serializer.deserialize(item["payload"]))
            except Exception as exc:
                self._report_corrupt(document, exc)
                continue
            await self.publish_local(event)

    def _report_corrupt(self, document: Any, exc: Exception) -> None:
        _id = document.get("_id") if isinstance(document, dict) else None
        self._logger.warning(
            "Skipping a foreign or corrupt document (_id=%r) in %s: %r",
            _id, self._collection.full_name, exc,
        )

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
                                "%s: %s was dropped or renamed; re-creating its indexes "
                                "and listening again", type(self).__name__,
                                self._collection.full_name,
                            )
                            self._token = change["_id"]
                            await self._ensure_indexes()
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

    async def _start_polling(self) -> None:
        """Begin after every document already stored: the last ``seq`` of each node."""
        self._since = await self._clock.now(self._client.admin)
        pipeline = [
            {"$sort": {"node": ASCENDING, "seq": DESCENDING}},
            {"$group": {"_id": "$node", "seq": {"$first": "$seq"},
                        "created_at": {"$first": "$created_at"}}},
        ]
        latest = await (await self._collection.aggregate(pipeline)).to_list(None)
        self._cursors = {
            document["_id"]: (document["seq"], document["created_at"])
            for document in latest
            if isinstance(document["_id"], str) and isinstance(document.get("seq"), int)
            and isinstance(document.get("created_at"), datetime)
        }

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

    async def _poll_once(self) -> None:
        """Deliver the documents of other nodes that became visible since the last poll:
        for each known node, those after the last ``seq`` delivered; for nodes not seen
        yet, those stamped within ``poll_lookback`` (the window never moves back, and
        ``created_at`` is the *server's* time, so node clock skew does not matter)."""
        now = await self._clock.now(self._client.admin)
        since = max(now - self.poll_lookback, self._since or now)
        self._since = since
        self._forget_old(now)
        known = sorted(self._cursors)
        clauses: list[dict[str, Any]] = [
            {"node": node, "seq": {"$gt": self._cursors[node][0]}} for node in known
        ]
        clauses.append({"node": {"$nin": [*known, self._node_id]},
                        "created_at": {"$gte": since}})
        query: dict[str, Any] = clauses[0] if len(clauses) == 1 else {"$or": clauses}
        if self._junk:
            query = {"$and": [query, {"_id": {"$nin": list(self._junk)}}]}
        cursor = self._collection.find(
            query, sort=[("created_at", ASCENDING), ("node", ASCENDING), ("seq", ASCENDING)]
        )
        for document in await cursor.to_list(None):
            node, seq = document.get("node"), document.get("seq")
            if node == self._node_id:
                continue
            if not (isinstance(node, str) and isinstance(seq, int)):
                self._junk[document.get("_id")] = now  # report it once, not every poll
                await self._deliver(document)
                continue
            if seq <= self._cursors.get(node, (0, now))[0]:
                continue  # out of order within one poll: already delivered
            self._cursors[node] = (seq, document.get("created_at") or now)
            await self._deliver(document)

    def _forget_old(self, now: datetime) -> None:
        """Drop nodes silent for longer than the retention (their documents are gone,
        so none can come back) and junk older than the lookback (no query returns it)."""
        horizon = now - self.retention - timedelta(minutes=2)
        self._cursors = {node: cursor for node, cursor in self._cursors.items()
                         if cursor[1] >= horizon}
        while self._junk and next(iter(self._junk.values())) < now - self.poll_lookback * 2:
            self._junk.popitem(last=False)

