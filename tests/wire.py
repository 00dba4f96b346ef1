"""A scripted MongoDB server (mockupdb) for wire-level tests of what a fake cannot do."""

from __future__ import annotations

import threading
from typing import Any

import anyio
from mockupdb import MockupDB

from tests.broker_helpers import TIMEOUT


class Wire:
    """A scripted MongoDB server: hello, index and session chatter are answered
    automatically; everything else waits in a queue for the test to answer."""

    def __init__(self, *, replica_set: bool) -> None:
        self.server = MockupDB(auto_ismaster=False)
        self.server.run()
        self.index_requests: list[Any] = []
        self.end_sessions = threading.Event()
        self._pending: list[Any] = []
        host = self.server.address_string
        hello: dict[str, Any] = {
            "ismaster": True, "isWritablePrimary": True, "helloOk": True,
            "minWireVersion": 0, "maxWireVersion": 21, "maxBsonObjectSize": 16 * 1024 * 1024,
            "maxMessageSizeBytes": 48_000_000, "maxWriteBatchSize": 100_000,
            "logicalSessionTimeoutMinutes": 30,
        }
        if replica_set:
            hello.update(setName="rs", hosts=[host], me=host, primary=host)
        self.uri = f"mongodb://{host}/?serverSelectionTimeoutMS=3000" + (
            "&replicaSet=rs" if replica_set else ""
        )
        self._hello = hello
        self.server.autoresponds(self._chatter)

    def _chatter(self, request: Any) -> bool:
        """Answer the requests no test scripts; returning False queues the request."""
        name = request.command_name.lower() if request.command_name else None
        if name in ("ismaster", "hello"):
            return bool(request.replies(self._hello))
        if name in ("listindexes", "createindexes"):
            self.index_requests.append(request)
            if name == "listindexes":
                namespace = f"{request.namespace.split('.')[0]}.{request.doc[request.command_name]}"
                return bool(request.replies(cursor={"id": 0, "ns": namespace,
                                                    "firstBatch": []}))
            return bool(request.replies())
        if name == "findandmodify" and str(request.doc["findAndModify"]).endswith("meta"):
            # the data store's format check at start
            return bool(request.replies(value={"_id": "format", "version": 1}))
        if name == "killcursors":
            return bool(request.replies(cursorsKilled=request["cursors"]))
        if name == "endsessions":
            self.end_sessions.set()
            return bool(request.replies())
        return False

    def _pop(self) -> Any:
        try:
            return self.server.receives(timeout=0.1)
        except AssertionError:  # nothing arrived within the timeout
            return None
        except OSError:  # a request from a connection the client has closed since
            return None

    async def receives(self, command: str) -> Any:
        """The next request for ``command``; requests for other commands stay queued."""
        with anyio.fail_after(TIMEOUT):
            while True:
                for request in self._pending:
                    if request.command_name == command:
                        self._pending.remove(request)
                        return request
                request = await anyio.to_thread.run_sync(self._pop)
                if request is not None:
                    self._pending.append(request)

    def pending_commands(self) -> list[str]:
        return [request.command_name for request in self._pending]

    def stop(self) -> None:
        # MockupDB.stop() takes a second (its accept loop polls every second); nothing
        # depends on it having finished, so let it finish in the background
        threading.Thread(target=self.server.stop, daemon=True).start()
