"""MongoDBDataStore: APScheduler 4's data store on PyMongo's native async API."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from functools import partial
from logging import Logger
from time import monotonic
from typing import Any, TypeVar
from uuid import UUID, uuid4

import attrs
from anyio import create_task_group
from apscheduler import (
    ConflictingIdError,
    ConflictPolicy,
    DeserializationError,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
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
from pymongo import ASCENDING, DeleteOne, ReturnDocument, UpdateMany, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

from . import _codec
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
from ._retry import retrying
from .errors import IncompatibleDataError

T = TypeVar("T")
_DUPLICATE_KEY = 11000
JOB_ORDER = [("queue_order", ASCENDING), ("_id", ASCENDING)]


#: How long a task definition read while claiming its jobs answers ``get_task``. Task
#: changes made through any store reach this one sooner, as TaskAdded/Updated/Removed events.
TASK_CACHE_SECONDS = 1.0

#: The layout of our documents. A store refuses data written in a newer layout rather than
#: misread it; a future layout change bumps this and migrates older data at start.
FORMAT_VERSION = 1

_COLLECTION_ATTRIBUTES = {"schedules": "_schedules", "jobs": "_jobs", "job_results": "_results"}


def index_specs() -> dict[str, list[IndexSpec]]:
    """The indexes the store needs, by collection name (without the prefix)."""
    exists = {"$exists": True}
    return {
        "schedules": [
            IndexSpec("apsched_due", [("next_fire_time", ASCENDING)]),
            IndexSpec("apsched_task", [("task_id", ASCENDING)]),
            IndexSpec("apsched_lease", [("lease", ASCENDING)], partial={"lease": exists}),
            IndexSpec("apsched_lease_expiry", [("acquired_until", ASCENDING)],
                      partial={"acquired_until": exists}),
        ],
        "jobs": [
            IndexSpec("apsched_queue", [("acquired_by", ASCENDING), ("queue_order", ASCENDING),
                                        ("_id", ASCENDING)]),
            IndexSpec("apsched_schedule", [("schedule_id", ASCENDING)]),
            IndexSpec("apsched_lease", [("lease", ASCENDING)], partial={"lease": exists}),
            IndexSpec("apsched_lease_expiry", [("acquired_until", ASCENDING)],
                      partial={"acquired_until": exists}),
            # One running job per (task, slot): how max_running_jobs is enforced atomically
            IndexSpec("apsched_task_slot", [("task_id", ASCENDING), ("slot", ASCENDING)],
                      unique=True, partial={"slot": exists}),
        ],
        "job_results": [
            # TTL: the server deletes results once expires_at has passed
            IndexSpec("apsched_expiry", [("expires_at", ASCENDING)], expire_after_seconds=0),
        ],
    }


@attrs.define(eq=False, repr=False)
class MongoDBDataStore(BaseExternalDataStore):
    """Stores tasks, schedules, jobs and job results in MongoDB.

    Claims are single-document conditional updates (never read-then-write), so any number
    of schedulers can share one database on a standalone server, a replica set or a
    sharded cluster, without multi-document transactions.

    :param client_or_uri: a MongoDB URI, a :class:`pymongo.AsyncMongoClient` or a
        :class:`~apsched_mongo.memory.MemoryMongoClient`. Only clients created from a URI
        are closed by the store.
    :param database: database name
    :param collection_prefix: prefix of the collection names (``tasks``, ``schedules``,
        ``jobs``, ``job_results``); the default keeps clear of APScheduler's built-in store
    :param clock_refresh_interval: seconds between re-measurements of the server's clock
    :param local_clock: this node's clock (a testing aid for clock-skew drills)
    :param serializer: serializer for everything that is not queried (pickle by default)
    :param start_from_scratch: erase all stored data at start (for test suites)
    :param retry_settings: tenacity stop/wait for temporary failures
    """

    client_or_uri: Any = attrs.field()
    database: str = attrs.field(default="apscheduler", kw_only=True, validator=check_database_name)
    collection_prefix: str = attrs.field(
        default="apsched_", kw_only=True, validator=check_collection_prefix
    )
    clock_refresh_interval: float = attrs.field(default=60.0, kw_only=True)
    local_clock: Callable[[], datetime] = attrs.field(default=utc_now, kw_only=True)

    _uri: str | None = attrs.field(init=False, default=None)
    _client: Any = attrs.field(init=False, default=None)
    _clock: ServerClock = attrs.field(init=False)
    _tasks: Any = attrs.field(init=False)
    _schedules: Any = attrs.field(init=False)
    _jobs: Any = attrs.field(init=False)
    _results: Any = attrs.field(init=False)
    _meta: Any = attrs.field(init=False)
    #: task id -> (monotonic time, task document) for unlimited tasks, from acquire_jobs
    _task_cache: dict[str, tuple[float, dict[str, Any]]] = attrs.field(
        init=False, factory=dict
    )

    def __attrs_post_init__(self) -> None:
        self._uri, self._client = accept_client_or_uri(self.client_or_uri)
        self._clock = ServerClock(self.local_clock, self.clock_refresh_interval)
        if self._client is not None:
            self._bind(self._client)

    def __repr__(self) -> str:
        where = redact_uri(self._uri) if self._uri else describe_hosts(self._client)
        return f"{type(self).__name__}({where!r}, database={self.database!r})"

    def _bind(self, client: Any) -> None:
        database = database_of(client, self.database)
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

    async def _run_idempotent_insert(self, what: str, collection: Any, document: Any) -> None:
        """Insert; a duplicate key on a *retry* means our earlier attempt landed."""
        first = True

        async def insert() -> None:
            nonlocal first
            try:
                await collection.insert_one(document)
            except DuplicateKeyError:
                if first:
                    raise
            finally:
                first = False

        await self._run(what, insert)

    async def _find(self, what: str, collection: Any, *args: Any, **kwargs: Any) -> list[Any]:
        async def find() -> list[Any]:
            documents: list[Any] = await collection.find(*args, **kwargs).to_list(None)
            return documents

        return await self._run(what, find)

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

    async def _publish_all(self, events: Iterable[Any]) -> None:
        for event in events:
            await self._event_broker.publish(event)

    # --- life cycle -------------------------------------------------------------------------

    async def start(
        self, exit_stack: AsyncExitStack, event_broker: EventBroker, logger: Logger
    ) -> None:
        await super().start(exit_stack, event_broker, logger)
        self._task_cache.clear()
        exit_stack.enter_context(event_broker.subscribe(
            self._forget_task, {TaskAdded, TaskUpdated, TaskRemoved}
        ))
        if self._uri is not None:
            self._client = create_client(self._uri)
            exit_stack.push_async_callback(self._client.close)
            self._bind(self._client)

        sent_at, started = self.local_clock(), monotonic()
        hello = await ping(self._client, self._uri)
        self._clock.observe(hello, sent_at, monotonic() - started)
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

    # --- tasks ------------------------------------------------------------------------------

    async def add_task(self, task: Task) -> None:
        document = _codec.encode_task(task, self.serializer)
        task_id = document.pop("_id")
        previous = await self._run("add_task", lambda: self._tasks.find_one_and_update(
            {"_id": task_id}, {"$set": document}, upsert=True, projection={"_id": True},
        ))
        if previous:
            await self._event_broker.publish(TaskUpdated(task_id=task.id))
        else:
            await self._event_broker.publish(TaskAdded(task_id=task.id))

    async def remove_task(self, task_id: str) -> None:
        removed = await self._run("remove_task", lambda: self._tasks.find_one_and_delete(
            {"_id": task_id}, projection={"_id": True}
        ))
        if not removed:
            raise TaskLookupError(task_id)
        await self._event_broker.publish(TaskRemoved(task_id=task_id))

    async def _find_tasks(self, match: dict[str, Any]) -> list[Task]:
        """Tasks sorted by id. ``running_jobs`` counts the ``max_running_jobs`` slots in use:
        that is this store's task accounting. A task without a limit holds no slots and
        reports 0, so the scheduler's per-job ``get_task`` costs one query, not a count of
        the queue."""
        documents = await self._find("get tasks", self._tasks, match, sort=[("_id", ASCENDING)])
        used = await self._slots_in_use(
            [doc["_id"] for doc in documents if doc.get("max_running_jobs") is not None]
        )
        return [_codec.decode_task(doc, self.serializer, len(used.get(doc["_id"], ())))
                for doc in documents]

    def _remember_tasks(self, documents: list[dict[str, Any]]) -> None:
        """Keep the task documents joined to the jobs being claimed: APScheduler asks for
        each claimed job's task right away, one round trip per job otherwise. Only tasks
        without ``max_running_jobs``: their ``running_jobs`` is always 0, so nothing in a
        cached copy can go stale but the definition itself."""
        now = monotonic()
        for document in documents:
            if document.get("task") and document["task"][0].get("max_running_jobs") is None:
                task = document["task"][0]
                self._task_cache[task["_id"]] = (now, task)

    def _forget_task(self, event: Any) -> None:
        self._task_cache.pop(event.task_id, None)

    async def get_task(self, task_id: str) -> Task:
        if (cached := self._task_cache.get(task_id)) and (
            monotonic() - cached[0] < TASK_CACHE_SECONDS
        ):
            return _codec.decode_task(cached[1], self.serializer, 0)
        tasks = await self._find_tasks({"_id": task_id})
        if not tasks:
            raise TaskLookupError(task_id)
        return tasks[0]

    async def get_tasks(self) -> list[Task]:
        return await self._find_tasks({})

    # --- schedules --------------------------------------------------------------------------

    def _decode_schedules(self, documents: Iterable[dict[str, Any]]) -> list[Schedule]:
        return self._decode_each(documents, _codec.decode_schedule)

    async def get_schedules(self, ids: set[str] | None = None) -> list[Schedule]:
        query = {} if ids is None else {"_id": {"$in": list(ids)}}
        documents = await self._find("get_schedules", self._schedules, query,
                                     sort=[("_id", ASCENDING)])
        return self._decode_schedules(documents)

    async def add_schedule(self, schedule: Schedule, conflict_policy: ConflictPolicy) -> None:
        document = _codec.encode_schedule(schedule, self.serializer)
        event: ScheduleAdded | ScheduleUpdated
        if conflict_policy is ConflictPolicy.replace:
            previous = await self._run("add_schedule", lambda: self._schedules.find_one_and_replace(
                {"_id": schedule.id}, document, upsert=True, projection={"_id": True}
            ))
            event_class = ScheduleUpdated if previous else ScheduleAdded
            event = event_class(schedule_id=schedule.id, task_id=schedule.task_id,
                                next_fire_time=schedule.next_fire_time)
        else:
            try:
                await self._run_idempotent_insert("add_schedule", self._schedules, document)
            except DuplicateKeyError:
                if conflict_policy is ConflictPolicy.exception:
                    raise ConflictingIdError(schedule.id) from None  # type: ignore[no-untyped-call]
                return
            event = ScheduleAdded(schedule_id=schedule.id, task_id=schedule.task_id,
                                  next_fire_time=schedule.next_fire_time)
        await self._event_broker.publish(event)

    async def remove_schedules(self, ids: Iterable[str]) -> None:
        await self._remove_schedules(ids, {}, finished=False)

    async def _remove_schedules(
        self, ids: Iterable[str], condition: dict[str, Any], *, finished: bool
    ) -> None:
        removed: list[dict[str, Any]] = []

        async def remove(schedule_id: str) -> None:
            # One document at a time, so exactly one remover publishes each removal
            query = {"_id": schedule_id, **condition}
            document = await self._run("remove_schedules", lambda: self._schedules.find_one(
                query, projection={"task_id": True}
            ))
            if document and await self._delete_once("remove_schedules", self._schedules, query):
                removed.append(document)

        async with create_task_group() as tg:
            for schedule_id in set(ids):
                tg.start_soon(remove, schedule_id)
        await self._publish_all(
            ScheduleRemoved(schedule_id=doc["_id"], task_id=doc["task_id"], finished=finished)
            for doc in removed
        )

    async def acquire_schedules(
        self, scheduler_id: str, lease_duration: timedelta, limit: int
    ) -> list[Schedule]:
        server_now = await self._server_now()
        claimable = {
            "next_fire_time": {"$ne": None, "$lte": _codec.bson_date(self.local_clock())},
            "paused": {"$ne": True},
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
        result = await self._run("acquire_schedules",
                                 lambda: self._schedules.bulk_write(requests, ordered=False))
        if result.modified_count == len(candidates):
            documents = [{**doc, **claim} for doc in candidates]
        else:
            documents = await self._find("acquire_schedules", self._schedules, {"lease": lease},
                                         sort=[("next_fire_time", ASCENDING)])
        return self._decode_schedules(documents)

    async def release_schedules(
        self, scheduler_id: str, results: Sequence[ScheduleResult]
    ) -> None:
        requests: list[UpdateOne | DeleteOne] = []
        events: list[ScheduleUpdated | ScheduleRemoved] = []
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
                requests.append(DeleteOne(owned))
                events.append(ScheduleRemoved(schedule_id=result.schedule_id,
                                              task_id=result.task_id, finished=True))
                continue
            requests.append(UpdateOne(owned, {"$set": progress,
                                              "$unset": _codec.LEASE_FIELDS}))
            events.append(ScheduleUpdated(schedule_id=result.schedule_id,
                                          task_id=result.task_id,
                                          next_fire_time=result.next_fire_time))
        if requests:
            await self._run("release_schedules",
                            lambda: self._schedules.bulk_write(requests, ordered=False))
        await self._publish_all(events)

    async def get_next_schedule_run_time(self) -> datetime | None:
        """The earliest time a schedule can be processed here: its next fire time, or, for a
        schedule leased by another scheduler, when that lease runs out (so a scheduler
        neither spins on schedules it cannot take nor sleeps past a crashed peer's lease)."""
        server_now = await self._server_now()
        active = {"next_fire_time": {"$ne": None}, "paused": {"$ne": True}}
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
        document = _codec.encode_job(job, self.serializer)
        await self._run_idempotent_insert("add_job", self._jobs, document)
        await self._event_broker.publish(
            JobAdded(job_id=job.id, task_id=job.task_id, schedule_id=job.schedule_id)
        )

    async def get_jobs(self, ids: Iterable[UUID] | None = None) -> list[Job]:
        query = {} if ids is None else {"_id": {"$in": list(ids)}}
        documents = await self._find("get_jobs", self._jobs, query,
                                     sort=JOB_ORDER)
        return self._decode_each(documents, _codec.decode_job)

    async def _queue_head(self, query: dict[str, Any], limit: int) -> list[dict[str, Any]]:
        """Unclaimed jobs in queue order, each with its task document (``task``, a list of
        at most one) and ``max_running_jobs`` joined in: one round trip for all."""
        pipeline: list[dict[str, Any]] = [{"$match": query}, {"$sort": dict(JOB_ORDER)}]
        if limit:
            pipeline.append({"$limit": limit})
        pipeline += [
            {"$lookup": {"from": self._tasks.name, "localField": "task_id",
                         "foreignField": "_id", "as": "task"}},
            {"$set": {"max_running_jobs": {"$arrayElemAt": ["$task.max_running_jobs", 0]}}},
        ]

        async def head() -> list[dict[str, Any]]:
            documents: list[dict[str, Any]] = await (
                await self._jobs.aggregate(pipeline)
            ).to_list(None)
            return documents

        return await self._run("acquire_jobs", head)

    async def _slots_in_use(self, task_ids: Iterable[str]) -> dict[str, set[int]]:
        """The ``max_running_jobs`` slots held by running jobs, by task."""
        task_ids = sorted(task_ids)
        if not task_ids:
            return {}
        holders = await self._find("slots in use", self._jobs,
                                   {"task_id": {"$in": task_ids}, "slot": {"$exists": True}},
                                   projection={"task_id": True, "slot": True})
        used: dict[str, set[int]] = {}
        for doc in holders:
            used.setdefault(doc["task_id"], set()).add(doc["slot"])
        return used

    async def _free_slots(self, limits: dict[str, int]) -> dict[str, list[int]]:
        """Free slot numbers of the tasks in ``limits`` (task id -> ``max_running_jobs``)."""
        used = await self._slots_in_use(limits)
        return {task_id: [slot for slot in range(limit) if slot not in used.get(task_id, ())]
                for task_id, limit in limits.items()}

    @staticmethod
    def _limits(documents: list[dict[str, Any]]) -> dict[str, int]:
        return {doc["task_id"]: doc["max_running_jobs"] for doc in documents
                if doc.get("max_running_jobs") is not None}

    async def _claimable_jobs(
        self, limit: int | None
    ) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
        """Unclaimed jobs in queue order, up to ``limit`` that can start now, with the free
        slots of their limited tasks. Idle schedulers pay one query; a second one looks past
        jobs of tasks that are at their ``max_running_jobs``."""
        query: dict[str, Any] = {"acquired_by": None}
        candidates = await self._queue_head(query, limit or 0)
        if not candidates:
            return [], {}
        free_slots = await self._free_slots(self._limits(candidates))
        room = {task_id: len(slots) for task_id, slots in free_slots.items()}
        startable = []
        for doc in candidates:
            if doc["task_id"] in room:
                if not room[doc["task_id"]]:
                    continue
                room[doc["task_id"]] -= 1
            startable.append(doc)
        saturated = [task_id for task_id, left in room.items() if not left]
        if limit and len(startable) < limit == len(candidates) and saturated:
            more = await self._queue_head(
                {**query, "task_id": {"$nin": saturated},
                 "_id": {"$nin": [doc["_id"] for doc in candidates]}},
                limit - len(startable),
            )
            new_limits = {task_id: most for task_id, most in self._limits(more).items()
                          if task_id not in free_slots}
            free_slots.update(await self._free_slots(new_limits))
            startable += more
        return startable, free_slots

    async def acquire_jobs(
        self, scheduler_id: str, lease_duration: timedelta, limit: int | None = None
    ) -> list[Job]:
        server_now = await self._server_now()
        candidates, free_slots = await self._claimable_jobs(limit)
        if not candidates:
            return []

        # Claim every candidate in one bulk write. Each update is conditional on the job
        # being unclaimed; a job of a limited task also takes a free slot, and the unique
        # (task_id, slot) index turns a lost race for that slot into a duplicate-key error.
        lease = uuid4().hex
        claim = {"acquired_by": scheduler_id,
                 "acquired_until": server_now + lease_duration, "lease": lease}
        attempted: list[dict[str, Any]] = []
        unlimited_ids: list[UUID] = []
        requests: list[UpdateOne | UpdateMany] = []
        for document in candidates:
            slots = free_slots.get(document["task_id"])
            if slots is None:
                unlimited_ids.append(document["_id"])
            elif slots:
                requests.append(UpdateOne({"_id": document["_id"], "acquired_by": None},
                                          {"$set": {**claim, "slot": slots.pop(0)}}))
            else:
                continue  # this task has no free slot left in this batch
            attempted.append(document)
        if unlimited_ids:
            requests.append(UpdateMany({"_id": {"$in": unlimited_ids}, "acquired_by": None},
                                       {"$set": claim}))
        if not requests:
            return []
        self._remember_tasks(attempted)

        attempts = 0

        async def claim_all() -> int | None:
            nonlocal attempts
            attempts += 1
            try:
                result = await self._jobs.bulk_write(requests, ordered=False)
            except BulkWriteError as exc:
                if any(error["code"] != _DUPLICATE_KEY for error in exc.details["writeErrors"]):
                    raise
                return None  # some slots were taken meanwhile
            modified: int = result.modified_count
            return modified

        claimed_count = await self._run("acquire_jobs", claim_all)
        if claimed_count == len(attempted):
            # All claims won. Jobs are immutable but for their lease, so what we read is current
            claimed = [{**doc, **claim} for doc in attempted]
        elif claimed_count == 0 and attempts == 1:
            return []  # every job was taken by others (after a retry, some may be ours)
        else:
            claimed = await self._find("acquire_jobs", self._jobs, {"lease": lease},
                                       sort=JOB_ORDER)
        return await self._start_claimed(scheduler_id, claimed)

    async def _start_claimed(self, scheduler_id: str, claimed: list[dict[str, Any]]) -> list[Job]:
        """Decode claimed jobs; release at once those that cannot or must not start."""
        now = self.local_clock()
        acquired: list[Job] = []
        discarded: list[tuple[dict[str, Any], JobResult, Job | None]] = []
        for document in claimed:
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

        await self._publish_all(JobAcquired.from_job(job, scheduler_id=scheduler_id)
                                for job in acquired)
        if discarded:
            ids = [document["_id"] for document, _, _ in discarded]
            await self._run("acquire_jobs", lambda: self._jobs.delete_many(
                {"_id": {"$in": ids}, "acquired_by": scheduler_id}
            ))
            await self._store_results([result for _, result, _ in discarded])
            await self._publish_all(
                self._released_event(document, result, scheduler_id, job)
                for document, result, job in discarded
            )
        return acquired

    @staticmethod
    def _released_event(document: dict[str, Any], result: JobResult, scheduler_id: str,
                        job: Job | None) -> JobReleased:
        return JobReleased.from_result(
            result, scheduler_id, document["task_id"], document.get("schedule_id"),
            job.scheduled_fire_time if job else document.get("scheduled_fire_time"),
        )

    async def _store_results(self, results: Sequence[JobResult]) -> None:
        documents = [_codec.encode_result(result, self.serializer) for result in results
                     if result.expires_at > result.finished_at]
        if not documents:
            return

        async def insert() -> None:
            try:
                await self._results.insert_many(documents, ordered=False)
            except BulkWriteError as exc:  # duplicates: stored by an earlier attempt
                if any(error["code"] != _DUPLICATE_KEY for error in exc.details["writeErrors"]):
                    raise

        await self._run("store job results", insert)

    async def _delete_once(self, what: str, collection: Any, query: dict[str, Any]) -> bool:
        """Delete the document matching ``query``; True if this call deleted it. Deletion is
        the commit point of a release or removal: exactly one node wins and publishes. A
        retry after a lost reply finds the document gone, which means our first attempt
        landed. (Should the first attempt have failed *before* reaching the server and
        another node have deleted the document meantime -- which for a job takes its lease
        running out -- both would publish: a window documented in the internals.)"""
        attempts = 0

        async def delete() -> bool:
            nonlocal attempts
            attempts += 1
            outcome = await collection.delete_one(query)
            return bool(outcome.deleted_count) or attempts > 1

        return await self._run(what, delete)

    async def release_job(self, scheduler_id: str, job: Job, result: JobResult) -> None:
        owned = {"_id": job.id, "acquired_by": {"$in": [scheduler_id, None]}}
        if not await self._delete_once("release_job", self._jobs, owned):
            self._logger.warning(
                "Job %s was no longer held by scheduler %r (its lease expired and it was "
                "released elsewhere); result not recorded", job.id, scheduler_id,
            )
            return
        await self._store_results([result])
        await self._event_broker.publish(JobReleased.from_result(
            result, scheduler_id, job.task_id, job.schedule_id, job.scheduled_fire_time
        ))

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
            {"_id": {"$in": list(job_ids)}, "acquired_by": scheduler_id},
            {"$set": {"acquired_until": until}},
        ))

    async def _release_abandoned(self, query: dict[str, Any], what: str) -> None:
        """Release matching leased jobs as abandoned; per document, so only one node wins."""
        documents = await self._find(what, self._jobs, query)
        now = self.local_clock()
        released: list[tuple[dict[str, Any], JobResult, Job | None]] = []
        for document in documents:
            owned = {"_id": document["_id"], "lease": document.get("lease")}
            if not await self._delete_once(what, self._jobs, owned):
                continue
            try:
                job: Job | None = _codec.decode_job(document, self.serializer)
            except DeserializationError:
                job = None
            result = (JobResult.from_job(job, JobOutcome.abandoned, finished_at=now) if job
                      else _codec.result_for_document(document, JobOutcome.abandoned, now))
            released.append((document, result, job))

        await self._store_results([result for _, result, _ in released])
        await self._publish_all(
            self._released_event(document, result, document["acquired_by"], job)
            for document, result, job in released
        )

    async def reap_abandoned_jobs(self, scheduler_id: str) -> None:
        await self._release_abandoned({"acquired_by": scheduler_id}, "reap_abandoned_jobs")

    async def cleanup(self) -> None:
        server_now = await self._server_now()
        # 1. Expired job results (the TTL index does this too, but only once a minute)
        await self._run("cleanup", lambda: self._results.delete_many(
            {"expires_at": {"$lte": server_now}}
        ))
        # 2. Jobs whose lease expired: their scheduler is gone
        await self._release_abandoned(
            {"acquired_by": {"$ne": None}, "acquired_until": {"$lt": server_now}}, "cleanup"
        )
        # 3. Finished schedules with no jobs left
        finished = await self._find("cleanup", self._schedules,
                                    {"next_fire_time": None, "acquired_by": None},
                                    projection={"_id": True})
        if finished:
            ids = [doc["_id"] for doc in finished]
            with_jobs = set(await self._run("cleanup", lambda: self._jobs.distinct(
                "schedule_id", {"schedule_id": {"$in": ids}}
            )))
            await self._remove_schedules(
                [i for i in ids if i not in with_jobs],
                {"next_fire_time": None, "acquired_by": None}, finished=True,
            )

    async def discard_job(self, job_id: UUID) -> bool:
        """Delete a queued job that no scheduler has claimed yet (an operator's "drop").

        The delete is conditional on ``acquired_by`` being unset, so a job a scheduler
        claimed meanwhile runs as usual and this returns False. When this call deleted it,
        the job is released as ``cancelled``: its result is stored (if the job keeps
        results) and ``JobReleased`` is published with an empty ``scheduler_id``, since no
        scheduler held it.
        """
        queued = {"_id": job_id, "acquired_by": None}
        document = await self._run("discard_job", lambda: self._jobs.find_one(queued))
        if not document or not await self._delete_once("discard_job", self._jobs, queued):
            return False
        try:
            job: Job | None = _codec.decode_job(document, self.serializer)
        except DeserializationError:
            job = None
        now = self.local_clock()
        result = (JobResult.from_job(job, JobOutcome.cancelled, finished_at=now) if job
                  else _codec.result_for_document(document, JobOutcome.cancelled, now))
        await self._store_results([result])
        await self._event_broker.publish(self._released_event(document, result, "", job))
        return True
