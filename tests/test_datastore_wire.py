"""The data store against a scripted server: step-downs, lost replies and permanent errors
as a real server reports them on the wire (what the in-memory fake cannot produce)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import pytest
from apscheduler import Job, JobAdded, RetrySettings
from pymongo.errors import OperationFailure
from tenacity import stop_after_attempt, wait_fixed

from apsched_mongo import MongoDBDataStore
from tests.conftest import RecordingBroker
from tests.wire import Wire

pytestmark = pytest.mark.anyio
log = logging.getLogger(__name__)


@pytest.fixture
async def store(wire: Wire) -> AsyncIterator[tuple[MongoDBDataStore, RecordingBroker]]:
    # retryWrites=false: the driver's own single retry would hide ours
    store = MongoDBDataStore(
        wire.uri + "&retryWrites=false", database="apscheduler",
        retry_settings=RetrySettings(stop=stop_after_attempt(3), wait=wait_fixed(0)),
    )
    async with AsyncExitStack() as stack:
        broker = RecordingBroker()
        await broker.start(stack, log)
        with anyio.fail_after(20):
            await store.start(stack, broker, log)
        yield store, broker


async def _add_job_while(store: MongoDBDataStore, script: Any) -> Job:
    """Add a job while ``script`` answers the server's side; return the job."""
    job = Job(task_id="t", executor="async")
    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(script)
            await store.add_job(job)
    return job


async def test_a_step_down_is_retried(wire: Wire, store: Any) -> None:
    data_store, broker = store

    async def script() -> None:
        first = await wire.receives("insert")
        await anyio.to_thread.run_sync(lambda: first.replies(
            {"ok": 0, "code": 10107, "codeName": "NotWritablePrimary", "errmsg": "not primary"}
        ))
        second = await wire.receives("insert")
        assert second["documents"][0]["_id"] == first["documents"][0]["_id"]
        await anyio.to_thread.run_sync(lambda: second.replies({"ok": 1, "n": 1}))

    job = await _add_job_while(data_store, script)
    assert [e.job_id for e in broker.of_type(JobAdded)] == [job.id]


async def test_a_lost_reply_then_duplicate_key_counts_as_inserted(wire: Wire, store: Any) -> None:
    """The insert landed but the connection dropped before the reply: the retry meets its
    own document as a duplicate key, which means success, not a conflict."""
    data_store, broker = store

    async def script() -> None:
        first = await wire.receives("insert")
        await anyio.to_thread.run_sync(first.hangup)
        second = await wire.receives("insert")
        await anyio.to_thread.run_sync(lambda: second.replies({
            "ok": 1, "n": 0,
            "writeErrors": [{"index": 0, "code": 11000, "errmsg": "E11000 duplicate key"}],
        }))

    job = await _add_job_while(data_store, script)
    assert [e.job_id for e in broker.of_type(JobAdded)] == [job.id]


async def test_an_authorization_error_is_not_retried(wire: Wire, store: Any) -> None:
    data_store, broker = store

    async def script() -> None:
        request = await wire.receives("insert")
        await anyio.to_thread.run_sync(lambda: request.replies(
            {"ok": 0, "code": 13, "codeName": "Unauthorized", "errmsg": "not authorized"}
        ))

    with anyio.fail_after(20):  # a retry would wait here for a reply that never comes
        async with anyio.create_task_group() as tg:
            tg.start_soon(script)
            with pytest.raises(OperationFailure, match="not authorized"):
                await data_store.add_job(Job(task_id="t", executor="async"))
    assert "insert" not in wire.pending_commands()
    assert broker.of_type(JobAdded) == []
