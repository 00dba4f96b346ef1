"""The doctor: its findings on stored data (in memory, or a real server) and its reading of
the topology (on a scripted server answering ``hello`` like each kind of deployment)."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from apscheduler import Job, Task
from mockupdb import MockupDB
from pymongo import ASCENDING, AsyncMongoClient

from apsched_mongo import doctor
from apsched_mongo.doctor import diagnose

pytestmark = pytest.mark.anyio
LEASE = timedelta(seconds=30)


def cli_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    doctor.add_arguments(parser)
    return parser.parse_args(argv)


async def test_fresh_database_is_not_initialized_yet(backend: Any) -> None:
    report = await diagnose(backend.client(), backend.database)
    assert report.healthy and report.exit_code == 0
    assert not report.initialized
    assert "not initialized yet" in report.render()


async def test_started_store_is_healthy(started: Any, backend: Any) -> None:
    store, _ = await started()
    await store.add_task(Task(id="task", func="tests.helpers:noop", job_executor="async"))
    first, second = (Job(task_id="task", executor="async") for _ in range(2))
    await store.add_job(first)
    await store.add_job(second)

    report = await diagnose(backend.client(), backend.database)

    assert report.problems == []
    assert report.healthy and report.initialized
    assert report.counts == {"tasks": 1, "schedules": 0, "jobs": 2, "job_results": 0}
    assert report.leases == []
    assert report.oldest_pending_job is not None
    assert report.oldest_pending_job["id"] == first.id
    # every index the store created is checked, and found as created
    created = {
        (collection, name)
        for collection in ("apsched_schedules", "apsched_jobs", "apsched_job_results")
        for name in await backend.db()[collection].index_information()
        if name != "_id_"
    }
    assert {(i.collection, i.name) for i in report.indexes} == created
    assert {i.state for i in report.indexes} == {"present"}
    assert "healthy" in report.render()


async def test_conflicting_and_missing_indexes_are_named(started: Any, backend: Any) -> None:
    await started()
    db = backend.db()
    await db["apsched_job_results"].drop_index("apsched_expiry")
    await db["apsched_job_results"].create_index(
        [("expires_at", ASCENDING)], name="apsched_expiry", expireAfterSeconds=3600
    )
    await db["apsched_jobs"].drop_index("apsched_schedule")

    report = await diagnose(backend.client(), backend.database)

    assert not report.healthy and report.exit_code == 1
    states = {i.name: i.state for i in report.indexes if i.collection == "apsched_job_results"}
    assert states == {"apsched_expiry": "conflict"}
    assert [i.state for i in report.indexes
            if (i.collection, i.name) == ("apsched_jobs", "apsched_schedule")] == ["missing"]
    rendered = report.render()
    assert "apsched_job_results.apsched_expiry conflicts" in rendered
    assert "3600" in rendered
    assert "apsched_jobs.apsched_schedule is missing" in rendered


async def test_expired_lease_is_reported(started: Any, backend: Any) -> None:
    store, _ = await started()
    await store.add_task(Task(id="task", func="tests.helpers:noop", job_executor="async"))
    job = Job(task_id="task", executor="async")
    await store.add_job(job)
    assert [j.id for j in await store.acquire_jobs("node-a", LEASE)] == [job.id]

    live = await diagnose(backend.client(), backend.database)
    assert [(lease.id, lease.holder, lease.expired) for lease in live.leases] == [
        (job.id, "node-a", False)
    ]
    assert live.oldest_pending_job is None  # held jobs are not pending
    assert "expired lease" not in live.render()

    # node-a died five minutes ago and nobody has cleaned up since
    stale = datetime.now(UTC) - timedelta(minutes=5)
    await backend.db()["apsched_jobs"].update_one({"_id": job.id},
                                                  {"$set": {"acquired_until": stale}})
    report = await diagnose(backend.client(), backend.database)
    assert [(lease.id, lease.holder) for lease in report.expired_leases] == [(job.id, "node-a")]
    rendered = report.render()
    assert f"expired lease: jobs {job.id} held by 'node-a'" in rendered
    assert "leases expired      1" in rendered


def test_cli_on_the_in_memory_server(capsys: pytest.CaptureFixture[str]) -> None:
    assert doctor.run(cli_args()) == 0
    out = capsys.readouterr().out
    assert "topology           standalone" in out
    assert "not initialized yet" in out


def test_cli_unreachable_server_never_prints_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri = "mongodb://admin:hunter2@127.0.0.1:1/?serverSelectionTimeoutMS=200"
    assert doctor.run(cli_args("--uri", uri)) == doctor.EXIT_FAILED
    out = capsys.readouterr().out
    assert "cannot reach MongoDB at 127.0.0.1:1" in out
    assert "hunter2" not in out


# --- scripted servers ------------------------------------------------------------------------

SERVER_TIME = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


@pytest.fixture
async def scripted() -> AsyncIterator[Any]:
    """Start a MockupDB answering ``hello`` with the given extra fields; yields a starter."""
    servers: list[MockupDB] = []
    clients: list[Any] = []

    async def start(**hello_fields: Any) -> Any:
        server = MockupDB(auto_ismaster=None)
        hello = {"ismaster": True, "isWritablePrimary": True, "helloOk": True,
                 "minWireVersion": 0, "maxWireVersion": 21, "localTime": SERVER_TIME,
                 **hello_fields}
        for name in ("ismaster", "isMaster", "hello"):
            server.autoresponds(name, hello)
        server.autoresponds("buildInfo", version="7.0.12")
        server.autoresponds("listCollections", cursor={
            "id": 0, "ns": "apscheduler.$cmd.listCollections", "firstBatch": []
        })
        await anyio.to_thread.run_sync(server.run)
        servers.append(server)
        client: Any = AsyncMongoClient(server.uri + "/?directConnection=true",
                                       serverSelectionTimeoutMS=2000)
        clients.append(client)
        return client

    yield start
    for client in clients:
        await client.close()
    for server in servers:
        await anyio.to_thread.run_sync(server.stop)


@pytest.mark.parametrize(("hello_fields", "topology", "broker_mode"), [
    ({"setName": "rs0", "hosts": ["localhost:1"]}, "replica set", "change streams"),
    ({}, "standalone", "polling"),
    ({"msg": "isdbgrid"}, "sharded", "change streams"),
], ids=["replica-set", "standalone", "mongos"])
async def test_topology_and_broker_mode(
    scripted: Any, hello_fields: dict[str, Any], topology: str, broker_mode: str
) -> None:
    client = await scripted(**hello_fields)
    report = await diagnose(client, "apscheduler")
    assert (report.topology, report.broker_mode) == (topology, broker_mode)
    assert report.server_version == "7.0.12"
    assert report.server_time == SERVER_TIME
    assert not report.initialized and report.healthy
    rendered = report.render()
    assert f"topology           {topology}" in rendered
    assert f"event broker mode  {broker_mode}" in rendered
    assert ("standalone server: no change streams" in rendered) == (topology == "standalone")


def test_deployment_docs_list_every_index() -> None:
    """The index table in the deployment guide is written by hand: keep it complete."""
    from pathlib import Path

    from apsched_mongo.datastore import index_specs

    text = (Path(__file__).parent.parent / "docs" / "deployment.rst").read_text()
    for specs in index_specs().values():
        for spec in specs:
            assert f"``{spec.name}``" in text, spec.name


async def test_a_freshly_started_store_is_healthy(started: Any, backend: Any) -> None:
    """start() creates no tasks collection (it has no indexes); that is not a problem."""
    await started()
    report = await diagnose(backend.client(), backend.database)
    assert report.problems == []
