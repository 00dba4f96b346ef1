"""The functions the benchmarked jobs run.

They live in a module of their own so that every node finds them by reference
(``benchmarks.jobs:default_job``), as separate processes would.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from apscheduler import current_job, task


async def default_job() -> None:
    """A no-op job of a task with APScheduler's default settings (``max_running_jobs=1``)."""


@task(max_running_jobs=None)  # add_job() would reset a configure_task() setting to defaults
async def unlimited_job() -> None:
    """A no-op job of a task without a limit on running jobs."""


#: run id -> (scheduled fire time, actual start) of each fire_job that ran
fires: defaultdict[str, list[tuple[datetime, datetime]]] = defaultdict(list)


async def fire_job(run_id: str) -> None:
    """Records how late this scheduled job started."""
    started = datetime.now(UTC)
    scheduled = current_job.get().scheduled_fire_time
    if scheduled is not None:
        fires[run_id].append((scheduled, started))
