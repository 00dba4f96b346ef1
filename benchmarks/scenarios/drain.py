"""Serial-task drain: how fast does a queue of ``max_running_jobs=1`` jobs run back to back?

``jobs`` jobs of one task with APScheduler's default settings are queued first, then
``nodes`` schedulers start and drain them (every node hears each event at once). Only one
job of the task may run at a time, so the time per job is the chain release -> event ->
claim of the next job -> start, run once per job: CPU (in memory, the fake server's work is
in this process too), plus round trips one after the other, plus any idle wait.

With a simulated round trip (``--rtt-ms`` or ``extra_round_trip``) the round trips on that
chain are measured directly: the time during which at least one store command was in its
round trip, divided by the round trip (commands sent at the same time count once).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from ..backends import Backend
from ..cluster import cluster
from ..jobs import default_job


@dataclass
class Drain:
    jobs: int
    seconds: float
    cpu_seconds: float  # of this whole process: the in-memory server's work included
    store: Counter[str]
    round_trip: float  # simulated, per command (0: none)
    round_trip_seconds: float  # time in simulated round trips, overlaps counted once

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds

    @property
    def seconds_per_job(self) -> float:
        return self.seconds / self.jobs

    @property
    def cpu_seconds_per_job(self) -> float:
        return self.cpu_seconds / self.jobs

    @property
    def serial_round_trips_per_job(self) -> float | None:
        """Round trips one after another per job (with a simulated round trip)."""
        if not self.round_trip:
            return None
        return self.round_trip_seconds / self.round_trip / self.jobs

    @property
    def unexplained_per_job(self) -> float:
        """Seconds per job neither in round trips nor computing: idle waits (or, on a busy
        machine, waiting for a core). Meaningful on one node only: with several, one node
        computes while another waits for a reply."""
        return (self.seconds - self.round_trip_seconds - self.cpu_seconds) / self.jobs

    @property
    def store_per_job(self) -> float:
        return sum(self.store.values()) / self.jobs


async def drain(backend: Backend, kind: str, nodes: int, jobs: int,
                extra_round_trip: float = 0.0) -> Drain:
    async with cluster(backend, kind, nodes, extra_round_trip=extra_round_trip) as nodes_:
        for _ in range(jobs):
            await nodes_.first.add_job(default_job)
        releases = nodes_.watch_releases()
        nodes_.reset()
        started, cpu_started = time.perf_counter(), time.process_time()
        await nodes_.start()
        await releases.wait_for(jobs)
        seconds = time.perf_counter() - started
        cpu_seconds = time.process_time() - cpu_started
        await nodes_.settle()
        return Drain(jobs, seconds, cpu_seconds, nodes_.store_commands(),
                     backend.round_trip + extra_round_trip, nodes_.store_round_trip_seconds())
