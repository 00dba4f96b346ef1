"""Short human-readable texts for the pages: triggers in words, durations, counts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.calendarinterval import CalendarIntervalTrigger
from apscheduler.triggers.combining import AndTrigger, OrTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .queries import COUNT_CAP

_INTERVAL_UNITS = (("weeks", "w"), ("days", "d"), ("hours", "h"), ("minutes", "min"),
                   ("seconds", "s"), ("microseconds", "µs"))
_CALENDAR_UNITS = (("years", "year"), ("months", "month"), ("weeks", "week"), ("days", "day"))
_CRON_FIELDS = ("year", "month", "day", "week", "day_of_week", "hour", "minute", "second")


def _number(value: float) -> str:
    return f"{value:g}"


def trigger_in_words(trigger: Any) -> str:
    """``every 30 s``, ``cron: hour 9, minute 0 on mon-fri (Europe/Paris)``, ``once at ...``."""
    if trigger is None:
        return "?"
    if isinstance(trigger, IntervalTrigger):
        parts = [f"{_number(getattr(trigger, name))} {unit}" for name, unit in _INTERVAL_UNITS
                 if getattr(trigger, name)]
        return "every " + " ".join(parts or ["0 s"])
    if isinstance(trigger, CalendarIntervalTrigger):
        parts = [f"{getattr(trigger, name)} {unit}{'s' if getattr(trigger, name) != 1 else ''}"
                 for name, unit in _CALENDAR_UNITS if getattr(trigger, name)]
        at = f"{trigger.hour:02d}:{trigger.minute:02d}:{trigger.second:02d}"
        return f"every {' '.join(parts)} at {at} ({trigger.timezone})"
    if isinstance(trigger, CronTrigger):
        # A decoded trigger keeps its fields only in this form (its serialized state)
        fields = trigger.__getstate__()["fields"]
        parts = [f"{name.replace('_', ' ')} {value}" for name, value in zip(
            _CRON_FIELDS, fields, strict=False) if value != "*"]
        return f"cron: {', '.join(parts) or 'every second'} ({trigger.timezone})"
    if isinstance(trigger, DateTrigger):
        return f"once at {trigger.run_time.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
    if isinstance(trigger, AndTrigger | OrTrigger):
        joined = "; ".join(trigger_in_words(inner) for inner in trigger.triggers)
        return f"{'all' if isinstance(trigger, AndTrigger) else 'any'} of: {joined}"
    return type(trigger).__name__


def duration(value: timedelta | None) -> str:
    """``3.2 s``, ``4 min 10 s``, ``2 h 5 min``, ``3 d 4 h``; negative as ``-…``."""
    if value is None:
        return ""
    seconds = value.total_seconds()
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{sign}{minutes} min {secs} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{sign}{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{sign}{days} d {hours} h"


def count(value: int) -> str:
    """A count, marked as a lower bound once counting stopped at the cap."""
    return f"{value:,}+" if value >= COUNT_CAP else f"{value:,}"


def iso(value: datetime | None) -> str:
    """UTC ISO 8601 with milliseconds (the page's script shows it in the viewer's zone)."""
    if value is None:
        return ""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def utc_text(value: datetime | None) -> str:
    """What is shown before the script localizes it (and without script)."""
    if value is None:
        return ""
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC"
