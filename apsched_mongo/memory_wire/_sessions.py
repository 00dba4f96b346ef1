"""Retryable writes: a write sent again with the same ``(lsid, txnNumber)`` is answered with
the first execution's reply instead of running twice, as a replica set does.

Like mongod, only the latest transaction number of each session is remembered (an older one
is refused with TransactionTooOld); sessions idle longer than
``logicalSessionTimeoutMinutes`` are forgotten, and at most :data:`MAX_SESSIONS` are kept.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from ._errors import CommandError

SESSION_TIMEOUT_MINUTES = 30
MAX_SESSIONS = 10_000


def session_key(lsid: Any) -> Hashable:
    """What identifies a logical session: its id, and its user digest when there is one."""
    if not isinstance(lsid, Mapping) or "id" not in lsid:
        raise CommandError(40415, "BSON field 'lsid.id' is missing but a required field")
    uid = lsid.get("uid")
    return (lsid["id"], bytes(uid) if uid is not None else None)


class RetryableWrites:
    """The remembered outcome of each session's latest retryable write."""

    def __init__(self, timeout: float = SESSION_TIMEOUT_MINUTES * 60.0,
                 max_sessions: int = MAX_SESSIONS) -> None:
        self._timeout = timeout
        self._max_sessions = max_sessions
        #: session -> (txnNumber, reply, last used)
        self._sessions: OrderedDict[Hashable, tuple[int, Any, float]] = OrderedDict()
        #: held while a retryable write runs, so that its retry waits for its outcome
        self._lock = threading.Lock()
        #: retried writes answered from memory (for tests and the command line's summary)
        self.replayed = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def run(self, lsid: Any, txn_number: Any, execute: Callable[[], Any],
            succeeded: Callable[[Any], bool]) -> Any:
        """The reply of ``execute()``, run at most once per ``(lsid, txn_number)``; replies
        for which ``succeeded`` is false are not remembered (a retry runs again)."""
        if isinstance(txn_number, bool) or not isinstance(txn_number, int):
            raise CommandError(14, "BSON field 'txnNumber' is the wrong type, expected long")
        key = session_key(lsid)
        with self._lock:
            now = time.monotonic()
            self._forget_idle(now)
            known = self._sessions.get(key)
            if known is not None:
                number, reply, _ = known
                if txn_number < number:
                    raise CommandError(225, f"Cannot start transaction {txn_number} on session "
                                            f"because a newer transaction {number} has already "
                                            "started")
                if txn_number == number:
                    self._sessions[key] = (number, reply, now)
                    self._sessions.move_to_end(key)
                    self.replayed += 1
                    return reply
            reply = execute()
            if succeeded(reply):
                self._sessions[key] = (txn_number, reply, now)
                self._sessions.move_to_end(key)
                while len(self._sessions) > self._max_sessions:
                    self._sessions.popitem(last=False)
            return reply

    def _forget_idle(self, now: float) -> None:
        while self._sessions:
            key, (_, _, last_used) = next(iter(self._sessions.items()))
            if now - last_used <= self._timeout:
                break
            del self._sessions[key]
