"""Figures, the goals of issue 9 beside them, and the tables (Markdown, reST, JSON)."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    """One measured quantity, for our store and (where comparable) the built-in one.

    ``key`` is stable across runs (for ``--json`` readers); ``ratio`` is ours / built-in.
    """

    key: str
    section: str
    name: str
    unit: str
    ours: float | None
    builtin: float | None = None
    goal: str = ""
    met: bool | None = None
    note: str = ""
    ratio: float | None = field(init=False)

    def __post_init__(self) -> None:
        self.ratio = (self.ours / self.builtin
                      if self.ours is not None and self.builtin else None)


@dataclass
class Goal:
    text: str
    check: Callable[[float, dict[str, Figure]], bool | None]


def _relative(base_key: str, factor: float) -> Callable[[float, dict[str, Figure]], bool | None]:
    def check(value: float, figures: dict[str, Figure]) -> bool | None:
        base = figures.get(base_key)
        return None if base is None or base.ours is None else value <= factor * base.ours
    return check


def _at_rate(limit: float) -> Callable[[float, dict[str, Figure]], bool | None]:
    """Broker goals hold "when >= 100 jobs/s are flowing": unmet if that rate was not reached."""
    def check(value: float, figures: dict[str, Figure]) -> bool | None:
        rate = figures.get("broker.batched.jobs_per_second")
        if rate is None or rate.ours is None:
            return None
        return value <= limit and rate.ours >= 100
    return check


#: The goals of issue 9's table, by figure key; checked against our figure
GOALS: dict[str, Goal] = {
    "default.store.1": Goal("<= 5", lambda value, _: value <= 5),
    "default.store.4": Goal("<= 1.25 x 1 node", _relative("default.store.1", 1.25)),
    "default.store.16": Goal("<= 1.5 x 1 node", _relative("default.store.1", 1.5)),
    "unlimited.store.1": Goal("<= 2.2", lambda value, _: value <= 2.2),
    "broker.batched.writes_per_job": Goal("<= 0.5 at >= 100 jobs/s", _at_rate(0.5)),
    "broker.batched.added_latency_p95": Goal("<= 5 ms at >= 100 jobs/s", _at_rate(5.0)),
    "broker.batched.jobs_per_second": Goal(">= 100", lambda value, _: value >= 100),
}


def apply_goals(figures: list[Figure]) -> None:
    by_key = {figure.key: figure for figure in figures}
    for figure in figures:
        goal = GOALS.get(figure.key)
        if goal is None:
            continue
        figure.goal = goal.text
        if figure.ours is not None:
            figure.met = goal.check(figure.ours, by_key)


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "yes/no":
        return "yes" if value else "no"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _goal_cell(figure: Figure) -> str:
    if not figure.goal:
        return ""
    verdict = {True: "met", False: "NOT met", None: "not measured"}[figure.met]
    return f"{figure.goal}: {verdict}"


def _rows(figures: list[Figure]) -> dict[str, list[list[str]]]:
    sections: dict[str, list[list[str]]] = {}
    for f in figures:
        name = f"{f.name} ({f.note})" if f.note else f.name
        sections.setdefault(f.section, []).append([
            name, f.unit, fmt(f.ours, f.unit), fmt(f.builtin, f.unit), fmt(f.ratio),
            _goal_cell(f),
        ])
    return sections


HEADER = ["figure", "unit", "ours", "built-in", "ratio", "goal (issue 9)"]


def markdown(figures: list[Figure], headline: str) -> str:
    lines = [headline]
    for section, rows in _rows(figures).items():
        lines += ["", f"### {section}", "", "| " + " | ".join(HEADER) + " |",
                  "|---|---|---:|---:|---:|---|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rst(figures: list[Figure], headline: str) -> str:
    """The same tables as reST ``csv-table`` directives, for docs/comparison.rst."""
    def quote(cell: str) -> str:
        return '"' + cell.replace('"', '""') + '"'

    lines = [headline]
    for section, rows in _rows(figures).items():
        lines += ["", f".. csv-table:: {section}", "   :header-rows: 1", ""]
        lines += ["   " + ", ".join(quote(cell) for cell in row) for row in [HEADER, *rows]]
    return "\n".join(lines) + "\n"


def machine() -> str:
    return f"{platform.machine()}, {platform.python_implementation()} {platform.python_version()}"


def write_json(path: str, config: dict[str, Any], seconds: float,
               figures: list[Figure]) -> None:
    Path(path).write_text(json.dumps({
        "config": config,
        "machine": machine(),
        "seconds": seconds,
        "figures": [asdict(figure) for figure in figures],
    }, indent=2) + "\n")
