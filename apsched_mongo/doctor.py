"""``python -m apsched_mongo doctor``: is this deployment fit to run the scheduler?

It answers the questions asked when jobs stop running: which server and topology is this
(so will the event broker use change streams or poll), are the indexes the store relies
on there and unchanged, how much is stored, which leases are held and which ran out
without being released (a node died and nobody has cleaned up yet), and how old the
oldest waiting job is. It only reads; it never creates, fixes or drops anything.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

import anyio
import attrs
from pymongo import ASCENDING
from pymongo.errors import ConnectionFailure, PyMongoError

from ._cli import command_line_client
from ._client import (
    CODEC_OPTIONS,
    describe_hosts,
    hosts_of,
    redact,
    redact_uri,
)
from ._indexes import IndexSpec, conflict_with, is_present
from .datastore import index_specs
from .errors import ServerUnreachableError

#: The collections of one store, by their name without the prefix
COLLECTIONS = ("tasks", "schedules", "jobs", "job_results")

EXIT_HEALTHY = 0
EXIT_PROBLEMS = 1
EXIT_FAILED = 2  # unreachable, refused or malformed URI: nothing was checked


@attrs.frozen
class IndexStatus:
    """One index the store needs: ``present``, ``missing`` or ``conflict``."""

    collection: str
    name: str
    state: str
    detail: str = ""


@attrs.frozen
class Lease:
    """A schedule or job marked as held by a scheduler."""

    collection: str
    id: Any
    holder: str
    until: datetime | None
    expired: bool


@attrs.define
class Report:
    """Everything the doctor found; :meth:`render` turns it into the printed table."""

    where: str
    database: str
    prefix: str
    server_version: str = "?"
    topology: str = "?"
    server_time: datetime | None = None
    initialized: bool = False
    collections: dict[str, bool] = attrs.field(factory=dict)
    counts: dict[str, int] = attrs.field(factory=dict)
    indexes: list[IndexStatus] = attrs.field(factory=list)
    leases: list[Lease] = attrs.field(factory=list)
    oldest_pending_job: dict[str, Any] | None = None
    problems: list[str] = attrs.field(factory=list)
    warnings: list[str] = attrs.field(factory=list)

    @property
    def change_streams(self) -> bool:
        """Change streams exist on replica sets and sharded clusters, never standalone."""
        return self.topology in ("replica set", "sharded")

    @property
    def broker_mode(self) -> str:
        return "change streams" if self.change_streams else "polling"

    @property
    def healthy(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        return EXIT_HEALTHY if self.healthy else EXIT_PROBLEMS

    @property
    def expired_leases(self) -> list[Lease]:
        return [lease for lease in self.leases if lease.expired]

    def render(self) -> str:
        rows: list[tuple[str, str]] = [
            ("server", self.where),
            ("database", f"{self.database} (collection prefix {self.prefix!r})"),
            ("server version", self.server_version),
            ("topology", self.topology),
            ("change streams", "available" if self.change_streams else "not available"),
            ("event broker mode", self.broker_mode),
            ("server time", _when(self.server_time)),
        ]
        if not self.initialized:
            rows.append(("data", "not initialized yet (no collections of ours)"))
        else:
            for name in COLLECTIONS:
                count = self.counts.get(name)
                rows.append((name, "collection missing" if count is None else str(count)))
            held = len(self.leases)
            rows.append(("leases held", str(held)))
            rows.append(("leases expired", str(len(self.expired_leases))))
            job = self.oldest_pending_job
            rows.append(("oldest pending job", "none" if job is None else (
                f"{job['id']} (task {job['task_id']!r}, created {_when(job['created_at'])})"
            )))
        width = max(len(key) for key, _ in rows)
        lines = [f"{key:<{width}}  {value}" for key, value in rows]
        if self.indexes:
            lines += ["", "indexes:"]
            for index in self.indexes:
                detail = f"  {index.detail}" if index.detail else ""
                lines.append(f"  {index.state:<8} {index.collection}.{index.name}{detail}")
        for lease in self.expired_leases:
            lines.append(f"expired lease: {lease.collection} {lease.id} held by "
                         f"{lease.holder!r} until {_when(lease.until)}")
        lines += [""] + [f"WARNING: {text}" for text in self.warnings]
        lines += [f"PROBLEM: {text}" for text in self.problems]
        lines.append("healthy" if self.healthy else
                     f"NOT healthy: {len(self.problems)} problem(s)")
        return "\n".join(lines)


def _when(value: datetime | None) -> str:
    return "?" if value is None else value.astimezone(UTC).isoformat(timespec="milliseconds")


def topology_of(hello: dict[str, Any]) -> str:
    """``hello`` tells: a ``setName`` means a replica set member, ``isdbgrid`` a mongos."""
    if hello.get("msg") == "isdbgrid":
        return "sharded"
    if hello.get("setName"):
        return "replica set"
    return "standalone"


def check_index(collection: str, spec: IndexSpec, existing: dict[str, Any]) -> IndexStatus:
    """Compare one needed index with what the server has, by the store's own rules."""
    if problem := conflict_with(spec, existing):
        return IndexStatus(collection, spec.name, "conflict", problem)
    if not is_present(spec, existing):
        return IndexStatus(collection, spec.name, "missing")
    return IndexStatus(collection, spec.name, "present")


async def diagnose(
    client: Any, database: str, prefix: str = "apsched_", uri: str | None = None
) -> Report:
    """Inspect the server and the store's collections; raises
    :class:`~apsched_mongo.errors.ServerUnreachableError` if no server answers."""
    where = redact_uri(uri) if uri else describe_hosts(client)
    report = Report(where=where, database=database, prefix=prefix)
    try:
        await _diagnose(client, report)
    except ConnectionFailure as exc:
        message = f"cannot reach MongoDB at {', '.join(hosts_of(uri)) if uri else where}: {exc}"
        raise ServerUnreachableError(redact(message, uri) if uri else message) from None
    return report


async def _diagnose(client: Any, report: Report) -> None:
    hello: dict[str, Any] = await client.admin.command("hello")
    report.topology = topology_of(hello)
    local_time = hello.get("localTime")
    if isinstance(local_time, datetime):
        report.server_time = (local_time if local_time.tzinfo
                              else local_time.replace(tzinfo=UTC))
    else:
        report.server_time = datetime.now(UTC)
        report.warnings.append("the server did not report its time; using this machine's")
    build_info = await client.admin.command("buildInfo")
    report.server_version = str(build_info.get("version", "?"))
    if report.topology == "standalone":
        report.warnings.append("standalone server: no change streams, so the event broker "
                               "polls (use a replica set, even a single-node one, for instant "
                               "wake-ups)")

    db = client.get_database(report.database, codec_options=CODEC_OPTIONS)
    names = set(await db.list_collection_names())
    report.collections = {name: report.prefix + name in names for name in COLLECTIONS}
    report.initialized = any(report.collections.values())
    if not report.initialized:
        return  # a fresh database: the store creates everything when it first starts

    collections = {name: db.get_collection(report.prefix + name, codec_options=CODEC_OPTIONS)
                   for name in COLLECTIONS}
    for name, collection in collections.items():
        if report.collections[name]:
            report.counts[name] = await collection.count_documents({})
        elif name == "tasks":
            report.counts[name] = 0  # created by the first add_task: it has no indexes
        else:
            report.problems.append(f"collection {collection.full_name!r} is missing")

    await _check_indexes(db, report)
    await _check_leases(collections, report)
    if report.collections["jobs"]:
        job = await collections["jobs"].find_one(
            {"acquired_by": None}, sort=[("queue_order", ASCENDING), ("_id", ASCENDING)],
            projection={"task_id": True, "created_at": True},
        )
        if job:
            report.oldest_pending_job = {"id": job["_id"], "task_id": job.get("task_id"),
                                         "created_at": job.get("created_at")}


async def _check_indexes(db: Any, report: Report) -> None:
    for short_name, specs in index_specs().items():
        collection_name = report.prefix + short_name
        existing: dict[str, Any] = {}
        if report.collections.get(short_name, True):
            existing = await db.get_collection(collection_name).index_information()
        for spec in specs:
            status = check_index(collection_name, spec, existing)
            report.indexes.append(status)
            if status.state == "conflict":
                report.problems.append(f"index {collection_name}.{spec.name} conflicts: "
                                       f"{status.detail}")
            elif status.state == "missing":
                report.problems.append(f"index {collection_name}.{spec.name} is missing "
                                       "(starting a store creates it)")


async def _check_leases(collections: dict[str, Any], report: Report) -> None:
    now = report.server_time
    for name in ("schedules", "jobs"):
        if not report.collections[name]:
            continue
        held = await collections[name].find(
            {"acquired_by": {"$ne": None}},
            projection={"acquired_by": True, "acquired_until": True},
        ).to_list(None)
        for document in held:
            until = document.get("acquired_until")
            expired = until is None or (now is not None and until < now)
            report.leases.append(Lease(name, document["_id"], document["acquired_by"],
                                       until, expired))
    expired = report.expired_leases
    if expired:
        report.warnings.append(
            f"{len(expired)} lease(s) expired without being released: their scheduler "
            "stopped or lost contact; the next store cleanup releases them (jobs as "
            "'abandoned')"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uri", help="MongoDB URI (default: an in-memory MongoDB, for a demo)")
    parser.add_argument("--database", default="apscheduler", help="database name")
    parser.add_argument("--prefix", default="apsched_", help="collection name prefix")


async def _run(args: argparse.Namespace) -> int:
    client = command_line_client(args.uri, "check")
    try:
        report = await diagnose(client, args.database, args.prefix, uri=args.uri)
    except ServerUnreachableError as exc:
        print(f"PROBLEM: {exc}")
        return EXIT_FAILED
    except PyMongoError as exc:  # e.g. not authorized
        text = redact(str(exc), args.uri) if args.uri else str(exc)
        print(f"PROBLEM: cannot inspect {args.database!r}: {text}")
        return EXIT_FAILED
    finally:
        await client.close()
    print(report.render())
    return report.exit_code


def run(args: argparse.Namespace) -> int:
    try:
        return anyio.run(_run, args)
    except ValueError as exc:  # a malformed URI, already redacted by create_client
        print(f"PROBLEM: {exc}")
        return EXIT_FAILED
