"""``python -m apsched_mongo migrate --from-builtin``: move off APScheduler's own MongoDB store.

APScheduler's built-in store keeps ``tasks``, ``schedules`` and ``jobs`` with datetimes as
float timestamps plus ``<field>_utcoffset`` minutes. We read those documents, turn them
back into APScheduler objects with APScheduler's own unmarshalling, and write them through
:class:`~apsched_mongo.MongoDBDataStore`'s public methods, so our document shapes stay
defined in one place (the store's codec).

* Dry run by default: nothing is written, not even indexes.
* Jobs already acquired by a running scheduler are left alone (they are running there).
* Idempotent: what exists in the target, or was copied by an earlier run (recorded in the
  ``<prefix>migrated_from_builtin`` ledger, so a job that has since run and been deleted
  is not copied and run again), is skipped.
* A document that cannot be converted is reported and the rest carry on.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import anyio
import attrs
from apscheduler import ConflictPolicy, Job, Schedule, Task
from apscheduler.abc import Serializer
from apscheduler.datastores.mongodb import unmarshal_timestamps
from apscheduler.eventbrokers.local import LocalEventBroker
from apscheduler.serializers.pickle import PickleSerializer
from pymongo import ASCENDING
from pymongo.errors import DuplicateKeyError, PyMongoError

from ._cli import command_line_client
from ._client import CODEC_OPTIONS, redact
from .datastore import MongoDBDataStore
from .errors import ServerUnreachableError

logger = logging.getLogger(__name__)

#: (kind, built-in collection, our collection without the prefix)
KINDS = (("task", "tasks", "tasks"), ("schedule", "schedules", "schedules"),
         ("job", "jobs", "jobs"))
LEDGER = "migrated_from_builtin"


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
        if not self.applied:
            lines.append("dry run: nothing was written (pass --apply to copy)")
        return "\n".join(lines)


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


async def migrate_from_builtin(
    client: Any,
    *,
    source_database: str = "apscheduler",
    database: str = "apscheduler",
    prefix: str = "apsched_",
    apply: bool = False,
    source_serializer: Serializer | None = None,
    serializer: Serializer | None = None,
) -> MigrationReport:
    """Copy tasks, schedules and pending jobs from the built-in store's collections in
    ``source_database`` into ours in ``database`` (on the same server/client)."""
    source_serializer = source_serializer or PickleSerializer()
    report = MigrationReport(applied=apply)
    source = client.get_database(source_database, codec_options=CODEC_OPTIONS)
    target = client.get_database(database, codec_options=CODEC_OPTIONS)
    ledger = target.get_collection(prefix + LEDGER, codec_options=CODEC_OPTIONS)

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
            cursor = source.get_collection(source_name).find({}, sort=[("_id", ASCENDING)])
            existing = target.get_collection(prefix + target_name)
            for document in await cursor.to_list(None):
                count.found += 1
                doc_id = document.get("_id")
                if kind == "job" and document.get("acquired_by") is not None:
                    count.skipped_acquired += 1
                    continue
                try:
                    obj = convert(document, source_serializer)
                except Exception as exc:
                    count.failed += 1
                    report.failures.append((kind, doc_id, f"{type(exc).__name__}: {exc}"))
                    continue
                mark = f"{kind}:{doc_id}"
                if (await existing.find_one({"_id": doc_id}, projection={"_id": True})
                        or await ledger.find_one({"_id": mark})):
                    count.already_there += 1
                    continue
                if write is not None:
                    try:
                        await write(obj)
                    except DuplicateKeyError:  # another migration run got there first
                        count.already_there += 1
                        continue
                    except PyMongoError:
                        raise
                    except Exception as exc:  # e.g. unserializable with the new serializer
                        count.failed += 1
                        report.failures.append((kind, doc_id, f"{type(exc).__name__}: {exc}"))
                        continue
                    await ledger.update_one({"_id": mark}, {"$set": {"kind": kind}},
                                            upsert=True)
                count.copied += 1
    return report


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-builtin", action="store_true", required=True,
                        help="copy from APScheduler's built-in MongoDB data store")
    parser.add_argument("--uri", help="MongoDB URI (default: an in-memory MongoDB, for a demo)")
    parser.add_argument("--source-database", default="apscheduler",
                        help="database of the built-in store (default: apscheduler)")
    parser.add_argument("--database", default="apscheduler",
                        help="database of apsched-mongo's store (default: apscheduler)")
    parser.add_argument("--prefix", default="apsched_", help="our collection name prefix")
    parser.add_argument("--apply", action="store_true",
                        help="write (without it, only report what would be copied)")


async def _run(args: argparse.Namespace) -> int:
    client = command_line_client(args.uri, "migrate")
    try:
        report = await migrate_from_builtin(
            client, source_database=args.source_database, database=args.database,
            prefix=args.prefix, apply=args.apply,
        )
    except (PyMongoError, ServerUnreachableError) as exc:
        text = redact(str(exc), args.uri) if args.uri else str(exc)
        print(f"migration stopped: {text}")
        return 2
    finally:
        await client.close()
    print(report.render())
    return 1 if report.failures else 0


def run(args: argparse.Namespace) -> int:
    try:
        return anyio.run(_run, args)
    except ValueError as exc:  # a malformed URI, already redacted by create_client
        print(f"migration stopped: {exc}")
        return 2
