"""A throwaway single-node replica set for ``pytest --mongod``.

A replica set (not a standalone server) because that is what production runs and what
change streams need; one node because it starts in seconds. Everything lives in a
temporary directory and goes away when the test session ends.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient
from pymongo.errors import OperationFailure, PyMongoError

from tests.processes import stop_process

REPLICA_SET = "rs0"
STARTUP_TIMEOUT = 60.0  # seconds for mongod to listen and then become primary


def find_mongod() -> str:
    """The ``mongod`` on PATH, or a :class:`pytest.UsageError` saying how to get one."""
    path = shutil.which("mongod")
    if path is None:
        raise pytest.UsageError(
            "--mongod needs a 'mongod' executable on PATH (install MongoDB Community "
            "Server), or set APSCHED_MONGO_TEST_URI to an existing replica set instead"
        )
    return path


def free_port() -> int:
    """A loopback port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(condition: Any, what: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Poll ``condition`` (bounded by STARTUP_TIMEOUT); fail with mongod's log tail."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if condition():
            return
        time.sleep(0.2)  # polling an external process: there is nothing to wait on
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise pytest.UsageError(f"mongod did not {what} within {STARTUP_TIMEOUT:g} s:\n{tail}")


def _initiate(client: MongoClient[dict[str, Any]], port: int) -> bool:
    try:
        client.admin.command("replSetInitiate", {
            "_id": REPLICA_SET, "members": [{"_id": 0, "host": f"127.0.0.1:{port}"}],
        })
    except OperationFailure as exc:
        if exc.code != 23:  # AlreadyInitialized
            raise
    except PyMongoError:
        return False  # not listening yet
    return True


def _is_primary(client: MongoClient[dict[str, Any]]) -> bool:
    try:
        return bool(client.admin.command("hello").get("isWritablePrimary"))
    except PyMongoError:
        return False


def start_replica_set(config: pytest.Config) -> str:
    """Start ``mongod --replSet rs0`` on a free loopback port; return its URI.

    Cleanup (terminate, then remove the data directory) is registered on ``config``.
    """
    mongod = find_mongod()
    directory = Path(tempfile.mkdtemp(prefix="apsched-mongod-"))
    config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
    port = free_port()
    log = directory / "mongod.log"
    process = subprocess.Popen(
        [mongod, "--replSet", REPLICA_SET, "--bind_ip", "127.0.0.1", "--port", str(port),
         "--dbpath", str(directory), "--logpath", str(log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    # cleanups run last-in first-out: stop before removing
    config.add_cleanup(lambda: stop_process(process))
    client: MongoClient[dict[str, Any]] = MongoClient(
        "127.0.0.1", port, directConnection=True, serverSelectionTimeoutMS=500
    )
    try:
        wait_until(lambda: _initiate(client, port), "accept replSetInitiate", process, log)
        wait_until(lambda: _is_primary(client), "become primary", process, log)
    finally:
        client.close()
    return f"mongodb://127.0.0.1:{port}/?replicaSet={REPLICA_SET}"
