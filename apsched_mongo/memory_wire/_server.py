"""The wire-protocol front: a TCP server speaking OP_MSG (and the legacy OP_QUERY handshake)
in front of a :class:`~apsched_mongo.memory.MemoryServer`.

Each connection gets a thread; messages are parsed and replies framed by ``mockupdb``
(its request and reply classes, not its scripted-server loop), documents are encoded by
PyMongo's ``bson``. Around the commands themselves (:mod:`._commands`) this layer adds what
a server does per request: the handshake, role checks, retryable writes, error labels, and
the faults a test asked for.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import socketserver
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import bson

try:
    import mockupdb
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the in-memory server's wire front needs mockupdb: pip install 'apsched-mongo[memory]'"
    ) from exc
from bson import CodecOptions, DatetimeConversion, UuidRepresentation
from bson.raw_bson import RawBSONDocument
from bson.tz_util import utc

from ..memory import MemoryServer
from . import _access
from ._changestreams import open_change_stream
from ._commands import Executor
from ._cursors import Cursors
from ._errors import RETRYABLE_CODES, CommandError
from ._faults import Fault, FaultPlan, Kind
from ._sessions import SESSION_TIMEOUT_MINUTES, RetryableWrites

logger = logging.getLogger(__name__)

#: How documents cross the wire: what the in-memory back end stores (aware UTC datetimes,
#: UUIDs as uuid.UUID) decodes to and from the same BSON a driver sends and reads
WIRE_CODEC: CodecOptions[dict[str, Any]] = CodecOptions(
    tz_aware=True, tzinfo=utc, uuid_representation=UuidRepresentation.STANDARD,
    datetime_conversion=DatetimeConversion.DATETIME_AUTO,
)
MAX_WIRE_VERSION = 21  # MongoDB 7.0
HELLO = frozenset({"hello", "isMaster", "ismaster"})
RETRYABLE_WRITES = frozenset({"insert", "update", "delete", "findAndModify", "findandmodify"})
WRITES = RETRYABLE_WRITES | {"createIndexes", "dropIndexes", "deleteIndexes", "create", "drop",
                             "dropDatabase"}
READS = frozenset({"find", "aggregate", "count", "distinct", "listIndexes", "listCollections"})
MORE_TO_COME = mockupdb.OP_MSG_FLAGS["moreToCome"]


def _error(code: int, errmsg: str, **extra: Any) -> dict[str, Any]:
    return CommandError(code, errmsg, **extra).document()


class MemoryWireServer:
    """A MongoDB wire-protocol server over an in-memory back end, for tests and demos.

    Not a database: everything lives in this process's memory and goes when it stops.

    :param server: the data to serve (shared with any :class:`MemoryMongoClient` made from
        it), standalone or a replica set as it was made; a new, empty one by default
    :param host: the address to listen on
    :param port: the port; 0 picks a free one
    :param replica_set: for a new server: make it a one-node replica set (``hello`` then
        says so, drivers send retryable writes with ``txnNumber`` and change streams work)
    :param privileges: enforce a role: MongoDB privilege documents; a command needing an
        action outside them is answered Unauthorized (13). None: everything is allowed
    :param seed: seeds the faults' random draws
    :param record: keep every command received in :attr:`received`
    """

    def __init__(self, server: MemoryServer | None = None, *, host: str = "127.0.0.1",
                 port: int = 0, replica_set: bool = False,
                 privileges: Sequence[Mapping[str, Any]] | None = None, seed: int = 0,
                 record: bool = False) -> None:
        if server is not None and replica_set and not server.replica_set:
            raise ValueError("replica_set=True, but the MemoryServer given is standalone "
                             "(make it with MemoryServer(replica_set=True))")
        self.memory = server or MemoryServer(replica_set=replica_set)
        self.privileges = list(privileges) if privileges is not None else None
        #: the faults injected (add, remove, clear)
        self.faults = FaultPlan(seed)
        #: the remembered outcomes of retryable writes (``replayed`` counts retries answered)
        self.retryable_writes = RetryableWrites()
        self.record = record
        #: commands received, by name
        self.commands: Counter[str] = Counter()
        #: every command received (with ``record=True``)
        self.received: list[dict[str, Any]] = []
        #: (command, namespace, missing needs) of every command refused as Unauthorized
        self.denied: list[tuple[str, str, list[str]]] = []
        #: (index in :attr:`privileges`, action) -> commands it authorized
        self.grants_used: Counter[tuple[int, str]] = Counter()
        #: every privilege action the commands received needed (with or without a role):
        #: what a workload needs, measured
        self.needs: Counter[_access.Need] = Counter()
        self._cursors = Cursors(WIRE_CODEC)
        self._executor = Executor(self.memory, self._cursors)
        if self.memory.replica_set:
            self._executor.change_streams = self._open_change_stream
        self._host, self._port = host, port
        self._tcp: _TCPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, int] = {}
        self._next_connection_id = 1
        self._stepped_down_until = 0.0  # a standalone server's step-down fault

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> MemoryWireServer:
        """Listen and serve in a background thread; returns self."""
        if self._tcp is not None:
            raise RuntimeError("this MemoryWireServer is already running")
        self._stopping.clear()
        self._tcp = _TCPServer((self._host, self._port), self)
        self._port = self._tcp.server_address[1]
        self._thread = threading.Thread(target=self._tcp.serve_forever, kwargs={
            "poll_interval": 0.05}, name=f"memory-wire:{self._port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._tcp is None:
            return
        self._stopping.set()
        self._tcp.shutdown()
        self._tcp.server_close()
        with self._lock:
            connections = list(self._connections)
        for sock in connections:
            _close(sock)
        self._tcp = None

    def __enter__(self) -> MemoryWireServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def address(self) -> str:
        """``host:port``, as the replica set's members list it."""
        return f"{self._host}:{self._port}"

    @property
    def replica_set(self) -> str | None:
        """The replica set's name, or None for a standalone server."""
        return self.memory.set_name if self.memory.replica_set else None

    @property
    def uri(self) -> str:
        """A connection string for this server (with ``replicaSet`` in replica-set mode)."""
        options = f"?replicaSet={self.replica_set}" if self.replica_set else ""
        return f"mongodb://{self.address}/{options}"

    @property
    def connections(self) -> int:
        """Client connections open now."""
        with self._lock:
            return len(self._connections)

    @property
    def open_cursors(self) -> int:
        """Server-side cursors open now (not exhausted, killed or timed out)."""
        return len(self._cursors)

    # --- faults ----------------------------------------------------------------------------

    def inject(self, kind: Kind, **options: Any) -> Fault:
        """Add a fault (see :class:`~apsched_mongo.memory_wire.Fault`); returns it, so a test
        can wait for it to hit (``fault.wait()``) or remove it (``faults.remove(fault)``)."""
        return self.faults.add(Fault(kind, **options))

    def step_down(self, seconds: float) -> None:
        """Stop being primary for ``seconds``: writes get NotWritablePrimary, primary reads
        NotPrimaryNoSecondaryOk. A replica set (:meth:`MemoryServer.step_down`) also says
        secondary in ``hello``, ends its change streams, and then elects itself again."""
        if self.memory.replica_set:
            self.memory.step_down(seconds)
            return
        with self._lock:
            self._stepped_down_until = max(self._stepped_down_until,
                                           time.monotonic() + seconds)

    @property
    def is_primary(self) -> bool:
        if self.memory.replica_set:
            return self.memory.is_primary
        return time.monotonic() >= self._stepped_down_until

    # --- requests --------------------------------------------------------------------------

    def _register(self, sock: socket.socket) -> int:
        with self._lock:
            connection_id = self._next_connection_id
            self._next_connection_id += 1
            self._connections[sock] = connection_id
            return connection_id

    def _unregister(self, sock: socket.socket) -> None:
        with self._lock:
            self._connections.pop(sock, None)

    def _serve(self, request: Any, sock: socket.socket, connection_id: int) -> bool:
        """Answer one request; False when the connection must close."""
        if not isinstance(request, mockupdb.OpMsg | mockupdb.Command):
            if isinstance(request, mockupdb.OpQuery):  # a legacy find: long gone from mongod
                sock.sendall(mockupdb.OpReply({"$err": "Unsupported OP_QUERY command", "code": 352},
                                              flags=mockupdb.REPLY_FLAGS["QueryFailure"])
                             .reply_bytes(request))
                return True
            logger.warning("closing a connection that sent a %s", type(request).__name__)
            return False
        body = bson.decode(bson.encode(request.doc), codec_options=WIRE_CODEC)
        db = str((body.get("$db") if isinstance(request, mockupdb.OpMsg)
                  else request.namespace) or "")
        name = next(iter(body), "")
        target = body.get(name)
        namespace = f"{db}.{target}" if isinstance(target, str) else f"{db}.$cmd"
        with self._lock:
            self.commands[name] += 1
            if self.record:
                self.received.append(body)
        fault = None if name in HELLO else self.faults.pick(name, namespace)
        kind = fault.kind if fault is not None else None
        if kind == "hangup" or (fault is not None and kind == "hold"
                                and self._closes_within(sock, fault)):
            _close(sock)
            return False  # not executed
        if name in HELLO:
            reply = self._hello(name, body, connection_id)
        elif fault is not None and kind == "step-down":
            self.step_down(fault.seconds)
            reply = self._labelled(name, db, body, _error(
                fault.code, "not primary" if fault.code == 10107 else
                "Command failed because of a replica set state change"))
        else:
            reply = self._labelled(name, db, body,
                                   self._checked_and_run(name, db, namespace, body))
        if kind == "lose-reply":
            _close(sock)
            return False  # executed, never answered
        if isinstance(request, mockupdb.OpMsg) and request.flags & MORE_TO_COME:
            return True  # an unacknowledged write: nobody waits for a reply
        if fault is not None and kind == "stall" and self._stopping.wait(fault.seconds):
            return False  # stopped while stalling
        raw = RawBSONDocument(bson.encode(reply, codec_options=WIRE_CODEC))
        reply_class = mockupdb.OpMsgReply if isinstance(request, mockupdb.OpMsg) else \
            mockupdb.OpReply
        sock.sendall(reply_class(raw).reply_bytes(request))
        return True

    def _closes_within(self, sock: socket.socket, fault: Fault) -> bool:
        """Hold for the fault's ``seconds`` (or until it is released); True if the client
        closed the connection (or the server stops) meanwhile."""
        deadline = time.monotonic() + fault.seconds
        while (remaining := deadline - time.monotonic()) > 0 and not fault.released.is_set():
            if self._stopping.is_set():
                return True
            readable, _, _ = select.select([sock], [], [], min(remaining, 0.1))
            if readable:
                try:
                    return sock.recv(1, socket.MSG_PEEK) == b""
                except OSError:
                    return True
        return False

    def _checked_and_run(self, name: str, db: str, namespace: str,
                         body: dict[str, Any]) -> dict[str, Any]:
        if not self._executor.knows(name):
            return _error(59, f"no such command: '{name}'")
        if not self.is_primary and (name in WRITES or (name in READS and body.get(
                "$readPreference", {}).get("mode", "primary") == "primary")):
            return _error(10107, "not primary") if name in WRITES else _error(
                13435, "not primary and secondaryOk=false")
        try:
            requirement = self._authorize(name, db, namespace, body)
        except CommandError as exc:
            return exc.document()
        txn_number = body.get("txnNumber")
        if txn_number is None:
            return self._executor.run(name, db, body, requirement, self._visible)
        if not self.replica_set:
            return _error(20, "Transaction numbers are only allowed on a replica set member "
                              "or mongos")
        if name not in RETRYABLE_WRITES:
            return _error(50768, f"txnNumber may only be provided for multi-document "
                                 f"transactions and retryable write commands, not {name}")
        try:
            return dict(self.retryable_writes.run(
                body.get("lsid"), txn_number,
                lambda: self._executor.run(name, db, body, requirement, self._visible),
                lambda reply: reply.get("ok") == 1))
        except CommandError as exc:
            return exc.document()

    def _authorize(self, name: str, db: str, namespace: str,
                   body: dict[str, Any]) -> _access.Requirement:
        """What the command needs; raises Unauthorized when the role lacks any of it."""
        if name == "getMore":
            try:
                requirement = self._cursors.requirement(
                    body.get("getMore"), f"{db}.{body.get('collection')}")
            except CommandError:
                return []  # the command itself reports the unknown cursor
        else:
            requirement = _access.requirement(name, db, body)
        privileges = self.privileges
        with self._lock:
            for group in requirement:
                self.needs[group[0]] += 1
        if privileges is None:
            return requirement
        lacking = _access.missing(privileges, requirement)
        with self._lock:
            if lacking:
                self.denied.append((name, namespace, [str(need) for need in lacking]))
            else:
                for group in requirement:
                    for need in group:
                        if indexes := _access.grants(privileges, need):
                            for index in indexes:
                                self.grants_used[(index, need.action)] += 1
                            break
        if lacking:
            shown = {key: value for key, value in body.items()
                     if key not in ("lsid", "$db", "$clusterTime")}
            raise CommandError(13, f"not authorized on {db} to execute command {shown}")
        return requirement

    def _visible(self, db: str, collection: str | None) -> bool:
        privileges = self.privileges
        return privileges is None or _access.visible(privileges, db, collection)

    def _labelled(self, name: str, db: str, body: Mapping[str, Any],
                  reply: dict[str, Any]) -> dict[str, Any]:
        """Add the error labels a server adds to a retryable error: RetryableWriteError for
        a retryable write (one with a txnNumber), ResumableChangeStreamError for a change
        stream's aggregate or getMore; and, as a replica set, the cluster time."""
        if self.memory.replica_set and (cluster_time := self.memory.cluster_time):
            reply["$clusterTime"] = {"clusterTime": cluster_time,
                                     "signature": {"hash": b"\0" * 20, "keyId": 0}}
            reply["operationTime"] = cluster_time
        if reply.get("ok") == 1 or reply.get("code") not in RETRYABLE_CODES:
            return reply
        labels = list(reply.get("errorLabels", []))
        if "txnNumber" in body and "RetryableWriteError" not in labels:
            labels.append("RetryableWriteError")
        if self._is_change_stream(name, db, body) and "ResumableChangeStreamError" not in labels:
            labels.append("ResumableChangeStreamError")
        if labels:
            reply["errorLabels"] = labels
        return reply

    def _is_change_stream(self, name: str, db: str, body: Mapping[str, Any]) -> bool:
        if name == "aggregate":
            pipeline = body.get("pipeline")
            return isinstance(pipeline, list) and bool(pipeline) and isinstance(
                pipeline[0], Mapping) and "$changeStream" in pipeline[0]
        return name == "getMore" and self._cursors.is_change_stream(
            body.get("getMore"), f"{db}.{body.get('collection')}")

    def _open_change_stream(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        return open_change_stream(self.memory, self._cursors, db, body,
                                  self._executor.requirement)

    def _hello(self, name: str, body: Mapping[str, Any], connection_id: int) -> dict[str, Any]:
        """A standalone server's ``hello``, or the replica set's, at this front's address."""
        key = "isWritablePrimary" if name == "hello" else "ismaster"
        if self.memory.replica_set:
            reply = self.memory.hello()
            for field in ("hosts", "me", "primary"):
                if field in reply:
                    reply[field] = [self.address] if field == "hosts" else self.address
            reply.pop("helloOk", None)
            reply.pop("ismaster" if key == "isWritablePrimary" else "isWritablePrimary")
        else:
            reply = {key: True, "maxBsonObjectSize": 16 * 1024 * 1024,
                     "maxMessageSizeBytes": 48_000_000, "maxWriteBatchSize": 100_000,
                     "localTime": datetime.now(UTC),
                     "logicalSessionTimeoutMinutes": SESSION_TIMEOUT_MINUTES,
                     "minWireVersion": 0, "maxWireVersion": MAX_WIRE_VERSION,
                     "readOnly": False, "ok": 1.0}
        reply["connectionId"] = connection_id
        if body.get("helloOk"):
            reply["helloOk"] = True
        return reply


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class _Connection(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        front = self.server.front
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection_id = front._register(sock)
        try:
            while not front._stopping.is_set():
                try:
                    request = mockupdb.mock_server_receive_request(sock, None)
                except OSError:
                    return  # the client closed the connection
                except Exception:
                    logger.warning("closing a connection that sent an unreadable message",
                                   exc_info=True)
                    return
                try:
                    if not front._serve(request, sock, connection_id):
                        return
                except OSError:
                    return
        finally:
            front._unregister(sock)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], front: MemoryWireServer) -> None:
        self.front = front
        super().__init__(address, _Connection)
