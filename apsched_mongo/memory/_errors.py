"""Server errors, raised as the exception PyMongo raises for the same error reply.

Each exception's ``details`` is the complete error reply (``ok``, ``errmsg``, ``code``,
``codeName``, ``errorLabels``), so a wire front can send it as is.
"""

from __future__ import annotations

from collections.abc import Sequence

from pymongo.errors import CursorNotFound, NotPrimaryError, OperationFailure, PyMongoError

# PyMongo raises NotPrimaryError for these (SDAM's "not primary" and "node is recovering")
_NOT_PRIMARY_CODES = frozenset({10058, 10107, 13435, 11602, 13436, 189, 11600, 91})

RESUMABLE = "ResumableChangeStreamError"
NON_RESUMABLE = "NonResumableChangeStreamError"
RETRYABLE_WRITE = "RetryableWriteError"


def server_error(code: int, code_name: str, message: str,
                 labels: Sequence[str] = ()) -> PyMongoError:
    reply: dict[str, object] = {"ok": 0.0, "errmsg": message, "code": code,
                                "codeName": code_name}
    if labels:
        reply["errorLabels"] = list(labels)
    if code in _NOT_PRIMARY_CODES:
        return NotPrimaryError(message, reply)
    if code == 43:
        return CursorNotFound(message, code, reply)
    return OperationFailure(message, code, reply)


def not_writable_primary(retryable: bool) -> PyMongoError:
    return server_error(10107, "NotWritablePrimary", "not primary",
                        [RETRYABLE_WRITE] if retryable else [])


def not_primary_no_secondary_ok() -> PyMongoError:
    return server_error(13435, "NotPrimaryNoSecondaryOk", "not primary and secondaryOk=false")


def interrupted_by_election() -> PyMongoError:
    return server_error(11602, "InterruptedDueToReplStateChange",
                        "operation was interrupted because of a replication state change",
                        [RESUMABLE])


def history_lost() -> PyMongoError:
    return server_error(286, "ChangeStreamHistoryLost",
                        "Resume of change stream was not possible, as the resume point may no "
                        "longer be in the oplog.", [NON_RESUMABLE])


def cursor_not_found(cursor_id: int) -> PyMongoError:
    return server_error(43, "CursorNotFound", f"cursor id {cursor_id} not found")


def no_change_streams() -> PyMongoError:
    return server_error(40573, "Location40573",
                        "The $changeStream stage is only supported on replica sets")
