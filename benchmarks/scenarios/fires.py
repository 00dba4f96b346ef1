"""Schedule-fire throughput: do fires keep up, or fall further and further behind?

``schedules`` interval schedules (each of its own task, with APScheduler's default settings)
fire every ``interval`` seconds on ``nodes`` schedulers for ``duration`` seconds. Each job
notes its start; its *lag* is the start minus the scheduled fire time. A back end that keeps
up shows a small, flat lag; one that does not shows lag growing over the run (the *drift*:
the least-squares slope of lag against scheduled time, in seconds of lag per second of run)
and fewer fires run than were due (a schedule processed late fires once for all the fire
times it missed: APScheduler's default coalescing), with jobs piling up in the queue.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import uuid4

import anyio
from apscheduler.triggers.interval import IntervalTrigger

from ..backends import Backend
from ..cluster import BrokerKind, cluster
from ..jobs import fire_job, fires


@dataclass
class Fires:
    due: int  # fires scheduled within the run
    ran: int  # fire jobs that started within the run
    lags: list[float]  # seconds, in order of scheduled fire time
    drift: float  # seconds of lag per second of run
    backlog: int  # jobs queued or running when the run ended

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.lags)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2 or len(set(xs)) < 2:
        return 0.0
    return statistics.linear_regression(xs, ys).slope


async def schedule_fires(backend: Backend, kind: str, nodes: int, schedules: int,
                         interval: float, duration: float, *,
                         broker: BrokerKind = "mongo") -> Fires:
    run_id = uuid4().hex
    async with cluster(backend, kind, nodes, broker=broker) as nodes_:
        first_fire = datetime.now(UTC) + timedelta(seconds=1)  # after the set-up below
        for number in range(schedules):
            task_id = f"fire-{number}"
            await nodes_.first.configure_task(task_id, func=fire_job)
            await nodes_.first.add_schedule(
                task_id, IntervalTrigger(seconds=interval, start_time=first_fire),
                id=task_id, args=(run_id,))
        await nodes_.start()
        end = first_fire + timedelta(seconds=duration)
        await anyio.sleep(max(0.0, (end - datetime.now(UTC)).total_seconds()))
        backlog = len(await nodes_.first.get_jobs())
        ran = sorted((scheduled, started) for scheduled, started in fires.pop(run_id, [])
                     if started < end)
    due = schedules * (int(duration / interval - 1e-9) + 1)
    lags = [(started - scheduled).total_seconds() for scheduled, started in ran]
    offsets = [(scheduled - first_fire).total_seconds() for scheduled, _ in ran]
    return Fires(due=due, ran=len(ran), lags=lags, drift=_slope(offsets, lags),
                 backlog=backlog)


