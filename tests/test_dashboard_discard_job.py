"""``MongoDBDataStore.discard_job``: drops a job only while no scheduler has claimed it,
releasing it as cancelled, exactly once under racing callers."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import pytest
from apscheduler import Job, JobOutcome, JobReleased, Task

from tests.conftest import Backend

pytestmark = pytest.mark.anyio
LEASE = timedelta(seconds=30)


async def _queue(store: Any, **kwargs: Any) -> Job:
    await store.add_task(Task(id="work", func="tests.helpers:noop", job_executor="async"))
    job = Job(task_id="work", executor="async", schedule_id="nightly", **kwargs)
    await store.add_job(job)
    return job


async def test_discards_a_queued_job_as_cancelled(started: Callable[..., Any]) -> None:
    store, broker = await started()
    job = await _queue(store, result_expiration_time=timedelta(minutes=5))
    assert await store.discard_job(job.id) is True
    assert await store.get_jobs() == []
    [released] = broker.of_type(JobReleased)
    assert (released.job_id, released.outcome, released.task_id, released.schedule_id,
            released.scheduler_id) == (job.id, JobOutcome.cancelled, "work", "nightly", "operator")
    result = await store.get_job_result(job.id)  # kept: whoever waits on it learns why
    assert result is not None and result.outcome is JobOutcome.cancelled


async def test_no_result_kept_when_the_job_keeps_none(started: Callable[..., Any]) -> None:
    store, broker = await started()
    job = await _queue(store)
    assert await store.discard_job(job.id) is True
    assert await store.get_job_result(job.id) is None
    assert len(broker.of_type(JobReleased)) == 1


async def test_a_claimed_job_is_left_alone(started: Callable[..., Any]) -> None:
    store, broker = await started()
    job = await _queue(store)
    [claimed] = await store.acquire_jobs("node-1", LEASE, 1)
    assert claimed.id == job.id
    assert await store.discard_job(job.id) is False
    assert [j.id for j in await store.get_jobs()] == [job.id]
    assert broker.of_type(JobReleased) == []


async def test_unknown_job(started: Callable[..., Any]) -> None:
    store, broker = await started()
    from uuid import uuid4

    assert await store.discard_job(uuid4()) is False
    assert broker.of_type(JobReleased) == []


async def test_undecodable_job_is_still_discarded(started: Callable[..., Any],
                                                  backend: Backend) -> None:
    store, broker = await started()
    job = await _queue(store)
    await backend.db().get_collection("apsched_jobs").update_one(
        {"_id": job.id}, {"$set": {"state": b"garbage"}})
    assert await store.discard_job(job.id) is True
    [released] = broker.of_type(JobReleased)
    assert released.outcome is JobOutcome.cancelled and released.task_id == "work"


async def test_racing_discards_and_claims_one_winner(started: Callable[..., Any]) -> None:
    """Three operators drop the job while two nodes try to claim it: exactly one of them
    gets it, and the job is released at most once."""
    stores = [await started() for _ in range(5)]
    job = await _queue(stores[0][0])
    discarded: list[bool] = []
    claimed: list[Job] = []

    async def discard(store: Any) -> None:
        discarded.append(await store.discard_job(job.id))

    async def claim(store: Any, name: str) -> None:
        claimed.extend(await store.acquire_jobs(name, LEASE, 1))

    async with anyio.create_task_group() as tasks:
        for store, _ in stores[:3]:
            tasks.start_soon(discard, store)
        for number, (store, _) in enumerate(stores[3:]):
            tasks.start_soon(claim, store, f"node-{number}")

    assert discarded.count(True) + len(claimed) == 1, (discarded, claimed)
    releases = [e for _, broker in stores for e in broker.of_type(JobReleased)]
    assert len(releases) == discarded.count(True)
