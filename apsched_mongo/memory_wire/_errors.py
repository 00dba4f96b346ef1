"""Errors in the shape a MongoDB server replies with: ``{ok: 0, errmsg, code, codeName}``."""

from __future__ import annotations

from typing import Any

#: The codes this front answers with, and their names (src/mongo/base/error_codes.yml)
CODE_NAMES = {
    1: "InternalError",
    2: "BadValue",
    9: "FailedToParse",
    13: "Unauthorized",
    14: "TypeMismatch",
    20: "IllegalOperation",
    26: "NamespaceNotFound",
    27: "IndexNotFound",
    43: "CursorNotFound",
    48: "NamespaceExists",
    59: "CommandNotFound",
    66: "ImmutableField",
    67: "CannotCreateIndex",
    72: "InvalidOptions",
    73: "InvalidNamespace",
    79: "UnknownReplWriteConcern",
    85: "IndexOptionsConflict",
    86: "IndexKeySpecsConflict",
    100: "UnsatisfiableWriteConcern",
    123: "NotAReplicaSet",
    189: "PrimarySteppedDown",
    225: "TransactionTooOld",
    238: "NotImplemented",
    10107: "NotWritablePrimary",
    11000: "DuplicateKey",
    13435: "NotPrimaryNoSecondaryOk",
    40415: "Location40415",
    40573: "Location40573",
    51300: "Location51300",
}

#: Codes after which a retryable write may be retried (a server labels them
#: RetryableWriteError when the command carried a txnNumber)
RETRYABLE_CODES = frozenset({
    6, 7, 89, 91, 134, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436,
})


class CommandError(Exception):
    """A command failed; :meth:`document` is the server's reply for it."""

    def __init__(self, code: int, errmsg: str, **extra: Any) -> None:
        super().__init__(errmsg)
        self.code = code
        self.errmsg = errmsg
        self.extra = extra

    def document(self) -> dict[str, Any]:
        return {"ok": 0.0, "errmsg": self.errmsg, "code": self.code,
                "codeName": CODE_NAMES.get(self.code, f"Location{self.code}"), **self.extra}


def not_implemented(what: str) -> CommandError:
    """The in-memory back end cannot do ``what`` faithfully, so it refuses, loudly."""
    return CommandError(238, f"the in-memory back end cannot do this faithfully: {what}")
