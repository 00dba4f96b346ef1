"""Commands per job through AsyncScheduler: the issue's method.

``jobs`` no-op jobs are added one at a time on the first node while every node runs; the
count covers everything from the first ``add_job`` until the last job is released and the
work that release set off is done, on all nodes, divided by ``jobs``. Setup (starting the
nodes, creating the task) is not counted.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from ..backends import Backend
from ..cluster import BrokerKind, cluster
from ..counting import WRITE_COMMANDS
from ..jobs import default_job, unlimited_job


@dataclass
class PerJob:
    jobs: int
    seconds: float
    store: Counter[str]
    broker: Counter[str]

    @property
    def store_per_job(self) -> float:
        return sum(self.store.values()) / self.jobs

    @property
    def broker_per_job(self) -> float:
        return sum(self.broker.values()) / self.jobs

    @property
    def broker_writes_per_job(self) -> float:
        return sum(n for name, n in self.broker.items() if name in WRITE_COMMANDS) / self.jobs

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds


async def commands_per_job(backend: Backend, kind: str, nodes: int, jobs: int, *,
                           limited: bool = True, broker: BrokerKind = "fanout") -> PerJob:
    """:param limited: the task has APScheduler's default ``max_running_jobs=1``
    (``False``: no limit)"""
    func = default_job if limited else unlimited_job
    async with cluster(backend, kind, nodes, broker=broker) as nodes_:
        await nodes_.first.configure_task(func)
        await nodes_.start()
        releases = nodes_.watch_releases()
        await nodes_.settle()
        nodes_.reset()
        started = time.perf_counter()
        for _ in range(jobs):
            await nodes_.first.add_job(func)
        await releases.wait_for(jobs)
        seconds = time.perf_counter() - started
        await nodes_.settle()
        return PerJob(jobs, seconds, nodes_.store_commands(), nodes_.broker_commands())
