"""``apsched-mongo doctor``: is this deployment fit to run the scheduler?

It answers the questions asked when jobs stop running: which server, version and topology is
this (so will the event broker use change streams or poll, and is there an arbiter that can
stall majority writes), which write concern applies, is this the database and prefix you
meant, are the indexes the store relies on there and unchanged (and which old ones can go),
is the broker's events collection expiring its documents, is sharding compatible with what
the store does, how much is stored, how many leases ran out without being released (a node
died and nobody has cleaned up yet), and how old the oldest waiting job is.

It only reads; it never creates, fixes or drops anything. It gives up on an unreachable
server after a few seconds (``--timeout``), not the driver's 30.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

import anyio
import attrs
from pymongo import ASCENDING
from pymongo.errors import ConnectionFailure, OperationFailure, PyMongoError

from . import _sharding
from ._cli import (
    CommandLineError,
    add_verbose_argument,
    command_line_client,
    database_argument,
    describe_unreachable,
    positive_float,
    uri_argument,
)
from ._client import CODEC_OPTIONS, describe_hosts, redact, redact_uri, unreachable
from ._indexes import IndexSpec, conflict_with, is_present
from .datastore import index_specs
from .errors import ApschedMongoError, ServerUnreachableError

#: The collections of one store, by their name without the prefix
COLLECTIONS = ("tasks", "schedules", "jobs", "job_results", "meta")
#: The names APScheduler's built-in MongoDB store uses (no prefix)
BUILTIN_COLLECTIONS = ("tasks", "schedules", "jobs", "job_results")
#: The broker's TTL index (see MongoDBEventBroker)
EVENTS_TTL_INDEX = "apsched_ttl"
MINIMUM_VERSION = (5, 0)
#: What the store and broker use for every write, whatever the URI says
OUR_WRITE_CONCERN = 'w: "majority" with a bounded wtimeout'
DEFAULT_TIMEOUT = 5.0

EXIT_HEALTHY = 0
EXIT_PROBLEMS = 1
EXIT_FAILED = 2  # unreachable, refused or malformed URI: nothing was checked


@attrs.frozen
class IndexStatus:
    """One index: ``present``, ``missing`` or ``conflict`` (needed by the store), or
    ``unneeded`` (ours by its name, but this version no longer uses it)."""

    collection: str
    name: str
    state: str
    detail: str = ""


@attrs.frozen
class LeaseSummary:
    """The leases on one collection: how many are held, how many ran out, the oldest."""

    collection: str
    held: int
    expired: int
    #: the lease that ran out first: ``{"id", "holder", "until"}``
    oldest_expired: dict[str, Any] | None = None


@attrs.frozen
class ShardingStatus:
    """One of our collections as the cluster shards it (``key`` None: unsharded)."""

    collection: str
    key: dict[str, Any] | None
    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


@attrs.define
class Report:
    """Everything the doctor found; :meth:`render` turns it into the printed report."""

    where: str
    database: str
    prefix: str
    events_collection: str = "apsched_events"
    server_version: str = "?"
    topology: str = "?"
    arbiters: list[str] = attrs.field(factory=list)
    server_time: datetime | None = None
    #: the write concern the URI or client asks for, and the server's default
    client_write_concern: str = "?"
    server_write_concern: str = "?"
    #: ``initialized``, ``not initialized``, ``no such database``, ``built-in store only``
    data: str = "not initialized"
    initialized: bool = False
    collections: dict[str, bool] = attrs.field(factory=dict)
    counts: dict[str, int] = attrs.field(factory=dict)
    events: int | None = None
    events_retention: float | None = None
    indexes: list[IndexStatus] = attrs.field(factory=list)
    leases: list[LeaseSummary] = attrs.field(factory=list)
    oldest_pending_job: dict[str, Any] | None = None
    sharding: list[ShardingStatus] = attrs.field(factory=list)
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
    def expired_leases(self) -> int:
        return sum(summary.expired for summary in self.leases)

    def render(self) -> str:
        topology = self.topology
        if self.arbiters:
            topology += f" with arbiter(s) {', '.join(self.arbiters)}"
        rows: list[tuple[str, str]] = [
            ("server", self.where),
            ("database", f"{self.database} (collection prefix {self.prefix!r})"),
            ("server version", self.server_version),
            ("topology", topology),
            ("change streams", "available" if self.change_streams else "not available"),
            ("event broker mode", self.broker_mode),
            ("server time", _when(self.server_time)),
            ("write concern", f"{OUR_WRITE_CONCERN} on every write of the store and the "
                              "broker, whatever the URI says"),
            ("  URI/client asks", self.client_write_concern),
            ("  server default", self.server_write_concern),
        ]
        if not self.initialized:
            rows.append(("data", _DATA_STATES.get(self.data, self.data)))
        else:
            for name in COLLECTIONS:
                count = self.counts.get(name)
                rows.append((name, "collection missing" if count is None else str(count)))
            rows.append(("leases held", str(sum(s.held for s in self.leases))))
            rows.append(("leases expired", _expired_summary(self.leases)))
            job = self.oldest_pending_job
            rows.append(("oldest pending job", "none" if job is None else (
                f"{job['id']} (task {job['task_id']!r}, created {_when(job['created_at'])})"
            )))
        if self.events is None:
            rows.append(("events", f"{self.events_collection}: none yet (no MongoDBEventBroker "
                                   "has started on this database)"))
        else:
            retention = ("no TTL index" if self.events_retention is None
                         else f"kept {self.events_retention:g} s")
            rows.append(("events", f"{self.events_collection}: {self.events} ({retention})"))
        width = max(len(key) for key, _ in rows)
        lines = [f"{key:<{width}}  {value}" for key, value in rows]
        if self.indexes:
            lines += ["", "indexes:"]
            for index in self.indexes:
                lines.append(f"  {index.state:<9} {index.collection}.{index.name}")
                if index.detail:
                    lines += [f"            {part}" for part in index.detail.split("\n")]
        if self.sharding:
            lines += ["", "sharding:"]
            for status in self.sharding:
                key = "unsharded" if status.key is None else (
                    f"sharded on {_sharding.describe_key(status.key)}")
                verdict = "PROBLEM" if status.problems else "ok"
                lines.append(f"  {status.collection}: {key}: {verdict}")
        lines += [""] + [f"WARNING: {text}" for text in self.warnings]
        lines += [f"PROBLEM: {text}" for text in self.problems]
        lines.append("healthy" if self.healthy else
                     f"NOT healthy: {len(self.problems)} problem(s)")
        return "\n".join(lines)


_DATA_STATES = {
    "not initialized": "not initialized yet (no collections of ours)",
    "no such database": "not initialized yet (the database does not exist on this server)",
    "built-in store only": "none of ours: APScheduler's built-in MongoDB store's collections "
                           "only",
}


def _when(value: datetime | None) -> str:
    return "?" if value is None else value.astimezone(UTC).isoformat(timespec="milliseconds")


def _expired_summary(leases: list[LeaseSummary]) -> str:
    expired = sum(summary.expired for summary in leases)
    oldest = min((s for s in leases if s.oldest_expired), default=None,
                 key=lambda s: _sort_time(s.oldest_expired))
    if not expired or oldest is None or oldest.oldest_expired is None:
        return str(expired)
    lease = oldest.oldest_expired
    return (f"{expired} (oldest: {oldest.collection} {lease['id']} held by "
            f"{lease['holder']!r}, expired {_when(lease['until'])})")


def _sort_time(lease: dict[str, Any] | None) -> datetime:
    until = None if lease is None else lease.get("until")
    return until if isinstance(until, datetime) else datetime.min.replace(tzinfo=UTC)


def topology_of(hello: dict[str, Any]) -> str:
    """``hello`` tells: a ``setName`` means a replica set member, ``isdbgrid`` a mongos."""
    if hello.get("msg") == "isdbgrid":
        return "sharded"
    if hello.get("setName"):
        return "replica set"
    return "standalone"


# --- indexes ---------------------------------------------------------------------------------

def describe_index(keys: list[tuple[str, Any]], options: dict[str, Any]) -> str:
    """``(expires_at), TTL 3600 s``: keys and only the options that are set."""
    fields = [field if direction == 1 else f"{field} {direction}" for field, direction in keys]
    parts = [f"({', '.join(fields)})"]
    if options.get("unique"):
        parts.append("unique")
    if options.get("expireAfterSeconds") is not None:
        parts.append(f"TTL {options['expireAfterSeconds']:g} s")
    if options.get("partialFilterExpression"):
        parts.append(f"partial {_mongosh(options['partialFilterExpression'])}")
    return ", ".join(parts)


def _mongosh(value: Any) -> str:
    """A filter as mongosh prints it: ``{slot: {$exists: true}}``."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_mongosh(item)}" for key, item in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _spec_options(spec: IndexSpec) -> dict[str, Any]:
    return {"unique": spec.unique, "expireAfterSeconds": spec.expire_after_seconds,
            "partialFilterExpression": spec.partial}


def check_index(collection: str, spec: IndexSpec, existing: dict[str, Any]) -> IndexStatus:
    """Compare one needed index with what the server has, by the store's own rules."""
    conflicting = [(name, info) for name, info in existing.items()
                   if conflict_with(spec, {name: info})]
    if conflicting:
        name, info = conflicting[0]
        found = describe_index(list(info["key"]), info)
        needed = describe_index(list(spec.keys), _spec_options(spec))
        return IndexStatus(collection, spec.name, "conflict",
                           f"found:  {name!r} on {found}\nneeded: {spec.name!r} on {needed}")
    if not is_present(spec, existing):
        return IndexStatus(collection, spec.name, "missing")
    return IndexStatus(collection, spec.name, "present")


# --- diagnosis -------------------------------------------------------------------------------

async def diagnose(
    client: Any, database: str, prefix: str = "apsched_", uri: str | None = None,
    events_collection: str = "apsched_events",
) -> Report:
    """Inspect the server and the store's collections; raises
    :class:`~apsched_mongo.errors.ServerUnreachableError` if no server answers."""
    where = redact_uri(uri) if uri else describe_hosts(client)
    report = Report(where=where, database=database, prefix=prefix,
                    events_collection=events_collection)
    try:
        await _diagnose(client, report)
    except ConnectionFailure as exc:
        raise unreachable(exc, client, uri) from None
    return report


async def _optional_command(client: Any, name: str) -> dict[str, Any] | None:
    """An admin command that may be refused (privileges, the in-memory back end)."""
    try:
        reply: dict[str, Any] = await client.admin.command(name)
    except (OperationFailure, ApschedMongoError, NotImplementedError):
        return None
    return reply


async def _diagnose(client: Any, report: Report) -> None:
    hello: dict[str, Any] = await client.admin.command("hello")
    report.topology = topology_of(hello)
    report.arbiters = [str(host) for host in hello.get("arbiters", [])]
    local_time = hello.get("localTime")
    if isinstance(local_time, datetime):
        report.server_time = (local_time if local_time.tzinfo
                              else local_time.replace(tzinfo=UTC))
    else:
        report.server_time = datetime.now(UTC)
        report.warnings.append("the server did not report its time; using this machine's")
    build_info = await _optional_command(client, "buildInfo") or {}
    report.server_version = str(build_info.get("version", "?"))
    version = _sharding.parse_version(report.server_version)
    if version is not None and version < MINIMUM_VERSION:
        report.problems.append(f"MongoDB {report.server_version} is older than 5.0, the "
                               "oldest version apsched-mongo runs on")
    if report.topology == "standalone":
        report.warnings.append("standalone server: no change streams, so the event broker "
                               "polls (use a replica set, even a single-node one, for instant "
                               "wake-ups)")
    await _check_write_concern(client, report)

    db = client.get_database(report.database, codec_options=CODEC_OPTIONS)
    names = set(await db.list_collection_names())
    report.collections = {name: report.prefix + name in names for name in COLLECTIONS}
    report.initialized = any(report.collections.values())
    await _check_events(db, names, report)
    if report.topology == "sharded":
        await _check_sharding(client, report, version)
    if not report.initialized:
        await _explain_missing_data(client, names, report)
        return  # a fresh database: the store creates everything when it first starts
    report.data = "initialized"

    collections = {name: db.get_collection(report.prefix + name, codec_options=CODEC_OPTIONS)
                   for name in COLLECTIONS}
    for name, collection in collections.items():
        if report.collections[name]:
            report.counts[name] = await collection.count_documents({})
        elif name == "tasks":
            report.counts[name] = 0  # created by the first add_task: it has no indexes
        elif name == "meta":
            report.warnings.append(f"collection {collection.full_name!r} is missing: the data "
                                   "was written by an older apsched-mongo, or the store has "
                                   "not started since; starting a store creates it")
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


async def _check_write_concern(client: Any, report: Report) -> None:
    """What the URI asks for, what the server would apply by default, and the PSA trap."""
    if report.arbiters:
        report.warnings.append(
            f"this replica set has an arbiter ({', '.join(report.arbiters)}): while a "
            "data-bearing member is down, majority writes -- every write of apsched-mongo -- "
            "wait until their wtimeout and fail, and change streams deliver nothing; replace "
            "the arbiter with a data-bearing member"
        )
    write_concern = getattr(client, "write_concern", None)
    document = getattr(write_concern, "document", None)
    if write_concern is None:
        report.client_write_concern = report.server_write_concern = "n/a (in-memory back end)"
        return
    report.client_write_concern = _mongosh(document) if document else (
        "nothing (the server's default applies to other clients)")
    reply = await _optional_command(client, "getDefaultRWConcern")
    if reply is None:
        report.server_write_concern = "unknown (getDefaultRWConcern refused or not available)"
    else:
        default = reply.get("defaultWriteConcern")
        source = reply.get("defaultWriteConcernSource", "?")
        report.server_write_concern = (
            f"{_mongosh(default)} ({source})" if default else f"implicit ({source})")


async def _check_events(db: Any, names: set[str], report: Report) -> None:
    if report.events_collection not in names:
        return
    events = db.get_collection(report.events_collection)
    report.events = await events.estimated_document_count()
    existing: dict[str, Any] = await events.index_information()
    ttl = [info for info in existing.values()
           if [field for field, _ in info["key"]] == ["created_at"]
           and info.get("expireAfterSeconds") is not None]
    if ttl:
        report.events_retention = float(ttl[0]["expireAfterSeconds"])
    else:
        report.problems.append(f"the events collection {report.events_collection!r} has no TTL "
                               "index on created_at, so events are never removed; starting a "
                               "MongoDBEventBroker creates it")
    for name in existing:
        if name.startswith("apsched_") and name != EVENTS_TTL_INDEX:
            _unneeded(report, report.events_collection, name)


async def _explain_missing_data(client: Any, names: set[str], report: Report) -> None:
    """No collections of ours here: a mistyped --database or --prefix, data left in the
    built-in store, or simply a new deployment. Say which."""
    if names and names.issuperset({"schedules", "jobs"}) and names.issubset(
            set(BUILTIN_COLLECTIONS) | {report.events_collection}):
        report.data = "built-in store only"
        report.problems.append(
            f"database {report.database!r} holds only the collections of APScheduler's "
            f"built-in MongoDB store ({', '.join(sorted(names))}); schedulers using "
            "apsched-mongo would start empty here. Copy them over with: apsched-mongo migrate "
            f"--from-builtin --source-database {report.database} --database {report.database}"
        )
        return
    prefixes = sorted({name[:-len("schedules")] for name in names
                       if name.endswith("schedules") and name[:-len("schedules")]
                       and name[:-len("schedules")] + "jobs" in names})
    if prefixes:
        report.problems.append(
            f"no collections with prefix {report.prefix!r} in {report.database!r}, but "
            f"apsched-mongo collections with prefix {prefixes[0]!r}: did you mean --prefix "
            f"{prefixes[0]}?")
        return
    try:
        databases = await client.list_database_names()
    except (OperationFailure, ApschedMongoError, NotImplementedError):
        return  # not allowed to list databases: nothing more to say
    if report.database in databases:
        return
    report.data = "no such database"
    ours = [name for name in databases
            if name not in ("admin", "config", "local") and await _holds_our_data(client, name,
                                                                                report.prefix)]
    if ours:
        report.problems.append(
            f"database {report.database!r} does not exist on this server, but "
            f"{', '.join(repr(name) for name in ours)} holds apsched-mongo data: did you mean "
            f"--database {ours[0]}?")
    else:
        others = ", ".join(name for name in databases if name not in ("admin", "config",
                                                                      "local")) or "none"
        report.warnings.append(
            f"database {report.database!r} does not exist on this server (yet): fine for a new "
            f"deployment, but if you expected data, check --database (databases here: "
            f"{others})")


async def _holds_our_data(client: Any, database: str, prefix: str) -> bool:
    try:
        names = await client.get_database(database).list_collection_names()
    except (OperationFailure, ApschedMongoError, NotImplementedError):
        return False
    return {prefix + "schedules", prefix + "jobs"}.issubset(names)


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
                report.problems.append(
                    f"index {collection_name}.{spec.name} conflicts with an existing index "
                    "(see above); apsched-mongo never drops it: drop or rename it yourself")
            elif status.state == "missing":
                report.problems.append(f"index {collection_name}.{spec.name} is missing "
                                       "(starting a store creates it)")
        needed = {spec.name for spec in specs}
        for name in existing:
            if name.startswith("apsched_") and name not in needed:
                _unneeded(report, collection_name, name)
    for short_name in COLLECTIONS:
        if short_name not in index_specs() and report.collections.get(short_name):
            collection_name = report.prefix + short_name
            for name in await db.get_collection(collection_name).index_information():
                if name.startswith("apsched_"):
                    _unneeded(report, collection_name, name)


def _unneeded(report: Report, collection: str, name: str) -> None:
    report.indexes.append(IndexStatus(collection, name, "unneeded"))
    report.warnings.append(
        f"index {collection}.{name} is no longer needed by this version and can be dropped: "
        f'db.{collection}.dropIndex("{name}") (doctor never drops anything)')


async def _check_leases(collections: dict[str, Any], report: Report) -> None:
    """Count held and expired leases on the server, and fetch only the oldest expired one."""
    now = report.server_time
    for name in ("schedules", "jobs"):
        if not report.collections[name]:
            continue
        held = {"acquired_by": {"$ne": None}}
        expired = {**held, "$or": [{"acquired_until": None}, {"acquired_until": {"$lt": now}}]}
        held_count = await collections[name].count_documents(held)
        expired_count = await collections[name].count_documents(expired) if held_count else 0
        oldest = None
        if expired_count:
            document = await collections[name].find_one(
                expired, sort=[("acquired_until", ASCENDING)],
                projection={"acquired_by": True, "acquired_until": True})
            if document:
                oldest = {"id": document["_id"], "holder": document.get("acquired_by"),
                          "until": document.get("acquired_until")}
        report.leases.append(LeaseSummary(name, held_count, expired_count, oldest))
    if report.expired_leases:
        report.warnings.append(
            f"{report.expired_leases} lease(s) expired without being released: their "
            "scheduler stopped or lost contact; the next store cleanup releases them (jobs "
            "as 'abandoned')"
        )


async def _check_sharding(client: Any, report: Report, version: tuple[int, int] | None) -> None:
    """Each of our collections' real shard key (``config.collections``) against the rules."""
    names = {report.prefix + name: name for name in COLLECTIONS}
    names[report.events_collection] = "events"
    namespaces = {f"{report.database}.{name}": (name, short) for name, short in names.items()}
    try:
        entries = await client.get_database("config", codec_options=CODEC_OPTIONS)[
            "collections"].find({"_id": {"$in": list(namespaces)}}).to_list(None)
    except (OperationFailure, ApschedMongoError, NotImplementedError) as exc:
        report.warnings.append(f"could not read config.collections ({exc}): the sharding of "
                               "our collections was not checked")
        return
    keys = {entry["_id"]: entry.get("key") for entry in entries if not entry.get("dropped")}
    for namespace, (name, short) in namespaces.items():
        key = keys.get(namespace)
        if not key:
            report.sharding.append(ShardingStatus(name, None))
            continue
        verdict = _sharding.judge(_sharding.RULES[short], dict(key), version or (5, 0))
        report.sharding.append(ShardingStatus(name, dict(key), verdict.problems,
                                              verdict.warnings))
        described = _sharding.describe_key(key)
        report.problems += [f"{name} is sharded on {described}, but {text}"
                            for text in verdict.problems]
        report.warnings += [f"{name} is sharded on {described}: {text}"
                            for text in verdict.warnings]
    report.warnings.append(_sharding.CHANGE_STREAM_LATENCY)


# --- command line ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uri", type=uri_argument,
                        help="MongoDB URI (default: an in-memory MongoDB, for a demo)")
    parser.add_argument("--database", type=database_argument, default="apscheduler",
                        help="database name (default: apscheduler)")
    parser.add_argument("--prefix", default="apsched_",
                        help="collection name prefix (default: apsched_)")
    parser.add_argument("--events-collection", default="apsched_events",
                        help="the event broker's collection (default: apsched_events)")
    parser.add_argument("--timeout", type=positive_float, default=None,
                        help=f"seconds to wait for a server (default: {DEFAULT_TIMEOUT:g}, or "
                             "the URI's serverSelectionTimeoutMS)")
    add_verbose_argument(parser)


def _selection_timeout(args: argparse.Namespace) -> float | None:
    """--timeout if given; else the URI's own setting; else a short default."""
    if args.timeout is not None:
        return float(args.timeout)
    if args.uri and "serverselectiontimeoutms" in args.uri.lower():
        return None
    return DEFAULT_TIMEOUT


async def _run(args: argparse.Namespace) -> int:
    client = command_line_client(args.uri, "check",
                                 server_selection_timeout=_selection_timeout(args))
    try:
        report = await diagnose(client, args.database, args.prefix, uri=args.uri,
                                events_collection=args.events_collection)
    except ServerUnreachableError as exc:
        print(f"PROBLEM: {describe_unreachable(exc, args.verbose)}")
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
    except ValueError as exc:  # pragma: no cover - URIs are checked when parsed
        raise CommandLineError(str(exc)) from None
