"""Resume tokens: opaque to clients, and ordered exactly like the changes they stand for.

A token is ``{"_data": "<hex>"}`` like MongoDB's. Inside (an implementation detail, never
to be parsed by clients) is a :class:`Position` in the change history: the cluster time,
whether the token marks an event or only a point in time (a *high-water mark*, as in an
empty batch's ``postBatchResumeToken``), and whether it is the ``invalidate`` that follows
an event. The hex digits are fixed-width and upper-case, so comparing two ``_data`` strings
compares the positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bson import Timestamp

from ._errors import server_error

_PREFIX = "82"  # MongoDB's tokens start with the type byte of their cluster time, too
_LENGTH = len(_PREFIX) + 8 + 8 + 2 + 2
HIGH_WATER_MARK, EVENT = 0, 1


@dataclass(frozen=True, order=True)
class Position:
    """A point in the change history. ``HWM(t)`` sorts before the event at ``t``, which
    sorts before that event's ``invalidate``."""

    time: int
    inc: int
    kind: int = EVENT
    from_invalidate: int = 0

    @classmethod
    def high_water_mark(cls, ts: Timestamp) -> Position:
        """Everything before ``ts`` has been seen; the change at ``ts`` has not."""
        return cls(ts.time, ts.inc, HIGH_WATER_MARK)

    @classmethod
    def event(cls, ts: Timestamp, *, invalidate: bool = False) -> Position:
        return cls(ts.time, ts.inc, EVENT, int(invalidate))

    @property
    def timestamp(self) -> Timestamp:
        return Timestamp(self.time, self.inc)

    @property
    def is_event(self) -> bool:
        return self.kind == EVENT

    def token(self) -> dict[str, str]:
        return {"_data": f"{_PREFIX}{self.time:08X}{self.inc:08X}{self.kind:02X}"
                         f"{self.from_invalidate:02X}"}

    @classmethod
    def from_token(cls, token: Any, option: str) -> Position:
        """Parse a token given as ``option``; a malformed one fails as MongoDB's parser does."""
        if not isinstance(token, Mapping):
            raise server_error(14, "TypeMismatch",
                               f"BSON field '$changeStream.{option}' is the wrong type "
                               f"'{type(token).__name__}', expected type 'object'")
        data = token.get("_data")
        if not isinstance(data, str):
            raise server_error(9, "FailedToParse",
                               "Bad resume token: _data of missing or of wrong type")
        try:
            if len(data) != _LENGTH or not data.startswith(_PREFIX):
                raise ValueError(data)
            fields = [int(data[a:b], 16) for a, b in ((2, 10), (10, 18), (18, 20), (20, 22))]
        except ValueError:
            raise server_error(9, "FailedToParse",
                               f"Bad resume token: {data!r} is not a token of this server"
                               ) from None
        time, inc, kind, from_invalidate = fields
        if kind not in (HIGH_WATER_MARK, EVENT) or from_invalidate not in (0, 1):
            raise server_error(9, "FailedToParse", f"Bad resume token: {data!r}")
        return cls(time, inc, kind, from_invalidate)


def next_after(ts: Timestamp) -> Timestamp:
    """The first cluster time after ``ts``."""
    return Timestamp(ts.time, ts.inc + 1)
