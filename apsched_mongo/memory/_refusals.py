"""What mongomock-ng would silently get wrong, refused before it reaches mongomock-ng."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UnsupportedByMemoryBackend

_SERVER_VARIABLES = ("$$NOW", "$$CLUSTER_TIME")


def refuse_unfaithful(value: Any, where: str) -> None:
    """Raise if ``value`` holds something mongomock-ng would silently get wrong."""
    if isinstance(value, str):
        if value.startswith(_SERVER_VARIABLES):
            raise UnsupportedByMemoryBackend(
                f"{where}: the in-memory back end cannot evaluate {value!r}"
            )
    elif isinstance(value, Mapping):
        for item in value.values():
            refuse_unfaithful(item, where)
    elif isinstance(value, list | tuple):
        for item in value:
            refuse_unfaithful(item, where)


def check_update(update: Any, where: str) -> None:
    if isinstance(update, list):
        raise UnsupportedByMemoryBackend(
            f"{where}: pipeline-style updates are silently ignored by mongomock-ng, so the "
            "in-memory back end refuses them"
        )
    refuse_unfaithful(update, where)
