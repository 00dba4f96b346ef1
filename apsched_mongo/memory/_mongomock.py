"""Patches to mongomock-ng's classes: a MongoDB behaviour it gets wrong, and the hooks that
let a :class:`MemoryServer` record changes, refuse writes while no primary is elected and
refuse what it cannot do faithfully.

The patches apply to every mongomock-ng client, but the hooks act only on a
:class:`MemoryServer`'s store, whichever client (async look-alike, synchronous, wire front)
writes to it.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from typing import Any

import mongomock_ng
import mongomock_ng.aggregate
import mongomock_ng.collection
import mongomock_ng.database
from bson import ObjectId
from mongomock_ng.filtering import filter_applies

from ..errors import UnsupportedByMemoryBackend
from ._oplog import MemoryServerStore

_Collection = mongomock_ng.collection.Collection
_Database = mongomock_ng.database.Database
_Client = mongomock_ng.MongoClient

_ensure_uniques = _Collection._ensure_uniques


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


_Collection._ensure_uniques = _ensure_uniques_of_indexed  # type: ignore[method-assign]

_iter_documents = _Collection._iter_documents
_PLAIN_IDS = (str, int, float, bytes, uuid.UUID, ObjectId)


def _ids_named(filter: Any) -> list[Any] | None:
    """The ``_id`` values a filter's equality or ``$in`` on ``_id`` names, or None."""
    if not isinstance(filter, dict) or "_id" not in filter:
        return None
    value = filter["_id"]
    if isinstance(value, dict) and set(value) == {"$in"} and isinstance(value["$in"], list):
        values = value["$in"]
    else:
        values = [value]
    if all(isinstance(v, _PLAIN_IDS) and not isinstance(v, bool) for v in values):
        return values
    return None


def _iter_documents_by_id(self: Any, filter: Any) -> Any:
    """Where a filter names documents by ``_id``, look them up rather than scan the whole
    collection, as MongoDB uses its ``_id`` index: the documents found are the same (the
    whole filter still decides), the cost follows the ids named, not the collection."""
    ids = _ids_named(filter)
    if ids is None:
        return _iter_documents(self, filter)  # type: ignore[no-untyped-call]
    store = self._store
    store._remove_expired_documents()  # TTL, as a scan would apply it
    found = [store._documents[i] for i in dict.fromkeys(ids) if i in store._documents]
    return (document for document in found
            if filter_applies(filter, document))  # type: ignore[no-untyped-call]


_Collection._iter_documents = _iter_documents_by_id  # type: ignore[method-assign]


class SharedStoreClient(_Client):  # type: ignore[type-arg]
    """A mongomock-ng client on a shared server store. ``close()`` ends this client only:
    mongomock-ng's own would empty the store, i.e. every database of the server."""

    def close(self) -> None:
        self._database_accesses.clear()
        self._closed = True


# --- write operations -------------------------------------------------------------------------

#: ``describe(self, *args, **kwargs) -> (kind, options for Recorder.operation)``
Describe = Callable[..., tuple[str, dict[str, Any]]]


def _hook(cls: type, name: str, client_of: Callable[[Any], Any], describe: Describe) -> None:
    """Run ``cls.name`` as one recorded write operation when it writes to a MemoryServer."""
    original = getattr(cls, name)

    @functools.wraps(original)
    def hooked(self: Any, *args: Any, **kwargs: Any) -> Any:
        store = client_of(self)._store
        if not isinstance(store, MemoryServerStore):
            return original(self, *args, **kwargs)
        kind, options = describe(self, *args, **kwargs)  # may refuse
        if store.recorder is None:
            return original(self, *args, **kwargs)
        with store.recorder.operation(kind, **options):
            return original(self, *args, **kwargs)

    setattr(cls, name, hooked)


def _describe_update(self: Any, spec: Any, document: Any, upsert: Any, multi: Any,
                     *args: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(document, list):
        raise UnsupportedByMemoryBackend(
            f"{self.name}: pipeline-style updates are not applied faithfully by mongomock-ng, "
            "so the in-memory back end refuses them"
        )
    if any(key.startswith("$") for key in document):
        return "update", {"update": document, "retryable": not multi}
    return "replace", {"retryable": not multi}


def _describe_delete(self: Any, filter: Any, collation: Any = None, hint: Any = None,
                     multi: bool = False, *args: Any, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    return "delete", {"retryable": not multi}


def _fixed(kind: str, retryable: bool) -> Describe:
    return lambda *args, **kwargs: (kind, {"retryable": retryable})


def _describe_drop_database(self: Any, name_or_db: Any) -> tuple[str, dict[str, Any]]:
    name = name_or_db if isinstance(name_or_db, str) else name_or_db.name
    return "dropDatabase", {"retryable": False, "database": name}


def _collection_client(collection: Any) -> Any:
    return collection.database.client


def _database_client(database: Any) -> Any:
    return database.client


_hook(_Collection, "_insert", _collection_client, _fixed("insert", True))
_hook(_Collection, "_update_documents", _collection_client, _describe_update)
_hook(_Collection, "_delete", _collection_client, _describe_delete)
for _name in ("create_index", "drop_index", "drop_indexes"):
    _hook(_Collection, _name, _collection_client, _fixed("ddl", False))
_hook(_Database, "drop_collection", _database_client, _fixed("drop", False))
_hook(_Database, "create_collection", _database_client, _fixed("ddl", False))
_hook(_Database, "rename_collection", _database_client, _fixed("rename", False))
_hook(_Client, "drop_database", lambda client: client, _describe_drop_database)


def _refuse_out(collection: Any, database: Any, options: Any, user_vars: Any) -> Any:
    if isinstance(database.client._store, MemoryServerStore):
        raise UnsupportedByMemoryBackend(
            "$out: mongomock-ng drops and refills the target collection in place, unlike "
            "MongoDB, so the in-memory back end refuses it"
        )
    return _handle_out(collection, database, options, user_vars)


_handle_out: Any = mongomock_ng.aggregate._PIPELINE_HANDLERS["$out"]
mongomock_ng.aggregate._PIPELINE_HANDLERS["$out"] = _refuse_out
