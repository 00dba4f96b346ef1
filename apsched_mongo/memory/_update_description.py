"""The ``updateDescription`` of an update event, as MongoDB 5.0+ reports it.

MongoDB logs an update by the paths its operators name, not by a full comparison of the
two documents: ``{"$set": {"a": {"b": 1}}}`` reports ``a`` with its whole new value even if
only ``a.b`` changed, while ``{"$set": {"a.b": 1}}`` reports ``a.b``. So each path named by
the update is compared on its own:

* unchanged: not reported (an update that changes nothing writes no event at all);
* gone: listed in ``removedFields`` (``$unset``, the source of ``$rename``);
* created: reported at its first component that did not exist (``$set: {"x.y": 1}`` on a
  document without ``x`` reports ``x: {y: 1}``);
* an array that ``$push``/``$addToSet`` extended: one dotted entry per new element
  (``scores.1``), unless it was empty (then the whole array);
* anything else (``$pull``, ``$pop``, ``$inc``, ...): the whole new value at that path.

Paths with a positional part (``arr.$.x``, ``arr.$[].x``, ``arr.$[i].x``) are compared
element by element below their last fixed part, giving dotted entries such as ``arr.1.x``.
``truncatedArrays`` stays empty: MongoDB fills it only for pipeline-style updates, which the
in-memory back end refuses.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

_MISSING: Any = object()
_APPENDING = frozenset({"$push", "$addToSet"})


def describe_update(before: Mapping[str, Any], after: Mapping[str, Any],
                    update: Mapping[str, Any] | None) -> dict[str, Any]:
    """``updatedFields``/``removedFields``/``truncatedArrays`` for ``before`` -> ``after``;
    ``update`` is the modifier document applied (``None``: compare whole documents)."""
    updated: dict[str, Any] = {}
    removed: list[str] = []
    if update is None:
        _compare("", before, after, updated, removed)
    for path, operator in _named_paths(update or {}):
        parts = path.split(".")
        if operator == "positional":
            _compare(path, _get(before, parts), _get(after, parts), updated, removed)
            continue
        for depth in range(1, len(parts) + 1):
            if _get(before, parts[:depth]) is _MISSING:  # created here
                value = _get(after, parts[:depth])
                if value is not _MISSING:
                    updated[".".join(parts[:depth])] = value
                break
        else:
            old, new = _get(before, parts), _get(after, parts)
            if new is _MISSING:
                removed.append(path)
            elif operator in _APPENDING and _extends(old, new):
                for index in range(len(old), len(new)):
                    updated[f"{path}.{index}"] = new[index]
            elif not _same(old, new):
                updated[path] = new
    return {"updatedFields": updated, "removedFields": removed, "truncatedArrays": []}


def _named_paths(update: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """``(path, operator)`` for every path the update names, once each; a positional path
    is cut at its first positional part and marked ``"positional"``."""
    seen: set[str] = set()
    for operator, fields in update.items():
        if operator == "$setOnInsert" or not isinstance(fields, Mapping):
            continue  # $setOnInsert changes only documents it inserts
        named = list(fields.items()) if operator == "$rename" else [(f, None) for f in fields]
        for source, target in named:
            for path in (source, target) if target else (source,):
                parts = path.split(".")
                fixed = next((i for i, part in enumerate(parts) if part.startswith("$")), None)
                if fixed is not None:
                    path, operator_of_path = ".".join(parts[:fixed]), "positional"
                else:
                    operator_of_path = operator
                if path not in seen:
                    seen.add(path)
                    yield path, operator_of_path


def _compare(path: str, old: Any, new: Any, updated: dict[str, Any], removed: list[str]) -> None:
    """Element-by-element comparison below ``path`` (``""`` is the whole document)."""
    def below(key: object) -> str:
        return f"{path}.{key}" if path else str(key)

    if new is _MISSING:
        if old is not _MISSING:
            removed.append(path)
    elif isinstance(old, Mapping) and isinstance(new, Mapping):
        removed.extend(below(key) for key in old if key not in new)
        for key, value in new.items():
            _compare(below(key), old.get(key, _MISSING), value, updated, removed)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for index, (was, now) in enumerate(zip(old, new, strict=True)):
            _compare(below(index), was, now, updated, removed)
    elif _extends(old, new):
        for index in range(len(old), len(new)):
            updated[below(index)] = new[index]
    elif old is _MISSING or not _same(old, new):
        updated[path] = new


def _extends(old: Any, new: Any) -> bool:
    return (isinstance(old, list) and isinstance(new, list) and 0 < len(old) < len(new)
            and _same(new[:len(old)], old))


def _same(old: Any, new: Any) -> bool:
    return type(old) is type(new) and bool(old == new)


def _get(document: Any, parts: list[str]) -> Any:
    value = document
    for part in parts:
        if isinstance(value, Mapping):
            value = value.get(part, _MISSING)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value
