"""The mongomock-ng functions this package calls, typed (mongomock-ng has no annotations)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mongomock_ng import aggregate, helpers

#: A deep copy of a stored document (mongomock-ng's own, fast for BSON values)
clone_document: Callable[[Any], Any] = helpers._clone_document
#: Dates as mongomock-ng stores them: naive UTC, millisecond precision
stored_dates: Callable[[Any], Any] = helpers.patch_datetime_awareness_in_document
utcnow: Callable[[], Any] = helpers.utcnow
hashdict: Callable[[Any], Any] = helpers.hashdict
#: ``$project`` over a list of documents
project: Callable[[list[Any], Any, Any, Any], list[Any]] = aggregate._handle_project_stage
