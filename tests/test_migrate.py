"""Migration from APScheduler's built-in MongoDB store: data written by that store arrives
equal in ours, dry runs write nothing, re-runs copy nothing, bad documents don't stop it."""

from __future__ import annotations

import argparse
import io
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import anyio
import attrs
import bson
import pytest
from apscheduler import ConflictPolicy, Job, Schedule, Task
from apscheduler.datastores.mongodb import MongoDBDataStore as BuiltinStore
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.serializers.json import JSONSerializer
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from mockupdb import MockupDB
from pymongo import MongoClient
from pymongo.errors import AutoReconnect

from apsched_mongo import migrate
from apsched_mongo._progress import Progress
from apsched_mongo.migrate import migrate_from_builtin
from tests.conftest import REAL_URI_ENV
from tests.faults import FaultPlan, FaultyClient

pytestmark = pytest.mark.anyio
IST = timezone(timedelta(hours=5, minutes=30))
FIRE = datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=IST)
NOT_LEASED = {"acquired_by", "acquired_until", "running_jobs"}


@pytest.fixture
async def builtin(backend: Any) -> AsyncIterator[BuiltinStore]:
    """APScheduler's own store, started on the backend's database."""
    if backend.is_real:
        sync: Any = MongoClient(os.environ[REAL_URI_ENV])
    else:
        sync = backend.client().sync_client()  # synchronous mongomock-ng on the same data
    # The built-in store validates instance_of(MongoClient); mongomock-ng's client is a
    # duck-typed stand-in, so that one validator is switched off while constructing.
    with attrs.validators.disabled():
        store = BuiltinStore(sync, database=backend.database)
    async with AsyncExitStack() as stack:
        log = logging.getLogger("builtin")
        broker = LocalEventBroker()
        await broker.start(stack, log)
        await store.start(stack, broker, log)
        yield store
    if backend.is_real:
        sync.close()


async def fill(store: BuiltinStore) -> dict[str, Any]:
    tasks = [
        Task(id="plain", func="tests.helpers:noop", job_executor="async"),
        Task(id="limited", func="tests.helpers:noop", job_executor="threadpool",
             max_running_jobs=2, misfire_grace_time=timedelta(seconds=7.5),
             metadata={"team": "ops", "tags": ["a", "b"]}),
    ]
    schedules = [
        Schedule(id="interval", task_id="plain", job_executor="async",
                 trigger=IntervalTrigger(minutes=5, start_time=FIRE), next_fire_time=FIRE,
                 args=(1, "two"), kwargs={"three": 3.0}, max_jitter=timedelta(seconds=2)),
        Schedule(id="cron", task_id="limited", job_executor="async", paused=True,
                 trigger=CronTrigger(hour="*/2", timezone="Asia/Kolkata"),
                 next_fire_time=FIRE + timedelta(hours=2), last_fire_time=FIRE,
                 job_result_expiration_time=timedelta(minutes=1)),
    ]
    jobs = [
        Job(task_id="plain", executor="async", args=(42,), kwargs={"x": [1, 2]},
            schedule_id="interval", scheduled_fire_time=FIRE, jitter=timedelta(seconds=1),
            start_deadline=FIRE + timedelta(minutes=1), created_at=FIRE - timedelta(days=1)),
        Job(task_id="limited", executor="async", result_expiration_time=timedelta(hours=1),
            created_at=FIRE - timedelta(hours=1)),
    ]
    for task in tasks:
        await store.add_task(task)
    for schedule in schedules:
        await store.add_schedule(schedule, ConflictPolicy.exception)
    running = Job(task_id="plain", executor="async", created_at=FIRE - timedelta(days=9))
    await store.add_job(running)
    assert [job.id for job in await store.acquire_jobs("old-node", timedelta(minutes=5), 1)] \
        == [running.id]
    for job in jobs:
        await store.add_job(job)
    return {"tasks": tasks, "schedules": schedules, "jobs": jobs, "running": running}


def state(obj: Any) -> dict[str, Any]:
    """Every field but the leases and counters that do not migrate; triggers by their
    pickled state (an unpickled CronTrigger's generated __eq__ trips over lazy fields)."""
    fields = {key: value for key, value in attrs.asdict(obj, recurse=False).items()
              if key not in NOT_LEASED}
    if "trigger" in fields:
        fields["trigger"] = (type(obj.trigger), obj.trigger.__getstate__())
    return fields


async def test_dry_run_writes_nothing(backend: Any, builtin: BuiltinStore) -> None:
    await fill(builtin)
    before = sorted(await backend.db().list_collection_names())

    report = await migrate_from_builtin(backend.client(), source_database=backend.database,
                                        database=backend.database)

    assert sorted(await backend.db().list_collection_names()) == before
    counts = {kind: (c.found, c.copied, c.skipped_acquired, c.failed)
              for kind, c in report.counts.items()}
    assert counts == {"task": (2, 2, 0, 0), "schedule": (2, 2, 0, 0), "job": (3, 2, 1, 0)}
    assert "dry run: nothing was written" in report.render()


async def test_apply_copies_everything_equal_and_only_once(
    backend: Any, builtin: BuiltinStore, started: Any
) -> None:
    written = await fill(builtin)

    report = await migrate_from_builtin(backend.client(), source_database=backend.database,
                                        database=backend.database, apply=True)
    assert report.failures == []
    assert {kind: c.copied for kind, c in report.counts.items()} == {
        "task": 2, "schedule": 2, "job": 2}
    assert report.counts["job"].skipped_acquired == 1

    ours, _ = await started()
    assert [state(t) for t in await ours.get_tasks()] == [
        state(t) for t in sorted(written["tasks"], key=lambda t: t.id)]
    schedules = {s.id: s for s in await ours.get_schedules()}
    for schedule in written["schedules"]:
        assert state(schedules[schedule.id]) == state(schedule)
        assert schedules[schedule.id].next_fire_time.utcoffset() == timedelta(hours=5,
                                                                            minutes=30)
    assert await ours.get_next_schedule_run_time() == FIRE  # exact to the microsecond
    jobs = {job.id: job for job in await ours.get_jobs()}
    assert set(jobs) == {job.id for job in written["jobs"]}  # not the running one
    for job in written["jobs"]:
        assert state(jobs[job.id]) == state(job)

    again = await migrate_from_builtin(backend.client(), source_database=backend.database,
                                       database=backend.database, apply=True)
    assert {kind: (c.copied, c.already_there) for kind, c in again.counts.items()} == {
        "task": (0, 2), "schedule": (0, 2), "job": (0, 2)}

    # a migrated job that has run (and been deleted) is not brought back by a re-run
    job = written["jobs"][0]
    await backend.db()["apsched_jobs"].delete_one({"_id": job.id})
    third = await migrate_from_builtin(backend.client(), source_database=backend.database,
                                       database=backend.database, apply=True)
    assert third.counts["job"].copied == 0
    assert job.id not in {j.id for j in await ours.get_jobs()}


async def test_corrupt_documents_are_reported_and_the_rest_copied(
    backend: Any, builtin: BuiltinStore, started: Any
) -> None:
    await fill(builtin)
    db = backend.db()
    await db["schedules"].update_one({"_id": "cron"}, {"$set": {"trigger": b"not a pickle"}})
    await db["tasks"].insert_one({"_id": "broken", "func": "no colon", "job_executor": "x"})

    report = await migrate_from_builtin(backend.client(), source_database=backend.database,
                                        database=backend.database, apply=True)

    assert sorted((kind, doc_id) for kind, doc_id, _ in report.failures) == [
        ("schedule", "cron"), ("task", "broken")]
    assert {kind: (c.copied, c.failed) for kind, c in report.counts.items()} == {
        "task": (2, 1), "schedule": (1, 1), "job": (2, 0)}
    reasons = {doc_id: reason for _, doc_id, reason in report.failures}
    # the reason names the cause, even where APScheduler raised without a message
    assert reasons["cron"].startswith("DeserializationError: UnpicklingError: ")
    assert "could not convert schedule 'cron': DeserializationError: Unpickling" in (
        report.render())
    ours, _ = await started()
    assert [s.id for s in await ours.get_schedules()] == ["interval"]


def test_cli_dry_run_on_empty_memory(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    migrate.add_arguments(parser)
    assert migrate.run(parser.parse_args(["--from-builtin"])) == 0
    out = capsys.readouterr().out
    assert "would copy" in out and "dry run" in out


# --- serializers, scale, resumption, progress ---------------------------------------------------

def builtin_store(backend: Any, serializer: Any = None) -> Any:
    sync = backend.client().sync_client() if not backend.is_real else MongoClient(
        os.environ[REAL_URI_ENV])
    with attrs.validators.disabled():
        kwargs = {"serializer": serializer} if serializer else {}
        return BuiltinStore(sync, database=backend.database, **kwargs)


async def test_a_json_serialized_builtin_store_migrates_with_the_json_source_serializer(
    backend: Any, started: Any
) -> None:
    store = builtin_store(backend, JSONSerializer())
    async with AsyncExitStack() as stack:
        broker = LocalEventBroker()
        await broker.start(stack, logging.getLogger("builtin"))
        await store.start(stack, broker, logging.getLogger("builtin"))
        await store.add_task(Task(id="plain", func="tests.helpers:noop", job_executor="async"))
        schedule = Schedule(id="every5", task_id="plain", job_executor="async",
                            trigger=IntervalTrigger(minutes=5, start_time=FIRE),
                            next_fire_time=FIRE, args=(1, "two"))
        await store.add_schedule(schedule, ConflictPolicy.exception)

    wrong = await migrate_from_builtin(backend.client(), source_database=backend.database,
                                       database=backend.database)
    assert wrong.counts["schedule"].failed == 1
    assert "is --source-serializer the one" in wrong.render()

    report = await migrate_from_builtin(backend.client(), source_database=backend.database,
                                        database=backend.database, apply=True,
                                        source_serializer=JSONSerializer())
    assert report.failures == []
    ours, _ = await started()
    [copied] = await ours.get_schedules()
    assert state(copied) == state(schedule)


async def add_builtin_schedules(backend: Any, count: int) -> None:
    """``count`` schedules as the built-in store writes them (one written by it, copied)."""
    store = builtin_store(backend)
    async with AsyncExitStack() as stack:
        broker = LocalEventBroker()
        await broker.start(stack, logging.getLogger("builtin"))
        await store.start(stack, broker, logging.getLogger("builtin"))
        await store.add_task(Task(id="plain", func="tests.helpers:noop", job_executor="async"))
        await store.add_schedule(Schedule(id="s00000", task_id="plain", job_executor="async",
                                          trigger=IntervalTrigger(minutes=5), next_fire_time=FIRE),
                                 ConflictPolicy.exception)
        # its own collection handle: it encodes enums the way the built-in store does
        schedules = store._schedules
        template = schedules.find_one({"_id": "s00000"})
        schedules.insert_many([{**template, "_id": f"s{number:05d}"}
                               for number in range(1, count)])


async def test_batched_copy_costs_one_write_per_document(backend: Any) -> None:
    """Commands sent, counted: per document one store write; per batch two reads (what the
    target and the ledger have) and one ledger write. The old code paid 4 per document."""
    count, batch = 1200, 250
    await add_builtin_schedules(backend, count)
    plan = FaultPlan(seed=0, rate=0)
    seen: list[tuple[int, int]] = []
    report = await migrate_from_builtin(
        FaultyClient(backend.client(), plan), source_database=backend.database,
        database=backend.database, apply=True, batch_size=batch,
        progress=lambda done, total: seen.append((done, total)))

    assert report.counts["schedule"].copied == count
    assert plan.attempts["apsched_schedules.insert_one"] == count
    batches = -(-count // batch) + 1  # the schedules' batches and the task's
    assert plan.attempts["apsched_migrated_from_builtin.insert_many"] == batches
    assert plan.attempts["apsched_schedules.find"] + plan.attempts["apsched_tasks.find"] == batches
    per_document = sum(plan.attempts.values()) / count
    assert per_document < 1.1, plan.attempts
    assert seen[-1] == (count + 1, count + 1)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


async def test_an_interrupted_migration_resumes_through_the_ledger(
    backend: Any, started: Any
) -> None:
    count, batch = 300, 100
    await add_builtin_schedules(backend, count)
    plan = FaultPlan(seed=0, rate=0)
    ledger_writes = 0

    def die_at_the_third_ledger_write(what: str, args: Any, kwargs: Any) -> bool:
        nonlocal ledger_writes
        if what == "apsched_migrated_from_builtin.insert_many":
            ledger_writes += 1
        return ledger_writes == 3  # the task's batch, one of schedules, then the process dies

    plan.kill_when = die_at_the_third_ledger_write
    with pytest.raises(AutoReconnect):
        await migrate_from_builtin(FaultyClient(backend.client(), plan),
                                   source_database=backend.database,
                                   database=backend.database, apply=True, batch_size=batch)
    db = backend.db()
    assert await db["apsched_schedules"].count_documents({}) == 2 * batch  # written...
    assert await db["apsched_migrated_from_builtin"].count_documents({}) == 1 + batch  # ...recorded

    resumed = await migrate_from_builtin(backend.client(), source_database=backend.database,
                                         database=backend.database, apply=True,
                                         batch_size=batch)
    counts = resumed.counts["schedule"]
    assert (counts.copied, counts.already_there) == (count - 2 * batch, 2 * batch)
    assert await db["apsched_schedules"].count_documents({}) == count
    assert await db["apsched_migrated_from_builtin"].count_documents({}) == count + 1
    ours, _ = await started()
    assert len(await ours.get_schedules()) == count


@pytest.mark.soak
async def test_ten_thousand_schedules_in_well_under_a_minute(backend: Any) -> None:
    await add_builtin_schedules(backend, 10_000)
    started_at = time.monotonic()
    report = await migrate_from_builtin(backend.client(), source_database=backend.database,
                                        database=backend.database, apply=True)
    elapsed = time.monotonic() - started_at
    assert report.counts["schedule"].copied == 10_000
    assert elapsed < 30, elapsed


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_is_a_bar_redrawn_in_place() -> None:
    now = [0.0]
    progress = Progress("documents", Terminal(), clock=lambda: now[0])
    now[0] = 2.0
    progress(500, 2000)
    now[0] = 4.0
    progress(1000, 2000)
    progress.finish()
    output = progress.stream.getvalue()  # type: ignore[attr-defined]
    assert output.count("\r") == 2 and output.endswith("\n")
    assert "[############------------] 1,000/2,000 documents (50%), 250/s, ETA 4s" in output


def test_progress_elsewhere_is_plain_periodic_lines() -> None:
    now = [0.0]
    stream = io.StringIO()
    progress = Progress("documents", stream, every=5, clock=lambda: now[0])
    for second in range(1, 13):
        now[0] = float(second)
        progress(second * 100, 1200)
    progress.finish()
    assert stream.getvalue().splitlines() == [
        "500/1,200 documents (41%), 100/s, ETA 7s",
        "1,000/1,200 documents (83%), 100/s, ETA 2s",
        "1,200/1,200 documents (100%), 100/s, 12s",
    ]


def test_cli_migrates_a_json_store_with_progress_and_batches(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = argparse.ArgumentParser()
    migrate.add_arguments(parser)
    args = parser.parse_args(["--from-builtin", "--source-serializer", "json",
                              "--serializer", "cbor", "--batch-size", "7", "--apply"])
    assert migrate.run(args) == 0
    out = capsys.readouterr().out
    assert "copied" in out and "dry run" not in out


# --- the command line against a scripted server ------------------------------------------------

class BuiltinStoreServer:
    """A scripted MongoDB (mockupdb) holding a built-in store's documents exactly as a real
    server returns them, answering what a dry run asks: counts, the source read in batches,
    and the lookups in the target and the ledger (both empty). Records every command."""

    def __init__(self, documents: dict[str, list[dict[str, Any]]]) -> None:
        self.documents = documents
        self.commands: list[tuple[str, str]] = []
        self.server = MockupDB(auto_ismaster=None)
        self.server.autoresponds(self.answer)
        self.server.run()
        self.uri = f"mongodb://{self.server.address_string}/?directConnection=true"

    def answer(self, request: Any) -> bool:
        name = request.command_name
        if name in ("ismaster", "isMaster", "hello"):
            return bool(request.replies(ismaster=True, isWritablePrimary=True, helloOk=True,
                                        minWireVersion=0, maxWireVersion=21,
                                        localTime=datetime.now(UTC)))
        collection = str(request.doc.get(name, ""))
        self.commands.append((name, collection))
        documents = self.documents.get(collection, [])
        namespace = f"{request.doc.get('$db')}.{collection}"
        if name == "aggregate":  # count_documents
            batch = [{"_id": 1, "n": len(documents)}] if documents else []
            return bool(request.replies(cursor={"id": 0, "ns": namespace, "firstBatch": batch}))
        if name == "find":
            wanted = request.doc["filter"].get("_id")
            batch = documents if wanted is None else []
            return bool(request.replies(cursor={"id": 0, "ns": namespace, "firstBatch": batch}))
        if name == "endSessions":
            return bool(request.replies())
        return bool(request.command_err(59, f"unexpected command {name!r}"))

    def stop(self) -> None:
        self.server.stop()


async def builtin_documents(backend: Any) -> dict[str, list[dict[str, Any]]]:
    """Documents written by the built-in store, as a real server would return them."""
    store = builtin_store(backend)
    async with AsyncExitStack() as stack:
        broker = LocalEventBroker()
        await broker.start(stack, logging.getLogger("builtin"))
        await store.start(stack, broker, logging.getLogger("builtin"))
        await fill(store)
    documents = {}
    for name in ("tasks", "schedules", "jobs"):
        collection = getattr(store, f"_{name}")
        options = collection.codec_options
        documents[name] = [bson.decode(bson.encode(document, codec_options=options))
                           for document in collection.find({}, sort=[("_id", 1)])]
    return documents


async def test_cli_dry_run_against_a_scripted_server(backend: Any) -> None:
    server = BuiltinStoreServer(await builtin_documents(backend))
    try:
        result = await anyio.to_thread.run_sync(lambda: subprocess.run(
            [sys.executable, "-m", "apsched_mongo", "migrate", "--from-builtin",
             "--uri", server.uri, "--batch-size", "2"],
            capture_output=True, text=True, timeout=60, check=False))
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "            found  would copy  present  running  failed",
        "tasks           2           2        0        0       0",
        "schedules       2           2        0        0       0",
        "jobs            3           2        0        1       0",
        "dry run: nothing was written (pass --apply to copy)",
    ]
    assert "7/7 documents (100%)" in result.stderr  # the closing progress line (not a tty)
    # streamed: the jobs in two batches, each followed by its lookups in target and ledger
    assert server.commands.count(("find", "jobs")) == 1
    assert server.commands.count(("find", "apsched_jobs")) == 2
    assert server.commands.count(("find", "apsched_migrated_from_builtin")) == 4
    assert not [command for command, _ in server.commands if command in ("insert", "update")]
