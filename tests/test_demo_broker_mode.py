"""The demo shows the broker's mode: change streams on its in-memory replica set by default,
polling with ``--standalone``."""

from __future__ import annotations

import pytest

from apsched_mongo.__main__ import main


@pytest.mark.parametrize("flags, kind, mode", [
    ([], "replica set", "change_stream"),
    (["--standalone"], "standalone server", "polling"),
])
def test_demo_says_which_broker_mode_it_uses(capsys: pytest.CaptureFixture[str],
                                             flags: list[str], kind: str, mode: str) -> None:
    assert main(["demo", "--seconds", "0.3", "--nodes", "2", *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"Using an in-memory MongoDB {kind}" in lines[0]
    assert f"MongoDB event broker mode: {mode}" in lines
