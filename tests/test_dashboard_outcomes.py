"""The outcome log (what the broker subscription heard), the SVG plot's geometry and the
texts in words."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import pytest
from apscheduler import JobAcquired, JobOutcome, JobReleased
from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.combining import AndTrigger, OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from apsched_mongo.dashboard import plot
from apsched_mongo.dashboard.outcomes import OUTCOMES, OutcomeLog
from apsched_mongo.dashboard.words import count, duration, trigger_in_words

START = datetime(2026, 11, 27, 12, 0, 30, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now


def released(node: str, outcome: JobOutcome, at: datetime) -> JobReleased:
    return JobReleased(job_id=uuid4(), scheduler_id=node, task_id="t", outcome=outcome,
                       scheduled_start=None, started_at=None, timestamp=at)


def test_releases_counted_per_minute_and_node() -> None:
    clock = Clock()
    log = OutcomeLog(clock, ignore_nodes={""})
    clock.now = START + timedelta(minutes=3)
    log.record(released("node-1", JobOutcome.success, START + timedelta(minutes=1)))
    log.record(released("node-1", JobOutcome.success, START + timedelta(minutes=1, seconds=20)))
    log.record(released("node-2", JobOutcome.error, START + timedelta(minutes=2)))
    log.record(released("", JobOutcome.cancelled, START + timedelta(minutes=2)))  # discard_job
    log.record(JobAcquired(job_id=uuid4(), scheduler_id="node-3", task_id="t",
                           scheduled_start=None, timestamp=START + timedelta(minutes=2)))

    buckets = log.buckets()
    assert len(buckets) == 60 and buckets[-1].start == datetime(2026, 11, 27, 12, 3, tzinfo=UTC)
    assert buckets[-3].counts == {"success": 2}  # 12:01
    assert buckets[-2].counts == {"error": 1, "cancelled": 1}  # 12:02
    assert log.totals() == {name: {"success": 2, "error": 1, "cancelled": 1}.get(name, 0)
                            for name in OUTCOMES}
    assert log.by_node()["node-1"]["success"] == 2
    assert sorted(log.last_seen()) == ["node-1", "node-2", "node-3"]  # not the dashboard ("")


def test_window_is_one_hour_and_starts_with_the_dashboard() -> None:
    clock = Clock()
    log = OutcomeLog(clock)
    assert log.window_start == START  # less than an hour since it started
    log.record(released("node-1", JobOutcome.success, START))
    clock.now = START + timedelta(minutes=30)
    assert log.totals()["success"] == 1
    clock.now = START + timedelta(hours=1, minutes=1)
    assert log.window_start == clock.now - timedelta(hours=1)
    assert log.totals()["success"] == 0 and log.last_seen() == {}


def test_future_timestamps_count_as_now() -> None:
    """A node whose clock runs ahead must not put bars past "now"."""
    clock = Clock()
    log = OutcomeLog(clock)
    log.record(released("fast", JobOutcome.success, START + timedelta(hours=2)))
    assert log.buckets()[-1].counts == {"success": 1}


def test_plot_geometry() -> None:
    clock = Clock()
    log = OutcomeLog(clock)
    clock.now = START + timedelta(minutes=10)
    for _ in range(7):
        log.record(released("n", JobOutcome.success, clock.now))
    log.record(released("n", JobOutcome.error, clock.now))
    drawn = plot.build(log.buckets(), log.started_at)
    assert drawn.total == 8
    assert [tick.label for tick in drawn.y_ticks] == ["0", "2", "4", "6", "8", "10"]
    success, error = drawn.bars  # stacked in outcome order, in the last slot
    assert success.colour == plot.COLOURS["success"] and error.colour == plot.COLOURS["error"]
    assert success.height == pytest.approx(7 * drawn.plot_height / 10)
    assert error.y + error.height == pytest.approx(success.y)
    assert success.x > drawn.left + drawn.plot_width * 0.95
    # the 49 whole minutes before the dashboard started (12:00:30) are shaded
    assert drawn.unobserved is not None
    assert drawn.unobserved.width == pytest.approx(drawn.plot_width * 49 / 60)
    assert drawn.x_ticks[0].label == "now" and drawn.x_ticks[1].label == "-10 min"


@pytest.mark.parametrize(("value", "expected"), [(0, 1), (1, 1), (3, 5), (7, 10), (10, 10),
                                                 (11, 20), (480, 500), (501, 1000)])
def test_nice_ceiling(value: int, expected: int) -> None:
    assert plot.nice_ceiling(value) == expected


@pytest.mark.parametrize(("trigger", "words"), [
    (IntervalTrigger(seconds=30), "every 30 s"),
    (IntervalTrigger(hours=2, minutes=30), "every 2 h 30 min"),
    (CronTrigger.from_crontab("0 9 * * mon-fri", timezone="Europe/Paris"),
     "cron: day of week mon-fri, hour 9, minute 0, second 0 (Europe/Paris)"),
    (CalendarIntervalTrigger(months=1, hour=3, timezone="UTC"), "every 1 month at 03:00:00 (UTC)"),
    (DateTrigger(datetime(2027, 1, 2, 3, 4, 5, tzinfo=UTC)), "once at 2027-01-02 03:04:05 UTC"),
    (OrTrigger([IntervalTrigger(seconds=1), IntervalTrigger(minutes=1)]),
     "any of: every 1 s; every 1 min"),
    (AndTrigger([IntervalTrigger(seconds=1), IntervalTrigger(seconds=2)]),
     "all of: every 1 s; every 2 s"),
])
def test_trigger_in_words(trigger: object, words: str) -> None:
    assert trigger_in_words(trigger) == words


def test_trigger_in_words_after_a_round_trip() -> None:
    """Stored triggers come back through the serializer with only their state."""
    from apscheduler.serializers.pickle import PickleSerializer

    serializer = PickleSerializer()
    cron = serializer.deserialize(serializer.serialize(CronTrigger(second="*/3")))
    assert trigger_in_words(cron) == "cron: second */3 (Etc/UTC)"


def test_durations_and_counts() -> None:
    assert duration(timedelta(seconds=3.24)) == "3.2 s"
    assert duration(timedelta(seconds=-250)) == "-4 min 10 s"
    assert duration(timedelta(hours=2, minutes=5)) == "2 h 5 min"
    assert duration(timedelta(days=3, hours=4)) == "3 d 4 h"
    assert count(1234) == "1,234" and count(100_000) == "100,000+"
