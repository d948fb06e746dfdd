"""Hash slots: what keeps every multi-key step of dcoord inside one Redis Cluster slot.

Redis Cluster runs a script or a multi-key command only if all its keys hash to one slot,
and a key's slot is the CRC16 of its *hash tag* (the text between its first ``{`` and
the next ``}``) when it has one. dcoord names its keys so that the keys one step touches
share a tag, on every topology (one layout, so data written on one server is laid out
for a Cluster already):

* a lock's keys: ``{NAME}`` (``locks.py``); a fence: ``{RESOURCE}``, and a value written
  with :meth:`dcoord.Fence.write` must carry the same tag (checked on a Cluster);
* a :class:`~dcoord.KVParticipant`'s keys: ``{NAME}`` (``kvp/{NAME}/...``);
* the 2PC log: :data:`BUCKETS` buckets, each a tag holding its records and its index of
  unfinished transactions (``txlog.py``).

The only steps across slots move keys of the layout before tags (``migrate.py``,
``txlog_migrate.lua``); they run only where that layout could exist: on one server.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, cast

from redis.crc import key_slot

from ...errors import ConfigError
from .topology import Client

BUCKETS = 16
"""Buckets of the 2PC log. Fixed: a record's bucket comes from its txid alone, so any
process finds it; changing it would hide every record written before."""


def bucket(txid: str) -> int:
    """The log bucket of ``txid`` (CRC32: the same in every process and version)."""
    return zlib.crc32(txid.encode()) % BUCKETS


def slot(key: str) -> int:
    """The Cluster slot of ``key`` (by its hash tag if it has one)."""
    return int(key_slot(key.encode()))


def require_one_slot(keys: Sequence[str], what: str) -> None:
    """ConfigError naming the keys if ``keys`` span several slots (a Cluster refuses such a
    step; redis-py would say only "all keys must map to the same key slot")."""
    slots = {slot(key) for key in keys}
    if len(slots) > 1:
        distinct = sorted(set(keys))
        shown = ", ".join(map(repr, distinct[:4])) + (" ..." if len(distinct) > 4 else "")
        raise ConfigError(
            f"{what}: on a Redis Cluster every key of one atomic step must hash to one slot, "
            f"but {shown} hash to {len(slots)} slots; give the keys a common hash tag, "
            "e.g. '{orders}balance' and '{orders}limit'"
        )


def by_slot(keys: Sequence[str]) -> list[list[int]]:
    """The positions of ``keys`` grouped by slot, one MGET each (shared by the sync and
    the async :func:`mget`)."""
    groups: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(slot(key), []).append(index)
    return list(groups.values())


def in_order(count: int, groups: list[list[int]], replies: Sequence[Any]) -> list[bytes | None]:
    """The values the MGETs of ``groups`` (:func:`by_slot`) replied, back in key order."""
    values: list[bytes | None] = [None] * count
    for indexes, found in zip(groups, replies, strict=True):
        for i, value in zip(indexes, cast("list[bytes | None]", found), strict=True):
            values[i] = value
    return values


def mget(client: Client, keys: Sequence[str]) -> list[bytes | None]:
    """The values of ``keys`` (None: absent), in order: one MGET per slot, all sent in one
    pipeline (one round trip on one server; per node on a Cluster)."""
    if not keys:
        return []
    groups = by_slot(keys)
    pipe: Any = client.pipeline(transaction=False)
    for indexes in groups:
        # Not pipe.mget(): a Cluster's pipeline refuses that method (any slot), while it
        # routes the command itself by its keys' one slot.
        pipe.execute_command("MGET", *(keys[i] for i in indexes))
    return in_order(len(keys), groups, pipe.execute())
