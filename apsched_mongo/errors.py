"""Exceptions raised by apsched-mongo itself (APScheduler's own are raised where they apply)."""

from __future__ import annotations


class ApschedMongoError(Exception):
    """Base class of the errors this package raises."""


class ServerUnreachableError(ApschedMongoError, ConnectionError):
    """No MongoDB server answered within the client's server-selection timeout."""


class IndexConflictError(ApschedMongoError):
    """An index we need exists already with other options; we never drop a user's index."""


class UnsupportedByMemoryBackend(ApschedMongoError, NotImplementedError):
    """The in-memory fake cannot do this faithfully, so it refuses instead of guessing."""


class IncompatibleDataError(ApschedMongoError):
    """The database holds data in a layout this version does not know (a newer one)."""
