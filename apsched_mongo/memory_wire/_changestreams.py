"""Change streams over the wire: an ``aggregate`` whose first stage is ``$changeStream``
opens a :class:`~apsched_mongo.memory.ServerChangeStream` on a replica-set
:class:`~apsched_mongo.memory.MemoryServer`; its batches travel as a tailable cursor's
(``getMore`` waits up to ``maxTimeMS``, one second by default) with the
``postBatchResumeToken`` PyMongo resumes from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pymongo.errors import PyMongoError

from ..errors import UnsupportedByMemoryBackend
from ..memory import MemoryServer
from ._access import Requirement
from ._cursors import Cursors
from ._errors import CommandError, not_implemented

#: ``$changeStream`` options and the ``open_change_stream`` argument each becomes
OPTIONS = {
    "fullDocument": "full_document",
    "fullDocumentBeforeChange": "full_document_before_change",
    "resumeAfter": "resume_after",
    "startAfter": "start_after",
    "startAtOperationTime": "start_at_operation_time",
    "showExpandedEvents": "show_expanded_events",
}
DEFAULT_FIRST_BATCH = 101


def server_reply(exc: PyMongoError) -> CommandError | None:
    """The server's error reply an exception of the in-memory back end carries, if any."""
    details = getattr(exc, "details", None)
    if isinstance(details, Mapping) and isinstance(details.get("code"), int):
        extra = {key: value for key, value in details.items()
                 if key not in ("ok", "errmsg", "code", "codeName")}
        return CommandError(details["code"], str(details.get("errmsg", exc)), **extra)
    return None


def _error(exc: Exception) -> CommandError:
    if isinstance(exc, UnsupportedByMemoryBackend):
        return not_implemented(str(exc))
    if isinstance(exc, PyMongoError) and (reply := server_reply(exc)) is not None:
        return reply
    raise exc


def open_change_stream(memory: MemoryServer, cursors: Cursors, db: str, body: dict[str, Any],
                       requirement: Requirement) -> dict[str, Any]:
    """The reply to ``aggregate`` with ``$changeStream``: the first batch, and a cursor the
    stream's ``getMore`` commands read from."""
    pipeline = body["pipeline"]
    spec = pipeline[0]["$changeStream"]
    if not isinstance(spec, Mapping):
        raise CommandError(14, "the $changeStream stage specification must be an object")
    options: dict[str, Any] = {}
    for key, value in spec.items():
        if key == "allChangesForCluster":
            continue
        if key not in OPTIONS:
            raise CommandError(40415, f"BSON field '$changeStream.{key}' is an unknown field.")
        options[OPTIONS[key]] = value
    target = body["aggregate"]
    if spec.get("allChangesForCluster"):
        if db != "admin" or target != 1:
            raise CommandError(73, "$changeStream with allChangesForCluster must run on the "
                                   "admin database with {aggregate: 1}")
        database, collection = None, None
    elif target == 1:
        database, collection = db, None
    elif isinstance(target, str):
        database, collection = db, target
    else:
        raise CommandError(73, f"collection name has invalid type {type(target).__name__}")
    batch_size = body["cursor"].get("batchSize")
    try:
        stream = memory.open_change_stream(database=database, collection=collection,
                                           pipeline=list(pipeline[1:]), **options)
        events: list[dict[str, Any]] = []
        if batch_size == 0:
            token = stream.post_batch_resume_token
        else:
            events, token = stream.next_batch(0, DEFAULT_FIRST_BATCH if batch_size is None
                                              else int(batch_size))
    except (PyMongoError, UnsupportedByMemoryBackend) as exc:
        raise _error(exc) from None
    return {"cursor": cursors.open_stream(stream, stream.namespace, events, token,
                                          requirement), "ok": 1.0}


def stream_errors(exc: Exception) -> CommandError:
    """A change stream batch's error as the server's reply (see :func:`_error`)."""
    return _error(exc)
