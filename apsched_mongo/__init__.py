"""MongoDB data store and event broker for APScheduler 4."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .datastore import MongoDBDataStore
from .errors import (
    IncompatibleDataError,
    IndexConflictError,
    ServerUnreachableError,
    UnsupportedByMemoryBackend,
)
from .eventbroker import MongoDBEventBroker

try:
    __version__ = version("apsched-mongo")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "IncompatibleDataError",
    "IndexConflictError",
    "MongoDBDataStore",
    "MongoDBEventBroker",
    "ServerUnreachableError",
    "UnsupportedByMemoryBackend",
    "__version__",
]
