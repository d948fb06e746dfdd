"""Inspection of Redis locks (see :mod:`dcoord.inspect`): SCAN, then one MULTI per lock.

On a Redis Cluster redis-py's SCAN visits every primary, and each MULTI stays in one
slot (a lock's keys share its hash tag). The key patterns and what a reply means are
the pure helpers here (:func:`lock_pattern`, :func:`lock_info`, :func:`group_names`),
which the async API's :mod:`.aio_inspect` shares.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from redis.cluster import RedisCluster

from ...inspect import LockInfo, name_of_segment, parse_token
from ..base import key_segment

if TYPE_CHECKING:
    from . import RedisBackend

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")
_GROUP_SUFFIX = "}:epoch"


def locks(backend: RedisBackend, prefix: str) -> list[LockInfo]:
    """The held locks of the backend's namespace whose names start with ``prefix``."""
    client: Any = backend.redis
    pattern = lock_pattern(backend.prefix, prefix)
    keys: list[bytes] = backend.call(
        lambda: list(client.scan_iter(match=pattern, count=1000)),
        what=f"list locks under {backend.prefix}",
        retry=True,
    )
    found = []
    for raw in keys:
        key, name = key_and_name(backend.prefix, raw)
        info = _read(backend, key, name)
        if info is not None:
            found.append(info)
    return found


def info(backend: RedisBackend, name: str) -> LockInfo | None:
    """Lock ``name`` if it is held (its keys read directly, no SCAN)."""
    return _read(backend, lock_key(backend.prefix, name), name)


def lock_key(namespace_prefix: str, name: str) -> str:
    """The key of lock ``name`` (its token; the fence and channel hang off it)."""
    return f"{namespace_prefix}lock:{{{key_segment(name)}}}"


def lock_pattern(namespace_prefix: str, prefix: str) -> str:
    """The SCAN pattern of the lock keys whose names start with ``prefix``."""
    base = f"{namespace_prefix}lock:{{"
    return _GLOB_SPECIALS.sub(r"\\\1", base + key_segment(prefix)) + "*}"


def key_and_name(namespace_prefix: str, raw: bytes) -> tuple[str, str]:
    """A lock key SCAN found, and the lock name it encodes."""
    key = raw.decode()
    return key, name_of_segment(key[len(f"{namespace_prefix}lock:{{") : -1])


def _read(backend: RedisBackend, key: str, name: str) -> LockInfo | None:
    """One lock's fields, read in one MULTI so token, TTL and fence belong together."""
    client: Any = backend.redis

    def read() -> list[Any]:
        pipe = client.pipeline(transaction=True)
        pipe.get(key).pttl(key).get(f"{key}:fence")
        result: list[Any] = pipe.execute()
        # Every client waiting on the lock subscribes to its release channel.
        result.append(subscribers(backend, f"{key}:released"))
        return result

    token, pttl, fence, waiting = backend.call(read, what=f"inspect lock {name!r}", retry=True)
    return lock_info(name, token, pttl, fence, waiting)


def lock_info(
    name: str, token: bytes | None, pttl: int, fence: bytes | None, waiting: int
) -> LockInfo | None:
    """Lock ``name`` from its token, PTTL and fence (read together) and the number of
    clients subscribed to its channel; None when it is not held."""
    if token is None or fence is None:
        return None  # released (or expired) since the SCAN, or not a dcoord lock
    who = parse_token(token.decode(errors="replace"))
    fence_value = int(fence)
    return LockInfo(
        name=name,
        holder=None if who is None else who.holder,
        label=None if who is None else who.label,
        fence=fence_value,
        # The fence is the server's TIME in microseconds at the grant, unless the last
        # fence + 1 was greater (grants faster than one per microsecond, or the server's
        # clock stepped back): then it is a little after the grant.
        acquired_at=fence_value / 1e6,
        ttl_left=pttl / 1000 if pttl >= 0 else None,
        waiters=int(waiting),
    )


def subscribers(backend: RedisBackend, channel: str) -> int:
    """How many clients subscribe to ``channel`` (each waiting client once): on a
    Cluster a shard channel, counted by the node that serves its slot."""
    client: Any = backend.redis
    if isinstance(client, RedisCluster):
        find: Any = client.get_node_from_key  # untyped in redis-py
        node = find(channel)
        return int(client.pubsub_shardnumsub(channel, target_nodes=node)[0][1])
    return int(client.pubsub_numsub(channel)[0][1])


def groups(backend: RedisBackend) -> set[str]:
    """The names of the groups stored in the backend's namespace (every group that ever
    had a member keeps its epoch counter)."""
    client: Any = backend.redis
    keys: list[bytes] = backend.call(
        lambda: list(client.scan_iter(match=group_pattern(backend.prefix), count=1000)),
        what=f"list groups under {backend.prefix}",
        retry=True,
    )
    return group_names(backend.prefix, keys)


def group_pattern(namespace_prefix: str) -> str:
    """The SCAN pattern of the groups' epoch counters."""
    return f"{namespace_prefix}group:{{*{_GROUP_SUFFIX}"


def group_names(namespace_prefix: str, keys: Iterable[bytes]) -> set[str]:
    """The group names of the epoch counters SCAN found."""
    start = len(f"{namespace_prefix}group:{{")
    return {key.decode()[start : -len(_GROUP_SUFFIX)] for key in keys}
