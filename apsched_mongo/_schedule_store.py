"""Schedules: claims conditional on the document as read, releases that publish only what
they released, removals in three round trips with one event per schedule removed."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

from apscheduler import (
    ConflictingIdError,
    ConflictPolicy,
    DeserializationError,
    Schedule,
    ScheduleAdded,
    ScheduleRemoved,
    ScheduleResult,
    ScheduleUpdated,
    SerializationError,
)
from pymongo import ASCENDING, UpdateOne

from . import _codec
from ._store_base import StoreBase


class ScheduleStore(StoreBase):
    """The schedule methods of :class:`~apsched_mongo.MongoDBDataStore`."""

    _LIVE_SCHEDULE = {"removal": {"$exists": False}}

    def _decode_schedules(self, documents: Iterable[dict[str, Any]]) -> list[Schedule]:
        return self._decode_each(documents, _codec.decode_schedule)

    async def get_schedules(self, ids: set[str] | None = None) -> list[Schedule]:
        query: dict[str, Any] = dict(self._LIVE_SCHEDULE)
        if ids is not None:
            query["_id"] = {"$in": list(ids)}
        documents = await self._find("get_schedules", self._schedules, query,
                                     sort=[("_id", ASCENDING)])
        return self._decode_schedules(documents)

    async def add_schedule(self, schedule: Schedule, conflict_policy: ConflictPolicy) -> None:
        document = _codec.encode_schedule(schedule, self.serializer)
        event: ScheduleAdded | ScheduleUpdated
        if conflict_policy is ConflictPolicy.replace:
            # An update, not a replacement: $setOnInsert leaves the token of whoever first
            # inserted the schedule, so even a retry after a lost reply tells an insert from
            # a replacement. Leases and removal marks are dropped, as a replacement would.
            token = uuid4().hex
            fields = {key: value for key, value in document.items() if key != "_id"}
            previous = await self._run("add_schedule", lambda: self._schedules.find_one_and_update(
                {"_id": schedule.id},
                {"$set": fields, "$setOnInsert": {"insert_token": token},
                 "$unset": {"acquired_by": "", "acquired_until": "", "lease": "",
                            "removal": "", "removal_at": ""}},
                upsert=True, projection={"insert_token": True},
            ))
            ours = previous is None or previous.get("insert_token") == token
            event_class = ScheduleAdded if ours else ScheduleUpdated
            event = event_class(schedule_id=schedule.id, task_id=schedule.task_id,
                                next_fire_time=schedule.next_fire_time)
        else:
            if not await self._insert_once("add_schedule", self._schedules, document):
                if conflict_policy is ConflictPolicy.exception:
                    raise ConflictingIdError(schedule.id)  # type: ignore[no-untyped-call]
                return
            event = ScheduleAdded(schedule_id=schedule.id, task_id=schedule.task_id,
                                  next_fire_time=schedule.next_fire_time)
        await self._publish(event)

    async def remove_schedules(self, ids: Iterable[str]) -> None:
        ids = list(dict.fromkeys(ids))
        if ids:
            await self._remove_schedules({"_id": {"$in": ids}}, order=ids, finished=False)

    async def _remove_schedules(
        self, selector: dict[str, Any], *, order: list[str] | None, finished: bool,
        take_over: bool = False,
    ) -> None:
        """Remove the schedules matching ``selector`` in three round trips, whatever their
        number, publishing ``ScheduleRemoved`` once per schedule actually removed:

        1. mark them with a token of this call (a schedule already marked by another
           remover is left to it, unless ``take_over``: its remover crashed);
        2. read what carries the token: exactly the schedules this call removes;
        3. delete them.

        A marked schedule is invisible to every read and claim, so the removal takes
        effect at step 1; a retry of any step repeats it harmlessly.
        """
        token = uuid4().hex
        now = await self._server_now()
        mark = dict(selector) if take_over else {**selector, **self._LIVE_SCHEDULE}
        await self._run("remove_schedules", lambda: self._schedules.update_many(
            mark, {"$set": {"removal": token, "removal_at": now}}
        ))
        removed = await self._find("remove_schedules", self._schedules, {"removal": token},
                                   projection={"task_id": True})
        if not removed:
            return
        await self._run("remove_schedules", lambda: self._schedules.delete_many(
            {"removal": token}
        ))
        by_id = {document["_id"]: document for document in removed}
        ids = [i for i in order if i in by_id] if order else sorted(by_id)
        await self._publish_all(
            ScheduleRemoved(schedule_id=i, task_id=by_id[i]["task_id"], finished=finished)
            for i in ids
        )

    async def acquire_schedules(
        self, scheduler_id: str, lease_duration: timedelta, limit: int
    ) -> list[Schedule]:
        server_now = await self._server_now()
        claimable = {
            "next_fire_time": {"$ne": None, "$lte": _codec.bson_date(self.local_clock())},
            "paused": {"$ne": True},
            **self._LIVE_SCHEDULE,
            "$or": [
                {"acquired_until": None},
                {"acquired_until": {"$lt": server_now}},
                {"acquired_by": scheduler_id},
            ],
        }
        candidates = await self._find("acquire_schedules", self._schedules, claimable,
                                      sort=[("next_fire_time", ASCENDING)], limit=limit)
        if not candidates:
            return []
        # A schedule still leased when read was fired by a node that stopped or died before
        # recording it: its fire times may have jobs already (see add_job)
        self._recovering.update(doc["_id"] for doc in candidates
                                if doc.get("acquired_by") is not None)

        # Each claim also requires the document to be exactly as read, so when every claim
        # wins, what we read is what we own and needs no second look.
        lease = uuid4().hex
        claim = {"acquired_by": scheduler_id,
                 "acquired_until": server_now + lease_duration, "lease": lease}
        requests = [
            UpdateOne({"_id": doc["_id"], "state": doc.get("state"),
                       "progress": doc.get("progress"), **claimable}, {"$set": claim})
            for doc in candidates
        ]

        async def claim_all(retrying: bool) -> int:
            result = await self._schedules.bulk_write(requests, ordered=False)
            return -1 if retrying else int(result.modified_count)

        if await self._run_with_retry_flag("acquire_schedules", claim_all) == len(candidates):
            documents = [{**doc, **claim} for doc in candidates]
        else:
            documents = await self._find("acquire_schedules", self._schedules, {"lease": lease},
                                         sort=[("next_fire_time", ASCENDING)])
        return self._decode_schedules(documents)

    async def release_schedules(
        self, scheduler_id: str, results: Sequence[ScheduleResult]
    ) -> None:
        """Write each schedule's progress and end our lease, only where we still hold it;
        events are published for exactly the schedules released."""
        token = uuid4().hex
        requests: list[UpdateOne] = []
        events: dict[str, ScheduleUpdated | ScheduleRemoved] = {}
        for result in results:
            self._recovering.discard(result.schedule_id)
            owned = {"_id": result.schedule_id, "acquired_by": scheduler_id}
            try:
                progress = _codec.encode_schedule_progress(
                    result.trigger, result.last_fire_time, result.next_fire_time,
                    self.serializer,
                )
            except SerializationError:
                self._logger.exception(
                    "Cannot serialize the trigger of schedule %r: removing the schedule",
                    result.schedule_id,
                )
                await self._remove_schedules(owned, order=None, finished=True)
                continue
            requests.append(UpdateOne(owned, {"$set": {**progress, "lease": token},
                                              "$unset": _codec.SCHEDULE_LEASE_FIELDS}))
            events[result.schedule_id] = ScheduleUpdated(
                schedule_id=result.schedule_id, task_id=result.task_id,
                next_fire_time=result.next_fire_time)
        if not requests:
            return

        async def release(retrying: bool) -> int:
            result = await self._schedules.bulk_write(requests, ordered=False)
            return -1 if retrying else int(result.matched_count)

        if await self._run_with_retry_flag("release_schedules", release) != len(requests):
            # Some were removed or taken over meanwhile: publish only for what we released
            mine = await self._find("release_schedules", self._schedules,
                                    {"_id": {"$in": list(events)}, "lease": token},
                                    projection={"_id": True})
            released = {document["_id"] for document in mine}
            events = {i: event for i, event in events.items() if i in released}
        await self._publish_all(events.values())

    async def get_next_schedule_run_time(self) -> datetime | None:
        """The earliest time a schedule can be processed here: its next fire time, or, for a
        schedule leased by another scheduler, when that lease runs out (so a scheduler
        neither spins on schedules it cannot take nor sleeps past a crashed peer's lease)."""
        server_now = await self._server_now()
        active = {"next_fire_time": {"$ne": None}, "paused": {"$ne": True},
                  **self._LIVE_SCHEDULE}
        free = await self._run("get_next_schedule_run_time", lambda: self._schedules.find_one(
            {**active, "$or": [{"acquired_until": None}, {"acquired_until": {"$lt": server_now}}]},
            projection={"progress": True, "next_fire_time": True},
            sort=[("next_fire_time", ASCENDING)],
        ))
        leased = await self._run("get_next_schedule_run_time", lambda: self._schedules.find_one(
            {**active, "acquired_until": {"$gte": server_now}},
            projection={"acquired_until": True}, sort=[("acquired_until", ASCENDING)],
        ))
        times = []
        if free:
            try:
                times.append(_codec.decode_next_fire_time(free, self.serializer))
            except DeserializationError:
                times.append(free["next_fire_time"])
        if leased:
            times.append(leased["acquired_until"] - self._clock.offset)  # to local time
        return min((time for time in times if time is not None), default=None)

    async def extend_acquired_schedule_leases(
        self, scheduler_id: str, schedule_ids: set[str], duration: timedelta
    ) -> None:
        until = await self._server_now() + duration
        await self._run("extend_acquired_schedule_leases", lambda: self._schedules.update_many(
            {"_id": {"$in": list(schedule_ids)}, "acquired_by": scheduler_id},
            {"$set": {"acquired_until": until}},
        ))

