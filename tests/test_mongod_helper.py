"""What of ``pytest --mongod`` can be checked without a mongod: the clear error when there
is none, and the port choice. (The full start-up runs in CI's real-server jobs.)"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import _mongod

pytestmark = pytest.mark.anyio


def test_missing_mongod_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                         pytestconfig: pytest.Config) -> None:
    monkeypatch.setenv("PATH", "")
    with pytest.raises(pytest.UsageError, match="needs a 'mongod' executable on PATH"):
        _mongod.start_replica_set(pytestconfig)


def test_free_port_can_be_bound_on_loopback() -> None:
    port = _mongod.free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))


def test_a_mongod_that_exits_fails_fast_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "mongod.log"
    log.write_text("exception in initAndListen: Address already in use")
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    with pytest.raises(pytest.UsageError, match="Address already in use"):
        _mongod.wait_until(lambda: False, "become primary", process, log)
