"""The in-memory server's wire front for ``pytest --memory-wire``: the real-server tier
through the real driver, in this process, on a free port."""

from __future__ import annotations

import os

import pytest

from apsched_mongo.memory_wire import MemoryWireServer

#: set by start_front: the running front (tests that need to reach it, e.g. to inject faults)
FRONT: MemoryWireServer | None = None


def start_front(config: pytest.Config) -> str:
    """Start the front (a standalone server until the in-memory back end has a replica-set
    mode); return its URI. It stops when the test session ends."""
    global FRONT
    FRONT = MemoryWireServer(replica_set=os.environ.get("APSCHED_MEMORY_WIRE_REPLICA_SET"))
    FRONT.start()
    config.add_cleanup(FRONT.stop)
    return FRONT.uri
