"""``apsched-mongo migrate --from-builtin``: move off APScheduler's own MongoDB store.

APScheduler's built-in store keeps ``tasks``, ``schedules`` and ``jobs`` with datetimes as
float timestamps plus ``<field>_utcoffset`` minutes. We read those documents, turn them
back into APScheduler objects with APScheduler's own unmarshalling, and write them through
:class:`~apsched_mongo.MongoDBDataStore`'s public methods, so our document shapes stay
defined in one place (the store's codec).

* Dry run by default: nothing is written, not even indexes.
* Streams the source in batches (``batch_size``): per batch, one query finds what the target
  has already and one what the ledger records; the store's writes of a batch run
  concurrently; the ledger is written with one ``insert_many``.
* Jobs already acquired by a running scheduler are left alone (they are running there).
* Idempotent and resumable: what exists in the target, or was copied by an earlier run
  (recorded in the ``<prefix>migrated_from_builtin`` ledger, so a job that has since run
  and been deleted is not copied and run again), is skipped.
* A document that cannot be converted is reported, naming it and the cause, and the rest
  carry on.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any
from uuid import UUID

import anyio
import attrs
from apscheduler import ConflictPolicy, Job, Schedule, Task
from apscheduler.abc import Serializer
from apscheduler.datastores.mongodb import unmarshal_timestamps
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.serializers.json import JSONSerializer
from apscheduler.serializers.pickle import PickleSerializer
from pymongo import ASCENDING
from pymongo.errors import (
    BulkWriteError,
    DuplicateKeyError,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from ._cli import (
    CommandLineError,
    add_verbose_argument,
    command_line_client,
    database_argument,
    describe_unreachable,
    positive_int,
    uri_argument,
)
from ._client import CODEC_OPTIONS, redact, unreachable
from ._progress import Progress
from .datastore import MongoDBDataStore
from .errors import ServerUnreachableError

logger = logging.getLogger(__name__)

#: (kind, built-in collection, our collection without the prefix)
KINDS = (("task", "tasks", "tasks"), ("schedule", "schedules", "schedules"),
         ("job", "jobs", "jobs"))
LEDGER = "migrated_from_builtin"
BATCH_SIZE = 500
#: store writes in flight at once within a batch (round trips overlap on a real server)
CONCURRENT_WRITES = 16


def serializer_named(name: str) -> Serializer:
    """``pickle``, ``json`` or ``cbor``: APScheduler's serializers by name."""
    if name == "pickle":
        return PickleSerializer()
    if name == "json":
        return JSONSerializer()
    if name == "cbor":
        try:
            from apscheduler.serializers.cbor import CBORSerializer
        except ImportError as exc:  # cbor2 missing
            raise CommandLineError(f"the cbor serializer needs cbor2: pip install 'cbor2<6' "
                                   f"({exc})") from None
        return CBORSerializer()
    raise ValueError(f"unknown serializer {name!r}: choose pickle, json or cbor")


SERIALIZERS = ("pickle", "json", "cbor")


@attrs.define
class KindCount:
    """What happened to the documents of one kind."""

    found: int = 0
    copied: int = 0  # in a dry run: would be copied
    already_there: int = 0
    skipped_acquired: int = 0
    failed: int = 0


@attrs.define
class MigrationReport:
    applied: bool
    counts: dict[str, KindCount] = attrs.field(
        factory=lambda: {kind: KindCount() for kind, _, _ in KINDS}
    )
    #: (kind, source _id, reason) for every document that could not be converted or written
    failures: list[tuple[str, Any, str]] = attrs.field(factory=list)

    def render(self) -> str:
        verb = "copied" if self.applied else "would copy"
        lines = [f"{'':<10}{'found':>7}{verb:>12}{'present':>9}{'running':>9}{'failed':>8}"]
        for kind, count in self.counts.items():
            lines.append(f"{kind + 's':<10}{count.found:>7}{count.copied:>12}"
                         f"{count.already_there:>9}{count.skipped_acquired:>9}"
                         f"{count.failed:>8}")
        lines += [f"could not convert {kind} {doc_id!r}: {reason}"
                  for kind, doc_id, reason in self.failures]
        if any(count.found and count.failed == count.found - count.skipped_acquired
               for count in self.counts.values()):
            lines.append("no document of some kind could be converted: is --source-serializer "
                         "the one the built-in store was configured with?")
        if not self.applied:
            lines.append("dry run: nothing was written (pass --apply to copy)")
        return "\n".join(lines)


def describe_failure(exc: BaseException) -> str:
    """``DeserializationError: UnpicklingError: invalid load key, 'n'.``: the exception and
    every cause below it, so an exception raised without a message still says why."""
    parts: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(parts) < 4:
        text = str(current)
        parts.append(f"{type(current).__name__}: {text}" if text else type(current).__name__)
        current = current.__cause__ or current.__context__
    return ": ".join(parts)


def _fields(cls: type[Any], document: dict[str, Any]) -> dict[str, Any]:
    """The built-in document as keyword arguments of ``cls`` (``_id`` -> ``id``; leases and
    unknown keys dropped: a lease held in the old store means nothing in the new one)."""
    document = dict(document)
    document["id"] = document.pop("_id")
    unmarshal_timestamps(document)
    names = {field.name for field in attrs.fields(cls)} - {"acquired_by", "acquired_until",
                                                            "running_jobs"}
    return {key: value for key, value in document.items() if key in names}


def to_task(document: dict[str, Any], serializer: Serializer) -> Task:
    return Task.unmarshal(serializer, _fields(Task, document))


def to_schedule(document: dict[str, Any], serializer: Serializer) -> Schedule:
    return Schedule.unmarshal(serializer, _fields(Schedule, document))


def to_job(document: dict[str, Any], serializer: Serializer) -> Job:
    return Job.unmarshal(serializer, _fields(Job, document))


async def _batches(cursor: Any, size: int) -> AsyncIterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    async for document in cursor:
        batch.append(document)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def migrate_from_builtin(
    client: Any,
    *,
    source_database: str = "apscheduler",
    database: str = "apscheduler",
    prefix: str = "apsched_",
    apply: bool = False,
    source_serializer: Serializer | None = None,
    serializer: Serializer | None = None,
    batch_size: int = BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> MigrationReport:
    """Copy tasks, schedules and pending jobs from the built-in store's collections in
    ``source_database`` into ours in ``database`` (on the same server and client, any
    client the store accepts).

    :param source_serializer: what the built-in store was configured with (pickle)
    :param serializer: what the schedulers using the new store will use (pickle)
    :param progress: called with ``(documents done, documents in all)`` after each batch
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be 1 or more, not {batch_size}")
    source_serializer = source_serializer or PickleSerializer()
    report = MigrationReport(applied=apply)
    source = client.get_database(source_database, codec_options=CODEC_OPTIONS)
    target = client.get_database(database, codec_options=CODEC_OPTIONS)
    ledger = target.get_collection(prefix + LEDGER, codec_options=CODEC_OPTIONS)
    total = 0
    for _, source_name, _ in KINDS:
        total += await source.get_collection(source_name).count_documents({})

    try:
        await _copy_all(client, source, target, ledger, report, database=database,
                        prefix=prefix, apply=apply, source_serializer=source_serializer,
                        serializer=serializer, batch_size=batch_size, total=total,
                        progress=progress)
    except BaseExceptionGroup as group:  # raised through the store's task group
        leaves = _leaves(group)
        if len(leaves) == 1 and isinstance(leaves[0], Exception):
            raise leaves[0] from None
        raise
    return report


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        leaves += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return leaves


async def _copy_all(
    client: Any, source: Any, target: Any, ledger: Any, report: MigrationReport, *,
    database: str, prefix: str, apply: bool, source_serializer: Serializer,
    serializer: Serializer | None, batch_size: int, total: int,
    progress: Callable[[int, int], None] | None,
) -> None:
    done = 0
    async with AsyncExitStack() as stack:
        store: MongoDBDataStore | None = None
        if apply:
            broker = LocalEventBroker()
            await broker.start(stack, logger)
            store = MongoDBDataStore(client, database=database, collection_prefix=prefix,
                                     serializer=serializer or PickleSerializer())
            await store.start(stack, broker, logger)

        for kind, source_name, target_name in KINDS:
            convert, write = _steps(kind, store)
            count = report.counts[kind]
            existing = target.get_collection(prefix + target_name)
            cursor = source.get_collection(source_name).find(
                {}, sort=[("_id", ASCENDING)], batch_size=batch_size)
            async for batch in _batches(cursor, batch_size):
                await _migrate_batch(kind, batch, convert, write, existing, ledger,
                                     source_serializer, count, report)
                done += len(batch)
                if progress:
                    progress(done, max(total, done))


async def _migrate_batch(
    kind: str, batch: list[dict[str, Any]],
    convert: Callable[[dict[str, Any], Serializer], Any], write: Callable[[Any], Any] | None,
    existing: Any, ledger: Any, source_serializer: Serializer, count: KindCount,
    report: MigrationReport,
) -> None:
    """Convert one batch, skip what the target or the ledger already has, write the rest
    (concurrently), then record in the ledger, in one write, what is now in the target."""
    count.found += len(batch)
    ids = [document.get("_id") for document in batch]
    present = await _ids_among(existing, ids)
    recorded = await _ids_among(ledger, [f"{kind}:{doc_id}" for doc_id in ids])

    to_write: list[tuple[Any, Any]] = []
    to_record: list[Any] = []
    for document in batch:
        doc_id = document.get("_id")
        if kind == "job" and document.get("acquired_by") is not None:
            count.skipped_acquired += 1
            continue
        try:
            obj = convert(document, source_serializer)
        except Exception as exc:
            count.failed += 1
            report.failures.append((kind, doc_id, describe_failure(exc)))
            continue
        if doc_id in present or f"{kind}:{doc_id}" in recorded:
            count.already_there += 1
            if doc_id in present and f"{kind}:{doc_id}" not in recorded:
                to_record.append(doc_id)  # written by an interrupted run: record it now
            continue
        to_write.append((doc_id, obj))

    if write is None:  # dry run
        count.copied += len(to_write)
        return
    stop: list[PyMongoError] = []
    limiter = anyio.Semaphore(CONCURRENT_WRITES)

    async def write_one(doc_id: Any, obj: Any) -> None:
        async with limiter:
            if stop:
                return
            try:
                await write(obj)
            except DuplicateKeyError:  # another migration run got there first
                count.already_there += 1
                to_record.append(doc_id)
            except PyMongoError as exc:
                stop.append(exc)
            except Exception as exc:  # e.g. unserializable with the new serializer
                count.failed += 1
                report.failures.append((kind, doc_id, describe_failure(exc)))
            else:
                count.copied += 1
                to_record.append(doc_id)

    async with anyio.create_task_group() as group:
        for doc_id, obj in to_write:
            group.start_soon(write_one, doc_id, obj)
    if to_record:
        try:
            await ledger.insert_many([{"_id": f"{kind}:{doc_id}", "kind": kind}
                                      for doc_id in to_record], ordered=False)
        except BulkWriteError as exc:  # a concurrent run recorded some first: fine
            if any(error.get("code") != 11000 for error in exc.details.get("writeErrors", [])):
                raise
    if stop:
        raise stop[0]


async def _ids_among(collection: Any, ids: list[Any]) -> set[Any]:
    """Which of ``ids`` ``collection`` has, in one query. Ids of one orderable kind (the
    built-in store's are strings and UUIDs) are asked for as an ``_id`` range, which a
    server serves from the ``_id`` index and the in-memory back end scans once (its
    ``$in`` costs a comparison per document and value); anything else as ``$in``."""
    if ids and (all(isinstance(i, str) for i in ids) or all(isinstance(i, UUID) for i in ids)):
        query: dict[str, Any] = {"_id": {"$gte": min(ids), "$lte": max(ids)}}
    else:
        query = {"_id": {"$in": ids}}
    found = await collection.find(query, projection={"_id": True}).to_list(None)
    wanted = set(ids)
    return {document["_id"] for document in found if document["_id"] in wanted}


def _steps(kind: str, store: MongoDBDataStore | None) -> tuple[
    Callable[[dict[str, Any], Serializer], Any], Callable[[Any], Any] | None
]:
    """How to convert a document of ``kind``, and how to write it (None in a dry run)."""
    if kind == "task":
        return to_task, store.add_task if store else None
    if kind == "schedule":
        async def add_schedule(schedule: Schedule) -> None:
            assert store is not None
            await store.add_schedule(schedule, ConflictPolicy.do_nothing)

        return to_schedule, add_schedule if store else None
    return to_job, store.add_job if store else None


# --- command line ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-builtin", action="store_true", required=True,
                        help="copy from APScheduler's built-in MongoDB data store")
    parser.add_argument("--uri", type=uri_argument,
                        help="MongoDB URI (default: an in-memory MongoDB, for a demo)")
    parser.add_argument("--source-database", type=database_argument, default="apscheduler",
                        help="database of the built-in store (default: apscheduler)")
    parser.add_argument("--database", type=database_argument, default="apscheduler",
                        help="database of apsched-mongo's store (default: apscheduler)")
    parser.add_argument("--prefix", default="apsched_",
                        help="our collection name prefix (default: apsched_)")
    parser.add_argument("--source-serializer", choices=SERIALIZERS, default="pickle",
                        help="serializer the built-in store was configured with "
                             "(default: pickle)")
    parser.add_argument("--serializer", choices=SERIALIZERS, default="pickle",
                        help="serializer your schedulers will give MongoDBDataStore "
                             "(default: pickle)")
    parser.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE,
                        help=f"documents read and written per batch (default: {BATCH_SIZE})")
    parser.add_argument("--apply", action="store_true",
                        help="write (without it, only report what would be copied)")
    add_verbose_argument(parser)


async def _run(args: argparse.Namespace) -> int:
    source_serializer = serializer_named(args.source_serializer)
    serializer = serializer_named(args.serializer)
    client = command_line_client(args.uri, "migrate")
    progress = Progress("documents")
    try:
        report = await migrate_from_builtin(
            client, source_database=args.source_database, database=args.database,
            prefix=args.prefix, apply=args.apply, source_serializer=source_serializer,
            serializer=serializer, batch_size=args.batch_size, progress=progress,
        )
    except (ServerUnreachableError, ServerSelectionTimeoutError) as exc:
        progress.finish()
        if not isinstance(exc, ServerUnreachableError):
            exc = unreachable(exc, client, args.uri)
        raise CommandLineError(describe_unreachable(exc, args.verbose)) from None
    except PyMongoError as exc:
        progress.finish()
        text = redact(str(exc), args.uri) if args.uri else str(exc)
        print(f"migration stopped: {text.splitlines()[0]}")
        if args.apply:
            print("run the same command again to resume: what was copied is recorded and will "
                  "not be copied twice")
        return 2
    finally:
        await client.close()
    progress.finish()
    print(report.render())
    return 1 if report.failures else 0


def run(args: argparse.Namespace) -> int:
    return anyio.run(_run, args)
