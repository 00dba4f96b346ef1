"""What this node knows about the job queue, and when it is worth a round trip.

APScheduler's job loop asks the store for jobs whenever a ``JobAdded`` or ``JobReleased``
event arrives, on every node at once. Asking the database each time costs every node a
query per job, and when several nodes then try to claim the same job, all but one lose.
This module keeps a local picture of the queue, built from this node's reads of the queue
head and from the events the broker delivers (which jobs wait, which tasks run how many
jobs, which tasks allow how many), and decides for each call one of:

* ``claim``: claim these jobs directly by id (one findAndModify for one job), no read;
* ``read``: the picture cannot pick (a task's limit or free slot numbers are unknown, or
  jobs lie beyond what was read): read the queue head;
* ``skip``: nothing can be claimed (empty queue, or every waiting job's task is at its
  ``max_running_jobs``): no round trip at all;
* ``wait``: the claimable jobs were announced, or their slot freed, by *another* node,
  whose own scheduler heard of them first and is expected to claim them. Wait up to
  ``grace`` x (1 + this node's rank) for its ``JobAcquired``; the rank comes from
  rendezvous hashing of the job id over the schedulers seen recently, so when the announcer
  does not claim (a producer-only node, or one at capacity), exactly one other node goes
  first, and the rest follow only if it doesn't either.

The picture is a hint, never the authority: every claim is still a conditional write
decided by the server, so a stale picture costs a wasted round trip, never a duplicate.
Liveness rests on the same events APScheduler's own loop rests on; a belief that a task is
busy expires after a lease duration, so a lost ``JobReleased`` delays jobs, never strands
them, and a picture older than :data:`AUDIT_INTERVAL` is checked by a read.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Literal
from uuid import UUID

import anyio
import attrs

#: ``limits`` value for a task whose ``max_running_jobs`` this node has not seen
UNKNOWN = -1
#: Schedulers not seen acquiring or releasing for this long drop out of the rank order
WORKER_TTL = 600.0
#: How many recently finished job ids are remembered, to ignore a late ``JobAdded``
FINISHED_MEMORY = 10_000
#: Before believing "nothing to do" from a picture older than this, read (a safety net for
#: events a broker lost, e.g. after its change stream history rolled over)
AUDIT_INTERVAL = 60.0
_UNLIMITED = 10**9
#: Documents of this node's own waiting jobs are kept while fewer than this many wait
KEEP_DOCUMENTS = 1000


@attrs.define
class Waiting:
    """A job believed to be unclaimed."""

    task_id: str
    order: int  # queue order (for another node's announced job: an estimate)
    heard: float  # when this node learned of it (monotonic seconds)
    local: bool  # announced by this node
    #: the stored document, for a job this node added (a claim then needs no read back)
    document: dict[str, Any] | None = None


@attrs.frozen
class Plan:
    action: Literal["read", "claim", "skip", "wait"]
    #: for "claim": (job id, task id, slot to take or None for a task without a limit)
    jobs: tuple[tuple[UUID, str, int | None], ...] = ()
    #: for "wait": seconds until the plan may change without any event
    delay: float = 0.0


class QueueView:
    """See the module docstring.

    :param clock: monotonic seconds
    :param grace: seconds another node gets to claim the jobs it announced
    :param trusted: whether the event broker delivers other nodes' events; without them
        the picture cannot be kept current, so every call reads
    """

    def __init__(self, clock: Callable[[], float], grace: float, trusted: bool) -> None:
        self.clock = clock
        self.grace = grace
        self.trusted = trusted
        self.waiting: dict[UUID, Waiting] = {}
        #: Whether ``waiting`` holds every unclaimed job, but for the tasks in ``partial``,
        #: of which it holds the oldest ones only
        self.complete = False
        self.partial: set[str] = set()
        #: task id -> max_running_jobs (None: unlimited; absent: not seen)
        self.limits: dict[str, int | None] = {}
        #: task id -> {job id -> until when we believe it runs (monotonic; inf: ours)}
        self.running: dict[str, dict[UUID, float]] = {}
        #: task id -> when its running jobs were last read exactly (events keep them since)
        self.tracked: dict[str, float] = {}
        #: task id -> (when a slot was freed, freed by this node)
        self.freed: dict[str, tuple[float, bool]] = {}
        self.workers: dict[str, float] = {}
        self.lease_seconds = 60.0
        self.read_at = -math.inf
        self._finished: OrderedDict[UUID, None] = OrderedDict()
        self._reading = False
        self._during_read: list[Callable[[], None]] = []
        self.changed = anyio.Event()

    # --- facts --------------------------------------------------------------------------------

    def _touch(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()

    def _apply(self, change: Callable[[], None]) -> None:
        """Apply ``change`` now, and again after a read in progress replaces the picture."""
        change()
        if self._reading:
            self._during_read.append(change)
        self._touch()

    def job_added(self, job_id: UUID, task_id: str, order: int, *, local: bool,
                  document: dict[str, Any] | None = None) -> None:
        """``order``: the job's queue order, or for another node's job an estimate (its
        ``JobAdded`` does not carry the creation time)."""
        heard = self.clock()
        if len(self.waiting) >= KEEP_DOCUMENTS:
            document = None

        def change() -> None:
            # Behind jobs of a task not read to the end, a new one would jump the queue
            if (job_id not in self._finished and job_id not in self.waiting
                    and task_id not in self.partial):
                self.waiting[job_id] = Waiting(task_id, order, heard, local, document)
        self._apply(change)

    def job_acquired(self, job_id: UUID, task_id: str, scheduler_id: str, *,
                     ours: bool = False) -> None:
        now = self.clock()

        def change() -> None:
            self.waiting.pop(job_id, None)
            until = math.inf if ours else now + self.lease_seconds
            self.running.setdefault(task_id, {})[job_id] = until
        self.workers[scheduler_id] = now
        self._apply(change)

    def job_released(self, job_id: UUID, task_id: str, scheduler_id: str | None, *,
                     local: bool) -> None:
        now = self.clock()

        def change() -> None:
            self.waiting.pop(job_id, None)
            if self.running.get(task_id, {}).pop(job_id, None) is not None:
                self.freed[task_id] = (now, local)
            self._finished[job_id] = None
            while len(self._finished) > FINISHED_MEMORY:
                self._finished.popitem(last=False)
        if scheduler_id:
            self.workers[scheduler_id] = now
        self._apply(change)

    def task_changed(self, task_id: str, *, local: bool) -> None:
        """A task was added, changed or removed: its limit may differ now."""
        now = self.clock()

        def change() -> None:
            self.limits.pop(task_id, None)
            self.freed[task_id] = (now, local)
        self._apply(change)

    def has_seen(self, job_id: UUID) -> bool:
        """Whether this node knows the job was claimed or finished."""
        return job_id in self._finished or any(
            job_id in holders for holders in self.running.values())

    def learn_limit(self, task_id: str, limit: int | None) -> None:
        self.limits[task_id] = limit

    def document_of(self, job_id: UUID) -> dict[str, Any] | None:
        waiting = self.waiting.get(job_id)
        return waiting.document if waiting else None

    def claim_lost(self, job_id: UUID) -> None:
        """A direct claim found the job gone or taken: stop believing it waits."""
        self.waiting.pop(job_id, None)

    def slot_taken(self, task_id: str) -> None:
        """A direct claim met the unique slot index: someone we did not hear of runs it."""
        self.running.setdefault(task_id, {})[UUID(int=0)] = self.clock() + self.lease_seconds
        self.tracked.pop(task_id, None)

    def overtakes_nobody(self, room: int) -> bool:
        """Whether a job added now and claimed at once by this node overtakes no job this
        node would not claim in the same breath: every waiting job (if any) is this node's
        own, of a task without a limit, and fits in its scheduler's ``room`` too; and no
        job can wait unseen."""
        return (self.trusted and self.complete and not self.partial
                and self.clock() - self.read_at <= AUDIT_INTERVAL
                and len(self.waiting) < room
                and all(waiting.local and self.limits.get(waiting.task_id, UNKNOWN) is None
                        for waiting in self.waiting.values()))

    def forget_everything(self) -> None:
        """Read again before trusting the picture (after a cleanup)."""
        self.complete = False
        self._touch()

    # --- reads --------------------------------------------------------------------------------

    def begin_read(self) -> None:
        """Called before reading the queue head (one read at a time)."""
        self._reading = True
        self._during_read = []

    def end_read(self, unclaimed: Iterable[dict[str, Any]], *, complete: bool,
                 partial: set[str], running: dict[str, set[UUID]]) -> None:
        """Replace the picture with a read's, then replay the events heard meanwhile.

        :param unclaimed: the documents of the unclaimed jobs read
        :param complete: whether the read saw every unclaimed job, but for ``partial``
        :param partial: tasks of which the read saw only the oldest unclaimed jobs
        :param running: for each task read, the jobs running now
        """
        self._reading = False
        self.read_at = now = self.clock()
        previous = self.waiting
        self.waiting = {}
        for document in unclaimed:
            job_id = document["_id"]
            if job_id in self._finished:
                continue
            before = previous.get(job_id)
            self.waiting[job_id] = Waiting(
                document["task_id"], document["queue_order"], before.heard if before else now,
                before.local if before else False,
                document if len(self.waiting) < KEEP_DOCUMENTS else None)
        for task_id, holders in running.items():
            self.track(task_id, holders)
        self.complete = complete and self.trusted
        self.partial = set(partial)
        replay, self._during_read = self._during_read, []
        for change in replay:
            change()
        self._touch()

    def track(self, task_id: str, holders: Iterable[UUID]) -> None:
        """The jobs of ``task_id`` running now, as just read from the database."""
        now = self.clock()
        known = self.running.get(task_id, {})
        self.running[task_id] = {
            job_id: known.get(job_id, now + self.lease_seconds) for job_id in holders
        }
        self.tracked[task_id] = now

    def running_jobs(self, task_id: str) -> int | None:
        """How many jobs of the task run, if this node can tell without a read: it read
        them within :data:`AUDIT_INTERVAL` and has heard every change since (its own, and
        other nodes' through a broker that carries their events)."""
        if not self.trusted or self.clock() - self.tracked.get(task_id, -math.inf) > (
                AUDIT_INTERVAL):
            return None
        return len(self.running.get(task_id, {}))

    def abort_read(self) -> None:
        self._reading = False
        self._during_read = []
        self.complete = False

    # --- decisions ----------------------------------------------------------------------------

    def _room(self, task_id: str, now: float) -> tuple[int, float]:
        """(jobs of the task that may start now by what we believe, when the earliest
        belief that one of its jobs runs expires)."""
        limit = self.limits.get(task_id, UNKNOWN)
        if limit is None:
            return _UNLIMITED, math.inf
        holders = self.running.get(task_id, {})
        expired = [job_id for job_id, until in holders.items() if until <= now]
        for job_id in expired:  # a JobReleased we never heard: stop believing it runs
            del holders[job_id]
        if expired:
            self.tracked.pop(task_id, None)
        expires = min(holders.values(), default=math.inf)
        if limit == UNKNOWN:
            return 1, expires  # a read will tell; worth one
        return max(limit - len(holders), 0), expires

    def next_local(self, released: UUID, task_id: str) -> tuple[dict[str, Any], int | None] | None:
        """The oldest waiting job whose document this node knows (it added or read it)
        that could start once ``released`` (of ``task_id``) stops running, with the slot
        it would take: the node freeing the room takes the next job in line."""
        now = self.clock()
        holders = self.running.get(task_id, {})
        until = holders.pop(released, None)
        try:
            room: dict[str, int] = {}
            for waiting in sorted(self.waiting.values(), key=lambda w: w.order):
                if waiting.task_id not in room:
                    room[waiting.task_id] = self._room(waiting.task_id, now)[0]
                    if self.limits.get(waiting.task_id, UNKNOWN) not in (None, 1):
                        room[waiting.task_id] = 0  # free slot numbers unknown: read
                if not room[waiting.task_id]:
                    continue
                if waiting.document is None:
                    return None  # not known well enough: the normal path
                slot = None if self.limits[waiting.task_id] is None else 0
                return waiting.document, slot
            return None
        finally:
            if until is not None:
                holders[released] = until

    def _rank(self, job_id: UUID, identity: str, now: float) -> int:
        for worker in [w for w, seen in self.workers.items() if now - seen > WORKER_TTL]:
            del self.workers[worker]

        def weight(name: str) -> bytes:
            return hashlib.blake2b(job_id.bytes + name.encode(), digest_size=8).digest()

        return sorted(set(self.workers) | {identity}, key=weight, reverse=True).index(identity)

    def plan(self, identity: str, limit: int) -> Plan:
        """What to do for a scheduler ``identity`` that can take ``limit`` more jobs."""
        self.workers[identity] = now = self.clock()
        if not self.trusted or now - self.read_at > AUDIT_INTERVAL:
            return Plan("read")
        room: dict[str, int] = {}
        due: list[tuple[UUID, Waiting]] = []
        granted = expiry = math.inf  # when another node's grace ends; a belief expires
        for job_id, waiting in sorted(self.waiting.items(), key=lambda item: item[1].order):
            task_id = waiting.task_id
            if task_id not in room:
                room[task_id], expires = self._room(task_id, now)
                if not room[task_id]:
                    expiry = min(expiry, expires)
            if not room[task_id]:
                continue
            room[task_id] -= 1
            freed_at, freed_here = self.freed.get(task_id, (-math.inf, False))
            since, local = ((freed_at, freed_here) if freed_at > waiting.heard
                            else (waiting.heard, waiting.local))
            ready = since if local else since + self.grace * (
                1 + self._rank(job_id, identity, now))
            if ready <= now:
                due.append((job_id, waiting))
            else:
                granted = min(granted, ready)
        if due:
            if any(self.limits.get(w.task_id, UNKNOWN) not in (None, 1) for _, w in due):
                return Plan("read")  # only a read tells the free slot numbers
            return Plan("claim", tuple(
                (job_id, w.task_id, None if self.limits[w.task_id] is None else 0)
                for job_id, w in due[:limit]
            ))
        if granted < math.inf:
            return Plan("wait", delay=granted - now)
        if not self.complete or any(self._unread_room(task_id, now) for task_id in self.partial):
            return Plan("read")  # jobs nobody has read may wait
        if expiry < math.inf:
            return Plan("wait", delay=max(expiry - now, 0.0))
        return Plan("skip")

    def _unread_room(self, task_id: str, now: float) -> bool:
        """A task read only in part whose known jobs ran out while it has room."""
        return bool(self._room(task_id, now)[0]) and not any(
            waiting.task_id == task_id for waiting in self.waiting.values())
