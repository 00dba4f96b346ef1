"""What a passive broker subscription heard: jobs released per minute by outcome, and the
schedulers that acquired or released jobs.

Nothing is read back from the database: the dashboard subscribes to the cluster's event
broker when it starts and keeps the last :data:`WINDOW` in memory, so the plot covers
"since the dashboard started, at most the last hour".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import attrs
from apscheduler import JobAcquired, JobOutcome, JobReleased

WINDOW = timedelta(hours=1)
BUCKET = timedelta(minutes=1)
#: Where releases without any scheduler id are counted
NO_NODE = "(no scheduler)"
#: Plot order (and colour order) of the outcomes
OUTCOMES = tuple(outcome.name for outcome in JobOutcome)


def _minute(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


@attrs.frozen
class Bucket:
    start: datetime
    counts: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@attrs.define
class OutcomeLog:
    """Collects ``JobReleased`` and ``JobAcquired`` events (a broker subscription callback)."""

    clock: Callable[[], datetime] = attrs.field(default=lambda: datetime.now(UTC))
    started_at: datetime = attrs.field(init=False)
    #: minute -> outcome name -> jobs released
    _per_minute: dict[datetime, Counter[str]] = attrs.field(init=False, factory=dict)
    #: minute -> node -> outcome name -> jobs released
    _per_node: dict[datetime, dict[str, Counter[str]]] = attrs.field(init=False, factory=dict)
    #: scheduler id -> last event heard from it
    _last_seen: dict[str, datetime] = attrs.field(init=False, factory=dict)
    #: the dashboard's own identity: its events are not a node's
    ignore_nodes: set[str] = attrs.field(factory=set)
    _changed: anyio.Event | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.started_at = self.clock()

    async def next_event(self) -> None:
        """Wait until the next event is recorded."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def record(self, event: Any) -> None:
        """The subscription callback."""
        if self._changed is not None:
            self._changed.set()
            self._changed = None
        node = getattr(event, "scheduler_id", None)
        moment = min(event.timestamp, self.clock())
        if node and node not in self.ignore_nodes:
            seen = self._last_seen.get(node)
            self._last_seen[node] = moment if seen is None else max(seen, moment)
        if isinstance(event, JobReleased):
            minute = _minute(moment)
            self._per_minute.setdefault(minute, Counter())[event.outcome.name] += 1
            by_node = self._per_node.setdefault(minute, {})
            by_node.setdefault(node or NO_NODE, Counter())[event.outcome.name] += 1
        self._forget_old()

    def _forget_old(self) -> None:
        horizon = _minute(self.clock() - WINDOW)
        for table in (self._per_minute, self._per_node):
            for minute in [m for m in table if m <= horizon]:
                del table[minute]
        for node in [n for n, at in self._last_seen.items() if at <= horizon]:
            del self._last_seen[node]

    @property
    def window_start(self) -> datetime:
        """The first moment covered: the later of an hour ago and the dashboard's start."""
        return max(self.started_at, self.clock() - WINDOW)

    def buckets(self) -> list[Bucket]:
        """One bucket per minute of the last hour, oldest first, the current minute last."""
        self._forget_old()
        now = _minute(self.clock())
        return [
            Bucket(minute, dict(self._per_minute.get(minute, {})))
            for minute in (now - BUCKET * back for back in range(59, -1, -1))
        ]

    def totals(self) -> dict[str, int]:
        self._forget_old()
        totals: Counter[str] = Counter()
        for counts in self._per_minute.values():
            totals.update(counts)
        return {name: totals[name] for name in OUTCOMES}

    def by_node(self) -> dict[str, dict[str, int]]:
        self._forget_old()
        result: dict[str, Counter[str]] = {}
        for nodes in self._per_node.values():
            for node, counts in nodes.items():
                result.setdefault(node, Counter()).update(counts)
        return {node: {name: counts[name] for name in OUTCOMES}
                for node, counts in sorted(result.items())}

    def last_seen(self) -> dict[str, datetime]:
        """Schedulers heard from in the window (acquired or released a job), by id."""
        self._forget_old()
        return dict(sorted(self._last_seen.items()))


EVENT_TYPES: set[type[Any]] = {JobAcquired, JobReleased}
