"""The dashboard's reads against a known cluster state: three nodes, a limited task, paused
and finished schedules, an expired lease (see tests/dashboard_support.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta

import pytest
from apscheduler.serializers.pickle import PickleSerializer

from apsched_mongo.dashboard import queries
from apsched_mongo.dashboard.queries import BadRequest, ClusterReader
from apsched_mongo.dashboard.words import trigger_in_words
from tests.conftest import Backend
from tests.dashboard_support import KnownCluster, build_known_cluster

pytestmark = pytest.mark.anyio


@pytest.fixture
async def cluster(backend: Backend) -> AsyncIterator[tuple[KnownCluster, ClusterReader]]:
    async with AsyncExitStack() as stack:
        known = await build_known_cluster(backend, stack)
        yield known, ClusterReader(backend.client(), backend.database, PickleSerializer())


async def test_overview_counts(cluster: tuple[KnownCluster, ClusterReader]) -> None:
    _, reader = cluster
    overview = await reader.overview()
    assert (overview.schedules_active, overview.schedules_paused, overview.schedules_finished,
            overview.schedules_removing) == (2, 1, 1, 0)  # active: "active" and "stuck"
    assert overview.queued_jobs == 3  # L3, F4, F5
    assert overview.running_jobs == 5  # L1 L2 on node-1, F1 F2 on node-2, F3 on node-3
    assert (overview.expired_job_leases, overview.expired_schedule_leases) == (1, 1)
    assert overview.expired_leases == 2


async def test_overview_nodes_and_tasks(cluster: tuple[KnownCluster, ClusterReader]) -> None:
    known, reader = cluster
    overview = await reader.overview()
    nodes = {node.node: node for node in overview.nodes}
    assert sorted(nodes) == ["node-1", "node-2", "node-3"]
    assert (nodes["node-1"].jobs, nodes["node-1"].tasks, nodes["node-1"].expired_jobs) == (
        2, ("limited",), 0)
    assert (nodes["node-2"].jobs, nodes["node-2"].tasks) == (2, ("free",))
    crashed = nodes["node-3"]
    assert (crashed.jobs, crashed.expired_jobs, crashed.schedules,
            crashed.expired_schedules) == (1, 1, 1, 1)
    assert crashed.lease_until is not None and crashed.lease_until < overview.server_now
    assert nodes["node-1"].lease_until is not None
    assert nodes["node-1"].lease_until > overview.server_now

    tasks = {task.id: task for task in overview.tasks}
    assert (tasks["limited"].max_running_jobs, tasks["limited"].running,
            tasks["limited"].queued) == (2, 2, 1)
    assert (tasks["free"].max_running_jobs, tasks["free"].running, tasks["free"].queued) == (
        None, 3, 2)

    assert overview.oldest_queued_task == "limited"  # L3 was queued before F4 and F5
    created = known.jobs["L3"].created_at
    assert overview.oldest_queued is not None
    assert abs(overview.oldest_queued - created) < timedelta(milliseconds=1)
    assert overview.oldest_queued_age is not None
    assert overview.oldest_queued_age >= timedelta(0)


async def test_schedules_page(cluster: tuple[KnownCluster, ClusterReader]) -> None:
    _, reader = cluster
    page = await reader.schedules()
    rows = {row.id: row for row in page.rows}
    assert [row.id for row in page.rows] == ["active", "finished", "paused", "stuck"]
    assert page.next_cursor is None and page.previous_cursor is None
    assert rows["paused"].paused and not rows["active"].paused
    assert rows["finished"].finished and rows["finished"].next_fire_time is None
    assert not rows["active"].finished
    assert trigger_in_words(rows["active"].trigger) == "every 5 min"
    stuck = rows["stuck"]
    assert (stuck.leased_by, stuck.lease_expired) == ("node-3", True)
    assert rows["active"].leased_by is None


async def test_schedule_search_by_id_or_task_prefix(
    cluster: tuple[KnownCluster, ClusterReader],
) -> None:
    _, reader = cluster
    assert [row.id for row in (await reader.schedules("pa")).rows] == ["paused"]
    # task "limited" owns "finished" and "stuck"
    assert [row.id for row in (await reader.schedules("lim")).rows] == ["finished", "stuck"]
    assert (await reader.schedules("nothing.*")).rows == []
    assert (await reader.schedules(".*")).rows == []  # a prefix, never a pattern


async def test_schedule_pages_forward_and_back(
    backend: Backend, monkeypatch: pytest.MonkeyPatch,
    cluster: tuple[KnownCluster, ClusterReader],
) -> None:
    _, reader = cluster
    monkeypatch.setattr(queries, "PAGE_SIZE", 3)
    first = await reader.schedules()
    assert [row.id for row in first.rows] == ["active", "finished", "paused"]
    assert first.next_cursor == "paused" and first.previous_cursor is None
    second = await reader.schedules(after=first.next_cursor)
    assert [row.id for row in second.rows] == ["stuck"]
    assert second.next_cursor is None and second.previous_cursor == "stuck"
    back = await reader.schedules(before=second.previous_cursor)
    assert [row.id for row in back.rows] == ["active", "finished", "paused"]
    assert back.previous_cursor is None and back.next_cursor == "paused"


async def test_jobs_pages(cluster: tuple[KnownCluster, ClusterReader],
                          monkeypatch: pytest.MonkeyPatch) -> None:
    known, reader = cluster
    queued = await reader.jobs("queued")
    assert [row.id for row in queued.rows] == [known.jobs[name].id for name in ("L3", "F4", "F5")]
    assert queued.counts == {"queued": 3, "running": 5}
    assert queued.rows[0].arguments == "'L3'" and queued.rows[0].node is None

    running = await reader.jobs("running")
    assert {row.id: row.node for row in running.rows} == {
        known.jobs[name].id: node for name, node in
        [("L1", "node-1"), ("L2", "node-1"), ("F1", "node-2"), ("F2", "node-2"),
         ("F3", "node-3")]
    }
    by_id = {row.id: row for row in running.rows}
    assert by_id[known.jobs["F3"].id].lease_expired
    remaining = by_id[known.jobs["L1"].id].lease_remaining
    assert remaining is not None and timedelta(0) < remaining <= timedelta(seconds=30)

    only_node_2 = await reader.jobs("running", node="node-2")
    assert {row.id for row in only_node_2.rows} == {known.jobs["F1"].id, known.jobs["F2"].id}

    monkeypatch.setattr(queries, "PAGE_SIZE", 2)
    first = await reader.jobs("queued")
    assert [row.id for row in first.rows] == [known.jobs["L3"].id, known.jobs["F4"].id]
    assert first.next_cursor is not None
    rest = await reader.jobs("queued", after=first.next_cursor)
    assert [row.id for row in rest.rows] == [known.jobs["F5"].id]
    assert rest.next_cursor is None


async def test_removals_and_releases_in_progress(
    backend: Backend, cluster: tuple[KnownCluster, ClusterReader],
) -> None:
    """A schedule with a ``removal`` field is being removed; a job taken over for release
    (``abandoned``) is no longer running; release markers in job_results are ignored."""
    known, reader = cluster
    db = backend.db()
    await db.get_collection("apsched_jobs").update_one(
        {"_id": known.jobs["F3"].id}, {"$set": {"abandoned": True, "acquired_by": "node-2"}})
    await db.get_collection("apsched_schedules").update_one(
        {"_id": "active"}, {"$set": {"removal": "token"}})
    await db.get_collection("apsched_job_results").insert_one(
        {"_id": "marker", "marker": True, "finished_at": datetime.now(UTC)})
    overview = await reader.overview()
    assert (overview.schedules_active, overview.schedules_removing) == (1, 1)
    assert (overview.running_jobs, overview.expired_job_leases) == (4, 0)
    assert known.jobs["F3"].id not in {row.id for row in (await reader.jobs("running")).rows}
    rows = {row.id: row for row in (await reader.schedules()).rows}
    assert rows["active"].removing


async def test_undecodable_documents_are_shown_not_fatal(
    backend: Backend, cluster: tuple[KnownCluster, ClusterReader],
) -> None:
    known, reader = cluster
    db = backend.db()
    await db.get_collection("apsched_schedules").update_one(
        {"_id": "paused"}, {"$set": {"state": b"not a pickle"}})
    await db.get_collection("apsched_jobs").update_one(
        {"_id": known.jobs["F4"].id}, {"$set": {"state": b"not a pickle"}})
    rows = {row.id: row for row in (await reader.schedules()).rows}
    assert rows["paused"].problem and "paused" in rows["paused"].problem
    assert rows["active"].problem is None
    jobs = {row.id: row for row in (await reader.jobs("queued")).rows}
    assert jobs[known.jobs["F4"].id].problem
    assert jobs[known.jobs["F4"].id].task_id == "free"


@pytest.mark.parametrize(("call", "message"), [
    (lambda r: r.schedules("x" * 201), "search text longer than 200"),
    (lambda r: r.schedules(after="x" * 2000), "after: not a schedule id"),
    (lambda r: r.jobs("finished"), "state must be 'queued' or 'running'"),
    (lambda r: r.jobs("queued", after="12_not-a-uuid"), "after: not a job cursor"),
    (lambda r: r.jobs("queued", after="nonsense"), "after: not a job cursor"),
])
async def test_bad_page_parameters(call: object, message: str, backend: Backend) -> None:
    reader = ClusterReader(backend.client(), backend.database, PickleSerializer())
    with pytest.raises(BadRequest, match=message):
        await call(reader)  # type: ignore[operator]
