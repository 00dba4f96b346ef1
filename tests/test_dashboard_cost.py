"""What a page view costs: measured with a command-counting client, on a small and a larger
cluster state. The count must not grow with the collections, every command must be
bounded (a limit or a capped count) and served by an index of the store. The documented
exceptions both read the schedules collection: the schedule counts (at most COUNT_CAP
schedules) and a search by task id."""

from __future__ import annotations

from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from apscheduler import ConflictPolicy, Job, Schedule
from apscheduler.triggers.interval import IntervalTrigger

from apsched_mongo.dashboard.app import Dashboard, Settings, create_app
from apsched_mongo.dashboard.queries import COMMANDS_PER_VIEW, COUNT_CAP
from apsched_mongo.datastore import index_specs
from tests.conftest import Backend
from tests.dashboard_support import LEASE, CountingClient, build_known_cluster

pytestmark = pytest.mark.anyio

PAGES = [("overview", "/"), ("schedules", "/schedules?q=s"), ("jobs", "/jobs?state=running"),
         ("jobs", "/jobs?schedule=stuck"), ("outcomes", "/outcomes")]


def _first_keys(specs: dict[str, Any]) -> dict[str, set[str]]:
    return {"apsched_" + name: {spec.keys[0][0] for spec in indexes} | {"_id"}
            for name, indexes in specs.items()} | {"apsched_tasks": {"_id"}}


INDEXED = _first_keys(index_specs())


def _served_by_index(collection: str, query: dict[str, Any]) -> bool:
    """Can the planner answer ``query`` from an index? Each ``$or`` branch must start at an
    index; a conjunction needs one such condition."""
    if not query:
        return False
    for field, condition in query.items():
        if field == "$and" and any(_served_by_index(collection, part) for part in condition):
            return True
        if field == "$or" and all(_served_by_index(collection, part) for part in condition):
            return True
        if field in INDEXED.get(collection, set()):
            return True
    return False


def check_bounded_and_indexed(collection: str, name: str, detail: Any) -> str | None:
    """Why this command is unbounded or unindexed, or None."""
    if collection == "admin":
        return None if name == "hello" else f"unexpected command {name}"
    if name == "find":
        if not detail.get("limit"):
            return f"find on {collection} without a limit"
        query = detail["filter"] or {}
        if not query and detail.get("sort") == [("_id", 1)]:
            return None  # walks the _id index in order
        if _served_by_index(collection, query):
            return None
        # the second documented exception: searching schedules by task id (the store has
        # no use for an index on schedules.task_id, so there is none)
        return None if collection == "apsched_schedules" and "task_id" in str(query) else (
            f"unindexed find {query}")
    if name == "aggregate":
        first = detail[0]
        if "$limit" in first:
            assert first["$limit"] <= COUNT_CAP
            # the documented exception: schedule counts by state (paused is not indexed)
            return None if collection == "apsched_schedules" else "unindexed aggregate"
        match = first.get("$match")
        if match is None or not _served_by_index(collection, match):
            return f"aggregate on {collection} starting with {first}"
        if not any("$limit" in stage and stage["$limit"] <= COUNT_CAP for stage in detail):
            return f"aggregate on {collection} without a limit"
        return None
    if name == "count_documents":
        return None if _served_by_index(collection, detail) else f"unindexed count {detail}"
    return f"unexpected command {name} on {collection}"


async def grow(backend: Backend, store: Any, schedules: int, jobs: int) -> None:
    soon = datetime.now(UTC) + timedelta(hours=1)
    for number in range(schedules):
        await store.add_schedule(Schedule(
            id=f"s{number:05d}", task_id="free", trigger=IntervalTrigger(minutes=1),
            job_executor="async", next_fire_time=soon), ConflictPolicy.exception)
    for number in range(jobs):
        await store.add_job(Job(task_id="free", executor="async", args=(number,)))
    await store.acquire_jobs("node-9", LEASE, jobs // 2)


async def views(http: httpx.AsyncClient, client: CountingClient) -> dict[str, int]:
    """Commands per view of each page (all views of one page must cost the same)."""
    figures: dict[str, int] = {}
    for page, path in PAGES:
        client.log.clear()
        response = await http.get(path)
        assert response.status_code == 200, (path, response.text[:500])
        problems = [problem for command in client.log.commands
                    if (problem := check_bounded_and_indexed(*command))]
        assert not problems, (page, problems)
        assert figures.setdefault(page, len(client.log)) == len(client.log), path
    return figures


async def test_commands_per_page_view_do_not_grow(backend: Backend) -> None:
    async with AsyncExitStack() as stack:
        known = await build_known_cluster(backend, stack)
        client = CountingClient(backend.client())
        dashboard = Dashboard(client, Settings(database=backend.database))  # no broker link
        http = await stack.enter_async_context(httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(dashboard)),
            base_url="http://127.0.0.1:8800"))

        small = await views(http, client)
        await grow(backend, known.stores["node-1"], schedules=120, jobs=600)
        large = await views(http, client)

    assert small == large == COMMANDS_PER_VIEW, (small, large)
