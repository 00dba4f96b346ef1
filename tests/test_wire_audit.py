"""What the data store and the event broker actually send, through the real driver to a
replica set (the wire front records every command): every write asks for a majority
acknowledgement, and every write the driver can retry carries a transaction number."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from apsched_mongo.memory_wire import MemoryWireServer
from tests.test_privileges import exercise_store_and_broker

WRITES = ("insert", "update", "delete", "findAndModify")


def retryable(body: dict[str, Any]) -> bool:
    """Whether the retryable writes specification lets the driver retry this command: no
    multi-document update or delete in it."""
    if "updates" in body:
        return not any(statement.get("multi") for statement in body["updates"])
    if "deletes" in body:
        return all(statement.get("limit") == 1 for statement in body["deletes"])
    return True


@pytest.fixture(scope="module")
def sent() -> list[dict[str, Any]]:
    with MemoryWireServer(replica_set=True, record=True) as front:
        anyio.run(exercise_store_and_broker, front)
    return [body for body in front.received if next(iter(body)) in WRITES]


def test_every_write_asks_for_a_majority(sent: list[dict[str, Any]]) -> None:
    assert {next(iter(body)) for body in sent} == set(WRITES)  # all four were seen
    unacknowledged = [body for body in sent
                      if body.get("writeConcern", {}).get("w") != "majority"]
    assert unacknowledged == []


def test_every_retryable_write_carries_a_transaction_number(
        sent: list[dict[str, Any]]) -> None:
    missing = [body for body in sent if retryable(body) and "txnNumber" not in body]
    assert missing == []
    assert any("txnNumber" in body for body in sent if next(iter(body)) == "findAndModify")
