"""The benchmark harness in a tiny configuration, so it cannot silently rot."""

from __future__ import annotations

import pytest

from benchmarks.run import BUILTIN, OURS, Backend, commands_per_fire, commands_per_job

pytestmark = pytest.mark.anyio


async def test_command_counts_are_positive_and_deterministic() -> None:
    backend = Backend()
    try:
        per_job = [await commands_per_job(backend, OURS, 10, 2) for _ in range(2)]
        per_fire = [await commands_per_fire(backend, OURS, 3, 2) for _ in range(2)]
        builtin_per_job = await commands_per_job(backend, BUILTIN, 10, 1)
    finally:
        await backend.close()
    assert per_job[0] > 0 and per_job[0] == per_job[1]
    assert per_fire[0] > 0 and per_fire[0] == per_fire[1]
    # One insert per add_job and one delete per release_job are the floor of the API
    assert 2 <= per_job[0] < builtin_per_job
