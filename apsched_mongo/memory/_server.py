"""MemoryServer: the shared state of one fake server, standalone or a replica-set primary."""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from time import monotonic
from typing import Any

from bson import ObjectId, Timestamp
from pymongo.errors import PyMongoError

from ._changestream import ServerChangeStream
from ._errors import (
    interrupted_by_election,
    no_change_streams,
    not_primary_no_secondary_ok,
    not_writable_primary,
)
from ._oplog import ChangeHistory, MemoryCollectionStore, MemoryServerStore, Recorder


class MemoryServer:
    """The shared state of one fake server: every client made on it sees the same data.

    Standalone by default, like ``mongod`` without ``--replSet``: ``hello`` says so and
    change streams fail with error 40573, so the event broker polls. With
    ``replica_set=True`` it is the primary of a one-node replica set: ``hello`` says so,
    every write is recorded in a bounded change history (its oplog) and change streams
    work, for the async look-alike (:meth:`MemoryMongoClient.watch` and friends) and for
    any other front through :meth:`open_change_stream`.

    Writes are recorded below the clients, where mongomock-ng stores documents, so every
    mongomock-ng client on :attr:`store` produces change events, e.g.
    :meth:`MemoryMongoClient.sync_client`. A client front that runs commands through a
    mongomock-ng client (a wire-protocol front, say) holds :attr:`lock` for each command
    and calls :meth:`check_readable` before reads; writes check themselves. It must not
    hold :attr:`lock` while waiting for change events.

    Fault hooks for tests (replica-set mode): :meth:`interrupt_change_streams`,
    :meth:`drop_change_history`, :meth:`step_down` and :meth:`elect`.

    :param replica_set: be a replica-set primary with change streams
    :param history_size: how many changes the history keeps (like an oplog's size); a
        stream or resume token that needs an older one fails with
        ``ChangeStreamHistoryLost`` (286)
    :param set_name: the replica set's name (``setName``)
    """

    #: The address ``hello`` gives for this server
    HOST = "memory:27017"

    def __init__(self, *, replica_set: bool = False, history_size: int = 10_000,
                 set_name: str = "rs0") -> None:
        self.replica_set = replica_set
        self.set_name = set_name
        #: Held while mongomock-ng runs an operation; writes take it themselves
        self.lock = threading.RLock()
        self._history = ChangeHistory(history_size)
        self._recorder = (
            Recorder(self._history, self.lock, self.check_writable) if replica_set else None
        )
        #: mongomock-ng's server store: ``mongomock_ng.MongoClient(_store=server.store)``
        self.store = MemoryServerStore(self._recorder)
        # Open streams, for the fault hooks; one nobody holds any more is forgotten
        self._streams: weakref.WeakSet[ServerChangeStream] = weakref.WeakSet()
        self._streams_lock = threading.Lock()
        self._primary_from = 0.0  # monotonic time when the current election ends
        self._term = 1
        self._election_id = ObjectId()

    def __repr__(self) -> str:
        mode = f"replica set {self.set_name!r}" if self.replica_set else "standalone"
        return f"{type(self).__name__}({mode}, {id(self):#x})"

    # --- topology -------------------------------------------------------------------------------

    @property
    def is_primary(self) -> bool:
        """``False`` between :meth:`step_down` and the next election."""
        return monotonic() >= self._primary_from

    @property
    def cluster_time(self) -> Timestamp | None:
        """The latest cluster time (replica-set mode), for ``start_at_operation_time``."""
        return self._history.cluster_time if self.replica_set else None

    def hello(self) -> dict[str, Any]:
        """The reply to ``hello`` (and ``isMaster``): a standalone server, a primary, or a
        secondary while no primary is elected."""
        primary = self.is_primary
        reply: dict[str, Any] = {
            "helloOk": True, "isWritablePrimary": primary, "ismaster": primary,
            "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48_000_000,
            "maxWriteBatchSize": 100_000, "localTime": datetime.now(UTC),
            "logicalSessionTimeoutMinutes": 30, "connectionId": 1,
            "minWireVersion": 0, "maxWireVersion": 21, "readOnly": False,
        }
        if self.replica_set:
            cluster_time = self._history.cluster_time
            reply.update(hosts=[self.HOST], setName=self.set_name, setVersion=1,
                         me=self.HOST, secondary=not primary)
            if primary:
                reply.update(primary=self.HOST, electionId=self._election_id)
            reply.update(
                lastWrite={"opTime": {"ts": cluster_time, "t": self._term}},
                operationTime=cluster_time,
                **{"$clusterTime": {"clusterTime": cluster_time,
                                    "signature": {"hash": b"\0" * 20, "keyId": 0}}},
            )
        reply["ok"] = 1.0
        return reply

    def check_writable(self, retryable: bool = True) -> None:
        """Raise NotWritablePrimary (10107) while no primary is elected; ``retryable``
        writes carry the ``RetryableWriteError`` label, as a server gives them."""
        if not self.is_primary:
            raise not_writable_primary(retryable)

    def check_readable(self) -> None:
        """Raise NotPrimaryNoSecondaryOk (13435) while no primary is elected (reads with
        the primary read preference, change streams included)."""
        if not self.is_primary:
            raise not_primary_no_secondary_ok()

    # --- change streams -----------------------------------------------------------------------

    def open_change_stream(
        self, *, database: str | None = None, collection: str | None = None,
        pipeline: Sequence[Mapping[str, Any]] | None = None, full_document: str | None = None,
        full_document_before_change: str | None = None,
        resume_after: Mapping[str, Any] | None = None,
        start_after: Mapping[str, Any] | None = None,
        start_at_operation_time: Timestamp | None = None, show_expanded_events: bool = False,
    ) -> ServerChangeStream:
        """Open a change stream, as an ``aggregate`` whose first stage is ``$changeStream``.

        Thread-safe; returns at once (the first batch is the stream's first
        :meth:`~ServerChangeStream.next_batch`). ``database`` and ``collection`` name what to
        watch: a collection, a database (``collection=None``) or everything (both ``None``,
        ``allChangesForCluster``). The other arguments are the ``$changeStream`` options and
        the stages after it:

        * ``pipeline``: ``$match`` and ``$project`` (any other stage raises
          :class:`~apsched_mongo.errors.UnsupportedByMemoryBackend`);
        * ``full_document``: ``None``/``"default"`` or ``"updateLookup"``;
          ``full_document_before_change``: ``None``/``"off"`` (no pre- or post-images);
        * at most one of ``resume_after`` and ``start_after`` (a resume token) or
          ``start_at_operation_time`` (a :class:`~bson.timestamp.Timestamp`); without any,
          the stream starts after the latest change.

        Raises as a server would: 40573 on a standalone server, 13435 while no primary is
        elected, 286 if the start point has left the history, 260 for ``resume_after`` an
        ``invalidate``, 9/14/40674/50865 for malformed or conflicting options.
        """
        if not self.replica_set:
            raise no_change_streams()
        self.check_readable()
        stream = ServerChangeStream.open(
            self, self._history, database=database, collection=collection, pipeline=pipeline,
            full_document=full_document,
            full_document_before_change=full_document_before_change,
            resume_after=resume_after, start_after=start_after,
            start_at_operation_time=start_at_operation_time,
            show_expanded_events=show_expanded_events,
        )
        with self._streams_lock:
            self._streams.add(stream)
        return stream

    def _forget_stream(self, stream: ServerChangeStream) -> None:
        with self._streams_lock:
            self._streams.discard(stream)

    def _lookup(self, db: str, coll: str | None, key: Mapping[str, Any] | None
                ) -> dict[str, Any] | None:
        """The current version of a document (``fullDocument: "updateLookup"``)."""
        with self.lock:
            database = self.store._databases.get(db)
            collection = database._collections.get(coll) if database is not None else None
            if not isinstance(collection, MemoryCollectionStore) or key is None:
                return None
            return collection.lookup(key["_id"])

    # --- fault hooks ----------------------------------------------------------------------------

    def _require_replica_set(self, what: str) -> None:
        if not self.replica_set:
            raise ValueError(f"{what}: a standalone MemoryServer has no replica set "
                             "(make it with MemoryServer(replica_set=True))")

    def interrupt_change_streams(self, error: PyMongoError | None = None) -> int:
        """End every open change stream with ``error``, raised by its next (or waiting)
        batch; return how many were open.

        By default the error is the one a server gives an operation interrupted by an
        election: NotPrimaryError, code 11602 ``InterruptedDueToReplStateChange``, label
        ``ResumableChangeStreamError``. PyMongo's change streams -- and the async
        look-alike's -- resume from it once by themselves, after their last resume token:
        the application sees nothing, and misses or repeats no event. To make an
        interruption reach the application, make that automatic resume fail too: use
        :meth:`step_down` with ``election_after=None``, then :meth:`elect`. Pass another
        ``error`` (e.g. ``OperationFailure("not authorized", 13)``) for a non-resumable
        one; its copy is raised.
        """
        self._require_replica_set("interrupt_change_streams")
        with self._streams_lock:
            streams = list(self._streams)
        error = error or interrupted_by_election()
        return sum(stream.kill(error) for stream in streams)

    def drop_change_history(self) -> None:
        """Forget every change so far, as if the oplog had rolled over while every consumer
        was away: open streams fail at their next batch, and resuming from any token or
        operation time from before the call fails, with ``ChangeStreamHistoryLost`` (286).
        Streams opened afterwards without a start point are not affected."""
        self._require_replica_set("drop_change_history")
        self._history.forget()

    def step_down(self, election_after: float | None = 0.5) -> None:
        """Step down, as a primary does before an election; a new primary (this server,
        with a new ``electionId``) is elected ``election_after`` seconds later, or only at
        :meth:`elect` when ``None``. Until then:

        * writes from any client fail with NotWritablePrimary (10107; label
          ``RetryableWriteError`` on retryable writes: single-document writes, inserts);
        * reads through :class:`MemoryMongoClient`, and opening or resuming change streams,
          fail with NotPrimaryNoSecondaryOk (13435);
        * ``hello`` answers as a secondary, with no ``primary``;
        * open change streams end at once with InterruptedDueToReplStateChange (11602,
          ``ResumableChangeStreamError``). Their automatic resume fails while the election
          lasts, so that error reaches the application, as when a driver finds no primary.

        A client here does not wait for the new primary the way PyMongo's server selection
        does: operations fail fast with what the server would answer.
        """
        self._require_replica_set("step_down")
        if election_after is not None and not election_after >= 0:
            raise ValueError(f"election_after must be >= 0 or None, not {election_after!r}")
        with self.lock:
            self._primary_from = (
                math.inf if election_after is None else monotonic() + election_after
            )
            self._term += 1
            self._election_id = ObjectId()
        self.interrupt_change_streams(interrupted_by_election())

    def elect(self) -> None:
        """End the election now: this server is primary again."""
        self._require_replica_set("elect")
        self._primary_from = 0.0
