"""Role enforcement: which privilege actions a command needs, and whether a role grants them.

Privileges are MongoDB's own form, ``{"resource": {"db": ..., "collection": ...},
"actions": [...]}`` (also ``{"cluster": true}`` and ``{"anyResource": true}``). The
command-to-action map follows the manual's "Privilege Actions" page and each command's
"Access Control" section, for the commands this front runs: reads need ``find``; writes
``insert``/``update``/``remove`` (an upsert also ``insert``); an aggregation ``find`` on
every collection it reads (``$lookup``, ``$graphLookup``, ``$unionWith``, ``$facet``), and
``changeStream`` too when it opens a change stream; ``hello``, ``ping``, ``buildInfo``,
``endSessions`` and ``killCursors`` on one's own cursors need none.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

#: Commands anyone may run (no privilege): handshake, liveness, session housekeeping
UNCHECKED = frozenset({
    "hello", "isMaster", "ismaster", "ping", "buildInfo", "buildinfo", "endSessions",
    "killSessions", "refreshSessions", "connectionStatus", "killCursors",
})


class Need(NamedTuple):
    """One action on one resource: a namespace (``collection`` set), a database
    (``collection`` is None) or the cluster (``db`` is None)."""

    action: str
    db: str | None
    collection: str | None = None

    def __str__(self) -> str:
        if self.db is None:
            return f"{self.action} on the cluster"
        where = f"{self.db}.{self.collection}" if self.collection is not None else self.db
        return f"{self.action} on {where}"


#: A command's requirement: every group must be met; a group is met by any one of its needs
Requirement = list[tuple[Need, ...]]


def _is_system(collection: str) -> bool:
    return collection.startswith("system.")


def resource_covers(resource: Mapping[str, Any], need: Need) -> bool:
    """Whether a privilege's resource document covers the resource of ``need``."""
    if resource.get("anyResource"):
        return True
    if resource.get("cluster"):
        return need.db is None
    if need.db is None or "db" not in resource or "collection" not in resource:
        return False
    db, collection = resource["db"], resource["collection"]
    if db not in ("", need.db):
        return False
    if need.collection is None:  # a database resource: only whole-database privileges
        return bool(collection == "")
    if collection == "":
        return not _is_system(need.collection)
    return bool(collection == need.collection)


def grants(privileges: Iterable[Mapping[str, Any]], need: Need) -> list[int]:
    """Indexes of the privileges granting ``need`` (empty: not granted)."""
    return [index for index, privilege in enumerate(privileges)
            if need.action in privilege.get("actions", ())
            and resource_covers(privilege.get("resource", {}), need)]


def visible(privileges: Sequence[Mapping[str, Any]], db: str, collection: str | None) -> bool:
    """Whether a role has any privilege on a database or collection (what
    ``authorizedCollections``/``authorizedDatabases`` listings show)."""
    for privilege in privileges:
        resource = privilege.get("resource", {})
        if resource.get("anyResource") or resource.get("cluster"):
            continue
        if resource.get("db") not in ("", db):
            continue
        if collection is None or resource.get("collection") in ("", collection):
            return True
    return False


def _stage_target(spec: Any, key: str) -> str | None:
    """The collection a ``$unionWith``/``$out``/``$merge`` stage names: the stage's value
    itself, or its ``key`` field."""
    target = spec.get(key) if isinstance(spec, Mapping) else spec
    return target if isinstance(target, str) else None


def _pipeline_reads(db: str, pipeline: Any) -> Iterator[Need]:
    """``find`` on every collection a pipeline's stages read from (recursively)."""
    if not isinstance(pipeline, list):
        return
    for stage in pipeline:
        if not isinstance(stage, Mapping) or not stage:
            continue
        name, spec = next(iter(stage.items()))
        if name in ("$lookup", "$graphLookup") and isinstance(spec, Mapping):
            if isinstance(spec.get("from"), str):
                yield Need("find", db, spec["from"])
            yield from _pipeline_reads(db, spec.get("pipeline"))
        elif name == "$unionWith":
            target = _stage_target(spec, "coll")
            if target is not None:
                yield Need("find", db, target)
            if isinstance(spec, Mapping):
                yield from _pipeline_reads(db, spec.get("pipeline"))
        elif name == "$facet" and isinstance(spec, Mapping):
            for sub in spec.values():
                yield from _pipeline_reads(db, sub)
        elif name == "$out":
            target = _stage_target(spec, "coll")
            if target is not None:
                yield Need("insert", db, target)
                yield Need("remove", db, target)
        elif name == "$merge":
            target = _stage_target(spec, "into")
            if target is not None:
                yield Need("insert", db, target)
                yield Need("update", db, target)


def requirement(name: str, db: str, body: Mapping[str, Any]) -> Requirement:
    """The privileges command ``name`` (its document ``body``, run on ``db``) needs."""
    if name in UNCHECKED:
        return []
    target = body.get(name)
    collection = target if isinstance(target, str) else None

    def on(*actions: str) -> Requirement:
        return [(Need(action, db, collection),) for action in actions]

    if name == "getMore":
        return []  # checked against what opened the cursor (Cursors.requirement)
    if name in ("find", "count", "distinct"):
        return on("find")
    if name == "insert":
        return on("insert", *(["bypassDocumentValidation"]
                              if body.get("bypassDocumentValidation") else []))
    if name == "update":
        upsert = any(isinstance(s, Mapping) and s.get("upsert") for s in body.get("updates", []))
        return on("update", *(["insert"] if upsert else []))
    if name == "delete":
        return on("remove")
    if name in ("findAndModify", "findandmodify"):
        if body.get("remove"):
            return on("find", "remove")
        return on("find", "update", *(["insert"] if body.get("upsert") else []))
    if name == "aggregate":
        pipeline = body.get("pipeline") or []
        first = next(iter(pipeline[0]), None) if pipeline and isinstance(
            pipeline[0], Mapping) else None
        needs = on("changeStream", "find") if first == "$changeStream" else (
            on("find") if collection is not None else [])
        return needs + [(need,) for need in _pipeline_reads(db, pipeline)]
    if name == "createIndexes":
        return on("createIndex")
    if name == "listIndexes":
        return on("listIndexes")
    if name in ("dropIndexes", "deleteIndexes"):
        return on("dropIndex")
    if name == "drop":
        return on("dropCollection")
    if name == "create":
        # a non-capped collection: createCollection or insert on it will do
        return [(Need("createCollection", db, collection), Need("insert", db, collection))]
    if name == "dropDatabase":
        return [(Need("dropDatabase", db),)]
    if name == "listCollections":
        if body.get("authorizedCollections") and body.get("nameOnly"):
            return []  # answered with the collections the role can see
        return [(Need("listCollections", db),)]
    if name == "listDatabases":
        if body.get("authorizedDatabases", True):
            return []  # answered with the databases the role can see
        return [(Need("listDatabases", None),)]
    # every other command this front knows is an administrative one: the cluster's
    return [(Need(name, None),)]


def missing(privileges: Sequence[Mapping[str, Any]], needed: Requirement) -> list[Need]:
    """The needs of ``needed`` a role does not meet (the first of each unmet group)."""
    return [group[0] for group in needed
            if not any(grants(privileges, need) for need in group)]
