"""Serving the dashboard with uvicorn, beside the task that keeps it linked to the cluster."""

from __future__ import annotations

import contextlib
import logging
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

import anyio
import uvicorn

from .app import Dashboard, Settings, create_app

TOKEN_ENV = "APSCHED_DASHBOARD_TOKEN"
QUIET_SECONDS = 300.0


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after a graceful shutdown (so Ctrl-C ends in a
    KeyboardInterrupt traceback); here they only stop the server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class RepeatFilter(logging.Filter):
    """Lets a given message template through once per :data:`QUIET_SECONDS`: while the
    server is down, the broker would otherwise log every failed poll."""

    def __init__(self, quiet_seconds: float = QUIET_SECONDS) -> None:
        super().__init__()
        self.quiet_seconds = quiet_seconds
        self._last: dict[tuple[str, Any], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key, now = (record.name, record.msg), time.monotonic()
        if now - self._last.get(key, -self.quiet_seconds) < self.quiet_seconds:
            return False
        self._last[key] = now
        return True


def listening_socket(host: str, port: int) -> socket.socket:
    """Bind and listen now, so a taken port is reported before anything starts and the
    printed URL answers as soon as it is printed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def new_token() -> str:
    return secrets.token_urlsafe(24)


async def serve(dashboard: Dashboard, sock: socket.socket,
                on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation), keeping the cluster link alive."""
    config = uvicorn.Config(create_app(dashboard), log_config=None, access_log=False,
                            lifespan="off", timeout_graceful_shutdown=2)
    server = _Server(config)
    link_logger = logging.getLogger("apsched_mongo.dashboard")
    repeat_filter = RepeatFilter()
    link_logger.addFilter(repeat_filter)
    try:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(dashboard.keep_linked)
            if on_ready:
                on_ready(url_of(sock))
            await server.serve(sockets=[sock])
            tasks.cancel_scope.cancel()
    finally:
        link_logger.removeFilter(repeat_filter)
        sock.close()


async def serve_beside_demo(client: Any, database: str, port: int) -> None:
    """The demo's hook: serve its cluster with actions on, until Ctrl-C (``client`` is the
    dashboard's own, closed at the end)."""
    import os

    from .._client import describe_hosts

    hosts = describe_hosts(client)
    where = "in-memory demo server" if hosts == "memory" else hosts
    token = os.environ.get(TOKEN_ENV)
    said = f"from ${TOKEN_ENV}" if token else "printed below"
    token = token or new_token()
    settings = Settings(database=database, allow_actions=True, token=token, where=where)
    sock = listening_socket("127.0.0.1", port)

    def ready(url: str) -> None:
        print(f"Dashboard: {url}  (actions allowed, token {said}; Ctrl-C stops the demo)",
              flush=True)
        if not os.environ.get(TOKEN_ENV):
            print(f"Dashboard token: {token}", flush=True)

    try:
        await serve(Dashboard(client, settings), sock, ready)
    finally:
        await client.close()
