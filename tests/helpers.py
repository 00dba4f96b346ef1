"""Small test aids shared by several test modules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler import Event
from apscheduler.eventbrokers.local import LocalEventBroker


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


class ClusterBus:
    """Fans every event out to all nodes' local brokers: a stand-in for a cross-node broker
    in tests that are about the data store, not about how events travel."""

    def __init__(self) -> None:
        self.brokers: list[Any] = []

    def broker(self) -> Any:
        bus = self

        class NodeBroker(LocalEventBroker):
            async def publish(self, event: Event) -> None:
                for broker in list(bus.brokers):
                    await broker.publish_local(event)

        broker = NodeBroker()
        self.brokers.append(broker)
        return broker
