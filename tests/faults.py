"""A fault-injecting wrapper for MemoryMongoClient or a real AsyncMongoClient.

Each awaited operation (collection methods, ``find``/``aggregate`` cursors' ``to_list``,
``database.command``) may fail with PyMongo's ``AutoReconnect`` or ``NotPrimaryError``:

* **before** the operation: nothing happened on the server;
* **after** it: the operation was applied, but its reply was lost.

The draws come from one seeded RNG per :class:`FaultPlan`, and every injected fault is
counted. ``plan.kill()`` (or a ``kill_when`` predicate) turns the client into a dead one,
as seen from a crashed or partitioned node: every later operation fails before reaching
the server.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pymongo.errors import AutoReconnect, NotPrimaryError

#: Awaited collection methods (``find`` is handled through its cursor)
OPERATIONS = frozenset({
    "find_one", "count_documents", "estimated_document_count", "distinct", "aggregate",
    "index_information", "insert_one", "insert_many", "update_one", "update_many",
    "replace_one", "find_one_and_update", "find_one_and_replace", "find_one_and_delete",
    "delete_one", "delete_many", "bulk_write", "create_indexes", "create_index",
    "drop_index", "drop",
})

KillPredicate = Callable[[str, tuple[Any, ...], dict[str, Any]], bool]


class FaultPlan:
    """Decides which operations fail, and counts what was injected.

    :param seed: RNG seed
    :param rate: probability that an operation fails (half before, half after it)
    :param enabled: inject from the start (else call :meth:`enable` once set up)
    """

    def __init__(self, seed: int, rate: float = 0.1, *, enabled: bool = False) -> None:
        self.rng = random.Random(seed)
        self.rate = rate
        self.enabled = enabled
        self.operations = 0
        self.injected: Counter[str] = Counter()  # "before"/"after" -> count
        self.dead = False
        self.kill_when: KillPredicate | None = None
        #: returns an exception to raise instead of running the operation (every time)
        self.forced: Callable[[str], Exception | None] | None = None
        #: awaited before each operation (tests use it to line nodes up at a race)
        self.gate: Callable[[str], Awaitable[None]] | None = None
        self.attempts: Counter[str] = Counter()  # every operation tried, by name

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        self.enabled = False

    def kill(self) -> None:
        self.dead = True

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())

    def _error(self, what: str, when: str) -> Exception:
        if self.rng.random() < 0.5:
            return AutoReconnect(f"injected fault {when} {what}: connection reset")
        return NotPrimaryError(f"injected fault {when} {what}: not primary",
                               {"code": 10107, "codeName": "NotWritablePrimary"})

    def check_before(self, what: str, args: tuple[Any, ...] = (),
                     kwargs: dict[str, Any] | None = None) -> str | None:
        """Raise a fault before ``what``, or return ``"after"`` if it must fail after."""
        self.attempts[what] += 1
        if self.forced and (error := self.forced(what)):
            raise error
        if not self.dead and self.kill_when and self.kill_when(what, args, kwargs or {}):
            self.dead = True
        if self.dead:
            raise AutoReconnect(f"{what}: connection refused (node is dead)")
        if not self.enabled:
            return None
        self.operations += 1
        draw = self.rng.random()
        if draw < self.rate / 2:
            self.injected["before"] += 1
            raise self._error(what, "before")
        if draw < self.rate:
            return "after"
        return None

    def fail_after(self, what: str) -> Exception:
        self.injected["after"] += 1
        return self._error(what, "after")


async def _apply(plan: FaultPlan, what: str, operation: Callable[[], Any],
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if plan.gate:
        await plan.gate(what)
    when = plan.check_before(what, args, kwargs)
    result = await operation()
    if when == "after":
        raise plan.fail_after(what)
    return result


class FaultyCursor:
    def __init__(self, cursor: Any, plan: FaultPlan, what: str) -> None:
        self._cursor, self._plan, self._what = cursor, plan, what

    def sort(self, *args: Any, **kwargs: Any) -> FaultyCursor:
        self._cursor = self._cursor.sort(*args, **kwargs)
        return self

    def limit(self, limit: int) -> FaultyCursor:
        self._cursor = self._cursor.limit(limit)
        return self

    async def to_list(self, length: int | None = None) -> list[Any]:
        documents: list[Any] = await _apply(
            self._plan, self._what, lambda: self._cursor.to_list(length), (), {}
        )
        return documents

    async def __aiter__(self) -> AsyncIterator[Any]:
        for document in await self.to_list():
            yield document

    async def close(self) -> None:
        await self._cursor.close()


class FaultyCollection:
    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self._inner, self._plan = inner, plan

    def with_options(self, *args: Any, **kwargs: Any) -> FaultyCollection:
        return FaultyCollection(self._inner.with_options(*args, **kwargs), self._plan)

    def find(self, *args: Any, **kwargs: Any) -> FaultyCursor:
        return FaultyCursor(self._inner.find(*args, **kwargs), self._plan,
                            f"{self._inner.name}.find")

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if name not in OPERATIONS:
            return attribute

        async def faulty(*args: Any, **kwargs: Any) -> Any:
            return await _apply(self._plan, f"{self._inner.name}.{name}",
                                lambda: attribute(*args, **kwargs), args, kwargs)

        return faulty


class FaultyDatabase:
    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self._inner, self._plan = inner, plan

    def get_collection(self, *args: Any, **kwargs: Any) -> FaultyCollection:
        return FaultyCollection(self._inner.get_collection(*args, **kwargs), self._plan)

    def __getitem__(self, name: str) -> FaultyCollection:
        return self.get_collection(name)

    async def command(self, command: Any, **kwargs: Any) -> Any:
        name = command if isinstance(command, str) else next(iter(command))
        return await _apply(self._plan, f"command {name}",
                            lambda: self._inner.command(command, **kwargs), (command,), kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class FaultyClient:
    """Wraps a MemoryMongoClient or an AsyncMongoClient; see the module docstring."""

    def __init__(self, inner: Any, plan: FaultPlan) -> None:
        self._inner, self.plan = inner, plan

    def get_database(self, *args: Any, **kwargs: Any) -> FaultyDatabase:
        return FaultyDatabase(self._inner.get_database(*args, **kwargs), self.plan)

    def __getitem__(self, name: str) -> FaultyDatabase:
        return self.get_database(name)

    @property
    def admin(self) -> FaultyDatabase:
        return self.get_database("admin")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class LoseFirstReply(FaultPlan):
    """The first call of each named operation is applied, but its reply is lost."""

    def __init__(self, *operations: str) -> None:
        super().__init__(seed=0, enabled=True)
        self.pending = set(operations)

    def check_before(self, what: str, args: tuple[Any, ...] = (),
                     kwargs: dict[str, Any] | None = None) -> str | None:
        self.attempts[what] += 1
        if what in self.pending:
            self.pending.discard(what)
            return "after"
        return None
