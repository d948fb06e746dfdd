"""The 2PC decision log on Redis through ``redis.asyncio``: the sync log's keys and scripts.

Records, bucket and state indexes and scripts are those of :mod:`.txlog`
(:func:`.txlog.create_call`, :func:`.txlog.cas_call`, ``MIGRATE``), and a page is read
by the same program (:func:`.txlog.past_cursor`), so a sync and an async coordinator
read, decide and list one log. Forced writes are :class:`AsyncReplication`, the
async twin of :class:`.replication.Replication` (the script and ``WAIT min_replicas``
in one pipeline on one connection, the same shortfall error; on a Cluster that
connection is the one to the primary of the keys' slot). Unfinished records of the
pre-bucket layout are moved as the sync log moves them, before first use and whenever a
listing finds new ones (on one server: that layout never existed on a Cluster).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import redis
from redis.asyncio.cluster import RedisCluster

from ...aio.participants import drive
from ...errors import BackendError
from ..base import LogEntry
from . import persistence
from .aio_locks import AsyncClient, run_script
from .locks import LuaScript
from .replication import check_acks
from .slots import BUCKETS, bucket, by_slot, in_order
from .txlog import (
    _CLOCK_REREAD,
    CAS,
    CREATE,
    MIGRATE,
    ZRange,
    cas_call,
    create_call,
    index_key,
    page_keys,
    past_cursor,
    record_key,
)

if TYPE_CHECKING:
    from .aio_locks import AsyncRedisBackend


class AsyncReplication:
    """Forced writes of one async Redis backend (see :mod:`.replication`)."""

    def __init__(self, backend: AsyncRedisBackend) -> None:
        self._backend = backend
        self.min_replicas = int(backend.settings.options["min_replicas"])
        self.timeout = float(backend.settings.options["replica_timeout"])
        self._loaded: set[str] = set()

    async def write(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[Any], *, what: str
    ) -> Any:
        """Run ``script`` and, with ``min_replicas``, WAIT; BackendUnavailable if fewer
        replicas acknowledged. Call it inside :meth:`AsyncRedisBackend.call`."""
        client = self._backend.redis
        if not self.min_replicas:
            return await run_script(script, client, keys, args)
        if isinstance(client, RedisCluster):
            script = script.sharded()  # as run_script runs it
        run: Any = client.execute_command  # untyped in redis-py
        if script.sha not in self._loaded:
            # Loaded ahead: a refused EVALSHA would not stop the WAIT behind it. One
            # command name, so that a Cluster client sends it to every primary.
            await run("SCRIPT LOAD", script.source)
            self._loaded.add(script.sha)
        result, acks = await self._send(script, keys, args)
        if isinstance(result, redis.exceptions.NoScriptError):
            await run("SCRIPT LOAD", script.source)
            result, acks = await self._send(script, keys, args)
        elif isinstance(result, redis.exceptions.AskError):  # MovedError is one too
            # The slot moved since redis-py last read the Cluster's map: reread it, so
            # that both commands go to the slot's new primary.
            cluster: Any = client
            await cluster.nodes_manager.initialize()
            result, acks = await self._send(script, keys, args)
        if isinstance(result, Exception):
            raise result
        if isinstance(acks, Exception):
            raise acks
        check_acks(acks, self.min_replicas, self.timeout, what)
        return result

    async def _send(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """EVALSHA + WAIT in one pipeline on one connection; both replies, errors as
        values."""
        client: Any = self._backend.redis  # untyped in redis-py
        wait = ("WAIT", self.min_replicas, max(1, round(self.timeout * 1000)))
        pipe: Any = client.pipeline(transaction=False)
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        if not isinstance(client, RedisCluster):
            pipe.execute_command(*wait)
            return list(await pipe.execute(raise_on_error=False))
        # A Cluster pipeline sends each node's commands in order on one connection of
        # that node: the WAIT goes to the keys' primary, behind the script. Redirections
        # come back as errors (see write) rather than be resent alone, which would
        # separate the script from its WAIT.
        pipe.execute_command(*wait, target_nodes=client.get_node_from_key(keys[0]))
        return list(await pipe.execute(raise_on_error=False, allow_redirections=False))


async def mget(client: AsyncClient, keys: Sequence[str]) -> list[bytes | None]:
    """:func:`.slots.mget` on an async client: one MGET per slot, in one pipeline."""
    if not keys:
        return []
    groups = by_slot(keys)
    pipe: Any = client.pipeline(transaction=False)
    for indexes in groups:
        pipe.execute_command("MGET", *(keys[i] for i in indexes))
    return in_order(len(keys), groups, await pipe.execute())


class AsyncRedisTxLog:
    def __init__(self, backend: AsyncRedisBackend) -> None:
        self._backend = backend
        self._redis: Any = backend.redis  # untyped replies in redis-py
        self._prefix = f"{backend.prefix}tx:"
        self._namespace = backend.settings.namespace
        self._legacy_records = f"{backend.prefix}tx:r:"
        self._legacy_index = f"{backend.prefix}tx:unfinished"
        # The old layout can exist only where it could run: on one server.
        self._legacy_possible = backend.settings.topology != "cluster"
        self._migrated = not self._legacy_possible
        self._clock: tuple[float, float] | None = None  # (server time, monotonic at reply)

    def _keys(self, txid: str) -> list[str]:
        return [
            record_key(self._prefix, self._namespace, txid),
            index_key(self._prefix, self._namespace, bucket(txid)),
        ]

    async def create(
        self, txid: str, data: bytes, deadline: float, created: float | None = None
    ) -> LogEntry | None:
        what = f"create transaction record {txid!r}"
        await self._ensure_migrated(what)
        keys, args = create_call(self._prefix, self._namespace, txid, data, deadline, created)
        replication = self._backend.replication
        done = await self._backend.call(
            lambda: replication.write(CREATE, keys, args, what=what), what=what
        )
        return LogEntry(bytes(data), bytes(data)) if done else None

    async def cas(
        self,
        txid: str,
        expected: LogEntry,
        data: bytes,
        *,
        finished: bool,
        retention: float,
        state: str,
        created: float,
        previous: str | None = None,
    ) -> LogEntry | None:
        what = f"update transaction record {txid!r}"
        await self._ensure_migrated(what)
        keys, args = cas_call(
            self._prefix,
            self._namespace,
            txid,
            expected,
            data,
            finished=finished,
            retention=retention,
            state=state,
            created=created,
            previous=previous,
        )
        replication = self._backend.replication
        changed = await self._backend.call(
            lambda: replication.write(CAS, keys, args, what=what), what=what
        )
        return LogEntry(bytes(data), bytes(data)) if changed else None

    async def get(self, txid: str) -> LogEntry | None:
        what = f"read transaction record {txid!r}"
        await self._ensure_migrated(what)
        key = record_key(self._prefix, self._namespace, txid)
        data: bytes | None = await self._backend.call(
            lambda: self._redis.get(key), what=what, retry=True
        )
        return None if data is None else LogEntry(data, data)

    async def unfinished(self, limit: int | None = None) -> list[tuple[str, LogEntry | None]]:
        end = -1 if limit is None else limit - 1

        async def read() -> list[tuple[str, LogEntry | None]]:
            indexes = await self._indexes(end, legacy=self._legacy_possible)
            if self._legacy_possible:
                legacy = indexes.pop()
                if legacy:  # written by a process of the old version since we looked
                    await self._migrate_legacy(legacy)
                    indexes = await self._indexes(end, legacy=False)
            merged = heapq.merge(*([(score, m.decode()) for m, score in i] for i in indexes))
            txids = [txid for _, txid in merged][:limit]
            keys = [record_key(self._prefix, self._namespace, t) for t in txids]
            values = await mget(self._redis, keys)
            return [
                (t, None if v is None else LogEntry(v, v))
                for t, v in zip(txids, values, strict=True)
            ]

        return await self._backend.call(read, what="list unfinished transactions", retry=True)

    async def _indexes(self, end: int, *, legacy: bool) -> list[list[tuple[bytes, float]]]:
        pipe: Any = self._redis.pipeline(transaction=False)
        for number in range(BUCKETS):
            pipe.zrange(index_key(self._prefix, self._namespace, number), 0, end, withscores=True)
        if legacy:
            pipe.zrange(self._legacy_index, 0, -1, withscores=True)
        return list(await pipe.execute())

    async def page(
        self,
        states: Sequence[str],
        *,
        after: tuple[float, str] | None,
        limit: int,
        newest_first: bool,
    ) -> list[tuple[float, str, LogEntry | None]]:
        keys = page_keys(self._prefix, self._namespace, states)

        async def read() -> list[tuple[float, str, LogEntry | None]]:
            entries = await drive(past_cursor(keys, after, limit, newest_first), self._zranges)
            found = [record_key(self._prefix, self._namespace, t) for _, t in entries]
            values = await mget(self._redis, found)
            return [
                (created, txid, None if v is None else LogEntry(v, v))
                for (created, txid), v in zip(entries, values, strict=True)
            ]

        return await self._backend.call(read, what="list transactions", retry=True)

    async def _zranges(self, ranges: list[ZRange]) -> list[list[tuple[bytes, float]]]:
        """The replies of ``ranges``, in one pipeline."""
        pipe: Any = self._redis.pipeline(transaction=False)
        for zrange in ranges:
            zrange.queue(pipe)
        return list(await pipe.execute())

    async def _ensure_migrated(self, what: str) -> None:
        """As :meth:`.txlog.RedisTxLog._ensure_migrated`: once per client."""
        if self._migrated:
            return
        found: list[tuple[bytes, float]] = await self._backend.call(
            lambda: self._redis.zrange(self._legacy_index, 0, -1, withscores=True),
            what=f"{what} (first looking for records of the old layout)",
            retry=True,
        )
        if found:
            await self._backend.call(
                lambda: self._migrate_legacy(found),
                what=f"{what} (first moving records of the old layout)",
                retry=True,
            )
        self._migrated = True

    async def _migrate_legacy(self, found: list[tuple[bytes, float]]) -> None:
        """One ``MIGRATE`` script per record, as the sync log does (repeatable)."""
        for member, score in found:
            txid = member.decode()
            keys = [self._legacy_records + txid, self._legacy_index, *self._keys(txid)]
            await self._backend.replication.write(
                MIGRATE, keys, [txid, repr(score)], what=f"move transaction record {txid!r}"
            )

    async def now(self) -> float:
        """The server's clock (TIME), reread every few seconds, carried on the monotonic
        clock in between from when the reply arrived (so never ahead of the server)."""
        local = time.monotonic()
        if self._clock is not None and local - self._clock[1] < _CLOCK_REREAD:
            return self._clock[0] + (local - self._clock[1])
        seconds, micros = await self._backend.call(
            lambda: self._redis.time(), what="read the redis server clock", retry=True
        )
        self._clock = (seconds + micros / 1e6, time.monotonic())
        return self._clock[0]

    async def durability(self) -> str | None:
        return persistence.log_problem(await self._persistence())

    async def _on_every_node(self, method: str, *args: Any) -> dict[str, Any]:
        """:func:`.topology.on_every_node` on the async client: by node on a Cluster."""
        if isinstance(self._redis, RedisCluster):
            found = await getattr(self._redis, method)(*args, target_nodes=RedisCluster.ALL_NODES)
            return dict(found)
        return {"server": await getattr(self._redis, method)(*args)}

    async def _persistence(self) -> persistence.Persistence | str:
        """:func:`.persistence.read` on the async client (every node of a Cluster, whose
        replicas become primaries with their own settings; merged as the sync read)."""
        names = ("appendonly", "appendfsync", "maxmemory-policy")
        try:
            config = await self._backend.call(
                lambda: self._on_every_node("config_get", *names),
                what="read redis persistence settings",
                retry=True,
            )
        except BackendError as exc:
            refused = f"CONFIG GET refused: {exc}"
        else:
            return persistence.from_config(persistence._merged(config))

        async def info() -> dict[str, Any]:
            found = await self._on_every_node("info", "persistence")
            memory = await self._on_every_node("info", "memory")
            return persistence._merged({node: {**found[node], **memory[node]} for node in found})

        try:
            found = await self._backend.call(
                info, what="read redis persistence and memory info", retry=True
            )
        except BackendError as exc:
            return f"{refused}; INFO refused: {exc}"
        return persistence.from_info(found, refused)
