"""Inspection of Redis locks for :mod:`dcoord.aio`: the sync module's keys and readings
(:mod:`.inspect`) through ``redis.asyncio``: SCAN, then one MULTI per lock (read
concurrently, within the client's bound on requests in flight)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster

from ...inspect import LockInfo
from .inspect import group_names, group_pattern, key_and_name, lock_info, lock_key, lock_pattern

if TYPE_CHECKING:
    from .aio_locks import AsyncRedisBackend


async def locks(backend: AsyncRedisBackend, prefix: str) -> list[LockInfo]:
    """The held locks of the backend's namespace whose names start with ``prefix``."""
    keys = await _scan(backend, lock_pattern(backend.prefix, prefix), "locks")
    named = [key_and_name(backend.prefix, raw) for raw in keys]
    found = await asyncio.gather(*(_read(backend, key, name) for key, name in named))
    return [info for info in found if info is not None]


async def info(backend: AsyncRedisBackend, name: str) -> LockInfo | None:
    """Lock ``name`` if it is held (its keys read directly, no SCAN)."""
    return await _read(backend, lock_key(backend.prefix, name), name)


async def groups(backend: AsyncRedisBackend) -> set[str]:
    """The names of the groups stored in the backend's namespace."""
    return group_names(
        backend.prefix, await _scan(backend, group_pattern(backend.prefix), "groups")
    )


async def _scan(backend: AsyncRedisBackend, pattern: str, what: str) -> list[bytes]:
    client: Any = backend.redis

    async def scan() -> list[bytes]:
        return [key async for key in client.scan_iter(match=pattern, count=1000)]

    return await backend.call(scan, what=f"list {what} under {backend.prefix}", retry=True)


async def _read(backend: AsyncRedisBackend, key: str, name: str) -> LockInfo | None:
    """One lock's fields, read in one MULTI so token, TTL and fence belong together."""
    client: Any = backend.redis

    async def read() -> list[Any]:
        pipe = client.pipeline(transaction=True)
        pipe.get(key).pttl(key).get(f"{key}:fence")
        result: list[Any] = await pipe.execute()
        # Every client waiting on the lock subscribes to its release channel.
        result.append(await _subscribers(client, f"{key}:released"))
        return result

    token, pttl, fence, waiting = await backend.call(
        read, what=f"inspect lock {name!r}", retry=True
    )
    return lock_info(name, token, pttl, fence, waiting)


async def _subscribers(client: Any, channel: str) -> int:
    """How many clients subscribe to ``channel``: on a Cluster a shard channel, counted
    by the node that serves its slot (as :func:`.inspect.subscribers`)."""
    if isinstance(client, RedisCluster):
        node = client.get_node_from_key(channel)
        reply = await client.pubsub_shardnumsub(channel, target_nodes=node)
    else:
        reply = await client.pubsub_numsub(channel)
    return int(reply[0][1])
