"""Which MongoDB failures are temporary, and retrying exactly those with tenacity.

Every write of the store is safe to repeat (idempotent, or decided by a token written with
it), so a temporary failure is retried whether or not the failed attempt reached the
server. Permanent failures (authentication, authorization, bad configuration, duplicate
keys, validation) are raised at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from logging import Logger
from typing import Any

from apscheduler import RetrySettings
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
    WriteConcernError,
)
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

# Server error codes that mean "try again elsewhere or later": elections, shutdowns and
# interrupted operations (the set the drivers' retryable-writes specification retries).
TEMPORARY_CODES = frozenset(
    {
        6,  # HostUnreachable
        7,  # HostNotFound
        89,  # NetworkTimeout
        91,  # ShutdownInProgress
        134,  # ReadConcernMajorityNotAvailableYet
        189,  # PrimarySteppedDown
        262,  # ExceededTimeLimit
        9001,  # SocketException
        10058,  # LegacyNotPrimary
        10107,  # NotWritablePrimary
        11600,  # InterruptedAtShutdown
        11602,  # InterruptedDueToReplStateChange
        13435,  # NotPrimaryNoSecondaryOk
        13436,  # NotPrimaryOrSecondary
    }
)

#: A majority write that was applied on the primary but not acknowledged by a majority
#: within ``wtimeout`` (a lagging or missing secondary). It may still become durable, or be
#: rolled back: repeating the (idempotent) write is the only way to know, so it is retried
#: like a lost reply.
WRITE_CONCERN_TIMEOUT = 64  # WriteConcernFailed with errInfo.wtimeout


def _temporary_code(error: Mapping[str, Any]) -> bool:
    return error.get("code") in TEMPORARY_CODES or "RetryableWriteError" in error.get(
        "errorLabels", ()
    )


def _temporary_write_concern_error(error: Mapping[str, Any]) -> bool:
    timed_out = error.get("code") in (50, WRITE_CONCERN_TIMEOUT) and bool(
        (error.get("errInfo") or {}).get("wtimeout", error.get("code") == 50)
    )
    return timed_out or _temporary_code(error)


def _all_temporary(errors: Iterable[Mapping[str, Any]], check: Any) -> bool:
    errors = list(errors)
    return bool(errors) and all(check(error) for error in errors)


def is_temporary(exc: BaseException) -> bool:
    """True for lost connections, timeouts, primary step-downs and unacknowledged majority
    writes; never for auth errors, bad configuration, duplicate keys or validation failures.

    A :class:`~pymongo.errors.BulkWriteError` is temporary when every write error in it is
    (a step-down mid-batch reports NotWritablePrimary per statement) and its write-concern
    errors are too; a batch holding a duplicate key or a validation error is not, even if
    other statements failed temporarily.
    """
    if isinstance(exc, DuplicateKeyError):
        return False
    if isinstance(exc, BulkWriteError):
        write_errors = exc.details.get("writeErrors") or []
        concern_errors = exc.details.get("writeConcernErrors") or []
        if write_errors and not _all_temporary(write_errors, _temporary_code):
            return False
        if concern_errors and not _all_temporary(concern_errors,
                                                 _temporary_write_concern_error):
            return False
        return bool(write_errors or concern_errors)
    if isinstance(exc, WriteConcernError):
        return _temporary_write_concern_error(exc.details or {"code": exc.code}) or (
            exc.has_error_label("RetryableWriteError")
        )
    if isinstance(exc, ConnectionFailure):  # AutoReconnect, NotPrimaryError, NetworkTimeout...
        return True
    if isinstance(exc, OperationFailure):
        return exc.code in TEMPORARY_CODES or exc.has_error_label("RetryableWriteError")
    if isinstance(exc, PyMongoError):
        return exc.has_error_label("RetryableWriteError")
    return False


def retrying(settings: RetrySettings, logger: Logger, what: str) -> AsyncRetrying:
    """A tenacity loop that retries only :func:`is_temporary` failures, logging each one."""

    def log_attempt(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.warning("Temporary MongoDB error in %s (attempt %d): %r", what,
                       state.attempt_number, exc)

    return AsyncRetrying(
        stop=settings.stop,
        wait=settings.wait,
        retry=retry_if_exception(is_temporary),
        after=log_attempt,
        reraise=True,
    )
