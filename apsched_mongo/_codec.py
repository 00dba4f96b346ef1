"""Document shapes.

Only what queries, indexes and cleanup need is plain BSON (ids, task/schedule ids, dates,
lease fields); everything else goes through the configured APScheduler serializer, so
datetimes keep their microseconds and UTC offsets exactly. BSON dates hold milliseconds:
fire times are rounded *up* so nothing becomes due early.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
from apscheduler import (
    DeserializationError,
    Job,
    JobOutcome,
    JobResult,
    Schedule,
    SerializationError,
    Task,
)
from apscheduler.abc import Serializer

_MS = timedelta(milliseconds=1)

TASK_PLAIN = frozenset({"id", "max_running_jobs", "running_jobs"})
SCHEDULE_PLAIN = frozenset({"id", "task_id", "paused", "acquired_by", "acquired_until"})
SCHEDULE_PROGRESS = frozenset({"trigger", "last_fire_time", "next_fire_time"})
JOB_PLAIN = frozenset({"id", "task_id", "schedule_id", "acquired_by", "acquired_until"})
#: Unset when a schedule is released (its ``lease`` then holds the releasing call's token)
SCHEDULE_LEASE_FIELDS = {"acquired_by": "", "acquired_until": ""}


def bson_date(value: datetime | None, *, round_up: bool = False) -> datetime | None:
    """``value`` in UTC at BSON's millisecond precision."""
    if value is None:
        return None
    value = value.astimezone(UTC)
    extra = timedelta(microseconds=value.microsecond % 1000)
    if not extra:
        return value
    return value - extra + (_MS if round_up else timedelta())


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def queue_order(created_at: datetime) -> int:
    """Microseconds since the epoch: FIFO order exact to the microsecond (dates hold ms)."""
    return (created_at - _EPOCH) // timedelta(microseconds=1)


def _fields(obj: Any, names: frozenset[str], *, exclude: bool) -> dict[str, Any]:
    return {
        field.name: getattr(obj, field.name)
        for field in attrs.fields(type(obj))
        if (field.name in names) != exclude
    }


def _deserialize(serializer: Serializer, data: Any, what: str) -> dict[str, Any]:
    if not isinstance(data, bytes):
        raise DeserializationError(f"{what}: serialized state missing or not binary")
    try:
        state = serializer.deserialize(data)
    except DeserializationError as exc:
        raise DeserializationError(f"{what}: {exc.__cause__ or exc!r}") from exc
    if not isinstance(state, dict):
        raise DeserializationError(f"{what}: serialized state is not a mapping")
    return state


def _build(cls: type[Any], what: str, **kwargs: Any) -> Any:
    try:
        return cls(**kwargs)
    except DeserializationError:
        raise
    except Exception as exc:
        raise DeserializationError(f"{what}: {exc}") from exc


def encode_task(task: Task, serializer: Serializer) -> dict[str, Any]:
    state = _fields(task, TASK_PLAIN, exclude=True)
    return {
        "_id": task.id,
        "max_running_jobs": task.max_running_jobs,
        "state": serializer.serialize(state),
    }


def decode_task(document: dict[str, Any], serializer: Serializer, running_jobs: int) -> Task:
    what = f"task {document.get('_id')!r}"
    state = _deserialize(serializer, document.get("state"), what)
    task: Task = _build(
        Task,
        what,
        id=document["_id"],
        max_running_jobs=document.get("max_running_jobs"),
        running_jobs=running_jobs,
        **state,
    )
    return task


def encode_schedule_progress(
    trigger: Any, last_fire_time: datetime | None, next_fire_time: datetime | None,
    serializer: Serializer,
) -> dict[str, Any]:
    """The fields that change each time a schedule fires."""
    progress = {
        "trigger": trigger,
        "last_fire_time": last_fire_time,
        "next_fire_time": next_fire_time,
    }
    return {
        "next_fire_time": bson_date(next_fire_time, round_up=True),
        "progress": serializer.serialize(progress),
    }


def encode_schedule(schedule: Schedule, serializer: Serializer) -> dict[str, Any]:
    static = _fields(schedule, SCHEDULE_PLAIN | SCHEDULE_PROGRESS, exclude=True)
    return {
        "_id": schedule.id,
        "task_id": schedule.task_id,
        "paused": schedule.paused,
        "state": serializer.serialize(static),
        **encode_schedule_progress(
            schedule.trigger, schedule.last_fire_time, schedule.next_fire_time, serializer
        ),
    }


def decode_next_fire_time(document: dict[str, Any], serializer: Serializer) -> datetime | None:
    """The exact next fire time (the plain BSON copy is rounded to milliseconds)."""
    what = f"schedule {document.get('_id')!r}"
    value = _deserialize(serializer, document.get("progress"), what).get("next_fire_time")
    if isinstance(value, str):  # text serializers (JSON) store datetimes in ISO 8601
        value = datetime.fromisoformat(value)
    if value is not None and not isinstance(value, datetime):
        raise DeserializationError(f"{what}: next_fire_time is not a datetime")
    return value


def decode_schedule(document: dict[str, Any], serializer: Serializer) -> Schedule:
    what = f"schedule {document.get('_id')!r}"
    state = _deserialize(serializer, document.get("state"), what)
    progress = _deserialize(serializer, document.get("progress"), what)
    schedule: Schedule = _build(
        Schedule,
        what,
        id=document["_id"],
        task_id=document["task_id"],
        paused=bool(document.get("paused", False)),
        acquired_by=document.get("acquired_by"),
        acquired_until=document.get("acquired_until"),
        **state,
        **progress,
    )
    return schedule


def encode_job(job: Job, serializer: Serializer) -> dict[str, Any]:
    state = _fields(job, JOB_PLAIN, exclude=True)
    return {
        "_id": job.id,
        "task_id": job.task_id,
        "schedule_id": job.schedule_id,
        "created_at": bson_date(job.created_at),
        "queue_order": queue_order(job.created_at),
        "scheduled_fire_time": bson_date(job.scheduled_fire_time),
        "result_expiration_time": job.result_expiration_time.total_seconds(),
        "state": serializer.serialize(state),
    }


def decode_job(document: dict[str, Any], serializer: Serializer) -> Job:
    what = f"job {document.get('_id')!r}"
    state = _deserialize(serializer, document.get("state"), what)
    job: Job = _build(
        Job,
        what,
        id=document["_id"],
        task_id=document["task_id"],
        schedule_id=document.get("schedule_id"),
        acquired_by=document.get("acquired_by"),
        acquired_until=document.get("acquired_until"),
        **state,
    )
    return job


def result_for_document(
    document: dict[str, Any], outcome: JobOutcome, finished_at: datetime,
    exception: BaseException | None = None,
) -> JobResult:
    """A result for a job document we may not be able to decode (corrupt or foreign)."""
    expiration = timedelta(seconds=float(document.get("result_expiration_time") or 0))
    return JobResult(
        job_id=document["_id"],
        outcome=outcome,
        finished_at=finished_at,
        expires_at=finished_at + expiration,
        exception=exception,
    )


def encode_result(result: JobResult, serializer: Serializer) -> dict[str, Any]:
    state: dict[str, Any] = {
        "outcome": result.outcome.name,
        "started_at": result.started_at,
        "finished_at": result.finished_at,
        "expires_at": result.expires_at,
    }
    if result.outcome is JobOutcome.error:
        state["exception"] = result.exception
    elif result.outcome is JobOutcome.success:
        state["return_value"] = result.return_value
    try:
        data = serializer.serialize(state)
    except SerializationError:
        # The job has finished either way: keep its outcome and times, drop what can't be stored
        state.pop("exception", None)
        state.pop("return_value", None)
        data = serializer.serialize(state)
    return {
        "_id": result.job_id,
        "outcome": result.outcome.name,
        "finished_at": bson_date(result.finished_at),
        "expires_at": bson_date(result.expires_at, round_up=True),
        "state": data,
    }


def decode_result(document: dict[str, Any], serializer: Serializer) -> JobResult:
    what = f"job result {document.get('_id')!r}"
    state = _deserialize(serializer, document.get("state"), what)
    result: JobResult = _build(JobResult, what, job_id=document["_id"], **state)
    return result
