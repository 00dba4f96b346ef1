"""The server's clock, as seen from this node.

Lease expiry compares times written by different nodes. Node clocks drift and are set
differently; the primary's clock is one clock for everybody. We read it from ``hello``'s
``localTime`` (millisecond precision), correct for half the round trip, and *anchor* it to
this node's monotonic clock: between measurements, server time is the anchor plus the
monotonic time elapsed since. A step of the node's wall clock (NTP, a VM resumed, an
operator) therefore shifts nothing; only the monotonic clock's drift (parts per million)
accumulates until the next refresh. Without pipeline updates (``$$NOW``, which the
in-memory fake cannot evaluate) this keeps every lease decision on one time line, to within
a few milliseconds plus half a round trip.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo import ReadPreference


def utc_now() -> datetime:
    return datetime.now(UTC)


class ServerClock:
    """Server time anchored to a monotonic clock.

    :param local_clock: this node's wall clock (used before the first measurement, and to
        translate server times into local ones)
    :param refresh_interval: seconds between re-measurements
    :param monotonic: this node's monotonic clock, in seconds
    """

    def __init__(
        self,
        local_clock: Callable[[], datetime],
        refresh_interval: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.local_clock = local_clock
        self.refresh_interval = refresh_interval
        self.monotonic = monotonic
        #: (server time, monotonic time) of the last measurement
        self._anchor: tuple[datetime, float] | None = None

    def observe(self, hello: dict[str, Any], round_trip: float) -> None:
        """Anchor to a ``hello`` reply received just now, ``round_trip`` seconds after it
        was sent."""
        server_time = hello.get("localTime")
        if not isinstance(server_time, datetime):
            return  # a server that doesn't tell: trust the local clock
        if server_time.tzinfo is None:
            server_time = server_time.replace(tzinfo=UTC)
        self._anchor = (server_time + timedelta(seconds=round_trip / 2), self.monotonic())

    @property
    def stale(self) -> bool:
        return (self._anchor is None
                or self.monotonic() - self._anchor[1] > self.refresh_interval)

    def current(self) -> datetime:
        """Server time now, from the last measurement (the local clock before any)."""
        if self._anchor is None:
            return self.local_clock()
        server_time, measured_at = self._anchor
        return server_time + timedelta(seconds=self.monotonic() - measured_at)

    @property
    def offset(self) -> timedelta:
        """Server time minus this node's wall-clock time."""
        return self.current() - self.local_clock()

    async def measure(self, admin: Any) -> dict[str, Any]:
        """Run ``hello`` on the primary (whose clock the leases follow) and anchor to it."""
        started = self.monotonic()
        reply: dict[str, Any] = await admin.command(
            "hello", read_preference=ReadPreference.PRIMARY
        )
        self.observe(reply, self.monotonic() - started)
        return reply

    async def now(self, admin: Any) -> datetime:
        """The server's current time; re-measures the anchor when it is stale."""
        if self.stale:
            await self.measure(admin)
        return self.current()
