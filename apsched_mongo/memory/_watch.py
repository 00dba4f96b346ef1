"""MemoryChangeStream: PyMongo's ``AsyncChangeStream`` over a :class:`ServerChangeStream`."""

from __future__ import annotations

import copy
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

import bson
from anyio.lowlevel import checkpoint
from bson import CodecOptions, Timestamp, UuidRepresentation
from pymongo.errors import ConnectionFailure, CursorNotFound, InvalidOperation, PyMongoError

from ..errors import UnsupportedByMemoryBackend
from ._changestream import Scope, ServerChangeStream

if TYPE_CHECKING:
    from ._server import MemoryServer

#: How the fake stores values: dates naive UTC, UUIDs as ``uuid.UUID``
_STORED: CodecOptions[dict[str, Any]] = CodecOptions(
    uuid_representation=UuidRepresentation.STANDARD
)
_FIRST_BATCH_SIZE = 101  # an aggregate's default
_DEFAULT_AWAIT_MS = 1000  # a server's wait for a getMore on a change stream


def _resumable(exc: PyMongoError) -> bool:
    """PyMongo's rule for errors it resumes from once by itself."""
    if isinstance(exc, ConnectionFailure | CursorNotFound):
        return True
    return exc.has_error_label("ResumableChangeStreamError")


def _non_negative(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}")
    if value is not None and value < 0:
        raise ValueError(f"{name} must be greater than or equal to 0, not {value}")


class _Cursor:
    """The command cursor under a change stream: a batch buffer over the server stream."""

    def __init__(self, stream: ServerChangeStream, batch: list[dict[str, Any]],
                 codec_options: CodecOptions[Any], await_seconds: float,
                 batch_size: int | None) -> None:
        self._stream = stream
        self._data = deque(batch)
        self._codec_options = codec_options
        self._await_seconds = await_seconds
        self._batch_size = batch_size or None  # 0: no limit for a getMore
        self._killed = not stream.alive
        self.post_batch_resume_token: Mapping[str, Any] = stream.post_batch_resume_token

    @property
    def alive(self) -> bool:
        return bool(self._data) or not self._killed

    def has_next(self) -> bool:
        return bool(self._data)

    async def try_next(self, get_more_allowed: bool) -> dict[str, Any] | None:
        if not self._data and not self._killed and get_more_allowed:
            try:
                batch, token = await self._stream.next_batch_async(
                    self._await_seconds, self._batch_size)
            except PyMongoError:
                self._killed = True  # the server ends a stream on any error
                raise
            self._data.extend(batch)
            self.post_batch_resume_token = token
            self._killed = not self._stream.alive
        if not self._data:
            return None
        # Through BSON, as a driver receives it: the collection's codec options apply
        raw = bson.encode(self._data.popleft(), codec_options=_STORED)
        change: dict[str, Any] = bson.decode(raw, codec_options=self._codec_options)
        return change

    def close(self) -> None:
        self._killed = True
        self._stream.close()


class MemoryChangeStream:
    """A change stream of the in-memory back end, with the interface and behaviour of
    PyMongo's :class:`~pymongo.asynchronous.change_stream.AsyncChangeStream`.

    Made by ``watch()`` on a :class:`MemoryCollection`, :class:`MemoryDatabase` or
    :class:`MemoryMongoClient` of a replica-set :class:`MemoryServer` (standalone: error
    40573), with ``watch()``'s arguments. As with PyMongo, ``watch()`` opens it at once;
    :meth:`try_next` runs at most one ``getMore`` (waiting up to ``max_await_time_ms``,
    1 s by default) and returns ``None`` if no change came; :attr:`resume_token` follows
    each change and, on an empty batch, the ``postBatchResumeToken``; after a resumable
    error (see :meth:`MemoryServer.interrupt_change_streams`) the stream resumes once by
    itself after its resume token, and raises if that fails too. ``collation`` and
    pre-/post-images are refused with
    :class:`~apsched_mongo.errors.UnsupportedByMemoryBackend`; ``session`` and ``comment``
    are ignored.
    """

    def __init__(self, server: MemoryServer, scope: Scope, codec_options: CodecOptions[Any],
                 pipeline: list[Any] | None = None, *, full_document: str | None = None,
                 resume_after: Mapping[str, Any] | None = None,
                 max_await_time_ms: int | None = None, batch_size: int | None = None,
                 collation: Any = None, start_at_operation_time: Timestamp | None = None,
                 session: Any = None, start_after: Mapping[str, Any] | None = None,
                 comment: Any = None, full_document_before_change: str | None = None,
                 show_expanded_events: bool | None = None) -> None:
        if pipeline is None:
            pipeline = []
        if not isinstance(pipeline, list):
            raise TypeError(f"pipeline must be a list, not {type(pipeline).__name__}")
        if full_document is not None and not isinstance(full_document, str):
            raise TypeError(f"full_document must be a string, not {type(full_document).__name__}")
        if collation is not None:
            raise UnsupportedByMemoryBackend("collation: mongomock-ng does not apply collations")
        _non_negative("batch_size", batch_size)
        _non_negative("max_await_time_ms", max_await_time_ms)
        self._server = server
        self._scope = scope
        self._codec_options = codec_options
        self._pipeline = copy.deepcopy(pipeline)
        self._full_document = full_document
        self._full_document_before_change = full_document_before_change
        self._show_expanded_events = bool(show_expanded_events)
        self._uses_start_after = start_after is not None
        self._uses_resume_after = resume_after is not None
        self._resume_token: Mapping[str, Any] | None = copy.deepcopy(start_after or resume_after)
        self._start_at_operation_time = start_at_operation_time
        self._await_seconds = (
            _DEFAULT_AWAIT_MS if max_await_time_ms is None else max_await_time_ms) / 1000
        self._batch_size = batch_size
        self._closed = False
        self._cursor: _Cursor | None = None

    async def _initialize(self) -> None:
        self._cursor = await self._create_cursor()

    async def _create_cursor(self) -> _Cursor:
        """The ``aggregate``: open the stream where the resume token (or time) says."""
        await checkpoint()
        start: dict[str, Any] = {}
        if self._resume_token is not None:
            start["start_after" if self._uses_start_after else "resume_after"] = (
                self._resume_token)
        elif self._start_at_operation_time is not None:
            start["start_at_operation_time"] = self._start_at_operation_time
        stream = self._server.open_change_stream(
            database=self._scope.database, collection=self._scope.collection,
            pipeline=self._pipeline, full_document=self._full_document,
            full_document_before_change=self._full_document_before_change,
            show_expanded_events=self._show_expanded_events, **start,
        )
        size = _FIRST_BATCH_SIZE if self._batch_size is None else self._batch_size
        batch, token = stream.next_batch(0, size)
        if not batch:
            self._resume_token = token
        return _Cursor(stream, batch, self._codec_options, self._await_seconds,
                       self._batch_size)

    async def _resume(self) -> None:
        """Reopen after a resumable error, after the last resume token."""
        assert self._cursor is not None
        self._cursor.close()
        self._cursor = await self._create_cursor()

    @property
    def resume_token(self) -> Mapping[str, Any] | None:
        """The token to resume after the most recent change (or empty batch)."""
        return copy.deepcopy(self._resume_token)

    @property
    def alive(self) -> bool:
        """``False`` once closed or ended by an ``invalidate``."""
        return not self._closed

    async def close(self) -> None:
        self._closed = True
        if self._cursor is not None:
            self._cursor.close()

    async def try_next(self) -> dict[str, Any] | None:
        """The next change, or ``None`` if none came during one ``getMore``."""
        assert self._cursor is not None
        if not self._closed and not self._cursor.alive:
            await self._resume()
        try:
            try:
                change = await self._cursor.try_next(True)
            except PyMongoError as exc:
                if not _resumable(exc):
                    raise
                await self._resume()
                change = await self._cursor.try_next(False)
        except PyMongoError as exc:
            if not _resumable(exc) and not exc.timeout:
                await self.close()
            raise
        except BaseException:
            await self.close()
            raise

        if not self._cursor.alive:
            self._closed = True  # ended by an invalidate
        if change is None:
            self._resume_token = self._cursor.post_batch_resume_token
            self._start_at_operation_time = None
            return None
        try:
            resume_token = change["_id"]
        except KeyError:
            await self.close()
            raise InvalidOperation(
                "Cannot provide resume functionality when the resume token is missing."
            ) from None
        if not self._cursor.has_next():
            resume_token = self._cursor.post_batch_resume_token
        self._uses_start_after, self._uses_resume_after = False, True
        self._resume_token = resume_token
        self._start_at_operation_time = None
        return change

    async def next(self) -> dict[str, Any]:
        """The next change, waiting as long as it takes."""
        while self.alive:
            change = await self.try_next()
            if change is not None:
                return change
        raise StopAsyncIteration

    __anext__ = next

    def __aiter__(self) -> MemoryChangeStream:
        return self

    async def __aenter__(self) -> MemoryChangeStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc_val: BaseException | None, exc_tb: TracebackType | None) -> None:
        await self.close()
