"""Serial-task drain: how fast does a queue of ``max_running_jobs=1`` jobs run back to back?

``jobs`` jobs of one task with APScheduler's default settings are queued first, then
``nodes`` schedulers start and drain them (every node hears each event at once). Only one
job of the task may run at a time, so the time per job is the chain release -> event ->
claim of the next job -> start: a sum of round trips one after the other. Measured once as
is and once with ``extra_round_trip`` seconds added to every command, the difference divided
by ``extra_round_trip`` is the number of round trips on that chain per job. What the round
trips do not explain is CPU (in memory, the fake server's work is in this process too) or,
if the process was idle, waiting.
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
        return Drain(jobs, seconds, cpu_seconds, nodes_.store_commands())
