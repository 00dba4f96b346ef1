"""Which MongoDB failures are temporary, and retrying exactly those with tenacity."""

from __future__ import annotations

from logging import Logger

from apscheduler import RetrySettings
from pymongo.errors import (
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

# Server error codes that mean "try again elsewhere or later": elections, shutdowns and
# interrupted operations (from the server's error_codes.yml, the same set the drivers retry).
TEMPORARY_CODES = frozenset(
    {
        6,  # HostUnreachable
        7,  # HostNotFound
        89,  # NetworkTimeout
        91,  # ShutdownInProgress
        189,  # PrimarySteppedDown
        262,  # ExceededTimeLimit
        9001,  # SocketException
        10107,  # NotWritablePrimary
        11600,  # InterruptedAtShutdown
        11602,  # InterruptedDueToReplStateChange
        13435,  # NotPrimaryNoSecondaryOk
        13436,  # NotPrimaryOrSecondary
    }
)


def is_temporary(exc: BaseException) -> bool:
    """True for lost connections, timeouts and primary step-downs; never for auth errors,
    bad configuration, duplicate keys or validation failures."""
    if isinstance(exc, DuplicateKeyError):
        return False
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
