"""Stopping the child processes tests start (servers, demo nodes)."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop_process(process: subprocess.Popen[Any], how: signal.Signals = signal.SIGTERM) -> None:
    """Ask the process to stop with ``how``; kill it if it has not exited within 30 s, so
    a stuck child never outlives the test run."""
    if process.poll() is None:
        process.send_signal(how)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
