"""The commands the front runs, executed through a synchronous mongomock-ng client on a
:class:`~apsched_mongo.memory.MemoryServer`'s store, under its lock.

Every handler takes the database name and the command document and returns the reply
document, or raises :class:`CommandError` with the code a real server would answer. What
mongomock-ng cannot do faithfully (pipeline-style updates, ``$$NOW``, collations, ...) is
refused with code 238 (NotImplemented), as the in-memory back end refuses it, never
answered wrongly. An unknown field is refused as mongod refuses it (code 40415).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import mongomock_ng
from bson import Int64, ObjectId
from bson.errors import InvalidDocument
from mongomock_ng.filtering import filter_applies
from pymongo.errors import (
    CollectionInvalid,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    WriteError,
)

from ..errors import UnsupportedByMemoryBackend
from ..memory import MemoryMongoClient, MemoryServer
from ..memory._refusals import check_update as _check_update
from ..memory._refusals import refuse_unfaithful as _refuse_unfaithful
from ._access import Requirement
from ._changestreams import server_reply
from ._cursors import Cursors
from ._errors import CommandError, not_implemented

logger = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], dict[str, Any]]
Visible = Callable[[str, str | None], bool]

#: Fields any command may carry (sessions, concerns, routing, API versioning, comments)
GENERIC_FIELDS = frozenset({
    "$db", "lsid", "txnNumber", "$readPreference", "$clusterTime", "readConcern",
    "writeConcern", "comment", "maxTimeMS", "apiVersion", "apiStrict", "apiDeprecationErrors",
    "$audit", "mayBypassWriteBlocking", "autocommit", "startTransaction",
})
WRITE_COMMANDS = frozenset({
    "insert", "update", "delete", "findAndModify", "createIndexes", "dropIndexes", "create",
    "drop", "dropDatabase",
})
#: Index options mongomock-ng keeps and applies
INDEX_OPTIONS = frozenset({"unique", "sparse", "expireAfterSeconds", "partialFilterExpression"})
#: Index options that change which index it is; the others only how it behaves
IDENTIFYING_OPTIONS = ("partialFilterExpression", "collation", "wildcardProjection")
READ_CONCERN_LEVELS = frozenset({"local", "majority", "available", "linearizable", "snapshot"})
REFUSED_STAGES = frozenset({
    "$out", "$merge", "$currentOp", "$listSessions", "$listLocalSessions", "$collStats",
    "$indexStats", "$planCacheStats", "$search", "$searchMeta", "$vectorSearch",
    "$changeStreamSplitLargeEvent",
})


def _check_fields(body: Mapping[str, Any], name: str, allowed: frozenset[str] | set[str],
                  unsupported: tuple[str, ...] = ()) -> None:
    for key in body:
        if key == name or key in GENERIC_FIELDS:
            continue
        if key in unsupported:
            if body[key] not in (None, False, {}, []):
                raise not_implemented(f"{name} with {key!r}")
            continue
        if key not in allowed:
            raise CommandError(40415, f"BSON field '{name}.{key}' is an unknown field.")


def _check_transaction(body: Mapping[str, Any]) -> None:
    if "startTransaction" in body or "autocommit" in body:
        raise not_implemented("multi-document transactions")


def _document(value: Any, what: str, default: Any = None) -> Any:
    if value is None:
        return default
    if not isinstance(value, Mapping):
        raise CommandError(14, f"BSON field '{what}' is the wrong type '{type(value).__name__}',"
                               " expected type 'object'")
    return value


def _refuse(value: Any, where: str) -> None:
    try:
        _refuse_unfaithful(value, where)
    except UnsupportedByMemoryBackend as exc:
        raise not_implemented(str(exc)) from None


def _sort(spec: Any, where: str) -> list[tuple[str, int]] | None:
    spec = _document(spec, f"{where}.sort")
    if not spec:
        return None
    keys = []
    for key, direction in spec.items():
        if key == "$natural":
            continue
        if isinstance(direction, Mapping):
            raise not_implemented(f"{where} sorted by {direction!r}")
        if direction not in (1, -1):
            raise CommandError(15974, f"Illegal key in $sort specification: {key}: {direction}")
        keys.append((key, int(direction)))
    return keys or None


def _int(value: Any, what: str, default: int = 0) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise CommandError(14, f"BSON field '{what}' must be an integer, not {value!r}")
    return int(value)


def check_namespace(db: str, collection: str | None = None) -> None:
    if not db or any(char in db for char in '/\\. "$\0'):
        raise CommandError(73, f"Invalid database name: '{db}'")
    if collection is not None and (not collection or "\0" in collection
                                   or collection.startswith(".") or "$" in collection):
        raise CommandError(73, f"Invalid collection name: {collection!r}")


def check_write_concern(body: Mapping[str, Any]) -> dict[str, Any] | None:
    """A ``writeConcernError`` for a concern a single in-memory node cannot satisfy."""
    concern = _document(body.get("writeConcern"), "writeConcern", {})
    w = concern.get("w", 1)
    if w in (0, 1, "majority") or (isinstance(w, int | float) and 0 <= w <= 1):
        return None
    if isinstance(w, int | float):
        return {"code": 100, "codeName": "UnsatisfiableWriteConcern",
                "errmsg": "Not enough data-bearing nodes", "errInfo": {"writeConcern": concern}}
    return {"code": 79, "codeName": "UnknownReplWriteConcern",
            "errmsg": f"No write concern mode named '{w}' found in replica set configuration",
            "errInfo": {"writeConcern": concern}}


def _key_pattern(key: Any) -> list[tuple[str, Any]]:
    key = _document(key, "createIndexes.indexes.key")
    if not key:
        raise CommandError(67, "Index keys cannot be empty.")
    pattern = []
    for field, direction in key.items():
        if isinstance(direction, bool) or not (
                (isinstance(direction, int | float) and direction != 0)
                or direction in ("hashed", "2d", "2dsphere", "text")):
            raise CommandError(67, "Values in the index key pattern can only be positive or "
                                   f"negative numbers or special index types, not {direction!r}")
        if direction in ("2d", "2dsphere", "text"):
            raise not_implemented(f"{direction} indexes")
        pattern.append((field, direction if isinstance(direction, str) else int(direction)))
    return pattern


class Executor:
    """Runs commands on one MemoryServer's data."""

    def __init__(self, server: MemoryServer, cursors: Cursors) -> None:
        self.server = server
        self.cursors = cursors
        self._client: Any = MemoryMongoClient(server).sync_client()
        self._handlers: dict[str, Handler] = {
            "ping": lambda db, body: {"ok": 1.0},
            "buildInfo": self._build_info, "buildinfo": self._build_info,
            "endSessions": self._no_op, "killSessions": self._no_op,
            "refreshSessions": self._no_op,
            "connectionStatus": lambda db, body: {
                "authInfo": {"authenticatedUsers": [], "authenticatedUserRoles": []}, "ok": 1.0},
            "find": self._find, "getMore": self._get_more, "killCursors": self._kill_cursors,
            "aggregate": self._aggregate, "count": self._count, "distinct": self._distinct,
            "insert": self._insert, "update": self._update, "delete": self._delete,
            "findAndModify": self._find_and_modify, "findandmodify": self._find_and_modify,
            "createIndexes": self._create_indexes, "listIndexes": self._list_indexes,
            "dropIndexes": self._drop_indexes, "deleteIndexes": self._drop_indexes,
            "listCollections": self._list_collections, "listDatabases": self._list_databases,
            "create": self._create, "drop": self._drop, "dropDatabase": self._drop_database,
            "getDefaultRWConcern": self._get_default_rw_concern,
        }
        #: per command (and thread): what it needed, and what the role can see
        self._call = threading.local()
        #: opens change streams; None: answer 40573 as a standalone server does
        self.change_streams: Callable[[str, dict[str, Any]], dict[str, Any]] | None = None

    def knows(self, name: str) -> bool:
        return name in self._handlers

    @property
    def requirement(self) -> Requirement:
        """What the running command needed (a cursor keeps it for its getMores)."""
        requirement: Requirement = getattr(self._call, "requirement", [])
        return requirement

    def visible(self, db: str, collection: str | None) -> bool:
        """Whether the role running the command can see this database or collection."""
        check: Visible = getattr(self._call, "visible", lambda db, collection: True)
        return check(db, collection)

    def run(self, name: str, db: str, body: dict[str, Any], requirement: Requirement,
            visible: Visible) -> dict[str, Any]:
        """The reply to one command (an error reply for a failed one)."""
        self._call.requirement, self._call.visible = requirement, visible
        try:
            check_namespace(db)
            _check_transaction(body)
            concern = _document(body.get("readConcern"), "readConcern", {})
            if concern.get("level", "local") not in READ_CONCERN_LEVELS:
                raise CommandError(9, f"Invalid read concern level {concern.get('level')!r}")
            if concern.get("level") == "snapshot" and not self.server.replica_set:
                raise CommandError(123, "node needs to be a replica set member to use read "
                                        "concern")
            reply = self._handlers[name](db, body)
            if name in WRITE_COMMANDS and (problem := check_write_concern(body)):
                reply["writeConcernError"] = problem
            return reply
        except CommandError as exc:
            return exc.document()
        except Exception as exc:
            return as_command_error(exc, self).document()

    # --- helpers ---------------------------------------------------------------------------

    def _collection(self, db: str, name: Any, command: str) -> Any:
        if not isinstance(name, str):
            if isinstance(name, uuid.UUID):
                raise not_implemented(f"{command} on a collection named by its UUID")
            raise CommandError(73, f"collection name has invalid type {type(name).__name__}")
        check_namespace(db, name)
        return self._client[db][name]

    def _exists(self, db: str, name: str) -> bool:
        return name in self._client[db].list_collection_names()

    def index_name(self, collection: Any, key_pattern: Mapping[str, Any]) -> str:
        for name, info in collection.index_information().items():
            if dict(info["key"]) == dict(key_pattern):
                return str(name)
        return "?"

    def _no_op(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        return {"ok": 1.0}

    def _build_info(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        version = mongomock_ng.SERVER_VERSION
        numbers = [int(part) for part in version.split(".")[:3]]
        return {"version": version, "versionArray": [*numbers, 0], "gitVersion": "memory",
                "bits": 64, "maxBsonObjectSize": 16 * 1024 * 1024,
                # says to tests what they talk to (e.g. there is no query planner here)
                "apschedMongoMemoryFront": True, "ok": 1.0}

    def _get_default_rw_concern(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        """The implicit defaults of a replica set without arbiters (MongoDB 5.0+)."""
        _check_fields(body, "getDefaultRWConcern", {"inMemory"})
        if db != "admin":
            raise CommandError(13, "getDefaultRWConcern may only be run against the admin "
                                   "database.")
        if not self.server.replica_set:
            raise CommandError(51300, "'getDefaultRWConcern' is not supported on standalone "
                                      "nodes.")
        return {"defaultReadConcern": {"level": "local"},
                "defaultWriteConcern": {"w": "majority", "wtimeout": 0},
                "defaultReadConcernSource": "implicit", "defaultWriteConcernSource": "implicit",
                "localUpdateWallClockTime": datetime.now(UTC), "ok": 1.0}

    # --- reads -----------------------------------------------------------------------------

    def _find(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "find", {
            "filter", "sort", "projection", "hint", "skip", "limit", "batchSize", "singleBatch",
            "allowDiskUse", "noCursorTimeout", "allowPartialResults", "readOnce"},
            unsupported=("collation", "min", "max", "returnKey", "showRecordId", "tailable",
                         "awaitData", "let", "oplogReplay"))
        collection = self._collection(db, body["find"], "find")
        query = _document(body.get("filter"), "find.filter", {})
        _refuse(query, "find")
        projection = _document(body.get("projection"), "find.projection") or None
        sort = _sort(body.get("sort"), "find")
        skip = _int(body.get("skip"), "find.skip")
        limit = _int(body.get("limit"), "find.limit")
        if skip < 0:
            raise CommandError(51024, f"BSON field 'skip' value must be >= 0, actual value "
                                      f"'{skip}'")
        with self.server.lock:
            cursor = collection.find(query, projection)
            if sort:
                cursor = cursor.sort(sort)
            if skip:
                cursor = cursor.skip(skip)
            if limit:
                cursor = cursor.limit(abs(limit))
            documents = list(cursor)
        return {"cursor": self.cursors.open(
            f"{db}.{body['find']}", documents, body.get("batchSize"), self.requirement,
            single_batch=bool(body.get("singleBatch")) or limit < 0), "ok": 1.0}

    def _get_more(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "getMore", {"collection", "batchSize", "term",
                                        "lastKnownCommittedOpTime"})
        namespace = f"{db}.{body.get('collection')}"
        return {"cursor": self.cursors.get_more(body["getMore"], namespace,
                                                body.get("batchSize"), body.get("maxTimeMS")),
                "ok": 1.0}

    def _kill_cursors(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "killCursors", {"cursors"})
        return self.cursors.kill(f"{db}.{body['killCursors']}", body.get("cursors"))

    def _aggregate(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "aggregate", {"pipeline", "cursor", "allowDiskUse", "hint",
                                          "bypassDocumentValidation"},
                      unsupported=("explain", "collation", "let", "exchange"))
        pipeline = body.get("pipeline")
        if not isinstance(pipeline, list):
            raise CommandError(14, "'pipeline' option must be specified as an array")
        if "cursor" not in body:
            raise CommandError(9, "The 'cursor' option is required, except for aggregate with "
                                  "the explain argument")
        cursor_options = _document(body["cursor"], "aggregate.cursor", {})
        stages = [next(iter(stage), None) if isinstance(stage, Mapping) and len(stage) == 1
                  else None for stage in pipeline]
        if None in stages:
            raise CommandError(40323, "A pipeline stage specification object must contain "
                                      "exactly one field.")
        if "$changeStream" in stages:
            if stages.index("$changeStream") != 0:
                raise CommandError(40602, "$changeStream is only valid as the first stage in a "
                                          "pipeline.")
            if self.change_streams is None:
                raise CommandError(40573, "The $changeStream stage is only supported on replica "
                                          "sets")
            return self.change_streams(db, body)
        for stage in stages:
            if stage in REFUSED_STAGES:
                raise not_implemented(f"the {stage} aggregation stage")
        target = body["aggregate"]
        if target == 1:
            raise not_implemented("database-level aggregation")
        collection = self._collection(db, target, "aggregate")
        _refuse(pipeline, "aggregate")
        with self.server.lock:
            documents = list(collection.aggregate(pipeline))
        return {"cursor": self.cursors.open(f"{db}.{target}", documents,
                                            cursor_options.get("batchSize"), self.requirement),
                "ok": 1.0}

    def _count(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "count", {"query", "limit", "skip", "hint", "fields"},
                      unsupported=("collation",))
        collection = self._collection(db, body["count"], "count")
        query = _document(body.get("query"), "count.query", {})
        _refuse(query, "count")
        kwargs = {key: abs(_int(body[key], f"count.{key}")) for key in ("limit", "skip")
                  if body.get(key)}
        with self.server.lock:
            n = collection.count_documents(query, **kwargs)
        return {"n": n, "ok": 1.0}

    def _distinct(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "distinct", {"key", "query", "hint"}, unsupported=("collation",))
        collection = self._collection(db, body["distinct"], "distinct")
        if not isinstance(body.get("key"), str):
            raise CommandError(14, "BSON field 'distinct.key' is missing but a required field")
        query = _document(body.get("query"), "distinct.query", {})
        _refuse(query, "distinct")
        with self.server.lock:
            values = collection.distinct(body["key"], query)
        return {"values": values, "ok": 1.0}

    # --- writes ----------------------------------------------------------------------------

    def _insert(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "insert", {"documents", "ordered", "bypassDocumentValidation"})
        collection = self._collection(db, body["insert"], "insert")
        documents = body.get("documents")
        if not isinstance(documents, list) or not documents:
            raise CommandError(2, "Write batch sizes must be between 1 and 100000. Got 0 "
                                  "operations.")
        ordered = body.get("ordered", True)
        n, errors = 0, []
        with self.server.lock:
            for index, document in enumerate(documents):
                if "_id" not in document:
                    document = {"_id": ObjectId(), **document}
                try:
                    collection.insert_one(document)
                    n += 1
                except Exception as exc:
                    errors.append(write_error(index, exc, self, collection))
                    if ordered:
                        break
        return _write_reply(n, errors)

    def _update(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "update", {"updates", "ordered", "bypassDocumentValidation"},
                      unsupported=("let",))
        collection = self._collection(db, body["update"], "update")
        statements = body.get("updates")
        if not isinstance(statements, list) or not statements:
            raise CommandError(2, "Write batch sizes must be between 1 and 100000. Got 0 "
                                  "operations.")
        for statement in statements:  # refuse before executing any of them
            _check_fields(statement, "update.updates",
                          {"q", "u", "upsert", "multi", "arrayFilters", "hint"},
                          unsupported=("collation", "c", "sort"))
            try:
                _check_update(statement.get("u"), f"{collection.name}.update")
            except UnsupportedByMemoryBackend as exc:
                raise not_implemented(str(exc)) from None
            _refuse(statement.get("q"), "update")
        ordered = body.get("ordered", True)
        n = modified = 0
        upserted: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        with self.server.lock:
            for index, statement in enumerate(statements):
                try:
                    result = self._update_one_statement(collection, statement)
                except Exception as exc:
                    errors.append(write_error(index, exc, self, collection))
                    if ordered:
                        break
                    continue
                if result.upserted_id is not None:
                    n += 1
                    upserted.append({"index": index, "_id": result.upserted_id})
                else:
                    n += result.matched_count
                    modified += result.modified_count
        reply = _write_reply(n, errors)
        reply["nModified"] = modified
        if upserted:
            reply["upserted"] = upserted
        return reply

    @staticmethod
    def _update_one_statement(collection: Any, statement: Mapping[str, Any]) -> Any:
        query = _document(statement.get("q"), "update.updates.q", {})
        update = _document(statement.get("u"), "update.updates.u", {})
        upsert = bool(statement.get("upsert"))
        if not any(key.startswith("$") for key in update):
            if statement.get("multi"):
                raise CommandError(9, "multi update is not supported for replacement-style "
                                      "update")
            return collection.replace_one(query, update, upsert=upsert)
        kwargs: dict[str, Any] = {"upsert": upsert}
        if statement.get("arrayFilters"):
            kwargs["array_filters"] = statement["arrayFilters"]
        method = collection.update_many if statement.get("multi") else collection.update_one
        return method(query, update, **kwargs)

    def _delete(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "delete", {"deletes", "ordered"}, unsupported=("let",))
        collection = self._collection(db, body["delete"], "delete")
        statements = body.get("deletes")
        if not isinstance(statements, list) or not statements:
            raise CommandError(2, "Write batch sizes must be between 1 and 100000. Got 0 "
                                  "operations.")
        for statement in statements:
            _check_fields(statement, "delete.deletes", {"q", "limit", "hint"},
                          unsupported=("collation",))
            if statement.get("limit") not in (0, 1):
                raise CommandError(9, "The limit field in delete objects must be 0 or 1. Got "
                                      f"{statement.get('limit')}")
            _refuse(statement.get("q"), "delete")
        ordered = body.get("ordered", True)
        n, errors = 0, []
        with self.server.lock:
            for index, statement in enumerate(statements):
                query = _document(statement.get("q"), "delete.deletes.q", {})
                try:
                    method = collection.delete_one if statement["limit"] else \
                        collection.delete_many
                    n += method(query).deleted_count
                except Exception as exc:
                    errors.append(write_error(index, exc, self, collection))
                    if ordered:
                        break
        return _write_reply(n, errors)

    def _find_and_modify(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        name = next(iter(body))
        _check_fields(body, name, {"query", "sort", "remove", "update", "new", "fields",
                                   "upsert", "arrayFilters", "bypassDocumentValidation", "hint"},
                      unsupported=("collation", "let"))
        collection = self._collection(db, body[name], name)
        query = _document(body.get("query"), "findAndModify.query", {})
        _refuse(query, name)
        sort = _sort(body.get("sort"), name)
        fields = _document(body.get("fields"), "findAndModify.fields") or None
        remove, update = bool(body.get("remove")), body.get("update")
        new, upsert = bool(body.get("new")), bool(body.get("upsert"))
        if remove and update is not None:
            raise CommandError(9, "Cannot specify both an update and remove=true")
        if not remove and update is None:
            raise CommandError(9, "Either an update or remove=true must be specified")
        if remove and (new or upsert):
            raise CommandError(9, "Cannot specify both new=true and remove=true; 'remove' "
                                  "always returns the deleted document" if new else
                                  "Cannot specify both upsert=true and remove=true")
        if not remove:
            try:
                _check_update(update, f"{collection.name}.findAndModify")
            except UnsupportedByMemoryBackend as exc:
                raise not_implemented(str(exc)) from None
        statement = {"q": query, "u": update, "upsert": upsert,
                     "arrayFilters": body.get("arrayFilters")}
        with self.server.lock:
            found = collection.find(query, {"_id": 1})
            if sort:
                found = found.sort(sort)
            matches = list(found.limit(1))
            if not matches:
                if not upsert:
                    return {"lastErrorObject": {"n": 0, "updatedExisting": False} if not remove
                            else {"n": 0}, "value": None, "ok": 1.0}
                try:
                    result = self._update_one_statement(collection, statement)
                except Exception as exc:
                    raise as_command_error(exc, self, collection) from None
                value = collection.find_one({"_id": result.upserted_id}, fields) if new else None
                return {"lastErrorObject": {"n": 1, "updatedExisting": False,
                                            "upserted": result.upserted_id},
                        "value": value, "ok": 1.0}
            doc_id = matches[0]["_id"]
            before = collection.find_one({"_id": doc_id}, fields)
            if remove:
                collection.delete_one({"_id": doc_id})
                return {"lastErrorObject": {"n": 1}, "value": before, "ok": 1.0}
            pinned = {**query, "_id": doc_id} if "_id" not in query else {
                "$and": [query, {"_id": doc_id}]}
            try:
                self._update_one_statement(collection, {**statement, "q": pinned,
                                                        "upsert": False})
            except Exception as exc:
                raise as_command_error(exc, self, collection) from None
            value = collection.find_one({"_id": doc_id}, fields) if new else before
        return {"lastErrorObject": {"n": 1, "updatedExisting": True}, "value": value, "ok": 1.0}

    # --- indexes ---------------------------------------------------------------------------

    def _create_indexes(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "createIndexes", {"indexes", "commitQuorum"})
        collection = self._collection(db, body["createIndexes"], "createIndexes")
        specs = body.get("indexes")
        if not isinstance(specs, list) or not specs:
            raise CommandError(2, "Must specify at least one index to create")
        requests = []
        for spec in specs:
            spec = _document(spec, "createIndexes.indexes")
            if not isinstance(spec.get("name"), str) or not spec["name"]:
                raise CommandError(9, "The 'name' field is a required property of an index "
                                      "specification")
            pattern = _key_pattern(spec.get("key"))
            options = {key: value for key, value in spec.items()
                       if key not in ("key", "name", "v", "background", "ns")}
            for option in options:
                if option not in INDEX_OPTIONS:
                    raise not_implemented(f"the index option {option!r}")
            requests.append((spec["name"], pattern, options))
        with self.server.lock:
            created_collection = not self._exists(db, collection.name)
            existing = collection.index_information()
            before = len(existing) if existing else 1
            to_create = []
            for name, pattern, options in requests:
                if _already_there(name, pattern, options, existing):
                    continue
                to_create.append((name, pattern, options))
                existing = {**existing, name: {"key": pattern, **options}}
            if created_collection:
                self._client[db].create_collection(collection.name)
            for name, pattern, options in to_create:
                collection.create_index(pattern, name=name, **options)
            after = len(collection.index_information())
        reply: dict[str, Any] = {"numIndexesBefore": before, "numIndexesAfter": after,
                                 "createdCollectionAutomatically": created_collection, "ok": 1.0}
        if not to_create:
            reply["note"] = "all indexes already exist"
        return reply

    def _list_indexes(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "listIndexes", {"cursor", "includeBuildUUIDs", "includeIndexBuildInfo"})
        collection = self._collection(db, body["listIndexes"], "listIndexes")
        with self.server.lock:
            if not self._exists(db, collection.name):
                raise CommandError(26, f"ns does not exist: {db}.{collection.name}")
            information = collection.index_information()
        documents = [{"v": info.get("v", 2), "key": dict(info["key"]), "name": name,
                      **{key: value for key, value in info.items() if key not in ("v", "key")}}
                     for name, info in information.items()]
        cursor_options = _document(body.get("cursor"), "listIndexes.cursor", {})
        return {"cursor": self.cursors.open(f"{db}.{collection.name}", documents,
                                            cursor_options.get("batchSize"), self.requirement),
                "ok": 1.0}

    def _drop_indexes(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        name = next(iter(body))
        _check_fields(body, name, {"index"})
        collection = self._collection(db, body[name], name)
        which = body.get("index")
        with self.server.lock:
            if not self._exists(db, collection.name):
                raise CommandError(26, f"ns not found {db}.{collection.name}")
            information = collection.index_information()
            if which == "*":
                names = [index for index in information if index != "_id_"]
            elif isinstance(which, str):
                names = [which]
            elif isinstance(which, list):
                names = list(which)
            elif isinstance(which, Mapping):
                names = [index for index, info in information.items()
                         if list(info["key"]) == list(which.items())]
                if not names:
                    raise CommandError(27, f"can't find index with key: {dict(which)}")
            else:
                raise CommandError(14, "BSON field 'dropIndexes.index' has the wrong type")
            for index in names:
                if index == "_id_":
                    raise CommandError(72, "cannot drop _id index")
                if index not in information:
                    raise CommandError(27, f"index not found with name [{index}]")
            for index in names:
                collection.drop_index(index)
        return {"nIndexesWas": len(information), "ok": 1.0}

    # --- collections and databases ---------------------------------------------------------

    def _list_collections(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "listCollections", {"filter", "nameOnly", "authorizedCollections",
                                                "cursor", "includePendingDrops"})
        query = _document(body.get("filter"), "listCollections.filter", {})
        name_only = bool(body.get("nameOnly"))
        with self.server.lock:
            names = sorted(self._client[db].list_collection_names())
        documents = []
        for name in names:
            if body.get("authorizedCollections") and not self.visible(db, name):
                continue
            document: dict[str, Any] = {"name": name, "type": "collection"}
            if not name_only:
                document.update(options={}, info={
                    "readOnly": False, "uuid": uuid.uuid5(uuid.NAMESPACE_URL, f"{db}.{name}")},
                    idIndex={"v": 2, "key": {"_id": 1}, "name": "_id_"})
            if filter_applies(query, document):  # type: ignore[no-untyped-call]
                documents.append(document)
        cursor_options = _document(body.get("cursor"), "listCollections.cursor", {})
        return {"cursor": self.cursors.open(f"{db}.$cmd.listCollections", documents,
                                            cursor_options.get("batchSize"), self.requirement),
                "ok": 1.0}

    def _list_databases(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "listDatabases", {"filter", "nameOnly", "authorizedDatabases"})
        if db != "admin":
            raise CommandError(13, "listDatabases may only be run against the admin database.")
        query = _document(body.get("filter"), "listDatabases.filter", {})
        with self.server.lock:
            names = sorted(self._client.list_database_names())
        documents = []
        for name in names:
            if body.get("authorizedDatabases", True) and not self.visible(name, None):
                continue
            document: dict[str, Any] = {"name": name}
            if not body.get("nameOnly"):
                document.update(sizeOnDisk=Int64(0), empty=False)
            if filter_applies(query, document):  # type: ignore[no-untyped-call]
                documents.append(document)
        reply: dict[str, Any] = {"databases": documents, "ok": 1.0}
        if not body.get("nameOnly"):
            reply["totalSize"] = Int64(0)
        return reply

    def _create(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "create", set(), unsupported=(
            "capped", "size", "max", "validator", "validationLevel", "validationAction",
            "timeseries", "expireAfterSeconds", "clusteredIndex", "viewOn", "pipeline",
            "collation", "storageEngine", "indexOptionDefaults", "encryptedFields", "idIndex",
            "changeStreamPreAndPostImages", "autoIndexId", "flags"))
        collection = self._collection(db, body["create"], "create")
        with self.server.lock:
            try:
                self._client[db].create_collection(collection.name)
            except CollectionInvalid:
                raise CommandError(48, f"Collection {db}.{collection.name} already exists."
                                   ) from None
        return {"ok": 1.0}

    def _drop(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "drop", set())
        collection = self._collection(db, body["drop"], "drop")
        with self.server.lock:
            if not self._exists(db, collection.name):
                return {"ok": 1.0}  # MongoDB 7.0 no longer reports a missing collection
            was = len(collection.index_information())
            self._client[db].drop_collection(collection.name)
        return {"nIndexesWas": was, "ns": f"{db}.{collection.name}", "ok": 1.0}

    def _drop_database(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        _check_fields(body, "dropDatabase", set())
        with self.server.lock:
            self._client.drop_database(db)
        return {"dropped": db, "ok": 1.0}


def _already_there(name: str, pattern: list[tuple[str, Any]], options: Mapping[str, Any],
                   existing: Mapping[str, Any]) -> bool:
    """Whether an identical index exists; raise what mongod raises for a conflicting one."""

    def normal(opts: Mapping[str, Any]) -> dict[str, Any]:
        return {key: value for key, value in opts.items()
                if key not in ("key", "v", "ns", "background") and value not in (False, None)}

    wanted = normal(options)
    identity = [(key, wanted.get(key)) for key in IDENTIFYING_OPTIONS]
    spec = {"key": dict(pattern), "name": name, **wanted}
    for other, info in existing.items():
        theirs = normal(info)
        same_identity = (list(info["key"]) == pattern
                         and [(key, theirs.get(key)) for key in IDENTIFYING_OPTIONS] == identity)
        description = {"key": dict(info["key"]), "name": other, **theirs}
        if other == name:
            if not same_identity:
                raise CommandError(86, "An existing index has the same name as the requested "
                                       f"index. Requested index: {spec}, existing index: "
                                       f"{description}")
            if theirs != wanted:
                raise CommandError(85, "An equivalent index already exists with the same name "
                                       f"but different options. Requested index: {spec}, "
                                       f"existing index: {description}")
            return True
        if same_identity:
            if theirs != wanted:
                raise CommandError(85, "An equivalent index already exists with a different "
                                       f"name and options. Requested index: {spec}, existing "
                                       f"index: {description}")
            raise CommandError(85, f"Index already exists with a different name: {other}")
    return False


def _write_reply(n: int, errors: list[dict[str, Any]]) -> dict[str, Any]:
    reply: dict[str, Any] = {"n": n, "ok": 1.0}
    if errors:
        reply["writeErrors"] = errors
    return reply


def as_command_error(exc: Exception, executor: Executor, collection: Any = None) -> CommandError:
    """What a real server would have answered for an error mongomock-ng raised."""
    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, UnsupportedByMemoryBackend | NotImplementedError):
        return not_implemented(str(exc))
    if isinstance(exc, PyMongoError) and (reply := server_reply(exc)) is not None:
        return reply  # the in-memory server's own error (e.g. not primary), as it is
    if isinstance(exc, DuplicateKeyError):
        details = exc.details or {}
        pattern = details.get("keyPattern", {})
        value = details.get("keyValue", {})
        where = f"{collection.full_name} index: {executor.index_name(collection, pattern)} " \
            if collection is not None else ""
        return CommandError(11000, f"E11000 duplicate key error collection: {where}dup key: "
                                   f"{value}", keyPattern=pattern, keyValue=value)
    if isinstance(exc, WriteError) and "immutable" in str(exc):
        return CommandError(66, str(exc))
    if isinstance(exc, OperationFailure):
        return CommandError(exc.code or 2, str(exc))
    if isinstance(exc, InvalidDocument | ValueError | TypeError):
        return CommandError(2, str(exc))
    logger.exception("the in-memory back end failed on a command")
    return CommandError(1, f"the in-memory back end failed: {type(exc).__name__}: {exc}")


def write_error(index: int, exc: Exception, executor: Executor, collection: Any) -> dict[str, Any]:
    """One entry of a write command's ``writeErrors``."""
    error = as_command_error(exc, executor, collection).document()
    return {"index": index, "code": error["code"], "errmsg": error["errmsg"],
            **{key: error[key] for key in ("keyPattern", "keyValue") if key in error}}
