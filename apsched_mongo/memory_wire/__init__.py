"""A MongoDB wire-protocol front for the in-memory back end: a test and demo server.

:class:`MemoryWireServer` listens on a local port and answers what PyMongo sends -- the
handshake, CRUD, cursors, indexes, sessions and retryable writes -- by running each command
on a :class:`~apsched_mongo.memory.MemoryServer` (mongomock-ng). It lets the real driver,
separate processes and injected faults (:class:`Fault`) meet the in-memory back end.

It is not a database: nothing is persisted or replicated, and what mongomock-ng cannot do
faithfully is refused (code 238, NotImplemented) rather than answered wrongly. Nothing in
the package imports this module; run it with ``python -m apsched_mongo.memory_wire``.
"""

from __future__ import annotations

from ._faults import DESCRIPTIONS, KINDS, Fault, FaultPlan, parse_fault
from ._server import WIRE_CODEC, MemoryWireServer

__all__ = ["DESCRIPTIONS", "KINDS", "WIRE_CODEC", "Fault", "FaultPlan", "MemoryWireServer",
           "parse_fault"]
