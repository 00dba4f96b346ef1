"""Jobs: claims decided by the server (in the writes that add and release jobs where it can,
by findAndModify or a bulk of single-document updates otherwise), releases whose commit
point is the delete, and takeovers of abandoned jobs in a fixed number of round trips."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any
from uuid import UUID, uuid4

import anyio
from apscheduler import (
    ConflictingIdError,
    DeserializationError,
    Job,
    JobAcquired,
    JobAdded,
    JobOutcome,
    JobReleased,
    JobResult,
)
from pymongo import DeleteOne, ReturnDocument, UpdateOne
from pymongo.errors import BulkWriteError, DuplicateKeyError

from . import _codec
from ._queue_view import UNKNOWN
from ._store_base import (
    JOB_ORDER,
    TAKEOVER_WINDOW,
    StoreBase,
    _duplicate_of,
    _raise_unless_duplicates,
)

#: How long the marker of an abandoned job outlives it (the owner's retry consults it)
MARKER_LIFETIME = timedelta(hours=1)

#: The head of the queue is read with this many jobs beyond what the caller can take, so
#: that a short read proves the picture complete
READ_MARGIN = 50


def _release_marker_id(job_id: UUID) -> str:
    return f"released:{job_id}"


def _fire_marker_id(schedule_id: str, fire_time: datetime) -> str:
    """The marker that a schedule's fire time has had its job (see :meth:`add_job`)."""
    return f"fired:{schedule_id}:{fire_time.astimezone(UTC).isoformat(timespec='milliseconds')}"


def _fire_of(document: dict[str, Any]) -> tuple[str, datetime] | None:
    schedule_id, fire_time = document.get("schedule_id"), document.get("scheduled_fire_time")
    return (schedule_id, fire_time) if schedule_id and fire_time else None


class JobStore(StoreBase):
    """The job methods of :class:`~apsched_mongo.MongoDBDataStore`."""

    _acquiring: anyio.Lock
    _leases: dict[UUID, str]
    _preclaimed: dict[UUID, dict[str, Any]]
    _worker: tuple[str, timedelta] | None
    _spare: int

    def _grant_task_lookups(self, jobs: list[Job]) -> None:
        """Let these claims answer APScheduler's task lookups: the store's task part
        (:class:`~apsched_mongo.MongoDBDataStore`) implements it."""
        raise NotImplementedError

    async def _fired_already(self, job: Job) -> bool:
        """Whether a schedule this store took over from a holder that never released it
        has had its job for this fire time already (one that ran and is gone: a job still
        there is caught by the unique index ``apsched_fire``)."""
        schedule_id, fire_time = job.schedule_id, job.scheduled_fire_time
        if schedule_id not in self._recovering or schedule_id is None or fire_time is None:
            return False
        marker_id = _fire_marker_id(schedule_id, fire_time)
        marker = await self._run("add_job", lambda: self._results.find_one(
            {"_id": marker_id}, projection={"_id": True}))
        return marker is not None

    async def _mark_fires(self, documents: Iterable[dict[str, Any]]) -> None:
        """Before schedule jobs are deleted, leave a marker of their fire times (kept an
        hour), so that a node taking over a schedule its holder never released does not
        fire those times again once the jobs are gone."""
        if fires := [fire for document in documents if (fire := _fire_of(document))]:
            expires_at = await self._server_now() + MARKER_LIFETIME
            await self._store_results([], [{"_id": _fire_marker_id(*fire), "marker": True,
                                             "expires_at": expires_at} for fire in fires])

    async def add_job(self, job: Job) -> None:
        """Insert the job. When this node's scheduler has room and no other job waits, the
        insert also claims the job for it (one write instead of two); the scheduler gets
        it from its next :meth:`acquire_jobs`, woken by the ``JobAdded`` event."""
        document = _codec.encode_job(job, self.serializer)
        if await self._fired_already(job):
            self._logger.warning(
                "Not adding a second job for schedule %r at %s: it ran already",
                job.schedule_id, job.scheduled_fire_time,
            )
            return
        claim = await self._claim_on_insert(job)
        seen = partial(self._view.has_seen, job.id)
        try:
            try:
                inserted = await self._insert_once("add_job", self._jobs, {**document, **claim},
                                                   seen=seen)
            except DuplicateKeyError as exc:
                if not _duplicate_of(exc, "slot"):
                    raise
                # the slot: a job we had not heard of runs the task
                self._view.slot_taken(job.task_id)
                claim = {}
                inserted = await self._insert_once("add_job", self._jobs, document, seen=seen)
        except DuplicateKeyError as exc:
            if not _duplicate_of(exc, "scheduled_fire_time"):
                raise
            # This fire time's job exists: added by a node that fired the schedule and
            # stopped before recording it. Adding it again would run the fire time twice
            self._logger.warning(
                "Not adding a second job for schedule %r at %s: one exists already",
                job.schedule_id, job.scheduled_fire_time,
            )
            return
        if not inserted:
            raise ConflictingIdError(str(job.id))  # type: ignore[no-untyped-call]
        if claim:
            self._hold_claimed({**document, **claim}, claim["acquired_by"])
        else:
            self._view.job_added(job.id, job.task_id, document["queue_order"], local=True,
                                 document=document)
        await self._publish(
            JobAdded(job_id=job.id, task_id=job.task_id, schedule_id=job.schedule_id)
        )

    async def _claim_on_insert(self, job: Job) -> dict[str, Any]:
        """The claim fields for a job this node adds, if it may claim it at once: its
        scheduler has room, no other node's job waits (so none is overtaken), and the task
        has no limit, or a limit of one that nobody is known to hold."""
        if self._worker is None or not self._view.overtakes_nobody(self._spare):
            return {}
        limit = self._view.limits.get(job.task_id, UNKNOWN)
        if limit not in (None, 1) or (limit == 1 and self._view.running.get(job.task_id)):
            return {}
        scheduler_id, lease_duration = self._worker
        claim: dict[str, Any] = {
            "acquired_by": scheduler_id,
            "acquired_until": await self._server_now() + lease_duration,
            "lease": uuid4().hex,
        }
        if limit == 1:
            claim["slot"] = 0
        return claim

    async def _return_preclaimed(self) -> None:
        """At shutdown, unclaim the jobs claimed while being added or after a release that
        the scheduler never took, so another node runs them now rather than as abandoned
        after their lease. They are announced again (``JobAdded``): the other nodes heard
        of them when they were claimed, and must hear that they can be claimed now."""
        if not self._preclaimed:
            return
        documents = list(self._preclaimed.values())
        leases = [self._leases.pop(document["_id"]) for document in documents]
        self._preclaimed.clear()
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self._run("returning claimed jobs", lambda: self._jobs.update_many(
                {"_id": {"$in": [document["_id"] for document in documents]},
                 "lease": {"$in": leases}},
                {"$unset": {"acquired_by": "", "acquired_until": "", "lease": "", "slot": ""}},
            ))
            await self._publish_all(
                JobAdded(job_id=document["_id"], task_id=document["task_id"],
                         schedule_id=document.get("schedule_id"))
                for document in documents
            )

    async def get_jobs(self, ids: Iterable[UUID] | None = None) -> list[Job]:
        query = {} if ids is None else {"_id": {"$in": list(ids)}}
        documents = await self._find("get_jobs", self._jobs, query, sort=JOB_ORDER)
        return self._decode_each(documents, _codec.decode_job)

    async def acquire_jobs(
        self, scheduler_id: str, lease_duration: timedelta, limit: int | None = None
    ) -> list[Job]:
        """Claim up to ``limit`` jobs. When the queue view says nothing can be claimed, no
        round trip is made; when the only claimable jobs were announced by another node, it
        first gets :attr:`claim_grace` to claim them (see :mod:`._queue_view`)."""
        self._view.lease_seconds = lease_duration.total_seconds()
        room = limit if limit is not None else 10**9
        self._worker, self._spare = (scheduler_id, lease_duration), room
        async with self._acquiring:
            acquired = await self._acquire(scheduler_id, lease_duration, limit, room)
        self._spare = room - len(acquired)
        return acquired

    async def _acquire(self, scheduler_id: str, lease_duration: timedelta, limit: int | None,
                       room: int) -> list[Job]:
        handed: list[dict[str, Any]] = []
        while True:
            # Jobs this store claimed while adding or releasing others come first
            for job_id, document in list(self._preclaimed.items()):
                if len(handed) < room and document["acquired_by"] == scheduler_id:
                    handed.append(self._preclaimed.pop(job_id))
            if len(handed) == room:
                return await self._start_claimed(scheduler_id, handed)
            plan = self._view.plan(scheduler_id, room - len(handed))
            if plan.action == "skip" or (plan.action == "wait" and handed):
                return await self._start_claimed(scheduler_id, handed)
            if plan.action == "wait":
                with anyio.move_on_after(plan.delay):
                    await self._view.changed.wait()
                continue
            server_now = await self._server_now()
            lease = uuid4().hex
            claim = {"acquired_by": scheduler_id,
                     "acquired_until": server_now + lease_duration, "lease": lease}
            # A claim that reached the server must be known here, even if the scheduler
            # stops meanwhile (it cancels this call): then the jobs are kept to be
            # unclaimed and announced again when the store stops, not left to expire
            with anyio.CancelScope(shield=True):
                if plan.action == "claim":
                    claimed = await self._claim_by_id(plan.jobs, claim)
                else:
                    claimed = await self._read_and_claim(
                        None if limit is None else limit - len(handed), claim)
            try:
                await anyio.lowlevel.checkpoint_if_cancelled()
            except anyio.get_cancelled_exc_class():
                for document in [*handed, *(claimed or ())]:
                    self._leases[document["_id"]] = document["lease"]
                    self._preclaimed[document["_id"]] = document
                raise
            if claimed is None:
                continue  # the picture was stale: plan again
            return await self._start_claimed(scheduler_id, handed + claimed)

    async def _claim_by_id(self, jobs: Sequence[tuple[UUID, str, int | None]],
                           claim: dict[str, Any]) -> list[dict[str, Any]] | None:
        """Claim jobs the queue view knows, without reading the queue first: one
        findAndModify for one job (a retryable write), otherwise one bulk of per-document
        updates and one read of what the lease token won. None if nothing was won."""
        requests = [(job_id, task_id, claim if slot is None else {**claim, "slot": slot})
                    for job_id, task_id, slot in jobs]
        if len(requests) == 1:
            [(job_id, task_id, fields)] = requests
            document = await self._claim_one(job_id, task_id, fields)
            return [document] if document else None
        known = {job_id: document for job_id, _, _ in requests
                 if (document := self._view.document_of(job_id)) is not None}
        won = await self._claim_many(requests, claim["lease"], known)
        won_ids = {document["_id"] for document in won}
        for job_id, _, _ in requests:
            if job_id not in won_ids:
                self._view.claim_lost(job_id)
        return won or None

    async def _claim_one(self, job_id: UUID, task_id: str,
                         fields: dict[str, Any]) -> dict[str, Any] | None:
        async def claim(retrying: bool) -> dict[str, Any] | None:
            try:
                document: dict[str, Any] | None = await self._jobs.find_one_and_update(
                    {"_id": job_id, "task_id": task_id, "acquired_by": None}, {"$set": fields},
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:
                return None  # the task's slot is taken by a job we did not hear about
            if document is None and retrying:  # did the lost attempt win it?
                document = await self._jobs.find_one({"_id": job_id, "lease": fields["lease"]})
            return document

        document = await self._run_with_retry_flag("acquire_jobs", claim)
        if document is None:
            self._view.claim_lost(job_id)
            if "slot" in fields:
                self._view.slot_taken(task_id)
        return document

    async def _claim_many(self, requests: Sequence[tuple[UUID, str, dict[str, Any]]],
                          lease: str, known: dict[UUID, dict[str, Any]]) -> list[dict[str, Any]]:
        """Per-document conditional claims in one bulk write (no ``UpdateMany``, so the
        driver can retry it with a ``txnNumber``). When every claim won at the first
        attempt and every document is ``known`` (jobs are immutable but for their lease),
        that is what we own; otherwise the documents the lease token won are read back."""
        updates = [UpdateOne({"_id": job_id, "task_id": task_id, "acquired_by": None},
                             {"$set": fields})
                   for job_id, task_id, fields in requests]

        async def claim_all(retrying: bool) -> int:
            try:
                result = await self._jobs.bulk_write(updates, ordered=False)
            except BulkWriteError as exc:
                _raise_unless_duplicates(exc)  # lost races for a slot are expected
                return -1
            return -1 if retrying else int(result.modified_count)

        won = await self._run_with_retry_flag("acquire_jobs", claim_all)
        if won == len(requests) and all(job_id in known for job_id, _, _ in requests):
            return [{**known[job_id], **fields} for job_id, _, fields in requests]
        return await self._find("acquire_jobs", self._jobs, {"lease": lease}, sort=JOB_ORDER)

    async def _read_and_claim(self, limit: int | None,
                              claim: dict[str, Any]) -> list[dict[str, Any]]:
        """Read the queue head with each task and its running jobs (one aggregation), pick
        what can start, claim it, and refresh the queue view from what was read."""
        size = (limit or 0) + READ_MARGIN
        self._view.begin_read()
        try:
            groups = await self._queue_head({"acquired_by": None}, size)
            candidates, free_slots, saturated, complete = self._startable(groups, size)
            partial: set[str] = set()
            if limit and len(candidates) < limit and saturated and not complete:
                # Jobs behind tasks at their limit: look past them (index bounds skip the
                # saturated tasks' backlog)
                more = await self._queue_head(
                    {"acquired_by": None, "task_id": {"$nin": sorted(saturated)}}, size)
                extra, extra_slots, _, complete = self._startable(more, size)
                known = {doc["_id"] for doc in candidates}
                candidates += [doc for doc in extra if doc["_id"] not in known]
                for task_id, slots in extra_slots.items():
                    free_slots.setdefault(task_id, slots)
                groups += more
                partial = saturated  # only their oldest jobs were read
        except BaseException:
            self._view.abort_read()
            raise
        candidates.sort(key=lambda doc: (doc["queue_order"], doc["_id"]))
        chosen: list[tuple[UUID, str, dict[str, Any]]] = []
        for candidate in candidates[:limit] if limit else candidates:
            free = free_slots.get(candidate["task_id"])
            if free is None:
                chosen.append((candidate["_id"], candidate["task_id"], claim))
            elif free:
                chosen.append((candidate["_id"], candidate["task_id"],
                               {**claim, "slot": free.pop(0)}))
        claimed: list[dict[str, Any]] = []
        if len(chosen) == 1:
            [(job_id, task_id, fields)] = chosen
            if won := await self._claim_one(job_id, task_id, fields):
                claimed = [won]
        elif chosen:
            claimed = await self._claim_many(chosen, claim["lease"],
                                             {doc["_id"]: doc for doc in candidates})
        # Jobs we tried and lost were claimed by others meanwhile: not waiting either
        gone = {job_id for job_id, _, _ in chosen}
        self._view.end_read(
            (doc for group in groups for doc in group["jobs"] if doc["_id"] not in gone),
            complete=complete, partial=partial,
            running={group["_id"]: {job["_id"] for job in group["running"]} for group in groups},
        )
        for group in groups:
            if group["task"]:
                self._learn_task(group["task"][0])
        return claimed

    async def _queue_head(self, match: dict[str, Any], size: int) -> list[dict[str, Any]]:
        """The first ``size`` unclaimed jobs matching ``match`` in queue order, grouped by
        task, each group with its task document (``task``, a list of at most one), its
        ``max_running_jobs`` and its running jobs (``running``): one round trip."""
        return await self._aggregate("acquire_jobs", self._jobs, [
            {"$match": match},
            {"$sort": dict(JOB_ORDER)},
            {"$limit": size},
            {"$group": {"_id": "$task_id", "jobs": {"$push": "$$ROOT"}}},
            {"$lookup": {"from": self._tasks.name, "localField": "_id",
                         "foreignField": "_id", "as": "task"}},
            {"$set": {"max_running_jobs": {"$arrayElemAt": ["$task.max_running_jobs", 0]}}},
            self._running_lookup(),
        ])

    def _startable(self, groups: list[dict[str, Any]], size: int) -> tuple[
        list[dict[str, Any]], dict[str, list[int]], set[str], bool
    ]:
        """(jobs that can start, free slot numbers of limited tasks, tasks at their limit,
        whether the read saw the whole queue)."""
        candidates: list[dict[str, Any]] = []
        free_slots: dict[str, list[int]] = {}
        saturated: set[str] = set()
        read = 0
        for group in groups:
            jobs = sorted(group["jobs"], key=lambda doc: (doc["queue_order"], doc["_id"]))
            read += len(jobs)
            limit = group.get("max_running_jobs")
            self._view.learn_limit(group["_id"], limit)
            if limit is None:
                candidates += jobs
                continue
            used = {job.get("slot") for job in group["running"]}
            free = [slot for slot in range(limit) if slot not in used]
            free_slots[group["_id"]] = free
            candidates += jobs[:len(free)]
            if len(jobs) > len(free):
                saturated.add(group["_id"])
        return candidates, free_slots, saturated, read < size

    async def _start_claimed(self, scheduler_id: str, claimed: list[dict[str, Any]]) -> list[Job]:
        """Decode claimed jobs; release at once those that cannot or must not start."""
        now = self.local_clock()
        acquired: list[Job] = []
        discarded: list[tuple[dict[str, Any], JobResult, Job | None]] = []
        for document in sorted(claimed, key=lambda doc: (doc["queue_order"], doc["_id"])):
            self._leases[document["_id"]] = document["lease"]
            self._view.job_acquired(document["_id"], document["task_id"], scheduler_id,
                                    ours=True)
            try:
                job = _codec.decode_job(document, self.serializer)
            except DeserializationError as exc:
                self._logger.warning("Releasing job %r: %s", document["_id"], exc)
                discarded.append((document, _codec.result_for_document(
                    document, JobOutcome.deserialization_failed, now, exc), None))
                continue
            if job.start_deadline is not None and job.start_deadline < now:
                discarded.append((document, JobResult.from_job(
                    job, JobOutcome.missed_start_deadline, finished_at=now), job))
                continue
            acquired.append(job)

        self._grant_task_lookups(acquired)
        await self._publish_all(JobAcquired.from_job(job, scheduler_id=scheduler_id)
                                for job in acquired)
        if discarded:
            await self._mark_fires(document for document, _, _ in discarded)
        for document, result, decoded in discarded:
            if await self._release_owned(document["_id"], document["task_id"], scheduler_id,
                                         "acquire_jobs"):
                await self._finish_release(document, result, scheduler_id, decoded)
        return acquired

    @staticmethod
    def _released_event(document: dict[str, Any], result: JobResult, scheduler_id: str,
                        job: Job | None) -> JobReleased:
        return JobReleased.from_result(
            result, scheduler_id, document["task_id"], document.get("schedule_id"),
            job.scheduled_fire_time if job else document.get("scheduled_fire_time"),
        )

    async def _store_results(self, results: Sequence[JobResult],
                             markers: Sequence[dict[str, Any]] = ()) -> None:
        """Insert results (and release markers). A duplicate key means an earlier attempt
        of ours stored it (only a release's winner stores); a write-concern error is never
        ignored: it is retried if temporary, raised otherwise."""
        documents = [_codec.encode_result(result, self.serializer) for result in results
                     if result.expires_at > result.finished_at] + list(markers)
        if not documents:
            return

        async def insert() -> None:
            try:
                await self._results.insert_many(documents, ordered=False)
            except BulkWriteError as exc:
                _raise_unless_duplicates(exc)

        await self._run("store job results", insert)

    def _owned(self, job_id: UUID, task_id: str, scheduler_id: str) -> dict[str, Any]:
        """The filter matching a job only while this node still holds it (with the task id:
        the shard key, where jobs are sharded)."""
        lease = self._leases.pop(job_id, None)
        if lease is not None:
            return {"_id": job_id, "task_id": task_id, "lease": lease}
        # Claimed through another store instance: whoever holds it in our name
        return {"_id": job_id, "task_id": task_id,
                "acquired_by": {"$in": [scheduler_id, None]}, "abandoned": {"$exists": False}}

    async def _deleted_by_us(self, job_id: UUID) -> bool:
        """After a lost reply, whether our delete of a job we held landed. Our delete
        filters on our lease, so a job still there was taken over (its lease replaced) by
        a node releasing it as abandoned. A job gone was deleted by us, or by such a node,
        which writes the job's marker before its delete: no marker, so it was us."""
        if await self._jobs.find_one({"_id": job_id}, projection={"_id": True}):
            return False
        marker = await self._results.find_one({"_id": _release_marker_id(job_id)},
                                              projection={"_id": True})
        return marker is None

    async def _release_owned(self, job_id: UUID, task_id: str, scheduler_id: str,
                             what: str) -> bool:
        """Delete a job this node holds; True if this call released it. The delete is the
        commit point; the server's answer (or, after a lost reply, the absence of a
        takeover marker) decides, never the attempt count."""
        owned = self._owned(job_id, task_id, scheduler_id)

        async def delete(retrying: bool) -> bool:
            outcome = await self._jobs.delete_one(owned)
            if outcome.deleted_count or not retrying:
                return bool(outcome.deleted_count)
            return await self._deleted_by_us(job_id)

        return await self._run_with_retry_flag(what, delete)

    async def _release_and_claim(self, scheduler_id: str, job: Job, follower: UUID,
                                 follower_task: str, fields: dict[str, Any]
                                 ) -> tuple[bool, bool]:
        """Release ``job`` and claim ``follower`` (a job this node added, whose document it
        knows) in one ordered bulk write: the delete frees the slot the claim may take.
        Returns (released, claimed), each decided like its single-write twin."""
        owned = self._owned(job.id, job.task_id, scheduler_id)
        requests = [DeleteOne(owned),
                    UpdateOne({"_id": follower, "task_id": follower_task, "acquired_by": None},
                              {"$set": fields})]

        async def write(retrying: bool) -> tuple[bool, bool]:
            try:
                result = await self._jobs.bulk_write(requests, ordered=True)
                deleted, claimed = result.deleted_count, result.modified_count
            except BulkWriteError as exc:  # the claim met a taken slot
                _raise_unless_duplicates(exc)
                deleted, claimed = exc.details.get("nRemoved", 0), 0
            if retrying:
                deleted = deleted or await self._deleted_by_us(job.id)
                claimed = claimed or await self._jobs.find_one(
                    {"_id": follower, "lease": fields["lease"]}, projection={"_id": True}
                ) is not None
            return bool(deleted), bool(claimed)

        return await self._run_with_retry_flag("release_job", write)

    def _released_here(self, job_id: UUID, task_id: str, scheduler_id: str | None) -> None:
        self._task_grants.pop(task_id, None)
        self._view.job_released(job_id, task_id, scheduler_id, local=True)

    async def _finish_release(self, document: dict[str, Any], result: JobResult,
                              scheduler_id: str, job: Job | None) -> None:
        await self._store_results([result])
        self._released_here(document["_id"], document["task_id"], scheduler_id)
        await self._publish(self._released_event(document, result, scheduler_id, job))

    async def release_job(self, scheduler_id: str, job: Job, result: JobResult) -> None:
        """Delete the job (the commit point), store its result, publish ``JobReleased``.
        When the next job in line is one this node knows and its scheduler has room, the
        same write also claims it, so the scheduler's next :meth:`acquire_jobs` hands it
        over without a round trip.

        A release is finished even when the caller is cancelled meanwhile (APScheduler
        cancels running jobs when it stops): after the commit point the event must go out.
        The retry settings bound how long that can take."""
        with anyio.CancelScope(shield=True):
            await self._release_job(scheduler_id, job, result)

    async def _release_job(self, scheduler_id: str, job: Job, result: JobResult) -> None:
        self._spare += 1  # the scheduler has room for one more
        await self._mark_fires([{"schedule_id": job.schedule_id,
                                 "scheduled_fire_time": job.scheduled_fire_time}])
        follower = self._follower(scheduler_id, job)
        if follower is None:
            released = await self._release_owned(job.id, job.task_id, scheduler_id,
                                                 "release_job")
        else:
            document, fields = follower
            released, claimed = await self._release_and_claim(
                scheduler_id, job, document["_id"], document["task_id"], fields)
            if claimed:
                self._hold_claimed({**document, **fields}, scheduler_id)
            else:
                self._view.claim_lost(document["_id"])
        if not released:
            self._released_here(job.id, job.task_id, None)
            self._logger.warning(
                "Job %s was no longer held by scheduler %r (its lease expired and it was "
                "released elsewhere); result not recorded", job.id, scheduler_id,
            )
            return
        await self._store_results([result])
        self._released_here(job.id, job.task_id, scheduler_id)
        await self._publish(JobReleased.from_result(
            result, scheduler_id, job.task_id, job.schedule_id, job.scheduled_fire_time
        ))

    def _follower(self, scheduler_id: str,
                  job: Job) -> tuple[dict[str, Any], dict[str, Any]] | None:
        """The job to claim along with releasing ``job``, and its claim fields, if any."""
        if self._worker is None or self._worker[0] != scheduler_id or self._spare < 1:
            return None
        following = self._view.next_local(job.id, job.task_id)
        if following is None:
            return None
        document, slot = following
        fields: dict[str, Any] = {
            "acquired_by": scheduler_id,
            "acquired_until": self._clock.current() + self._worker[1],
            "lease": uuid4().hex,
        }
        if slot is not None:
            fields["slot"] = slot
        return document, fields

    def _hold_claimed(self, document: dict[str, Any], scheduler_id: str) -> None:
        """A job claimed outside :meth:`acquire_jobs`: keep it for the scheduler's next
        call (woken by the event that follows)."""
        self._leases[document["_id"]] = document["lease"]
        self._preclaimed[document["_id"]] = document
        self._spare -= 1
        self._view.job_acquired(document["_id"], document["task_id"], scheduler_id, ours=True)

    async def discard_job(self, job_id: UUID, *, by: str = "operator") -> bool:
        """Delete a job no scheduler has claimed, as an operator's action (the dashboard's
        "drop"). Publishes ``JobReleased`` with outcome ``cancelled`` (scheduler id
        ``by``), so anyone waiting for the job's result learns of it. Returns False if the
        job is gone or a scheduler holds it."""
        found = await self._run("discard_job", lambda: self._jobs.find_one(
            {"_id": job_id}, projection={"task_id": True}))  # the shard key, if sharded
        if found is None:
            return False

        async def take(retrying: bool) -> dict[str, Any] | None:
            document: dict[str, Any] | None = await self._jobs.find_one_and_update(
                {"_id": job_id, "task_id": found["task_id"], "acquired_by": None},
                {"$set": {"acquired_by": by, "lease": lease, "abandoned": True,
                          "acquired_until": await self._server_now() + TAKEOVER_WINDOW}},
                return_document=ReturnDocument.AFTER,
            )
            if document is None and retrying:
                document = await self._jobs.find_one({"_id": job_id, "lease": lease})
            return document

        lease = uuid4().hex
        document = await self._run_with_retry_flag("discard_job", take)
        if document is None:
            return False
        released = await self._release_taken_over([document], lease, JobOutcome.cancelled,
                                                  "discard_job")
        return bool(released)

    async def get_job_result(self, job_id: UUID) -> JobResult | None:
        # Read, then delete: unlike find_one_and_delete, each step can be retried after a
        # lost reply without losing the result
        document = await self._run("get_job_result", lambda: self._results.find_one(
            {"_id": job_id}
        ))
        if not document:
            return None
        await self._run("get_job_result", lambda: self._results.delete_one({"_id": job_id}))
        if document["expires_at"] <= await self._server_now():
            return None
        return _codec.decode_result(document, self.serializer)

    async def extend_acquired_job_leases(
        self, scheduler_id: str, job_ids: set[UUID], duration: timedelta
    ) -> None:
        until = await self._server_now() + duration
        await self._run("extend_acquired_job_leases", lambda: self._jobs.update_many(
            {"_id": {"$in": list(job_ids)}, "acquired_by": scheduler_id,
             "abandoned": {"$exists": False}},
            {"$set": {"acquired_until": until}},
        ))

    async def _release_abandoned(self, selector: dict[str, Any], what: str) -> None:
        """Release the leased jobs matching ``selector`` as abandoned, in O(1) round trips:
        take them over with a token of this call (the server lets exactly one node win each
        job), then release what carries the token."""
        lease = uuid4().hex
        now = await self._server_now()
        await self._run(what, lambda: self._jobs.update_many(
            selector, {"$set": {"lease": lease, "abandoned": True,
                                "acquired_until": now + TAKEOVER_WINDOW}}
        ))
        taken = await self._find(what, self._jobs, {"lease": lease}, sort=JOB_ORDER)
        if taken:
            await self._release_taken_over(taken, lease, JobOutcome.abandoned, what)

    async def _release_taken_over(self, documents: list[dict[str, Any]], lease: str,
                                  outcome: JobOutcome, what: str) -> int:
        """Finish releasing jobs this call took over (their lease is ``lease``): results and
        markers first (the markers tell an owner retrying its own release that it lost),
        then the delete, then one ``JobReleased`` each. Returns how many were released.
        Shielded from cancellation, like :meth:`release_job`."""
        with anyio.CancelScope(shield=True):
            released = await self._finish_takeover(documents, lease, outcome, what)
        return released

    async def _finish_takeover(self, documents: list[dict[str, Any]], lease: str,
                               outcome: JobOutcome, what: str) -> int:
        now = self.local_clock()
        released: list[tuple[dict[str, Any], JobResult, Job | None]] = []
        for document in documents:
            decoded: Job | None
            try:
                decoded = _codec.decode_job(document, self.serializer)
            except DeserializationError:
                decoded = None
            result = (JobResult.from_job(decoded, outcome, finished_at=now) if decoded
                      else _codec.result_for_document(document, outcome, now))
            released.append((document, result, decoded))
        server_now = await self._server_now()
        markers = [{"_id": _release_marker_id(document["_id"]), "marker": True,
                    "expires_at": server_now + MARKER_LIFETIME} for document in documents]
        markers += [{"_id": _fire_marker_id(*fire), "marker": True,
                     "expires_at": server_now + MARKER_LIFETIME}
                    for document in documents if (fire := _fire_of(document))]
        await self._store_results([result for _, result, _ in released], markers)
        deleted = await self._run(what, lambda: self._jobs.delete_many({"lease": lease}))
        if deleted.deleted_count < len(documents):
            self._logger.warning(
                "%d of %d jobs taken over were taken over again before being released (this "
                "node stalled for over %s)", len(documents) - deleted.deleted_count,
                len(documents), TAKEOVER_WINDOW,
            )
        for document, result, job in released:
            holder = document.get("acquired_by") or "?"
            self._released_here(document["_id"], document["task_id"], holder)
            await self._publish(self._released_event(document, result, holder, job))
        return len(released)

    async def reap_abandoned_jobs(self, scheduler_id: str) -> None:
        await self._release_abandoned(
            {"acquired_by": scheduler_id, "abandoned": {"$exists": False}},
            "reap_abandoned_jobs",
        )

