"""attrs validators for numeric options, so a bad value fails at construction by name."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any


def _number(attribute: Any, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | timedelta):
        raise TypeError(f"{attribute.name} must be a number of seconds, not {value!r}")
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if math.isnan(seconds):
        raise ValueError(f"{attribute.name} must be a number of seconds, not NaN")
    return seconds


def positive(instance: Any, attribute: Any, value: Any) -> None:
    if _number(attribute, value) <= 0:
        raise ValueError(f"{attribute.name} must be positive, not {value!r}")


def positive_or_zero(instance: Any, attribute: Any, value: Any) -> None:
    if _number(attribute, value) < 0:
        raise ValueError(f"{attribute.name} must be zero or positive, not {value!r}")
