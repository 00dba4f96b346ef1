"""The doctor: its findings on stored data (in memory, or a real server) and its reading of
the topology (on a scripted server answering ``hello`` like each kind of deployment)."""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from apscheduler import Job, Task, TaskAdded
from mockupdb import MockupDB
from pymongo import ASCENDING, AsyncMongoClient

from apsched_mongo import MongoDBEventBroker, doctor
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
    rendered = report.render()
    assert "not initialized yet (the database does not exist on this server)" in rendered
    assert f"database {backend.database!r} does not exist on this server (yet)" in rendered


async def test_started_store_is_healthy(started: Any, backend: Any) -> None:
    store, _ = await started()
    await store.add_task(Task(id="task", func="tests.helpers:noop", job_executor="async"))
    first, second = (Job(task_id="task", executor="async") for _ in range(2))
    await store.add_job(first)
    await store.add_job(second)

    report = await diagnose(backend.client(), backend.database)

    assert report.problems == []
    assert report.healthy and report.initialized
    assert report.counts == {"tasks": 1, "schedules": 0, "jobs": 2, "job_results": 0,
                             "meta": 1}
    assert [(s.collection, s.held, s.expired) for s in report.leases] == [
        ("schedules", 0, 0), ("jobs", 0, 0)]
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
    rendered = report.render()
    assert rendered.endswith("healthy")
    assert "None" not in rendered


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
    assert "found:  'apsched_expiry' on (expires_at), TTL 3600 s" in rendered
    assert "needed: 'apsched_expiry' on (expires_at), TTL 0 s" in rendered
    assert "apsched_jobs.apsched_schedule is missing" in rendered
    assert "None" not in rendered


async def test_expired_leases_are_summarised(started: Any, backend: Any) -> None:
    store, _ = await started()
    await store.add_task(Task(id="task", func="tests.helpers:noop", job_executor="async"))
    jobs = [Job(task_id="task", executor="async") for _ in range(3)]
    for job in jobs:
        await store.add_job(job)
    assert len(await store.acquire_jobs("node-a", LEASE, 3)) == 3

    live = await diagnose(backend.client(), backend.database)
    assert [(s.collection, s.held, s.expired) for s in live.leases] == [
        ("schedules", 0, 0), ("jobs", 3, 0)]
    assert live.oldest_pending_job is None  # held jobs are not pending
    assert "leases expired      0" in live.render()

    # node-a died minutes ago and nobody has cleaned up since: two leases ran out
    now = datetime.now(UTC)
    for job, ago in ((jobs[0], 2), (jobs[1], 5)):
        await backend.db()["apsched_jobs"].update_one(
            {"_id": job.id}, {"$set": {"acquired_until": now - timedelta(minutes=ago)}})
    report = await diagnose(backend.client(), backend.database)
    [summary] = [s for s in report.leases if s.collection == "jobs"]
    assert (summary.held, summary.expired) == (3, 2)
    assert summary.oldest_expired is not None and summary.oldest_expired["id"] == jobs[1].id
    rendered = report.render()
    assert f"leases expired      2 (oldest: jobs {jobs[1].id} held by 'node-a'" in rendered
    assert str(jobs[0].id) not in rendered  # a summary, not a list
    assert "2 lease(s) expired without being released" in rendered


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
    assert out.splitlines() == ["PROBLEM: cannot reach MongoDB at 127.0.0.1:1 within 0.2 s: "
                                "connection refused (nothing listens there: is mongod running, "
                                "is the port right?)"]
    assert "hunter2" not in out


def test_cli_gives_up_after_its_own_short_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    """No timeout in the URI: doctor does not wait the driver's 30 s."""
    assert doctor._selection_timeout(cli_args("--uri", "mongodb://db.example")) == 5.0
    assert doctor._selection_timeout(
        cli_args("--uri", "mongodb://db.example/?serverSelectionTimeoutMS=900")) is None
    started = time.monotonic()
    assert doctor.run(cli_args("--uri", "mongodb://127.0.0.1:1", "--timeout", "0.3")) == 2
    assert time.monotonic() - started < 3
    assert "within 0.3 s" in capsys.readouterr().out


async def test_a_mistyped_database_is_named(started: Any, backend: Any) -> None:
    await started()
    report = await diagnose(backend.client(), "apschedueler")
    assert report.exit_code == 1
    assert report.problems == [
        f"database 'apschedueler' does not exist on this server, but {backend.database!r} "
        f"holds apsched-mongo data: did you mean --database {backend.database}?"]


async def test_a_mistyped_prefix_is_named(started: Any, backend: Any) -> None:
    await started(collection_prefix="myapp_")
    report = await diagnose(backend.client(), backend.database)
    assert report.exit_code == 1
    assert "did you mean --prefix myapp_?" in report.problems[0]


async def test_a_database_of_the_builtin_store_only_is_named(backend: Any) -> None:
    db = backend.db()
    for name in ("tasks", "schedules", "jobs"):
        await db[name].insert_one({"_id": "x"})
    report = await diagnose(backend.client(), backend.database)
    assert report.exit_code == 1 and report.data == "built-in store only"
    [problem] = report.problems
    assert "only the collections of APScheduler's built-in MongoDB store" in problem
    assert (f"apsched-mongo migrate --from-builtin --source-database {backend.database} "
            f"--database {backend.database}") in problem
    assert "built-in MongoDB store's collections only" in report.render()


async def test_events_collection_and_its_ttl_index(started: Any, backend: Any) -> None:
    await started()
    async with AsyncExitStack() as stack:
        broker = MongoDBEventBroker(backend.client(), database=backend.database,
                                    retention=timedelta(minutes=3))
        await broker.start(stack, logging.getLogger(__name__))
        await broker.publish(TaskAdded(task_id="t"))
    report = await diagnose(backend.client(), backend.database)
    assert report.problems == []
    assert (report.events, report.events_retention) == (1, 180.0)
    assert "events              apsched_events: 1 (kept 180 s)" in report.render()

    await backend.db()["apsched_events"].drop_index("apsched_ttl")
    report = await diagnose(backend.client(), backend.database)
    assert report.problems == [
        "the events collection 'apsched_events' has no TTL index on created_at, so events are "
        "never removed; starting a MongoDBEventBroker creates it"]


async def test_indexes_no_longer_needed_are_reported_never_dropped(
    started: Any, backend: Any
) -> None:
    await started()
    jobs = backend.db()["apsched_jobs"]
    await jobs.create_index([("task_id", ASCENDING), ("acquired_by", ASCENDING)],
                            name="apsched_task_running")
    await jobs.create_index([("mine", ASCENDING)], name="my_own_index")
    report = await diagnose(backend.client(), backend.database)
    assert report.healthy
    assert [(i.collection, i.name) for i in report.indexes if i.state == "unneeded"] == [
        ("apsched_jobs", "apsched_task_running")]
    assert ('index apsched_jobs.apsched_task_running is no longer needed by this version and can '
            'be dropped: db.apsched_jobs.dropIndex("apsched_task_running")') in report.render()
    assert "apsched_task_running" in await jobs.index_information()


# --- scripted servers ------------------------------------------------------------------------

SERVER_TIME = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


@pytest.fixture
async def scripted() -> AsyncIterator[Any]:
    """Start a MockupDB that answers ``hello`` with the given extra fields and the commands
    in ``replies`` (``find`` on ``config.collections`` from ``shard_keys``); any other
    command fails as an unknown command would. Yields a starter returning a client."""
    servers: list[MockupDB] = []
    clients: list[Any] = []

    async def start(*, version: str = "7.0.12", replies: dict[str, Any] | None = None,
                    shard_keys: dict[str, Any] | None = None, uri_options: str = "",
                    **hello_fields: Any) -> Any:
        server = MockupDB(auto_ismaster=None)
        hello = {"ismaster": True, "isWritablePrimary": True, "helloOk": True,
                 "minWireVersion": 0, "maxWireVersion": 21, "localTime": SERVER_TIME,
                 **hello_fields}
        answers: dict[str, Any] = {
            "buildInfo": {"version": version},
            "listCollections": {"cursor": {"id": 0, "ns": "x.$cmd.listCollections",
                                           "firstBatch": []}},
            "listDatabases": {"databases": [{"name": "apscheduler"}]},
            "endSessions": {},
            **(replies or {}),
        }
        config_entries = [{"_id": namespace, "key": key, "unique": False}
                          for namespace, key in (shard_keys or {}).items()]

        def answer(request: Any) -> bool:
            name = request.command_name
            if name in ("ismaster", "isMaster", "hello"):
                return bool(request.replies(hello))
            if name == "find" and request.doc.get("$db") == "config":
                wanted = set(request.doc["filter"]["_id"]["$in"])
                batch = [entry for entry in config_entries if entry["_id"] in wanted]
                return bool(request.replies(cursor={"id": 0, "ns": "config.collections",
                                                    "firstBatch": batch}))
            if name in answers:
                return bool(request.replies(answers[name]))
            return bool(request.command_err(59, f"no such command: '{name}'"))

        server.autoresponds(answer)
        await anyio.to_thread.run_sync(server.run)
        servers.append(server)
        client: Any = AsyncMongoClient(
            server.uri + "/?directConnection=true&serverSelectionTimeoutMS=2000" + uri_options)
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
    assert ("periodicNoopIntervalSecs" in rendered) == (topology == "sharded")


async def test_a_server_older_than_5_0_is_a_problem(scripted: Any) -> None:
    client = await scripted(version="4.4.29", setName="rs0", hosts=["localhost:1"])
    report = await diagnose(client, "apscheduler")
    assert report.problems == [
        "MongoDB 4.4.29 is older than 5.0, the oldest version apsched-mongo runs on"]


async def test_write_concern_and_arbiters(scripted: Any) -> None:
    """A PSA set: the URI asks for w=1, the server's implicit default is w:1 too; we say
    what we use instead, and warn about the arbiter."""
    client = await scripted(
        setName="rs0", hosts=["db1:27017", "db2:27017"], arbiters=["arb:27017"],
        uri_options="&w=1",
        replies={"getDefaultRWConcern": {"defaultWriteConcern": {"w": 1, "wtimeout": 0},
                                         "defaultWriteConcernSource": "implicit"}},
    )
    report = await diagnose(client, "apscheduler")
    rendered = report.render()
    assert "topology           replica set with arbiter(s) arb:27017" in rendered
    assert ('write concern      w: "majority" with a bounded wtimeout on every write of the '
            "store and the broker, whatever the URI says") in rendered
    assert "  URI/client asks  {w: 1}" in rendered
    assert "  server default   {w: 1, wtimeout: 0} (implicit)" in rendered
    assert any(warning.startswith("this replica set has an arbiter (arb:27017): while a "
                                  "data-bearing member is down, majority writes")
               for warning in report.warnings)
    assert report.healthy  # a warning, not a failure


async def test_write_concern_default_not_permitted(scripted: Any) -> None:
    client = await scripted(setName="rs0", hosts=["localhost:1"])
    report = await diagnose(client, "apscheduler")
    assert report.server_write_concern.startswith("unknown (getDefaultRWConcern refused")
    assert not any("arbiter" in warning for warning in report.warnings)


async def test_sharding_is_checked_against_the_rules(scripted: Any) -> None:
    client = await scripted(msg="isdbgrid", version="6.0.14", shard_keys={
        "apscheduler.apsched_schedules": {"_id": "hashed"},
        "apscheduler.apsched_jobs": {"_id": "hashed"},
        "apscheduler.apsched_tasks": {"name": 1},
        "apscheduler.apsched_events": {"_id": "hashed"},
    })
    report = await diagnose(client, "apscheduler")
    keys = {status.collection: status.key for status in report.sharding}
    assert keys == {"apsched_tasks": {"name": 1}, "apsched_schedules": {"_id": "hashed"},
                    "apsched_jobs": {"_id": "hashed"}, "apsched_job_results": None,
                    "apsched_meta": None, "apsched_events": {"_id": "hashed"}}
    assert report.problems == [
        "apsched_tasks is sharded on {name: 1}, but its upserts filter on _id alone, and an "
        "upsert's filter must hold the whole shard key: shard it on _id",
        "apsched_jobs is sharded on {_id: 'hashed'}, but the unique index (task_id, slot) "
        "cannot exist with a hashed shard key",
    ]
    rendered = report.render()
    assert "  apsched_schedules: sharded on {_id: 'hashed'}: ok" in rendered
    assert "  apsched_jobs: sharded on {_id: 'hashed'}: PROBLEM" in rendered
    assert "  apsched_job_results: unsharded: ok" in rendered


async def test_jobs_sharded_by_task_need_5_1(scripted: Any) -> None:
    """Claims and releases name the task, so jobs sharded on task_id take them on one
    shard from 5.1; on 5.0 the queue's $lookup of jobs fails."""
    shard_keys = {"apscheduler.apsched_jobs": {"task_id": 1}}
    old = await diagnose(await scripted(msg="isdbgrid", version="5.0.30",
                                        shard_keys=shard_keys), "apscheduler")
    assert [problem.split(", but ")[1] for problem in old.problems] == [
        "it is the 'from' of a $lookup, which cannot read a sharded collection before "
        "MongoDB 5.1",
    ]
    new = await diagnose(await scripted(msg="isdbgrid", version="5.1.0",
                                        shard_keys=shard_keys), "apscheduler")
    assert new.problems == []
    assert not any("apsched_jobs" in warning for warning in new.warnings)


def test_internals_docs_list_every_index() -> None:
    """The index table (query -> index) in the internals page is written by hand: keep it
    complete."""
    from pathlib import Path

    from apsched_mongo.datastore import index_specs

    text = (Path(__file__).parent.parent / "docs" / "internals.rst").read_text()
    for specs in index_specs().values():
        for spec in specs:
            assert f"``{spec.name}``" in text, spec.name
    for name in ("apsched_ttl", "apsched_node_seq"):  # the broker's
        assert f"``{name}``" in text, name


async def test_a_freshly_started_store_is_healthy(started: Any, backend: Any) -> None:
    """start() creates no tasks collection (it has no indexes); that is not a problem."""
    await started()
    report = await diagnose(backend.client(), backend.database)
    assert report.problems == []


def test_the_sharding_rules_and_their_docs_agree() -> None:
    """docs/deployment.rst explains the rules doctor applies: each collection and each
    version boundary of apsched_mongo/_sharding.py appears in its "Sharded clusters"."""
    from pathlib import Path

    from apsched_mongo import _sharding

    text = (Path(__file__).parent.parent / "docs" / "deployment.rst").read_text()
    section = text.split("Sharded clusters\n----------------")[1].split("\nMongoDB Atlas")[0]
    for name in _sharding.RULES:
        assert f"``{name}``" in section or f"``apsched_{name}``" in section, name
    for version in (_sharding.LOOKUP_FROM_SHARDED, _sharding.FIND_AND_MODIFY_WITHOUT_SHARD_KEY):
        assert ".".join(map(str, version)) in section
    assert "periodicNoopIntervalSecs" in section and "SERVER-30970" in section


@pytest.mark.parametrize(("collection", "key", "version", "problems"), [
    ("schedules", {"_id": "hashed"}, (5, 0), 0),
    ("schedules", {"next_fire_time": 1}, (8, 0), 1),  # upserts by _id
    ("tasks", {"_id": 1}, (5, 0), 1),  # the from of a $lookup
    ("tasks", {"_id": 1}, (5, 1), 0),
    ("jobs", {"task_id": 1}, (5, 0), 1),  # the queue's $lookup of jobs
    ("jobs", {"task_id": 1}, (5, 1), 0),  # claims and releases name the task
    ("jobs", {"task_id": 1, "slot": 1}, (7, 0), 1),  # they do not name the slot
    ("jobs", {"task_id": 1, "slot": 1}, (8, 0), 0),
    ("jobs", {"task_id": "hashed"}, (8, 0), 1),  # no unique index with a hashed key
    ("jobs", {"_id": 1}, (8, 0), 1),  # (task_id, slot) must start with the shard key
    ("job_results", {"expires_at": 1}, (7, 0), 1),
    ("job_results", {"expires_at": 1}, (7, 1), 0),
    ("events", {"created_at": 1}, (5, 0), 0),
])
def test_sharding_rules(
    collection: str, key: dict[str, Any], version: tuple[int, int], problems: int
) -> None:
    from apsched_mongo import _sharding

    verdict = _sharding.judge(_sharding.RULES[collection], key, version)
    assert len(verdict.problems) == problems, verdict
