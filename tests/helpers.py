"""Small test aids shared by several test modules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


def noop(*args: object, **kwargs: object) -> None:
    """A task function that does nothing."""


class FakeClock:
    """A node's local clock that tests move forward instead of sleeping."""

    def __init__(self, skew: timedelta = timedelta()) -> None:
        self.offset = skew

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta
