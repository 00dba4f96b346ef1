"""Every query the store sends is served by an index: checked with ``explain()`` against a
real server (the real-server tier: ``APSCHED_MONGO_TEST_URI`` or ``--mongod``). The
in-memory back end has no query planner, so these tests exist only in that tier; the
queries are built exactly as the store builds them, and docs/internals.rst's index table
marks them with ✓."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler import Job, Task

from tests.conftest import Backend, RecordingBroker

pytestmark = [pytest.mark.anyio, pytest.mark.real_server]


@pytest.fixture
async def real_store() -> AsyncIterator[tuple[Backend, Any]]:
    """A started store with some data, on the real server only."""
    import logging

    backend = Backend("real")
    log = logging.getLogger(__name__)
    try:
        async with AsyncExitStack() as stack:
            broker = RecordingBroker()
            await broker.start(stack, log)
            store = backend.store()
            await store.start(stack, broker, log)
            hello = await backend.client().admin.command("buildInfo")
            if hello.get("apschedMongoMemoryFront"):
                pytest.skip("the in-memory wire front has no query planner")
            for task_id, limit in (("limited", 1), ("free", None)):
                await store.add_task(Task(id=task_id, func="tests.helpers:noop",
                                          job_executor="async", max_running_jobs=limit))
            for n in range(40):
                await store.add_job(Job(task_id="limited" if n % 2 else "free",
                                        executor="async"))
            await store.acquire_jobs("explainer", timedelta(seconds=30), 3)
            yield backend, store
    finally:
        await backend.close()


def stages(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for key in ("inputStage", "queryPlan"):
        if isinstance(plan.get(key), dict):
            yield from stages(plan[key])
    for child in plan.get("inputStages", []):
        yield from stages(child)


def winning_plan(explained: dict[str, Any]) -> dict[str, Any]:
    planner = explained.get("queryPlanner") or explained["stages"][0]["$cursor"]["queryPlanner"]
    plan: dict[str, Any] = planner["winningPlan"]
    return plan


def assert_indexed(explained: dict[str, Any], index: str | None, *, sorted_by_index: bool
                   ) -> None:
    plan = list(stages(winning_plan(explained)))
    names = {stage.get("stage") for stage in plan}
    assert "COLLSCAN" not in names, plan
    used = {stage.get("indexName") for stage in plan if stage.get("stage") == "IXSCAN"}
    assert used, plan
    if index:
        assert index in used, (index, used)
    if sorted_by_index:
        assert "SORT" not in names, plan


async def explain_find(collection: Any, query: dict[str, Any], sort: list[Any] | None = None,
                       limit: int = 0) -> dict[str, Any]:
    command: dict[str, Any] = {"find": collection.name, "filter": query}
    if sort:
        command["sort"] = dict(sort)
    if limit:
        command["limit"] = limit
    result: dict[str, Any] = await collection.database.command(
        {"explain": command, "verbosity": "queryPlanner"})
    return result


async def test_queue_head_and_listing_use_their_indexes(real_store: Any) -> None:
    _, store = real_store
    jobs = store._jobs
    order = [("queue_order", 1), ("_id", 1)]
    assert_indexed(await explain_find(jobs, {"acquired_by": None}, order, 100),
                   "apsched_queue", sorted_by_index=True)
    assert_indexed(await explain_find(jobs, {}, order), "apsched_order", sorted_by_index=True)
    # Past saturated tasks: either index bound, never a collection scan
    assert_indexed(await explain_find(
        jobs, {"acquired_by": None, "task_id": {"$nin": ["limited"]}}, order, 100),
        None, sorted_by_index=False)
    # Running jobs of a task (get_task's and the queue head's $lookup)
    assert_indexed(await explain_find(
        jobs, {"task_id": "free", "acquired_by": {"$ne": None}}), None,
        sorted_by_index=False)


async def test_cleanup_and_schedule_queries_use_their_indexes(real_store: Any) -> None:
    _, store = real_store
    now = datetime.now(UTC)
    assert_indexed(await explain_find(
        store._jobs, {"acquired_by": {"$ne": None}, "acquired_until": {"$lt": now}}),
        "apsched_lease_expiry", sorted_by_index=False)
    active = {"next_fire_time": {"$ne": None}, "paused": {"$ne": True},
              "removal": {"$exists": False}}
    assert_indexed(await explain_find(
        store._schedules, {**active, "next_fire_time": {"$ne": None, "$lte": now}},
        [("next_fire_time", 1)], 10), "apsched_due", sorted_by_index=True)
    assert_indexed(await explain_find(
        store._schedules, {**active, "acquired_until": {"$gte": now}},
        [("acquired_until", 1)], 1), "apsched_lease_expiry", sorted_by_index=True)
