"""An in-process MongoDB for the demo and for tests: PyMongo's async API over mongomock-ng.

mongomock-ng is synchronous and silently ignores some things a real server does; this
package makes it look like :class:`pymongo.AsyncMongoClient` for the calls apsched-mongo
makes, and refuses -- loudly -- what the fake would get wrong:

* pipeline-style updates (``[{"$set": ...}]``), ``$$NOW``/``$$CLUSTER_TIME``, ``$out`` and,
  in replica-set mode, multi-document transactions raise
  :class:`~apsched_mongo.errors.UnsupportedByMemoryBackend` (the fake would get them wrong);
* a document outside a partial unique index's filter is not checked against it, as in
  MongoDB (mongomock-ng scans the collection for it on every write).

A :class:`MemoryServer` is standalone by default: ``hello`` says so and change streams fail
with the same :class:`~pymongo.errors.OperationFailure` (code 40573) as on a standalone
server, so code that falls back to polling there does so here too. With
``MemoryServer(replica_set=True)`` it is a replica-set primary whose change streams
(``watch()`` on a collection, database or client) follow MongoDB's documented behaviour,
and whose fault hooks simulate failovers (see :class:`MemoryServer`).

Every operation yields to the event loop first, as a network round trip would, so tasks
racing for the same documents interleave. Clients made from one :class:`MemoryServer` share
its data, like several processes connected to one server.
"""

from __future__ import annotations

try:
    import mongomock_ng  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the in-memory back end needs mongomock-ng: pip install 'apsched-mongo[memory]'"
    ) from exc

from . import _mongomock  # noqa: F401  (patches mongomock-ng on import)
from ._changestream import ServerChangeStream
from ._lookalike import MemoryCollection, MemoryCursor, MemoryDatabase, MemoryMongoClient
from ._server import MemoryServer
from ._watch import MemoryChangeStream

__all__ = [
    "MemoryChangeStream",
    "MemoryCollection",
    "MemoryCursor",
    "MemoryDatabase",
    "MemoryMongoClient",
    "MemoryServer",
    "ServerChangeStream",
]
