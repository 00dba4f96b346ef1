"""Migration from APScheduler's built-in MongoDB store: data written by that store arrives
equal in ours, dry runs write nothing, re-runs copy nothing, bad documents don't stop it."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
import pytest
from apscheduler import ConflictPolicy, Job, Schedule, Task
from apscheduler.datastores.mongodb import MongoDBDataStore as BuiltinStore
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pymongo import MongoClient

from apsched_mongo import migrate
from apsched_mongo.migrate import migrate_from_builtin
from tests.conftest import REAL_URI_ENV

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
    assert "could not convert schedule 'cron'" in report.render()
    ours, _ = await started()
    assert [s.id for s in await ours.get_schedules()] == ["interval"]


def test_cli_dry_run_on_empty_memory(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    migrate.add_arguments(parser)
    assert migrate.run(parser.parse_args(["--from-builtin"])) == 0
    out = capsys.readouterr().out
    assert "would copy" in out and "dry run" in out
