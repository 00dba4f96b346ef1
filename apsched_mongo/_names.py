"""Validation of database and collection names, so a bad name fails at construction."""

from __future__ import annotations

from typing import Any

_FORBIDDEN_IN_DATABASE = set('/\\. "$*<>:|?\x00')


def check_database_name(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"database must be a non-empty string, not {value!r}")
    bad = sorted(_FORBIDDEN_IN_DATABASE.intersection(value))
    if bad:
        raise ValueError(f"invalid MongoDB database name {value!r}: it contains {bad!r}")
    if len(value.encode()) >= 64:
        raise ValueError(f"invalid MongoDB database name {value!r}: 64 bytes or longer")


def check_collection_prefix(instance: Any, attribute: Any, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{attribute.name} must be a string, not {value!r}")
    if "$" in value or "\x00" in value or value.startswith("system."):
        raise ValueError(
            f"invalid {attribute.name} {value!r}: collection names cannot contain '$' or NUL "
            "or start with 'system.'"
        )
