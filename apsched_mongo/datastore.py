"""MongoDBDataStore: APScheduler 4's data store on PyMongo's native async API."""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from contextvars import ContextVar
from datetime import datetime, timedelta
from functools import partial
from logging import Logger
from time import monotonic
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID, uuid4

import anyio
import attrs
from apscheduler import (
    ConflictingIdError,
    ConflictPolicy,
    DeserializationError,
    Event,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobRemoved,
    JobResult,
    Schedule,
    ScheduleAdded,
    ScheduleRemoved,
    ScheduleResult,
    ScheduleUpdated,
    SerializationError,
    Task,
    TaskAdded,
    TaskLookupError,
    TaskRemoved,
    TaskUpdated,
)
from apscheduler.abc import EventBroker, Serializer
from apscheduler.datastores.base import BaseExternalDataStore
from apscheduler.eventbrokers.base import BaseExternalEventBroker
from pymongo import ASCENDING, DeleteOne, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError, WriteConcernError

from . import _codec
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
from ._queue_view import UNKNOWN, QueueView
from ._retry import retrying
from ._validators import positive, positive_or_zero
from .errors import IncompatibleDataError

if TYPE_CHECKING:
    from pymongo import AsyncMongoClient

    from .memory import MemoryMongoClient

T = TypeVar("T")
_DUPLICATE_KEY = 11000
JOB_ORDER = [("queue_order", ASCENDING), ("_id", ASCENDING)]

#: How long a task definition read while claiming its jobs answers ``get_task``: APScheduler
#: looks up the task of every job it claims, right after the claim.
TASK_CACHE_SECONDS = 1.0

#: The layout of our documents. A store refuses data written in a newer layout rather than
#: misread it; a future layout change bumps this and migrates older data at start.
FORMAT_VERSION = 1

#: How long a node that took over abandoned jobs, or marked schedules for removal, has to
#: finish before another node may take the work over from it (it crashed meanwhile).
TAKEOVER_WINDOW = timedelta(seconds=60)
#: How long the marker of an abandoned job outlives it (the owner's retry consults it)
MARKER_LIFETIME = timedelta(hours=1)

#: The head of the queue is read with this many jobs beyond what the caller can take, so
#: that a short read proves the picture complete
READ_MARGIN = 50

_COLLECTION_ATTRIBUTES = {"schedules": "_schedules", "jobs": "_jobs", "job_results": "_results"}

#: The store whose publish() call is delivering an event right now (its own events are
#: applied to its queue view directly, with more detail than the event carries)
_publishing: ContextVar[object] = ContextVar("apsched_mongo_publishing", default=None)


def index_specs() -> dict[str, list[IndexSpec]]:
    """The indexes the store needs, by collection name (without the prefix). The table in
    docs/internals.rst says which query each one serves."""
    exists = {"$exists": True}
    return {
        "schedules": [
            IndexSpec("apsched_due", [("next_fire_time", ASCENDING)]),
            IndexSpec("apsched_lease", [("lease", ASCENDING)], partial={"lease": exists}),
            IndexSpec("apsched_lease_expiry", [("acquired_until", ASCENDING)],
                      partial={"acquired_until": exists}),
            IndexSpec("apsched_removal", [("removal", ASCENDING)],
                      partial={"removal": exists}),
        ],
        "jobs": [
            IndexSpec("apsched_queue", [("acquired_by", ASCENDING), ("queue_order", ASCENDING),
                                        ("_id", ASCENDING)]),
            IndexSpec("apsched_order", [("queue_order", ASCENDING), ("_id", ASCENDING)]),
            IndexSpec("apsched_task_queue", [("acquired_by", ASCENDING),
                                             ("task_id", ASCENDING),
                                             ("queue_order", ASCENDING)]),
            IndexSpec("apsched_schedule", [("schedule_id", ASCENDING)]),
            IndexSpec("apsched_lease", [("lease", ASCENDING)], partial={"lease": exists}),
            IndexSpec("apsched_lease_expiry", [("acquired_until", ASCENDING)],
                      partial={"acquired_until": exists}),
            # One running job per (task, slot): how max_running_jobs is enforced atomically
            IndexSpec("apsched_task_slot", [("task_id", ASCENDING), ("slot", ASCENDING)],
                      unique=True, partial={"slot": exists}),
        ],
        "job_results": [
            # TTL: the server deletes results (and release markers) once expires_at passed
            IndexSpec("apsched_expiry", [("expires_at", ASCENDING)], expire_after_seconds=0),
        ],
    }


def carries_remote_events(broker: EventBroker) -> bool:
    """Whether ``broker`` delivers other nodes' events, which the claim gate relies on:
    every broker built on APScheduler's external-broker base does, and an in-process test
    double can say so with a true ``carries_remote_events`` attribute."""
    return isinstance(broker, BaseExternalEventBroker) or bool(
        getattr(broker, "carries_remote_events", False)
    )


def _release_marker_id(job_id: UUID) -> str:
    return f"released:{job_id}"


@attrs.define(eq=False, repr=False)
class MongoDBDataStore(BaseExternalDataStore):
    """Stores tasks, schedules, jobs and job results in MongoDB.

    Every claim and release is a conditional write whose winner the server decides
    (findAndModify, or updates and deletes filtered on a lease token), so any number of
    schedulers can share one database on a standalone server, a replica set or a sharded
    cluster, without multi-document transactions. Every write waits for a majority of the
    replica set (``w: "majority"``), whatever the URI says, so no failover can roll back a
    claim or a release.

    :param client_or_uri: a MongoDB URI, a :class:`pymongo.AsyncMongoClient` or a
        :class:`~apsched_mongo.memory.MemoryMongoClient`. Only clients created from a URI
        are closed by the store.
    :param database: database name
    :param collection_prefix: prefix of the collection names (``tasks``, ``schedules``,
        ``jobs``, ``job_results``, ``meta``); the default keeps clear of APScheduler's
        built-in store
    :param clock_refresh_interval: seconds between re-measurements of the server's clock
    :param claim_grace: seconds another node gets to claim the jobs it announced before
        this one reads the queue for them (see docs/internals.rst, "Claims without a
        herd"); 0 makes every node read at once
    :param write_timeout: seconds a write may wait for a majority of the replica set
        (``wtimeout``); a write that times out is retried like a lost reply
    :param local_clock: this node's wall clock (a testing aid for clock-skew drills)
    :param monotonic_clock: this node's monotonic clock, in seconds (a testing aid: moving
        it moves this node's idea of the server's time)
    :param serializer: serializer for everything that is not queried (pickle by default)
    :param start_from_scratch: erase all stored data at start (for test suites)
    :param retry_settings: tenacity stop/wait for temporary failures
    """

    client_or_uri: str | AsyncMongoClient[Any] | MemoryMongoClient = attrs.field()
    database: str = attrs.field(default="apscheduler", kw_only=True, validator=check_database_name)
    collection_prefix: str = attrs.field(
        default="apsched_", kw_only=True, validator=check_collection_prefix
    )
    clock_refresh_interval: float = attrs.field(default=60.0, kw_only=True, validator=positive)
    claim_grace: float = attrs.field(default=0.05, kw_only=True, validator=positive_or_zero)
    write_timeout: float = attrs.field(default=MAJORITY_TIMEOUT, kw_only=True,
                                       validator=positive)
    local_clock: Callable[[], datetime] = attrs.field(default=utc_now, kw_only=True)
    monotonic_clock: Callable[[], float] = attrs.field(default=time.monotonic, kw_only=True)

    _uri: str | None = attrs.field(init=False, default=None)
    _client: Any = attrs.field(init=False, default=None)
    _clock: ServerClock = attrs.field(init=False)
    _tasks: Any = attrs.field(init=False)
    _schedules: Any = attrs.field(init=False)
    _jobs: Any = attrs.field(init=False)
    _results: Any = attrs.field(init=False)
    _meta: Any = attrs.field(init=False)
    _view: QueueView = attrs.field(init=False)
    _acquiring: anyio.Lock = attrs.field(init=False, factory=anyio.Lock)
    #: job id -> the lease token this store claimed it with
    _leases: dict[UUID, str] = attrs.field(init=False, factory=dict)
    #: jobs claimed by the write that added them, not yet handed to the scheduler
    _preclaimed: dict[UUID, dict[str, Any]] = attrs.field(init=False, factory=dict)
    #: (scheduler id, lease duration) of the scheduler taking jobs from this store, and how
    #: many more it could take by what it last asked for and what it released since
    _worker: tuple[str, timedelta] | None = attrs.field(init=False, default=None)
    _spare: int = attrs.field(init=False, default=0)
    #: task id -> (monotonic time read, task document), forgotten on TaskUpdated/Removed
    _task_documents: dict[str, tuple[float, dict[str, Any]]] = attrs.field(
        init=False, factory=dict
    )
    #: task id -> answers to ``get_task`` that claims made here granted: (monotonic time
    #: of the claim, running jobs seen at the claim) for each job claimed
    _task_grants: dict[str, list[tuple[float, int]]] = attrs.field(init=False, factory=dict)

    def __attrs_post_init__(self) -> None:
        self._uri, self._client = accept_client_or_uri(self.client_or_uri)
        self._clock = ServerClock(self.local_clock, self.clock_refresh_interval,
                                  self.monotonic_clock)
        self._view = QueueView(self.monotonic_clock, self.claim_grace, trusted=False)
        if self._client is not None:
            self._bind(self._client)

    def __repr__(self) -> str:
        where = redact_uri(self._uri) if self._uri else describe_hosts(self._client)
        return f"{type(self).__name__}({where!r}, database={self.database!r})"

    def _bind(self, client: Any) -> None:
        database = database_of(client, self.database, self.write_timeout)
        prefix = self.collection_prefix
        self._tasks = database.get_collection(prefix + "tasks")
        self._schedules = database.get_collection(prefix + "schedules")
        self._jobs = database.get_collection(prefix + "jobs")
        self._results = database.get_collection(prefix + "job_results")
        self._meta = database.get_collection(prefix + "meta")

    # --- plumbing --------------------------------------------------------------------------

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
                if not _duplicate_id(exc):
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
        token = _publishing.set(self)
        try:
            await self._event_broker.publish(event)
        finally:
            _publishing.reset(token)

    async def _publish_all(self, events: Iterable[Event]) -> None:
        for event in events:
            await self._publish(event)

    # --- life cycle -------------------------------------------------------------------------

    async def start(
        self, exit_stack: AsyncExitStack, event_broker: EventBroker, logger: Logger
    ) -> None:
        await super().start(exit_stack, event_broker, logger)
        self._task_documents.clear()
        self._task_grants.clear()
        self._leases.clear()
        self._preclaimed.clear()
        self._worker, self._spare = None, 0
        self._view = QueueView(self.monotonic_clock, self.claim_grace,
                               trusted=carries_remote_events(event_broker))
        exit_stack.enter_context(event_broker.subscribe(
            self._hear, {JobAdded, JobAcquired, JobReleased, JobRemoved, TaskAdded,
                         TaskUpdated, TaskRemoved}
        ))
        if self._uri is not None:
            self._client = create_client(self._uri)
            exit_stack.push_async_callback(self._client.close)
            self._bind(self._client)
        exit_stack.push_async_callback(self._return_preclaimed)  # before the client closes

        started = self.monotonic_clock()
        hello = await ping(self._client, self._uri)
        self._clock.observe(hello, self.monotonic_clock() - started)
        if hello.get("maxWireVersion", 0) < 13:
            raise RuntimeError("apsched-mongo needs MongoDB 5.0 or newer")

        if self.start_from_scratch:
            for collection in (self._tasks, self._schedules, self._jobs, self._results):
                await self._run("start_from_scratch", partial(collection.delete_many, {}))

        await self._run("create indexes", self._create_indexes)
        await self._check_format()

    async def _check_format(self) -> None:
        """Record our data format in a new database; refuse one written by a newer version."""
        document = await self._run("check the data format", lambda: (
            self._meta.find_one_and_update(
                {"_id": "format"}, {"$setOnInsert": {"version": FORMAT_VERSION}},
                upsert=True, return_document=ReturnDocument.AFTER,
            )
        ))
        if document["version"] > FORMAT_VERSION:
            raise IncompatibleDataError(
                f"database {self.database!r} holds apsched-mongo data in format "
                f"{document['version']}, newer than this version's {FORMAT_VERSION}; "
                "upgrade apsched-mongo on this node (nothing was changed)"
            )

    async def _create_indexes(self) -> None:
        for name, specs in index_specs().items():
            await ensure_indexes(getattr(self, _COLLECTION_ATTRIBUTES[name]), specs)

    # --- what other nodes did ---------------------------------------------------------------

    def _hear(self, event: Event) -> None:
        """Keep the queue view and the task cache in step with other nodes' events."""
        if _publishing.get() is self:
            return  # our own: applied where it happened
        if isinstance(event, JobAcquired | JobReleased | JobRemoved):
            self._task_grants.pop(event.task_id, None)  # its running count changed
        if isinstance(event, JobAdded):
            self._view.job_added(event.job_id, event.task_id,
                                 _codec.queue_order(self.local_clock()), local=False)
        elif isinstance(event, JobAcquired):
            self._view.job_acquired(event.job_id, event.task_id, event.scheduler_id)
        elif isinstance(event, JobReleased):
            self._view.job_released(event.job_id, event.task_id, event.scheduler_id,
                                    local=False)
        elif isinstance(event, JobRemoved):
            self._view.job_released(event.job_id, event.task_id, None, local=False)
        elif isinstance(event, TaskAdded | TaskUpdated | TaskRemoved):
            self._forget_task(event.task_id)
            self._view.task_changed(event.task_id, local=False)

    def _forget_task(self, task_id: str) -> None:
        self._task_documents.pop(task_id, None)
        self._task_grants.pop(task_id, None)

    # --- tasks ------------------------------------------------------------------------------

    async def add_task(self, task: Task) -> None:
        document = _codec.encode_task(task, self.serializer)
        task_id = document.pop("_id")
        token = uuid4().hex
        previous = await self._run("add_task", lambda: self._tasks.find_one_and_update(
            {"_id": task_id},
            {"$set": document, "$setOnInsert": {"insert_token": token}},
            upsert=True, projection={"insert_token": True},
        ))
        self._forget_task(task_id)
        self._view.task_changed(task_id, local=True)
        # A retry after a lost reply finds our own upsert: the token tells
        if previous is None or previous.get("insert_token") == token:
            await self._publish(TaskAdded(task_id=task.id))
        else:
            await self._publish(TaskUpdated(task_id=task.id))

    async def remove_task(self, task_id: str) -> None:
        async def remove(retrying: bool) -> bool:
            removed = await self._tasks.find_one_and_delete(
                {"_id": task_id}, projection={"_id": True}
            )
            # After a lost reply the task is gone either way: by our earlier attempt, or
            # (rarely) by another node's removal racing ours, which then publishes too
            return bool(removed) or retrying

        if not await self._run_with_retry_flag("remove_task", remove):
            raise TaskLookupError(task_id)
        self._forget_task(task_id)
        self._view.task_changed(task_id, local=True)
        await self._publish(TaskRemoved(task_id=task_id))

    def _running_lookup(self) -> dict[str, Any]:
        """``$lookup`` of the running (claimed) jobs of each task: ``_id`` and ``slot``."""
        return {"$lookup": {"from": self._jobs.name, "localField": "_id",
                            "foreignField": "task_id",
                            "pipeline": [{"$match": {"acquired_by": {"$ne": None}}},
                                         {"$project": {"slot": True}}],
                            "as": "running"}}

    async def _find_tasks(self, match: dict[str, Any]) -> list[Task]:
        """Tasks sorted by id, with ``running_jobs`` counted: one round trip."""
        documents = await self._aggregate("get tasks", self._tasks, [
            {"$match": match}, {"$sort": {"_id": 1}}, self._running_lookup(),
        ])
        tasks = []
        for document in documents:
            running = [job["_id"] for job in document.pop("running")]
            self._learn_task(document)
            self._view.track(document["_id"], running)
            tasks.append(_codec.decode_task(document, self.serializer, len(running)))
        return tasks

    def _learn_task(self, document: dict[str, Any]) -> None:
        self._task_documents[document["_id"]] = (monotonic(), document)
        self._view.learn_limit(document["_id"], document.get("max_running_jobs"))

    async def get_task(self, task_id: str) -> Task:
        """The task, with ``running_jobs`` counted; one round trip at most.

        No round trip when this store can tell without one: with a broker that carries
        other nodes' events (see :func:`carries_remote_events`), the definition is the
        last one read, kept current by TaskUpdated/TaskRemoved events, and the running
        jobs are those read at most a minute ago, kept current by this node's own claims
        and releases and by other nodes' JobAcquired/JobReleased events. While this store
        holds the only slot of a task limited to one running job, ``running_jobs`` is 1
        whatever any event says. Otherwise (a broker without other nodes' events) the
        lookup APScheduler makes for each job it has just claimed is answered by the
        claim, for :data:`TASK_CACHE_SECONDS`."""
        now = monotonic()
        if known := self._task_documents.get(task_id):
            read_at, document = known
            if self._view.trusted or now - read_at < TASK_CACHE_SECONDS:
                if document.get("max_running_jobs") == 1 and self._holds_a_job_of(task_id):
                    return _codec.decode_task(document, self.serializer, 1)
                if (running := self._view.running_jobs(task_id)) is not None:
                    return _codec.decode_task(document, self.serializer, running)
                grants = [grant for grant in self._task_grants.get(task_id, ())
                          if now - grant[0] < TASK_CACHE_SECONDS]
                if grants:
                    self._task_grants[task_id] = grants[1:]
                    return _codec.decode_task(document, self.serializer, grants[0][1])
        tasks = await self._find_tasks({"_id": task_id})
        if not tasks:
            raise TaskLookupError(task_id)
        return tasks[0]

    def _holds_a_job_of(self, task_id: str) -> bool:
        return any(until == math.inf for until in self._view.running.get(task_id, {}).values())

    async def get_tasks(self) -> list[Task]:
        return await self._find_tasks({})

    # --- schedules --------------------------------------------------------------------------

    _LIVE_SCHEDULE = {"removal": {"$exists": False}}

    def _decode_schedules(self, documents: Iterable[dict[str, Any]]) -> list[Schedule]:
        return self._decode_each(documents, _codec.decode_schedule)

    async def get_schedules(self, ids: set[str] | None = None) -> list[Schedule]:
        query: dict[str, Any] = dict(self._LIVE_SCHEDULE)
        if ids is not None:
            query["_id"] = {"$in": list(ids)}
        documents = await self._find("get_schedules", self._schedules, query,
                                     sort=[("_id", ASCENDING)])
        return self._decode_schedules(documents)

    async def add_schedule(self, schedule: Schedule, conflict_policy: ConflictPolicy) -> None:
        document = _codec.encode_schedule(schedule, self.serializer)
        event: ScheduleAdded | ScheduleUpdated
        if conflict_policy is ConflictPolicy.replace:
            # An update, not a replacement: $setOnInsert leaves the token of whoever first
            # inserted the schedule, so even a retry after a lost reply tells an insert from
            # a replacement. Leases and removal marks are dropped, as a replacement would.
            token = uuid4().hex
            fields = {key: value for key, value in document.items() if key != "_id"}
            previous = await self._run("add_schedule", lambda: self._schedules.find_one_and_update(
                {"_id": schedule.id},
                {"$set": fields, "$setOnInsert": {"insert_token": token},
                 "$unset": {"acquired_by": "", "acquired_until": "", "lease": "",
                            "removal": "", "removal_at": ""}},
                upsert=True, projection={"insert_token": True},
            ))
            ours = previous is None or previous.get("insert_token") == token
            event_class = ScheduleAdded if ours else ScheduleUpdated
            event = event_class(schedule_id=schedule.id, task_id=schedule.task_id,
                                next_fire_time=schedule.next_fire_time)
        else:
            if not await self._insert_once("add_schedule", self._schedules, document):
                if conflict_policy is ConflictPolicy.exception:
                    raise ConflictingIdError(schedule.id)  # type: ignore[no-untyped-call]
                return
            event = ScheduleAdded(schedule_id=schedule.id, task_id=schedule.task_id,
                                  next_fire_time=schedule.next_fire_time)
        await self._publish(event)

    async def remove_schedules(self, ids: Iterable[str]) -> None:
        ids = list(dict.fromkeys(ids))
        if ids:
            await self._remove_schedules({"_id": {"$in": ids}}, order=ids, finished=False)

    async def _remove_schedules(
        self, selector: dict[str, Any], *, order: list[str] | None, finished: bool,
        take_over: bool = False,
    ) -> None:
        """Remove the schedules matching ``selector`` in three round trips, whatever their
        number, publishing ``ScheduleRemoved`` once per schedule actually removed:

        1. mark them with a token of this call (a schedule already marked by another
           remover is left to it, unless ``take_over``: its remover crashed);
        2. read what carries the token: exactly the schedules this call removes;
        3. delete them.

        A marked schedule is invisible to every read and claim, so the removal takes
        effect at step 1; a retry of any step repeats it harmlessly.
        """
        token = uuid4().hex
        now = await self._server_now()
        mark = dict(selector) if take_over else {**selector, **self._LIVE_SCHEDULE}
        await self._run("remove_schedules", lambda: self._schedules.update_many(
            mark, {"$set": {"removal": token, "removal_at": now}}
        ))
        removed = await self._find("remove_schedules", self._schedules, {"removal": token},
                                   projection={"task_id": True})
        if not removed:
            return
        await self._run("remove_schedules", lambda: self._schedules.delete_many(
            {"removal": token}
        ))
        by_id = {document["_id"]: document for document in removed}
        ids = [i for i in order if i in by_id] if order else sorted(by_id)
        await self._publish_all(
            ScheduleRemoved(schedule_id=i, task_id=by_id[i]["task_id"], finished=finished)
            for i in ids
        )

    async def acquire_schedules(
        self, scheduler_id: str, lease_duration: timedelta, limit: int
    ) -> list[Schedule]:
        server_now = await self._server_now()
        claimable = {
            "next_fire_time": {"$ne": None, "$lte": _codec.bson_date(self.local_clock())},
            "paused": {"$ne": True},
            **self._LIVE_SCHEDULE,
            "$or": [
                {"acquired_until": None},
                {"acquired_until": {"$lt": server_now}},
                {"acquired_by": scheduler_id},
            ],
        }
        candidates = await self._find("acquire_schedules", self._schedules, claimable,
                                      sort=[("next_fire_time", ASCENDING)], limit=limit)
        if not candidates:
            return []

        # Each claim also requires the document to be exactly as read, so when every claim
        # wins, what we read is what we own and needs no second look.
        lease = uuid4().hex
        claim = {"acquired_by": scheduler_id,
                 "acquired_until": server_now + lease_duration, "lease": lease}
        requests = [
            UpdateOne({"_id": doc["_id"], "state": doc.get("state"),
                       "progress": doc.get("progress"), **claimable}, {"$set": claim})
            for doc in candidates
        ]

        async def claim_all(retrying: bool) -> int:
            result = await self._schedules.bulk_write(requests, ordered=False)
            return -1 if retrying else int(result.modified_count)

        if await self._run_with_retry_flag("acquire_schedules", claim_all) == len(candidates):
            documents = [{**doc, **claim} for doc in candidates]
        else:
            documents = await self._find("acquire_schedules", self._schedules, {"lease": lease},
                                         sort=[("next_fire_time", ASCENDING)])
        return self._decode_schedules(documents)

    async def release_schedules(
        self, scheduler_id: str, results: Sequence[ScheduleResult]
    ) -> None:
        """Write each schedule's progress and end our lease, only where we still hold it;
        events are published for exactly the schedules released."""
        token = uuid4().hex
        requests: list[UpdateOne] = []
        events: dict[str, ScheduleUpdated | ScheduleRemoved] = {}
        for result in results:
            owned = {"_id": result.schedule_id, "acquired_by": scheduler_id}
            try:
                progress = _codec.encode_schedule_progress(
                    result.trigger, result.last_fire_time, result.next_fire_time,
                    self.serializer,
                )
            except SerializationError:
                self._logger.exception(
                    "Cannot serialize the trigger of schedule %r: removing the schedule",
                    result.schedule_id,
                )
                await self._remove_schedules(owned, order=None, finished=True)
                continue
            requests.append(UpdateOne(owned, {"$set": {**progress, "lease": token},
                                              "$unset": _codec.SCHEDULE_LEASE_FIELDS}))
            events[result.schedule_id] = ScheduleUpdated(
                schedule_id=result.schedule_id, task_id=result.task_id,
                next_fire_time=result.next_fire_time)
        if not requests:
            return

        async def release(retrying: bool) -> int:
            result = await self._schedules.bulk_write(requests, ordered=False)
            return -1 if retrying else int(result.matched_count)

        if await self._run_with_retry_flag("release_schedules", release) != len(requests):
            # Some were removed or taken over meanwhile: publish only for what we released
            mine = await self._find("release_schedules", self._schedules,
                                    {"_id": {"$in": list(events)}, "lease": token},
                                    projection={"_id": True})
            released = {document["_id"] for document in mine}
            events = {i: event for i, event in events.items() if i in released}
        await self._publish_all(events.values())

    async def get_next_schedule_run_time(self) -> datetime | None:
        """The earliest time a schedule can be processed here: its next fire time, or, for a
        schedule leased by another scheduler, when that lease runs out (so a scheduler
        neither spins on schedules it cannot take nor sleeps past a crashed peer's lease)."""
        server_now = await self._server_now()
        active = {"next_fire_time": {"$ne": None}, "paused": {"$ne": True},
                  **self._LIVE_SCHEDULE}
        free = await self._run("get_next_schedule_run_time", lambda: self._schedules.find_one(
            {**active, "$or": [{"acquired_until": None}, {"acquired_until": {"$lt": server_now}}]},
            projection={"progress": True, "next_fire_time": True},
            sort=[("next_fire_time", ASCENDING)],
        ))
        leased = await self._run("get_next_schedule_run_time", lambda: self._schedules.find_one(
            {**active, "acquired_until": {"$gte": server_now}},
            projection={"acquired_until": True}, sort=[("acquired_until", ASCENDING)],
        ))
        times = []
        if free:
            try:
                times.append(_codec.decode_next_fire_time(free, self.serializer))
            except DeserializationError:
                times.append(free["next_fire_time"])
        if leased:
            times.append(leased["acquired_until"] - self._clock.offset)  # to local time
        return min((time for time in times if time is not None), default=None)

    async def extend_acquired_schedule_leases(
        self, scheduler_id: str, schedule_ids: set[str], duration: timedelta
    ) -> None:
        until = await self._server_now() + duration
        await self._run("extend_acquired_schedule_leases", lambda: self._schedules.update_many(
            {"_id": {"$in": list(schedule_ids)}, "acquired_by": scheduler_id},
            {"$set": {"acquired_until": until}},
        ))

    # --- jobs -------------------------------------------------------------------------------

    async def add_job(self, job: Job) -> None:
        """Insert the job. When this node's scheduler has room and no other job waits, the
        insert also claims the job for it (one write instead of two); the scheduler gets
        it from its next :meth:`acquire_jobs`, woken by the ``JobAdded`` event."""
        document = _codec.encode_job(job, self.serializer)
        claim = await self._claim_on_insert(job)
        seen = partial(self._view.has_seen, job.id)
        try:
            inserted = await self._insert_once("add_job", self._jobs, {**document, **claim},
                                               seen=seen)
        except DuplicateKeyError:  # the slot: a job we had not heard of runs the task
            self._view.slot_taken(job.task_id)
            claim = {}
            inserted = await self._insert_once("add_job", self._jobs, document, seen=seen)
        if not inserted:
            raise ConflictingIdError(str(job.id))  # type: ignore[no-untyped-call]
        if claim:
            self._hold_claimed({**document, **claim}, claim["acquired_by"])
        else:
            self._view.job_added(job.id, job.task_id, document["queue_order"], local=True,
                                 document=document)
        await self._publish(
            JobAdded(job_id=job.id, task_id=job.task_id, schedule_id=job.schedule_id)
        )

    async def _claim_on_insert(self, job: Job) -> dict[str, Any]:
        """The claim fields for a job this node adds, if it may claim it at once: its
        scheduler has room, no job waits (so none is overtaken), and the task has no
        limit, or a limit of one that nobody is known to hold."""
        if self._worker is None or self._spare < 1 or not self._view.idle():
            return {}
        limit = self._view.limits.get(job.task_id, UNKNOWN)
        if limit not in (None, 1) or (limit == 1 and self._view.running.get(job.task_id)):
            return {}
        scheduler_id, lease_duration = self._worker
        claim: dict[str, Any] = {
            "acquired_by": scheduler_id,
            "acquired_until": await self._server_now() + lease_duration,
            "lease": uuid4().hex,
        }
        if limit == 1:
            claim["slot"] = 0
        return claim

    async def _return_preclaimed(self) -> None:
        """At shutdown, unclaim the jobs claimed on insert that the scheduler never took,
        so another node runs them now rather than as abandoned after their lease."""
        if not self._preclaimed:
            return
        leases = [self._leases.pop(job_id) for job_id in self._preclaimed]
        ids = list(self._preclaimed)
        self._preclaimed.clear()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self._run("returning jobs claimed on insert", lambda: self._jobs.update_many(
                {"_id": {"$in": ids}, "lease": {"$in": leases}},
                {"$unset": {"acquired_by": "", "acquired_until": "", "lease": "", "slot": ""}},
            ))

    async def get_jobs(self, ids: Iterable[UUID] | None = None) -> list[Job]:
        query = {} if ids is None else {"_id": {"$in": list(ids)}}
        documents = await self._find("get_jobs", self._jobs, query, sort=JOB_ORDER)
        return self._decode_each(documents, _codec.decode_job)

    async def acquire_jobs(
        self, scheduler_id: str, lease_duration: timedelta, limit: int | None = None
    ) -> list[Job]:
        """Claim up to ``limit`` jobs. When the queue view says nothing can be claimed, no
        round trip is made; when the only claimable jobs were announced by another node, it
        first gets :attr:`claim_grace` to claim them (see :mod:`._queue_view`)."""
        self._view.lease_seconds = lease_duration.total_seconds()
        room = limit if limit is not None else 10**9
        self._worker, self._spare = (scheduler_id, lease_duration), room
        async with self._acquiring:
            acquired = await self._acquire(scheduler_id, lease_duration, limit, room)
        self._spare = room - len(acquired)
        return acquired

    async def _acquire(self, scheduler_id: str, lease_duration: timedelta, limit: int | None,
                       room: int) -> list[Job]:
        handed: list[dict[str, Any]] = []
        while True:
            # Jobs this store claimed while adding or releasing others come first
            for job_id, document in list(self._preclaimed.items()):
                if len(handed) < room and document["acquired_by"] == scheduler_id:
                    handed.append(self._preclaimed.pop(job_id))
            if len(handed) == room:
                return await self._start_claimed(scheduler_id, handed)
            plan = self._view.plan(scheduler_id, room - len(handed))
            if plan.action == "skip" or (plan.action == "wait" and handed):
                return await self._start_claimed(scheduler_id, handed)
            if plan.action == "wait":
                with anyio.move_on_after(plan.delay):
                    await self._view.changed.wait()
                continue
            server_now = await self._server_now()
            lease = uuid4().hex
            claim = {"acquired_by": scheduler_id,
                     "acquired_until": server_now + lease_duration, "lease": lease}
            if plan.action == "claim":
                claimed = await self._claim_by_id(plan.jobs, claim)
                if claimed is None:
                    continue  # the picture was stale: plan again
            else:
                claimed = await self._read_and_claim(
                    None if limit is None else limit - len(handed), claim)
            return await self._start_claimed(scheduler_id, handed + claimed)

    async def _claim_by_id(self, jobs: Sequence[tuple[UUID, str, int | None]],
                           claim: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Claim jobs the queue view knows, without reading the queue first: one
        findAndModify for one job (a retryable write), otherwise one bulk of per-document
        updates and one read of what the lease token won. None if nothing was won."""
        requests = [(job_id, task_id, claim if slot is None else {**claim, "slot": slot})
                    for job_id, task_id, slot in jobs]
        if len(requests) == 1:
            [(job_id, task_id, fields)] = requests
            document = await self._claim_one(job_id, task_id, fields)
            return [document] if document else None
        known = {job_id: document for job_id, _, _ in requests
                 if (document := self._view.document_of(job_id)) is not None}
        won = await self._claim_many(requests, claim["lease"], known)
        won_ids = {document["_id"] for document in won}
        for job_id, _, _ in requests:
            if job_id not in won_ids:
                self._view.claim_lost(job_id)
        return won or None

    async def _claim_one(self, job_id: UUID, task_id: str,
                         fields: dict[str, Any]) -> dict[str, Any] | None:
        async def claim(retrying: bool) -> dict[str, Any] | None:
            try:
                document: dict[str, Any] | None = await self._jobs.find_one_and_update(
                    {"_id": job_id, "task_id": task_id, "acquired_by": None}, {"$set": fields},
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                return None  # the task's slot is taken by a job we did not hear about
            if document is None and retrying:  # did the lost attempt win it?
                document = await self._jobs.find_one({"_id": job_id, "lease": fields["lease"]})
            return document

        document = await self._run_with_retry_flag("acquire_jobs", claim)
        if document is None:
            self._view.claim_lost(job_id)
            if "slot" in fields:
                self._view.slot_taken(task_id)
        return document

    async def _claim_many(self, requests: Sequence[tuple[UUID, str, dict[str, Any]]],
                          lease: str, known: dict[UUID, dict[str, Any]]) -> list[dict[str, Any]]:
        """Per-document conditional claims in one bulk write (no ``UpdateMany``, so the
        driver can retry it with a ``txnNumber``). When every claim won at the first
        attempt and every document is ``known`` (jobs are immutable but for their lease),
        that is what we own; otherwise the documents the lease token won are read back."""
        updates = [UpdateOne({"_id": job_id, "task_id": task_id, "acquired_by": None},
                             {"$set": fields})
                   for job_id, task_id, fields in requests]

        async def claim_all(retrying: bool) -> int:
            try:
                result = await self._jobs.bulk_write(updates, ordered=False)
            except BulkWriteError as exc:
                _raise_unless_duplicates(exc)  # lost races for a slot are expected
                return -1
            return -1 if retrying else int(result.modified_count)

        won = await self._run_with_retry_flag("acquire_jobs", claim_all)
        if won == len(requests) and all(job_id in known for job_id, _, _ in requests):
            return [{**known[job_id], **fields} for job_id, _, fields in requests]
        return await self._find("acquire_jobs", self._jobs, {"lease": lease}, sort=JOB_ORDER)

    async def _read_and_claim(self, limit: int | None,
                              claim: dict[str, Any]) -> list[dict[str, Any]]:
        """Read the queue head with each task and its running jobs (one aggregation), pick
        what can start, claim it, and refresh the queue view from what was read."""
        size = (limit or 0) + READ_MARGIN
        self._view.begin_read()
        try:
            groups = await self._queue_head({"acquired_by": None}, size)
            candidates, free_slots, saturated, complete = self._startable(groups, size)
            partial: set[str] = set()
            if limit and len(candidates) < limit and saturated and not complete:
                # Jobs behind tasks at their limit: look past them (index bounds skip the
                # saturated tasks' backlog)
                more = await self._queue_head(
                    {"acquired_by": None, "task_id": {"$nin": sorted(saturated)}}, size)
                extra, extra_slots, _, complete = self._startable(more, size)
                known = {doc["_id"] for doc in candidates}
                candidates += [doc for doc in extra if doc["_id"] not in known]
                for task_id, slots in extra_slots.items():
                    free_slots.setdefault(task_id, slots)
                groups += more
                partial = saturated  # only their oldest jobs were read
        except BaseException:
            self._view.abort_read()
            raise
        candidates.sort(key=lambda doc: (doc["queue_order"], doc["_id"]))
        chosen: list[tuple[UUID, str, dict[str, Any]]] = []
        for candidate in candidates[:limit] if limit else candidates:
            free = free_slots.get(candidate["task_id"])
            if free is None:
                chosen.append((candidate["_id"], candidate["task_id"], claim))
            elif free:
                chosen.append((candidate["_id"], candidate["task_id"],
                               {**claim, "slot": free.pop(0)}))
        claimed: list[dict[str, Any]] = []
        if len(chosen) == 1:
            [(job_id, task_id, fields)] = chosen
            if won := await self._claim_one(job_id, task_id, fields):
                claimed = [won]
        elif chosen:
            claimed = await self._claim_many(chosen, claim["lease"],
                                             {doc["_id"]: doc for doc in candidates})
        # Jobs we tried and lost were claimed by others meanwhile: not waiting either
        gone = {job_id for job_id, _, _ in chosen}
        self._view.end_read(
            ((doc["_id"], doc["task_id"], doc["queue_order"])
             for group in groups for doc in group["jobs"] if doc["_id"] not in gone),
            complete=complete, partial=partial,
            running={group["_id"]: {job["_id"] for job in group["running"]} for group in groups},
        )
        for group in groups:
            if group["task"]:
                self._learn_task(group["task"][0])
        return claimed

    async def _queue_head(self, match: dict[str, Any], size: int) -> list[dict[str, Any]]:
        """The first ``size`` unclaimed jobs matching ``match`` in queue order, grouped by
        task, each group with its task document (``task``, a list of at most one), its
        ``max_running_jobs`` and its running jobs (``running``): one round trip."""
        return await self._aggregate("acquire_jobs", self._jobs, [
            {"$match": match},
            {"$sort": dict(JOB_ORDER)},
            {"$limit": size},
            {"$group": {"_id": "$task_id", "jobs": {"$push": "$$ROOT"}}},
            {"$lookup": {"from": self._tasks.name, "localField": "_id",
                         "foreignField": "_id", "as": "task"}},
            {"$set": {"max_running_jobs": {"$arrayElemAt": ["$task.max_running_jobs", 0]}}},
            self._running_lookup(),
        ])

    def _startable(self, groups: list[dict[str, Any]], size: int) -> tuple[
        list[dict[str, Any]], dict[str, list[int]], set[str], bool
    ]:
        """(jobs that can start, free slot numbers of limited tasks, tasks at their limit,
        whether the read saw the whole queue)."""
        candidates: list[dict[str, Any]] = []
        free_slots: dict[str, list[int]] = {}
        saturated: set[str] = set()
        read = 0
        for group in groups:
            jobs = sorted(group["jobs"], key=lambda doc: (doc["queue_order"], doc["_id"]))
            read += len(jobs)
            limit = group.get("max_running_jobs")
            self._view.learn_limit(group["_id"], limit)
            if limit is None:
                candidates += jobs
                continue
            used = {job.get("slot") for job in group["running"]}
            free = [slot for slot in range(limit) if slot not in used]
            free_slots[group["_id"]] = free
            candidates += jobs[:len(free)]
            if len(jobs) > len(free):
                saturated.add(group["_id"])
        return candidates, free_slots, saturated, read < size

    async def _start_claimed(self, scheduler_id: str, claimed: list[dict[str, Any]]) -> list[Job]:
        """Decode claimed jobs; release at once those that cannot or must not start."""
        now = self.local_clock()
        acquired: list[Job] = []
        discarded: list[tuple[dict[str, Any], JobResult, Job | None]] = []
        for document in sorted(claimed, key=lambda doc: (doc["queue_order"], doc["_id"])):
            self._leases[document["_id"]] = document["lease"]
            self._view.job_acquired(document["_id"], document["task_id"], scheduler_id,
                                    ours=True)
            try:
                job = _codec.decode_job(document, self.serializer)
            except DeserializationError as exc:
                self._logger.warning("Releasing job %r: %s", document["_id"], exc)
                discarded.append((document, _codec.result_for_document(
                    document, JobOutcome.deserialization_failed, now, exc), None))
                continue
            if job.start_deadline is not None and job.start_deadline < now:
                discarded.append((document, JobResult.from_job(
                    job, JobOutcome.missed_start_deadline, finished_at=now), job))
                continue
            acquired.append(job)

        now_monotonic = monotonic()
        for job in acquired:  # the running jobs as this store now knows them (ours included)
            running = len(self._view.running.get(job.task_id, {}))
            grants = [grant for grant in self._task_grants.get(job.task_id, ())
                      if now_monotonic - grant[0] < TASK_CACHE_SECONDS]
            self._task_grants[job.task_id] = [*grants, (now_monotonic, running)]
        await self._publish_all(JobAcquired.from_job(job, scheduler_id=scheduler_id)
                                for job in acquired)
        for document, result, decoded in discarded:
            if await self._release_owned(document["_id"], document["task_id"], scheduler_id,
                                         "acquire_jobs"):
                await self._finish_release(document, result, scheduler_id, decoded)
        return acquired

    @staticmethod
    def _released_event(document: dict[str, Any], result: JobResult, scheduler_id: str,
                        job: Job | None) -> JobReleased:
        return JobReleased.from_result(
            result, scheduler_id, document["task_id"], document.get("schedule_id"),
            job.scheduled_fire_time if job else document.get("scheduled_fire_time"),
        )

    async def _store_results(self, results: Sequence[JobResult],
                             markers: Sequence[dict[str, Any]] = ()) -> None:
        """Insert results (and release markers). A duplicate key means an earlier attempt
        of ours stored it (only a release's winner stores); a write-concern error is never
        ignored: it is retried if temporary, raised otherwise."""
        documents = [_codec.encode_result(result, self.serializer) for result in results
                     if result.expires_at > result.finished_at] + list(markers)
        if not documents:
            return

        async def insert() -> None:
            try:
                await self._results.insert_many(documents, ordered=False)
            except BulkWriteError as exc:
                _raise_unless_duplicates(exc)

        await self._run("store job results", insert)

    def _owned(self, job_id: UUID, task_id: str, scheduler_id: str) -> dict[str, Any]:
        """The filter matching a job only while this node still holds it (with the task id:
        the shard key, where jobs are sharded)."""
        lease = self._leases.pop(job_id, None)
        if lease is not None:
            return {"_id": job_id, "task_id": task_id, "lease": lease}
        # Claimed through another store instance: whoever holds it in our name
        return {"_id": job_id, "task_id": task_id,
                "acquired_by": {"$in": [scheduler_id, None]}, "abandoned": {"$exists": False}}

    async def _deleted_by_us(self, job_id: UUID) -> bool:
        """After a lost reply, whether our delete of a job we held landed: a node that took
        the job over as abandoned leaves a marker; no marker means we deleted it."""
        marker = await self._results.find_one({"_id": _release_marker_id(job_id)},
                                              projection={"_id": True})
        return marker is None

    async def _release_owned(self, job_id: UUID, task_id: str, scheduler_id: str,
                             what: str) -> bool:
        """Delete a job this node holds; True if this call released it. The delete is the
        commit point; the server's answer (or, after a lost reply, the absence of a
        takeover marker) decides, never the attempt count."""
        owned = self._owned(job_id, task_id, scheduler_id)

        async def delete(retrying: bool) -> bool:
            outcome = await self._jobs.delete_one(owned)
            if outcome.deleted_count or not retrying:
                return bool(outcome.deleted_count)
            return await self._deleted_by_us(job_id)

        return await self._run_with_retry_flag(what, delete)

    async def _release_and_claim(self, scheduler_id: str, job: Job, follower: UUID,
                                 follower_task: str, fields: dict[str, Any]
                                 ) -> tuple[bool, bool]:
        """Release ``job`` and claim ``follower`` (a job this node added, whose document it
        knows) in one ordered bulk write: the delete frees the slot the claim may take.
        Returns (released, claimed), each decided like its single-write twin."""
        owned = self._owned(job.id, job.task_id, scheduler_id)
        requests = [DeleteOne(owned),
                    UpdateOne({"_id": follower, "task_id": follower_task, "acquired_by": None},
                              {"$set": fields})]

        async def write(retrying: bool) -> tuple[bool, bool]:
            try:
                result = await self._jobs.bulk_write(requests, ordered=True)
                deleted, claimed = result.deleted_count, result.modified_count
            except BulkWriteError as exc:  # the claim met a taken slot
                _raise_unless_duplicates(exc)
                deleted, claimed = exc.details.get("nRemoved", 0), 0
            if retrying:
                deleted = deleted or await self._deleted_by_us(job.id)
                claimed = claimed or await self._jobs.find_one(
                    {"_id": follower, "lease": fields["lease"]}, projection={"_id": True}
                ) is not None
            return bool(deleted), bool(claimed)

        return await self._run_with_retry_flag("release_job", write)

    def _released_here(self, job_id: UUID, task_id: str, scheduler_id: str | None) -> None:
        self._task_grants.pop(task_id, None)
        self._view.job_released(job_id, task_id, scheduler_id, local=True)

    async def _finish_release(self, document: dict[str, Any], result: JobResult,
                              scheduler_id: str, job: Job | None) -> None:
        await self._store_results([result])
        self._released_here(document["_id"], document["task_id"], scheduler_id)
        await self._publish(self._released_event(document, result, scheduler_id, job))

    async def release_job(self, scheduler_id: str, job: Job, result: JobResult) -> None:
        """Delete the job (the commit point), store its result, publish ``JobReleased``.
        When the next job in line is one this node added and its scheduler has room, the
        same write also claims it, so the scheduler's next :meth:`acquire_jobs` hands it
        over without a round trip."""
        self._spare += 1  # the scheduler has room for one more
        follower = self._follower(scheduler_id, job)
        if follower is None:
            released = await self._release_owned(job.id, job.task_id, scheduler_id,
                                                 "release_job")
        else:
            document, fields = follower
            released, claimed = await self._release_and_claim(
                scheduler_id, job, document["_id"], document["task_id"], fields)
            if claimed:
                self._hold_claimed({**document, **fields}, scheduler_id)
            else:
                self._view.claim_lost(document["_id"])
        if not released:
            self._released_here(job.id, job.task_id, None)
            self._logger.warning(
                "Job %s was no longer held by scheduler %r (its lease expired and it was "
                "released elsewhere); result not recorded", job.id, scheduler_id,
            )
            return
        await self._store_results([result])
        self._released_here(job.id, job.task_id, scheduler_id)
        await self._publish(JobReleased.from_result(
            result, scheduler_id, job.task_id, job.schedule_id, job.scheduled_fire_time
        ))

    def _follower(self, scheduler_id: str,
                  job: Job) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The job to claim along with releasing ``job``, and its claim fields, if any."""
        if self._worker is None or self._worker[0] != scheduler_id or self._spare < 1:
            return None
        following = self._view.next_local(job.id, job.task_id)
        if following is None:
            return None
        document, slot = following
        fields: dict[str, Any] = {
            "acquired_by": scheduler_id,
            "acquired_until": self._clock.current() + self._worker[1],
            "lease": uuid4().hex,
        }
        if slot is not None:
            fields["slot"] = slot
        return document, fields

    def _hold_claimed(self, document: dict[str, Any], scheduler_id: str) -> None:
        """A job claimed outside :meth:`acquire_jobs`: keep it for the scheduler's next
        call (woken by the event that follows)."""
        self._leases[document["_id"]] = document["lease"]
        self._preclaimed[document["_id"]] = document
        self._spare -= 1
        self._view.job_acquired(document["_id"], document["task_id"], scheduler_id, ours=True)

    async def discard_job(self, job_id: UUID, *, by: str = "operator") -> bool:
        """Delete a job no scheduler has claimed, as an operator's action (the dashboard's
        "drop"). Publishes ``JobReleased`` with outcome ``cancelled`` (scheduler id
        ``by``), so anyone waiting for the job's result learns of it. Returns False if the
        job is gone or a scheduler holds it."""
        found = await self._run("discard_job", lambda: self._jobs.find_one(
            {"_id": job_id}, projection={"task_id": True}))  # the shard key, if sharded
        if found is None:
            return False

        async def take(retrying: bool) -> dict[str, Any] | None:
            document: dict[str, Any] | None = await self._jobs.find_one_and_update(
                {"_id": job_id, "task_id": found["task_id"], "acquired_by": None},
                {"$set": {"acquired_by": by, "lease": lease, "abandoned": True,
                          "acquired_until": await self._server_now() + TAKEOVER_WINDOW}},
                return_document=ReturnDocument.AFTER,
            )
            if document is None and retrying:
                document = await self._jobs.find_one({"_id": job_id, "lease": lease})
            return document

        lease = uuid4().hex
        document = await self._run_with_retry_flag("discard_job", take)
        if document is None:
            return False
        released = await self._release_taken_over([document], lease, JobOutcome.cancelled,
                                                  "discard_job")
        return bool(released)

    async def get_job_result(self, job_id: UUID) -> JobResult | None:
        # Read, then delete: unlike find_one_and_delete, each step can be retried after a
        # lost reply without losing the result
        document = await self._run("get_job_result", lambda: self._results.find_one(
            {"_id": job_id}
        ))
        if not document:
            return None
        await self._run("get_job_result", lambda: self._results.delete_one({"_id": job_id}))
        if document["expires_at"] <= await self._server_now():
            return None
        return _codec.decode_result(document, self.serializer)

    async def extend_acquired_job_leases(
        self, scheduler_id: str, job_ids: set[UUID], duration: timedelta
    ) -> None:
        until = await self._server_now() + duration
        await self._run("extend_acquired_job_leases", lambda: self._jobs.update_many(
            {"_id": {"$in": list(job_ids)}, "acquired_by": scheduler_id,
             "abandoned": {"$exists": False}},
            {"$set": {"acquired_until": until}},
        ))

    async def _release_abandoned(self, selector: dict[str, Any], what: str) -> None:
        """Release the leased jobs matching ``selector`` as abandoned, in O(1) round trips:
        take them over with a token of this call (the server lets exactly one node win each
        job), then release what carries the token."""
        lease = uuid4().hex
        now = await self._server_now()
        await self._run(what, lambda: self._jobs.update_many(
            selector, {"$set": {"lease": lease, "abandoned": True,
                                "acquired_until": now + TAKEOVER_WINDOW}}
        ))
        taken = await self._find(what, self._jobs, {"lease": lease}, sort=JOB_ORDER)
        if taken:
            await self._release_taken_over(taken, lease, JobOutcome.abandoned, what)

    async def _release_taken_over(self, documents: list[dict[str, Any]], lease: str,
                                  outcome: JobOutcome, what: str) -> int:
        """Finish releasing jobs this call took over (their lease is ``lease``): results and
        markers first (the markers tell an owner retrying its own release that it lost),
        then the delete, then one ``JobReleased`` each. Returns how many were released."""
        now = self.local_clock()
        released: list[tuple[dict[str, Any], JobResult, Job | None]] = []
        for document in documents:
            decoded: Job | None
            try:
                decoded = _codec.decode_job(document, self.serializer)
            except DeserializationError:
                decoded = None
            result = (JobResult.from_job(decoded, outcome, finished_at=now) if decoded
                      else _codec.result_for_document(document, outcome, now))
            released.append((document, result, decoded))
        server_now = await self._server_now()
        markers = [{"_id": _release_marker_id(document["_id"]), "marker": True,
                    "expires_at": server_now + MARKER_LIFETIME} for document in documents]
        await self._store_results([result for _, result, _ in released], markers)
        deleted = await self._run(what, lambda: self._jobs.delete_many({"lease": lease}))
        if deleted.deleted_count < len(documents):
            self._logger.warning(
                "%d of %d jobs taken over were taken over again before being released (this "
                "node stalled for over %s)", len(documents) - deleted.deleted_count,
                len(documents), TAKEOVER_WINDOW,
            )
        for document, result, job in released:
            holder = document.get("acquired_by") or "?"
            self._released_here(document["_id"], document["task_id"], holder)
            await self._publish(self._released_event(document, result, holder, job))
        return len(released)

    async def reap_abandoned_jobs(self, scheduler_id: str) -> None:
        await self._release_abandoned(
            {"acquired_by": scheduler_id, "abandoned": {"$exists": False}},
            "reap_abandoned_jobs",
        )

    async def cleanup(self) -> None:
        server_now = await self._server_now()
        # 1. Expired job results and markers (the TTL index does this too, once a minute)
        await self._run("cleanup", lambda: self._results.delete_many(
            {"expires_at": {"$lte": server_now}}
        ))
        # 2. Jobs whose lease expired (their scheduler is gone), and takeovers whose node
        #    died before finishing them
        await self._release_abandoned(
            {"acquired_by": {"$ne": None}, "acquired_until": {"$lt": server_now}}, "cleanup"
        )
        # 3. Removals whose node died between marking and deleting
        await self._remove_schedules(
            {"removal": {"$exists": True}, "removal_at": {"$lt": server_now - TAKEOVER_WINDOW}},
            order=None, finished=False, take_over=True,
        )
        # 4. Finished schedules with no jobs left
        finished = await self._find("cleanup", self._schedules,
                                    {"next_fire_time": None, "acquired_by": None,
                                     **self._LIVE_SCHEDULE},
                                    projection={"_id": True})
        if finished:
            ids = [doc["_id"] for doc in finished]
            with_jobs = set(await self._run("cleanup", lambda: self._jobs.distinct(
                "schedule_id", {"schedule_id": {"$in": ids}}
            )))
            if idle := [i for i in ids if i not in with_jobs]:
                await self._remove_schedules(
                    {"_id": {"$in": idle}, "next_fire_time": None, "acquired_by": None},
                    order=idle, finished=True,
                )
        # 5. A periodic fresh look at the queue, whatever the events said
        self._view.forget_everything()


def _duplicate_id(exc: DuplicateKeyError) -> bool:
    """Whether the duplicate key is the ``_id`` (not another unique index)."""
    pattern = (exc.details or {}).get("keyPattern")
    return pattern == {"_id": 1} if pattern else "index: _id_ " in str(exc)


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
