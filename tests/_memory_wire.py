"""The in-memory server's wire front for ``pytest --memory-wire``: the real-server tier
through the real driver, against ``python -m apsched_mongo.memory_wire`` on a free port.

The front runs in a process of its own, as a real server does: in this one it would share
the interpreter lock with the tests' event loop, and a test busy computing would starve
the server of it for milliseconds at a time (timings no real server shows).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.processes import stop_process

#: Tests of the real-server tier that cannot run against the front, and why (deselected)
CANNOT_RUN: dict[str, str] = {
    "tests/test_query_plans.py::":
        "explain() needs MongoDB's query planner; the in-memory back end has none (it scans)",
}
#: Tests of the real-server tier that do not always pass against the front, and why (non-
#: strict xfails): bookkeeping to remove once the cause is fixed (listed in the report)
KNOWN_DIFFERENCES: dict[str, str] = {}
STARTUP_TIMEOUT = 60.0


def start_front(config: pytest.Config) -> str:
    """Start the front; return its URI. It stops when the test session ends."""
    mode = config.getoption("--memory-wire")
    command = [sys.executable, "-m", "apsched_mongo.memory_wire"]
    if mode == "replica-set":
        command += ["--replica-set", "rs0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)

    config.add_cleanup(lambda: stop_process(process))
    assert process.stdout is not None
    uri = process.stdout.readline().strip()  # the front prints its URI once it listens
    if not uri.startswith("mongodb://"):
        raise pytest.UsageError(f"the in-memory wire front did not start (said {uri!r})")
    return uri


def mark_known_differences(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect what cannot run against the front; mark what does not always pass."""
    cannot = [item for item in items if any(item.nodeid.startswith(prefix)
                                            for prefix in CANNOT_RUN)]
    if cannot:
        config.hook.pytest_deselected(items=cannot)
        items[:] = [item for item in items if item not in cannot]
    for item in items:
        if reason := KNOWN_DIFFERENCES.get(item.nodeid):
            item.add_marker(pytest.mark.xfail(reason=reason, strict=False))
