"""The least privileges apsched-mongo needs, as MongoDB privilege documents.

This is the role docs/deployment.rst tells users to create; the tests run the data store,
the event broker, ``doctor`` and ``migrate --from-builtin --apply`` against a server that
enforces exactly this role, and check that every action in it is used.

MongoDB privileges name whole collections (there are no prefix patterns), so each collection
is listed, once, with every action anything does to it.
"""

from __future__ import annotations

from typing import Any

#: The data store's collections, without the prefix, and what it does to each
STORE_ACTIONS: dict[str, tuple[str, ...]] = {
    "tasks": ("find", "insert", "update", "remove"),  # no indexes of ours
    "schedules": ("find", "insert", "update", "remove", "createIndex", "listIndexes"),
    "jobs": ("find", "insert", "update", "remove", "createIndex", "listIndexes"),
    "job_results": ("find", "insert", "remove", "createIndex", "listIndexes"),  # never updated
    # the data format version, upserted at start (findAndModify with upsert)
    "meta": ("find", "insert", "update"),
}
#: The event broker's collection: events are inserted and read (watched on replica sets,
#: polled on standalone servers); a TTL index expires them
EVENT_ACTIONS = ("find", "insert", "changeStream", "createIndex", "listIndexes")
#: ``doctor`` lists the database's collections and every collection's indexes (the store
#: itself never lists those of tasks and meta), and asks the server for its default write
#: concern
DOCTOR_DATABASE_ACTIONS = ("listCollections",)
DOCTOR_COLLECTION_ACTIONS = ("find", "listIndexes")
DOCTOR_CLUSTER_ACTIONS = ("getDefaultRWConcern",)
#: ``migrate --from-builtin``: the built-in store's collections are read...
MIGRATE_SOURCE_COLLECTIONS = ("tasks", "schedules", "jobs")
#: ...and what was copied is recorded in ``<prefix>migrated_from_builtin``
MIGRATE_LEDGER = "migrated_from_builtin"
MIGRATE_LEDGER_ACTIONS = ("find", "insert")


def scheduler_privileges(
    database: str = "apscheduler",
    collection_prefix: str = "apsched_",
    events_collection: str = "apsched_events",
    *,
    doctor: bool = False,
    migrate_source: str | None = None,
) -> list[dict[str, Any]]:
    """The privileges of a role for the data store and the event broker on ``database``;
    with ``doctor``, also what ``python -m apsched_mongo doctor`` needs; with
    ``migrate_source`` (the built-in store's database), also what ``migrate --from-builtin
    --apply`` needs. One privilege per resource, its actions in a stable order."""
    grants: dict[tuple[str, str], list[str]] = {}

    def grant(db: str, collection: str, actions: tuple[str, ...]) -> None:
        granted = grants.setdefault((db, collection), [])
        granted += [action for action in actions if action not in granted]

    for name, actions in STORE_ACTIONS.items():
        grant(database, collection_prefix + name, actions)
    grant(database, events_collection, EVENT_ACTIONS)
    if doctor:
        for name in STORE_ACTIONS:
            grant(database, collection_prefix + name, DOCTOR_COLLECTION_ACTIONS)
        grant(database, "", DOCTOR_DATABASE_ACTIONS)
    if migrate_source is not None:
        for name in MIGRATE_SOURCE_COLLECTIONS:
            grant(migrate_source, name, ("find",))
        grant(database, collection_prefix + MIGRATE_LEDGER, MIGRATE_LEDGER_ACTIONS)
    privileges: list[dict[str, Any]] = []
    for (db, collection), granted in grants.items():
        privileges.append({"resource": {"db": db, "collection": collection},
                           "actions": granted})
        if collection == "":  # doctor's: the cluster's privilege goes with the database's
            privileges.append({"resource": {"cluster": True},
                               "actions": list(DOCTOR_CLUSTER_ACTIONS)})
    return privileges
