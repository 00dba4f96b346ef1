"""Benchmarks of apsched-mongo, beside APScheduler's built-in MongoDB data store.

Both stores run in this one process on the same back end (the in-memory one by default, a
real server with ``--uri``), each scenario in a fresh database. Commands are counted per
client (machine-independent); timings are compared as ratios ours / built-in within one run.
In order:

1. store commands per job through AsyncScheduler with APScheduler's default task settings
   (``max_running_jobs=1``), then with unlimited tasks, on 1, 4 and 16 schedulers that all
   hear each event at once (:mod:`benchmarks.scenarios.per_job`);
2. our MongoDBEventBroker: its commands per job, and its writes per job and added publish
   latency with jobs flowing at a steady rate (:mod:`benchmarks.scenarios.publishing`);
3. schedule fires: how far behind interval schedules run (:mod:`benchmarks.scenarios.fires`);
4. a serial task's queue drained, against the round trips per job
   (:mod:`benchmarks.scenarios.drain`);
5. the DataStore API called directly, and wake-up latency between nodes
   (:mod:`benchmarks.scenarios.direct`, :mod:`benchmarks.scenarios.wakeup`).

Each measurement has a time limit; one that hangs or fails is reported as such in its row.

Usage (from the repository root)::

    python -m benchmarks [--quick] [--json FILE] [--rst FILE] [--uri URI] [--rtt-ms MS]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as ``python benchmarks/run.py``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

from benchmarks.backends import BUILTIN, KINDS, OURS, Backend
from benchmarks.backends import SharedLocalBroker as SharedLocalBroker  # tests/test_drills.py
from benchmarks.report import Figure, apply_goals, machine, markdown, rst, write_json
from benchmarks.scenarios.direct import commands_per_fire, lifecycle_commands_per_job
from benchmarks.scenarios.drain import drain
from benchmarks.scenarios.fires import Fires, schedule_fires
from benchmarks.scenarios.per_job import PerJob, commands_per_job
from benchmarks.scenarios.publishing import Publishing, publishing
from benchmarks.scenarios.wakeup import wakeup_latency

T = TypeVar("T")

DEFAULT = ("Default task settings (max_running_jobs=1): jobs added one at a time while the "
           "schedulers run, every node hearing each event at once")
UNLIMITED = ("Unlimited tasks (max_running_jobs=None): jobs added one at a time while the "
             "schedulers run, every node hearing each event at once")
BROKER = ("Our MongoDBEventBroker on every node (default task settings, polling every 0.5 s "
          "on the in-memory back end)")
DIRECT = "DataStore API called directly (no scheduler)"


@dataclass
class Config:
    quick: bool
    uri: bool
    rtt_ms: float
    jobs: int  # per scenario of sections 1 and 2
    nodes: tuple[int, ...]
    builtin_nodes: tuple[int, ...]
    broker_nodes: tuple[int, ...]
    publish_nodes: int
    publish_jobs: int
    publish_rate: float
    fire_nodes: int
    fire_schedules: int
    fire_interval: float
    fire_seconds: float
    drain_jobs: int
    drain_nodes: tuple[int, ...]
    builtin_drain_nodes: tuple[int, ...]
    drain_extra_rtt_ms: float
    lifecycle_rounds: dict[int, int]
    fire_batches: tuple[int, ...]
    fire_rounds: int
    wakeup_samples: int
    heartbeat: float
    timeout: float  # seconds per measurement

    @classmethod
    def make(cls, quick: bool, uri: bool, rtt_ms: float = 0.0) -> Config:
        return cls(
            quick=quick, uri=uri, rtt_ms=0.0 if uri else rtt_ms,
            jobs=100 if quick else 250, nodes=(1, 4, 16),
            builtin_nodes=(1, 4) if quick else (1, 4, 16), broker_nodes=(1, 4, 16),
            publish_nodes=2, publish_jobs=200 if quick else 600, publish_rate=200.0,
            fire_nodes=3, fire_schedules=50, fire_interval=0.2,
            fire_seconds=5.0 if quick else 30.0,
            drain_jobs=100 if quick else 300, drain_nodes=(1, 4),
            builtin_drain_nodes=(1,) if quick else (1, 4), drain_extra_rtt_ms=10.0,
            lifecycle_rounds={1: 10, 10: 2, 100: 1} if quick else {1: 50, 10: 10, 100: 2},
            fire_batches=(1, 10), fire_rounds=2 if quick else 5,
            wakeup_samples=3 if quick else 8, heartbeat=1.0,
            timeout=240.0 if quick else 900.0,
        )

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["lifecycle_rounds"] = {str(k): v for k, v in self.lifecycle_rounds.items()}
        return data


def _nodes(count: int) -> str:
    return f"{count} node{'s' if count > 1 else ''}"


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:200]


class Runner:
    """Runs each measurement under a time limit and collects the figures."""

    def __init__(self, backend: Backend, config: Config,
                 progress: Callable[[str], None] = lambda _: None) -> None:
        self.backend, self.config, self.progress = backend, config, progress
        self.figures: list[Figure] = []

    async def measure(self, label: str, run: Callable[[], Awaitable[T]]) -> tuple[T | None, str]:
        """``(result, "")``, or ``(None, what went wrong)`` after a failure or time-out."""
        self.progress(label)
        started = time.perf_counter()
        try:
            with anyio.fail_after(self.config.timeout):
                result = await run()
        except TimeoutError:
            note = f"{label}: timed out after {self.config.timeout:g} s"
            self.progress(f"    {note}")
            return None, note
        except Exception as exc:
            logging.getLogger("benchmarks").debug("%s failed", label, exc_info=exc)
            note = f"{label}: {_describe(exc)}"
            self.progress(f"    {note}")
            return None, note
        self.progress(f"    {time.perf_counter() - started:.1f} s")
        return result, ""

    async def both(self, label: str, run: Callable[[str], Awaitable[T]],
                   kinds: tuple[str, ...] = KINDS) -> tuple[dict[str, T | None], str]:
        """The same measurement for each kind of store; notes of failures joined."""
        results: dict[str, T | None] = {}
        notes = []
        for kind in kinds:
            results[kind], note = await self.measure(
                f"{label} [{kind}]", lambda kind=kind: run(kind))  # type: ignore[misc]
            if note:
                notes.append(note)
        return results, "; ".join(notes)

    def add(self, key: str, section: str, name: str, unit: str,
            values: dict[str, Any], value: Callable[[Any], float | None], note: str = "") -> None:
        def get(kind: str) -> float | None:
            result = values.get(kind)
            return None if result is None else value(result)
        self.figures.append(Figure(key, section, name, unit, get(OURS), get(BUILTIN),
                                   note=note))

    # --- 1. store commands per job ---------------------------------------------------------

    async def per_job(self) -> None:
        c = self.config
        for limited, section, prefix in ((True, DEFAULT, "default"),
                                         (False, UNLIMITED, "unlimited")):
            for nodes in c.nodes:
                kinds = KINDS if nodes in c.builtin_nodes else (OURS,)
                results, note = await self.both(
                    f"{prefix} tasks, {_nodes(nodes)}, {c.jobs} jobs",
                    lambda kind, n=nodes, lim=limited: commands_per_job(  # type: ignore[misc]
                        self.backend, kind, n, c.jobs, limited=lim),
                    kinds)
                self.add(f"{prefix}.store.{nodes}", section,
                         f"{_nodes(nodes)}: store commands per job", "commands", results,
                         lambda r: r.store_per_job, note)
                self.add(f"{prefix}.jobs_per_second.{nodes}", section,
                         f"{_nodes(nodes)}: jobs/s, {c.jobs} added one at a time", "jobs/s",
                         results, lambda r: r.jobs_per_second, note)

    # --- 2. our broker -------------------------------------------------------------------

    async def broker(self) -> None:
        c = self.config
        for nodes in c.broker_nodes:
            result, note = await self.measure(
                f"our broker, default tasks, {_nodes(nodes)}, {c.jobs} jobs",
                lambda n=nodes: commands_per_job(  # type: ignore[misc]
                    self.backend, OURS, n, c.jobs, broker="mongo"))
            results: dict[str, PerJob | None] = {OURS: result}
            rows: list[tuple[str, str, Callable[[PerJob], float]]] = [
                ("writes", "broker writes per job", lambda r: r.broker_writes_per_job),
                ("reads", "broker reads per job (polls, clock)",
                 lambda r: r.broker_per_job - r.broker_writes_per_job),
                ("store", "store commands per job (events heard by polling)",
                 lambda r: r.store_per_job),
                ("total", "store + broker commands per job",
                 lambda r: r.store_per_job + r.broker_per_job),
            ]
            for key, name, value in rows:
                self.add(f"broker.default.{key}.{nodes}", BROKER, f"{_nodes(nodes)}: {name}",
                         "commands", results, value, note)

        result_, note = await self.measure(
            f"our broker, unlimited tasks, {_nodes(c.publish_nodes)}, {c.publish_jobs} jobs "
            f"at {c.publish_rate:g}/s",
            lambda: publishing(self.backend, c.publish_nodes, c.publish_jobs, c.publish_rate))
        published: dict[str, Publishing | None] = {OURS: result_}
        section = (f"Our MongoDBEventBroker with jobs flowing: {c.publish_jobs} jobs of an "
                   f"unlimited task added at {c.publish_rate:g}/s on the first of "
                   f"{_nodes(c.publish_nodes)}")

        def ms(values: list[float], fraction: float) -> float | None:
            if not values:
                return None
            ordered = sorted(values)
            return 1000 * ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]

        rows_: list[tuple[str, str, str, Callable[[Publishing], float | None]]] = [
            ("jobs_per_second", "jobs/s reached", "jobs/s", lambda r: r.jobs_per_second),
            ("writes_per_job", "broker writes per job", "writes", lambda r: r.writes_per_job),
            ("added_latency_median", "added publish latency, median", "ms",
             lambda r: ms(r.added_latency, 0.5)),
            ("added_latency_p95", "added publish latency, p95", "ms",
             lambda r: ms(r.added_latency, 0.95)),
            ("added_latency_max", "added publish latency, max", "ms",
             lambda r: ms(r.added_latency, 1.0)),
            ("unwritten", "events published but never written", "events",
             lambda r: r.unwritten),
            ("lost", "first node's events a second node never heard", "events",
             lambda r: r.lost),
            ("out_of_order", "... heard after an event published later", "events",
             lambda r: r.out_of_order),
        ]
        for key, name, unit, get in rows_:
            self.add(f"broker.batched.{key}", section, name, unit, published, get, note)

    # --- 3. schedule fires ---------------------------------------------------------------

    async def fires(self) -> None:
        c = self.config
        what = (f"{c.fire_schedules} schedules every {c.fire_interval:g} s on "
                f"{_nodes(c.fire_nodes)} for {c.fire_seconds:g} s")
        section = (f"Schedule fires: {what} (each schedule of its own task, default "
                   "settings)")
        for broker, kinds, label in (("mongo", (OURS,), "our broker"),
                                     ("fanout", KINDS, "events heard at once")):
            results, note = await self.both(
                f"fires, {label}, {what}",
                lambda kind, b=broker: schedule_fires(  # type: ignore[misc]
                    self.backend, kind, c.fire_nodes, c.fire_schedules, c.fire_interval,
                    c.fire_seconds, broker=b),
                kinds)
            rows: list[tuple[str, str, str, Callable[[Fires], float | None]]] = [
                ("ran", "fires run / due", "%", lambda r: 100 * r.ran / r.due),
                ("lag_median", "lag (start - scheduled fire time), median", "s",
                 lambda r: statistics.median(r.lags) if r.lags else None),
                ("lag_p95", "lag, p95", "s", lambda r: r.percentile(0.95) if r.lags else None),
                ("lag_max", "lag, max", "s", lambda r: max(r.lags) if r.lags else None),
                ("drift", "drift (lag growth per second of run)", "s/s", lambda r: r.drift),
                ("backlog", "jobs queued or running at the end", "jobs", lambda r: r.backlog),
            ]
            for key, name, unit, value in rows:
                self.add(f"fires.{broker}.{key}", section, f"{label}: {name}", unit, results,
                         value, note)

    # --- 4. serial drain -----------------------------------------------------------------

    async def drain(self) -> None:
        c = self.config
        extra = c.drain_extra_rtt_ms / 1000
        section = (f"Serial-task drain: {c.drain_jobs} queued jobs of one max_running_jobs=1 "
                   "task, every node hearing each event at once")
        for nodes in c.drain_nodes:
            kinds = KINDS if nodes in c.builtin_drain_nodes else (OURS,)
            base, note = await self.both(
                f"drain, {c.drain_jobs} jobs, {_nodes(nodes)}",
                lambda kind, n=nodes: drain(  # type: ignore[misc]
                    self.backend, kind, n, c.drain_jobs),
                kinds)
            where = _nodes(nodes)
            self.add(f"drain.{nodes}.jobs_per_second", section, f"{where}: jobs/s", "jobs/s",
                     base, lambda r: r.jobs_per_second, note)
            self.add(f"drain.{nodes}.store", section, f"{where}: store commands per job",
                     "commands", base, lambda r: r.store_per_job, note)
            self.add(f"drain.{nodes}.ms_per_job", section, f"{where}: time per job", "ms",
                     base, lambda r: 1000 * r.seconds_per_job, note)
            self.add(f"drain.{nodes}.cpu_ms_per_job", section,
                     f"{where}: CPU per job (this process, in-memory server included)", "ms",
                     base, lambda r: 1000 * r.cpu_seconds_per_job, note)
            if c.uri:
                continue  # a real server's round trip is what it is
            slow, slow_note = await self.measure(
                f"drain, {c.drain_jobs} jobs, {where}, +{c.drain_extra_rtt_ms:g} ms per command",
                lambda n=nodes: drain(  # type: ignore[misc]
                    self.backend, OURS, n, c.drain_jobs, extra))
            slower = {OURS: slow}
            plus = f"+{c.drain_extra_rtt_ms:g} ms per command"
            self.add(f"drain.{nodes}.ms_per_job_slower", section,
                     f"{where}, {plus}: time per job", "ms", slower,
                     lambda r: 1000 * r.seconds_per_job, slow_note)
            self.add(f"drain.{nodes}.round_trips", section,
                     f"{where}, {plus}: round trips one after another per job", "round trips",
                     slower, lambda r: r.serial_round_trips_per_job, slow_note)
            self.add(f"drain.{nodes}.cpu_ms_per_job_slower", section,
                     f"{where}, {plus}: CPU per job", "ms", slower,
                     lambda r: 1000 * r.cpu_seconds_per_job, slow_note)
            if nodes == 1:  # on several nodes, CPU and round trips overlap
                self.add(f"drain.{nodes}.unexplained_ms_per_job", section,
                         f"{where}, {plus}: rest of the time per job (idle, or waiting for a "
                         "core)", "ms", slower, lambda r: 1000 * r.unexplained_per_job,
                         slow_note)

    # --- 5. the DataStore API directly, wake-up latency ------------------------------------

    async def direct(self) -> None:
        c = self.config
        for batch, rounds in c.lifecycle_rounds.items():
            results, note = await self.both(
                f"job life cycle, batch {batch}",
                lambda kind, b=batch, r=rounds: lifecycle_commands_per_job(  # type: ignore[misc]
                    self.backend, kind, b, r))
            self.add(f"direct.lifecycle.{batch}", DIRECT,
                     f"add -> acquire -> release, batch {batch}: commands per job", "commands",
                     results, lambda r: r, note)
        for batch in c.fire_batches:
            results, note = await self.both(
                f"schedule fire, batch {batch}",
                lambda kind, b=batch: commands_per_fire(  # type: ignore[misc]
                    self.backend, kind, b, c.fire_rounds))
            self.add(f"direct.fire.{batch}", DIRECT,
                     f"schedule fire, batch {batch}: commands per fire", "commands", results,
                     lambda r: r, note)
        results, note = await self.both(
            "wake-up latency",
            lambda kind: wakeup_latency(self.backend, kind, c.wakeup_samples, c.heartbeat))
        self.add("direct.wakeup", DIRECT,
                 f"wake-up latency node A -> B, mean of {c.wakeup_samples} (ours: our broker "
                 f"polling every 0.1 s; built-in: local brokers, B's own {c.heartbeat:g} s "
                 "timer)", "s", results, lambda r: r, note)

    async def run_all(self) -> list[Figure]:
        await self.per_job()
        await self.broker()
        await self.fires()
        await self.drain()
        await self.direct()
        apply_goals(self.figures)
        return self.figures


def headline(backend: Backend, config: Config, seconds: float) -> str:
    return (
        f"Benchmarks on {backend.description}{' (--quick)' if config.quick else ''}, "
        f"{datetime.now(UTC):%Y-%m-%d}, {machine()}, {seconds:.0f} s. "
        "Ratio = ours / built-in; every awaited collection operation is one command."
    )


async def _run(args: argparse.Namespace, config: Config) -> tuple[Backend, list[Figure]]:
    backend = Backend(args.uri, args.rtt_ms / 1000)
    try:
        runner = Runner(backend, config, lambda line: print(line, file=sys.stderr, flush=True))
        return backend, await runner.run_all()
    finally:
        await backend.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer jobs and shorter runs (a few minutes on 2 cores)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--rst", metavar="FILE",
                        help="also write the tables as reST (for docs/comparison.rst)")
    parser.add_argument("--uri", help="a real MongoDB server (default: in-memory)")
    parser.add_argument("--rtt-ms", type=float, default=0.0,
                        help="in memory: add this network round trip to every command")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    config = Config.make(args.quick, bool(args.uri), args.rtt_ms)
    started = time.perf_counter()
    backend, figures = anyio.run(_run, args, config)
    seconds = time.perf_counter() - started
    title = headline(backend, config, seconds)
    print(markdown(figures, title))
    if args.json:
        write_json(args.json, config.as_json(), seconds, figures)
    if args.rst:
        Path(args.rst).write_text(rst(figures, title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
