"""Async plain keys on Redis: the sync store's keys and ``kv_apply`` script.

A swap is :data:`.kv.APPLY` with the arguments :func:`.kv.apply_call` builds, a forced
write when it writes (with ``min_replicas``, WAIT: KVParticipant stages its yes and
applies its commit with it), so sync and async KVParticipants share their keys. On a
Cluster, as the sync store, a swap across slots is refused with a ConfigError naming the
keys (:func:`.slots.require_one_slot`) before any request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster

from .aio_locks import run_script
from .aio_txlog import mget
from .kv import _GLOB_SPECIALS, APPLY, apply_call
from .slots import require_one_slot

if TYPE_CHECKING:
    from .aio_locks import AsyncRedisBackend


class AsyncRedisKV:
    def __init__(self, backend: AsyncRedisBackend) -> None:
        self._backend = backend
        self._redis: Any = backend.redis  # untyped replies in redis-py
        self._prefix = f"{backend.prefix}kv:"

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._backend.call(
            lambda: self._redis.get(self._prefix + key), what=f"get {key!r}", retry=True
        )
        return value

    async def scan(self, prefix: str) -> dict[str, bytes]:
        pattern = _GLOB_SPECIALS.sub(r"\\\1", self._prefix + prefix) + "*"
        cut = len(self._prefix)

        async def scan() -> dict[str, bytes]:
            keys = [k.decode() async for k in self._redis.scan_iter(match=pattern, count=1000)]
            values = await mget(self._redis, keys)
            return {k[cut:]: v for k, v in zip(keys, values, strict=True) if v is not None}

        return await self._backend.call(scan, what=f"scan {prefix!r}", retry=True)

    async def swap(
        self,
        puts: Mapping[str, bytes],
        deletes: Iterable[str] = (),
        only_if: Mapping[str, bytes | None] | None = None,
    ) -> dict[str, bytes | None] | None:
        conditions = dict(only_if or {})
        keys, args = apply_call(self._prefix, puts, list(deletes), conditions)
        what = f"apply to {len(keys)} keys"
        if isinstance(self._redis, RedisCluster):
            require_one_slot(keys, what)
        result: Any
        if len(keys) > len(conditions):  # it writes: a forced write, as the sync store's
            replication = self._backend.replication
            result = await self._backend.call(
                lambda: replication.write(APPLY, keys, args, what=what), what=what
            )
        else:
            result = await self._backend.call(
                lambda: run_script(APPLY, self._redis, keys, args), what=what
            )
        if not isinstance(result, list):
            return None
        return dict(zip(conditions, result, strict=True))
