"""The outcomes plot as plain SVG geometry, drawn on the server: no chart library, no
script, nothing to download. The template ``_plot.html`` turns it into markup (escaped)."""

from __future__ import annotations

import math
from datetime import datetime

import attrs

from .outcomes import OUTCOMES, Bucket

COLOURS = {
    "success": "#2e7d32",
    "error": "#c62828",
    "missed_start_deadline": "#ef6c00",
    "deserialization_failed": "#6a1b9a",
    "cancelled": "#78909c",
    "abandoned": "#ad1457",
}
WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 44, 12, 12, 30


@attrs.frozen
class Rect:
    x: float
    y: float
    width: float
    height: float
    colour: str
    label: str


@attrs.frozen
class Tick:
    position: float
    label: str


@attrs.frozen
class Plot:
    width: int
    height: int
    left: int
    top: int
    plot_width: float
    plot_height: float
    bars: list[Rect]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    unobserved: Rect | None
    legend: list[tuple[str, str]]
    total: int


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is >= ``value`` (at least 1)."""
    if value <= 1:
        return 1
    power: int = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 5, 10):
        if factor * power >= value:
            return factor * power
    raise AssertionError("unreachable")  # pragma: no cover


def build(buckets: list[Bucket], observed_from: datetime) -> Plot:
    """Stacked bars, one per minute, oldest left; the minutes before ``observed_from``
    (the dashboard was not listening yet) are shaded."""
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM
    slot = plot_width / max(len(buckets), 1)
    top = nice_ceiling(max((bucket.total for bucket in buckets), default=0))
    scale = plot_height / top
    bars: list[Rect] = []
    first_observed = len(buckets)
    for index, bucket in enumerate(buckets):
        if first_observed == len(buckets) and bucket.start >= observed_from.replace(
            second=0, microsecond=0
        ):
            first_observed = index
        x = LEFT + index * slot + slot * 0.1
        y: float = TOP + plot_height
        minutes_ago = len(buckets) - 1 - index
        when = "this minute" if minutes_ago == 0 else f"{minutes_ago} min ago"
        for name in OUTCOMES:
            count = bucket.counts.get(name, 0)
            if not count:
                continue
            height = count * scale
            y -= height
            bars.append(Rect(x, y, slot * 0.8, height, COLOURS[name],
                             f"{when} ({bucket.start:%H:%M} UTC): {count} {name}"))
    y_ticks = [Tick(TOP + plot_height - value * scale, str(value))
               for value in _tick_values(top)]
    x_ticks = [Tick(LEFT + index * slot + slot / 2,
                    "now" if index == len(buckets) - 1 else f"-{len(buckets) - 1 - index} min")
               for index in range(len(buckets) - 1, -1, -10)]
    unobserved = None
    if first_observed > 0:
        unobserved = Rect(LEFT, TOP, first_observed * slot, plot_height, "#eceff1",
                          "before the dashboard started listening")
    return Plot(WIDTH, HEIGHT, LEFT, TOP, plot_width, plot_height, bars, y_ticks, x_ticks,
                unobserved, [(name, COLOURS[name]) for name in OUTCOMES],
                sum(bucket.total for bucket in buckets))


def _tick_values(top: int) -> list[int]:
    step = max(top // 5, 1) if top > 5 else 1
    return list(range(0, top + 1, step))
