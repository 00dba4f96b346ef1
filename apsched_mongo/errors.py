"""Exceptions raised by apsched-mongo itself (APScheduler's own are raised where they apply)."""

from __future__ import annotations


class ApschedMongoError(Exception):
    """Base class of the errors this package raises."""


class ServerUnreachableError(ApschedMongoError, ConnectionError):
    """No MongoDB server answered within the client's server-selection timeout.

    ``str()`` is one line: the hosts, the timeout and the likely cause. The driver's full
    account (every server's state in the topology) is in :attr:`details`, and is logged
    at DEBUG by the ``apsched_mongo`` logger; never a password in either.
    """

    def __init__(self, message: str, *, details: str = "") -> None:
        super().__init__(message)
        #: The driver's topology description and per-server errors, for ``--verbose``.
        self.details = details


class IndexConflictError(ApschedMongoError):
    """An index we need exists already with other options; we never drop a user's index."""


class UnsupportedByMemoryBackend(ApschedMongoError, NotImplementedError):
    """The in-memory fake cannot do this faithfully, so it refuses instead of guessing."""


class IncompatibleDataError(ApschedMongoError):
    """The database holds data in a layout this version does not know (a newer one)."""
