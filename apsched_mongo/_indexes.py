"""Idempotent index creation that never silently accepts a conflicting existing index."""

from __future__ import annotations

from typing import Any

import attrs
from pymongo import IndexModel

from .errors import IndexConflictError


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


def _existing_options(info: dict[str, Any]) -> dict[str, Any]:
    expire = info.get("expireAfterSeconds")
    return {
        "unique": bool(info.get("unique", False)),
        "expireAfterSeconds": int(expire) if expire is not None else None,
        "partialFilterExpression": info.get("partialFilterExpression"),
    }


def _same_keys(info: dict[str, Any], spec: IndexSpec) -> bool:
    return [(field, int(direction)) for field, direction in info["key"]] == spec.keys


async def ensure_indexes(collection: Any, specs: list[IndexSpec]) -> None:
    """Create the missing indexes; raise :class:`IndexConflictError` naming any existing
    index on the same keys (or with the same name) whose options differ."""
    existing: dict[str, Any] = await collection.index_information()
    missing = []
    for spec in specs:
        matches = {name: info for name, info in existing.items()
                   if name == spec.name or _same_keys(info, spec)}
        if not matches:
            missing.append(spec.model())
            continue
        for name, info in matches.items():
            if not _same_keys(info, spec) or _existing_options(info) != spec.options():
                raise IndexConflictError(
                    f"index {name!r} on collection {collection.full_name!r} conflicts with the "
                    f"index apsched-mongo needs ({spec.name!r}: keys {spec.keys}, options "
                    f"{spec.options()}); it has keys {list(info['key'])} and options "
                    f"{_existing_options(info)}. Drop or rename it (apsched-mongo never drops "
                    "your indexes)."
                )
    if missing:
        await collection.create_indexes(missing)
