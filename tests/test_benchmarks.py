"""The benchmark harness in a tiny configuration, so it cannot silently rot."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import anyio
import pytest

from apsched_mongo.memory import MemoryMongoClient, MemoryServer
from benchmarks.backends import BUILTIN, OURS, Backend
from benchmarks.counting import (
    WRITE_COMMANDS,
    CommandCounter,
    counting_async_client,
    time_in_round_trips,
)
from benchmarks.report import GOALS, markdown, write_json
from benchmarks.run import DEFAULT, UNLIMITED, Config, Runner
from benchmarks.scenarios.direct import lifecycle_commands_per_job
from benchmarks.scenarios.per_job import commands_per_job

pytestmark = pytest.mark.anyio


async def test_every_awaited_operation_counts_once_by_name() -> None:
    counter = CommandCounter()
    client = counting_async_client(MemoryMongoClient(MemoryServer()), counter)
    collection = client.get_database("bench_counting").get_collection("things")
    await collection.insert_one({"_id": 1})
    await collection.find({}).sort("_id").limit(5).to_list(None)
    await collection.count_documents({})
    await client.admin.command("ping")
    await collection.database.client.get_database("bench_counting")["things"].delete_many({})
    assert dict(counter.by_name) == {"insert_one": 1, "find": 1, "count_documents": 1,
                                     "ping": 1, "delete_many": 1}
    assert counter.writes == 2


async def test_simulated_round_trip_is_spent_per_command() -> None:
    counter = CommandCounter(round_trip=0.02)
    client = counting_async_client(MemoryMongoClient(MemoryServer()), counter)
    collection = client.get_database("bench_rtt")["things"]
    started = time.perf_counter()
    for number in range(5):
        await collection.insert_one({"_id": number})
    assert time.perf_counter() - started >= 5 * 0.02


def test_round_trips_at_the_same_time_count_once() -> None:
    first, second = CommandCounter(round_trip=1.0), CommandCounter(round_trip=1.0)
    first.round_trip_starts += [0.0, 0.5, 3.0]  # 0-1 and 0.5-1.5 overlap; 3-4 stands alone
    second.round_trip_starts += [1.5]  # 1.5-2.5 follows on directly
    assert time_in_round_trips([first, second]) == pytest.approx(3.5)


async def test_direct_life_cycle_counts_are_deterministic() -> None:
    backend = Backend()
    try:
        counts = [await lifecycle_commands_per_job(backend, OURS, 10, 2) for _ in range(2)]
        builtin = await lifecycle_commands_per_job(backend, BUILTIN, 10, 1)
    finally:
        await backend.close()
    assert counts[0] == counts[1] > 0
    assert builtin > 0


@pytest.mark.parametrize("kind", [OURS, BUILTIN])
async def test_scheduler_counts_split_store_and_broker(kind: str) -> None:
    """Every job must at least be written (add) and removed (release): a counter that misses
    operations would fall below two writes per job."""
    backend = Backend()
    try:
        fan_out = await commands_per_job(backend, kind, 2, 8)
        polled = (await commands_per_job(backend, OURS, 2, 8, broker="mongo")
                  if kind == OURS else None)
    finally:
        await backend.close()
    writes = sum(n for name, n in fan_out.store.items() if name in WRITE_COMMANDS)
    assert writes >= 2 * 8
    assert not fan_out.broker  # the fan-out bus sends nothing to the server
    if polled is not None:
        assert polled.broker_writes_per_job > 0  # events go through the server
        assert polled.store_per_job > 0


async def test_a_failing_or_hanging_measurement_becomes_a_note() -> None:
    config = dataclasses.replace(Config.make(quick=True, uri=False), timeout=0.2)
    runner = Runner(Backend(), config)

    async def crash() -> None:
        raise RuntimeError("store exploded")

    async def hang() -> None:
        await anyio.sleep_forever()

    assert await runner.measure("crash", crash) == (
        None, "crash: failed: RuntimeError: store exploded")
    assert await runner.measure("hang", hang) == (None, "hang: timed out after 0.2 s")


async def test_tiny_run_reports_every_section_with_goals_and_ratios(tmp_path: Path) -> None:
    config = dataclasses.replace(
        Config.make(quick=True, uri=False),
        jobs=6, nodes=(1, 4), builtin_nodes=(1,), broker_nodes=(2,),
        publish_jobs=10, publish_rate=200.0,
        fire_nodes=2, fire_schedules=3, fire_interval=0.2, fire_seconds=0.6,
        drain_jobs=5, drain_nodes=(1,), builtin_drain_nodes=(1,),
        lifecycle_rounds={1: 2}, fire_batches=(2,), fire_rounds=1,
        wakeup_samples=1, heartbeat=0.3, timeout=60.0,
    )
    backend = Backend()
    try:
        figures = await Runner(backend, config).run_all()
    finally:
        await backend.close()
    assert not [figure.note for figure in figures if figure.note]

    path = tmp_path / "figures.json"
    write_json(str(path), config.as_json(), 1.0, figures)
    data = json.loads(path.read_text())
    rows = {row["key"]: row for row in data["figures"]}
    for row in data["figures"]:
        assert {"key", "section", "name", "unit", "ours", "builtin", "ratio", "goal",
                "met", "note"} <= row.keys()
    # The default-settings rows come first, then unlimited tasks
    assert data["figures"][0]["key"] == "default.store.1"
    assert data["figures"][0]["section"] == DEFAULT
    assert rows["unlimited.store.1"]["section"] == UNLIMITED
    # Side by side with the built-in store: a ratio wherever both were measured
    default_1 = rows["default.store.1"]
    assert default_1["ratio"] == pytest.approx(default_1["ours"] / default_1["builtin"])
    assert rows["default.store.4"]["builtin"] is None
    # The goals of issue 9 sit next to the figures they judge
    for key in ("default.store.1", "default.store.4", "unlimited.store.1",
                "broker.batched.writes_per_job", "broker.batched.added_latency_p95"):
        assert rows[key]["goal"] == GOALS[key].text
        assert rows[key]["met"] in (True, False)
    for key in ("broker.default.writes.2", "broker.default.total.2", "fires.mongo.lag_p95",
                "fires.fanout.drift", "drain.1.jobs_per_second", "drain.1.round_trips",
                "direct.lifecycle.1", "direct.wakeup"):
        assert rows[key]["ours"] is not None, key
    assert rows["broker.batched.lost"]["ours"] == 0
    # A serial task's jobs run one after another: at least one round trip each (ours
    # releases a job and claims the next in the same write)
    assert rows["drain.1.round_trips"]["ours"] >= 1
    assert markdown(figures, "title").index(DEFAULT) < markdown(figures, "title").index(
        UNLIMITED)
