"""Faults the front injects on purpose: lost replies, dropped connections, step-downs,
stalled replies and held requests.

A :class:`Fault` picks commands by name, namespace and count (``Fault("lose-reply",
command="findAndModify", namespace="*_jobs")`` loses the reply of the next findAndModify on
any ``*_jobs`` collection); a :class:`FaultPlan` holds the faults of one front. The same
faults can be written on a command line as ``KIND[:key=value,...]`` (:func:`parse_fault`).
"""

from __future__ import annotations

import fnmatch
import random
import threading
from typing import Literal, get_args

Kind = Literal["lose-reply", "hangup", "step-down", "stall", "hold"]
KINDS: tuple[str, ...] = get_args(Kind)

#: What each kind does to a command it hits
DESCRIPTIONS = {
    "lose-reply": "execute the command, then close the connection instead of replying",
    "hangup": "close the connection before executing the command",
    "step-down": "answer NotWritablePrimary (or --code 189 PrimarySteppedDown) and stay "
                 "stepped down for `seconds`",
    "stall": "execute the command, then wait `seconds` before replying",
    "hold": "wait `seconds` before executing the command; if the client closes the "
            "connection meanwhile, drop it unexecuted (a request that never left a frozen or "
            "killed node)",
}
STEP_DOWN_CODES = (10107, 189)


class Fault:
    """One fault rule.

    :param kind: ``"lose-reply"``, ``"hangup"``, ``"step-down"``, ``"stall"`` or ``"hold"``
    :param command: hit only this command (case-insensitive; e.g. ``"findAndModify"``)
    :param namespace: hit only commands on a ``db.collection`` matching this glob; a pattern
        without a dot matches the collection name alone (``"*_jobs"``)
    :param skip: let this many matching commands through first
    :param times: hit this many matching commands, then stop (``None``: no limit)
    :param probability: hit each matching command with this probability (seeded by the plan)
    :param seconds: how long a stall or hold lasts, or how long the server stays stepped
        down
    :param code: the error code of a step-down: 10107 (NotWritablePrimary) or 189
        (PrimarySteppedDown)
    """

    def __init__(self, kind: Kind, *, command: str | None = None, namespace: str | None = None,
                 skip: int = 0, times: int | None = 1, probability: float = 1.0,
                 seconds: float = 1.0, code: int = 10107) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; use one of {', '.join(KINDS)}")
        if skip < 0 or (times is not None and times < 0):
            raise ValueError("fault skip and times must not be negative")
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"fault probability must be within [0, 1], not {probability}")
        if seconds < 0:
            raise ValueError(f"fault seconds must not be negative, not {seconds}")
        if kind == "step-down" and code not in STEP_DOWN_CODES:
            raise ValueError(f"a step-down answers code 10107 or 189, not {code}")
        self.kind = kind
        self.command = command
        self.namespace = namespace
        self.skip = skip
        self.times = times
        self.probability = probability
        self.seconds = seconds
        self.code = code
        #: matching commands seen so far, and how many of them were hit
        self.seen = 0
        self.hits = 0
        self._hit = threading.Condition()
        #: set by :meth:`release`: holds end now
        self.released = threading.Event()

    def __repr__(self) -> str:
        where = ", ".join(f"{key}={value!r}" for key, value in (
            ("command", self.command), ("namespace", self.namespace)) if value)
        return f"Fault({self.kind!r}{', ' if where else ''}{where}, hits={self.hits})"

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def matches(self, command: str, namespace: str) -> bool:
        if self.command is not None and self.command.lower() != command.lower():
            return False
        if self.namespace is None:
            return True
        subject = namespace if "." in self.namespace else namespace.partition(".")[2]
        return fnmatch.fnmatchcase(subject, self.namespace)

    def _record_hit(self) -> None:
        with self._hit:
            self.hits += 1
            self._hit.notify_all()

    def release(self) -> None:
        """End this fault's holds now: the commands it holds run (and it holds no more)."""
        self.times = self.hits
        self.released.set()

    def wait(self, hits: int = 1, timeout: float = 10.0) -> bool:
        """Block until this fault has hit ``hits`` commands; False on timeout."""
        with self._hit:
            return self._hit.wait_for(lambda: self.hits >= hits, timeout)


class FaultPlan:
    """The faults of one front; the first rule that decides to hit a command wins."""

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)
        self._faults: list[Fault] = []
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    @property
    def faults(self) -> list[Fault]:
        with self._lock:
            return list(self._faults)

    def pick(self, command: str, namespace: str) -> Fault | None:
        """The fault hitting this command, if any (counted as a hit)."""
        with self._lock:
            for fault in self._faults:
                if fault.exhausted or not fault.matches(command, namespace):
                    continue
                fault.seen += 1
                if fault.seen <= fault.skip:
                    continue
                if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                    continue
                fault._record_hit()
                return fault
        return None


def parse_fault(text: str) -> Fault:
    """``KIND[:key=value,...]``, e.g. ``lose-reply:command=findAndModify,namespace=*_jobs``
    or ``step-down:probability=0.01,times=inf,seconds=2``."""
    kind, _, options = text.partition(":")
    kwargs: dict[str, object] = {}
    converters = {"command": str, "namespace": str, "skip": int, "probability": float,
                  "seconds": float, "code": int}
    for item in filter(None, options.split(",")):
        key, equals, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not equals:
            raise ValueError(f"fault option {item!r} in {text!r} is not key=value")
        if key == "times":
            kwargs[key] = None if value in ("inf", "none", "") else int(value)
        elif key in converters:
            try:
                kwargs[key] = converters[key](value)
            except ValueError:
                raise ValueError(f"fault option {key} in {text!r}: bad value {value!r}") from None
        else:
            raise ValueError(f"unknown fault option {key!r} in {text!r}; use "
                             f"{', '.join([*converters, 'times'])}")
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r} in {text!r}; use one of "
                         f"{', '.join(KINDS)}")
    return Fault(kind, **kwargs)  # type: ignore[arg-type]
