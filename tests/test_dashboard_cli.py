"""``python -m apsched_mongo dashboard``: bad input gets one clear line, no traceback; and
the command really serves (a subprocess against an unreachable server)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from apsched_mongo.__main__ import main

UNREACHABLE = "mongodb://admin:s3cret-pw@127.0.0.1:9/?serverSelectionTimeoutMS=300"


@pytest.mark.parametrize(("argv", "env", "message"), [
    ([], {}, "--uri is required (or set $APSCHED_DASHBOARD_URI)"),
    (["--uri", "mongodb://h", "--port", "70000"], {},
     "argument --port: must be between 0 and 65535, not 70000"),
    (["--uri", "mongodb://h", "--port", "http"], {}, "argument --port: 'http' is not a port"),
    (["--uri", "mongodb://h", "--refresh", "0.1"], {},
     "--refresh must be at least 0.5 seconds, not 0.1"),
    (["--uri", "mongodb://h", "--timeout", "0"], {}, "argument --timeout: must be a positive"),
    (["--uri", "mongodb://h", "--allow-actions"], {"APSCHED_DASHBOARD_TOKEN": "short"},
     "$APSCHED_DASHBOARD_TOKEN is shorter than 16 characters"),
    (["--uri", "mongodb://u:s3cret-pw@h:99999"], {}, "invalid MongoDB URI"),
    ([], {"APSCHED_DASHBOARD_URI": "mongodb://u:s3cret-pw@h:99999"}, "invalid MongoDB URI"),
])
def test_bad_input(argv: list[str], env: dict[str, str], message: str,
                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("APSCHED_DASHBOARD_URI", raising=False)
    monkeypatch.delenv("APSCHED_DASHBOARD_TOKEN", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["dashboard", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("apsched-mongo dashboard: error: "), err
    assert message in err, err
    assert len(err.strip().splitlines()) == 1
    assert "s3cret-pw" not in err


def test_port_taken(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--uri", "mongodb://h", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            f"apsched-mongo dashboard: error: cannot listen on 127.0.0.1:{port}:"), err
        # the demo checks its dashboard port before starting anything
        assert main(["demo", "--dashboard", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("apsched-mongo demo: error: argument --dashboard: cannot listen "
                              f"on 127.0.0.1:{port}:"), err


@pytest.fixture
def dashboard_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    env = {**os.environ, "APSCHED_DASHBOARD_URI": UNREACHABLE, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "apsched_mongo", "dashboard", "--port", "0", "--timeout", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=Path(__file__).parent.parent,
    )
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        assert " at http://127.0.0.1:" in first, first
        yield process, first.rsplit(" at ", 1)[1].strip()
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(timeout=20)


def test_serves_a_clear_page_while_the_server_is_unreachable(
    dashboard_process: tuple[subprocess.Popen[str], str],
) -> None:
    """No password anywhere, a 503 page naming the host, one log line, a clean stop."""
    process, url = dashboard_process
    pages = []
    for _ in range(3):
        with pytest.raises(urllib.error.HTTPError) as failure:
            urllib.request.urlopen(url, timeout=20)
        assert failure.value.code == 503
        pages.append(failure.value.read().decode())
    assert "MongoDB is not answering" in pages[0] and "127.0.0.1:9" in pages[0]
    with urllib.request.urlopen(url + "outcomes", timeout=20) as response:
        assert response.status == 200
    started = time.monotonic()
    process.terminate()
    assert process.stdout is not None
    output = process.stdout.read()  # (what readline() buffered included)
    assert process.wait(timeout=20) == 0, output
    assert time.monotonic() - started < 15
    assert "read-only: actions are disabled" in output
    assert "Traceback" not in output
    assert all("s3cret-pw" not in text for text in (output, *pages))
    assert output.count("MongoDB unreachable") == 1, output


def test_repeated_warnings_are_said_once() -> None:
    """While the server is down the broker would log every failed poll; the dashboard's
    log says each kind of warning once per quiet period."""
    import logging

    from apsched_mongo.dashboard.server import RepeatFilter

    quiet = RepeatFilter(quiet_seconds=3600)

    def record(level: int, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord("apsched_mongo.dashboard", level, __file__, 1, msg, args, None)

    assert quiet.filter(record(logging.WARNING, "%s: poll failed (%r)", "b", "e1"))
    assert not quiet.filter(record(logging.WARNING, "%s: poll failed (%r)", "b", "e2"))
    assert quiet.filter(record(logging.WARNING, "MongoDB unreachable: %s", "x"))
    assert quiet.filter(record(logging.INFO, "%s: poll failed (%r)", "b", "e3"))  # not a warning


def test_without_the_extra(monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    """The other sub-commands work without the extra; this one says what to install."""
    monkeypatch.setitem(sys.modules, "starlette", None)  # makes "import starlette" fail
    assert main(["dashboard", "--uri", "mongodb://h"]) == 2
    assert capsys.readouterr().err == (
        "apsched-mongo dashboard: error: the dashboard needs its extra: "
        "pip install 'apsched-mongo[dashboard]'\n")
