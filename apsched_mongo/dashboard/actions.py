"""The operator's actions, each through :class:`~apsched_mongo.MongoDBDataStore`'s own
methods on a store started with the dashboard's event broker: the cluster hears the same
events as when a scheduler does the same thing, and leases are respected.

*Run now* adds one extra job for the schedule's task, built the way the scheduler builds a
fired job (arguments, executor, result expiry, metadata, ``schedule_id``) but with no
scheduled fire time. The schedule itself is not touched, so each of its fire times still
produces exactly one job: a manual run neither replaces nor skips the next regular one.
The job's id comes from the form (a UUID minted when the page was drawn), so a form sent
twice queues the job once.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import attrs
from apscheduler import ConflictingIdError, ConflictPolicy, Job, Schedule
from pymongo.errors import DuplicateKeyError

from ..datastore import MongoDBDataStore


class ActionRefused(Exception):
    """The action cannot be done now; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _schedule(store: MongoDBDataStore, schedule_id: str, server_now: datetime,
                    *, must_be_free: bool = True) -> Schedule:
    schedules = await store.get_schedules({schedule_id})
    if not schedules:
        raise ActionRefused(404, f"no schedule {schedule_id!r} (removed meanwhile?)")
    schedule = schedules[0]
    until = schedule.acquired_until
    if must_be_free and until is not None and until > server_now:
        # Replacing the document now would drop the lease and lose the holder's progress
        # update: the same fire time could then fire twice
        raise ActionRefused(409, f"schedule {schedule_id!r} is being processed by "
                                 f"{schedule.acquired_by!r} right now; try again in a moment")
    return schedule


async def pause(store: MongoDBDataStore, schedule_id: str, server_now: datetime) -> str:
    """As ``AsyncScheduler.pause_schedule``: the schedule, replaced with ``paused=True``."""
    schedule = await _schedule(store, schedule_id, server_now)
    if schedule.paused:
        return f"schedule {schedule_id!r} was already paused"
    await store.add_schedule(attrs.evolve(schedule, paused=True), ConflictPolicy.replace)
    return f"paused schedule {schedule_id!r}"


async def resume(store: MongoDBDataStore, schedule_id: str, server_now: datetime) -> str:
    """As ``AsyncScheduler.unpause_schedule()`` with its default: resume where the
    schedule left off (fire times missed while paused follow its coalescing policy)."""
    schedule = await _schedule(store, schedule_id, server_now)
    if not schedule.paused:
        return f"schedule {schedule_id!r} was not paused"
    await store.add_schedule(attrs.evolve(schedule, paused=False), ConflictPolicy.replace)
    return f"resumed schedule {schedule_id!r}"


async def run_now(store: MongoDBDataStore, schedule_id: str, server_now: datetime,
                  job_id: UUID) -> str:
    """Queue one extra job of the schedule now (see the module's docstring)."""
    schedule = await _schedule(store, schedule_id, server_now, must_be_free=False)
    now = datetime.now(UTC)
    deadline: dict[str, Any] = {} if schedule.misfire_grace_time is None else {
        "start_deadline": now + schedule.misfire_grace_time}
    job = Job(  # no scheduled_fire_time: this run is not one of the schedule's fire times
        id=job_id,
        task_id=schedule.task_id,
        args=schedule.args,
        kwargs=schedule.kwargs,
        schedule_id=schedule.id,
        **deadline,
        executor=schedule.job_executor,
        result_expiration_time=schedule.job_result_expiration_time,
        metadata=schedule.metadata.copy(),
        created_at=now,
    )
    try:
        await store.add_job(job)
    except (ConflictingIdError, DuplicateKeyError):
        return f"a run of schedule {schedule_id!r} was already queued from this page"
    return f"queued a run of schedule {schedule_id!r} now (job {job_id})"


async def remove(store: MongoDBDataStore, schedule_id: str, server_now: datetime) -> str:
    """``remove_schedules``; jobs it already queued stay queued (as in APScheduler)."""
    await _schedule(store, schedule_id, server_now, must_be_free=False)
    await store.remove_schedules([schedule_id])
    return f"removed schedule {schedule_id!r}"


#: The name a drop is released under (``JobReleased.scheduler_id``): not a node
DROPPED_BY = "dashboard"


async def drop(store: MongoDBDataStore, job_id: UUID) -> str:
    """``discard_job``: only a job no scheduler has claimed yet."""
    if not await store.discard_job(job_id, by=DROPPED_BY):
        raise ActionRefused(409, f"job {job_id} is no longer queued (a scheduler claimed it, "
                                 "or it finished or was dropped meanwhile)")
    return f"dropped queued job {job_id}"
