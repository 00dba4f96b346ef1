"""MongoDBDataStore: APScheduler 4's data store on PyMongo's native async API."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from functools import partial
from logging import Logger
from time import monotonic
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

import anyio
import attrs
from apscheduler import (
    Event,
    Job,
    JobAcquired,
    JobAdded,
    JobReleased,
    JobRemoved,
    Task,
    TaskAdded,
    TaskLookupError,
    TaskRemoved,
    TaskUpdated,
)
from apscheduler.abc import EventBroker
from apscheduler.eventbrokers.base import BaseExternalEventBroker
from pymongo import ASCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

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
from ._job_store import JobStore
from ._names import check_collection_prefix, check_database_name
from ._queue_view import QueueView
from ._schedule_store import ScheduleStore
from ._store_base import TAKEOVER_WINDOW, publishing
from ._validators import positive, positive_or_zero
from .errors import IncompatibleDataError

if TYPE_CHECKING:
    from pymongo import AsyncMongoClient

    from .memory import MemoryMongoClient

#: How long a task definition read while claiming its jobs answers ``get_task``: APScheduler
#: looks up the task of every job it claims, right after the claim.
TASK_CACHE_SECONDS = 1.0

#: The layout of our documents. A store refuses data written in a newer layout rather than
#: misread it; a future layout change bumps this and migrates older data at start.
FORMAT_VERSION = 1

_COLLECTION_ATTRIBUTES = {"schedules": "_schedules", "jobs": "_jobs", "job_results": "_results"}


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
            # One job per (schedule, fire time) while it exists: a node that fires a schedule
            # again after a crash or stop before recording the fire adds nothing twice
            IndexSpec("apsched_fire", [("schedule_id", ASCENDING),
                                       ("scheduled_fire_time", ASCENDING)],
                      unique=True, partial={"schedule_id": {"$type": "string"},
                                            "scheduled_fire_time": {"$type": "date"}}),
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


@attrs.define(eq=False, repr=False)
class MongoDBDataStore(JobStore, ScheduleStore):
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
    _recovering: set[str] = attrs.field(init=False, factory=set)

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

    # --- life cycle -------------------------------------------------------------------------

    async def start(
        self, exit_stack: AsyncExitStack, event_broker: EventBroker, logger: Logger
    ) -> None:
        await super().start(exit_stack, event_broker, logger)
        self._task_documents.clear()
        self._task_grants.clear()
        self._recovering.clear()
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
            collection = getattr(self, _COLLECTION_ATTRIBUTES[name])
            try:
                await ensure_indexes(collection, specs)
            except DuplicateKeyError:
                # Data written before apsched_fire existed holds a fire time twice: start
                # without it; it is created at a later start, once those jobs have run
                self._logger.warning(
                    "%s holds more than one job for a schedule's fire time (written by an "
                    "earlier version); apsched_fire will be created once they have run",
                    collection.full_name,
                )
                await ensure_indexes(collection, [spec for spec in specs
                                                  if spec.name != "apsched_fire"])

    # --- what other nodes did ---------------------------------------------------------------

    def _hear(self, event: Event) -> None:
        """Keep the queue view and the task cache in step with other nodes' events."""
        if publishing.get() is self:
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

    def _grant_task_lookups(self, jobs: list[Job]) -> None:
        """Let the claim of ``jobs`` answer the lookup APScheduler makes for each (with the
        running jobs as this store now knows them, its own included)."""
        now = monotonic()
        for job in jobs:
            running = len(self._view.running.get(job.task_id, {}))
            grants = [grant for grant in self._task_grants.get(job.task_id, ())
                      if now - grant[0] < TASK_CACHE_SECONDS]
            self._task_grants[job.task_id] = [*grants, (now, running)]

    def _holds_a_job_of(self, task_id: str) -> bool:
        return any(until == math.inf for until in self._view.running.get(task_id, {}).values())

    async def get_tasks(self) -> list[Task]:
        return await self._find_tasks({})

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


