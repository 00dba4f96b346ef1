"""The async look-alike: PyMongo's async API (``AsyncMongoClient`` and friends) over
mongomock-ng, for the calls apsched-mongo makes and the change streams tests need."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import mongomock_ng
from anyio.lowlevel import checkpoint
from bson import CodecOptions
from pymongo.operations import UpdateMany, UpdateOne

from .._client import CODEC_OPTIONS
from ..errors import UnsupportedByMemoryBackend
from ._changestream import Scope
from ._mongomock import SharedStoreClient
from ._refusals import check_update, refuse_unfaithful
from ._server import MemoryServer
from ._watch import MemoryChangeStream

__all__ = ["MemoryCollection", "MemoryCursor", "MemoryDatabase", "MemoryMongoClient"]

_READS = frozenset({"find_one", "count_documents", "estimated_document_count", "distinct",
                    "index_information"})
#: What a client made with ``tz_aware=True, uuidRepresentation="standard"`` decodes with
_CLIENT_CODEC_OPTIONS: CodecOptions[dict[str, Any]] = CodecOptions(
    tz_aware=True, uuid_representation=CODEC_OPTIONS.uuid_representation
)


class MemoryCursor:
    """Enough of :class:`pymongo.asynchronous.cursor.AsyncCursor`: sort, limit, to_list, iterate."""

    def __init__(self, run: Callable[[], Iterable[dict[str, Any]]], server: MemoryServer):
        self._run = run
        self._server = server
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
        self._server.check_readable()
        with self._server.lock:
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

    def __init__(self, sync: Any, database: MemoryDatabase,
                 codec_options: CodecOptions[Any]) -> None:
        self._sync = sync
        self.database = database
        self.name: str = sync.name
        self.full_name: str = sync.full_name
        self.codec_options = codec_options
        self._server = database.client.server

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        await checkpoint()
        for arg in (*args, *kwargs.values()):
            if not callable(arg):
                refuse_unfaithful(arg, f"{self.name}.{method}")
        kwargs.pop("session", None)
        if method in _READS:
            self._server.check_readable()
        with self._server.lock:
            return getattr(self._sync, method)(*args, **kwargs)

    def with_options(self, codec_options: CodecOptions[Any] | None = None, **kwargs: Any) -> Any:
        return MemoryCollection(
            self._sync.with_options(codec_options=codec_options, **kwargs), self.database,
            codec_options or self.codec_options,
        )

    # --- reads ---------------------------------------------------------------------------
    def find(self, filter: Any = None, *args: Any, **kwargs: Any) -> MemoryCursor:
        refuse_unfaithful(filter, f"{self.name}.find")
        kwargs.pop("session", None)
        return MemoryCursor(lambda: self._sync.find(filter, *args, **kwargs), self._server)

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
        refuse_unfaithful(pipeline, f"{self.name}.aggregate")
        kwargs.pop("session", None)
        await checkpoint()
        self._server.check_readable()
        with self._server.lock:
            documents = list(self._sync.aggregate(pipeline, **kwargs))
        return MemoryCursor(lambda: _ListCursor(documents), self._server)

    async def index_information(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("index_information")
        return result

    # --- writes --------------------------------------------------------------------------
    async def insert_one(self, document: Any, **kwargs: Any) -> Any:
        return await self._call("insert_one", document, **kwargs)

    async def insert_many(self, documents: Any, **kwargs: Any) -> Any:
        return await self._call("insert_many", list(documents), **kwargs)

    async def update_one(self, filter: Any, update: Any, **kwargs: Any) -> Any:
        check_update(update, f"{self.name}.update_one")
        return await self._call("update_one", filter, update, **kwargs)

    async def update_many(self, filter: Any, update: Any, **kwargs: Any) -> Any:
        check_update(update, f"{self.name}.update_many")
        return await self._call("update_many", filter, update, **kwargs)

    async def replace_one(self, filter: Any, replacement: Any, **kwargs: Any) -> Any:
        return await self._call("replace_one", filter, replacement, **kwargs)

    async def find_one_and_update(self, filter: Any, update: Any, **kwargs: Any) -> Any:
        check_update(update, f"{self.name}.find_one_and_update")
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
                check_update(request._doc, f"{self.name}.bulk_write")
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

    async def rename(self, new_name: str, **kwargs: Any) -> None:
        """Rename the collection (``dropTarget=True`` replaces an existing one)."""
        await self._call("rename", new_name, **kwargs)

    async def watch(self, pipeline: list[Any] | None = None, **options: Any
                    ) -> MemoryChangeStream:
        """A change stream on this collection: see :class:`MemoryChangeStream`."""
        return await _watch(self._server, Scope(self.database.name, self.name),
                            self.codec_options, pipeline, options)


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

    def __init__(self, sync: Any, client: MemoryMongoClient,
                 codec_options: CodecOptions[Any]) -> None:
        self._sync = sync
        self.client = client
        self.name: str = sync.name
        self.codec_options = codec_options

    def get_collection(
        self, name: str, codec_options: CodecOptions[Any] | None = None, **kwargs: Any
    ) -> MemoryCollection:
        codec_options = codec_options or self.codec_options
        return MemoryCollection(
            self._sync.get_collection(name, codec_options=codec_options), self, codec_options
        )

    def __getitem__(self, name: str) -> MemoryCollection:
        return self.get_collection(name)

    async def command(self, command: str | Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
        """``hello``/``isMaster``, ``ping`` and ``buildInfo``."""
        await checkpoint()
        name = command if isinstance(command, str) else next(iter(command))
        if name in ("hello", "isMaster", "ismaster"):
            return self.client.server.hello()
        if name == "ping":
            return {"ok": 1.0}
        if name == "buildInfo":
            return {"version": mongomock_ng.SERVER_VERSION, "ok": 1.0}
        raise UnsupportedByMemoryBackend(f"the in-memory back end cannot run command {name!r}")

    async def watch(self, pipeline: list[Any] | None = None, **options: Any
                    ) -> MemoryChangeStream:
        """A change stream on every collection of this database."""
        return await _watch(self.client.server, Scope(self.name, None), self.codec_options,
                            pipeline, options)

    async def list_collection_names(self, **kwargs: Any) -> list[str]:
        await checkpoint()
        self.client.server.check_readable()
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
        self.codec_options = _CLIENT_CODEC_OPTIONS
        self._sync: Any = self.sync_client()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(server={id(self.server):#x})"

    def sync_client(self) -> Any:
        """A synchronous mongomock-ng client on the same data (for APScheduler's built-in
        store, which drives a synchronous PyMongo client). Its writes are recorded as
        change events like this client's; closing it leaves the server's data alone."""
        return SharedStoreClient(
            _store=self.server.store, tz_aware=True, uuidRepresentation="standard"
        )

    def get_database(
        self, name: str, codec_options: CodecOptions[Any] | None = None, **kwargs: Any
    ) -> MemoryDatabase:
        codec_options = codec_options or CODEC_OPTIONS
        return MemoryDatabase(
            self._sync.get_database(name, codec_options=codec_options), self, codec_options
        )

    def __getitem__(self, name: str) -> MemoryDatabase:
        return self.get_database(name)

    @property
    def admin(self) -> MemoryDatabase:
        return self.get_database("admin")

    async def list_database_names(self) -> list[str]:
        await checkpoint()
        self.server.check_readable()
        with self.server.lock:
            names: list[str] = self._sync.list_database_names()
        return names

    async def drop_database(self, name: str) -> None:
        await checkpoint()
        with self.server.lock:
            self._sync.drop_database(name)

    async def watch(self, pipeline: list[Any] | None = None, **options: Any
                    ) -> MemoryChangeStream:
        """A change stream on every database (``allChangesForCluster``)."""
        return await _watch(self.server, Scope(None, None), self.codec_options, pipeline,
                            options)

    async def close(self) -> None:
        pass


async def _watch(server: MemoryServer, scope: Scope, codec_options: CodecOptions[Any],
                 pipeline: list[Any] | None, options: dict[str, Any]) -> MemoryChangeStream:
    """Open a change stream as PyMongo's ``watch()`` does: the ``aggregate`` runs now."""
    stream = MemoryChangeStream(server, scope, codec_options, pipeline, **options)
    await stream._initialize()
    return stream
