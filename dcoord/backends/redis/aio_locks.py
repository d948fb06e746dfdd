"""Async fenced locks on Redis through ``redis.asyncio``: the sync module's scripts and keys.

The same Lua scripts (:data:`.locks.ACQUIRE`, ``RELEASE``, ``EXTEND``, ``FENCE_ADMIT``)
run on the same keys (:class:`.locks.RedisLockSlot` names them), so a sync and an async
client exclude each other on one lock name. Redis errors become dcoord errors in one
place, :func:`dcoord.backends.redis.error_for`, shared with the sync backend.

Everything runs as tasks on the loop of the caller: one pub/sub connection per client
read by one task wakes the waiters (:class:`_Notifier`), and the undo of an acquire
whose reply was lost, or that was cancelled in flight, runs as a task too
(:meth:`AsyncRedisLocks.undo`). Topologies: a single server, Sentinel (through
``redis.asyncio.sentinel``, which follows the primary across failovers) and Cluster
(through ``redis.asyncio.cluster.RedisCluster``: the scripts run sharded, see
:meth:`.locks.LuaScript.sharded`, and the waiters are woken on shard channels, as the
sync backend's).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.sentinel
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException

from ... import metrics
from ...config import Settings
from ...errors import BackendUnavailable
from ...inspect import holder_suffix
from ..aio_base import AsyncLockSlot, with_retries_async
from ..base import LockGrant, Renewed, ServerInfo, key_segment
from . import error_for, is_transient, topology
from .aio_membership import AsyncRedisGroups
from .locks import (
    ACQUIRE,
    EXTEND,
    FAIR_ACQUIRE,
    FAIR_CANCEL,
    FAIR_RELEASE,
    FAIR_WAITER_TTL,
    FENCE_ADMIT,
    IDLE_UNSUBSCRIBE,
    NO_HINT_WAIT,
    ORPHAN_RETRY_FIRST,
    ORPHAN_RETRY_MAX,
    RELEASE,
    WAKING_MESSAGES,
    LuaScript,
    answered,
    extend_answers,
    extend_commands,
    fair_call,
    fair_keys,
    fair_token,
    fence_key,
    grant_channel,
    handed_ms,
    lock_keys,
    milliseconds,
    unloaded,
    waited_grant,
)
from .slots import require_one_slot

if TYPE_CHECKING:
    from .aio_election import AsyncRedisElections
    from .aio_kv import AsyncRedisKV
    from .aio_rwlock import AsyncRedisRWLocks
    from .aio_semaphore import AsyncRedisSemaphores
    from .aio_txlog import AsyncRedisTxLog, AsyncReplication

T = TypeVar("T")

log = logging.getLogger("dcoord.redis")


# Requests of one client in flight at once. redis-py's async connection pool (100
# connections; per node on a Cluster) raises MaxConnectionsError beyond its size instead
# of waiting: a thousand tasks of one client contending for locks would fail. Above this
# many, a request waits for one to finish (each is bounded by the request timeout).
MAX_IN_FLIGHT = 64

# Lock extends of one client go out in pipelines of at most EXTEND_BATCH scripts (about
# 16 KB, what Redis reads from a connection at once), at most EXTEND_SENDERS at a time.
EXTEND_BATCH = 128
EXTEND_SENDERS = 4

# What the async client's type is: redis.asyncio.Redis for a single server and for
# Sentinel's primary, RedisCluster for a Cluster (as :data:`.topology.Client`).
AsyncClient = redis.asyncio.Redis | RedisCluster


def make_async_client(settings: Settings) -> AsyncClient:
    """A ``redis.asyncio`` client for ``settings``, configured as the sync one
    (:func:`.topology.make_client`): redis-py's own retry off, connections on first use."""
    common: dict[str, Any] = {
        "username": settings.username,
        "password": settings.password,
        "socket_connect_timeout": settings.connect_timeout,
        "socket_timeout": settings.request_timeout,
        "retry": Retry(NoBackoff(), 0),
        "health_check_interval": 30,
        "client_name": f"dcoord:{settings.namespace}",
        **topology._tls(settings),
    }
    if settings.topology == "cluster":
        node: Any = ClusterNode  # untyped in redis-py
        return RedisCluster(startup_nodes=[node(h, p) for h, p in settings.hosts], **common)
    if settings.topology == "sentinel":
        sentinel_options = {
            key: common[key]
            for key in ("socket_connect_timeout", "socket_timeout", *topology._tls(settings))
        }
        sentinel_options["username"] = settings.options["sentinel_username"]
        sentinel_options["password"] = settings.options["sentinel_password"]
        sentinels: Any = redis.asyncio.sentinel.Sentinel  # untyped in redis-py
        sentinel = sentinels(list(settings.hosts), sentinel_kwargs=sentinel_options)
        primary: redis.asyncio.Redis = sentinel.master_for(
            settings.service, db=int(settings.database), **common
        )
        return primary
    ((host, port),) = settings.hosts
    return redis.asyncio.Redis(host=host, port=port, db=int(settings.database), **common)


async def keep_cancellation(awaitable: Awaitable[T]) -> T:
    """``await awaitable``, raising CancelledError if the task was cancelled meanwhile
    and the cancellation got lost below.

    redis-py wraps socket reads and writes in ``asyncio.wait_for``, which on Python 3.11
    returns the inner result when it completes in the same step as a cancel of the
    caller, dropping the cancellation (CPython gh-86296, fixed in 3.12). A cancelled
    ``acquire()`` would then wait on as if nothing happened. Only a cancel requested
    during this await counts: a task that is already cancelling (releasing on its way
    out of ``async with``) still completes its calls.
    """
    task = asyncio.current_task()
    requested = 0 if task is None else task.cancelling()
    result = await awaitable
    if task is not None and task.cancelling() > requested:
        raise asyncio.CancelledError
    return result


async def run_script(
    script: LuaScript, client: AsyncClient, keys: Sequence[str], args: Sequence[Any]
) -> Any:
    """:meth:`LuaScript.__call__` on an async client: EVALSHA, loading it on NOSCRIPT;
    sharded on a Cluster (its PUBLISH become SPUBLISH)."""
    run: Any = client.execute_command  # untyped in redis-py
    # RedisCluster's metaclass is typing's Protocol one, whose isinstance is slow: the
    # exact-type test first spares every request of a single server (and Sentinel) it.
    if type(client) is redis.asyncio.Redis:
        run = functools.partial(execute, client)
    elif isinstance(client, RedisCluster):
        script = script.sharded()
    try:
        return await run("EVALSHA", script.sha, len(keys), *keys, *args)
    except redis.exceptions.NoScriptError:
        # One command name: the Cluster client routes "SCRIPT LOAD" to every primary
        # (it cannot route "SCRIPT" "LOAD", which carries no key).
        await run("SCRIPT LOAD", script.source)
        return await run("EVALSHA", script.sha, len(keys), *keys, *args)


async def execute(client: redis.asyncio.Redis, *args: Any) -> Any:
    """``await client.execute_command(*args)`` on a single server or Sentinel primary,
    minus redis-py's per-command bookkeeping (observability hooks, its retry loop,
    which dcoord turns off anyway): the async twin of :func:`.locks._execute`, with its
    rules. A connection whose reply was not read (a timeout, a broken connection, a
    cancellation) is closed before the error goes on, never reused; an error reply
    leaves it in order. The reply is raw, as for EVALSHA it is anyway."""
    pool: Any = client.connection_pool  # untyped in redis-py
    connection = await pool.get_connection()
    try:
        await connection.send_command(*args)
        return await connection.read_response()
    except redis.ResponseError:
        raise
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    finally:
        await pool.release(connection)


class AsyncRedisBackend:
    """The async Redis backend: one ``redis.asyncio`` client, keys as the sync backend's."""

    kind = "redis"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.endpoint = topology.endpoint(settings)
        self.prefix = f"dcoord:{settings.namespace}:"
        self.redis = make_async_client(settings)
        self.locks = AsyncRedisLocks(self)
        self.groups = AsyncRedisGroups(self)
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._closed = False

    async def start(self) -> None:
        """Connect (retrying for up to ``connect_timeout``); closes itself on failure."""
        try:
            await self.call(
                self._server_info,
                what=f"connect to redis at {self.endpoint}",
                retry=True,
                timeout=self.settings.connect_timeout,
            )
        except BaseException:
            await self.close()
            raise

    async def _server_info(self) -> ServerInfo:
        info: Any = await self.redis.info("server")
        if isinstance(self.redis, RedisCluster):
            # The async Cluster client answers INFO by node: {node name: its INFO}.
            info = next(iter(info.values()), {}) if "redis_version" not in info else info
        version = str(info.get("redis_version", "unknown"))
        return ServerInfo(kind=self.kind, version=version, endpoint=self.endpoint)

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        what: str,
        retry: bool = False,
        timeout: float | None = None,
    ) -> T:
        """:meth:`RedisBackend.call` for coroutines: errors mapped once, retries only
        where ``retry`` says the operation is safe to repeat; at most MAX_IN_FLIGHT
        requests at once (retries wait their backoff outside that bound)."""

        # Every lock request passes here: the bound and keep_cancellation's check are
        # written inline rather than as wrapping coroutines (a frame each per request).
        task = asyncio.current_task()
        requested = 0 if task is None else task.cancelling()
        try:
            if retry:

                async def bounded() -> T:
                    async with self._in_flight:
                        return await fn()

                result = await with_retries_async(
                    bounded,
                    what=what,
                    transient=is_transient,
                    timeout=timeout or self.settings.request_timeout,
                )
            else:
                async with self._in_flight:
                    result = await fn()
        except redis.RedisError as exc:
            error = error_for(self.settings, what, exc)
            metrics.backend_error(self.settings, type(error))
            raise error from exc
        except BackendUnavailable as exc:
            if retry and isinstance(exc.__cause__, redis.RedisError):
                metrics.backend_error(self.settings, BackendUnavailable)
            raise
        if task is not None and task.cancelling() > requested:
            raise asyncio.CancelledError  # as keep_cancellation: a cancel lost below
        return result

    async def ping(self) -> ServerInfo:
        return await self.call(self._server_info, what=f"ping redis at {self.endpoint}", retry=True)

    @functools.cached_property
    def semaphores(self) -> AsyncRedisSemaphores:
        """Counting semaphores (the sync clients' keys and script)."""
        from .aio_semaphore import AsyncRedisSemaphores  # it imports this module

        return AsyncRedisSemaphores(self)

    @functools.cached_property
    def rwlocks(self) -> AsyncRedisRWLocks:
        """Read-write locks (the sync clients' keys and script)."""
        from .aio_rwlock import AsyncRedisRWLocks  # it imports this module

        return AsyncRedisRWLocks(self)

    @functools.cached_property
    def replication(self) -> AsyncReplication:
        """Forced writes (WAIT for ``min_replicas``) of the log and of KVParticipant."""
        from .aio_txlog import AsyncReplication  # it imports this module

        return AsyncReplication(self)

    @functools.cached_property
    def txlog(self) -> AsyncRedisTxLog:
        """The 2PC log (the sync clients' log: same keys and scripts)."""
        from .aio_txlog import AsyncRedisTxLog  # it imports this module

        return AsyncRedisTxLog(self)

    @functools.cached_property
    def elections(self) -> AsyncRedisElections:
        """Leader elections (the sync clients' keys and script)."""
        from .aio_election import AsyncRedisElections  # it imports this module

        return AsyncRedisElections(self)

    @functools.cached_property
    def kv_store(self) -> AsyncRedisKV:
        """Plain keys (the sync clients' keys)."""
        from .aio_kv import AsyncRedisKV  # it imports this module

        return AsyncRedisKV(self)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.gather(self.locks.close(), self.groups.close())
        finally:
            await self.redis.aclose()


class AsyncRedisLocks:
    """The async lock store of one Redis backend."""

    def __init__(self, backend: AsyncRedisBackend) -> None:
        self.backend = backend
        self.redis = backend.redis
        self.prefix = backend.prefix
        self.skew_margin_us = round(float(backend.settings.options["fence_skew_margin"]) * 1e6)
        self.holder = holder_suffix(backend.settings.options["label"])
        self.cluster = isinstance(backend.redis, RedisCluster)
        self.notifier = _Notifier(backend.redis)
        self.tag = secrets.token_hex(4)  # names this client's grants channels (as sync)
        self._cleanups: set[asyncio.Task[None]] = set()
        # On a Cluster a pipeline to several nodes would wait for the slowest: an
        # extend() goes alone there, and renewals go in one batch per primary (the
        # node that serves the lock's slot, by name, as the sync store's renewals_for).
        self.extends = None if self.cluster else _Extends(self)
        self._node_extends: dict[str, _NodeExtends] = {}

    def renewals_for(self, slot: AsyncRedisLockSlot) -> _Extends | _NodeExtends | None:
        """The renewal batch of ``slot``: on a Cluster that of the primary that serves
        its slot in redis-py's slot map now (None, renewed alone, while no node does)."""
        if self.extends is not None:
            return self.extends
        cluster: Any = self.redis  # RedisCluster, untyped in redis-py
        # The slot map by the key's cached hash slot: get_node_from_key would hash the
        # key again at each renewal (CRC16 in Python, 30,000 times a second at scale).
        nodes = cluster.nodes_manager.slots_cache.get(slot.keyslot)
        if not nodes:  # no node for the slot (mid-failover)
            return None
        name: str = nodes[0].name
        batch = self._node_extends.get(name)
        if batch is None:
            batch = self._node_extends[name] = _NodeExtends(self, name)
        return batch

    def slot(
        self, name: str, ttl: float, auto_renew: bool, fair: bool = False
    ) -> AsyncRedisLockSlot:
        return AsyncRedisLockSlot(self, name, ttl, fair, auto_renew)

    def _fence_key(self, resource: str) -> str:
        return fence_key(self.prefix, resource)

    async def admit(self, resource: str, token: int) -> bool:
        key = self._fence_key(resource)
        # Re-admitting the same token is harmless, so a retry after a lost reply is safe.
        return bool(
            await self.backend.call(
                lambda: run_script(FENCE_ADMIT, self.redis, [key], [str(token)]),
                what=f"admit fence {token} for {resource!r}",
                retry=True,
            )
        )

    async def write(self, resource: str, token: int, key: str, value: bytes) -> bool:
        keys = [self._fence_key(resource), f"{self.prefix}kv:{key}"]
        if self.cluster:
            require_one_slot(
                keys,
                f"fenced write of {key!r} for {resource!r} (tag the key "
                f"'{{{key_segment(resource)}}}...' to put it in the fence's slot)",
            )
        # Never retried: see RedisLocks.write (a retry could deny a write that happened).
        return bool(
            await self.backend.call(
                lambda: run_script(FENCE_ADMIT, self.redis, keys, [str(token), value]),
                what=f"fenced write of {key!r} with fence {token} for {resource!r}",
            )
        )

    async def highest(self, resource: str) -> int | None:
        key = self._fence_key(resource)
        value = await self.backend.call(
            lambda: self.redis.get(key), what=f"read fence of {resource!r}", retry=True
        )
        return None if value is None else int(value)

    def undo(self, step: Callable[[], Awaitable[Any]], what: str, sure_after: float) -> None:
        """Undo, in a task, a grant whose reply was lost or that was cancelled in flight
        (a lock's acquire, an election's campaign): it may have run, or may still run
        (see :class:`.locks._OrphanCleanup`). ``step`` deletes it if its token holds it
        (truthy then); it is repeated until it does, or ``sure_after`` (the grant, had it
        run, has expired by then)."""
        task = asyncio.get_running_loop().create_task(self._undo(step, what, sure_after))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _undo(self, step: Callable[[], Awaitable[Any]], what: str, sure_after: float) -> None:
        delay = ORPHAN_RETRY_FIRST
        while True:
            started = time.monotonic()
            try:
                deleted = await self.backend.call(step, what=what)
            except BackendUnavailable as exc:
                log.info("%s; retrying", exc)
            except Exception as exc:  # refused (permissions, ...): retrying cannot help
                log.warning("%r; the grant, if the acquire ran, expires by its TTL", exc)
                return
            else:
                if deleted or started >= sure_after:
                    return
            await asyncio.sleep(delay)
            delay = min(ORPHAN_RETRY_MAX, delay * 2)

    async def close(self) -> None:
        """Cancel the undo tasks (the TTL covers them) and the notifier."""
        for task in list(self._cleanups):
            task.cancel()
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        if self.extends is not None:
            await self.extends.close()
        await self.notifier.close()


class _Extends:
    """The extends of one client's locks, many per round trip (group commit).

    An extend joins the queue; up to EXTEND_SENDERS sender tasks each send what is
    queued (at most EXTEND_BATCH) in one pipeline, and while they are all in flight the
    next extends queue for the one that comes back first. Each extend is still its own
    owner-checked EXTEND script with its own answer (an error reply fails only its
    lock), and a pipeline takes one of the backend's MAX_IN_FLIGHT requests, not one per
    lock. Unloaded, an extend finds a sender free and goes alone, as before.

    It is also the slots' :class:`~dcoord.backends.aio_base.AsyncRenewalBatch`: the
    client's renewal scheduler (:mod:`dcoord.aio.renewals`) sends the locks due
    together as one pipeline of :meth:`extend_many`, with no queue, task or future per
    lock.
    """

    def __init__(self, locks: AsyncRedisLocks) -> None:
        self._locks = locks
        self._queue: collections.deque[_Extend] = collections.deque()
        self._senders: set[asyncio.Task[None]] = set()

    async def extend(self, slot: AsyncRedisLockSlot, token: str, ms: int) -> Any:
        """The EXTEND script's reply for ``slot`` (raises its error reply, mapped, or
        the pipeline's error)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        command = ("EVALSHA", EXTEND.sha, 1, slot.key, token, ms)
        self._queue.append(_Extend(command, f"extend lock {slot.name!r}", future))
        if len(self._senders) < EXTEND_SENDERS:
            sender = loop.create_task(self._send(), name="dcoord redis lock extends")
            self._senders.add(sender)
        return await future

    async def extend_many(self, requests: Sequence[tuple[AsyncLockSlot, float]]) -> list[Renewed]:
        """Each ``slot.extend(ttl)`` of ``requests`` in one pipeline of EXTEND scripts,
        each compare-and-act on its own token and answered on its own (None: that
        slot's grant is gone; an error reply: that lock's error)."""
        commands, sent_for, packed = _extend_commands(requests, EXTEND.sha)
        if not commands:
            return [None] * len(requests)
        backend = self._locks.backend
        sent = time.monotonic()
        replies = await backend.call(
            lambda: self._run_packed(commands, packed),
            what=f"extend {len(commands)} locks in one pipeline",
        )
        error = functools.partial(error_for, backend.settings)
        return extend_answers(requests, sent_for, replies, sent, error)[0]

    async def _send(self) -> None:
        try:
            while self._queue:
                batch: list[_Extend] = []
                while self._queue and len(batch) < EXTEND_BATCH:
                    entry = self._queue.popleft()
                    if not entry.future.done():  # else cancelled: a released lock
                        batch.append(entry)
                if batch:
                    await self._send_batch(batch)
        finally:
            # Out of the set now, not in a done-callback a loop step later: an extend
            # queued meanwhile would find every sender busy and start none.
            self._senders.discard(asyncio.current_task())  # type: ignore[arg-type,unused-ignore]
            if not self._senders:
                for entry in self._queue:  # the last sender was cancelled (closing)
                    entry.future.cancel()
                self._queue.clear()

    async def _send_batch(self, batch: list[_Extend]) -> None:
        try:
            replies = await self._locks.backend.call(
                lambda: self._pipeline([entry.command for entry in batch]),
                what=f"extend {len(batch)} locks in one pipeline",
            )
        except asyncio.CancelledError:
            for entry in batch:
                entry.future.cancel()
            raise
        except Exception as exc:  # the round trip failed: each extend of it failed alike
            for entry in batch:
                if not entry.future.done():
                    entry.future.set_exception(exc)
            return
        settings = self._locks.backend.settings
        for entry, reply in zip(batch, replies, strict=True):
            if entry.future.done():
                continue
            if isinstance(reply, redis.RedisError):
                entry.future.set_exception(error_for(settings, entry.what, reply))
            else:
                entry.future.set_result(reply)

    async def _pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """The replies of ``commands`` sent in one pipeline, an error reply in its place;
        the script is loaded and its commands sent again if the server lacked it."""
        replies = await self._run(commands)
        again = unloaded(replies)
        if again:
            run: Any = self._locks.redis.execute_command  # untyped in redis-py
            await run("SCRIPT LOAD", EXTEND.source)
            retried = await self._run([commands[i] for i in again])
            for i, reply in zip(again, retried, strict=True):
                replies[i] = reply
        return replies

    async def _run_packed(self, commands: list[tuple[Any, ...]], packed: list[bytes]) -> list[Any]:
        """:meth:`_pipeline` of ``commands`` packed already (``packed``): one write on a
        connection of the pool, and one timeout for all the replies. redis-py's pipeline
        packs each command again and starts a timer per reply: half of a renewal's
        CPU, which at 30,000 renewals/s is what a client runs out of."""
        client: Any = self._locks.redis  # untyped in redis-py
        pool = client.connection_pool
        connection = await pool.get_connection()
        try:
            replies = await _exchange(connection, packed, self._locks.backend.settings)
        finally:
            await pool.release(connection)
        again = unloaded(replies)
        if again:  # a restarted or failed-over server: load the script, send those again
            retried = await self._pipeline([commands[i] for i in again])
            for i, reply in zip(again, retried, strict=True):
                replies[i] = reply
        return replies

    async def _run(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipeline: Any = self._locks.redis.pipeline(transaction=False)  # untyped in redis-py
        for command in commands:
            pipeline.execute_command(*command)
        return list(await pipeline.execute(raise_on_error=False))

    async def close(self) -> None:
        senders = list(self._senders)
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)


class _NodeExtends:
    """The renewals of the locks one Redis Cluster primary serves, many per round trip
    (an :class:`~dcoord.backends.aio_base.AsyncRenewalBatch`; the async twin of
    :class:`.locks._Renewals` on a Cluster, with its rules): one pipeline of EXTEND
    scripts on a connection of that node (``node``: its name in redis-py's slot map,
    which :meth:`AsyncRedisLocks.renewals_for` asks), each its own answer. A lock whose
    slot has moved since gets MOVED or ASK in its place and is renewed alone through
    the cluster client, which follows the redirection; NOSCRIPT loads the script on the
    node and sends those again; a node that cannot be reached fails the batch (each
    lock retries until its deadline) after the slot map is read again, so the retries
    go to the replica that took over.
    """

    def __init__(self, locks: AsyncRedisLocks, node: str) -> None:
        self._locks = locks
        self._node = node
        self._script = EXTEND.sharded()

    async def extend_many(self, requests: Sequence[tuple[AsyncLockSlot, float]]) -> list[Renewed]:
        """Each ``slot.extend(ttl)`` of ``requests`` in one pipeline to this node."""
        commands, sent_for, packed = _extend_commands(requests, self._script.sha)
        if not commands:
            return [None] * len(requests)
        backend = self._locks.backend
        sent = time.monotonic()
        replies = await backend.call(
            lambda: self._send(packed),
            what=f"extend {len(commands)} locks in one pipeline to node {self._node}",
        )
        error = functools.partial(error_for, backend.settings)
        answers, moved = extend_answers(requests, sent_for, replies, sent, error)
        if moved:
            reply_of = dict(zip(sent_for, replies, strict=True))
            packed_of = dict(zip(sent_for, packed, strict=True))
            alone = [
                self._extend_asked(requests[i], packed_of[i], reply_of[i])
                if type(reply_of[i]) is redis.exceptions.AskError  # not MOVED, its subclass
                else _extend_alone(requests[i][0], requests[i][1])
                for i in moved
            ]
            for i, answer in zip(moved, await asyncio.gather(*alone), strict=True):
                answers[i] = answer
        return answers

    async def _extend_asked(
        self, request: tuple[AsyncLockSlot, float], packed: bytes, ask: redis.exceptions.AskError
    ) -> Renewed:
        """The extend of a lock whose key was moved to ``ask``'s node while its slot
        migrates: ASKING and the script in one write on one connection of that node.
        (redis.asyncio's cluster client sends ASKING and the command as two pooled
        commands; with more than one free connection to the node they go on different
        connections, the importing node answers MOVED back to the migrating one, and
        the command fails with "TTL exhausted" after 16 rounds: a lock lost to a
        resharding, which the Cluster batching test caught.)"""
        slot, ttl = request
        try:
            node = self._locks.redis.get_node(host=ask.host, port=ask.port)  # type: ignore[union-attr]
            if node is None:  # not in the map yet: redis-py's own path finds it
                return await _extend_alone(slot, ttl)
            backend = self._locks.backend
            sent = time.monotonic()
            asking = resp_command(["ASKING"])
            replies = await self._on_node(node, [asking, packed])
            if unloaded(replies[1:]):
                await node.execute_command("SCRIPT", "LOAD", self._script.source)
                replies = await self._on_node(node, [asking, packed])
            error = functools.partial(error_for, backend.settings)
            answers, moved = extend_answers([request], [0], replies[1:], sent, error)
            return await _extend_alone(slot, ttl) if moved else answers[0]
        except Exception as exc:  # that lock's alone: retried or lost at its deadline
            return exc

    async def _send(self, packed: list[bytes]) -> list[Any]:
        """The replies of ``packed`` sent in one write to this node (an error reply in
        its command's place), the script loaded there and those commands sent again
        if the node lacked it."""
        cluster: Any = self._locks.redis  # RedisCluster, untyped in redis-py
        node = cluster.get_node(node_name=self._node)
        if node is None:  # gone from the map: the next renewals join another batch
            raise redis.ConnectionError(f"node {self._node} left the Cluster's slot map")
        try:
            replies = await self._on_node(node, packed)
            again = unloaded(replies)
            if again:
                await node.execute_command("SCRIPT", "LOAD", self._script.source)
                resent = await self._on_node(node, [packed[i] for i in again])
                for i, reply in zip(again, resent, strict=True):
                    replies[i] = reply
        except redis.exceptions.MaxConnectionsError:  # the node is fine: the pool is full
            raise
        except (redis.ConnectionError, redis.TimeoutError):
            await self._refresh_slot_map()
            raise
        return replies

    async def _on_node(self, node: Any, packed: list[bytes]) -> list[Any]:
        connection = node.acquire_connection()
        try:
            await node.disconnect_if_needed(connection)  # marked by a topology change
            return await _exchange(connection, packed, self._locks.backend.settings)
        finally:
            node.release(connection)

    async def _refresh_slot_map(self) -> None:
        """Have redis-py re-read the Cluster's slot map, as its own command path does
        when a node's connection breaks: after a failover the replica that took over
        this node's slots serves them, and the retries must go there."""
        cluster: Any = self._locks.redis
        try:
            await cluster.nodes_manager.initialize(last_failed_node_name=self._node)
        except (redis.RedisError, RedisClusterException) as exc:  # the retries try again
            log.info("re-reading the slot map after node %s failed: %s", self._node, exc)


def _extend_commands(
    requests: Sequence[tuple[AsyncLockSlot, float]], sha: str
) -> tuple[list[tuple[Any, ...]], list[int], list[bytes]]:
    """:func:`.locks.extend_commands` of async slots, and each command packed."""
    assert all(isinstance(slot, AsyncRedisLockSlot) for slot, _ in requests)  # ours only
    commands, sent_for = extend_commands(requests, sha)
    slots: Sequence[tuple[Any, float]] = requests  # AsyncRedisLockSlot, asserted above
    packed = [slots[i][0].packed(command) for i, command in zip(sent_for, commands, strict=True)]
    return commands, sent_for, packed


async def _extend_alone(slot: AsyncLockSlot, ttl: float) -> Renewed:
    """``await slot.extend(ttl)`` as an answer of a batch: its error in its place."""
    try:
        return await slot.extend(ttl)
    except Exception as exc:
        return exc


async def _exchange(connection: Any, packed: list[bytes], settings: Settings) -> list[Any]:
    """Send ``packed`` commands in one write on ``connection`` and read a reply each (an
    error reply in its command's place) under one request timeout for all (see
    :meth:`_Extends._run_packed`). A connection whose replies were not all read is
    closed, never reused."""
    replies: list[Any] = []
    try:
        async with asyncio.timeout(settings.request_timeout):
            await connection.send_packed_command(packed)
            for _ in packed:
                try:
                    # inf: no timer of its own per reply (the one above covers all).
                    replies.append(await connection.read_response(timeout=math.inf))
                except redis.ResponseError as exc:  # that command's error reply
                    replies.append(exc)
    except TimeoutError as exc:
        # Replies may still come: this connection is of no use for another request.
        await connection.disconnect(nowait=True)
        raise redis.TimeoutError(f"no reply within the request timeout: {exc}") from exc
    except BaseException:
        await connection.disconnect(nowait=True)
        raise
    return replies


def resp_command(args: Sequence[str | int]) -> bytes:
    """A command of str and int arguments as RESP bytes (what redis-py's pack_command
    sends for them with the default utf-8 encoding)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


@dataclass(frozen=True)
class _Extend:
    """One queued extend of :class:`_Extends`: its command, what it is (for its error)
    and the future its caller awaits."""

    command: tuple[Any, ...]
    what: str
    future: asyncio.Future[Any]


class AsyncRedisLockSlot:
    """One async handle's token on one lock (keys as :class:`.locks.RedisLockSlot`)."""

    def __init__(
        self,
        locks: AsyncRedisLocks,
        name: str,
        ttl: float,
        fair: bool = False,
        auto_renew: bool = True,
    ) -> None:
        self._locks = locks
        self._call = locks.backend.call
        self._redis = locks.redis
        self.name = name
        self.key, self.fence_key, self.channel = lock_keys(locks.prefix, name)
        # The key's Cluster hash slot, once: its renewals' batch is that slot's node's.
        cluster: Any = locks.redis  # RedisCluster if locks.cluster, untyped in redis-py
        self.keyslot: int = cluster.keyslot(self.key) if locks.cluster else 0
        self.ttl = ttl
        self._token: str | None = None
        self._fence = 0
        self._packed: tuple[tuple[Any, ...], bytes] | None = None  # see packed()
        # A fair lock: the sync slot's scripts, keys and queue (see .locks.RedisLockSlot),
        # so sync and async fair waiters of one lock queue together.
        self.fair = fair
        waiter_ttl = min(FAIR_WAITER_TTL, ttl)
        self._waiter_ms = milliseconds(waiter_ttl)
        self._handed_ms = handed_ms(fair, auto_renew, self._waiter_ms)
        # A fair waiter calls again within a third of its entry's life.
        self._max_wait = waiter_ttl / 3 if fair else math.inf
        self._keys = [self.key, self.fence_key, *(fair_keys(self.key) if fair else ())]

        # Made once per handle rather than once per request (the acquire hot path).
        self._ttl_ms = milliseconds(ttl)
        self._acquiring = f"acquire lock {name!r}"
        self._releasing = f"release lock {name!r}"

    async def undo(self, token: str) -> Any:
        """Let go of ``token``'s grant (and, fair, its place in the queue); 1 if it held
        the lock."""
        if self.fair:
            args = [token, self.channel, self._locks.skew_margin_us]
            return await run_script(FAIR_CANCEL, self._redis, self._keys, args)
        return await run_script(RELEASE, self._redis, [self.key], [token, self.channel])

    async def acquire(self, deadline: float | None) -> LockGrant | None:
        # A new token per grant (a fair one says how long a grant handed to it lasts).
        if self._handed_ms:
            token = fair_token(self._handed_ms, self._locks.tag, self._locks.holder)
        else:
            token = secrets.token_hex(16) + self._locks.holder
        # A single attempt (deadline already past) never queues: nothing to leave after.
        once = deadline is not None and time.monotonic() >= deadline
        result, sent = await (self._try(token, queue=False) if once else self._try(token))
        if result <= 0 and deadline is not None and time.monotonic() >= deadline:
            if self.fair and not once:
                await self._leave(token)
            return None
        if result <= 0:
            try:
                result, expires_at = await self._wait(token, deadline, sent)
            except BaseException:
                if self.fair:
                    # Cancelled (or failed) while queued: leave the queue. A try in
                    # flight undoes itself (see _try), so one run of the undo is enough:
                    # it counts as sent a TTL ago.
                    self._locks.undo(
                        lambda: self.undo(token),
                        f"leave the queue of lock {self.name!r}",
                        time.monotonic(),
                    )
                raise
            if result <= 0:
                if self.fair:
                    await self._leave(token)
                return None
        else:
            expires_at = sent + self.ttl
        self._token, self._fence = token, result
        return LockGrant(result, expires_at)

    async def _leave(self, token: str) -> None:
        """Take a fair waiter that timed out out of the queue; if that fails, the undo
        task keeps trying (its entry would expire anyway)."""
        sent = time.monotonic()
        try:
            await self._call(
                lambda: self.undo(token), what=f"leave the queue of lock {self.name!r}"
            )
        except BackendUnavailable as exc:
            log.info("%s; retrying in the background", exc)
            self._locks.undo(
                lambda: self.undo(token), f"leave the queue of lock {self.name!r}", sent + self.ttl
            )

    async def _try(self, token: str, queue: bool = True) -> tuple[int, float]:
        sent = time.monotonic()
        args: list[Any] = [token, self._ttl_ms, self._locks.skew_margin_us]
        script = ACQUIRE
        if self.fair:
            script = FAIR_ACQUIRE
            args += [self.channel, self._waiter_ms if queue else 0]
        try:
            result = await self._call(
                lambda: run_script(script, self._redis, self._keys, args),
                what=self._acquiring,
            )
        except BaseException as exc:
            # Not an error reply (a lost reply, or a cancellation while the script was
            # in flight): it may have run or run yet. Undo it rather than leave a grant.
            if not answered(exc):
                self._locks.undo(
                    lambda: self.undo(token),
                    f"undo the acquire of lock {self.name!r} whose reply was lost",
                    sent + self.ttl,
                )
            raise
        return int(result), sent

    async def _wait(self, token: str, deadline: float | None, queued: float) -> tuple[int, float]:
        """Wait for the lock after the try sent at ``queued`` found it taken: its fence
        (0: not by ``deadline``) and the grant's deadline (:func:`.locks.waited_grant`)."""
        # A fair waiter sleeps until granted or called by name (or a wake-up for all).
        called = token.encode() if self.fair else None
        grants = grant_channel(self.channel, self._locks.tag) if self._handed_ms else None
        async with self._locks.notifier.interest(self.channel, called, grants=grants) as channel:
            while True:
                # Park before trying: a release published after the try then wakes
                # us (or a waiter before us), so the wait below cannot miss it.
                woken = channel.park(called)
                try:
                    result, sent = await self._try(token)
                except BaseException:
                    channel.leave(woken, called)
                    raise
                if result > 0:
                    woken.cancel()  # a wake-up got meanwhile was for this grant
                    return result, waited_grant(sent, self.ttl, queued, self._handed_ms)
                queued = sent
                # Handed the lock by a release that ran after this try queued us?
                fence = channel.handed.pop(called, 0) if called is not None else 0
                if fence:
                    woken.cancel()
                    return fence, queued + self._handed_ms / 1000
                hint = min(-result / 1000 + 0.001 if result < 0 else NO_HINT_WAIT, self._max_wait)
                now = time.monotonic()
                if deadline is not None:
                    if now >= deadline:
                        channel.leave(woken, called)
                        return 0, sent
                    hint = min(hint, deadline - now)
                try:
                    # Cancels ``woken`` on timeout. keep_cancellation: Python 3.11's
                    # wait_for drops a cancel that comes in the step that wakes us (a
                    # handed grant would then be taken by a cancelled acquire).
                    await keep_cancellation(asyncio.wait_for(woken, hint))
                except TimeoutError:
                    pass
                except BaseException:
                    channel.leave(woken, called)
                    raise
                fence = channel.handed.pop(called, 0) if called is not None else 0
                if fence:
                    return fence, queued + self._handed_ms / 1000

    async def release(self) -> bool:
        token, self._token = self._token, None
        if token is None:
            return False
        reply_lost = False

        async def release() -> Any:
            nonlocal reply_lost
            try:
                if self.fair:
                    args = [token, self.channel, self._locks.skew_margin_us]
                    return await run_script(FAIR_RELEASE, self._redis, self._keys, args)
                return await run_script(RELEASE, self._redis, [self.key], [token, self.channel])
            except BaseException as exc:
                reply_lost = reply_lost or not answered(exc)
                raise

        what = self._releasing
        released = await self._call(release, what=what, retry=True)
        if not released and reply_lost:
            raise BackendUnavailable(
                f"{what}: the outcome is unknown: an attempt's reply was lost and the retry "
                "found the lock gone (released by that attempt, or lost before it)"
            )
        return bool(released)

    def packed(self, command: tuple[Any, ...]) -> bytes:
        """``command`` in the protocol's bytes, made once per grant and TTL (a renewal
        sends the same EXTEND each time)."""
        if self._packed is None or self._packed[0] != command:
            self._packed = (command, resp_command(command))
        return self._packed[1]

    def renewal_batch(self) -> _Extends | _NodeExtends | None:
        """The batch this slot's renewals join (on a Cluster: its slot's primary's)."""
        return self._locks.renewals_for(self)

    async def extend(self, ttl: float) -> LockGrant | None:
        token = self._token
        if token is None:
            return None
        sent = time.monotonic()
        ms = milliseconds(ttl)
        extends = self._locks.extends
        if extends is not None:  # with the other locks' extends queued meanwhile
            extended = await extends.extend(self, token, ms)
        else:
            extended = await self._call(
                lambda: run_script(EXTEND, self._redis, [self.key], [token, ms]),
                what=f"extend lock {self.name!r}",
            )
        return LockGrant(self._fence, sent + ttl) if extended else None


class _Channel:
    """Waiters of one lock in this client, parked in FIFO order.

    A release wakes one of them (:meth:`wake_one`): only one can take the lock, and
    waking all of them made every one but the winner run the acquire script again for
    nothing (about as many scripts per grant as waiters). A waiter woken that leaves
    without trying again passes the wake-up on (:meth:`leave`). A subscription
    confirmation or a reconnect, after which a release may have gone unseen, wakes all.
    Fair waiters park by token instead: the server's queue decides whose turn it is and
    grants or calls that waiter by name (:meth:`call`); ``handed`` keeps the fence of
    each one handed the lock.
    """

    __slots__ = (
        "broadcast",
        "called",
        "handed",
        "idle_since",
        "name",
        "parked",
        "subscribed",
        "waiters",
    )

    def __init__(self, name: bytes) -> None:
        self.name = name
        self.subscribed: set[bytes] = set()  # its names (the lock's, a grants channel)
        self.parked: collections.deque[asyncio.Future[None]] = collections.deque()
        self.called: dict[bytes, asyncio.Future[None]] = {}  # fair waiters by token
        self.handed: dict[bytes, int] = {}
        self.waiters = 0
        self.idle_since = 0.0
        # An election's channel: every message wakes every waiter (watchers all need
        # it, and a resignation must reach the candidates past any watcher).
        self.broadcast = False

    def park(self, token: bytes | None = None) -> asyncio.Future[None]:
        """A wake-up for one waiter, queued behind the others' (a fair waiter's, by
        its ``token``)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if token is not None:
            self.called[token] = future
            return future
        while self.parked and self.parked[0].done():  # left by timed-out waits
            self.parked.popleft()
        self.parked.append(future)
        return future

    def call(self, token: bytes, fence: int) -> None:
        """The fair waiter of ``token`` (if it waits in this client) was handed the lock
        with ``fence``, or (0) may take it."""
        future = self.called.get(token)
        if future is not None:
            if fence:
                self.handed[token] = fence
            if not future.done():
                future.set_result(None)

    def wake_one(self) -> None:
        while self.parked:
            future = self.parked.popleft()
            if not future.done():
                future.set_result(None)
                return

    def wake_all(self) -> None:
        parked, self.parked = self.parked, collections.deque()
        for future in (*parked, *self.called.values()):
            if not future.done():
                future.set_result(None)

    def leave(self, woken: asyncio.Future[None], token: bytes | None = None) -> None:
        """The waiter of ``woken`` stops waiting without another try: a wake-up it got
        goes to the next waiter. (A fair one's, ``token``, passes nothing on: leaving
        the server's queue calls the next in line there.)"""
        if token is None and woken.done() and not woken.cancelled():
            self.wake_one()
        else:
            woken.cancel()


class _Notifier:
    """One pub/sub connection per client, read by one task, shared by every waiter.

    As the sync :class:`.locks._Notifier`: a release message, a subscription
    confirmation and a reconnect each wake the channel's waiters; a channel nobody waits
    on is unsubscribed after IDLE_UNSUBSCRIBE seconds. On a Cluster the channels are
    shard channels (SSUBSCRIBE) through redis-py's async cluster pub/sub, which keeps a
    connection per primary serving a subscribed channel and moves the subscriptions
    after a failover; each of those connections is read by a task of its own, so a
    message never waits behind another node's read timeout.
    """

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._channels: dict[bytes, _Channel] = {}
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        # Held from a channel's creation (or removal) until its SUBSCRIBE (UNSUBSCRIBE)
        # is sent, so a prune never unsubscribes a channel a new waiter just subscribed.
        self._send = asyncio.Lock()
        self._sharded = isinstance(client, RedisCluster)
        self._subscribe, self._unsubscribe = (
            ("ssubscribe", "sunsubscribe") if self._sharded else ("subscribe", "unsubscribe")
        )
        # Cluster only: a reader task per node name, and what wakes the supervisor
        # when a subscription may have added a node.
        self._node_readers: dict[str, asyncio.Task[None]] = {}
        self._nodes_changed = asyncio.Event()

    @contextlib.asynccontextmanager
    async def interest(
        self,
        channel_name: str,
        token: bytes | None = None,
        *,
        grants: str | None = None,
        broadcast: bool = False,
    ) -> AsyncIterator[_Channel]:
        """Register a waiter on ``channel_name`` (subscribing if it is new); a fair
        waiter gives its ``token``, by which a release calls it, and its client's
        ``grants`` channel (:func:`.locks.grant_channel`), whose messages reach the same
        waiters; with ``broadcast`` every message on the channel wakes all its waiters,
        not one."""
        key = channel_name.encode()
        async with self._send:
            channel = self._channels.get(key)
            if channel is None:
                channel = self._channels[key] = _Channel(key)
            # Both names lead to one _Channel, so they are idle (and pruned) together.
            names = [key] if grants is None else [key, grants.encode()]
            new = [name for name in names if name not in channel.subscribed]
            for name in new:
                self._channels[name] = channel
            channel.subscribed.update(new)
            channel.waiters += 1
            channel.broadcast = channel.broadcast or broadcast
        try:
            if self._reader is None and not self._closed:
                self._pubsub = self._client.pubsub()
                self._reader = asyncio.get_running_loop().create_task(
                    self._supervise() if self._sharded else self._run_single(),
                    name="dcoord redis lock notifier",
                )
            if new:
                async with self._send:
                    await self._command(self._subscribe, *new)
                self._nodes_changed.set()
            yield channel
        finally:
            channel.waiters -= 1
            channel.idle_since = time.monotonic()
            if token is not None:
                channel.called.pop(token, None)
                channel.handed.pop(token, None)

    async def _command(self, command: str, *channels: bytes) -> None:
        if self._pubsub is None or self._closed:
            return
        try:
            await keep_cancellation(getattr(self._pubsub, command)(*channels))
        except (redis.RedisError, OSError) as exc:
            # Waiters still wake by their TTL hint; the reader reconnects.
            log.info("lock notifier: %s failed: %s", command, exc)

    async def _run_single(self) -> None:
        last_prune = time.monotonic()

        async def read() -> Any:
            nonlocal last_prune
            now = time.monotonic()
            if now - last_prune >= 1.0:
                last_prune = now
                await self._prune(now)
            if not self._pubsub.subscribed:
                await asyncio.sleep(0.05)  # nothing to read before the first SUBSCRIBE
                return None
            return await self._pubsub.get_message(timeout=1.0)

        await self._read(read, lambda: True)

    async def _supervise(self) -> None:
        """Cluster: start a reader per node connection of the cluster pub/sub (new ones
        appear when a channel of another node is subscribed, or when redis-py moves the
        subscriptions after a failover), and unsubscribe idle channels."""
        loop = asyncio.get_running_loop()
        cluster: Any = self._client
        try:
            while not self._closed:
                for name in list(self._pubsub.node_pubsub_mapping):
                    reader = self._node_readers.get(name)
                    if (reader is None or reader.done()) and cluster.get_node(node_name=name):
                        self._node_readers[name] = loop.create_task(
                            self._run_node(name), name=f"dcoord redis lock notifier {name}"
                        )
                await self._prune(time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._nodes_changed.wait(), 1.0)
                self._nodes_changed.clear()
        finally:
            for reader in self._node_readers.values():
                reader.cancel()
            await asyncio.gather(*self._node_readers.values(), return_exceptions=True)

    async def _run_node(self, name: str) -> None:
        cluster: Any = self._client
        pubsub = self._pubsub

        async def read() -> Any:
            node = cluster.get_node(node_name=name)
            if node is None:  # without a target it would read every node's connection
                return None
            return await pubsub.get_sharded_message(timeout=1.0, target_node=node)

        # A node that left the cluster's map, or whose connection redis-py dropped
        # (no channel left on it), needs no reader.
        await self._read(
            read,
            lambda: (
                name in pubsub.node_pubsub_mapping and cluster.get_node(node_name=name) is not None
            ),
        )

    async def _read(self, read: Callable[[], Awaitable[Any]], wanted: Callable[[], bool]) -> None:
        """Deliver what ``read`` returns to the waiters until close (or not ``wanted``)."""
        backoff = 0.05
        while not self._closed and wanted():
            try:
                message = await read()
                backoff = 0.05
            except Exception as exc:  # the connection broke
                # Messages may have been lost: every waiter re-tries now.
                for channel in self._channels.values():
                    channel.wake_all()
                log.info("lock notifier reconnecting after: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(1.0, backoff * 2)
                continue
            if message is not None and message["type"] in WAKING_MESSAGES:
                woken = self._channels.get(message["channel"])
                data = message["data"]
                call = fair_call(data) if isinstance(data, bytes) else None
                if woken is None:
                    pass
                elif call is not None:
                    woken.call(*call)  # one fair waiter's turn
                elif message["type"] in ("message", "smessage") and not woken.broadcast:
                    woken.wake_one()  # a release: one waiter can take the lock
                else:  # (re)subscribed (a release may have gone unseen), or an election
                    woken.wake_all()

    async def _prune(self, now: float) -> None:
        async with self._send:
            idle = [
                name
                for name, channel in self._channels.items()
                if channel.waiters == 0 and now - channel.idle_since >= IDLE_UNSUBSCRIBE
            ]
            for name in idle:
                del self._channels[name]
            if idle:
                await self._command(self._unsubscribe, *idle)

    async def close(self) -> None:
        self._closed = True
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()
