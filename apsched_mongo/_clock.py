"""The server's clock, as seen from this node.

Lease expiry compares times written by different nodes. Node clocks drift and are set
differently; the server's clock is one clock for everybody. We read it from ``hello``'s
``localTime`` (millisecond precision), correct for half the round trip, and remember the
offset, refreshing it periodically. Without pipeline updates (``$$NOW``, which the
in-memory fake cannot evaluate) this keeps every lease decision on one time line, to within
a few milliseconds plus half a round trip.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from time import monotonic
from typing import Any


def utc_now() -> datetime:
    return datetime.now(UTC)


class ServerClock:
    def __init__(self, local_clock: Callable[[], datetime], refresh_interval: float) -> None:
        self.local_clock = local_clock
        self.refresh_interval = refresh_interval
        self.offset = timedelta()
        self._measured_at: float | None = None

    def observe(self, hello: dict[str, Any], sent_at: datetime, round_trip: float) -> None:
        """Record the offset from a ``hello`` reply sent at local time ``sent_at``."""
        server_time = hello.get("localTime")
        if not isinstance(server_time, datetime):
            return  # a server that doesn't tell: trust the local clock
        if server_time.tzinfo is None:
            server_time = server_time.replace(tzinfo=UTC)
        self.offset = server_time - (sent_at + timedelta(seconds=round_trip / 2))
        self._measured_at = monotonic()

    async def measure(self, admin: Any) -> dict[str, Any]:
        sent_at, started = self.local_clock(), monotonic()
        reply: dict[str, Any] = await admin.command("hello")
        self.observe(reply, sent_at, monotonic() - started)
        return reply

    async def now(self, admin: Any) -> datetime:
        """The server's current time; re-measures the offset when it is stale."""
        if self._measured_at is None or monotonic() - self._measured_at > self.refresh_interval:
            await self.measure(admin)
        return self.local_clock() + self.offset
