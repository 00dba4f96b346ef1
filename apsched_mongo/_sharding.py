"""What may be sharded, on which key, from which server version: the rules ``doctor`` checks
a cluster's real sharding against, and docs/deployment.rst ("Sharded clusters") explains.

Each rule follows from the operations the store and broker send to that collection and from
MongoDB's documented restrictions on sharded collections:

* an upsert's filter must hold the whole shard key, and findAndModify needs an equality on
  it before 7.1 ("Operational Restrictions in Sharded Clusters"; ``findAndModify``);
* the ``from`` collection of a ``$lookup`` may be sharded only from 5.1 (``$lookup``);
* a unique index must be prefixed by the shard key, and a hashed shard key allows no unique
  index but ``_id``'s ("Sharded Collections with Unique Indexes");
* a single-document write filtering only on ``_id`` of a collection sharded on another key
  is sent to every shard (SERVER-30970).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

Version = tuple[int, int]
LOOKUP_FROM_SHARDED: Version = (5, 1)
FIND_AND_MODIFY_WITHOUT_SHARD_KEY: Version = (7, 1)


@attrs.frozen
class CollectionRule:
    """How one collection is used, as far as sharding cares."""

    #: what the store or broker does with it (for the docs and doctor's messages)
    operations: str
    #: what we recommend
    advice: str
    #: upserts filtering on ``_id`` alone: the shard key must be ``_id``
    upserts_by_id: bool = False
    #: findAndModify filtering on ``_id`` (and conditions): shard key ``_id`` before 7.1
    find_and_modify_by_id: bool = False
    #: the ``from`` of a ``$lookup``: sharded only from 5.1
    lookup_from: bool = False
    #: single-document writes filtering on ``_id``: broadcast when sharded on another key
    writes_by_id: bool = False
    #: field lists of the unique indexes we create on it
    unique_indexes: tuple[tuple[str, ...], ...] = ()
    #: fields that every single-document write and findAndModify filters on besides _id
    #: (a shard key made of them targets one shard)
    also_filtered: tuple[str, ...] = ()


#: by collection name without the prefix; ``events`` is the broker's collection
RULES: dict[str, CollectionRule] = {
    "tasks": CollectionRule(
        operations="find by _id or all; findAndModify upsert and remove by _id; "
                   "aggregate ($match _id, $lookup from jobs); the from of jobs' $lookup",
        advice="leave unsharded (one document per task); if you must, {_id: 1} or "
               "{_id: 'hashed'} on 5.1 or newer",
        upserts_by_id=True, find_and_modify_by_id=True, lookup_from=True, writes_by_id=True,
    ),
    "schedules": CollectionRule(
        operations="find by _id $in, sorted by next_fire_time/acquired_until; insert; "
                   "findAndModify replace-upsert by _id; updates by _id; update_many and "
                   "delete_many by lease token",
        advice="{_id: 1} or {_id: 'hashed'}",
        upserts_by_id=True, find_and_modify_by_id=True, writes_by_id=True,
    ),
    "jobs": CollectionRule(
        operations="insert; aggregate queue head ($lookup tasks and jobs); findAndModify "
                   "and updateOne claims by _id and task_id; delete by _id, task_id and "
                   "lease; update_many and delete_many by lease token; distinct "
                   "schedule_id; unique index (task_id, slot)",
        advice="leave unsharded (it holds only pending and running jobs); if you must, "
               "{task_id: 1} on 5.1 or newer: claims and releases name the task, so each "
               "reaches one shard",
        find_and_modify_by_id=True, lookup_from=True, writes_by_id=True,
        unique_indexes=(("task_id", "slot"),), also_filtered=("task_id",),
    ),
    "job_results": CollectionRule(
        operations="insert_many; find and delete by _id; delete_many by expires_at; TTL "
                   "index on expires_at",
        advice="{_id: 1} or {_id: 'hashed'}",
        find_and_modify_by_id=True, writes_by_id=True,
    ),
    "meta": CollectionRule(
        operations="findAndModify upsert by _id (one document)",
        advice="leave unsharded (one document)",
        upserts_by_id=True, find_and_modify_by_id=True, writes_by_id=True,
    ),
    "events": CollectionRule(
        operations="inserts; change stream; find by node/seq/created_at (polling); TTL "
                   "index on created_at",
        advice="leave unsharded, or {_id: 'hashed'}; any key works",
    ),
}


@attrs.frozen
class Verdict:
    """What is wrong (``problems``: some operation fails) or costly (``warnings``) with
    one collection's sharding."""

    problems: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def parse_version(text: str) -> Version | None:
    """``"7.0.12"`` -> ``(7, 0)``; None if unreadable."""
    try:
        major, minor = text.split(".")[:2]
        return int(major), int(minor.split("-")[0])
    except ValueError:
        return None


def describe_key(key: Mapping[str, Any]) -> str:
    """``{task_id: 1}``, ``{_id: 'hashed'}``: a shard key as mongosh writes it."""
    return "{" + ", ".join(
        f"{field}: {value!r}" if isinstance(value, str) else f"{field}: {int(value)}"
        for field, value in key.items()
    ) + "}"


def judge(rule: CollectionRule, key: Mapping[str, Any], version: Version) -> Verdict:
    """Check a collection sharded on ``key``, on a cluster of server ``version``."""
    fields = tuple(key)
    hashed = any(value == "hashed" for value in key.values())
    # Single-document writes and findAndModify name every field of the shard key
    on_id = fields == ("_id",) or (bool(fields) and set(fields) <= set(rule.also_filtered))
    problems: list[str] = []
    warnings: list[str] = []
    if rule.lookup_from and version < LOOKUP_FROM_SHARDED:
        problems.append("it is the 'from' of a $lookup, which cannot read a sharded "
                        "collection before MongoDB 5.1")
    if rule.upserts_by_id and not on_id:
        problems.append("its upserts filter on _id alone, and an upsert's filter must hold "
                        "the whole shard key: shard it on _id")
    elif (rule.find_and_modify_by_id and not on_id
          and version < FIND_AND_MODIFY_WITHOUT_SHARD_KEY):
        problems.append("its findAndModify operations filter on _id, which needs an equality "
                        "on the shard key before MongoDB 7.1: shard it on _id, or upgrade")
    for unique in rule.unique_indexes:
        if hashed:
            problems.append(f"the unique index ({', '.join(unique)}) cannot exist with a "
                            "hashed shard key")
        elif unique[:len(fields)] != fields:
            problems.append(f"the unique index ({', '.join(unique)}) must start with the "
                            "shard key")
    if rule.writes_by_id and not on_id and not problems:
        warnings.append("single-document writes filtering on _id go to every shard "
                        "(SERVER-30970)")
    return Verdict(tuple(problems), tuple(warnings))


#: said once for any sharded cluster: change streams through mongos wait for every shard
CHANGE_STREAM_LATENCY = (
    "change streams through mongos deliver an event only once every shard has reported "
    "past it; an idle shard reports every periodicNoopIntervalSecs (10 s by default), so "
    "wake-ups between nodes can take up to that long (set periodicNoopIntervalSecs=1 on "
    "the shards to bring it down to about a second)"
)
