"""The change history of a replica-set :class:`MemoryServer` (its oplog), and how writes get
into it.

Writes are recorded where mongomock-ng stores documents, not in the async look-alike, so
every mongomock-ng client on the server's store produces change events: the look-alike,
:meth:`MemoryMongoClient.sync_client` (APScheduler's built-in store) and a wire front.

Each write *operation* (an insert, an update of one or many documents, a delete, a drop,
...) runs under the server's lock. The collection stores note which documents it touched;
when it ends, each touched document's state is compared with a private copy of its last
recorded state (the *shadow*), and the net difference becomes one change per document, in
the order they were first touched. So a write that mongomock-ng rolls back (an insert
failing a unique index) records nothing, and an update that changes nothing records
nothing, as in MongoDB. Drops, renames and database drops are recorded as such.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bson import Timestamp
from mongomock_ng.store import CollectionStore, DatabaseStore, ServerStore

from ..errors import UnsupportedByMemoryBackend
from ._tokens import Position, next_after
from ._untyped import clone_document, hashdict, stored_dates, utcnow
from ._update_description import describe_update

#: Called for each batch of new changes, or with ``None`` when the history was dropped
Notify = Callable[[list["Change"] | None], None]


@dataclass(frozen=True, slots=True)
class Change:
    """One committed change: what a change event is made from. Never mutated."""

    ts: Timestamp
    wall_time: datetime  # naive UTC, millisecond precision, as mongomock-ng stores dates
    operation: str  # insert, update, replace, delete, drop, rename or dropDatabase
    db: str
    coll: str | None = None
    document_key: dict[str, Any] | None = None
    full_document: dict[str, Any] | None = None  # insert and replace
    update_description: dict[str, Any] | None = None
    to: tuple[str, str] | None = None  # rename

    @property
    def position(self) -> Position:
        return Position.event(self.ts)


class ChangeHistory:
    """The last ``size`` committed changes in commit order; older ones are forgotten, as an
    oplog rolls over. Methods whose names say *locked* expect the caller to hold ``lock``.
    """

    def __init__(self, size: int) -> None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"history_size must be a positive integer, not {size!r}")
        self.lock = threading.Lock()
        self._size = size
        self._changes: deque[Change] = deque()
        self._last = Timestamp(int(time.time()), 0)
        #: Every change from this cluster time on is still here
        self.start = self._last
        self._watchers: dict[object, Notify] = {}

    @property
    def cluster_time(self) -> Timestamp:
        """The latest cluster time handed out."""
        return self._last

    def _tick(self) -> Timestamp:
        now = int(time.time())
        last = self._last
        self._last = Timestamp(now, 1) if now > last.time else next_after(last)
        return self._last

    def append(self, records: list[dict[str, Any]]) -> None:
        """Commit ``records`` (``Change`` fields but the times) in order, and wake watchers."""
        wall_time = stored_dates(utcnow())
        with self.lock:
            changes = [Change(self._tick(), wall_time, **record) for record in records]
            self._changes.extend(changes)
            while len(self._changes) > self._size:
                self.start = next_after(self._changes.popleft().ts)
            for notify in list(self._watchers.values()):
                notify(changes)

    def forget(self) -> None:
        """Drop every change so far; positions before this moment are lost."""
        with self.lock:
            self._changes.clear()
            self.start = next_after(self._tick())
            for notify in list(self._watchers.values()):
                notify(None)

    def after_locked(self, position: Position) -> list[Change]:
        """The changes after ``position``, oldest first."""
        newer: list[Change] = []
        for change in reversed(self._changes):
            if change.position <= position:
                break
            newer.append(change)
        newer.reverse()
        return newer

    def find_locked(self, ts: Timestamp) -> Change | None:
        for change in reversed(self._changes):
            if change.ts == ts:
                return change
            if change.ts < ts:
                break
        return None

    def watch_locked(self, key: object, notify: Notify) -> None:
        self._watchers[key] = notify

    def unwatch(self, key: object) -> None:
        with self.lock:
            self._watchers.pop(key, None)


# --- recording ------------------------------------------------------------------------------

class _Operation(threading.local):
    """The write operation running in this thread, if any."""

    depth = 0
    kind = ""
    update: Mapping[str, Any] | None = None
    database: str | None = None

    def begin(self, kind: str, update: Mapping[str, Any] | None, database: str | None) -> None:
        self.kind, self.update, self.database = kind, update, database
        self.touched: list[tuple[str, Any, Any]] = []
        self.seen: set[tuple[int, Any]] = set()


class Recorder:
    """Turns the document writes of each operation into changes when the operation ends.

    :param check_writable: raises if writes are refused now (a primary stepping down)
    """

    def __init__(self, history: ChangeHistory, lock: threading.RLock,
                 check_writable: Callable[[bool], None]) -> None:
        self.history = history
        self.lock = lock
        self._check_writable = check_writable
        self._current = _Operation()

    @contextmanager
    def operation(self, kind: str, *, update: Mapping[str, Any] | None = None,
                  retryable: bool = True, database: str | None = None) -> Iterator[None]:
        """One write operation; ``kind`` ``"replace"`` makes its modifications replace
        events, ``"update"`` update events described from ``update``."""
        with self.lock:
            current = self._current
            if current.depth == 0:
                self._check_writable(retryable)
                current.begin(kind, update, database)
            current.depth += 1
            try:
                yield
            finally:
                current.depth -= 1
                if current.depth == 0:
                    self._commit(current)

    def note(self, item: tuple[str, Any, Any]) -> None:
        """Note a drop or rename (or a document, via :meth:`touched`)."""
        with self.lock:
            current = self._current
            if current.depth:
                current.touched.append(item)
            else:  # outside any operation: a TTL deletion during a read
                current.begin("", None, None)
                current.touched.append(item)
                self._commit(current)

    def touched(self, store: MemoryCollectionStore, key: Any) -> None:
        current = self._current
        if current.depth and (id(store), key) in current.seen:
            return
        if current.depth:
            current.seen.add((id(store), key))
        self.note(("document", store, key))

    def _commit(self, operation: _Operation) -> None:
        records: list[dict[str, Any]] = []
        for what, store, detail in operation.touched:
            if what == "document":
                record = store.record_change(detail, operation.kind, operation.update)
                if record:
                    records.append(record)
            elif what == "drop":
                if operation.kind != "rename":  # a rename's dropTarget is part of the rename
                    records.append({"operation": "drop", "db": store.database.name,
                                    "coll": detail})
            elif what == "rename":
                old, new = detail
                records.append({"operation": "rename", "db": store.name, "coll": old,
                                "to": (store.name, new)})
        if operation.kind == "dropDatabase" and records:
            records.append({"operation": "dropDatabase", "db": operation.database})
        operation.touched, operation.seen = [], set()
        if records:
            self.history.append(records)


class MemoryServerStore(ServerStore):
    """mongomock-ng's server store, marked as a :class:`MemoryServer`'s. With a recorder
    (replica-set mode) its collections record their changes."""

    def __init__(self, recorder: Recorder | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.recorder = recorder

    def __getitem__(self, db_name: str) -> MemoryDatabaseStore:
        database: MemoryDatabaseStore | None = self._databases.get(db_name)
        if database is None:
            database = self._databases[db_name] = MemoryDatabaseStore(db_name, self.recorder)
        return database


class MemoryDatabaseStore(DatabaseStore):
    def __init__(self, name: str, recorder: Recorder | None) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.name = name
        self.recorder = recorder

    def __getitem__(self, col_name: str) -> MemoryCollectionStore:
        collection: MemoryCollectionStore | None = self._collections.get(col_name)
        if collection is None:
            collection = self._collections[col_name] = MemoryCollectionStore(col_name, self)
        return collection

    def rename(self, name: str, new_name: str) -> None:
        collection = self._collections.pop(name, None) or MemoryCollectionStore(name, self)
        collection.name = new_name
        self._collections[new_name] = collection
        if self.recorder:
            self.recorder.note(("rename", self, (name, new_name)))


class MemoryCollectionStore(CollectionStore):
    """A collection that exists until dropped, as in MongoDB (mongomock-ng forgets one
    whose documents were all deleted). When recording, it notes each document written and
    keeps the last recorded state of each (the shadow)."""

    def __init__(self, name: str, database: MemoryDatabaseStore) -> None:
        super().__init__(name)  # type: ignore[no-untyped-call]
        self.database = database
        self._recorder = database.recorder
        self._shadow: dict[Any, dict[str, Any]] = {}
        self._exists = False

    @property
    def is_created(self) -> bool:
        return self._exists or bool(self._documents or self.indexes or self._is_force_created)

    def create(self, **options: Any) -> None:
        super().create(**options)  # type: ignore[no-untyped-call]
        self._exists = True

    def create_index(self, index_name: str, index_dict: Any) -> None:
        super().create_index(index_name, index_dict)  # type: ignore[no-untyped-call]
        self._exists = True

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)  # type: ignore[no-untyped-call]
        self._exists = True
        if self._recorder:
            self._recorder.touched(self, key)

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)  # type: ignore[no-untyped-call]
        if self._recorder:
            self._recorder.touched(self, key)

    def drop(self) -> None:
        existed = self.is_created
        super().drop()  # type: ignore[no-untyped-call]
        self._exists = False
        self._shadow.clear()
        if existed and self._recorder:
            self._recorder.note(("drop", self, self.name))

    def begin_transaction(self) -> None:
        if self._recorder:
            raise UnsupportedByMemoryBackend(
                "the in-memory back end does not run multi-document transactions in "
                "replica-set mode (mongomock-ng neither isolates them nor records their "
                "changes at commit)"
            )
        super().begin_transaction()  # type: ignore[no-untyped-call]

    def lookup(self, key: Any) -> dict[str, Any] | None:
        """A copy of the stored document with ``_id`` ``key`` (for ``updateLookup``)."""
        document = self._documents.get(_hashable(key))
        copied: dict[str, Any] | None = None if document is None else clone_document(document)
        return copied

    def record_change(self, key: Any, kind: str,
                      update: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """The change that moved document ``key`` from its shadow to its stored state."""
        before = self._shadow.get(key)
        stored = self._documents.get(key)
        if stored is None:
            if before is None:
                return None
            del self._shadow[key]
            return {"operation": "delete", "db": self.database.name, "coll": self.name,
                    "document_key": {"_id": before["_id"]}}
        if before is not None and stored == before:
            return None
        after: dict[str, Any] = clone_document(stored)
        self._shadow[key] = after
        record: dict[str, Any] = {"db": self.database.name, "coll": self.name,
                                  "document_key": {"_id": after["_id"]}}
        if before is None:
            return {**record, "operation": "insert", "full_document": after}
        if kind == "replace":
            return {**record, "operation": "replace", "full_document": after}
        return {**record, "operation": "update",
                "update_description": describe_update(before, after,
                                                      update if kind == "update" else None)}


def _hashable(key: Any) -> Any:
    return hashdict(key) if isinstance(key, dict) else key
