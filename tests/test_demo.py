"""The README's demo command works and shows what it claims."""

from __future__ import annotations

import pytest

from apsched_mongo.__main__ import main


def test_demo_runs_schedules_on_two_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--seconds", "3.5", "--nodes", "2"]) == 0
    output = capsys.readouterr().out
    assert "in-memory MongoDB" in output
    for name in ("tick", "cron", "slow"):
        assert f" {name} " in output, name
    assert "most 'slow' jobs running at once: 1 (max_running_jobs=1)" in output
