"""Every read the dashboard makes, and every assumption it makes about our documents.

The store's internals change; this module is the one place to adapt when they do. The
dashboard relies on these shapes (collection names carry the store's prefix, ``apsched_``
by default):

* ``tasks``: ``{_id, max_running_jobs, state}``
* ``schedules``: ``{_id, task_id, paused, next_fire_time, state, progress, acquired_by?,
  acquired_until?, lease?, removal?, removal_at?}``. ``next_fire_time`` is a BSON date
  (milliseconds) or null once the schedule is finished; the exact time is in the serialized
  ``progress``. A schedule with a ``removal`` field is being removed. A lease is
  ``acquired_by`` (the scheduler's identity) and ``acquired_until`` (server time).
* ``jobs``: ``{_id (UUID), task_id, schedule_id, created_at, queue_order,
  scheduled_fire_time, result_expiration_time, state, acquired_by?, acquired_until?,
  lease?, slot?, abandoned?}`` plus possibly more lease bookkeeping, which is ignored. A
  job is *queued* while ``acquired_by`` is null or missing, *running* once a scheduler
  claimed it, and neither once ``abandoned`` is set (a node took it over to release it).
* ``job_results`` (results, and release markers ``{marker: true}``) and the broker's events
  collection (several events per document) are never read: outcomes come from a broker
  subscription (:mod:`.outcomes`), which decodes event documents itself.

Serialized state (``state``, ``progress``) is decoded only by :func:`decode`, through the
store's codec and the cluster's serializer.

Cost: every query is projected, limited and served by one of the store's indexes, and the
aggregations stop after :data:`COUNT_CAP` documents, so a page view costs a fixed number
of commands (:data:`COMMANDS_PER_VIEW`) whose work does not grow past the cap, whatever
the collection sizes. The exceptions both read the schedules collection (configuration, not
a queue): the schedule counts (``paused`` has no index) read at most :data:`COUNT_CAP`
schedules, and a search matches task ids without an index (the store needs none on
``schedules.task_id``); the page's timeout bounds it on the server too (``maxTimeMS``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, Literal, TypeVar
from uuid import UUID

import attrs
import pymongo
from apscheduler import DeserializationError, Job, Schedule
from apscheduler.abc import Serializer
from pymongo import ASCENDING, DESCENDING

from .._client import database_of

T = TypeVar("T")

#: Counting stops here (the page then shows "100,000+"): no count reads more documents.
COUNT_CAP = 100_000
#: Rows per page of schedules or jobs.
PAGE_SIZE = 50
#: Nodes and tasks listed on the overview at most.
OVERVIEW_ROWS = 200
#: Longest search text accepted.
MAX_SEARCH = 200
#: Database commands per page view (``hello`` for the server's clock included).
COMMANDS_PER_VIEW = {"overview": 6, "schedules": 2, "jobs": 4, "outcomes": 0}

JobState = Literal["queued", "running"]
_QUEUED: dict[str, Any] = {"acquired_by": None}
#: claimed by a scheduler, and not taken over for release (``abandoned``)
_RUNNING: dict[str, Any] = {"acquired_by": {"$ne": None}, "abandoned": {"$exists": False}}
_JOB_ORDER = [("queue_order", ASCENDING), ("_id", ASCENDING)]
_SCHEDULE_FIELDS = ["task_id", "paused", "next_fire_time", "state", "progress",
                    "acquired_by", "acquired_until", "removal"]
_JOB_FIELDS = ["task_id", "schedule_id", "created_at", "queue_order", "scheduled_fire_time",
               "result_expiration_time", "state", "acquired_by", "acquired_until"]


class BadRequest(ValueError):
    """A page parameter that cannot be used (the message names it)."""


def decode(document: dict[str, Any], kind: Literal["schedule", "job"],
           serializer: Serializer) -> Any:
    """The APScheduler object stored in ``document``, through the store's own codec (the
    only function here that knows how state is serialized). Raises
    :class:`~apscheduler.DeserializationError` for what cannot be decoded."""
    from .. import _codec

    if kind == "schedule":
        return _codec.decode_schedule(document, serializer)
    return _codec.decode_job(document, serializer)


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --- what the pages show ----------------------------------------------------------------


@attrs.frozen
class NodeLeases:
    """What one scheduler holds, judged from its leases."""

    node: str
    jobs: int = 0
    expired_jobs: int = 0
    tasks: tuple[str, ...] = ()
    schedules: int = 0
    expired_schedules: int = 0
    lease_until: datetime | None = None


@attrs.frozen
class TaskRow:
    id: str
    max_running_jobs: int | None
    running: int
    queued: int


@attrs.frozen
class Overview:
    server_now: datetime
    schedules_active: int
    schedules_paused: int
    schedules_finished: int
    schedules_removing: int
    queued_jobs: int
    running_jobs: int
    expired_job_leases: int
    expired_schedule_leases: int
    oldest_queued: datetime | None
    oldest_queued_task: str | None
    nodes: list[NodeLeases]
    tasks: list[TaskRow]

    @property
    def expired_leases(self) -> int:
        return self.expired_job_leases + self.expired_schedule_leases

    @property
    def oldest_queued_age(self) -> timedelta | None:
        return None if self.oldest_queued is None else self.server_now - self.oldest_queued


@attrs.frozen
class ScheduleRow:
    id: str
    task_id: str
    paused: bool
    removing: bool
    next_fire_time: datetime | None
    last_fire_time: datetime | None
    trigger: Any  # the decoded trigger, None if undecodable
    leased_by: str | None
    leased_until: datetime | None
    lease_expired: bool
    problem: str | None = None

    @property
    def finished(self) -> bool:
        return self.next_fire_time is None and self.problem is None


@attrs.frozen
class JobRow:
    id: UUID
    task_id: str
    schedule_id: str | None
    created_at: datetime | None
    scheduled_fire_time: datetime | None
    start_deadline: datetime | None
    node: str | None
    lease_until: datetime | None
    lease_remaining: timedelta | None
    arguments: str
    cursor: str
    problem: str | None = None

    @property
    def lease_expired(self) -> bool:
        return self.lease_remaining is not None and self.lease_remaining <= timedelta(0)


@attrs.frozen
class Page(Generic[T]):
    rows: list[T]
    server_now: datetime
    next_cursor: str | None = None
    previous_cursor: str | None = None
    counts: dict[str, int] = attrs.field(factory=dict)


# --- the reader ---------------------------------------------------------------------------


@attrs.define
class ClusterReader:
    """Reads one store's collections. Never writes.

    :param timeout: seconds a page's reads may take in all (PyMongo's client-side
        operation timeout, server selection included), so an unreachable server fails the
        page quickly instead of hanging it
    """

    client: Any
    database: str
    serializer: Serializer
    prefix: str = "apsched_"
    timeout: float = 5.0

    def _collection(self, name: str) -> Any:
        return database_of(self.client, self.database).get_collection(self.prefix + name)

    @contextmanager
    def _bounded(self) -> Iterator[None]:
        with pymongo.timeout(self.timeout):
            yield

    async def _aggregate(self, name: str, pipeline: list[dict[str, Any]]) -> list[Any]:
        cursor = await self._collection(name).aggregate(pipeline)
        documents: list[Any] = await cursor.to_list(None)
        return documents

    async def server_now(self) -> datetime:
        """The server's clock (leases are judged on it), from one ``hello``."""
        reply = await self.client.admin.command("hello")
        return _utc(reply.get("localTime")) or datetime.now(UTC)

    # overview

    async def overview(self) -> Overview:
        with self._bounded():
            now = await self.server_now()
            schedule_groups = await self._aggregate("schedules", [
                {"$limit": COUNT_CAP},
                {"$group": {"_id": {
                    "finished": {"$eq": [{"$ifNull": ["$next_fire_time", None]}, None]},
                    "paused": {"$eq": ["$paused", True]},
                    "removing": {"$ne": [{"$type": "$removal"}, "missing"]},
                }, "count": {"$sum": 1}}},
            ])
            schedule_leases = await self._aggregate("schedules", [
                {"$match": {"acquired_until": {"$exists": True}}},
                {"$limit": COUNT_CAP},
                {"$group": {"_id": "$acquired_by", "count": {"$sum": 1},
                            "expired": _count_expired(now),
                            "until": {"$max": "$acquired_until"}}},
                {"$sort": {"_id": ASCENDING}},
                {"$limit": OVERVIEW_ROWS},
            ])
            held_jobs = await self._aggregate("jobs", [
                {"$match": _RUNNING},
                {"$limit": COUNT_CAP},
                {"$group": {"_id": {"node": "$acquired_by", "task": "$task_id"},
                            "count": {"$sum": 1}, "expired": _count_expired(now),
                            "until": {"$max": "$acquired_until"}}},
                {"$limit": OVERVIEW_ROWS * 10},
            ])
            queued_jobs = await self._aggregate("jobs", [
                {"$match": _QUEUED},
                {"$sort": dict(_JOB_ORDER)},
                {"$limit": COUNT_CAP},
                {"$group": {"_id": "$task_id", "count": {"$sum": 1},
                            "oldest": {"$first": "$created_at"},
                            "order": {"$first": "$queue_order"}}},
                {"$limit": OVERVIEW_ROWS * 10},
            ])
            tasks = await self._collection("tasks").find(
                {}, projection={"max_running_jobs": True}, sort=[("_id", ASCENDING)],
                limit=OVERVIEW_ROWS,
            ).to_list(None)
        return _build_overview(now, schedule_groups, schedule_leases, held_jobs, queued_jobs,
                               tasks)

    # schedules

    async def schedules(self, search: str = "", after: str | None = None,
                        before: str | None = None) -> Page[ScheduleRow]:
        """A page of schedules in id order, matching ``search`` as a prefix of the schedule
        id (the ``_id`` index) or of the task id (no index: see the module's docstring)."""
        if len(search) > MAX_SEARCH:
            raise BadRequest(f"search text longer than {MAX_SEARCH} characters")
        for name, value in (("after", after), ("before", before)):
            if value is not None and len(value) > 1024:
                raise BadRequest(f"{name}: not a schedule id (longer than 1024 characters)")
        conditions: list[dict[str, Any]] = []
        if search:
            prefix = {"$regex": "^" + re.escape(search)}
            conditions.append({"$or": [{"_id": prefix}, {"task_id": prefix}]})
        backwards = before is not None and after is None
        if after is not None:
            conditions.append({"_id": {"$gt": after}})
        elif before is not None:
            conditions.append({"_id": {"$lt": before}})
        query = {"$and": conditions} if conditions else {}
        with self._bounded():
            now = await self.server_now()
            documents = await self._collection("schedules").find(
                query, projection=_SCHEDULE_FIELDS,
                sort=[("_id", DESCENDING if backwards else ASCENDING)], limit=PAGE_SIZE + 1,
            ).to_list(None)
        more = len(documents) > PAGE_SIZE
        documents = documents[:PAGE_SIZE]
        if backwards:
            documents.reverse()
        rows = [self._schedule_row(document, now) for document in documents]
        first, last = (rows[0].id, rows[-1].id) if rows else (None, None)
        if backwards:
            return Page(rows, now, next_cursor=last, previous_cursor=first if more else None)
        return Page(rows, now, next_cursor=last if more else None,
                    previous_cursor=first if after is not None else None)

    def _schedule_row(self, document: dict[str, Any], now: datetime) -> ScheduleRow:
        until = _utc(document.get("acquired_until"))
        common = {
            "id": document["_id"],
            "task_id": str(document.get("task_id")),
            "paused": document.get("paused") is True,
            "removing": "removal" in document,
            "leased_by": document.get("acquired_by"),
            "leased_until": until,
            "lease_expired": until is not None and until <= now,
        }
        try:
            schedule: Schedule = decode(document, "schedule", self.serializer)
        except DeserializationError as exc:
            return ScheduleRow(**common, next_fire_time=_utc(document.get("next_fire_time")),
                               last_fire_time=None, trigger=None, problem=str(exc))
        return ScheduleRow(**common, next_fire_time=schedule.next_fire_time,
                           last_fire_time=schedule.last_fire_time, trigger=schedule.trigger)

    # jobs

    async def jobs(self, state: JobState = "queued", node: str | None = None,
                   after: str | None = None, schedule: str | None = None) -> Page[JobRow]:
        """A page of queued or running jobs in queue order: running ones optionally of one
        node, either optionally of one schedule (then the counts are that schedule's too);
        ``after`` is the ``cursor`` of the last row of the previous page."""
        if state not in ("queued", "running"):
            raise BadRequest(f"state must be 'queued' or 'running', not {state!r}")
        for name, value in (("node", node), ("schedule", schedule)):
            if value is not None and len(value) > 1024:
                raise BadRequest(f"{name}: longer than 1024 characters")
        scope: dict[str, Any] = {"schedule_id": schedule} if schedule else {}
        query: dict[str, Any] = {**(_QUEUED if state == "queued" else _RUNNING), **scope}
        if state == "running" and node:
            query = {"acquired_by": node, **scope}
        if after:
            order, job_id = parse_job_cursor(after)
            query = {"$and": [query, {"$or": [
                {"queue_order": {"$gt": order}},
                {"queue_order": order, "_id": {"$gt": job_id}},
            ]}]}
        jobs = self._collection("jobs")
        with self._bounded():
            now = await self.server_now()
            documents = await jobs.find(query, projection=_JOB_FIELDS, sort=_JOB_ORDER,
                                        limit=PAGE_SIZE + 1).to_list(None)
            counts = {
                "queued": await jobs.count_documents({**_QUEUED, **scope}, limit=COUNT_CAP),
                "running": await jobs.count_documents({**_RUNNING, **scope}, limit=COUNT_CAP),
            }
        more = len(documents) > PAGE_SIZE
        rows = [self._job_row(document, now) for document in documents[:PAGE_SIZE]]
        return Page(rows, now, next_cursor=rows[-1].cursor if more else None,
                    previous_cursor=None, counts=counts)

    def _job_row(self, document: dict[str, Any], now: datetime) -> JobRow:
        until = _utc(document.get("acquired_until"))
        common = {
            "id": document["_id"],
            "task_id": str(document.get("task_id")),
            "schedule_id": document.get("schedule_id"),
            "created_at": _utc(document.get("created_at")),
            "node": document.get("acquired_by"),
            "lease_until": until,
            "lease_remaining": None if until is None else until - now,
            "cursor": f"{document.get('queue_order', 0)}_{document['_id']}",
        }
        try:
            job: Job = decode(document, "job", self.serializer)
        except DeserializationError as exc:
            return JobRow(**common, scheduled_fire_time=_utc(document.get("scheduled_fire_time")),
                          start_deadline=None, arguments="", problem=str(exc))
        return JobRow(**common, scheduled_fire_time=job.scheduled_fire_time,
                      start_deadline=job.start_deadline,
                      arguments=_call_arguments(job.args, job.kwargs))


def parse_job_cursor(cursor: str) -> tuple[int, UUID]:
    order, _, job_id = cursor.partition("_")
    try:
        return int(order), UUID(job_id)
    except ValueError:
        raise BadRequest(f"after: not a job cursor: {cursor[:80]!r}") from None


def _call_arguments(args: tuple[Any, ...], kwargs: dict[str, Any], limit: int = 160) -> str:
    text = ", ".join([*map(repr, args), *(f"{key}={value!r}" for key, value in kwargs.items())])
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _count_expired(now: datetime) -> dict[str, Any]:
    """Count the group's leases that ran out by the server's clock."""
    return {"$sum": {"$cond": [{"$lt": ["$acquired_until", now]}, 1, 0]}}


def _build_overview(
    now: datetime, schedule_groups: list[Any], schedule_leases: list[Any],
    held_jobs: list[Any], queued_jobs: list[Any], tasks: list[Any],
) -> Overview:
    counts = {"active": 0, "paused": 0, "finished": 0, "removing": 0}
    for group in schedule_groups:
        key = group["_id"]
        state = ("removing" if key.get("removing") else "finished" if key.get("finished")
                 else "paused" if key.get("paused") else "active")
        counts[state] += group["count"]

    nodes: dict[str, dict[str, Any]] = {}

    def node(name: Any) -> dict[str, Any]:
        return nodes.setdefault(str(name), {"node": str(name), "tasks": set()})

    def later(a: datetime | None, b: Any) -> datetime | None:
        b = _utc(b)
        return b if a is None or (b is not None and b > a) else a

    running_by_task: dict[str, int] = {}
    expired_jobs = 0
    for group in held_jobs:
        key = group["_id"]
        entry = node(key.get("node"))
        entry["jobs"] = entry.get("jobs", 0) + group["count"]
        entry["expired_jobs"] = entry.get("expired_jobs", 0) + group["expired"]
        entry["lease_until"] = later(entry.get("lease_until"), group.get("until"))
        if key.get("task") is not None:
            entry["tasks"].add(str(key["task"]))
            running_by_task[str(key["task"])] = (running_by_task.get(str(key["task"]), 0)
                                                 + group["count"])
        expired_jobs += group["expired"]
    expired_schedules = 0
    for group in schedule_leases:
        if group["_id"] is None:
            continue  # a lease field left without a holder: not a lease
        entry = node(group["_id"])
        entry["schedules"] = group["count"]
        entry["expired_schedules"] = group["expired"]
        entry["lease_until"] = later(entry.get("lease_until"), group.get("until"))
        expired_schedules += group["expired"]

    queued_by_task = {str(group["_id"]): group["count"] for group in queued_jobs}
    # queue order, not created_at: the dates hold milliseconds, the order microseconds
    first = min(queued_jobs, key=lambda group: group.get("order") or 0, default=None)
    oldest = (None, None) if first is None else (_utc(first.get("oldest")), str(first["_id"]))
    task_rows = [
        TaskRow(id=str(task["_id"]), max_running_jobs=task.get("max_running_jobs"),
                running=running_by_task.get(str(task["_id"]), 0),
                queued=queued_by_task.get(str(task["_id"]), 0))
        for task in tasks
    ]
    return Overview(
        server_now=now,
        schedules_active=counts["active"],
        schedules_paused=counts["paused"],
        schedules_finished=counts["finished"],
        schedules_removing=counts["removing"],
        queued_jobs=sum(queued_by_task.values()),
        running_jobs=sum(group["count"] for group in held_jobs),
        expired_job_leases=expired_jobs,
        expired_schedule_leases=expired_schedules,
        oldest_queued=oldest[0],
        oldest_queued_task=oldest[1],
        nodes=[NodeLeases(**{**entry, "tasks": tuple(sorted(entry["tasks"]))})
               for _, entry in sorted(nodes.items())][:OVERVIEW_ROWS],
        tasks=task_rows,
    )
