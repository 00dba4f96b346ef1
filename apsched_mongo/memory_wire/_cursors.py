"""Server-side cursors: results held between ``find``/``aggregate`` and ``getMore``.

A cursor holds the documents its command produced (computed at once, under the store's
lock) and hands them out in batches: ``batchSize`` documents, 101 in a first batch without
one, and never more than 16 MiB per batch, as mongod does. Idle cursors time out after 10
minutes; at most :data:`MAX_CURSORS` are kept (the oldest idle one goes first).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import bson
from bson import CodecOptions, Int64
from bson.raw_bson import RawBSONDocument

from ._access import Requirement
from ._errors import CommandError

DEFAULT_FIRST_BATCH = 101
MAX_BATCH_BYTES = 16 * 1024 * 1024
IDLE_TIMEOUT = 600.0
MAX_CURSORS = 10_000


@dataclass
class Cursor:
    id: int
    namespace: str
    documents: Iterator[Mapping[str, Any]]
    requirement: Requirement
    last_used: float = field(default_factory=time.monotonic)
    #: a document read from ``documents`` that did not fit in the last batch
    carried: RawBSONDocument | None = None
    #: a change stream's cursor reads from its ServerChangeStream instead
    stream: Any = None


class Cursors:
    """The open cursors of one front."""

    def __init__(self, codec_options: CodecOptions[Any]) -> None:
        self._codec_options = codec_options
        self._cursors: OrderedDict[int, Cursor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._cursors)

    def _encode(self, document: Mapping[str, Any]) -> RawBSONDocument:
        return RawBSONDocument(bson.encode(document, codec_options=self._codec_options))

    def _batch(self, cursor: Cursor, size: int | None) -> list[RawBSONDocument]:
        """Up to ``size`` documents (no limit: None) and at most 16 MiB (at least one)."""
        batch: list[RawBSONDocument] = []
        total = 0
        while size is None or len(batch) < size:
            if cursor.carried is not None:
                document, cursor.carried = cursor.carried, None
            else:
                try:
                    document = self._encode(next(cursor.documents))
                except StopIteration:
                    break
            if batch and total + len(document.raw) > MAX_BATCH_BYTES:
                cursor.carried = document
                break
            batch.append(document)
            total += len(document.raw)
        return batch

    def _exhausted(self, cursor: Cursor) -> bool:
        if cursor.carried is not None:
            return False
        try:
            cursor.carried = self._encode(next(cursor.documents))
        except StopIteration:
            return True
        return False

    def open(self, namespace: str, documents: Iterable[Mapping[str, Any]],
             batch_size: Any, requirement: Requirement, *, single_batch: bool = False
             ) -> dict[str, Any]:
        """The ``cursor`` field of a find/aggregate/list* reply; keeps what is left."""
        size = _batch_size(batch_size, DEFAULT_FIRST_BATCH)
        cursor = Cursor(0, namespace, iter(documents), requirement)
        first = self._batch(cursor, size)
        if not single_batch and not self._exhausted(cursor):
            with self._lock:
                self._expire()
                cursor.id = _new_id(self._cursors)
                self._cursors[cursor.id] = cursor
        return {"firstBatch": first, "id": Int64(cursor.id), "ns": namespace}

    def open_stream(self, stream: Any, namespace: str, events: Sequence[Mapping[str, Any]],
                    token: Mapping[str, Any], requirement: Requirement) -> dict[str, Any]:
        """The ``cursor`` field of a change stream's first reply; keeps the stream open."""
        cursor = Cursor(stream.id, namespace, iter(()), requirement, stream=stream)
        if stream.alive:
            with self._lock:
                self._expire()
                self._cursors[cursor.id] = cursor
        return {"firstBatch": [self._encode(event) for event in events],
                "postBatchResumeToken": token,
                "id": Int64(stream.id if stream.alive else 0), "ns": namespace}

    def is_change_stream(self, cursor_id: Any, namespace: str) -> bool:
        with self._lock:
            cursor = self._cursors.get(cursor_id) if isinstance(cursor_id, int) else None
        return cursor is not None and cursor.stream is not None and \
            cursor.namespace == namespace

    def requirement(self, cursor_id: Any, namespace: str) -> Requirement:
        """What the command that opened a cursor needed (getMore needs it too)."""
        return self._find(cursor_id, namespace).requirement

    def _find(self, cursor_id: Any, namespace: str) -> Cursor:
        if not isinstance(cursor_id, int) or isinstance(cursor_id, bool):
            raise CommandError(14, "Field 'getMore' must be of type long in: getMore")
        with self._lock:
            cursor = self._cursors.get(int(cursor_id))
        if cursor is None:
            raise CommandError(43, f"cursor id {cursor_id} not found")
        if cursor.namespace != namespace:
            raise CommandError(13, f"Requested getMore on namespace '{namespace}', but cursor "
                                   f"belongs to a different namespace {cursor.namespace}")
        return cursor

    def get_more(self, cursor_id: Any, namespace: str, batch_size: Any,
                 max_time_ms: Any = None) -> dict[str, Any]:
        """The ``cursor`` field of a getMore reply."""
        cursor = self._find(cursor_id, namespace)
        if cursor.stream is not None:
            return self._stream_batch(cursor, batch_size, max_time_ms)
        batch = self._batch(cursor, _batch_size(batch_size, None))
        cursor.last_used = time.monotonic()
        if self._exhausted(cursor):
            with self._lock:
                self._cursors.pop(cursor.id, None)
            cursor.id = 0
        else:
            with self._lock:
                self._cursors.move_to_end(cursor.id)
        return {"nextBatch": batch, "id": Int64(cursor.id), "ns": namespace}

    def _stream_batch(self, cursor: Cursor, batch_size: Any, max_time_ms: Any
                      ) -> dict[str, Any]:
        """A change stream's next batch, waiting up to ``maxTimeMS`` (1 s by default) for it;
        never under the store's lock."""
        from ._changestreams import stream_errors

        wait = 1.0 if max_time_ms is None else max(0.0, float(max_time_ms) / 1000)
        size = _batch_size(batch_size, None) or None
        try:
            events, token = cursor.stream.next_batch(wait, size)
        except Exception as exc:
            self._forget(cursor)
            raise stream_errors(exc) from None
        cursor.last_used = time.monotonic()
        if not cursor.stream.alive:
            self._forget(cursor)
        return {"nextBatch": [self._encode(event) for event in events],
                "postBatchResumeToken": token,
                "id": Int64(cursor.id if cursor.stream.alive else 0), "ns": cursor.namespace}

    def _forget(self, cursor: Cursor) -> None:
        with self._lock:
            self._cursors.pop(cursor.id, None)

    def kill(self, namespace: str, cursor_ids: Any) -> dict[str, Any]:
        """A killCursors reply."""
        if not isinstance(cursor_ids, list):
            raise CommandError(14, "Field 'cursors' must be an array in: killCursors")
        killed, not_found = [], []
        with self._lock:
            for cursor_id in cursor_ids:
                cursor = self._cursors.get(int(cursor_id))
                if cursor is not None and cursor.namespace == namespace:
                    del self._cursors[int(cursor_id)]
                    if cursor.stream is not None:
                        cursor.stream.close()
                    killed.append(Int64(cursor_id))
                else:
                    not_found.append(Int64(cursor_id))
        return {"cursorsKilled": killed, "cursorsNotFound": not_found, "cursorsAlive": [],
                "cursorsUnknown": [], "ok": 1.0}

    def _expire(self) -> None:
        """Drop cursors idle for too long, and the oldest beyond MAX_CURSORS (lock held)."""
        now = time.monotonic()
        for cursor_id in [cid for cid, c in self._cursors.items()
                          if now - c.last_used > IDLE_TIMEOUT]:
            self._drop_locked(cursor_id)
        while len(self._cursors) >= MAX_CURSORS:
            self._drop_locked(next(iter(self._cursors)))

    def _drop_locked(self, cursor_id: int) -> None:
        cursor = self._cursors.pop(cursor_id)
        if cursor.stream is not None:
            cursor.stream.close()


def _batch_size(value: Any, default: int | None) -> int | None:
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise CommandError(2, f"batchSize must be a non-negative number, not {value!r}")
    return int(value)


def _new_id(taken: Mapping[int, Any]) -> int:
    while True:
        cursor_id = secrets.randbits(62) + 1
        if cursor_id not in taken:
            return cursor_id
