"""Small test aids shared by several test modules."""

from __future__ import annotations

import logging
import time
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler import Event
from apscheduler.eventbrokers.local import LocalEventBroker


def noop(*args: object, **kwargs: object) -> None:
    """A task function that does nothing."""


class FakeClock:
    """A node's clocks, which tests move forward instead of sleeping: the wall clock (set
    ``skew`` off true time) and the monotonic clock that server time is extrapolated on
    (pass :meth:`monotonic` as the store's ``monotonic_clock``)."""

    def __init__(self, skew: timedelta = timedelta()) -> None:
        self.offset = skew
        self.elapsed = 0.0

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.elapsed

    def advance(self, delta: timedelta) -> None:
        self.offset += delta
        self.elapsed += delta.total_seconds()


class SharedBroker(LocalEventBroker):
    """One local broker for several schedulers in this process: every store hears every
    other store's events at once, as over change streams. Started once by the test, so each
    scheduler's ``start`` (and its exit) leaves it alone."""

    carries_remote_events = True

    async def start_shared(self, exit_stack: AsyncExitStack, logger: logging.Logger) -> None:
        await super().start(exit_stack, logger)

    async def start(self, exit_stack: AsyncExitStack, logger: logging.Logger) -> None:
        pass


class ClusterBus:
    """Fans every event out to all nodes' local brokers: a stand-in for a cross-node broker
    in tests that are about the data store, not about how events travel."""

    def __init__(self) -> None:
        self.brokers: list[Any] = []

    def broker(self) -> Any:
        bus = self

        class NodeBroker(LocalEventBroker):
            carries_remote_events = True  # the stores may rely on hearing other nodes

            async def publish(self, event: Event) -> None:
                for broker in list(bus.brokers):
                    await broker.publish_local(event)

        broker = NodeBroker()
        self.brokers.append(broker)
        return broker
