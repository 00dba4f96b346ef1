"""An in-process MongoDB for the demo and for tests: PyMongo's async API over mongomock-ng.

mongomock-ng is synchronous and silently ignores some things a real server does; this
wrapper makes it look like :class:`pymongo.AsyncMongoClient` for the calls apsched-mongo
makes, and refuses -- loudly -- what the fake would get wrong:

* pipeline-style updates (``[{"$set": ...}]``) and ``$$NOW``/``$$CLUSTER_TIME`` raise
  :class:`~apsched_mongo.errors.UnsupportedByMemoryBackend` (the fake would ignore them);
* change streams raise the same :class:`~pymongo.errors.OperationFailure` (code 40573) as a
  standalone server, so code that falls back to polling there does so here too;
* ``hello`` answers like a standalone server, with the local clock as ``localTime``;
* a document outside a partial unique index's filter is not checked against it, as in
  MongoDB (mongomock-ng scans the collection for it on every write).

Every operation yields to the event loop first, as a network round trip would, so tasks
racing for the same documents interleave. Clients made from one :class:`MemoryServer` share
its data, like several processes connected to one server.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

try:
    import mongomock_ng
    import mongomock_ng.collection
    from mongomock_ng.filtering import filter_applies
    from mongomock_ng.store import ServerStore
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the in-memory back end needs mongomock-ng: pip install 'apsched-mongo[memory]'"
    ) from exc

from anyio.lowlevel import checkpoint
from bson import CodecOptions
from pymongo.errors import OperationFailure
from pymongo.operations import UpdateMany, UpdateOne

from ._client import CODEC_OPTIONS
from .errors import UnsupportedByMemoryBackend

__all__ = ["MemoryCollection", "MemoryDatabase", "MemoryMongoClient", "MemoryServer"]

_ensure_uniques = mongomock_ng.collection.Collection._ensure_uniques


def _ensure_uniques_of_indexed(self: Any, new_data: Any) -> None:
    """A document outside every unique index's partialFilterExpression is in none of them,
    so MongoDB checks it against nothing. mongomock-ng checks it anyway, scanning the whole
    collection per write (and can report a false duplicate)."""
    for index in self._store.indexes.values():
        partial = index.get("partialFilterExpression")
        if index.get("unique") and (
            partial is None or filter_applies(partial, new_data)  # type: ignore[no-untyped-call]
        ):
            _ensure_uniques(self, new_data)  # type: ignore[no-untyped-call]
            return


mongomock_ng.collection.Collection._ensure_uniques = _ensure_uniques_of_indexed  # type: ignore[method-assign]

T = TypeVar("T")
_SERVER_VARIABLES = ("$$NOW", "$$CLUSTER_TIME")


class MemoryServer:
    """The shared state of one fake server."""

    def __init__(self) -> None:
        self.store = ServerStore()  # type: ignore[no-untyped-call]
        self.lock = threading.RLock()


def _refuse_unfaithful(value: Any, where: str) -> None:
    """Raise if ``value`` holds something mongomock-ng would silently get wrong."""
    if isinstance(value, str):
        if value.startswith(_SERVER_VARIABLES):
            raise UnsupportedByMemoryBackend(
                f"{where}: the in-memory back end cannot evaluate {value!r}"
            )
    elif isinstance(value, Mapping):
        for item in value.values():
            _refuse_unfaithful(item, where)
    elif isinstance(value, list | tuple):
        for item in value:
            _refuse_unfaithful(item, where)


def _check_update(update: Any, where: str) -> None:
    if isinstance(update, list):
        raise UnsupportedByMemoryBackend(
            f"{where}: pipeline-style updates are silently ignored by mongomock-ng, so the "
            "in-memory back end refuses them"
        )
    _refuse_unfaithful(update, where)


class MemoryCursor:
    """Enough of :class:`pymongo.asynchronous.cursor.AsyncCursor`: sort, limit, to_list, iterate."""

    def __init__(self, run: Callable[[], Iterable[dict[str, Any]]], lock: threading.RLock):
        self._run = run
        self._lock = lock
        self._sort: Any = None
        self._limit = 0

    def sort(self, key: Any, direction: int | None = None) -> MemoryCursor:
        self._sort = [(key, direction or 1)] if isinstance(key, str) else key
        return self

    def limit(self, limit: int) -> MemoryCursor:
        self._limit = limit
        return self

    async def to_list(self, length: int | None = None) -> list[dict[str, Any]]:
        await checkpoint()
        with self._lock:
            cursor: Any = self._run()
            if self._sort:
                cursor = cursor.sort(self._sort)
            if self._limit:
                cursor = cursor.limit(self._limit)
            documents = list(cursor)
        return documents[:length] if length else documents

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        for document in await self.to_list():
            yield document

    async def close(self) -> None:
        pass


class MemoryCollection:
    """The subset of :class:`pymongo.asynchronous.collection.AsyncCollection` we rely on."""

    def __init__(self, sync: Any, database: MemoryDatabase) -> None:
        self._sync = sync
        self.database = database
        self.name: str = sync.name
        self.full_name: str = sync.full_name
        self._lock = database.client.server.lock

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        await checkpoint()
        for arg in (*args, *kwargs.values()):
            if not callable(arg):
                _refuse_unfaithful(arg, f"{self.name}.{method}")
        kwargs.pop("session", None)
        with self._lock:
            return getattr(self._sync, method)(*args, **kwargs)

    def with_options(self, codec_options: CodecOptions[Any] | None = None, **kwargs: Any) -> Any:
        return MemoryCollection(
            self._sync.with_options(codec_options=codec_options, **kwargs), self.database
        )

    # --- reads ---------------------------------------------------------------------------
    def find(self, filter: Any = None, *args: Any, **kwargs: Any) -> MemoryCursor:
        _refuse_unfaithful(filter, f"{self.name}.find")
        kwargs.pop("session", None)
        return MemoryCursor(lambda: self._sync.find(filter, *args, **kwargs), self._lock)

    async def find_one(self, filter: Any = None, *args: Any, **kwargs: Any) -> Any:
        return await self._call("find_one", filter, *args, **kwargs)

    async def count_documents(self, filter: Any, **kwargs: Any) -> int:
        result: int = await self._call("count_documents", filter, **kwargs)
        return result

    async def estimated_document_count(self, **kwargs: Any) -> int:
        result: int = await self._call("estimated_document_count", **kwargs)
        return result

    async def distinct(self, key: str, filter: Any = None, **kwargs: Any) -> list[Any]:
        result: list[Any] = await self._call("distinct", key, filter, **kwargs)
        return result

    async def aggregate(self, pipeline: list[Any], **kwargs: Any) -> MemoryCursor:
        _refuse_unfaithful(pipeline, f"{self.name}.aggregate")
        kwargs.pop("session", None)
        await checkpoint()
        with self._lock:
            documents = list(self._sync.aggregate(pipeline, **kwargs))
        return MemoryCursor(lambda: _ListCursor(documents), self._lock)

    async def index_information(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("index_information")
        return result

    # --- writes --------------------------------------------------------------------------
    async def insert_one(self, document: Any, **kwargs: Any) -> Any:
        return await self._call("insert_one", document, **kwargs)

    async def insert_many(self, documents: Any, **kwargs: Any) -> Any:
        return await self._call("insert_many", list(documents), **kwargs)

    async def update_one(self, filter: Any, update: Any, **kwargs: Any) -> Any:
        _check_update(update, f"{self.name}.update_one")
        return await self._call("update_one", filter, update, **kwargs)

    async def update_many(self, filter: Any, update: Any, **kwargs: Any) -> Any:
        _check_update(update, f"{self.name}.update_many")
        return await self._call("update_many", filter, update, **kwargs)

    async def replace_one(self, filter: Any, replacement: Any, **kwargs: Any) -> Any:
        return await self._call("replace_one", filter, replacement, **kwargs)

    async def find_one_and_update(self, filter: Any, update: Any, **kwargs: Any) -> Any:
        _check_update(update, f"{self.name}.find_one_and_update")
        return await self._call("find_one_and_update", filter, update, **kwargs)

    async def find_one_and_replace(self, filter: Any, replacement: Any, **kwargs: Any) -> Any:
        return await self._call("find_one_and_replace", filter, replacement, **kwargs)

    async def find_one_and_delete(self, filter: Any, **kwargs: Any) -> Any:
        return await self._call("find_one_and_delete", filter, **kwargs)

    async def delete_one(self, filter: Any, **kwargs: Any) -> Any:
        return await self._call("delete_one", filter, **kwargs)

    async def delete_many(self, filter: Any, **kwargs: Any) -> Any:
        return await self._call("delete_many", filter, **kwargs)

    async def bulk_write(self, requests: list[Any], **kwargs: Any) -> Any:
        for request in requests:
            if isinstance(request, UpdateOne | UpdateMany):
                _check_update(request._doc, f"{self.name}.bulk_write")
        return await self._call("bulk_write", list(requests), **kwargs)

    async def create_indexes(self, indexes: list[Any], **kwargs: Any) -> list[str]:
        result: list[str] = await self._call("create_indexes", indexes, **kwargs)
        return result

    async def create_index(self, keys: Any, **kwargs: Any) -> str:
        result: str = await self._call("create_index", keys, **kwargs)
        return result

    async def drop_index(self, name: str, **kwargs: Any) -> None:
        await self._call("drop_index", name, **kwargs)

    async def drop(self, **kwargs: Any) -> None:
        await self._call("drop", **kwargs)

    async def watch(self, *args: Any, **kwargs: Any) -> Any:
        await checkpoint()
        raise OperationFailure(
            "The $changeStream stage is only supported on replica sets", code=40573
        )


class _ListCursor:
    def __init__(self, documents: list[dict[str, Any]]) -> None:
        self._documents = documents

    def sort(self, spec: Any) -> _ListCursor:
        raise UnsupportedByMemoryBackend("sort an aggregation with a $sort stage instead")

    def limit(self, n: int) -> _ListCursor:
        return _ListCursor(self._documents[:n])

    def __iter__(self) -> Any:
        return iter(self._documents)


class MemoryDatabase:
    """The subset of :class:`pymongo.asynchronous.database.AsyncDatabase` we rely on."""

    def __init__(self, sync: Any, client: MemoryMongoClient) -> None:
        self._sync = sync
        self.client = client
        self.name: str = sync.name

    def get_collection(
        self, name: str, codec_options: CodecOptions[Any] | None = None, **kwargs: Any
    ) -> MemoryCollection:
        return MemoryCollection(
            self._sync.get_collection(name, codec_options=codec_options or CODEC_OPTIONS),
            self,
        )

    def __getitem__(self, name: str) -> MemoryCollection:
        return self.get_collection(name)

    async def command(self, command: str | Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        """``hello``/``isMaster``/``ping``/``buildInfo``, answered as a standalone server."""
        await checkpoint()
        name = command if isinstance(command, str) else next(iter(command))
        if name in ("hello", "isMaster", "ismaster"):
            return {
                "isWritablePrimary": True,
                "ismaster": True,
                "localTime": datetime.now(UTC),
                "maxWireVersion": 21,
                "ok": 1.0,
            }
        if name == "ping":
            return {"ok": 1.0}
        if name == "buildInfo":
            return {"version": mongomock_ng.SERVER_VERSION, "ok": 1.0}
        raise UnsupportedByMemoryBackend(f"the in-memory back end cannot run command {name!r}")

    async def list_collection_names(self, **kwargs: Any) -> list[str]:
        await checkpoint()
        with self.client.server.lock:
            names: list[str] = self._sync.list_collection_names()
        return names

    async def drop_collection(self, name: str, **kwargs: Any) -> None:
        await checkpoint()
        with self.client.server.lock:
            self._sync.drop_collection(name)


class MemoryMongoClient:
    """A stand-in for :class:`pymongo.AsyncMongoClient` backed by an in-process fake.

    :param server: share data with other clients made from the same server; a new, empty
        one by default
    """

    description = "memory"

    def __init__(self, server: MemoryServer | None = None) -> None:
        self.server = server or MemoryServer()
        self._sync: Any = mongomock_ng.MongoClient(
            _store=self.server.store, tz_aware=True, uuidRepresentation="standard"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(server={id(self.server):#x})"

    def sync_client(self) -> Any:
        """A synchronous mongomock-ng client on the same data (for APScheduler's built-in
        store, which drives a synchronous PyMongo client)."""
        return mongomock_ng.MongoClient(
            _store=self.server.store, tz_aware=True, uuidRepresentation="standard"
        )

    def get_database(
        self, name: str, codec_options: CodecOptions[Any] | None = None, **kwargs: Any
    ) -> MemoryDatabase:
        return MemoryDatabase(
            self._sync.get_database(name, codec_options=codec_options or CODEC_OPTIONS), self
        )

    def __getitem__(self, name: str) -> MemoryDatabase:
        return self.get_database(name)

    @property
    def admin(self) -> MemoryDatabase:
        return self.get_database("admin")

    async def list_database_names(self) -> list[str]:
        await checkpoint()
        with self.server.lock:
            names: list[str] = self._sync.list_database_names()
        return names

    async def drop_database(self, name: str) -> None:
        await checkpoint()
        with self.server.lock:
            self._sync.drop_database(name)

    async def close(self) -> None:
        pass
