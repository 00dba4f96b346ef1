"""Which failures are retried, and whose clock leases follow."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from apscheduler import Job, Task
from pymongo.errors import (
    AutoReconnect,
    ConfigurationError,
    DuplicateKeyError,
    InvalidName,
    NetworkTimeout,
    NotPrimaryError,
    OperationFailure,
    ServerSelectionTimeoutError,
    WriteError,
)

from apsched_mongo._retry import is_temporary
from tests.helpers import FakeClock

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("exc", [
    AutoReconnect("connection reset"),
    NotPrimaryError("not primary", {"code": 10107}),
    NetworkTimeout("timed out"),
    ServerSelectionTimeoutError("no primary"),
    OperationFailure("stepped down", code=189),
    OperationFailure("shutting down", code=91),
    OperationFailure("interrupted", code=11602),
    OperationFailure("labelled", code=1, details={"errorLabels": ["RetryableWriteError"]}),
], ids=type)
def test_temporary_failures_are_retried(exc: Exception) -> None:
    assert is_temporary(exc)


@pytest.mark.parametrize("exc", [
    OperationFailure("Authentication failed.", code=18),
    OperationFailure("not authorized", code=13),
    DuplicateKeyError("E11000", code=11000),
    WriteError("Document failed validation", code=121),
    ConfigurationError("bad option"),
    InvalidName("bad name"),
    ValueError("not ours"),
], ids=lambda exc: f"{type(exc).__name__}-{getattr(exc, 'code', '')}")
def test_permanent_failures_are_not_retried(exc: Exception) -> None:
    assert not is_temporary(exc)


async def test_leases_follow_the_server_clock_not_a_skewed_node(started: Any) -> None:
    """A node whose clock is an hour fast still writes leases on the server's time line."""
    store, _ = await started(local_clock=FakeClock(skew=timedelta(hours=1)))
    await store.add_task(Task(id="t", func="tests.helpers:noop", job_executor="async"))
    await store.add_job(Job(task_id="t", executor="async"))
    [job] = await store.acquire_jobs("fast-node", timedelta(seconds=30), 1)
    expected = datetime.now(UTC) + timedelta(seconds=30)
    assert job.acquired_until is not None
    assert abs(job.acquired_until - expected) < timedelta(seconds=5)
