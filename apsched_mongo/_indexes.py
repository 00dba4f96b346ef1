"""Idempotent index creation that never silently accepts a conflicting existing index."""

from __future__ import annotations

from typing import Any

import attrs
from pymongo import IndexModel
from pymongo.errors import OperationFailure

from .errors import IndexConflictError

# IndexOptionsConflict, IndexKeySpecsConflict
_INDEX_CONFLICT_CODES = frozenset({85, 86})


@attrs.frozen
class IndexSpec:
    name: str
    keys: list[tuple[str, int]]
    unique: bool = False
    expire_after_seconds: int | None = None
    partial: dict[str, Any] | None = None

    def options(self) -> dict[str, Any]:
        """The options that change an index's meaning, as ``index_information()`` shows them."""
        return {
            "unique": self.unique,
            "expireAfterSeconds": self.expire_after_seconds,
            "partialFilterExpression": self.partial,
        }

    def model(self) -> IndexModel:
        kwargs: dict[str, Any] = {"name": self.name}
        if self.unique:
            kwargs["unique"] = True
        if self.expire_after_seconds is not None:
            kwargs["expireAfterSeconds"] = self.expire_after_seconds
        if self.partial is not None:
            kwargs["partialFilterExpression"] = self.partial
        return IndexModel(self.keys, **kwargs)


def existing_options(info: dict[str, Any]) -> dict[str, Any]:
    """An existing index's meaningful options, in :meth:`IndexSpec.options` form."""
    expire = info.get("expireAfterSeconds")
    return {
        "unique": bool(info.get("unique", False)),
        "expireAfterSeconds": int(expire) if expire is not None else None,
        "partialFilterExpression": info.get("partialFilterExpression"),
    }


def _direction(direction: Any) -> Any:
    """1 and 1.0 (mongosh writes doubles) alike; "hashed", "text", "2dsphere" as they are."""
    return int(direction) if isinstance(direction, int | float) else direction


def same_keys(info: dict[str, Any], spec: IndexSpec) -> bool:
    return [(field, _direction(direction)) for field, direction in info["key"]] == spec.keys


def conflict_with(spec: IndexSpec, existing: dict[str, Any]) -> str | None:
    """Why an existing index (same name or same keys) can't serve as ``spec``, or None."""
    for name, info in existing.items():
        if name != spec.name and not same_keys(info, spec):
            continue
        if not same_keys(info, spec) or existing_options(info) != spec.options():
            return (f"index {name!r} has keys {list(info['key'])} and options "
                    f"{existing_options(info)}, but apsched-mongo needs {spec.name!r} with "
                    f"keys {spec.keys} and options {spec.options()}")
    return None


def is_present(spec: IndexSpec, existing: dict[str, Any]) -> bool:
    return any(name == spec.name or same_keys(info, spec) for name, info in existing.items())


async def ensure_indexes(collection: Any, specs: list[IndexSpec]) -> None:
    """Create the missing indexes; raise :class:`IndexConflictError` naming any existing
    index on the same keys (or with the same name) whose options differ."""
    existing: dict[str, Any] = await collection.index_information()
    for spec in specs:
        if problem := conflict_with(spec, existing):
            raise IndexConflictError(
                f"on collection {collection.full_name!r}: {problem}. Drop or rename it "
                "(apsched-mongo never drops your indexes)."
            )
    missing = [spec.model() for spec in specs if not is_present(spec, existing)]
    if missing:
        try:
            await collection.create_indexes(missing)
        except OperationFailure as exc:
            if exc.code not in _INDEX_CONFLICT_CODES:
                raise
            # Someone created a conflicting index since we looked: name it like above
            await ensure_indexes(collection, specs)
            raise
